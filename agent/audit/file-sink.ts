// Appends audit records to a file, one JSON object per line. write() only queues, so the data path
// never waits for the disk, and one writer drains the queue in order. The writer starts batchDelayMs
// after the first queued record, so a busy proxy writes many records per write(2) and per rotation
// check. When a write fails (folder removed, disk full), the records stay queued and the writer
// retries with a capped backoff, reopening the file each time. An accepted record is therefore
// written exactly once, or is still queued.
// Before each batch the writer checks that its handle still refers to the file at the path, so a
// renamed (rotated) or deleted file is replaced by a new one.

import fs from "node:fs";
import path from "node:path";
import type { Logger } from "../log";
import type { AuditEvent, AuditRecorder } from "./record";

export interface AuditFileSinkOptions {
  /** How long a queued record waits for others before the writer starts; flush() and close() skip the wait. */
  batchDelayMs?: number;
  /** First retry delay after a failed write; doubles up to maxRetryDelayMs. */
  initialRetryDelayMs?: number;
  maxRetryDelayMs?: number;
  /** How long close() waits for queued records before it gives up and logs how many were not written. */
  closeTimeoutMs?: number;
}

/** Formats a record as one JSON line (without the newline), `time` first. */
export function formatAuditLine(record: AuditEvent): string {
  const { time, ...rest } = record;
  return JSON.stringify({ time, ...rest });
}

/**
 * Default batchDelayMs. At 1,000 records/s it makes batches of about 10 records, and a crash loses at
 * most this much more than the records already waiting for a write in flight.
 */
const DEFAULT_BATCH_DELAY_MS = 10;

export class AuditFileSink implements AuditRecorder {
  private readonly queue: string[] = [];
  /** Bytes taken from the queue and not yet fully written; a retry resumes at `pendingOffset`. */
  private pending: Buffer | undefined;
  private pendingOffset = 0;
  private pendingRecords = 0;
  private handle: fs.promises.FileHandle | undefined;
  /** The inode and device of the open file, to tell whether the path still names it. */
  private handleFile: { ino: number; dev: number } | undefined;
  private batchTimer: NodeJS.Timeout | undefined;
  private writing = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private retryDelayMs: number;
  private failureStreak = 0;
  private closed = false;
  private flushWaiters: (() => void)[] = [];
  private readonly batchDelayMs: number;
  private readonly initialRetryDelayMs: number;
  private readonly maxRetryDelayMs: number;
  private readonly closeTimeoutMs: number;

  constructor(
    private readonly filePath: string,
    private readonly logger: Logger,
    options: AuditFileSinkOptions = {},
  ) {
    this.batchDelayMs = options.batchDelayMs ?? DEFAULT_BATCH_DELAY_MS;
    this.initialRetryDelayMs = options.initialRetryDelayMs ?? 100;
    this.maxRetryDelayMs = options.maxRetryDelayMs ?? 5_000;
    this.closeTimeoutMs = options.closeTimeoutMs ?? 10_000;
    this.retryDelayMs = this.initialRetryDelayMs;
  }

  /** Queues a record. Serialization errors are logged, not thrown. Records written after close() are logged and dropped. */
  write(record: AuditEvent): void {
    if (this.closed) {
      this.logger.error({ file: this.filePath, type: record.type }, "audit record written after the sink was closed; record dropped");
      return;
    }
    let line: string;
    try {
      line = formatAuditLine(record);
    } catch (error) {
      this.logger.error({ file: this.filePath, type: record.type, err: error }, "audit record cannot be serialized; record dropped");
      return;
    }
    this.queue.push(`${line}\n`);
    this.scheduleBatch();
  }

  /** Resolves once every record accepted so far is written to the file. */
  flush(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    if (this.batchTimer !== undefined) this.drainSoon();
    return new Promise((resolve) => this.flushWaiters.push(resolve));
  }

  /** Closes the file so that the next write opens the path again, for rotation by rename. */
  async reopen(): Promise<void> {
    await this.flush();
    await this.closeHandle();
  }

  /** Stops accepting records, waits up to closeTimeoutMs for the queue to drain, and closes the file. */
  async close(): Promise<void> {
    this.closed = true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), this.closeTimeoutMs);
    });
    const result = await Promise.race([this.flush(), timedOut]);
    clearTimeout(timer);
    if (result === "timeout") {
      clearTimeout(this.retryTimer);
      this.logger.error(
        { file: this.filePath, unwritten: this.queue.length + this.pendingRecords },
        "audit sink closed before every record could be written",
      );
    }
    await this.closeHandle();
  }

  private isIdle(): boolean {
    return this.queue.length === 0 && this.pending === undefined && !this.writing;
  }

  /** Starts the writer after batchDelayMs unless it runs, waits for a retry, or is already scheduled. */
  private scheduleBatch(): void {
    if (this.writing || this.retryTimer !== undefined || this.batchTimer !== undefined) return;
    if (this.batchDelayMs <= 0) {
      this.drainSoon();
      return;
    }
    this.batchTimer = setTimeout(() => this.drainSoon(), this.batchDelayMs);
  }

  private drainSoon(): void {
    clearTimeout(this.batchTimer);
    this.batchTimer = undefined;
    if (this.writing || this.retryTimer !== undefined) return;
    this.writing = true;
    void this.drain();
  }

  /** Writes the unfinished batch, or else every queued line, as one batch. Only one drain runs at a time. */
  private async drain(): Promise<void> {
    try {
      if (this.pending === undefined && this.queue.length > 0) this.takeBatch();
      if (this.pending !== undefined) {
        await this.writePending();
        this.recovered();
      }
    } catch (error) {
      this.failed(error);
      return;
    } finally {
      this.writing = false;
    }
    this.notifyFlushed();
  }

  private takeBatch(): void {
    this.pendingRecords = this.queue.length;
    this.pending = Buffer.from(this.queue.join(""), "utf8");
    this.pendingOffset = 0;
    this.queue.length = 0;
  }

  private async writePending(): Promise<void> {
    const handle = await this.openHandle();
    const buffer = this.pending!;
    while (this.pendingOffset < buffer.length) {
      const { bytesWritten } = await handle.write(buffer, this.pendingOffset, buffer.length - this.pendingOffset);
      this.pendingOffset += bytesWritten;
    }
    this.pending = undefined;
    this.pendingRecords = 0;
  }

  /**
   * Returns an open handle on the file now at the path. A handle whose file was renamed or deleted
   * (log rotation, folder removed) is replaced: writes through it would succeed but reach no reader.
   */
  private async openHandle(): Promise<fs.promises.FileHandle> {
    if (this.handle !== undefined && (await this.handleIsCurrent())) return this.handle;
    await this.closeHandle();
    await fs.promises.mkdir(path.dirname(this.filePath), { recursive: true });
    const handle = await fs.promises.open(this.filePath, "a", 0o640);
    this.handle = handle;
    try {
      const { ino, dev } = await handle.stat();
      this.handleFile = { ino, dev };
    } catch (error) {
      await this.closeHandle();
      throw error;
    }
    return handle;
  }

  /** Tells whether the path still names the open file: one stat(2) of the path, compared with the inode read at open. */
  private async handleIsCurrent(): Promise<boolean> {
    try {
      const atPath = await fs.promises.stat(this.filePath);
      return this.handleFile !== undefined && atPath.ino === this.handleFile.ino && atPath.dev === this.handleFile.dev;
    } catch {
      return false;
    }
  }

  private async closeHandle(): Promise<void> {
    const handle = this.handle;
    this.handle = undefined;
    this.handleFile = undefined;
    await handle?.close().catch((error: unknown) => {
      this.logger.warn({ file: this.filePath, err: error }, "closing the audit file failed");
    });
  }

  /** Logs the first failure of a streak, then retries after a delay that doubles up to the cap. */
  private failed(error: unknown): void {
    this.failureStreak += 1;
    if (this.failureStreak === 1) {
      this.logger.error(
        { file: this.filePath, err: error, queued: this.queue.length + this.pendingRecords },
        "writing audit records failed; keeping them queued and retrying",
      );
    }
    void this.closeHandle();
    const delay = this.retryDelayMs;
    this.retryDelayMs = Math.min(this.retryDelayMs * 2, this.maxRetryDelayMs);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.drainSoon();
    }, delay);
  }

  private recovered(): void {
    if (this.failureStreak === 0) return;
    this.logger.info({ file: this.filePath, failedAttempts: this.failureStreak }, "writing audit records works again");
    this.failureStreak = 0;
    this.retryDelayMs = this.initialRetryDelayMs;
  }

  /**
   * Resolves the flush waiters once nothing is queued. Records queued during the write go next: at
   * once when flush() or close() waits for them, and otherwise after batchDelayMs, to collect more.
   */
  private notifyFlushed(): void {
    if (!this.isIdle()) {
      if (this.flushWaiters.length > 0) this.drainSoon();
      else this.scheduleBatch();
      return;
    }
    const waiters = this.flushWaiters;
    this.flushWaiters = [];
    for (const resolve of waiters) resolve();
  }
}
