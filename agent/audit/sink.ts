// The contract between the audit pipeline and a destination of records.

import type { SealedRecord } from "./record";

/** The report of a destination about a batch it took. */
export interface SendResult {
  /** Records it refused for good, so they are not sent again. */
  rejected: number;
}

/** The last record a sink holds: its seq, and its hash when the sink can read it. */
export interface HeldRecord {
  seq: number;
  hash?: string;
}

/** A record read back from the spool: the exact line (without the newline) and its parsed form. */
export interface SpooledRecord {
  seq: number;
  id: string;
  /** The record's JSON line exactly as spooled, hash included, without the trailing newline. */
  line: string;
  record: SealedRecord;
}

/**
 * A destination of audit records. The pipeline calls send() with batches in `seq` order, one batch
 * at a time, and resends the same batch (after a backoff) when send() rejects. A sink may therefore
 * receive a record more than once: remote sinks pass `id` along so receivers can drop duplicates,
 * and local sinks skip what they already hold.
 */
export interface AuditSink {
  /** Stable name of the sink in logs, metrics and the spool's cursor file, such as "file:/var/log/audit.log". */
  readonly name: string;
  /**
   * How long the pipeline waits for more records before it sends a batch that is not full, so a
   * remote sink gets fewer, larger calls. Default 0: send as soon as records are spooled.
   */
  readonly lingerMs?: number;
  /**
   * Called once before the first send(). Returns the last record the destination already has
   * (a file sink reads its last line), so the pipeline starts after it, or undefined when unknown.
   */
  open(): Promise<HeldRecord | undefined>;
  /**
   * Called after open() when the held record belongs to an earlier chain: the sink must then accept
   * records whose seq is at or below the one it holds. Only sinks that skip held records need it.
   */
  startNewChain?(): void;
  /**
   * Delivers the batch. Resolves once the destination has taken every record of it, with the count
   * it rejected for good when it reports one (an OTLP partial success). Rejects with the reason otherwise.
   */
  send(batch: readonly SpooledRecord[]): Promise<void | SendResult>;
  /** Releases connections and files; send() is not called afterwards. */
  close(): Promise<void>;
}
