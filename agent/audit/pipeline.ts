// The audit pipeline. The data path calls write(), which only appends to a bounded in-memory queue.
// One writer seals queued records into the hash chain (seq, id, prev_hash, hash) and appends them to
// the spool on disk. Only then do the sinks receive them. Each sink has its own cursor (the last seq
// it accepted) and its own loop, so a slow or failing sink delays no other sink and never the data
// path. Failed sends are retried with a capped exponential backoff until they succeed, so remote
// delivery is at-least-once, and every record carries its `id` for de-duplication.
// Records are lost only when a bound is hit. They are then counted, and a gap record gives how many
// and when. A full queue drops new records (the spool cannot keep up or fails), and a full spool
// evicts its oldest segment, whose records a lagging sink then never receives.

import fs from "node:fs";
import type { Logger } from "../log";
import { GENESIS_HASH } from "./chain";
import { OpenConnections } from "./open-connections";
import type { AuditEvent, AuditRecorder } from "./record";
import { Redactor, type RedactionRule } from "./redact";
import { MAX_RECORD_BYTES } from "./record-limit";
import { sealRecord } from "./seal";
import type { AuditSink, HeldRecord, SpooledRecord } from "./sink";
import { SinkRunner, type RetryPolicy } from "./sink-runner";
import { copyRedactionKey, loadCursors, saveCursors, spoolRedactionKey, writeRedactionKey, type SavedCursors } from "./spool-state";
import { SpoolLosses } from "./spool-losses";
import { Spool, SpoolDamagedError, type FsyncPolicy, type SpoolContents } from "./spool";

export interface AuditPipelineOptions {
  node: string;
  spoolDir: string;
  sinks: AuditSink[];
  /** Spool size above which the oldest segment is evicted. Default 256 MiB. */
  spoolMaxBytes?: number;
  /** Size of one spool segment. Default an eighth of spoolMaxBytes, at most 2 MiB. */
  segmentBytes?: number;
  /** Default: fdatasync every second. */
  fsync?: FsyncPolicy;
  /** Records the queue takes before new ones are dropped. Default 50,000. */
  queueCapacity?: number;
  /** Records per spool append and per sink send. Default 500. */
  batchSize?: number;
  /**
   * How long the first queued record waits for others before the writer spools them. Default 5 ms.
   * A SIGKILL loses the records of this window that are not spooled yet.
   */
  writeDelayMs?: number;
  retry?: Partial<RetryPolicy>;
  redaction?: readonly RedactionRule[];
  /** Key of the redaction hashes. Default: a random key kept in the spool folder, so hashes stay stable across restarts. */
  redactionKey?: Buffer;
}

/** Counters and state for the admin API, metrics and logs. */
export interface AuditPipelineStatus {
  queue: { records: number; capacity: number };
  records: Record<string, number>;
  dropped: { queue_full: number; closed: number };
  spool: { dir: string; bytes: number; maxBytes: number; segments: number; oldestSeq?: number; headSeq: number; fsync: string };
  openConnections: number;
  sinks: ReturnType<SinkRunner["status"]>[];
}

const DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024;
const DEFAULT_WRITE_DELAY_MS = 5;
/** Segments stay small because a sink that catches up reads one whole segment on the event loop. */
const MAX_SEGMENT_BYTES = 2 * 1024 * 1024;
/**
 * Records kept in memory after spooling, so that sinks that keep up never read the disk. The tail
 * keeps between this many and twice this many, each with its parsed object (a few kB).
 */
const TAIL_RECORDS = 2_048;
/** How long cursor updates wait before they are written to the spool folder together. */
const CURSOR_SAVE_DELAY_MS = 250;

/** Records dropped by the queue and not yet reported by a gap record. */
interface PendingLoss {
  lost: number;
  firstTime: string;
  lastTime: string;
}

export class AuditPipeline implements AuditRecorder {
  private readonly spool: Spool;
  private readonly openConnections: OpenConnections;
  private readonly runners: SinkRunner[];
  private readonly losses: SpoolLosses;
  /** The redaction key kept in the spool folder, when no key file was given. */
  private spoolKey: Buffer | undefined;
  private readonly queue: AuditEvent[] = [];
  /** Gap records, written ahead of the queue and never dropped. */
  private readonly gaps: AuditEvent[] = [];
  private redactor: Redactor | undefined;
  /** Records already redacted, so that none is hashed twice. */
  private readonly redacted = new WeakSet<AuditEvent>();
  private readonly queueCapacity: number;
  private readonly batchSize: number;
  private readonly writeDelayMs: number;
  private readonly spoolMaxBytes: number;
  private readonly fsync: FsyncPolicy;

  /** Last record sealed (it may still wait for the spool) and last record spooled. */
  private sealedHead = { seq: 0, hash: GENESIS_HASH };
  private spooledSeq = 0;
  private pending: { lines: string[]; records: SpooledRecord[]; events: AuditEvent[] } | undefined;
  private tail: SpooledRecord[] = [];
  private queueLoss: PendingLoss | undefined;

  private writerTimer: NodeJS.Timeout | undefined;
  private writing = false;
  private writeRetryTimer: NodeJS.Timeout | undefined;
  private writeFailures = 0;
  private writeRetryDelayMs: number;
  private readonly retry: RetryPolicy;
  private cursorTimer: NodeJS.Timeout | undefined;
  private cursorSaveFailures = 0;
  private started = false;
  private closed = false;
  private idleWaiters: (() => void)[] = [];
  /** "clean" when the spool's last record is agent.stopped, "unclean" when it is another record, undefined for a new spool. */
  previousStop: "clean" | "unclean" | undefined;

  private readonly counts = { records: {} as Record<string, number>, queueFull: 0, closed: 0 };

  constructor(
    private readonly options: AuditPipelineOptions,
    private readonly logger: Logger,
  ) {
    this.spoolMaxBytes = options.spoolMaxBytes ?? DEFAULT_SPOOL_MAX_BYTES;
    this.fsync = options.fsync ?? { mode: "interval", intervalMs: 1_000 };
    this.spool = new Spool(
      options.spoolDir,
      {
        maxBytes: this.spoolMaxBytes,
        segmentBytes: options.segmentBytes ?? Math.min(MAX_SEGMENT_BYTES, Math.max(64 * 1024, Math.floor(this.spoolMaxBytes / 8))),
        fsync: this.fsync,
      },
      logger,
    );
    this.openConnections = new OpenConnections(options.spoolDir);
    this.queueCapacity = options.queueCapacity ?? 50_000;
    this.batchSize = options.batchSize ?? 500;
    this.writeDelayMs = options.writeDelayMs ?? DEFAULT_WRITE_DELAY_MS;
    this.retry = { initialDelayMs: options.retry?.initialDelayMs ?? 200, maxDelayMs: options.retry?.maxDelayMs ?? 30_000 };
    this.writeRetryDelayMs = this.retry.initialDelayMs;
    this.runners = options.sinks.map(
      (sink) =>
        new SinkRunner(sink, {
          retry: this.retry,
          batchSize: this.batchSize,
          head: () => this.spooledSeq,
          batchFrom: (seq, max) => this.batchFrom(seq, max),
          delivered: () => this.cursorMoved(),
          logger: logger.child({ sink: sink.name }),
        }),
    );
    this.losses = new SpoolLosses({
      node: options.node,
      spool: this.spool,
      spoolMaxBytes: this.spoolMaxBytes,
      runners: this.runners,
      openConnections: this.openConnections,
      logger,
      addGap: (gap) => this.gaps.push(gap),
    });
  }

  /**
   * Opens the spool, continues its chain, restores the sinks' cursors and the connections left open
   * by the previous process, and starts the sinks. Records written before start() are queued.
   */
  async start(): Promise<void> {
    const contents = await this.openSpool();
    if (contents.head) {
      this.sealedHead = { seq: contents.head.seq, hash: contents.head.hash };
      this.spooledSeq = contents.head.seq;
      this.previousStop = contents.head.type === "agent.stopped" ? "clean" : "unclean";
    }
    this.redactor = await this.createRedactor();
    await this.openConnections.load();
    for await (const record of this.spool.readConnectionRecords()) this.openConnections.track(record);

    const saved = await loadCursors(this.options.spoolDir, this.logger);
    for (const runner of this.runners) {
      runner.restoreUnreportedLoss(saved.unreported[runner.sink.name]);
      const held = await runner.sink.open().catch((error: unknown) => {
        this.logger.warn({ sink: runner.sink.name, err: error }, "opening an audit sink failed; its records stay spooled and are retried");
        return undefined;
      });
      runner.start(await this.startingCursor(runner, saved.sinks[runner.sink.name], held, contents.oldestSeq));
    }
    this.started = true;
    this.logger.info(
      { spool: this.options.spoolDir, headSeq: this.spooledSeq, previousStop: this.previousStop, sinks: this.runners.map((runner) => runner.status()) },
      "audit pipeline started",
    );
    this.scheduleWriter();
  }

  /**
   * Returns the seq after which a sink starts. Without a saved cursor (a new sink, or a cursor file
   * that was lost) it receives every record still in the spool: at-least-once, not a silent skip.
   * A sink that reports the last record it has starts after it, unless that record belongs to another
   * chain (the spool was lost or moved aside as damaged). startNewChain() then makes the sink take the
   * new chain after its records, which `agentctl audit verify` reports as a chain restart.
   */
  private async startingCursor(runner: SinkRunner, saved: number | undefined, held: HeldRecord | undefined, oldestSeq: number): Promise<number> {
    // A saved cursor below the oldest spooled record means records were removed while the agent was
    // down: the first read finds them missing and writes the gap record.
    let cursor = saved ?? oldestSeq - 1;
    if (held !== undefined) {
      if (await this.isOfThisChain(held)) {
        cursor = Math.max(cursor, held.seq);
      } else {
        this.logger.warn(
          { sink: runner.sink.name, heldSeq: held.seq, headSeq: this.spooledSeq },
          "audit sink holds records of an earlier chain (the spool was lost or replaced); it receives the new chain after them",
        );
        runner.sink.startNewChain?.();
        cursor = oldestSeq - 1;
      }
    }
    return Math.min(cursor, this.spooledSeq);
  }

  /** Tells whether a sink's last record is this spool's record of that seq, as far as the spool still has it. */
  private async isOfThisChain(held: HeldRecord): Promise<boolean> {
    if (held.seq > this.spooledSeq) return false;
    if (held.hash === undefined) return true;
    if (held.seq === this.spooledSeq) return held.hash === this.sealedHead.hash;
    const [spooled] = await this.spool.read(held.seq, 1).catch(() => []);
    // A record no longer in the spool was delivered to every sink and deleted: the same chain.
    return spooled === undefined || spooled.seq !== held.seq || spooled.record.hash === held.hash;
  }

  /**
   * Opens the spool. A spool whose last record cannot be read (a damaged disk, an edit) is moved
   * aside with its contents, and a new chain begins, so that the agent keeps serving. The move is
   * logged with the new folder, and `agentctl audit verify` reports the new chain's start.
   */
  private async openSpool(): Promise<SpoolContents> {
    try {
      return await this.spool.open();
    } catch (error) {
      if (!(error instanceof SpoolDamagedError)) throw error;
      const aside = `${this.options.spoolDir}.damaged-${new Date().toISOString().replace(/[:.]/g, "")}`;
      await fs.promises.rename(this.options.spoolDir, aside);
      await copyRedactionKey(aside, this.options.spoolDir);
      this.logger.error(
        { err: error, spool: this.options.spoolDir, movedTo: aside },
        "the audit spool is damaged; moved it aside and starting a new chain (its undelivered records stay in the moved folder)",
      );
      return await this.spool.open();
    }
  }

  /** True when redaction rules are configured. */
  get redacting(): boolean {
    return (this.options.redaction ?? []).length > 0;
  }

  /**
   * Queues a record ahead of every record queued so far, for the start record of an agent that
   * queued records while it waited to take over the spool.
   */
  writeFirst(record: AuditEvent): void {
    this.redact(record);
    this.counts.records[record.type] = (this.counts.records[record.type] ?? 0) + 1;
    this.queue.unshift(record);
    this.scheduleWriter();
  }

  /**
   * Hands a record over; never blocks and never throws. A full queue drops it, and a later gap
   * record counts it. Once the pipeline has started, redaction is applied here, in place, so the
   * caller's log line about the record shows the redacted values; records written before start()
   * are redacted when they are sealed.
   */
  write(record: AuditEvent): void {
    this.redact(record);
    if (this.closed) {
      if (this.counts.closed++ === 0) this.logger.error({ type: record.type }, "audit record written after the pipeline closed; dropped");
      return;
    }
    this.counts.records[record.type] = (this.counts.records[record.type] ?? 0) + 1;
    if (this.queue.length >= this.queueCapacity) {
      this.countQueueLoss(record.time);
      return;
    }
    this.queue.push(record);
    this.scheduleWriter();
  }

  /** Writes completion records for the connections the previous process left open (see OpenConnections). */
  recordInterrupted(): number {
    const records = this.openConnections.completeInterrupted(new Date().toISOString());
    // Built from spooled records, which may carry hashes already: the redactor leaves those alone in
    // these records only, and applies today's rules to the rest, such as the new error message. They
    // bypass the queue's bound, which they exceed by at most the connections that were open.
    for (const record of records) {
      this.redactor?.apply(record, { keepHashed: true });
      this.redacted.add(record);
      this.counts.records[record.type] = (this.counts.records[record.type] ?? 0) + 1;
      this.queue.push(record);
    }
    this.scheduleWriter();
    if (records.length > 0) {
      this.logger.warn({ connections: records.length }, "the previous agent process ended with connections open; recorded their completion with error AGENT_INTERRUPTED");
    }
    return records.length;
  }

  private countQueueLoss(time: string): void {
    this.counts.queueFull++;
    if (this.queueLoss === undefined) {
      this.queueLoss = { lost: 0, firstTime: time, lastTime: time };
      this.logger.error({ capacity: this.queueCapacity }, "audit queue full: dropping new records until the spool catches up; a gap record will count them");
    }
    this.queueLoss.lost++;
    this.queueLoss.lastTime = time;
  }

  /**
   * Starts the writer after `delayMs`, unless it runs, waits for a retry, or is already due. The
   * delay collects the records of a busy moment into one append and one batch per sink. A delay of
   * 0 moves a pending start forward (flush() and close() use it).
   */
  private scheduleWriter(delayMs = this.writeDelayMs): void {
    if (!this.started || this.writing || this.writeRetryTimer !== undefined) return;
    if (this.writerTimer !== undefined) {
      if (delayMs > 0) return;
      clearTimeout(this.writerTimer);
    }
    this.writerTimer = setTimeout(() => {
      this.writerTimer = undefined;
      void this.writeLoop();
    }, delayMs);
  }

  /** Seals and spools queued records batch by batch until the queue is empty or a write fails. */
  private async writeLoop(): Promise<void> {
    if (this.writing) return;
    this.writing = true;
    try {
      while (this.pending !== undefined || this.queue.length > 0 || this.gaps.length > 0 || this.queueLoss !== undefined) {
        this.pending ??= this.sealBatch();
        if (this.pending.records.length === 0) {
          this.pending = undefined;
          continue;
        }
        if (await this.losses.forgetVanishedSegments()) await this.restoreSpoolFiles();
        try {
          await this.spool.append(this.pending.lines, this.pending.records[0].seq);
        } catch (error) {
          this.writeFailed(error);
          return;
        }
        const spooledGap = this.pending.events.some((event) => event.type === "audit.gap");
        this.commit(this.pending);
        this.pending = undefined;
        // Sinks moved past lost records get their cursors saved as soon as the gap records about the
        // loss are spooled, so a crash after this neither loses the gap nor counts it twice.
        if (spooledGap) await this.saveCursors().catch((error: unknown) => this.logger.warn({ err: error }, "saving the audit sink cursors failed"));
        await this.losses.evictOverflow().catch((error: unknown) =>
          this.logger.error({ err: error, spool: this.options.spoolDir }, "evicting from the full audit spool failed; retrying after the next append"),
        );
      }
    } finally {
      this.writing = false;
      if (this.isIdle()) for (const resolve of this.idleWaiters.splice(0)) resolve();
    }
  }

  private sealBatch(): { lines: string[]; records: SpooledRecord[]; events: AuditEvent[] } {
    if (this.queueLoss !== undefined) {
      const loss = this.queueLoss;
      this.queueLoss = undefined;
      this.gaps.push({ type: "audit.gap", time: new Date().toISOString(), node: this.options.node, reason: "queue_full", lost: loss.lost, first_time: loss.firstTime, last_time: loss.lastTime });
    }
    const events = this.gaps.splice(0);
    events.push(...this.queue.splice(0, Math.max(0, this.batchSize - events.length)));
    const lines: string[] = [];
    const records: SpooledRecord[] = [];
    const sealed: AuditEvent[] = [];
    for (const event of events) {
      let spooled: SpooledRecord;
      try {
        spooled = this.seal(event);
      } catch (error) {
        // Only a record the agent built wrongly (one that JSON cannot hold) gets here.
        this.logger.error({ err: error, type: event.type }, "audit record cannot be serialized; dropped");
        continue;
      }
      lines.push(spooled.line);
      records.push(spooled);
      sealed.push(event);
    }
    return { lines, records, events: sealed };
  }

  /** Applies the redaction rules once per record; records queued before start() wait for the key. */
  private redact(record: AuditEvent): void {
    if (this.redactor === undefined || this.redacted.has(record)) return;
    this.redactor.apply(record);
    this.redacted.add(record);
  }

  /** Redacts the record if write() could not, and adds the chain fields; the hash covers the line as written. */
  private seal(event: AuditEvent): SpooledRecord {
    this.redact(event);
    const seq = this.sealedHead.seq + 1;
    const { spooled, hash, originalBytes } = sealRecord(event, seq, this.sealedHead.hash);
    if (originalBytes !== undefined) {
      this.logger.warn({ type: event.type, seq, bytes: originalBytes, maxBytes: MAX_RECORD_BYTES }, "audit record too large; its long values were cut");
    }
    this.sealedHead = { seq, hash };
    return spooled;
  }

  private writeFailed(error: unknown): void {
    this.writeFailures++;
    if (this.writeFailures === 1) {
      this.logger.error(
        { err: error, spool: this.options.spoolDir, queued: this.queue.length + (this.pending?.lines.length ?? 0) },
        "writing to the audit spool failed; keeping the records queued and retrying",
      );
    }
    const delay = this.writeRetryDelayMs;
    this.writeRetryDelayMs = Math.min(this.writeRetryDelayMs * 2, this.retry.maxDelayMs);
    this.writeRetryTimer = setTimeout(() => {
      this.writeRetryTimer = undefined;
      this.scheduleWriter();
    }, delay);
    this.writeRetryTimer.unref();
  }

  /** Publishes a spooled batch: the head moves, the tail and the open connections follow, the sinks wake. */
  private commit(batch: { records: SpooledRecord[]; events: AuditEvent[] }): void {
    if (this.writeFailures > 0) {
      this.logger.info({ failedAttempts: this.writeFailures, spool: this.options.spoolDir }, "writing to the audit spool works again");
      this.writeFailures = 0;
      this.writeRetryDelayMs = this.retry.initialDelayMs;
    }
    this.spooledSeq = batch.records[batch.records.length - 1].seq;
    for (const event of batch.events) this.openConnections.track(event);
    this.tail.push(...batch.records);
    if (this.tail.length > 2 * TAIL_RECORDS) this.tail = this.tail.slice(-TAIL_RECORDS);
    for (const runner of this.runners) runner.wake();
  }

  /** Returns up to `max` spooled records from `seq` on, from memory when recent and from disk otherwise. */
  private async batchFrom(seq: number, max: number): Promise<SpooledRecord[]> {
    const first = this.tail[0];
    if (first !== undefined && seq >= first.seq) {
      const start = seq - first.seq;
      return this.tail.slice(start, start + max);
    }
    let records: SpooledRecord[];
    try {
      records = await this.spool.read(seq, max);
    } catch (error) {
      if (!(error instanceof SpoolDamagedError) || error.seq === undefined) throw error;
      this.losses.skipDamaged(error.seq, error);
      this.scheduleWriter();
      return [];
    }
    if (records.length > 0 || seq > this.spooledSeq) return records;
    // The spool no longer has this seq (segment files were removed): skip to the next record it has.
    const next = Math.min(this.spool.firstSeqFrom(seq) ?? Infinity, this.tail[0]?.seq ?? Infinity, this.spooledSeq + 1);
    if (next > seq) {
      this.losses.skipMissing(seq, next - 1);
      this.scheduleWriter();
    }
    return [];
  }

  /** After a sink accepted records: saves the cursors soon, and deletes the segments every sink has. */
  private cursorMoved(): void {
    if (this.cursorTimer === undefined) {
      this.cursorTimer = setTimeout(() => {
        this.cursorTimer = undefined;
        void this.persistProgress().then(
          () => {
            if (this.cursorSaveFailures > 0) this.logger.info({ failedAttempts: this.cursorSaveFailures }, "saving the audit sink cursors works again");
            this.cursorSaveFailures = 0;
          },
          (error: unknown) => {
            if (this.cursorSaveFailures++ === 0) this.logger.warn({ err: error, spool: this.options.spoolDir }, "saving the audit sink cursors failed; retrying at the next delivery");
          },
        );
      }, CURSOR_SAVE_DELAY_MS);
      this.cursorTimer.unref();
    }
    if (this.isIdle()) for (const resolve of this.idleWaiters.splice(0)) resolve();
  }

  private async persistProgress(): Promise<void> {
    await this.saveCursors();
    const delivered = this.runners.reduce((min, runner) => Math.min(min, runner.cursor), this.spooledSeq);
    if (this.spool.releasable(delivered)) {
      await this.openConnections.save();
      await this.spool.release(delivered);
    }
  }

  private async saveCursors(): Promise<void> {
    const saved: SavedCursors = { sinks: {}, unreported: {} };
    for (const runner of this.runners) {
      saved.sinks[runner.sink.name] = runner.cursor;
      const unreported = runner.unreportedLoss;
      if (unreported !== undefined) saved.unreported[runner.sink.name] = unreported;
    }
    await saveCursors(this.options.spoolDir, saved);
  }

  private async createRedactor(): Promise<Redactor | undefined> {
    const rules = this.options.redaction ?? [];
    if (rules.length === 0) return undefined;
    this.spoolKey = this.options.redactionKey === undefined ? await spoolRedactionKey(this.options.spoolDir, this.logger) : undefined;
    return new Redactor(rules, this.options.redactionKey ?? this.spoolKey!);
  }

  /**
   * Writes the spool's small files again after its folder was removed: the redaction key, so that
   * hashes stay the same after the next start, and the connections open now, so that a crash still
   * completes them.
   */
  private async restoreSpoolFiles(): Promise<void> {
    try {
      if (this.spoolKey !== undefined) await writeRedactionKey(this.options.spoolDir, this.spoolKey);
      await this.openConnections.save();
    } catch (error) {
      this.logger.error({ err: error, spool: this.options.spoolDir }, "writing the audit spool's key and open connections again failed");
    }
  }

  private isIdle(): boolean {
    return (
      this.queue.length === 0 &&
      this.gaps.length === 0 &&
      this.pending === undefined &&
      !this.writing &&
      this.runners.every((runner) => runner.cursor >= this.spooledSeq)
    );
  }

  /** Resolves once every record written so far is spooled and accepted by every sink. */
  flush(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    this.scheduleWriter(0);
    for (const runner of this.runners) runner.sendNow();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Stops accepting records and waits up to `timeoutMs` for the queue to reach the spool and the
   * sinks to catch up. Records that a sink has not accepted by then stay in the spool and are sent
   * after the next start.
   */
  async close(timeoutMs = 5_000): Promise<void> {
    if (!this.started) {
      this.closed = true;
      if (this.queue.length > 0) this.logger.warn({ queued: this.queue.length }, "audit pipeline closed before it started; its queued records were not spooled");
      return;
    }
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), timeoutMs)));
    const result = await Promise.race([this.flush(), timedOut]);
    clearTimeout(timer);
    this.closed = true;
    clearTimeout(this.writeRetryTimer);
    clearTimeout(this.writerTimer);
    clearTimeout(this.cursorTimer);
    for (const runner of this.runners) runner.stop();
    if (result === "timeout") {
      this.logger.warn(
        { queued: this.queue.length + (this.pending?.lines.length ?? 0), sinks: this.runners.map((runner) => runner.status()) },
        "audit pipeline closed before every record was delivered; spooled records are sent after the next start",
      );
    }
    await this.persistProgress().catch((error: unknown) => this.logger.warn({ err: error }, "saving the audit sink cursors failed at close"));
    await this.openConnections.save().catch((error: unknown) => this.logger.warn({ err: error }, "saving the open connections failed at close"));
    await Promise.all(this.runners.map((runner) => runner.close()));
    await this.spool.close();
  }

  status(): AuditPipelineStatus {
    return {
      queue: { records: this.queue.length, capacity: this.queueCapacity },
      records: { ...this.counts.records },
      dropped: { queue_full: this.counts.queueFull, closed: this.counts.closed },
      spool: {
        dir: this.options.spoolDir,
        bytes: this.spool.bytes,
        maxBytes: this.spoolMaxBytes,
        segments: this.spool.segmentCount,
        oldestSeq: this.spool.oldestSeq,
        headSeq: this.spooledSeq,
        fsync: this.fsync.mode === "interval" ? `interval ${this.fsync.intervalMs} ms` : this.fsync.mode,
      },
      openConnections: this.openConnections.size,
      sinks: this.runners.map((runner) => runner.status()),
    };
  }
}
