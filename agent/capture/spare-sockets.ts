// A reserve of unconnected agent sockets made in one pod's network namespace, for the
// connections that the pod's proxies open. NetnsPodNetwork keeps one reserve per address family.
import fs from "node:fs";

import { agentSocketMapVersion } from "./native";

/**
 * Sockets made per visit to the pod's namespace when the reserve is empty. One visit costs a
 * thread, a setns(2) and an ffi call, so a batch spreads that cost over many connections.
 */
export const SPARE_SOCKET_BATCH = 32;

/** The socket factories of a reserve: one for a batch of `count` sockets and one for a single socket. */
export interface SocketMaker {
  batch(count: number): number[];
  one(): number;
}

/**
 * Unconnected agent sockets waiting for connect(). Each keeps the pod's namespace alive, so
 * close() must run when the pod's proxies stop.
 */
export class SpareSockets {
  #fds: number[] = [];
  /** agentSocketMapVersion() when the sockets were made. */
  #mapVersion = -1;
  #closed = false;

  constructor(private readonly maker: SocketMaker) {}

  /** Counts the sockets held for later take() calls. */
  get count(): number {
    return this.#fds.length;
  }

  /** Returns an agent socket, refilling the reserve in one batch when it is empty. */
  take(): number {
    // Sockets flagged before a Capture attached or closed may be flagged in a map that the
    // programs no longer read. Re-attaching with the same pins keeps the same aa_agent_socks
    // map, whose flags stay valid. After `capture remove` and a new attach, the programs read a
    // new map, and a socket flagged only in the old one would be steered. Dropping the spares on
    // every change covers both cases. A restarted agent is a new process with no spares at all.
    if (this.#mapVersion !== agentSocketMapVersion()) this.drop();
    if (this.#closed) return this.maker.one();
    if (this.#fds.length === 0) this.refill();
    return this.#fds.pop()!;
  }

  /**
   * Closes the held sockets. take() still works afterwards, one socket per call with no
   * reserve, for connections that a draining proxy opens late. Safe to call more than once.
   */
  close(): void {
    this.#closed = true;
    this.drop();
  }

  private refill(): void {
    const version = agentSocketMapVersion();
    try {
      this.#fds = this.maker.batch(SPARE_SOCKET_BATCH);
    } catch {
      // A batch needs SPARE_SOCKET_BATCH free descriptors at once. Fall back to one socket,
      // which throws the error to report when even that fails.
      this.#fds = [this.maker.one()];
    }
    this.#mapVersion = version;
  }

  private drop(): void {
    const fds = this.#fds;
    this.#fds = [];
    for (const fd of fds) fs.closeSync(fd);
  }
}
