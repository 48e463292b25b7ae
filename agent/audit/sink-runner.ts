// Delivery to one sink: a loop that sends the records after the sink's cursor, batch by batch. A
// failed batch is retried with a capped exponential backoff until the sink accepts it. The jitter
// keeps many nodes from retrying against one collector in step.

import type { Logger } from "../log";
import type { AuditSink, SpooledRecord } from "./sink";

/** How long close() waits for a send in flight before it closes the sink anyway. */
const CLOSE_WAIT_MS = 1_000;
/** A send in flight for longer than this makes the sink count as down in status() and metrics. */
const STALLED_SEND_MS = 30_000;

export interface RetryPolicy {
  initialDelayMs: number;
  maxDelayMs: number;
}

export interface SinkRunnerContext {
  retry: RetryPolicy;
  batchSize: number;
  /** Seq of the last spooled record. */
  head(): number;
  batchFrom(seq: number, max: number): Promise<SpooledRecord[]>;
  /** Called after the sink accepted a batch. */
  delivered(): void;
  logger: Logger;
}

export class SinkRunner {
  /** Seq of the last record the sink accepted (or was skipped past by an eviction). */
  cursor = 0;
  private running = false;
  private stopped = false;
  private retryDelayMs: number;
  private retryTimer: NodeJS.Timeout | undefined;
  private lingerTimer: NodeJS.Timeout | undefined;
  /** Set when the linger ended, so that the next run sends a batch that is not full. */
  private lingered = false;
  /** Set by sendNow() until the sink has caught up: no linger in between. */
  private urgent = false;
  private failureStreak = 0;
  private counts = { delivered: 0, failures: 0, dropped: 0, rejected: 0 };
  private lastError: string | undefined;
  private lastErrorTime: string | undefined;
  private current: Promise<void> | undefined;
  /** Losses this sink has not received a gap record about yet. */
  private unreported: { firstSeq: number; lastSeq: number; lost: number } | undefined;
  /** When the send in flight began, in ms since the epoch. */
  private sendingSince: number | undefined;

  constructor(
    readonly sink: AuditSink,
    private readonly context: SinkRunnerContext,
  ) {
    this.retryDelayMs = context.retry.initialDelayMs;
  }

  start(cursor: number): void {
    this.cursor = cursor;
    this.wake();
  }

  /**
   * Starts the loop if records wait and it is not running or backing off. With the sink's lingerMs,
   * a batch that is not full waits that long for more records first.
   */
  wake(): void {
    if (this.running || this.stopped || this.retryTimer !== undefined || this.lingerTimer !== undefined) return;
    const waiting = this.context.head() - this.cursor;
    if (waiting <= 0) return;
    const linger = this.sink.lingerMs ?? 0;
    if (linger > 0 && waiting < this.context.batchSize && !this.lingered && !this.urgent) {
      this.lingerTimer = setTimeout(() => {
        this.lingerTimer = undefined;
        this.lingered = true;
        this.wake();
      }, linger);
      return;
    }
    this.current = this.run();
  }

  /** Ends a linger or a retry wait now, and sends without lingering until the sink has caught up, for flush() and close(). */
  sendNow(): void {
    this.urgent = this.cursor < this.context.head();
    if (this.lingerTimer === undefined && this.retryTimer === undefined) return;
    clearTimeout(this.lingerTimer);
    clearTimeout(this.retryTimer);
    this.lingerTimer = undefined;
    this.retryTimer = undefined;
    this.lingered = true;
    this.wake();
  }

  /**
   * Adds a loss to the losses this sink has not received a gap record about, and returns their
   * total: the first lost seq and the count.
   */
  addUnreportedLoss(loss: { firstSeq: number; lastSeq: number; lost: number }): { firstSeq: number; lastSeq: number; lost: number } {
    this.unreported =
      this.unreported === undefined
        ? { ...loss }
        : { firstSeq: this.unreported.firstSeq, lastSeq: loss.lastSeq, lost: this.unreported.lost + loss.lost };
    return this.unreported;
  }

  /** Losses this sink has not received a gap record about, for the cursor file. */
  get unreportedLoss(): { firstSeq: number; lastSeq: number; lost: number } | undefined {
    return this.unreported;
  }

  /** Restores the unreported losses saved by an earlier process. */
  restoreUnreportedLoss(loss: { firstSeq: number; lastSeq: number; lost: number } | undefined): void {
    this.unreported = loss === undefined ? undefined : { ...loss };
  }

  /** Moves the cursor past records evicted from the spool before this sink received them. */
  skipTo(seq: number, lost: number): void {
    if (seq <= this.cursor) return;
    this.cursor = seq;
    this.counts.dropped += lost;
  }

  private async run(): Promise<void> {
    this.running = true;
    try {
      while (!this.stopped && this.cursor < this.context.head()) {
        const before = this.cursor;
        let batch: SpooledRecord[];
        try {
          batch = await this.context.batchFrom(this.cursor + 1, this.context.batchSize);
        } catch (error) {
          // Reading the spool failed (a segment evicted meanwhile, a disk error): retry like a failed send.
          this.failed(error, 0);
          return;
        }
        // An empty batch after a skip past missing records means: go on from the new cursor.
        if (batch.length === 0) {
          if (this.cursor > before) continue;
          break;
        }
        this.sendingSince = Date.now();
        try {
          const result = await this.sink.send(batch);
          if (result) this.counts.rejected += Math.min(Math.max(result.rejected, 0), batch.length);
        } catch (error) {
          this.failed(error, batch.length);
          return;
        } finally {
          this.sendingSince = undefined;
        }
        this.succeeded(batch);
        // The few records that arrived during the send wait for the next linger, not a call of their own.
        if ((this.sink.lingerMs ?? 0) > 0 && this.context.head() - this.cursor < this.context.batchSize && !this.stopped && !this.urgent) {
          this.running = false;
          this.lingered = false;
          this.wake();
          return;
        }
      }
    } finally {
      this.running = false;
      this.lingered = false;
    }
  }

  private succeeded(batch: readonly SpooledRecord[]): void {
    const last = batch[batch.length - 1].seq;
    if (last > this.cursor) {
      this.counts.delivered += last - Math.max(this.cursor, batch[0].seq - 1);
      this.cursor = last;
    }
    if (this.cursor >= this.context.head()) this.urgent = false;
    // A gap record about this sink's latest loss has reached it, and that record covers every earlier loss.
    const unreportedUntil = this.unreported?.lastSeq;
    if (unreportedUntil !== undefined) {
      const told = batch.some(({ record }) => record.type === "audit.gap" && record.sink === this.sink.name && (record.last_seq ?? 0) >= unreportedUntil);
      if (told) this.unreported = undefined;
    }
    if (this.failureStreak > 0) {
      this.context.logger.info({ failedAttempts: this.failureStreak }, "audit sink accepts records again");
      this.failureStreak = 0;
      this.retryDelayMs = this.context.retry.initialDelayMs;
    }
    this.context.delivered();
  }

  private failed(error: unknown, records: number): void {
    this.counts.failures++;
    this.failureStreak++;
    this.lastError = error instanceof Error ? error.message : String(error);
    this.lastErrorTime = new Date().toISOString();
    const delay = Math.round(this.retryDelayMs * (0.8 + Math.random() * 0.4));
    if (this.failureStreak === 1) {
      this.context.logger.error(
        { err: error, records, lag: this.context.head() - this.cursor },
        "audit sink failed; records stay spooled and are retried with backoff",
      );
    } else if (this.failureStreak % 10 === 0) {
      this.context.logger.warn({ failedAttempts: this.failureStreak, lastError: this.lastError, nextRetryMs: delay }, "audit sink still failing");
    }
    this.retryDelayMs = Math.min(this.retryDelayMs * 2, this.context.retry.maxDelayMs);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.wake();
    }, delay);
    // The agent's servers keep the process alive; a sink that keeps failing must not.
    this.retryTimer.unref();
  }

  /** Stops sending; a send in flight finishes. */
  stop(): void {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.lingerTimer);
    this.retryTimer = undefined;
    this.lingerTimer = undefined;
  }

  /** Stops, waits up to CLOSE_WAIT_MS for a send in flight, and closes the sink. */
  async close(): Promise<void> {
    this.stop();
    let timer: NodeJS.Timeout | undefined;
    const waited = new Promise<void>((resolve) => (timer = setTimeout(resolve, CLOSE_WAIT_MS)));
    await Promise.race([this.current?.catch(() => undefined), waited]);
    clearTimeout(timer);
    await this.sink.close().catch((error: unknown) => this.context.logger.warn({ err: error }, "closing an audit sink failed"));
  }

  status(): { name: string; cursor: number; lag: number; delivered: number; failures: number; dropped: number; rejected: number; up: boolean; lastError?: string; lastErrorTime?: string } {
    return {
      name: this.sink.name,
      cursor: this.cursor,
      lag: Math.max(0, this.context.head() - this.cursor),
      delivered: this.counts.delivered,
      failures: this.counts.failures,
      dropped: this.counts.dropped,
      rejected: this.counts.rejected,
      // A send that hangs (a receiver that never reads, a blocked stdout) counts as down too.
      up: this.failureStreak === 0 && (this.sendingSince === undefined || Date.now() - this.sendingSince < STALLED_SEND_MS),
      lastError: this.lastError,
      lastErrorTime: this.lastErrorTime,
    };
  }
}
