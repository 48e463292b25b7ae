// PodNetwork backed by a pod's network namespace: every socket is created inside the pod by
// the native library and flagged in aa_agent_socks (and marked 0x539), so capture never steers
// the proxy's own connections. A Capture must be attached in this process.
import fs from "node:fs";
import net from "node:net";

import type { PodNetwork } from "../proxy/pod-network";
import { agentSocketMapVersion, closeFd, netnsSocket, netnsSockets } from "./native";

/** Backlog of the in-pod listeners; Node passes the same value to listen(2) by default. */
const LISTEN_BACKLOG = 511;

/**
 * Sockets made per visit to the pod's namespace when the reserve is empty. One visit costs a
 * thread, a setns(2) and an ffi call, so a batch spreads that cost over many connections.
 */
export const SPARE_SOCKET_BATCH = 32;

export class NetnsPodNetwork implements PodNetwork {
  /**
   * Unconnected agent sockets made in the pod's namespace, waiting for connect(). Each keeps the
   * namespace alive, so close() must run when the pod's proxies stop.
   */
  private spares: number[] = [];
  /** agentSocketMapVersion() when the spares were made. */
  private sparesMapVersion = -1;
  private closed = false;

  constructor(
    readonly netnsPath: string,
    readonly podIp: string,
  ) {}

  /** Starts `server` on 0.0.0.0:port inside the pod, with a socket made and bound there. */
  listen(server: net.Server, port: number, onListenerFd?: (fd: number) => void): Promise<void> {
    const fd = netnsSocket(this.netnsPath, { bindIp: "0.0.0.0", port, backlog: LISTEN_BACKLOG });
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
  connect(host: string, port: number): net.Socket {
    const fd = this.takeSpare();
    // `readable: false` must not be passed: Node would end the readable side for good.
    const socket = new net.Socket({ fd, allowHalfOpen: true });
    socket.connect(port, host);
    return socket;
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
