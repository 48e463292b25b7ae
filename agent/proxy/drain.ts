// The drain of one proxy's open connections when the proxy stops. Its listener is closed by then.
// The connections keep flowing until they finish or the deadline passes, and the deadline aborts the
// rest. Every connection writes its own audit record from its finally path, so a drain only waits
// for those paths to run.

import { AgentError } from "../errors";

/** One open connection (or HBONE stream) of a proxy. */
export interface DrainableConnection {
  /** Settles once the connection closed and wrote its audit record. */
  readonly done: Promise<void>;
}

/** The outcome of one drain. */
export interface DrainSummary {
  /** Connections open when the drain began, plus any that arrived during it. */
  open: number;
  /** Connections that closed on their own before the deadline. */
  finished: number;
  /** Connections that were still open at the deadline and were aborted. */
  aborted: number;
}

export const EMPTY_DRAIN: DrainSummary = { open: 0, finished: 0, aborted: 0 };

/** Adds drain summaries together, for a workload's proxies or a node's workloads. */
export function sumDrains(summaries: DrainSummary[]): DrainSummary {
  return summaries.reduce(
    (total, summary) => ({
      open: total.open + summary.open,
      finished: total.finished + summary.finished,
      aborted: total.aborted + summary.aborted,
    }),
    EMPTY_DRAIN,
  );
}

/**
 * Returns the error recorded on the connections that a proxy's stop aborts. `proxy` names the proxy,
 * as in "the outbound proxy of shop/web". A stop with a grace period is a drain, so its aborts carry
 * DRAIN_TIMEOUT. An immediate stop (a workload unenrolled or replaced) records STREAM_RESET.
 */
export function stopReason(proxy: string, graceMs: number): AgentError {
  if (graceMs > 0) {
    return new AgentError(
      "DRAIN_TIMEOUT",
      `${proxy} stopped, and the connection was still open when its ${graceMs / 1000} s drain ended; raise --drain-timeout to let longer connections finish`,
    );
  }
  return new AgentError("STREAM_RESET", `${proxy} stopped`);
}

/**
 * Waits for a proxy's connections to close, up to a deadline, then aborts the ones still open.
 * The first drain() call starts the drain. A later call may move the deadline earlier (a second
 * SIGTERM calls it with 0), never later, and every call resolves with the same summary.
 */
export class ConnectionDrain<Connection extends DrainableConnection> {
  readonly #active: () => Iterable<Connection>;
  readonly #abort: (connection: Connection) => void;
  readonly #seen = new Set<Connection>();
  #aborted = 0;
  #deadlineAt = Infinity;
  #timer: NodeJS.Timeout | undefined;
  #expired = false;
  #result: Promise<DrainSummary> | undefined;

  /**
   * `active` lists the connections open at the moment it is called. `abort` aborts one connection at
   * once: it records the reason and resets both halves, and the connection's `done` settles after.
   */
  constructor(active: () => Iterable<Connection>, abort: (connection: Connection) => void) {
    this.#active = active;
    this.#abort = abort;
  }

  /** True once the deadline passed: a connection that arrives now must be aborted at once. */
  get expired(): boolean {
    return this.#expired;
  }

  /** Starts the drain, or moves its deadline to `graceMs` from now when that is earlier. */
  drain(graceMs: number): Promise<DrainSummary> {
    this.#setDeadline(Math.max(0, graceMs));
    this.#result ??= this.#waitUntilEmpty();
    return this.#result;
  }

  /** Aborts one connection and counts it as aborted; proxies call it for a connection that arrives after the deadline. */
  abort(connection: Connection): void {
    this.#seen.add(connection);
    this.#aborted++;
    this.#abort(connection);
  }

  #setDeadline(graceMs: number): void {
    const deadlineAt = Date.now() + graceMs;
    if (deadlineAt >= this.#deadlineAt || this.#expired) return;
    this.#deadlineAt = deadlineAt;
    clearTimeout(this.#timer);
    if (graceMs === 0) {
      this.#expire();
      return;
    }
    this.#timer = setTimeout(() => this.#expire(), graceMs);
  }

  #expire(): void {
    this.#expired = true;
    for (const connection of [...this.#active()]) {
      this.abort(connection);
    }
  }

  /** Waits for every connection, including those that arrive while the drain runs (HBONE streams racing a GOAWAY). */
  async #waitUntilEmpty(): Promise<DrainSummary> {
    for (;;) {
      const open = [...this.#active()];
      if (open.length === 0) break;
      for (const connection of open) this.#seen.add(connection);
      await Promise.allSettled(open.map((connection) => connection.done));
    }
    clearTimeout(this.#timer);
    return { open: this.#seen.size, finished: this.#seen.size - this.#aborted, aborted: this.#aborted };
  }
}
