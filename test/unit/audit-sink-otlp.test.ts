import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import test, { type ExecutionContext } from "ava";
import pino from "pino";
import type { SealedRecord } from "../../agent/audit/record";
import type { SpooledRecord } from "../../agent/audit/sink";
import { MAX_REQUEST_LINE_BYTES, OtlpLogsSink, splitByLineBytes, type OtlpSinkOptions } from "../../agent/audit/sinks/otlp";
import { buildExportRequest, buildLogRecord, severityOf, unixNanoOfTime } from "../../agent/audit/sinks/otlp-mapping";
import { fromAnyValue, toAnyValue } from "../../agent/audit/sinks/otlp-proto";
import { AgentError } from "../../agent/errors";
import { silentLogger } from "../../agent/log";
import { OtlpReceiver, type OtlpReceiverOptions } from "../harness/otlp-receiver";
import { createLeaf, createRoot } from "./cert-fixtures";

const NODE = "node-a";
/** A connection.refused record before sealing. */
const REFUSED = {
  type: "connection.refused",
  time: "2026-03-01T10:00:00Z",
  node: NODE,
  listener: "metrics",
  port: 15020,
  src: { addr: "10.0.0.9:40000" },
  reason: "request_timeout",
  message: "client 10.0.0.9:40000 did not send its request headers within 5 s, the limit of the metrics server",
  limit: 5,
  count: 1,
  first_time: "2026-03-01T10:00:00Z",
};

function completed(seq: number, fields: Record<string, unknown> = {}): SealedRecord {
  return {
    time: "2026-03-01T10:00:00.250Z",
    type: "connection.completed",
    v: 1,
    seq,
    id: crypto.randomUUID(),
    node: NODE,
    start: "2026-03-01T09:59:59.000Z",
    connection_id: `c${seq}`,
    direction: "inbound",
    src: { addr: "10.0.0.1:40000", identity: "spiffe://cluster.local/ns/demo/sa/client" },
    dst: { addr: "10.0.0.2:8080", workload: "web", namespace: "demo" },
    transport: "hbone",
    decision: "allow",
    reason: "allowed_by_policy",
    established: true,
    bytes_sent: seq * 10,
    bytes_recv: 7,
    duration_ms: 1250,
    prev_hash: "0".repeat(64),
    hash: "a".repeat(64),
    ...fields,
  } as SealedRecord;
}

function gap(seq: number): SealedRecord {
  return {
    time: "2026-03-01T10:00:01Z",
    type: "audit.gap",
    node: NODE,
    reason: "queue_full",
    lost: 12,
    first_time: "2026-03-01T10:00:00Z",
    last_time: "2026-03-01T10:00:01Z",
    v: 1,
    seq,
    id: crypto.randomUUID(),
    prev_hash: "0".repeat(64),
    hash: "b".repeat(64),
  };
}

function spooled(record: SealedRecord): SpooledRecord {
  return { seq: record.seq, id: record.id, line: JSON.stringify(record), record };
}

function batchOf(count: number, firstSeq = 1): SpooledRecord[] {
  return Array.from({ length: count }, (_, index) => spooled(completed(firstSeq + index)));
}

/** Creates a logger at debug level that keeps the text of every line it writes. */
function capturingLogger(): { logger: pino.Logger; text: () => string } {
  const raw: string[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => raw.push(line) });
  return { logger, text: () => raw.join("") };
}

async function startReceiver(t: ExecutionContext, options: OtlpReceiverOptions = {}): Promise<OtlpReceiver> {
  const receiver = await OtlpReceiver.start(options);
  t.teardown(() => receiver.stop());
  return receiver;
}

function createSink(t: ExecutionContext, options: Partial<OtlpSinkOptions> & { endpoint: string }, logger = silentLogger()): OtlpLogsSink {
  const sink = new OtlpLogsSink({ node: NODE, ...options }, logger);
  t.teardown(() => sink.close());
  return sink;
}

function tempDir(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "otlp-sink-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function sendUntilAccepted(sink: OtlpLogsSink, batch: SpooledRecord[], deadlineMs: number): Promise<{ attempts: number; errors: string[] }> {
  const errors: string[] = [];
  const deadline = Date.now() + deadlineMs;
  for (let attempts = 1; ; attempts += 1) {
    try {
      await sink.send(batch);
      return { attempts, errors };
    } catch (error) {
      errors.push((error as Error).message);
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

test("mapping sets times, severity, attributes and event name", (t) => {
  const record = spooled(completed(42));
  const logRecord = buildLogRecord(record, "1700000000000000000");

  t.is(logRecord.time_unix_nano, "1772359200250000000");
  t.is(logRecord.observed_time_unix_nano, "1700000000000000000");
  t.is(logRecord.severity_number, 9);
  t.is(logRecord.severity_text, "INFO");
  t.is(logRecord.event_name, "connection.completed");
  t.deepEqual(logRecord.attributes, [
    { key: "log.record.uid", value: { string_value: record.id } },
    { key: "event.name", value: { string_value: "connection.completed" } },
    { key: "audit.seq", value: { int_value: 42 } },
  ]);
  t.deepEqual(fromAnyValue(logRecord.body), record.record);
});

test("mapping severity per record kind", (t) => {
  t.is(severityOf(completed(1)), "INFO");
  t.is(severityOf(completed(1, { decision: "deny", reason: "denied_by_policy" })), "WARN");
  t.is(severityOf(completed(1, { error: { code: "UPSTREAM_CONNECT_FAILED", message: "refused" }, flag: "CONNECT" })), "WARN");
  t.is(severityOf(gap(1)), "ERROR");
  t.is(severityOf({ ...REFUSED, v: 1, seq: 2, id: "y", prev_hash: "", hash: "" } as SealedRecord), "WARN");
  const started = { time: "2026-03-01T10:00:00Z", type: "agent.started", node: NODE, version: "0.1.0", pid: 1, settings: {}, v: 1, seq: 1, id: "x", prev_hash: "", hash: "" };
  t.is(severityOf(started as SealedRecord), "INFO");
});

test("mapping time keeps nanosecond fractions", (t) => {
  t.is(unixNanoOfTime("1970-01-01T00:00:01Z"), "1000000000");
  t.is(unixNanoOfTime("1970-01-01T00:00:01.5Z"), "1500000000");
  t.is(unixNanoOfTime("2026-03-01T10:00:00.123456789Z"), "1772359200123456789");
  t.is(unixNanoOfTime("2026-03-01T11:00:00.000001+01:00"), "1772359200000001000");
  t.is(unixNanoOfTime("not a time"), "0");
});

test("mapping of JSON values to AnyValue", (t) => {
  t.deepEqual(toAnyValue("s"), { string_value: "s" });
  t.deepEqual(toAnyValue(true), { bool_value: true });
  t.deepEqual(toAnyValue(7), { int_value: 7 });
  t.deepEqual(toAnyValue(-3), { int_value: -3 });
  t.deepEqual(toAnyValue(2.5), { double_value: 2.5 });
  t.deepEqual(toAnyValue(2 ** 60), { double_value: 2 ** 60 });
  t.deepEqual(toAnyValue(null), {});
  t.deepEqual(toAnyValue([1, "a"]), { array_value: { values: [{ int_value: 1 }, { string_value: "a" }] } });
  t.deepEqual(toAnyValue({ a: 1, b: undefined }), { kvlist_value: { values: [{ key: "a", value: { int_value: 1 } }] } });
});

test("mapping builds one resource and scope per batch", (t) => {
  const request = buildExportRequest(batchOf(3), NODE);
  t.is(request.resource_logs?.length, 1);
  const resourceLogs = request.resource_logs![0];
  t.deepEqual(resourceLogs.resource?.attributes, [
    { key: "service.name", value: { string_value: "ambient-agent" } },
    { key: "k8s.node.name", value: { string_value: NODE } },
  ]);
  t.is(resourceLogs.scope_logs?.length, 1);
  t.deepEqual(resourceLogs.scope_logs![0].scope, { name: "ambient-agent.audit", version: "1" });
  t.deepEqual(resourceLogs.scope_logs![0].log_records!.map((logRecord) => logRecord.attributes![2].value), [
    { int_value: 1 },
    { int_value: 2 },
    { int_value: 3 },
  ]);
});

test("round trip keeps nested values and types", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address });
  const nested = completed(1, {
    dry_run: [{ policy: "demo/deny-all", rule: 0, decision: "deny" }],
    ratio: 0.75,
    big: 2 ** 40,
    negative: -12,
    flags: [true, false],
    empty_list: [],
    empty_object: {},
    nothing: null,
    unicode: "é ✓ \u0000",
  });
  const batch = [spooled(nested), spooled(gap(2)), spooled(completed(3, { decision: "deny" }))];

  await sink.send(batch);

  t.is(receiver.records.length, 3);
  const [first, second, third] = receiver.records;
  t.deepEqual(first.record, nested as unknown as Record<string, unknown>);
  t.is(JSON.stringify(first.record), batch[0].line);
  t.is(JSON.stringify(second.record), batch[1].line);
  t.is(first.id, nested.id);
  t.is(first.seq, 1);
  t.is(first.type, "connection.completed");
  t.is(first.severityText, "INFO");
  t.is(first.timeUnixNano, "1772359200250000000");
  t.true(BigInt(first.observedTimeUnixNano) >= BigInt(Date.now() - 60_000) * 1_000_000n);
  t.deepEqual(first.resource, { "service.name": "ambient-agent", "k8s.node.name": NODE });
  t.deepEqual(first.scope, { name: "ambient-agent.audit", version: "1" });
  t.deepEqual(first.attributes, { "log.record.uid": nested.id, "event.name": "connection.completed", "audit.seq": 1 });
  t.is(second.type, "audit.gap");
  t.is(second.severity, 17);
  t.is(second.severityText, "ERROR");
  t.is(third.severity, 13);
  t.is(third.severityText, "WARN");
  t.is(receiver.exports.length, 1);
});

test("empty batch makes no call", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address });
  await sink.send([]);
  t.is(receiver.exports.length, 0);
  t.is(await sink.open(), undefined);
  t.is(sink.name, `otlp:${receiver.address}`);
});

test("UNAVAILABLE rejects and resend succeeds", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address });
  const batch = batchOf(5);
  receiver.failNext(1, grpc.status.UNAVAILABLE, "collector overloaded");

  const error = await t.throwsAsync(sink.send(batch));
  t.true(error instanceof AgentError);
  t.is((error as AgentError).code, "AUDIT_SINK_FAILED");
  t.true(error!.message.includes(receiver.address));
  t.true(error!.message.includes("UNAVAILABLE"));
  t.true(error!.message.includes("seq 1-5"));

  await sink.send(batch);
  t.is(receiver.records.length, 5);
  t.is(receiver.duplicateCount(), 0);
  t.deepEqual(receiver.uniqueRecords().map((record) => record.id), batch.map((record) => record.id));
});

test("RESOURCE_EXHAUSTED and INTERNAL reject", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address });
  receiver.failNext(1, grpc.status.RESOURCE_EXHAUSTED);
  receiver.failNext(1, grpc.status.INTERNAL);

  const exhausted = await t.throwsAsync(sink.send(batchOf(1)));
  t.true(exhausted!.message.includes("RESOURCE_EXHAUSTED"));
  const internal = await t.throwsAsync(sink.send(batchOf(1)));
  t.true(internal!.message.includes("INTERNAL"));
  t.is(receiver.records.length, 0);
});

test("deadline exceeded rejects within timeout", async (t) => {
  const receiver = await startReceiver(t);
  // The deadline leaves room for a loaded machine, and the delayed reply comes far later.
  const sink = createSink(t, { endpoint: receiver.address, timeoutMs: 1_500 });
  const batch = batchOf(2);
  await sink.send(batchOf(1, 100));
  receiver.delayNext(6_000);

  const started = Date.now();
  const error = await t.throwsAsync(sink.send(batch));
  t.true(error!.message.includes("DEADLINE_EXCEEDED"));
  t.true(Date.now() - started < 5_000, "the send waited for the late reply instead of its deadline");

  // The late call still lands at the receiver, so the resend is a duplicate that de-dup removes.
  await sink.send(batch);
  await receiver.waitForUnique(3, 10_000);
  const lateReplyDeadline = Date.now() + 15_000;
  while (receiver.records.length < 5 && Date.now() < lateReplyDeadline) await new Promise((resolve) => setTimeout(resolve, 50));
  t.is(receiver.uniqueRecords().length, 3);
  t.is(receiver.duplicateCount(), 2, "the late call did not land");
});

test("partial success resolves and warns", async (t) => {
  const receiver = await startReceiver(t);
  const { logger, text } = capturingLogger();
  const sink = createSink(t, { endpoint: receiver.address }, logger);
  receiver.rejectNext(2, "2 records exceed the attribute limit");

  await sink.send(batchOf(5));

  t.is(receiver.records.length, 3);
  const warnings = text()
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => JSON.parse(line) as { level: number; rejected?: number; message?: string });
  const warning = warnings.find((line) => line.rejected !== undefined);
  t.truthy(warning);
  t.is(warning!.level, 40);
  t.is(warning!.rejected, 2);
  t.is(warning!.message, "2 records exceed the attribute limit");
});

test("receiver outage rejects, restart recovers", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address, timeoutMs: 2_000 });
  await sink.send(batchOf(2, 1));
  const port = receiver.port;

  await receiver.stop();
  const outageBatch = batchOf(3, 3);
  const started = Date.now();
  const error = await t.throwsAsync(sink.send(outageBatch));
  t.true(Date.now() - started <= 2_500);
  t.regex(error!.message, /UNAVAILABLE|DEADLINE_EXCEEDED/);

  await receiver.restart();
  t.is(receiver.port, port);
  // grpc-js waits out its reconnect backoff (at most 5 s here) before it dials again.
  const { attempts, errors } = await sendUntilAccepted(sink, outageBatch, 8_000);
  t.true(attempts >= 1);
  for (const message of errors) t.regex(message, /UNAVAILABLE/);
  await sink.send(batchOf(1, 6));

  t.deepEqual(
    receiver.uniqueRecords().map((record) => record.seq),
    [1, 2, 3, 4, 5, 6],
  );
  t.is(receiver.duplicateCount(), 0);
});

test("headers reach receiver as metadata", async (t) => {
  const receiver = await startReceiver(t);
  const { logger, text } = capturingLogger();
  const sink = createSink(t, { endpoint: receiver.address, headers: { Authorization: "Bearer s3cr3t-token", "x-scope-orgid": "tenant-a" } }, logger);
  receiver.failNext(1);

  await t.throwsAsync(sink.send(batchOf(1)));
  await sink.send(batchOf(1));

  for (const call of receiver.exports) {
    t.deepEqual(call.metadata.authorization, ["Bearer s3cr3t-token"]);
    t.deepEqual(call.metadata["x-scope-orgid"], ["tenant-a"]);
  }
  t.is(receiver.exports.length, 2);
  t.true(text().length > 0);
  t.false(text().includes("s3cr3t"));
});

test("invalid settings throw without header values", (t) => {
  const logger = silentLogger();
  const badEndpoint = t.throws(() => new OtlpLogsSink({ endpoint: "collector", node: NODE }, logger));
  t.is((badEndpoint as AgentError).code, "INVALID_AUDIT_SINK");
  t.throws(() => new OtlpLogsSink({ endpoint: "127.0.0.1:70000", node: NODE }, logger));
  t.throws(() => new OtlpLogsSink({ endpoint: "127.0.0.1:4317", node: NODE, timeoutMs: 0 }, logger));

  const badHeader = t.throws(() => new OtlpLogsSink({ endpoint: "127.0.0.1:4317", node: NODE, headers: { authorization: "Bearer x\ny-secret" } }, logger));
  t.is((badHeader as AgentError).code, "INVALID_AUDIT_SINK");
  t.true(badHeader!.message.includes("authorization"));
  t.false(badHeader!.message.includes("y-secret"));

  const halfPair = t.throws(() => new OtlpLogsSink({ endpoint: "127.0.0.1:4317", node: NODE, tls: { cert: "/nonexistent/cert.pem" } }, logger));
  t.true(halfPair!.message.includes("both"));
  const missingCa = t.throws(() => new OtlpLogsSink({ endpoint: "127.0.0.1:4317", node: NODE, tls: { ca: "/nonexistent/ca.pem" } }, logger));
  t.true(missingCa!.message.includes("/nonexistent/ca.pem"));

  const ipv6 = new OtlpLogsSink({ endpoint: "[::1]:4317", node: NODE }, logger);
  t.is(ipv6.name, "otlp:[::1]:4317");
  void ipv6.close();
});

test("split keeps order within byte limit", (t) => {
  const batch = batchOf(5);
  const lineBytes = Buffer.byteLength(batch[0].line);
  const chunks = splitByLineBytes(batch, lineBytes * 2);
  t.deepEqual(chunks.map((chunk) => chunk.map((record) => record.seq)), [[1, 2], [3, 4], [5]]);
  t.deepEqual(splitByLineBytes(batch, 1).map((chunk) => chunk.length), [1, 1, 1, 1, 1]);
  t.is(splitByLineBytes(batch, MAX_REQUEST_LINE_BYTES).length, 1);
  t.deepEqual(splitByLineBytes([], 10), []);
});

test("large batch split under message limit", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address });
  // Five records of about 900 kB make 4.5 MB, above the 4 MiB a grpc-js server accepts in one message.
  const padding = "x".repeat(900_000);
  const batch = Array.from({ length: 5 }, (_, index) => spooled(completed(index + 1, { padding })));

  await sink.send(batch);

  t.is(receiver.exports.length, 3);
  t.deepEqual(receiver.uniqueRecords().map((record) => record.seq), [1, 2, 3, 4, 5]);
  t.is(receiver.uniqueRecords()[4].record.padding, padding);
});

test("chunk that encodes too large is halved", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address });
  // Arrays of -1 take 3 bytes of JSON per element and 13 encoded: 1.8 MB of lines, one chunk by
  // line size, encode to about 8 MB, twice what a grpc-js server accepts in one message.
  const numbers = new Array(60_000).fill(-1);
  const batch = Array.from({ length: 10 }, (_, index) => spooled(completed(index + 1, { numbers })));

  await sink.send(batch);

  t.true(receiver.exports.length >= 3, `${receiver.exports.length} calls`);
  t.deepEqual(receiver.uniqueRecords().map((record) => record.seq), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
});

test("closed sink rejects send", async (t) => {
  const receiver = await startReceiver(t);
  const sink = createSink(t, { endpoint: receiver.address });
  await sink.close();
  const error = await t.throwsAsync(sink.send(batchOf(1)));
  t.true(error!.message.includes("closed"));
  await sink.close();
});

test("TLS with generated CA and client certificate", async (t) => {
  const dir = tempDir(t);
  const root = await createRoot({ name: "otlp-test-root" });
  const serving = await createLeaf(root, { dnsNames: ["collector.test"] });
  const client = await createLeaf(root, { dnsNames: ["agent.test"] });
  const caFile = path.join(dir, "ca.pem");
  const certFile = path.join(dir, "client.pem");
  const keyFile = path.join(dir, "client-key.pem");
  fs.writeFileSync(caFile, root.certPem);
  fs.writeFileSync(certFile, client.chainPem);
  fs.writeFileSync(keyFile, client.keyPem);

  const receiver = await startReceiver(t, { tls: { certChainPem: serving.chainPem, keyPem: serving.keyPem, clientCaPem: root.certPem } });
  const sink = createSink(t, { endpoint: receiver.address, tls: { ca: caFile, cert: certFile, key: keyFile, serverName: "collector.test" } });
  await sink.send(batchOf(2));
  t.is(receiver.uniqueRecords().length, 2);

  const noClientCert = createSink(t, { endpoint: receiver.address, timeoutMs: 3_000, tls: { ca: caFile, serverName: "collector.test" } });
  await t.throwsAsync(noClientCert.send(batchOf(1, 10)), { message: /UNAVAILABLE/ });

  const wrongName = createSink(t, { endpoint: receiver.address, timeoutMs: 3_000, tls: { ca: caFile, cert: certFile, key: keyFile, serverName: "other.test" } });
  await t.throwsAsync(wrongName.send(batchOf(1, 11)), { message: /UNAVAILABLE/ });

  const plaintext = createSink(t, { endpoint: receiver.address, timeoutMs: 3_000 });
  await t.throwsAsync(plaintext.send(batchOf(1, 12)));

  const otherRoot = await createRoot({ name: "otlp-other-root" });
  const otherCaFile = path.join(dir, "other-ca.pem");
  fs.writeFileSync(otherCaFile, otherRoot.certPem);
  const untrusted = createSink(t, { endpoint: receiver.address, timeoutMs: 3_000, tls: { ca: otherCaFile, cert: certFile, key: keyFile, serverName: "collector.test" } });
  await t.throwsAsync(untrusted.send(batchOf(1, 13)), { message: /UNAVAILABLE/ });

  t.deepEqual(receiver.uniqueRecords().map((record) => record.seq), [1, 2]);
});
