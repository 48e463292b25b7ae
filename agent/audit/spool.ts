// The audit spool: sealed record lines on local disk, in segment files named by the seq of their
// first line. Every record is appended here before any sink sees it, so a failing sink, or an agent
// restart, loses nothing that reached the spool. Lines of a segment have consecutive seqs, so
// line i of segment-<first>.jsonl is the record with seq first + i.
// Segments are deleted once every sink has the records, or evicted, oldest first, when the spool
// grows past its byte limit. The active (last) segment is never deleted, so the chain head (last seq
// and hash) can always be read back at start.

import fs from "node:fs";
import path from "node:path";
import type { Logger } from "../log";
import type { SealedRecord } from "./record";
import type { SpooledRecord } from "./sink";

/** When the spool calls fdatasync(2) on the active segment. */
export type FsyncPolicy = { mode: "always" } | { mode: "never" } | { mode: "interval"; intervalMs: number };

export interface SpoolOptions {
  /** Total bytes of all segments above which the oldest segments are evicted. */
  maxBytes: number;
  /** Size at which the active segment is closed and a new one begun. */
  segmentBytes: number;
  fsync: FsyncPolicy;
}

/** A segment file and the seqs it holds. */
export interface Segment {
  file: string;
  firstSeq: number;
  /** Seq of the last complete line; firstSeq - 1 while the segment is empty. */
  lastSeq: number;
  bytes: number;
}

/** The chain head and oldest record that open() finds on disk. */
export interface SpoolContents {
  /** Seq and hash of the last record, or undefined for an empty spool. */
  head: { seq: number; hash: string; type: string } | undefined;
  /** Seq of the oldest record still spooled, or head.seq + 1 when none is. */
  oldestSeq: number;
}

const SEGMENT_PATTERN = /^segment-(\d{20})\.jsonl$/;
const VANISH_CHECK_INTERVAL_MS = 1_000;

function segmentName(firstSeq: number): string {
  return `segment-${String(firstSeq).padStart(20, "0")}.jsonl`;
}

/** A spool whose last record cannot be read, so the chain cannot continue from it. */
export class SpoolDamagedError extends Error {
  /** Seq of the damaged line, when known. */
  seq: number | undefined;

  constructor(message: string) {
    super(message);
    this.name = "SpoolDamagedError";
  }
}

/** Parses a sealed line. Throws SpoolDamagedError when it is not JSON or lacks seq, id or hash. */
export function parseSpooledLine(line: string): SpooledRecord {
  let record: SealedRecord;
  try {
    record = JSON.parse(line) as SealedRecord;
  } catch {
    throw new SpoolDamagedError(`spooled line is not JSON: ${line.slice(0, 120)}`);
  }
  if (typeof record !== "object" || record === null || typeof record.seq !== "number" || typeof record.id !== "string" || typeof record.hash !== "string") {
    throw new SpoolDamagedError(`spooled line has no seq, id or hash: ${line.slice(0, 120)}`);
  }
  return { seq: record.seq, id: record.id, line, record };
}

export class Spool {
  private segments: Segment[] = [];
  private handle: fs.promises.FileHandle | undefined;
  private fsyncTimer: NodeJS.Timeout | undefined;
  private unsynced = false;
  private handleIno = 0;
  private vanishCheckedAt = 0;
  /** Set when the active segment's file vanished: the next append starts a new segment. */
  private activeVanished = false;
  /** Lines of the segment read last, for sinks that replay from disk batch after batch. */
  private readCache: { file: string; lines: string[] } | undefined;

  constructor(
    readonly dir: string,
    private readonly options: SpoolOptions,
    private readonly logger: Logger,
  ) {}

  /** Creates the folder, finds the segments, cuts a torn last line, and returns the chain head. */
  async open(): Promise<SpoolContents> {
    await fs.promises.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const names = (await fs.promises.readdir(this.dir)).filter((name) => SEGMENT_PATTERN.test(name)).sort();
    this.segments = [];
    for (const name of names) {
      const file = path.join(this.dir, name);
      const firstSeq = Number(SEGMENT_PATTERN.exec(name)![1]);
      const { size } = await fs.promises.stat(file);
      this.segments.push({ file, firstSeq, lastSeq: firstSeq - 1, bytes: size });
    }
    for (let i = 0; i + 1 < this.segments.length; i++) this.segments[i].lastSeq = this.segments[i + 1].firstSeq - 1;
    const head = await this.readHead();
    if (this.options.fsync.mode === "interval") {
      this.fsyncTimer = setInterval(() => void this.syncNow(), this.options.fsync.intervalMs);
      this.fsyncTimer.unref();
    }
    const oldestSeq = this.segments.length > 0 ? this.segments[0].firstSeq : (head?.seq ?? 0) + 1;
    return { head, oldestSeq };
  }

  /** Reads the last segment's last complete line; a torn final line (a crash mid-write) is cut off. Empty segments are removed. */
  private async readHead(): Promise<SpoolContents["head"]> {
    while (this.segments.length > 0) {
      const last = this.segments[this.segments.length - 1];
      const text = await fs.promises.readFile(last.file, "utf8");
      const end = text.lastIndexOf("\n") + 1;
      if (end < text.length) {
        this.logger.warn({ file: last.file, bytes: text.length - end }, "audit spool segment ends with a torn line (the agent stopped mid-write); cutting it off");
        await fs.promises.truncate(last.file, Buffer.byteLength(text.slice(0, end)));
      }
      const lines = text.slice(0, end).split("\n");
      lines.pop();
      if (lines.length === 0) {
        await fs.promises.rm(last.file, { force: true });
        this.segments.pop();
        continue;
      }
      last.lastSeq = last.firstSeq + lines.length - 1;
      last.bytes = Buffer.byteLength(text.slice(0, end));
      const { seq, record } = parseSpooledLine(lines[lines.length - 1]);
      if (seq !== last.lastSeq) {
        throw new SpoolDamagedError(
          `audit spool segment ${last.file} is inconsistent: its last line has seq ${seq}, expected ${last.lastSeq}; move the spool folder away to start a new chain`,
        );
      }
      return { seq, hash: record.hash, type: record.type };
    }
    return undefined;
  }

  /** Total bytes of all segments. */
  get bytes(): number {
    return this.segments.reduce((sum, segment) => sum + segment.bytes, 0);
  }

  get segmentCount(): number {
    return this.segments.length;
  }

  /** Seq of the oldest record on disk, or undefined when the spool is empty. */
  get oldestSeq(): number | undefined {
    const first = this.segments[0];
    return first && first.lastSeq >= first.firstSeq ? first.firstSeq : undefined;
  }

  /**
   * Appends sealed lines whose seqs follow the last spooled one. Resolves once they are written (and
   * synced, with fsync "always"). On failure nothing is counted as appended; the caller retries the
   * same lines, and a partial write of the failed attempt is cut off first.
   */
  async append(lines: readonly string[], firstSeq: number): Promise<void> {
    let segment = this.segments[this.segments.length - 1];
    if (segment === undefined || segment.bytes >= this.options.segmentBytes || this.activeVanished) {
      this.activeVanished = false;
      segment = await this.startSegment(firstSeq);
    }
    if (segment.lastSeq + 1 !== firstSeq) {
      throw new Error(`audit spool expected seq ${segment.lastSeq + 1} next but got ${firstSeq}`);
    }
    const handle = await this.openActive(segment);
    const buffer = Buffer.from(lines.join("\n") + "\n", "utf8");
    try {
      let offset = 0;
      while (offset < buffer.length) {
        const { bytesWritten } = await handle.write(buffer, offset, buffer.length - offset, segment.bytes + offset);
        offset += bytesWritten;
      }
      if (this.options.fsync.mode === "always") await handle.datasync();
      else this.unsynced = true;
    } catch (error) {
      // Positional writes keep segment.bytes as the end of good data; cut whatever the failed write left.
      await handle.truncate(segment.bytes).catch(() => undefined);
      await this.closeActive();
      throw error;
    }
    segment.bytes += buffer.length;
    segment.lastSeq += lines.length;
  }

  private async startSegment(firstSeq: number): Promise<Segment> {
    await this.syncNow();
    await this.closeActive();
    const segment: Segment = { file: path.join(this.dir, segmentName(firstSeq)), firstSeq, lastSeq: firstSeq - 1, bytes: 0 };
    this.segments.push(segment);
    return segment;
  }

  private async openActive(segment: Segment): Promise<fs.promises.FileHandle> {
    if (this.handle) return this.handle;
    await fs.promises.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const handle = await fs.promises.open(segment.file, fs.constants.O_WRONLY | fs.constants.O_CREAT, 0o600);
    this.handle = handle;
    this.handleIno = (await handle.stat()).ino;
    return handle;
  }

  /**
   * Finds segment files that were removed (an operator deleted the spool folder, for example) and
   * drops them from the segment list, at most once per VANISH_CHECK_INTERVAL_MS. Writes would otherwise go on into a
   * deleted file that no reader can open. Returns the vanished segments; the next append starts a
   * new segment, with the folder created again, when the active one is among them.
   */
  async findVanished(): Promise<Segment[]> {
    const now = Date.now();
    const active = this.segments[this.segments.length - 1];
    if (active === undefined || this.handle === undefined || now - this.vanishCheckedAt < VANISH_CHECK_INTERVAL_MS) return [];
    this.vanishCheckedAt = now;
    const atPath = await fs.promises.stat(active.file).catch(() => undefined);
    const activeReplaced = atPath === undefined || atPath.ino !== this.handleIno;
    // One readdir finds older segments removed one by one, which the active file's inode cannot show.
    const present = new Set(await fs.promises.readdir(this.dir).catch(() => [] as string[]));
    const vanished = this.segments.filter((segment) => (segment === active ? activeReplaced : !present.has(path.basename(segment.file))));
    if (vanished.length === 0) return [];
    this.segments = this.segments.filter((segment) => !vanished.includes(segment));
    if (vanished.includes(active)) {
      await this.closeActive();
      this.activeVanished = true;
    }
    if (this.readCache !== undefined && vanished.some((segment) => segment.file === this.readCache!.file)) this.readCache = undefined;
    return vanished;
  }

  private async closeActive(): Promise<void> {
    const handle = this.handle;
    this.handle = undefined;
    await handle?.close().catch((error: unknown) => this.logger.warn({ err: error, dir: this.dir }, "closing an audit spool segment failed"));
  }

  /** Flushes written lines to the disk now (the interval policy's timer, and close). */
  async syncNow(): Promise<void> {
    if (!this.unsynced || !this.handle) return;
    this.unsynced = false;
    try {
      await this.handle.datasync();
    } catch (error) {
      this.unsynced = true;
      this.logger.warn({ err: error, dir: this.dir }, "fdatasync of the audit spool failed; retrying at the next interval");
    }
  }

  /**
   * Reads up to `max` records starting at `fromSeq`. Returns fewer, or none, when the spool ends or
   * fromSeq was evicted. Stops before a damaged line; when the first line is damaged, throws
   * SpoolDamagedError with its seq in `seq`.
   */
  async read(fromSeq: number, max: number): Promise<SpooledRecord[]> {
    const segment = this.segments.find((candidate) => candidate.firstSeq <= fromSeq && fromSeq <= candidate.lastSeq);
    if (!segment) return [];
    let lines = this.readCache?.file === segment.file ? this.readCache.lines : undefined;
    if (lines === undefined || segment.firstSeq + lines.length - 1 < Math.min(segment.lastSeq, fromSeq + max - 1)) {
      let text: string;
      try {
        text = await fs.promises.readFile(segment.file, "utf8");
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
        // The file was removed from under the spool: its records are gone, and the caller skips them.
        if (segment === this.segments[this.segments.length - 1]) {
          await this.closeActive();
          this.activeVanished = true;
        }
        this.segments = this.segments.filter((candidate) => candidate !== segment);
        return [];
      }
      lines = text.split("\n");
      lines.length = Math.min(lines.length, segment.lastSeq - segment.firstSeq + 1);
      this.readCache = { file: segment.file, lines };
    }
    const start = fromSeq - segment.firstSeq;
    const records: SpooledRecord[] = [];
    for (const line of lines.slice(start, start + max)) {
      try {
        records.push(parseSpooledLine(line));
      } catch (error) {
        if (records.length > 0) break;
        (error as SpoolDamagedError).seq = fromSeq;
        throw error;
      }
    }
    return records;
  }

  /**
   * Reads the connection records of the spool in order, for the start-up scan of open connections.
   * Other records are skipped without parsing, and a damaged line is skipped with a warning.
   */
  async *readConnectionRecords(): AsyncGenerator<SealedRecord> {
    let damaged = 0;
    for (const segment of [...this.segments]) {
      const text = await fs.promises.readFile(segment.file, "utf8").catch(() => "");
      const lines = text.split("\n");
      lines.pop();
      // A segment's last seq was taken from the next segment's name. Its line count gives the real one,
      // which differs when a segment file in between was removed.
      if (segment !== this.segments[this.segments.length - 1]) segment.lastSeq = Math.min(segment.lastSeq, segment.firstSeq + lines.length - 1);
      lines.length = Math.max(0, Math.min(lines.length, segment.lastSeq - segment.firstSeq + 1));
      for (const line of lines) {
        if (!line.includes('"type":"connection.')) continue;
        try {
          yield parseSpooledLine(line).record;
        } catch {
          damaged++;
        }
      }
    }
    if (damaged > 0) this.logger.warn({ dir: this.dir, damaged }, "audit spool has damaged lines; skipped them when looking for open connections");
  }

  /** Returns the first seq at or after `seq` that the spool still has, or undefined when there is none. */
  firstSeqFrom(seq: number): number | undefined {
    for (const segment of this.segments) {
      if (segment.lastSeq < segment.firstSeq || segment.lastSeq < seq) continue;
      return Math.max(seq, segment.firstSeq);
    }
    return undefined;
  }

  /** Tells whether release(seq) would delete a segment. */
  releasable(seq: number): boolean {
    return this.segments.length > 1 && this.segments[0].lastSeq <= seq;
  }

  /** Deletes the segments whose records every sink has (all seqs <= `seq`), except the active one. Returns how many. */
  async release(seq: number): Promise<number> {
    let removed = 0;
    while (this.segments.length > 1 && this.segments[0].lastSeq <= seq) {
      await this.remove(this.segments.shift()!);
      removed++;
    }
    return removed;
  }

  /**
   * Returns the oldest segment that must go because the spool exceeds maxBytes, without removing
   * it, or undefined when the spool fits. The active segment is never evicted.
   */
  overflow(): Segment | undefined {
    if (this.bytes <= this.options.maxBytes || this.segments.length < 2) return undefined;
    return this.segments[0];
  }

  /** Removes the oldest segment, returned by overflow(). */
  async evictOldest(): Promise<void> {
    const segment = this.segments.shift();
    if (segment) await this.remove(segment);
  }

  /** Reads the first and last record of a segment, for the times in a gap record. */
  async segmentBounds(segment: Segment): Promise<{ first?: SpooledRecord; last?: SpooledRecord }> {
    const first = (await this.read(segment.firstSeq, 1))[0];
    const last = (await this.read(segment.lastSeq, 1))[0];
    return { first, last };
  }

  private async remove(segment: Segment): Promise<void> {
    if (this.readCache?.file === segment.file) this.readCache = undefined;
    await fs.promises.rm(segment.file, { force: true });
  }

  async close(): Promise<void> {
    clearInterval(this.fsyncTimer);
    await this.syncNow();
    await this.closeActive();
  }
}
