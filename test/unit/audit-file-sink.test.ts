import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { AuditFileSink, formatAuditLine } from "../../agent/audit/file-sink";
import type { AuditRecord } from "../../agent/audit/record";
import { silentLogger } from "../../agent/log";

function record(index: number): AuditRecord {
  return {
    type: "connection.completed",
    established: true,
    start: "2026-01-01T00:00:00.000Z",
    time: `2026-01-01T00:00:${String(index % 60).padStart(2, "0")}.000Z`,
    node: "node-a",
    connection_id: `c${index}`,
    direction: "inbound",
    src: { addr: "10.0.0.1:40000", identity: "spiffe://cluster.local/ns/demo/sa/client" },
    dst: { addr: "10.0.0.2:8080", workload: "web", namespace: "demo" },
    transport: "hbone",
    decision: "allow",
    reason: "no_policy",
    bytes_sent: index,
    bytes_recv: 0,
    duration_ms: 1,
  };
}

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "audit-sink-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function readIds(file: string): string[] {
  return fs
    .readFileSync(file, "utf8")
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => (JSON.parse(line) as AuditRecord).connection_id);
}

/** Creates a logger that keeps the message of each log line, to count what the sink logged. */
function capturingLogger(): { logger: pino.Logger; messages: string[] } {
  const messages: string[] = [];
  const logger = pino({ level: "info" }, { write: (line: string) => messages.push((JSON.parse(line) as { msg: string }).msg) });
  return { logger, messages };
}

test("format puts time first, one line", (t) => {
  const { time, ...rest } = record(1);
  const line = formatAuditLine({ ...rest, time } as AuditRecord);
  t.true(line.startsWith(`{"time":"${time}",`));
  t.false(line.includes("\n"));
  t.deepEqual(JSON.parse(line), record(1));
});

test("format omits absent fields", (t) => {
  const line = formatAuditLine(record(2));
  t.false(line.includes('"policy":'));
  t.false(line.includes('"error":'));
});

test("write and flush append lines", async (t) => {
  const file = path.join(tempDir(t), "nested", "folder", "audit.log");
  const sink = new AuditFileSink(file, silentLogger());
  for (let index = 0; index < 100; index += 1) sink.write(record(index));
  await sink.flush();
  t.deepEqual(readIds(file), Array.from({ length: 100 }, (_, index) => `c${index}`));
  await sink.close();
});

test("new sink appends to existing file", async (t) => {
  const file = path.join(tempDir(t), "audit.log");
  const first = new AuditFileSink(file, silentLogger());
  first.write(record(1));
  await first.close();
  const second = new AuditFileSink(file, silentLogger());
  second.write(record(2));
  await second.close();
  t.deepEqual(readIds(file), ["c1", "c2"]);
});

test("reopen after rotation writes new file", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const sink = new AuditFileSink(file, silentLogger());
  sink.write(record(1));
  await sink.flush();
  fs.renameSync(file, path.join(dir, "audit.log.1"));
  sink.write(record(2));
  await sink.flush();
  await sink.reopen();
  sink.write(record(3));
  await sink.close();
  t.deepEqual(readIds(path.join(dir, "audit.log.1")), ["c1"]);
  t.deepEqual(readIds(file), ["c2", "c3"]);
});

test("deleted folder is recreated", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "logs", "audit.log");
  const sink = new AuditFileSink(file, silentLogger());
  sink.write(record(1));
  await sink.flush();
  fs.rmSync(path.join(dir, "logs"), { recursive: true });
  sink.write(record(2));
  await sink.flush();
  t.deepEqual(readIds(file), ["c2"]);
  await sink.close();
});

test("failure then recovery keeps order", async (t) => {
  const dir = tempDir(t);
  const blocker = path.join(dir, "logs");
  fs.writeFileSync(blocker, "a file where the folder should be");
  const file = path.join(blocker, "audit.log");
  const { logger, messages } = capturingLogger();
  const sink = new AuditFileSink(file, logger, { initialRetryDelayMs: 10, maxRetryDelayMs: 40 });

  for (let index = 0; index < 50; index += 1) sink.write(record(index));
  const flushed = sink.flush();
  await new Promise((resolve) => setTimeout(resolve, 200));
  for (let index = 50; index < 100; index += 1) sink.write(record(index));
  fs.rmSync(blocker);
  await flushed;
  await sink.flush();

  t.deepEqual(readIds(file), Array.from({ length: 100 }, (_, index) => `c${index}`));
  t.is(messages.filter((message) => message.startsWith("writing audit records failed")).length, 1);
  t.is(messages.filter((message) => message === "writing audit records works again").length, 1);
  await sink.close();
});

test("flush waits while writes fail", async (t) => {
  const dir = tempDir(t);
  const blocker = path.join(dir, "logs");
  fs.writeFileSync(blocker, "");
  const sink = new AuditFileSink(path.join(blocker, "audit.log"), silentLogger(), { initialRetryDelayMs: 10, maxRetryDelayMs: 20 });
  sink.write(record(1));
  const outcome = await Promise.race([sink.flush().then(() => "flushed"), new Promise((resolve) => setTimeout(() => resolve("waiting"), 150))]);
  t.is(outcome, "waiting");
  fs.rmSync(blocker);
  await sink.flush();
  t.deepEqual(readIds(path.join(blocker, "audit.log")), ["c1"]);
  await sink.close();
});

test("close gives up after timeout", async (t) => {
  const dir = tempDir(t);
  const blocker = path.join(dir, "logs");
  fs.writeFileSync(blocker, "");
  const { logger, messages } = capturingLogger();
  const sink = new AuditFileSink(path.join(blocker, "audit.log"), logger, { initialRetryDelayMs: 10, closeTimeoutMs: 100 });
  sink.write(record(1));
  await sink.close();
  t.true(messages.includes("audit sink closed before every record could be written"));
  sink.write(record(2));
  t.true(messages.includes("audit record written after the sink was closed; record dropped"));
});

test("batch waits for delay unless flushed", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const sink = new AuditFileSink(file, silentLogger(), { batchDelayMs: 60_000 });
  sink.write(record(1));
  sink.write(record(2));
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.false(fs.existsSync(file), "the writer started before batchDelayMs");

  const started = Date.now();
  await sink.flush();
  t.true(Date.now() - started < 5_000, "flush() waited for batchDelayMs");
  t.deepEqual(readIds(file), ["c1", "c2"]);
  await sink.close();
});
