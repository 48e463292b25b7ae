// The records a sink loses when they leave the spool before it received them: the oldest segment
// evicted from a full spool, segment files removed from under the agent, and damaged lines. Each loss
// moves the lagging sinks past the records and becomes a gap record that names the sink, the seqs
// and the times.

import type { Logger } from "../log";
import type { OpenConnections } from "./open-connections";
import type { AuditEvent } from "./record";
import type { SinkRunner } from "./sink-runner";
import type { Segment, Spool } from "./spool";

export interface SpoolLossContext {
  node: string;
  spool: Spool;
  spoolMaxBytes: number;
  runners: readonly SinkRunner[];
  openConnections: OpenConnections;
  logger: Logger;
  /** Queues a gap record ahead of the other records. */
  addGap(gap: AuditEvent): void;
}

export class SpoolLosses {
  constructor(private readonly context: SpoolLossContext) {}

  /** Moves every sink that still needs it past a damaged spool line, and records the loss in a gap record. */
  skipDamaged(seq: number, error: Error): void {
    for (const runner of this.context.runners) {
      if (runner.cursor !== seq - 1) continue;
      this.context.logger.error({ sink: runner.sink.name, seq, err: error }, "audit spool line is damaged; this sink skips it and a gap record counts it");
      this.recordLoss(runner, "spool_damaged", { firstSeq: seq, lastSeq: seq });
    }
  }

  /** Moves the sinks waiting for `firstSeq` past the records up to `lastSeq`, which the spool no longer has, with a gap record each. */
  skipMissing(firstSeq: number, lastSeq: number): void {
    for (const runner of this.context.runners) {
      if (runner.cursor !== firstSeq - 1) continue;
      this.context.logger.error(
        { sink: runner.sink.name, lost: lastSeq - firstSeq + 1, firstSeq, lastSeq },
        "audit records this sink has not received are missing from the spool (its files were removed); a gap record counts them",
      );
      this.recordLoss(runner, "spool_damaged", { firstSeq, lastSeq });
    }
  }

  /** Evicts the oldest segments while the spool is over its limit, with a gap record for each sink that lacked them. */
  async evictOverflow(): Promise<void> {
    for (let segment = this.context.spool.overflow(); segment !== undefined; segment = this.context.spool.overflow()) {
      const lagging = this.context.runners.filter((runner) => runner.cursor < segment!.lastSeq);
      if (lagging.length > 0) await this.recordEviction(segment, lagging, "spool_full");
      await this.context.openConnections.save();
      await this.context.spool.evictOldest();
    }
  }

  /**
   * Logs segment files someone removed and returns whether there were any. Their records are
   * skipped, with a gap record, when a sink that lacks them reaches them (see skipMissing), so records
   * still in memory, or in earlier segments, are not counted as lost.
   */
  async forgetVanishedSegments(): Promise<boolean> {
    const vanished = await this.context.spool.findVanished().catch(() => []);
    if (vanished.length === 0) return false;
    this.context.logger.error(
      { spool: this.context.spool.dir, segments: vanished.map((segment) => segment.file) },
      "audit spool files were removed while the agent ran; writing to a new segment, and the sinks that lack their records get gap records",
    );
    return true;
  }

  private async recordEviction(segment: Segment, lagging: SinkRunner[], reason: "spool_full" | "spool_damaged"): Promise<void> {
    const bounds = await this.context.spool.segmentBounds(segment).catch(() => ({ first: undefined, last: undefined }));
    for (const runner of lagging) {
      const firstSeq = Math.max(runner.cursor + 1, segment.firstSeq);
      this.context.logger.error(
        { sink: runner.sink.name, lost: segment.lastSeq - firstSeq + 1, firstSeq, lastSeq: segment.lastSeq, spoolMaxBytes: this.context.spoolMaxBytes, reason },
        "audit records this sink has not received left the spool; a gap record counts them",
      );
      this.recordLoss(runner, reason, { firstSeq, lastSeq: segment.lastSeq, firstTime: bounds.first?.record.time, lastTime: bounds.last?.record.time });
    }
  }

  /**
   * Moves the sink past the lost records and queues the gap record. `lost` counts this loss alone,
   * so adding up the `lost` of all gap records counts every record once. A lagging sink can lose
   * the gap records about its earlier losses too, because they sit in the segments evicted next.
   * Each gap record therefore also gives, in `unreported_lost` and `unreported_first_seq`, every
   * loss of that sink that no gap record it received covers.
   */
  private recordLoss(runner: SinkRunner, reason: "spool_full" | "spool_damaged", loss: LossRange): void {
    const lost = loss.lastSeq - loss.firstSeq + 1;
    runner.skipTo(loss.lastSeq, lost);
    const unreported = runner.addUnreportedLoss({ ...loss, lost });
    this.context.addGap({
      type: "audit.gap",
      time: new Date().toISOString(),
      node: this.context.node,
      reason,
      sink: runner.sink.name,
      lost,
      first_seq: loss.firstSeq,
      last_seq: loss.lastSeq,
      ...(loss.firstTime !== undefined && { first_time: loss.firstTime }),
      ...(loss.lastTime !== undefined && { last_time: loss.lastTime }),
      ...(unreported.lost > lost && { unreported_lost: unreported.lost, unreported_first_seq: unreported.firstSeq }),
    });
  }
}

/** A range of seqs a sink lost, with the times of its first and last record when known. */
export interface LossRange {
  firstSeq: number;
  lastSeq: number;
  firstTime?: string;
  lastTime?: string;
}
