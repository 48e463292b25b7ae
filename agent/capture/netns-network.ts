// PodNetwork backed by a pod's network namespace: every socket is created inside the pod by
// the native library and flagged in aa_agent_socks (and marked 0x539), so capture never steers
// the proxy's own connections. A Capture must be attached in this process.
import fs from "node:fs";
import net from "node:net";

import { AgentError } from "../errors";
import type { ApplicationSource, PodNetwork, TransparentSourceState } from "../proxy/pod-network";
import { listenIpv6 } from "./ipv6-listener";
import { isNativeIpv6 } from "./ebpf/layout-ip6";
import { bindTransparent, closeFd, netnsListener, netnsSocket, netnsSocket6, netnsSockets, netnsSockets6, netnsTransparentRouting, setReusePort } from "./native";
import { SpareSockets } from "./spare-sockets";

export { SPARE_SOCKET_BATCH } from "./spare-sockets";

/** Backlog of the in-pod listeners; Node passes the same value to listen(2) by default. */
const LISTEN_BACKLOG = 511;

/**
 * Sockets tried per transparent connect before it fails. A socket is discarded and another tried
 * only when the kernel gave it the client's own port.
 */
const TRANSPARENT_BIND_TRIES = 4;

export class NetnsPodNetwork implements PodNetwork {
  /**
   * Unconnected IPv4 and IPv6 agent sockets made in the pod's namespace, waiting for connect().
   * Each keeps the namespace alive, so close() must run when the pod's proxies stop.
   */
  readonly #spares4 = new SpareSockets({
    batch: (count) => netnsSockets(this.netnsPath, count),
    one: () => netnsSocket(this.netnsPath, {}),
  });
  readonly #spares6 = new SpareSockets({
    batch: (count) => netnsSockets6(this.netnsPath, count),
    one: () => netnsSocket6(this.netnsPath, {}),
  });
  #transparentSource: TransparentSourceState = "off";
  #transparentSourceIpv6: TransparentSourceState = "off";

  /**
   * podIp is the pod's IPv4 address, undefined for an IPv6-only pod, which then gets no IPv4
   * listeners. podIp6 is the pod's IPv6 address when it has one in its namespace: the pod then
   * gets an IPv6 listener on each proxy port, and connect() reaches IPv6 destinations.
   */
  constructor(
    readonly netnsPath: string,
    readonly podIp: string | undefined,
    readonly podIp6?: string,
  ) {
    if (podIp === undefined && podIp6 === undefined) {
      throw new AgentError("INTERNAL", `missing pod address for the pod network of ${netnsPath}: pass an IPv4 or an IPv6 pod address`);
    }
  }

  /**
   * Whether listeners made from now on get SO_REUSEPORT. A replacement agent sets it while it
   * starts its listeners next to the running agent's (see agent/handover/).
   */
  static shareNewListeners = false;
  /** The file descriptor of each open IPv4 listener by port, for a hand-over. */
  readonly #listeners = new Map<number, number>();
  /** The file descriptor of each open IPv6 listener by port, for a hand-over. */
  readonly #listeners6 = new Map<number, number>();

  /**
   * Starts `server` on 0.0.0.0:port inside the pod, with a socket made and bound there, and for a
   * pod with an IPv6 address also on [::]:port (see listenIpv6). An IPv6-only pod gets the IPv6
   * socket alone. `onListenerFd` gets each socket's descriptor with its family.
   */
  async listen(server: net.Server, port: number, onListenerFd?: (fd: number, family: 4 | 6) => void): Promise<void> {
    if (this.podIp !== undefined) await this.listenIpv4(server, port, onListenerFd && ((fd) => onListenerFd(fd, 4)));
    if (this.podIp6 !== undefined) await this.listenIpv6(server, port, onListenerFd);
  }

  private listenIpv6(server: net.Server, port: number, onListenerFd?: (fd: number, family: 4 | 6) => void): Promise<void> {
    // Recorded only once onListenerFd accepted it: listenIpv6 closes a descriptor it rejected.
    const record = (fd: number, family: 4 | 6): void => {
      onListenerFd?.(fd, family);
      this.#listeners6.set(port, fd);
      server.once("close", () => {
        if (this.#listeners6.get(port) === fd) this.#listeners6.delete(port);
      });
    };
    return listenIpv6(this.netnsPath, server, port, LISTEN_BACKLOG, record, NetnsPodNetwork.shareNewListeners);
  }

  private listenIpv4(server: net.Server, port: number, onListenerFd?: (fd: number) => void): Promise<void> {
    const fd = netnsListener(this.netnsPath, { port, backlog: LISTEN_BACKLOG, reusePort: NetnsPodNetwork.shareNewListeners });
    this.#listeners.set(port, fd);
    server.once("close", () => {
      if (this.#listeners.get(port) === fd) this.#listeners.delete(port);
    });
    try {
      onListenerFd?.(fd);
    } catch (error) {
      closeFd(fd);
      return Promise.reject(error);
    }
    return new Promise((resolve, reject) => {
      // On a listen error Node closes the handle, and with it the descriptor.
      server.once("error", reject);
      server.listen({ fd }, () => {
        server.off("error", reject);
        resolve();
      });
    });
  }

  /**
   * Opens a TCP connection from inside the pod. The socket is created unconnected and flagged
   * in the pod's namespace, then Node connects it: a socket keeps the namespace it was created
   * in, and the flag in aa_agent_socks makes connect4 let it through.
   */
  connect(host: string, port: number, source?: ApplicationSource): net.Socket {
    const fd = isNativeIpv6(host) ? this.takeIpv6(source) : this.takeIpv4(source);
    // `readable: false` must not be passed: Node would end the readable side for good.
    const socket = new net.Socket({ fd, allowHalfOpen: true });
    socket.connect(port, host);
    return socket;
  }

  /** Returns an IPv4 agent socket for connect(), bound to `source` when transparency is ready. */
  private takeIpv4(source: ApplicationSource | undefined): number {
    if (source && this.#transparentSource === "ready") return this.takeTransparent(this.#spares4, source);
    return this.#spares4.take();
  }

  /** Returns an IPv6 agent socket for connect(), bound to `source` when IPv6 transparency is ready. */
  private takeIpv6(source: ApplicationSource | undefined): number {
    if (source && this.#transparentSourceIpv6 === "ready") return this.takeTransparent(this.#spares6, source);
    return this.#spares6.take();
  }

  /**
   * Whether connect() can keep an IPv4 client's address as the source; see
   * enableTransparentSource().
   */
  get transparentSource(): TransparentSourceState {
    return this.#transparentSource;
  }

  /**
   * Whether connect() can keep an IPv6 client's address as the source; see
   * enableTransparentSourceIpv6().
   */
  get transparentSourceIpv6(): TransparentSourceState {
    return this.#transparentSourceIpv6;
  }

  /**
   * Installs the pod's policy routing for source-address transparency (safe to repeat: an agent
   * restart finds it in place), after which connect() honours a `source`. Returns how many of
   * the rule and route were new. On failure transparentSource becomes "unavailable" and the error is thrown.
   */
  enableTransparentSource(): number {
    try {
      const added = netnsTransparentRouting(this.netnsPath, true);
      this.#transparentSource = "ready";
      return added;
    } catch (error) {
      this.#transparentSource = "unavailable";
      throw error;
    }
  }

  /**
   * Removes the pod's transparent-source routing and turns transparency off. Returns how many of
   * the rule and route it deleted. Call it only once no transparent connection is open.
   */
  disableTransparentSource(): number {
    this.#transparentSource = "off";
    return netnsTransparentRouting(this.netnsPath, false);
  }

  /**
   * enableTransparentSource() for IPv6 clients: installs the IPv6 rule and the route
   * `local ::/0 dev lo`. Call it only for a pod with an IPv6 address. Returns how many of the
   * rule and route were new. On failure, including a namespace whose IPv6 is disabled,
   * transparentSourceIpv6 becomes "unavailable" and the error is thrown.
   */
  enableTransparentSourceIpv6(): number {
    try {
      const added = netnsTransparentRouting(this.netnsPath, true, 6);
      this.#transparentSourceIpv6 = "ready";
      return added;
    } catch (error) {
      this.#transparentSourceIpv6 = "unavailable";
      throw error;
    }
  }

  /**
   * Removes the pod's IPv6 transparent-source routing and turns IPv6 transparency off. Returns
   * how many of the rule and route it deleted. Call it only once no transparent connection is open.
   */
  disableTransparentSourceIpv6(): number {
    this.#transparentSourceIpv6 = "off";
    return netnsTransparentRouting(this.netnsPath, false, 6);
  }

  /** Returns the file descriptor of the open listener of `family` on `port`, if there is one. */
  listenerFd(port: number, family: 4 | 6 = 4): number | undefined {
    return (family === 6 ? this.#listeners6 : this.#listeners).get(port);
  }

  /**
   * Sets SO_REUSEPORT on every open listener, IPv4 and IPv6, so that a replacement agent's
   * listeners can join them.
   */
  shareListeners(): void {
    for (const fd of [...this.#listeners.values(), ...this.#listeners6.values()]) setReusePort(fd, true);
  }

  /** Counts the unconnected IPv4 sockets held for later connect() calls. */
  get spareCount(): number {
    return this.#spares4.count;
  }

  /** Counts the unconnected IPv6 sockets held for later connect() calls. */
  get spareCount6(): number {
    return this.#spares6.count;
  }

  /**
   * Closes the spare sockets of both families. connect() still works afterwards, one socket per
   * call with no reserve, for connections that a draining proxy opens late. Safe to call more than once.
   */
  close(): void {
    this.#spares4.close();
    this.#spares6.close();
  }

  /**
   * Returns an agent socket from `spares` bound to the client's address, transparent and marked
   * TRANSPARENT_MARK. A socket that got the client's own port is closed and another one tried.
   */
  private takeTransparent(spares: SpareSockets, source: ApplicationSource): number {
    for (let tries = 0; tries < TRANSPARENT_BIND_TRIES; tries++) {
      const fd = spares.take();
      try {
        if (bindTransparent(fd, source.ip, source.avoidPort) !== undefined) return fd;
      } catch (error) {
        fs.closeSync(fd);
        throw error;
      }
      fs.closeSync(fd);
    }
    throw new AgentError(
      "INTERNAL",
      `binding a socket to the client address ${source.ip} failed: the kernel picked the client's own port ${source.avoidPort} ${TRANSPARENT_BIND_TRIES} times`,
    );
  }
}
