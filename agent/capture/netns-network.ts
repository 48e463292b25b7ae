// PodNetwork backed by a pod's network namespace: every socket is created inside the pod by
// the native library and flagged in aa_agent_socks (and marked 0x539), so capture never steers
// the proxy's own connections. A Capture must be attached in this process.
import fs from "node:fs";
import net from "node:net";

import { AgentError } from "../errors";
import type { ApplicationSource, PodNetwork, TransparentSourceState } from "../proxy/pod-network";
import { listenIpv6 } from "./ipv6-listener";
import { isNativeIpv6 } from "./layout-ip6";
import { agentSocketMapVersion, bindTransparent, closeFd, netnsListener, netnsSocket, netnsSocket6, netnsSockets, netnsTransparentRouting, setReusePort } from "./native";

/** Backlog of the in-pod listeners; Node passes the same value to listen(2) by default. */
const LISTEN_BACKLOG = 511;

/**
 * Sockets made per visit to the pod's namespace when the reserve is empty. One visit costs a
 * thread, a setns(2) and an ffi call, so a batch spreads that cost over many connections.
 */
export const SPARE_SOCKET_BATCH = 32;

/**
 * Sockets tried per transparent connect before it fails. A socket is discarded and another tried
 * only when the kernel gave it the client's own port.
 */
const TRANSPARENT_BIND_TRIES = 4;

export class NetnsPodNetwork implements PodNetwork {
  /**
   * Unconnected agent sockets made in the pod's namespace, waiting for connect(). Each keeps the
   * namespace alive, so close() must run when the pod's proxies stop.
   */
  private spares: number[] = [];
  /** agentSocketMapVersion() when the spares were made. */
  private sparesMapVersion = -1;
  private closed = false;
  #transparentSource: TransparentSourceState = "off";

  /**
   * podIp6 is the pod's IPv6 address when it has one in its namespace: the pod then gets an IPv6
   * listener next to each IPv4 one, and connect() reaches IPv6 destinations.
   */
  constructor(
    readonly netnsPath: string,
    readonly podIp: string,
    readonly podIp6?: string,
  ) {}

  /**
   * Whether listeners made from now on get SO_REUSEPORT. A replacement agent sets it while it
   * starts its listeners next to the running agent's; see agent/handover/.
   */
  static shareNewListeners = false;
  /** The file descriptor of each open listener by port, for a hand-over. */
  readonly #listeners = new Map<number, number>();

  /**
   * Starts `server` on 0.0.0.0:port inside the pod, with a socket made and bound there, and for a
   * pod with an IPv6 address also on [::]:port (see listenIpv6). `onListenerFd` gets each
   * socket's descriptor with its family.
   */
  async listen(server: net.Server, port: number, onListenerFd?: (fd: number, family: 4 | 6) => void): Promise<void> {
    await this.listenIpv4(server, port, onListenerFd && ((fd) => onListenerFd(fd, 4)));
    // NOTE: the IPv6 listener is not in #listeners, so a hand-over passes on the IPv4 one only.
    if (this.podIp6 !== undefined) await listenIpv6(this.netnsPath, server, port, LISTEN_BACKLOG, onListenerFd);
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
    if (isNativeIpv6(host)) return this.connectIpv6(host, port);
    const fd = source && this.#transparentSource === "ready" ? this.takeTransparent(source) : this.takeSpare();
    // `readable: false` must not be passed: Node would end the readable side for good.
    const socket = new net.Socket({ fd, allowHalfOpen: true });
    socket.connect(port, host);
    return socket;
  }

  /**
   * connect() for an IPv6 destination, from an IPv6 agent socket. The source address is the
   * pod's own: transparency is for IPv4 clients only.
   * NOTE: one namespace visit per connection, without the spare-socket reserve of IPv4.
   */
  private connectIpv6(host: string, port: number): net.Socket {
    const fd = netnsSocket6(this.netnsPath, {});
    const socket = new net.Socket({ fd, allowHalfOpen: true });
    socket.connect(port, host);
    return socket;
  }

  /** Whether connect() can keep a client's address as the source; see enableTransparentSource(). */
  get transparentSource(): TransparentSourceState {
    return this.#transparentSource;
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

  /** Returns the file descriptor of the open listener on `port`, if there is one. */
  listenerFd(port: number): number | undefined {
    return this.#listeners.get(port);
  }

  /** Sets SO_REUSEPORT on every open listener, so that a replacement agent's listeners can join them. */
  shareListeners(): void {
    for (const fd of this.#listeners.values()) setReusePort(fd, true);
  }

  /** Counts the unconnected sockets held for later connect() calls. */
  get spareCount(): number {
    return this.spares.length;
  }

  /**
   * Closes the spare sockets. connect() still works afterwards, one socket per call with no
   * reserve, for connections that a draining proxy opens late. Safe to call more than once.
   */
  close(): void {
    this.closed = true;
    this.dropSpares();
  }

  /** Returns an agent socket for connect(), refilling the reserve in one batch when it is empty. */
  private takeSpare(): number {
    // Sockets flagged before a Capture attached or closed may be flagged in a map that the
    // programs no longer read. Re-attaching with the same pins keeps the same aa_agent_socks
    // map, whose flags stay valid. After `capture remove` and a new attach, the programs read a
    // new map, and a socket flagged only in the old one would be steered. Dropping the spares on
    // every change covers both cases. A restarted agent is a new process with no spares at all.
    if (this.sparesMapVersion !== agentSocketMapVersion()) this.dropSpares();
    if (this.closed) return netnsSocket(this.netnsPath, {});
    if (this.spares.length === 0) this.refill();
    return this.spares.pop()!;
  }

  /**
   * Returns an agent socket bound to the client's address, transparent and marked
   * TRANSPARENT_MARK. A socket that got the client's own port is closed and another one tried.
   */
  private takeTransparent(source: ApplicationSource): number {
    for (let tries = 0; tries < TRANSPARENT_BIND_TRIES; tries++) {
      const fd = this.takeSpare();
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

  private refill(): void {
    const version = agentSocketMapVersion();
    try {
      this.spares = netnsSockets(this.netnsPath, SPARE_SOCKET_BATCH);
    } catch {
      // A batch needs SPARE_SOCKET_BATCH free descriptors at once. Fall back to one socket,
      // which throws the error to report when even that fails.
      this.spares = [netnsSocket(this.netnsPath, {})];
    }
    this.sparesMapVersion = version;
  }

  private dropSpares(): void {
    const spares = this.spares;
    this.spares = [];
    for (const fd of spares) fs.closeSync(fd);
  }
}
