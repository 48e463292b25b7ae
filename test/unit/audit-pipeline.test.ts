import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { GENESIS_HASH, hashBody, unsealLine } from "../../agent/audit/chain";
import { AuditPipeline, type AuditPipelineOptions } from "../../agent/audit/pipeline";
import type { AuditEvent, ConnectionOpenedRecord } from "../../agent/audit/record";
import type { AuditSink, SpooledRecord } from "../../agent/audit/sink";
import { silentLogger } from "../../agent/log";

/** A sink that keeps every line it accepted and can be made to fail. */
class MemorySink implements AuditSink {
  readonly lines: string[] = [];
  sends = 0;
  failing = false;
  constructor(readonly name = "memory") {}
  async open(): Promise<undefined> {
    return undefined;
  }
  async send(batch: readonly SpooledRecord[]): Promise<void> {
    this.sends++;
    if (this.failing) throw new Error("sink down");
    for (const record of batch) this.lines.push(record.line);
  }
  async close(): Promise<void> {}
  records(): Record<string, any>[] {
    return this.lines.map((line) => JSON.parse(line));
  }
}

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "audit-pipeline-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function control(index: number): AuditEvent {
  return { type: "workload.enrolled", time: new Date().toISOString(), node: "n1", workload: `w${index}`, namespace: "demo", reason: "test" };
}

function opened(id: string): ConnectionOpenedRecord {
  return {
    type: "connection.opened",
    time: new Date().toISOString(),
    start: new Date().toISOString(),
    node: "n1",
    connection_id: id,
    direction: "inbound",
    src: { addr: "10.0.0.1:40000" },
    dst: { addr: "10.0.0.2:80" },
    transport: "hbone",
    decision: "allow",
    reason: "no_policy",
  };
}

/** Polls `done` every 10 ms; fails the test after 10 s. */
async function waitFor(done: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!done()) {
    if (Date.now() > deadline) throw new Error("condition not met within 10 s");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function pipeline(dir: string, sinks: AuditSink[], extra: Partial<AuditPipelineOptions> = {}): AuditPipeline {
  return new AuditPipeline({ node: "n1", spoolDir: dir, sinks, retry: { initialDelayMs: 10, maxDelayMs: 50 }, ...extra }, silentLogger());
}

/** Checks seq order, links and hashes of sealed lines; returns the number of records. */
function assertChain(t: import("ava").ExecutionContext, lines: readonly string[], firstPrev = GENESIS_HASH): void {
  let previous = firstPrev;
  lines.forEach((line, index) => {
    const unsealed = unsealLine(line);
    t.truthy(unsealed, `line ${index} has a hash member`);
    t.is(hashBody(unsealed!.body), unsealed!.hash, `line ${index} hash`);
    const record = JSON.parse(line);
    t.is(record.prev_hash, previous, `line ${index} prev_hash`);
    previous = record.hash;
  });
}

test("pipeline seals and delivers in order", async (t) => {
  const dir = tempDir(t);
  const sink = new MemorySink();
  const audit = pipeline(dir, [sink]);
  await audit.start();
  for (let i = 0; i < 1200; i++) audit.write(control(i));
  await audit.flush();
  const records = sink.records();
  t.is(records.length, 1200);
  t.deepEqual(records.map((record) => record.seq), Array.from({ length: 1200 }, (_, i) => i + 1));
  t.is(records[0].v, 1);
  t.deepEqual(Object.keys(records[0]).slice(0, 5), ["time", "type", "v", "seq", "id"]);
  assertChain(t, sink.lines);
  await audit.close();
});

test("pipeline retries a failing sink without losing records", async (t) => {
  const dir = tempDir(t);
  const good = new MemorySink("good");
  const bad = new MemorySink("bad");
  bad.failing = true;
  const audit = pipeline(dir, [good, bad]);
  await audit.start();
  for (let i = 0; i < 100; i++) audit.write(control(i));
  await waitFor(() => good.lines.length === 100 && bad.sends > 1);
  t.is(good.lines.length, 100);
  t.is(bad.lines.length, 0);
  t.true(bad.sends > 1);
  t.false(audit.status().sinks[1].up);
  bad.failing = false;
  await audit.flush();
  t.deepEqual(bad.lines, good.lines);
  await audit.close();
});

test("pipeline continues its chain after a restart", async (t) => {
  const dir = tempDir(t);
  const first = new MemorySink("sink");
  const audit = pipeline(dir, [first]);
  await audit.start();
  for (let i = 0; i < 10; i++) audit.write(control(i));
  audit.write({ type: "agent.stopped", time: new Date().toISOString(), node: "n1", reason: "test", open_connections: 0 });
  await audit.close();

  const second = new MemorySink("sink");
  const again = pipeline(dir, [second]);
  await again.start();
  t.is(again.previousStop, "clean");
  again.write(control(99));
  await again.flush();
  t.is(second.lines.length, 1, "records the sink already had are not resent");
  const record = JSON.parse(second.lines[0]);
  t.is(record.seq, 12);
  t.is(record.prev_hash, JSON.parse(first.lines[10]).hash);
  await again.close();
});

test("pipeline resends undelivered records after a restart", async (t) => {
  const dir = tempDir(t);
  const sink = new MemorySink("sink");
  sink.failing = true;
  const audit = pipeline(dir, [sink]);
  await audit.start();
  for (let i = 0; i < 20; i++) audit.write(control(i));
  await audit.close(100);

  const later = new MemorySink("sink");
  const again = pipeline(dir, [later]);
  await again.start();
  t.is(again.previousStop, "unclean");
  await again.flush();
  t.deepEqual(later.records().map((record) => record.seq), Array.from({ length: 20 }, (_, i) => i + 1));
  await again.close();
});

test("pipeline completes connections left open by a killed process", async (t) => {
  const dir = tempDir(t);
  const sink = new MemorySink("sink");
  const audit = pipeline(dir, [sink]);
  await audit.start();
  audit.write(opened("c1"));
  audit.write(opened("c2"));
  await audit.flush();
  // No close(): the process is gone. The next pipeline finds c1 and c2 open in the spool.
  const later = new MemorySink("sink");
  const again = pipeline(dir, [later]);
  await again.start();
  t.is(again.recordInterrupted(), 2);
  await again.flush();
  const completions = later.records().filter((record) => record.type === "connection.completed");
  t.deepEqual(completions.map((record) => record.connection_id).sort(), ["c1", "c2"]);
  t.is(completions[0].error.code, "AGENT_INTERRUPTED");
  t.is(completions[0].bytes_sent, undefined);
  await again.close();
  const third = pipeline(dir, [new MemorySink("sink")]);
  await third.start();
  t.is(third.recordInterrupted(), 0, "completed connections are not completed twice");
  await third.close();
});

test("pipeline evicts for a lagging sink and writes a gap record", async (t) => {
  const dir = tempDir(t);
  const good = new MemorySink("good");
  const stuck = new MemorySink("stuck");
  stuck.failing = true;
  const audit = pipeline(dir, [good, stuck], { spoolMaxBytes: 200_000, segmentBytes: 50_000 });
  await audit.start();
  for (let i = 0; i < 2000; i++) audit.write(control(i));
  // Every eviction of this burst has happened once all 2,000 records are spooled. The good sink then
  // has them and the gap records, which come after the evictions.
  const gapRecords = (): Record<string, any>[] => good.records().filter((record) => record.type === "audit.gap");
  const lostIn = (gaps: Record<string, any>[]): number => gaps.reduce((sum, gap) => sum + gap.lost, 0);
  await waitFor(() => good.lines.length - gapRecords().length === 2000 && lostIn(gapRecords()) === audit.status().sinks[1].dropped);
  const gaps = gapRecords();
  t.true(gaps.length > 0);
  t.is(gaps[0].sink, "stuck");
  t.is(gaps[0].reason, "spool_full");
  const lost = lostIn(gaps);
  t.is(audit.status().sinks[1].dropped, lost);
  stuck.failing = false;
  await audit.flush();
  const received = stuck.records();
  const total = good.lines.length;
  t.is(received.length + lost, total, "the stuck sink has every record except the evicted ones");
  // The gap records the stuck sink received cover every seq it lacks, also when the gap records
  // about its first losses were evicted with the rest.
  const have = new Set(received.map((record) => record.seq));
  const covered = (seq: number): boolean =>
    received.some((record) => record.type === "audit.gap" && record.sink === "stuck" && (record.unreported_first_seq ?? record.first_seq) <= seq && seq <= record.last_seq);
  const uncovered = good.records().map((record) => record.seq).filter((seq) => !have.has(seq) && !covered(seq));
  t.deepEqual(uncovered, []);
  assertChain(t, good.lines);
  t.true(audit.status().spool.bytes <= 200_000 + 50_000);
  await audit.close();
});

test("pipeline counts queue drops in a gap record", async (t) => {
  const dir = tempDir(t);
  const sink = new MemorySink("sink");
  const audit = pipeline(dir, [sink], { queueCapacity: 10 });
  for (let i = 0; i < 25; i++) audit.write(control(i));
  await audit.start();
  await audit.flush();
  const records = sink.records();
  t.is(records[0].type, "audit.gap");
  t.is(records[0].reason, "queue_full");
  t.is(records[0].lost, 15);
  t.is(records.length, 11);
  t.is(audit.status().dropped.queue_full, 15);
  await audit.close();
});

test("pipeline redacts fields and scrubs secrets", async (t) => {
  const dir = tempDir(t);
  const sink = new MemorySink("sink");
  const audit = pipeline(dir, [sink], { redaction: [{ path: "src.addr", mode: "hash" }, { path: "dst.addr", mode: "remove" }] });
  await audit.start();
  const record = opened("c1");
  audit.write(record);
  audit.write({ ...opened("c2"), reason: "bad -----BEGIN PRIVATE KEY----- MIIE" });
  await audit.flush();
  const [first, second] = sink.records();
  t.regex(first.src.addr, /^hmac-sha256:[0-9a-f]{32}$/);
  t.is(first.dst.addr, undefined);
  t.notRegex(sink.lines.join("\n"), /BEGIN PRIVATE KEY/);
  t.regex(second.reason, /removed/);
  assertChain(t, sink.lines);
  await audit.close();
});

test("pipeline moves a damaged spool aside and starts a new chain", async (t) => {
  const dir = tempDir(t);
  const spoolDir = path.join(dir, "spool");
  const first = pipeline(spoolDir, [new MemorySink("sink")]);
  await first.start();
  for (let i = 0; i < 5; i++) first.write(control(i));
  await first.close();
  const segment = path.join(spoolDir, fs.readdirSync(spoolDir).find((name) => name.startsWith("segment-"))!);
  fs.appendFileSync(segment, "not json\n");

  const sink = new MemorySink("sink");
  const again = pipeline(spoolDir, [sink]);
  await again.start();
  again.write(control(9));
  await again.flush();
  t.is(JSON.parse(sink.lines[0]).seq, 1, "a new chain begins");
  const aside = fs.readdirSync(dir).filter((name) => name.startsWith("spool.damaged-"));
  t.is(aside.length, 1, "the damaged spool is kept aside");
  t.true(fs.readFileSync(path.join(dir, aside[0], path.basename(segment)), "utf8").includes("not json"));
  await again.close();
});

test("pipeline skips a damaged spool line with a gap record", async (t) => {
  const dir = tempDir(t);
  const good = new MemorySink("good");
  const late = new MemorySink("late");
  late.failing = true;
  const audit = pipeline(dir, [good, late], { segmentBytes: 20_000 });
  await audit.start();
  // More records than the pipeline keeps in memory, so the failing sink reads the first ones from disk.
  for (let i = 0; i < 5000; i++) audit.write(control(i));
  await waitFor(() => good.lines.length === 5000 && late.sends > 0);
  // Damage line 3 of the second segment: the failing sink has read (and cached) only the first one.
  const second = fs.readdirSync(dir).filter((name) => name.startsWith("segment-")).sort()[1];
  const damagedSeq = Number(/segment-(\d+)/.exec(second)![1]) + 2;
  const segment = path.join(dir, second);
  const lines = fs.readFileSync(segment, "utf8").split("\n");
  lines[2] = "x".repeat(lines[2].length);
  fs.writeFileSync(segment, lines.join("\n"));
  late.failing = false;
  await audit.flush();
  const received = late.records();
  t.false(received.some((record) => record.seq === damagedSeq), "the damaged record is not sent");
  const gap = good.records().find((record) => record.type === "audit.gap");
  t.is(gap?.reason, "spool_damaged");
  t.is(gap?.sink, "late");
  t.is(gap?.first_seq, damagedSeq);
  t.is(received.filter((record) => record.type !== "audit.gap").length, 4999);
  await audit.close();
});

test("sink without a saved cursor gets the spooled backlog", async (t) => {
  const dir = tempDir(t);
  const down = new MemorySink("remote");
  down.failing = true;
  const first = pipeline(dir, [down]);
  await first.start();
  for (let i = 0; i < 20; i++) first.write(control(i));
  await waitFor(() => first.status().spool.headSeq === 20);
  // No close(): the process is killed before any delivery, so no cursor was ever saved.
  t.false(fs.existsSync(path.join(dir, "cursors.json")));
  const up = new MemorySink("remote");
  const again = pipeline(dir, [up]);
  await again.start();
  await again.flush();
  t.deepEqual(up.records().map((record) => record.seq), Array.from({ length: 20 }, (_, i) => i + 1));
  await again.close();
});

test("sink holding another chain receives the new one", async (t) => {
  const dir = tempDir(t);
  class HoldingSink extends MemorySink {
    newChain = false;
    override async open(): Promise<undefined> {
      return { seq: 305, hash: "f".repeat(64) } as unknown as undefined;
    }
    startNewChain(): void {
      this.newChain = true;
    }
  }
  const sink = new HoldingSink("file");
  const audit = pipeline(path.join(dir, "fresh-spool"), [sink]);
  await audit.start();
  for (let i = 0; i < 3; i++) audit.write(control(i));
  await audit.flush();
  t.true(sink.newChain, "the sink is told that a new chain follows what it holds");
  t.deepEqual(sink.records().map((record) => record.seq), [1, 2, 3]);
  await audit.close();
});

test("pipeline recovers from a removed spool folder", async (t) => {
  const dir = tempDir(t);
  const spoolDir = path.join(dir, "spool");
  const good = new MemorySink("good");
  const down = new MemorySink("down");
  down.failing = true;
  const audit = pipeline(spoolDir, [good, down]);
  await audit.start();
  for (let i = 0; i < 10; i++) audit.write(control(i));
  await waitFor(() => good.lines.length === 10);
  fs.rmSync(spoolDir, { recursive: true, force: true });
  // The spool notices at most once a second.
  await new Promise((resolve) => setTimeout(resolve, 1_100));
  for (let i = 10; i < 20; i++) audit.write(control(i));
  await waitFor(() => good.lines.length === 20);
  t.true(fs.readdirSync(spoolDir).some((name) => name.startsWith("segment-")), "a new segment is written in a new folder");
  down.failing = false;
  await audit.flush();
  // The removed records were still in memory, so the lagging sink loses none of them.
  t.deepEqual(down.records().map((record) => record.seq), Array.from({ length: 20 }, (_, i) => i + 1));
  t.false(down.records().some((record) => record.type === "audit.gap"));
  await audit.close();
});

test("pipeline cuts a record larger than the limit", async (t) => {
  const dir = tempDir(t);
  const sink = new MemorySink("sink");
  const audit = pipeline(dir, [sink]);
  await audit.start();
  audit.write({ type: "policy.rejected", time: new Date().toISOString(), node: "n1", policy: { kind: "AuthorizationPolicy", name: "p" }, file: "f", message: "x".repeat(5 * 1024 * 1024) });
  audit.write(control(1));
  await audit.flush();
  const [cut, next] = sink.records();
  t.true(Buffer.byteLength(sink.lines[0]) <= 64 * 1024);
  t.true(cut.truncated);
  t.true(cut.original_bytes > 5 * 1024 * 1024);
  t.regex(cut.message, /cut from 5242880 characters/);
  t.is(cut.seq, 1);
  t.is(next.seq, 2);
  assertChain(t, sink.lines);
  t.deepEqual(Object.keys(cut).slice(-3), ["original_bytes", "prev_hash", "hash"]);
  await audit.close();
});

test("pipeline counts records a sink rejects for good", async (t) => {
  const dir = tempDir(t);
  class RejectingSink extends MemorySink {
    override async send(batch: readonly SpooledRecord[]): Promise<void> {
      await super.send(batch);
      return { rejected: 2 } as unknown as void;
    }
  }
  const audit = pipeline(dir, [new RejectingSink("otlp")]);
  await audit.start();
  for (let i = 0; i < 5; i++) audit.write(control(i));
  await audit.flush();
  t.is(audit.status().sinks[0].rejected, 2);
  t.is(audit.status().sinks[0].delivered, 5);
  await audit.close();
});

/** Returns the spool's segment files, oldest first, with the seq of their first line. */
function segmentsOf(dir: string): { file: string; firstSeq: number }[] {
  return fs
    .readdirSync(dir)
    .filter((name) => name.startsWith("segment-"))
    .sort()
    .map((name) => ({ file: path.join(dir, name), firstSeq: Number(/segment-(\d+)/.exec(name)![1]) }));
}

test("removed segment is a gap for a lagging sink", async (t) => {
  const dir = tempDir(t);
  const good = new MemorySink("good");
  const late = new MemorySink("late");
  late.failing = true;
  const audit = pipeline(dir, [good, late], { segmentBytes: 20_000 });
  await audit.start();
  for (let i = 0; i < 5000; i++) audit.write(control(i));
  await waitFor(() => good.lines.length === 5000);
  const [, second, third] = segmentsOf(dir);
  fs.rmSync(second.file);
  // The spool notices the removal at most once a second, or when a sink reads the missing file.
  await new Promise((resolve) => setTimeout(resolve, 1_100));
  audit.write(control(5000));
  // The writer notices the removal while the lagging sink is still down.
  await waitFor(() => good.lines.length >= 5001);
  late.failing = false;
  await audit.flush();
  const received = late.records();
  const gap = received.find((record) => record.type === "audit.gap");
  t.is(gap?.reason, "spool_damaged");
  t.is(gap?.first_seq, second.firstSeq);
  t.is(gap?.last_seq, third.firstSeq - 1);
  t.is(gap?.lost, third.firstSeq - second.firstSeq);
  const seqs = new Set(received.map((record) => record.seq));
  t.true(seqs.has(second.firstSeq - 1) && seqs.has(third.firstSeq), "records around the removed segment arrive");
  t.is(received.filter((record) => record.type === "workload.enrolled").length, 5001 - gap!.lost);
  await audit.close();
});

test("segment removed while stopped is a gap after restart", async (t) => {
  const dir = tempDir(t);
  const down = new MemorySink("remote");
  down.failing = true;
  const first = pipeline(dir, [down], { segmentBytes: 20_000 });
  await first.start();
  for (let i = 0; i < 5000; i++) first.write(control(i));
  await waitFor(() => first.status().spool.headSeq === 5000);
  await first.close(100);
  const [, second, third] = segmentsOf(dir);
  fs.rmSync(second.file);

  const up = new MemorySink("remote");
  const again = pipeline(dir, [up], { segmentBytes: 20_000 });
  await again.start();
  await again.flush();
  const gap = up.records().find((record) => record.type === "audit.gap");
  t.is(gap?.first_seq, second.firstSeq);
  t.is(gap?.lost, third.firstSeq - second.firstSeq);
  t.is(up.records().filter((record) => record.type === "workload.enrolled").length, 5000 - gap!.lost);
  t.true(again.status().sinks[0].up);
  await again.close();
});

test("losses are counted once across a kill", async (t) => {
  const dir = tempDir(t);
  const good = new MemorySink("good");
  const stuck = new MemorySink("stuck");
  stuck.failing = true;
  const first = pipeline(dir, [good, stuck], { spoolMaxBytes: 200_000, segmentBytes: 50_000 });
  await first.start();
  for (let i = 0; i < 2000; i++) first.write(control(i));
  await waitFor(() => good.lines.length - good.records().filter((record) => record.type === "audit.gap").length === 2000 && first.status().queue.records === 0);
  await new Promise((resolve) => setTimeout(resolve, 100));
  // No close(): killed. The next process sends the rest to both sinks.
  const good2 = new MemorySink("good");
  const stuck2 = new MemorySink("stuck");
  const again = pipeline(dir, [good2, stuck2], { spoolMaxBytes: 200_000, segmentBytes: 50_000 });
  await again.start();
  await again.flush();
  const all = [...good.records(), ...good2.records()];
  const received = new Set([...stuck.records(), ...stuck2.records()].map((record) => record.seq));
  const gaps = all.filter((record, index, list) => record.type === "audit.gap" && record.sink === "stuck" && list.findIndex((other) => other.seq === record.seq) === index);
  const missing = [...new Set(all.map((record) => record.seq))].filter((seq) => !received.has(seq)).length;
  t.is(gaps.reduce((sum, gap) => sum + gap.lost, 0), missing, "the gap records count every record the stuck sink lacks, once");
  await again.close();
});
