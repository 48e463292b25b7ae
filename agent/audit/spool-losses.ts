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
      runner.skipTo(seq, 1);
      this.context.logger.error({ sink: runner.sink.name, seq, err: error }, "audit spool line is damaged; this sink skips it and a gap record counts it");
      const time = new Date().toISOString();
      this.context.addGap({ type: "audit.gap", time, node: this.context.node, reason: "spool_damaged", sink: runner.sink.name, lost: 1, first_seq: seq, last_seq: seq, first_time: time, last_time: time });
    }
  }

  /** Moves the sinks waiting for `firstSeq` past the records up to `lastSeq`, which the spool no longer has, with a gap record each. */
  skipMissing(firstSeq: number, lastSeq: number): void {
    for (const runner of this.context.runners) {
      if (runner.cursor !== firstSeq - 1) continue;
      const lost = lastSeq - firstSeq + 1;
      runner.skipTo(lastSeq, lost);
      this.context.logger.error(
        { sink: runner.sink.name, lost, firstSeq, lastSeq },
        "audit records this sink has not received are missing from the spool (its files were removed); a gap record counts them",
      );
      this.context.addGap({ type: "audit.gap", time: new Date().toISOString(), node: this.context.node, reason: "spool_damaged", sink: runner.sink.name, lost, first_seq: firstSeq, last_seq: lastSeq });
    }
  }

  /** Evicts the oldest segments while the spool is over its limit, with a gap record for each sink that lacked them. */
  async evictOverflow(): Promise<void> {
    for (let segment = this.context.spool.overflow(); segment !== undefined; segment = this.context.spool.overflow()) {
      const lagging = this.context.runners.filter((runner) => runner.cursor < segment!.lastSeq);
      if (lagging.length > 0) await this.recordEviction(segment, lagging);
      await this.context.openConnections.save();
      await this.context.spool.evictOldest();
    }
  }

  /** Writes gap records for the sinks that lacked the records of segment files someone removed; returns whether any were. */
  async forgetVanishedSegments(): Promise<boolean> {
    const vanished = await this.context.spool.findVanished().catch(() => []);
    if (vanished.length === 0) return false;
    this.context.logger.error(
      { spool: this.context.spool.dir, segments: vanished.map((segment) => segment.file) },
      "audit spool files were removed while the agent ran; writing to a new segment, and the sinks that lacked their records get gap records",
    );
    for (const segment of vanished) {
      const lagging = this.context.runners.filter((runner) => runner.cursor < segment.lastSeq);
      if (lagging.length > 0) await this.recordEviction(segment, lagging, "spool_damaged");
    }
    return true;
  }

  private async recordEviction(segment: Segment, lagging: SinkRunner[], reason: "spool_full" | "spool_damaged" = "spool_full"): Promise<void> {
    const bounds = await this.context.spool.segmentBounds(segment).catch(() => ({ first: undefined, last: undefined }));
    for (const runner of lagging) {
      const firstSeq = Math.max(runner.cursor + 1, segment.firstSeq);
      const lost = segment.lastSeq - firstSeq + 1;
      runner.skipTo(segment.lastSeq, lost);
      this.context.logger.error(
        { sink: runner.sink.name, lost, firstSeq, lastSeq: segment.lastSeq, spoolMaxBytes: this.context.spoolMaxBytes, reason },
        "audit records this sink has not received left the spool; a gap record counts them",
      );
      this.context.addGap({
        type: "audit.gap",
        time: new Date().toISOString(),
        node: this.context.node,
        reason,
        sink: runner.sink.name,
        lost,
        first_seq: firstSeq,
        last_seq: segment.lastSeq,
        ...(bounds.first !== undefined && { first_time: bounds.first.record.time }),
        ...(bounds.last !== undefined && { last_time: bounds.last.record.time }),
      });
    }
  }
}
