// Counts refused connections and writes their `connection.refused` audit records, so that a flood
// of refusals does not flood the audit trail. The first refusal of a key in a window is written at
// once, and the rest are folded into one record with their count when the window ends.
//
// Invariants: at most `maxKeys` keys are tracked, and one overflow entry per listener and reason
// takes the refusals of new keys past that, so memory stays bounded whatever the sources. Every
// refusal is counted in totals() whether or not its record is folded.

import type { AuditRecorder, ConnectionRefusedRecord, RefusalListener, RefusalReason } from "../audit/record";
import { AgentError, type ErrorCode } from "../errors";
import type { Logger } from "../log";

export type { RefusalListener, RefusalReason } from "../audit/record";

/** One refusal as a listener reports it, with the record fields that the RefusalLog does not fill in itself. */
export type RefusalEvent = Omit<ConnectionRefusedRecord, "type" | "time" | "node" | "count" | "first_time">;

/** Options of a RefusalLog. */
export interface RefusalLogOptions {
  node: string;
  audit: AuditRecorder;
  logger: Logger;
  /** Time in ms during which refusals of one key after the first are folded into one record (default 10 000). */
  windowMs?: number;
  /** Keys tracked at once before new keys share an overflow entry per listener and reason (default 1024). */
  maxKeys?: number;
}

/** A key's refusals since its last record. */
interface FoldEntry {
  /** Time in ms at which the window ends and the folded refusals are written. */
  windowEnd: number;
  /** Refusals since the last record, or 0 when none came after it. */
  pending: number;
  /** RFC 3339 time of the first pending refusal. */
  firstTime: string;
  /** The latest pending refusal, whose fields the folded record carries. */
  latest?: RefusalEvent;
  /** Whether this is an overflow entry, which takes refusals of several keys. */
  overflow: boolean;
}

const DEFAULT_WINDOW_MS = 10_000;
const DEFAULT_MAX_KEYS = 1024;

/** Counts refusals and writes their folded `connection.refused` records. The agent has one. */
export class RefusalLog {
  readonly #node: string;
  readonly #audit: AuditRecorder;
  readonly #logger: Logger;
  readonly #windowMs: number;
  readonly #maxKeys: number;
  /** Entries in the order their windows end, because each window has the same length and restarts by re-insertion. */
  readonly #entries = new Map<string, FoldEntry>();
  /** Refusals and closes per "listener reason". */
  readonly #totals = new Map<string, { listener: string; reason: string; count: number }>();
  #timer: NodeJS.Timeout | undefined;

  constructor(options: RefusalLogOptions) {
    this.#node = options.node;
    this.#audit = options.audit;
    this.#logger = options.logger;
    this.#windowMs = options.windowMs ?? DEFAULT_WINDOW_MS;
    this.#maxKeys = options.maxKeys ?? DEFAULT_MAX_KEYS;
  }

  /**
   * Counts a refusal. Writes a record at once for the first of its key in a window, and folds the
   * rest into one record with `count` at the window's end. Key: listener, reason, source IP and
   * destination address.
   */
  refuse(event: RefusalEvent): void {
    this.#count(event.listener, event.reason);
    const now = Date.now();
    const time = new Date(now).toISOString();
    const key = `${event.listener} ${event.reason} ${hostOf(event.src.addr)} ${event.dst?.addr ?? ""}`;
    const entry = this.#entries.get(key);
    if (entry !== undefined) {
      this.#fold(entry, event, time);
      return;
    }
    if (this.#entries.size >= this.#maxKeys) {
      this.#foldOverflow(event, now, time);
      return;
    }
    this.#write(event, 1, time, time);
    this.#entries.set(key, { windowEnd: now + this.#windowMs, pending: 0, firstTime: time, overflow: false });
    this.#schedule();
  }

  /**
   * Counts a limit that closed an already recorded connection (idle_timeout, buffered_bytes),
   * without a `connection.refused` record: the connection's own `connection.completed` record
   * carries the error code.
   */
  countClosed(listener: RefusalListener, reason: RefusalReason): void {
    this.#count(listener, reason);
  }

  /** Totals per listener and reason since the agent started, closes included, for the metric. */
  totals(): Array<{ listener: string; reason: string; count: number }> {
    return [...this.#totals.values()].map((total) => ({ ...total }));
  }

  /** Writes every pending folded record and clears the windows. The agent calls it at stop. */
  flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    for (const entry of this.#entries.values()) this.#writePending(entry);
    this.#entries.clear();
  }

  #count(listener: RefusalListener, reason: RefusalReason): void {
    const key = `${listener} ${reason}`;
    const total = this.#totals.get(key);
    if (total === undefined) this.#totals.set(key, { listener, reason, count: 1 });
    else total.count += 1;
  }

  #fold(entry: FoldEntry, event: RefusalEvent, time: string): void {
    if (entry.pending === 0) entry.firstTime = time;
    entry.pending += 1;
    entry.latest = event;
  }

  /** Folds a refusal of an untracked key into its listener's and reason's overflow entry. */
  #foldOverflow(event: RefusalEvent, now: number, time: string): void {
    const key = `${event.listener} ${event.reason} overflow`;
    let entry = this.#entries.get(key);
    if (entry === undefined) {
      // The only entries that may take the map past maxKeys: at most one per listener and reason.
      entry = { windowEnd: now + this.#windowMs, pending: 0, firstTime: time, overflow: true };
      this.#entries.set(key, entry);
      this.#schedule();
    }
    this.#fold(entry, event, time);
  }

  /** Writes the folded records of the windows that ended, and restarts the windows that had refusals. */
  #sweep(): void {
    this.#timer = undefined;
    const now = Date.now();
    for (const [key, entry] of this.#entries) {
      if (entry.windowEnd > now) break;
      this.#entries.delete(key);
      if (entry.pending === 0) continue;
      this.#writePending(entry);
      // Refusals kept coming: the key stays folded for another window.
      this.#entries.set(key, { windowEnd: now + this.#windowMs, pending: 0, firstTime: entry.firstTime, overflow: entry.overflow });
    }
    this.#schedule();
  }

  /** Arms the timer for the earliest window end, unless it is armed or nothing is pending. */
  #schedule(): void {
    if (this.#timer !== undefined) return;
    const first = this.#entries.values().next();
    if (first.done) return;
    this.#timer = setTimeout(() => this.#sweep(), Math.max(0, first.value.windowEnd - Date.now()));
    // Pending records are written by flush() at stop: the timer does not keep the process alive.
    this.#timer.unref();
  }

  #writePending(entry: FoldEntry): void {
    if (entry.pending === 0 || entry.latest === undefined) return;
    const event = entry.overflow
      ? { ...entry.latest, message: `${entry.latest.message} (folded with refusals from other sources, because more than ${this.#maxKeys} sources were refused within ${this.#windowMs} ms)` }
      : entry.latest;
    this.#write(event, entry.pending, entry.firstTime, new Date().toISOString());
  }

  #write(event: RefusalEvent, count: number, firstTime: string, time: string): void {
    const record: ConnectionRefusedRecord = {
      type: "connection.refused",
      time,
      node: this.#node,
      listener: event.listener,
      port: event.port,
      src: event.src,
      ...(event.dst === undefined ? {} : { dst: event.dst }),
      reason: event.reason,
      message: event.message,
      ...(event.limit === undefined ? {} : { limit: event.limit }),
      count,
      first_time: firstTime,
    };
    this.#audit.write(record);
    this.#logger.warn({ listener: event.listener, port: event.port, src: event.src.addr, dst: event.dst?.addr, reason: event.reason, count }, `connection refused: ${event.message}`);
  }
}

/** The error codes of a limit that closes an established connection, and their refusal reasons. */
const CLOSE_REASONS: Partial<Record<ErrorCode, RefusalReason>> = {
  IDLE_TIMEOUT: "idle_timeout",
};

/** Returns the refusal reason of an error that a limit raised, for RefusalLog.countClosed, or undefined for other errors. */
export function closeReasonOf(error: unknown): RefusalReason | undefined {
  return error instanceof AgentError ? CLOSE_REASONS[error.code] : undefined;
}

/** Returns the IP of an "ip:port" or "[ip]:port" address, or the text itself when it has no port. */
function hostOf(addr: string): string {
  const bracketed = /^\[([^\]]*)\](?::\d+)?$/.exec(addr);
  if (bracketed) return bracketed[1];
  const colon = addr.lastIndexOf(":");
  // More than one colon without brackets is a bare IPv6 address.
  if (colon < 0 || addr.indexOf(":") !== colon) return addr;
  return addr.slice(0, colon);
}
