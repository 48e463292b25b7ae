// The IPv6 half of a dual-stack pod's listeners. Node's net.Server serves one listening socket,
// so each proxy port of a pod with an IPv6 address gets a second, IPv6-only socket in a
// companion server, whose accepted connections go to the proxy's own server. The proxy keeps one
// server object, one connection handler and one close().
//
// Two sockets, not one dual-stack [::] socket, because the IPv4 path then stays as it was: pods
// without IPv6 get no IPv6 socket at all, sk_lookup's IPv4 sockhash keeps an AF_INET listener,
// and accepted IPv4 connections keep their plain IPv4 addresses.
import net from "node:net";

import { closeFd, netnsListener } from "./native";

/** The net.Server options that shape each accepted socket; Node keeps them as instance fields. */
interface AcceptOptions {
  allowHalfOpen?: boolean;
  pauseOnConnect?: boolean;
  noDelay?: boolean;
}

/**
 * Listens on [::]:port inside the pod's namespace and hands every accepted connection to
 * `server`, as if `server` had accepted it: its "connection" handlers run, TLS included for a
 * tls or http2 server. `server.close()` closes the IPv6 socket too. `onListenerFd` receives the
 * socket's descriptor, with family 6, before anything is accepted. The socket is made like the
 * IPv4 listener: net.ipv4.tcp_migrate_req is set in the namespace (it covers IPv6 too), and
 * `reusePort` sets SO_REUSEPORT before the bind, so that it can join a running agent's IPv6
 * listener during a hand-over. Resolves once listening.
 */
export function listenIpv6(
  netnsPath: string,
  server: net.Server,
  port: number,
  backlog: number,
  onListenerFd?: (fd: number, family: 4 | 6) => void,
  reusePort = false,
): Promise<void> {
  const fd = netnsListener(netnsPath, { ipv6: true, port, backlog, reusePort });
  try {
    onListenerFd?.(fd, 6);
  } catch (error) {
    closeFd(fd);
    return Promise.reject(error);
  }

  const options = server as net.Server & AcceptOptions;
  const companion = net.createServer({
    allowHalfOpen: options.allowHalfOpen ?? false,
    pauseOnConnect: options.pauseOnConnect ?? false,
    noDelay: options.noDelay ?? false,
  });
  companion.on("connection", (socket: net.Socket) => server.emit("connection", socket));
  companion.on("error", (error) => server.emit("error", error));
  closeWithServer(server, companion);

  return new Promise((resolve, reject) => {
    // On a listen error Node closes the handle, and with it the descriptor.
    companion.once("error", reject);
    companion.listen({ fd }, () => {
      companion.off("error", reject);
      resolve();
    });
  });
}

/**
 * Makes server.close() close the companion's listening socket at the same moment. net.Server
 * emits nothing when close() is called (its "close" event waits for every connection to end),
 * so the method itself is wrapped.
 */
function closeWithServer(server: net.Server, companion: net.Server): void {
  const close = server.close.bind(server);
  server.close = ((callback?: (error?: Error) => void) => {
    if (companion.listening) companion.close();
    return close(callback);
  }) as typeof server.close;
}
