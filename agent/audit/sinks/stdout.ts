// Writes sealed audit lines to stdout, one JSON object per line, for node log collectors that read
// container output. The agent's own logs go to stderr, so stdout carries audit records only.
// stdout keeps no position, so open() returns undefined and a resent batch is written again: the
// collector drops duplicates by `id`.
//
// A reader that stops reading (a stuck log collector) blocks the stream: write() returns false and
// 'drain' does not come. send() then rejects after drainTimeoutMs, and every send() until 'drain'
// rejects at once without writing, so the stream buffers at most one batch more than its
// highWaterMark. The batch of the timed-out send() stays in that buffer and reaches the reader
// when it reads again, so the pipeline's resend of it writes those records twice.

import type { Logger } from "../../log";
import type { AuditSink, SpooledRecord } from "../sink";

export interface StdoutSinkOptions {
  /** Time send() waits for the stream to take a batch before it rejects. Default 10 s. */
  drainTimeoutMs?: number;
}

const DEFAULT_DRAIN_TIMEOUT_MS = 10_000;

/** The parts of a Writable that the sink reads beyond NodeJS.WritableStream. */
type OutputStream = NodeJS.WritableStream & { destroyed?: boolean; writableEnded?: boolean; writableLength?: number };

export class StdoutSink implements AuditSink {
  readonly name = "stdout";
  private readonly drainTimeoutMs: number;
  private failureStreak = 0;
  /** When write() last returned false, in ms since the epoch; undefined once 'drain' came. */
  private blockedSince: number | undefined;
  /** Settles the send() that is waiting for the stream, so that close() need not wait for it. */
  private settleWaiting: ((error?: Error) => void) | undefined;
  private closed = false;
  /**
   * Keeps an 'error' event (EPIPE once the reader is gone) from crashing the process. send()
   * rejects with the same error through its write callback or its own listener.
   */
  private readonly onStreamError = (error: Error): void => {
    this.logger.debug({ sink: this.name, err: error }, "stdout stream error");
  };
  private readonly onStreamDrain = (): void => {
    this.blockedSince = undefined;
  };

  constructor(
    private readonly logger: Logger,
    private readonly stream: OutputStream = process.stdout,
    options: StdoutSinkOptions = {},
  ) {
    this.drainTimeoutMs = options.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS;
    stream.on("error", this.onStreamError);
    // Registered before the listener of any send(), so the stream is marked unblocked when that listener runs.
    stream.on("drain", this.onStreamDrain);
  }

  async open(): Promise<undefined> {
    return undefined;
  }

  /**
   * Writes the batch and resolves once the stream has processed it, waiting up to drainTimeoutMs
   * for 'drain' when its buffer is full. Rejects at once, writing nothing, while the stream is blocked.
   */
  async send(batch: readonly SpooledRecord[]): Promise<void> {
    if (this.closed) throw new Error(`writing ${batch.length} audit records to stdout failed: the sink is closed`);
    if (batch.length === 0) return;
    const text = batch.map((record) => `${record.line}\n`).join("");
    try {
      this.checkNotBlocked();
      await this.write(text);
    } catch (error) {
      this.failed(error, batch.length);
      throw new Error(`writing ${batch.length} audit records to stdout failed: ${(error as Error).message}`, { cause: error });
    }
    this.recovered();
  }

  /**
   * Rejects a send() that still waits for the stream and returns without waiting for the stream.
   * The 'error' listener stays while the stream still buffers data, because a late EPIPE without
   * a listener would crash the process.
   */
  async close(): Promise<void> {
    this.closed = true;
    this.settleWaiting?.(new Error("the sink was closed while it waited for the stream"));
    this.stream.removeListener("drain", this.onStreamDrain);
    if ((this.stream.writableLength ?? 0) === 0) this.stream.removeListener("error", this.onStreamError);
  }

  private checkNotBlocked(): void {
    if (this.blockedSince === undefined) return;
    throw new Error(
      `stdout is blocked: its reader has taken no data for ${Date.now() - this.blockedSince} ms, so nothing was written. ` +
        "Check the process that reads the agent's standard output (the container runtime or the log collector)",
    );
  }

  /**
   * Writes `text` and settles once the write callback has run and, when write() returned false,
   * 'drain' has fired. An 'error' or 'close' event before that, or drainTimeoutMs passing, rejects.
   */
  private write(text: string): Promise<void> {
    const stream = this.stream;
    if (stream.destroyed === true || stream.writableEnded === true) {
      return Promise.reject(new Error("the stream is closed"));
    }

    return new Promise<void>((resolve, reject) => {
      let written = false;
      let settled = false;
      const settle = (error?: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        stream.removeListener("error", onError);
        stream.removeListener("close", onClose);
        stream.removeListener("drain", onDrain);
        this.settleWaiting = undefined;
        if (error) reject(error);
        else resolve();
      };
      const settleIfDone = (): void => {
        if (written && this.blockedSince === undefined) settle();
      };
      const onError = (error: Error): void => settle(error);
      const onClose = (): void => settle(new Error("the stream closed before the records were written"));
      const onDrain = (): void => settleIfDone();
      const timer = setTimeout(() => settle(this.timeoutError()), this.drainTimeoutMs);

      this.settleWaiting = settle;
      stream.on("error", onError);
      stream.on("close", onClose);
      stream.on("drain", onDrain);
      const accepted = stream.write(text, (error?: Error | null) => {
        if (error) {
          settle(error);
          return;
        }
        written = true;
        settleIfDone();
      });
      if (!accepted) this.blockedSince ??= Date.now();
    });
  }

  private timeoutError(): Error {
    return new Error(
      `the stream did not take the records within ${this.drainTimeoutMs} ms, because its reader reads nothing. ` +
        "The records stay buffered and are sent again; check the process that reads the agent's standard output",
    );
  }

  private failed(error: unknown, records: number): void {
    this.failureStreak += 1;
    if (this.failureStreak === 1) this.logger.error({ sink: this.name, records, err: error }, "writing audit records to stdout failed; the pipeline retries");
  }

  private recovered(): void {
    if (this.failureStreak === 0) return;
    this.logger.info({ sink: this.name, failed_attempts: this.failureStreak }, "writing audit records to stdout works again");
    this.failureStreak = 0;
  }
}
