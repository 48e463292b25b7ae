// Appends sealed audit lines to a local file and rotates it by size and age.
// The file contains each record exactly once across agent restarts and retries:
// - open() returns the seq of the file's last line, so the pipeline resumes after it, and cuts a
//   torn last line (a write interrupted by a crash) that the pipeline then sends again.
// - send() skips records at or below the last seq written, and writes a batch with one write(2)
//   where the kernel accepts it whole. After a failed write, the next send() first truncates the file
//   back to its size before that batch, so a resent batch leaves no half line and no duplicate.
//   close() truncates it too, so a clean stop after a failed write leaves no half line either.
// Before a batch, at most once per second, one stat(2) of the path checks that it still names the
// open file. A file renamed or deleted by an outside rotator is left alone and a new file is opened
// at the path.

import fs from "node:fs";
import path from "node:path";
import type { Logger } from "../../log";
import { auditFileSet, freeRotatedFileName } from "../files";
import { unsealLine } from "../chain";
import type { AuditSink, HeldRecord, SpooledRecord } from "../sink";

export interface FileSinkOptions {
  /** Path of the active file, such as /var/log/ambient-agent/audit.log. */
  path: string;
  /** Size in bytes above which the active file is rotated before the next batch. Default 100 MiB. */
  maxBytes?: number;
  /** Age in milliseconds after which the active file is rotated before the next batch. Default 24 hours. */
  maxAgeMs?: number;
  /** Number of rotated files kept; older ones are deleted at rotation. Default 10; 0 keeps all. */
  maxFiles?: number;
  /** Calls fdatasync(2) after each batch. Default false. */
  fsync?: boolean;
  /** Time between checks that the path still names the open file. Default 1 s. */
  pathCheckIntervalMs?: number;
}

const DEFAULT_MAX_BYTES = 100 * 1024 * 1024;
const DEFAULT_MAX_AGE_MS = 24 * 60 * 60 * 1000;
const DEFAULT_MAX_FILES = 10;
const FOLDER_MODE = 0o750;
const FILE_MODE = 0o640;
/** First read size when looking for the first or last line; doubled until a whole line is found. */
const LINE_READ_BYTES = 64 * 1024;
const NEWLINE = 0x0a;
const DEFAULT_PATH_CHECK_INTERVAL_MS = 1_000;

/** The open active file. */
interface ActiveFile {
  handle: fs.promises.FileHandle;
  ino: number;
  dev: number;
  /** Bytes in the file, all of them complete lines. */
  size: number;
  /** Milliseconds since the epoch at which the file's age starts; undefined while the file is empty. */
  startMs: number | undefined;
}

export class FileSink implements AuditSink {
  readonly name: string;
  private readonly filePath: string;
  private readonly maxBytes: number;
  private readonly maxAgeMs: number;
  private readonly maxFiles: number;
  private readonly fsync: boolean;
  private active: ActiveFile | undefined;
  /** When the path was last checked against the active file, in ms since the epoch. */
  private pathCheckedAt = 0;
  private readonly pathCheckIntervalMs: number;
  /** Highest seq in the file; records at or below it are skipped. */
  private lastSeq: number | undefined;
  /** Size of the file before a batch whose write failed; the next send() or close() truncates back to it. */
  private sizeBeforeFailedWrite: number | undefined;
  private closed = false;

  constructor(
    options: FileSinkOptions,
    private readonly logger: Logger,
  ) {
    this.filePath = options.path;
    this.name = `file:${options.path}`;
    this.maxBytes = options.maxBytes ?? DEFAULT_MAX_BYTES;
    this.maxAgeMs = options.maxAgeMs ?? DEFAULT_MAX_AGE_MS;
    this.maxFiles = options.maxFiles ?? DEFAULT_MAX_FILES;
    this.fsync = options.fsync ?? false;
    this.pathCheckIntervalMs = options.pathCheckIntervalMs ?? DEFAULT_PATH_CHECK_INTERVAL_MS;
  }

  /** Opens the active file and returns its last record, or the newest rotated file's when it is empty. */
  async open(): Promise<HeldRecord | undefined> {
    await this.closeActive();
    this.active = await this.openActive();
    const held = this.active.size > 0 ? await this.readLastRecord(this.active.handle, this.active.size, this.filePath) : await this.readRotatedLastRecord();
    this.lastSeq = held?.seq;
    this.logger.info({ file: this.filePath, last_seq: held?.seq ?? null, bytes: this.active.size }, "audit file opened");
    return held;
  }

  /** Accepts the records of a new chain, whose seqs start again at 1, after the records the file holds. */
  startNewChain(): void {
    this.lastSeq = undefined;
  }

  /** Appends the records of the batch that the file does not hold yet. Rejects with an error naming the file. */
  async send(batch: readonly SpooledRecord[]): Promise<void> {
    if (this.closed) throw new Error(`audit file sink ${this.filePath} is closed; records cannot be written after close()`);
    try {
      await this.recoverFailedWrite();
      const records = batch.filter((record) => this.lastSeq === undefined || record.seq > this.lastSeq);
      if (records.length === 0) return;

      const data = Buffer.from(records.map((record) => `${record.line}\n`).join(""), "utf8");
      let active = await this.currentActive();
      if (this.mustRotate(active, data.length, records[0])) {
        await this.rotate();
        active = await this.currentActive();
      }
      await this.appendBatch(active, data, records);
    } catch (error) {
      throw new Error(`writing audit records to ${this.filePath} failed: ${(error as Error).message}`, { cause: error });
    }
  }

  /** Truncates what a failed write left behind (best effort, logged on failure) and closes the file. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.sizeBeforeFailedWrite !== undefined && this.active !== undefined) {
      await this.truncateFailedWrite(this.active, this.sizeBeforeFailedWrite);
      this.sizeBeforeFailedWrite = undefined;
    }
    await this.closeActive();
  }

  /** Writes `data` in one write(2), looping on partial writes, and records the new size and last seq. */
  private async appendBatch(active: ActiveFile, data: Buffer, records: readonly SpooledRecord[]): Promise<void> {
    const sizeBefore = active.size;
    try {
      let offset = 0;
      while (offset < data.length) {
        const { bytesWritten } = await active.handle.write(data, offset, data.length - offset);
        offset += bytesWritten;
      }
      if (this.fsync) await active.handle.datasync();
    } catch (error) {
      this.sizeBeforeFailedWrite = sizeBefore;
      throw error;
    }

    active.size += data.length;
    active.startMs ??= recordTimeMs(records[0]) ?? Date.now();
    this.lastSeq = records[records.length - 1].seq;
  }

  /**
   * Removes what a failed write left behind: truncates the file back to its size before that batch,
   * then reopens it and reads its last seq again, in case the truncation failed too.
   */
  private async recoverFailedWrite(): Promise<void> {
    const size = this.sizeBeforeFailedWrite;
    if (size === undefined) return;

    if (this.active !== undefined) await this.truncateFailedWrite(this.active, size);
    await this.closeActive();
    const reopened = await this.openActive();
    this.active = reopened;
    if (reopened.size > 0) {
      const fileSeq = await this.readLastSeq(reopened.handle, reopened.size, this.filePath);
      if (fileSeq !== undefined && (this.lastSeq === undefined || fileSeq > this.lastSeq)) this.lastSeq = fileSeq;
    }
    this.sizeBeforeFailedWrite = undefined;
  }

  /** Truncates the file back to `size`, its size before a failed write. A failure is logged: the next open cuts the half line. */
  private async truncateFailedWrite(active: ActiveFile, size: number): Promise<void> {
    try {
      await active.handle.truncate(size);
      active.size = size;
      this.logger.info({ file: this.filePath, size }, "audit file truncated to its size before the failed write");
    } catch (error) {
      this.logger.warn({ file: this.filePath, size, err: error }, "truncating the audit file after a failed write failed; cutting its last line at reopen");
    }
  }

  /** Returns the open file if the path still names it, or else opens a new file at the path. */
  private async currentActive(): Promise<ActiveFile> {
    const active = this.active;
    if (active !== undefined && (await this.pathNames(active))) return active;
    if (active !== undefined) this.logger.info({ file: this.filePath }, "audit file was renamed or deleted by another process; opening a new file at its path");
    await this.closeActive();
    this.active = await this.openActive();
    return this.active;
  }

  /**
   * Tells whether the path still names the active file. The stat(2) runs at most once per
   * pathCheckIntervalMs, so a busy sink does not pay it per batch, and a rename by an outside
   * rotator is noticed within that interval.
   */
  private async pathNames(active: ActiveFile): Promise<boolean> {
    const now = Date.now();
    if (now - this.pathCheckedAt < this.pathCheckIntervalMs) return true;
    try {
      const atPath = await fs.promises.stat(this.filePath);
      this.pathCheckedAt = now;
      return atPath.ino === active.ino && atPath.dev === active.dev;
    } catch {
      return false;
    }
  }

  /**
   * Tells whether the active file must rotate before `bytes` more. A non-empty file rotates when it
   * would exceed maxBytes, so a batch larger than maxBytes still goes into one file. It also rotates
   * when it is older than maxAgeMs, measured at the earlier of now and the time of the batch's first
   * record, so a backlog of old records sent after an outage does not rotate at every batch.
   */
  private mustRotate(active: ActiveFile, bytes: number, first: SpooledRecord): boolean {
    if (active.size === 0) return false;
    if (active.size + bytes > this.maxBytes) return true;
    if (active.startMs === undefined) return false;
    const atMs = Math.min(Date.now(), recordTimeMs(first) ?? Date.now());
    return atMs - active.startMs > this.maxAgeMs;
  }

  /** Renames the active file to its rotated name, deletes rotated files beyond maxFiles, and opens a new active file. */
  private async rotate(): Promise<void> {
    await this.closeActive();
    const rotatedPath = freeRotatedFileName(this.filePath, new Date());
    await fs.promises.rename(this.filePath, rotatedPath);
    this.logger.info({ file: this.filePath, rotated_to: rotatedPath }, "audit file rotated");
    await this.pruneRotated();
    this.active = await this.openActive();
  }

  private async pruneRotated(): Promise<void> {
    if (this.maxFiles <= 0) return;
    const rotated = auditFileSet(this.filePath).filter((file) => file !== this.filePath);
    const excess = rotated.slice(0, Math.max(0, rotated.length - this.maxFiles));
    for (const file of excess) {
      try {
        await fs.promises.unlink(file);
        this.logger.info({ file, max_files: this.maxFiles }, "old rotated audit file deleted");
      } catch (error) {
        this.logger.warn({ file, err: error }, "deleting an old rotated audit file failed; it stays on disk");
      }
    }
  }

  /** Creates the folder, opens the file at the path for appending, and cuts a torn last line. */
  private async openActive(): Promise<ActiveFile> {
    this.pathCheckedAt = Date.now();
    await fs.promises.mkdir(path.dirname(this.filePath), { recursive: true, mode: FOLDER_MODE });
    const handle = await fs.promises.open(this.filePath, "a+", FILE_MODE);
    try {
      const stat = await handle.stat();
      const size = await this.cutTornLine(handle, stat.size);
      const firstTimeMs = size > 0 ? await readFirstRecordTimeMs(handle, size) : undefined;
      const createdMs = stat.birthtimeMs > 0 ? stat.birthtimeMs : stat.mtimeMs;
      return { handle, ino: stat.ino, dev: stat.dev, size, startMs: size > 0 ? (firstTimeMs ?? createdMs) : undefined };
    } catch (error) {
      await handle.close().catch(() => undefined);
      throw error;
    }
  }

  /** Truncates the bytes after the last newline, a line whose write was interrupted. Returns the new size. */
  private async cutTornLine(handle: fs.promises.FileHandle, size: number): Promise<number> {
    if (size === 0) return 0;
    const { end } = await readLastLine(handle, size);
    if (end === size) return size;
    await handle.truncate(end);
    this.logger.warn({ file: this.filePath, bytes_cut: size - end, size: end }, "audit file ended with an incomplete line; cut it off, the record will be written again");
    return end;
  }

  /** Returns the seq of the last line of a file of complete lines, or undefined when it has none. */
  private async readLastSeq(handle: fs.promises.FileHandle, size: number, file: string): Promise<number | undefined> {
    return (await this.readLastRecord(handle, size, file))?.seq;
  }

  /** Returns the seq and hash of the last line of a file of complete lines, or undefined when it has none. */
  private async readLastRecord(handle: fs.promises.FileHandle, size: number, file: string): Promise<HeldRecord | undefined> {
    const { line } = await readLastLine(handle, size);
    const seq = line === undefined ? undefined : parseSeq(line);
    if (line !== undefined && seq === undefined) {
      this.logger.warn({ file, line: line.slice(0, 200) }, "last line of the audit file has no valid seq; resuming where the pipeline's cursor points");
    }
    if (seq === undefined) return undefined;
    return { seq, hash: unsealLine(line!)?.hash };
  }

  private async readRotatedLastRecord(): Promise<HeldRecord | undefined> {
    const rotated = auditFileSet(this.filePath).filter((file) => file !== this.filePath);
    const newest = rotated.at(-1);
    if (newest === undefined) return undefined;
    const handle = await fs.promises.open(newest, "r");
    try {
      const { size } = await handle.stat();
      return size > 0 ? await this.readLastRecord(handle, size, newest) : undefined;
    } finally {
      await handle.close();
    }
  }

  private async closeActive(): Promise<void> {
    const active = this.active;
    this.active = undefined;
    await active?.handle.close().catch((error: unknown) => {
      this.logger.warn({ file: this.filePath, err: error }, "closing the audit file failed");
    });
  }
}

/**
 * Finds the last complete line of the first `size` bytes of a file. Returns the line (without its
 * newline) and `end`, the offset just after the last newline (0 when there is none).
 */
async function readLastLine(handle: fs.promises.FileHandle, size: number): Promise<{ line: string | undefined; end: number }> {
  for (let span = LINE_READ_BYTES; ; span *= 2) {
    const start = Math.max(0, size - span);
    const buffer = await readAt(handle, start, size - start);
    const lastNewline = buffer.lastIndexOf(NEWLINE);
    if (lastNewline < 0) {
      if (start === 0) return { line: undefined, end: 0 };
      continue;
    }

    const previousNewline = lastNewline === 0 ? -1 : buffer.lastIndexOf(NEWLINE, lastNewline - 1);
    if (previousNewline < 0 && start > 0) continue;
    return { line: buffer.subarray(previousNewline + 1, lastNewline).toString("utf8"), end: start + lastNewline + 1 };
  }
}

/** Returns the `time` of the file's first line in milliseconds, or undefined when it has none. */
async function readFirstRecordTimeMs(handle: fs.promises.FileHandle, size: number): Promise<number | undefined> {
  for (let span = LINE_READ_BYTES; ; span *= 2) {
    const buffer = await readAt(handle, 0, Math.min(span, size));
    const newline = buffer.indexOf(NEWLINE);
    if (newline >= 0) return parseTimeMs(buffer.subarray(0, newline).toString("utf8"));
    if (buffer.length === size) return undefined;
  }
}

async function readAt(handle: fs.promises.FileHandle, position: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  let offset = 0;
  while (offset < length) {
    const { bytesRead } = await handle.read(buffer, offset, length - offset, position + offset);
    if (bytesRead === 0) return buffer.subarray(0, offset);
    offset += bytesRead;
  }
  return buffer;
}

function parseSeq(line: string): number | undefined {
  try {
    const seq = (JSON.parse(line) as { seq?: unknown }).seq;
    return typeof seq === "number" && Number.isSafeInteger(seq) && seq > 0 ? seq : undefined;
  } catch {
    return undefined;
  }
}

function parseTimeMs(line: string): number | undefined {
  try {
    const time = (JSON.parse(line) as { time?: unknown }).time;
    return typeof time === "string" ? validMs(Date.parse(time)) : undefined;
  } catch {
    return undefined;
  }
}

function recordTimeMs(record: SpooledRecord): number | undefined {
  return validMs(Date.parse(record.record.time));
}

function validMs(ms: number): number | undefined {
  return Number.isNaN(ms) ? undefined : ms;
}
