// The syslog sink against a real rsyslogd on 127.0.0.1, over plain TCP and over TLS: records
// arrive whole, and none is lost when rsyslog stops or dies while records are sent.

import test, { type ExecutionContext } from "ava";
import crypto from "node:crypto";

import { GENESIS_HASH, sealLine } from "../../agent/audit/chain";
import type { SealedRecord } from "../../agent/audit/record";
import type { SpooledRecord } from "../../agent/audit/sink";
import { SyslogSink, type SyslogSinkOptions } from "../../agent/audit/sinks/syslog";
import { silentLogger } from "../../agent/log";
import { endLeftoverProcesses } from "../harness/pid-registry";
import { RSYSLOG_SERVER_NAME, RsyslogServer, parseStructuredData, type ReceivedMessage } from "../harness/rsyslog";

const PREFIX = "aasyslog";
const NODE = "aasyslog-node";

test.before(() => endLeftoverProcesses(PREFIX));

/** Builds records 1..count of one chain, sealed and spooled as the pipeline does. */
function spooledChain(count: number, firstSeq = 1): SpooledRecord[] {
  const records: SpooledRecord[] = [];
  let prevHash = GENESIS_HASH;
  for (let seq = firstSeq; seq < firstSeq + count; seq++) {
    const id = crypto.randomUUID();
    const event = {
      time: new Date(Date.UTC(2026, 2, 1, 10, 0, 0, seq)).toISOString(),
      type: "connection.completed",
      v: 1,
      seq,
      id,
      node: NODE,
      start: "2026-03-01T09:59:59.000Z",
      connection_id: crypto.randomUUID(),
      direction: "inbound",
      src: { addr: `10.0.0.1:${40000 + (seq % 20000)}`, identity: "spiffe://cluster.local/ns/demo/sa/client", workload: 'quote" and ] and \\' },
      dst: { addr: "10.0.0.2:8080", workload: "wëb", namespace: "demo" },
      transport: "hbone",
      decision: seq % 5 === 0 ? "deny" : "allow",
      reason: seq % 5 === 0 ? "denied_by_policy" : "no_policy",
      established: seq % 5 !== 0,
      bytes_sent: seq,
      bytes_recv: 2 * seq,
      duration_ms: 1.5,
      prev_hash: prevHash,
    };
    const { line, hash } = sealLine(JSON.stringify(event));
    prevHash = hash;
    records.push({ seq, id, line, record: JSON.parse(line) as SealedRecord });
  }
  return records;
}

function sinkOptions(server: RsyslogServer, transport: "tcp" | "tls"): SyslogSinkOptions {
  const common = { host: "127.0.0.1", node: NODE, facility: "authpriv", connectTimeoutMs: 2_000, ackTimeoutMs: 2_000 };
  if (transport === "tcp") return { ...common, port: server.tcpPort };
  return { ...common, port: server.tlsPort, tls: { ca: server.caFile, serverName: RSYSLOG_SERVER_NAME } };
}

async function startServer(t: ExecutionContext): Promise<RsyslogServer> {
  const server = await RsyslogServer.start({ prefix: PREFIX });
  t.teardown(() => server.cleanup());
  return server;
}

/** Keeps the first message of each record id, as a receiver that drops duplicates does. */
function firstOfEachId(messages: ReceivedMessage[]): ReceivedMessage[] {
  const seen = new Set<string>();
  return messages.filter((message) => {
    const id = parseStructuredData(message.structuredData).params.id;
    if (seen.has(id)) return false;
    seen.add(id);
    return true;
  });
}

/** Sends batches in order as the pipeline does: a rejected batch is sent again after a short backoff. */
async function sendWithRetry(sink: SyslogSink, batches: SpooledRecord[][], between: () => Promise<void>): Promise<number> {
  let rejections = 0;
  for (const batch of batches) {
    for (let attempt = 0; ; attempt++) {
      if (attempt > 200) throw new Error(`batch starting at seq ${batch[0].seq} was rejected ${attempt} times`);
      try {
        await sink.send(batch);
        break;
      } catch {
        rejections++;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    await between();
  }
  return rejections;
}

function batchesOf(records: SpooledRecord[], size: number): SpooledRecord[][] {
  const batches: SpooledRecord[][] = [];
  for (let index = 0; index < records.length; index += size) batches.push(records.slice(index, index + size));
  return batches;
}

for (const transport of ["tcp", "tls"] as const) {
  test(`${transport}: batch arrives whole and parses back`, async (t) => {
    const server = await startServer(t);
    const sink = new SyslogSink(sinkOptions(server, transport), silentLogger());
    t.teardown(() => sink.close());
    t.is(sink.name, `syslog+${transport}://127.0.0.1:${transport === "tcp" ? server.tcpPort : server.tlsPort}`);
    t.is(await sink.open(), undefined);

    const records = spooledChain(100);
    await sink.send(records);
    const messages = await server.waitForMessages((received) => received.length >= records.length);

    t.is(messages.length, records.length);
    for (const [index, message] of messages.entries()) {
      const record = records[index];
      t.is(message.msg, record.line);
      t.deepEqual(JSON.parse(message.msg), record.record);
      t.is(message.pri, 10 * 8 + ((record.record as { decision?: string }).decision === "deny" ? 4 : 6));
      t.is(message.hostname, NODE);
      t.is(message.procId, String(process.pid));
      t.is(message.msgId, "connection.completed");
      t.is(Date.parse(message.timestamp), Date.parse(record.record.time), message.timestamp);
      const sd = parseStructuredData(message.structuredData);
      t.is(sd.sdId, "audit@32473");
      t.deepEqual(sd.params, { id: record.id, seq: String(record.seq), v: "1" });
    }
  });

  test(`${transport}: rsyslog restart loses no record`, async (t) => {
    const server = await startServer(t);
    const sink = new SyslogSink(sinkOptions(server, transport), silentLogger());
    t.teardown(() => sink.close());
    const records = spooledChain(300);
    let sent = 0;
    let restarted: Promise<void> = Promise.resolve();
    const rejections = await sendWithRetry(sink, batchesOf(records, 10), async () => {
      sent++;
      if (sent === 10) {
        await server.stop();
        restarted = new Promise((resolve) => setTimeout(resolve, 2_000)).then(() => server.run());
      }
      await new Promise((resolve) => setTimeout(resolve, 10));
    });

    await restarted;
    const messages = await server.waitForMessages((received) => firstOfEachId(received).length >= records.length, 20_000);
    const unique = firstOfEachId(messages);
    t.true(rejections > 0, "sends were rejected while rsyslog was stopped");
    t.deepEqual(
      unique.map((message) => Number(parseStructuredData(message.structuredData).params.seq)),
      records.map((record) => record.seq),
    );
    t.deepEqual(
      unique.map((message) => message.msg),
      records.map((record) => record.line),
    );
  });

  test(`${transport}: acknowledged but unread records are replayed`, async (t) => {
    const server = await startServer(t);
    const sink = new SyslogSink(sinkOptions(server, transport), silentLogger());
    t.teardown(() => sink.close());
    const records = spooledChain(60);

    await sink.send(records.slice(0, 20));
    await server.waitForMessages((received) => received.length >= 20);
    await server.pause();
    // The frozen receiver's kernel still acknowledges these bytes, so send() resolves.
    await sink.send(records.slice(20, 40));
    await server.kill();
    await server.run();
    await sendWithRetry(sink, [records.slice(40, 60)], async () => undefined);

    const messages = await server.waitForMessages((received) => firstOfEachId(received).length >= records.length);
    t.deepEqual(
      firstOfEachId(messages).map((message) => message.msg),
      records.map((record) => record.line),
    );
  });
}

test("without replay window, a killed receiver loses records", async (t) => {
  const server = await startServer(t);
  const sink = new SyslogSink({ ...sinkOptions(server, "tcp"), replayWindowMs: 0 }, silentLogger());
  t.teardown(() => sink.close());
  const records = spooledChain(60);

  await sink.send(records.slice(0, 20));
  await server.waitForMessages((received) => received.length >= 20);
  await server.pause();
  await sink.send(records.slice(20, 40));
  await server.kill();
  await server.run();
  await sendWithRetry(sink, [records.slice(40, 60)], async () => undefined);

  const messages = await server.waitForMessages((received) => received.some((message) => message.msg === records[59].line));
  const seqs = new Set(firstOfEachId(messages).map((message) => Number(parseStructuredData(message.structuredData).params.seq)));
  t.false(seqs.has(30), "a record written while the receiver was frozen is lost");
});

test("send rejects when nothing listens", async (t) => {
  const server = await startServer(t);
  await server.stop();
  const sink = new SyslogSink(sinkOptions(server, "tcp"), silentLogger());
  t.teardown(() => sink.close());
  const error = await t.throwsAsync(sink.send(spooledChain(1)));
  t.regex(error?.message ?? "", /ECONNREFUSED/);
  t.is((error as { code?: string }).code, "AUDIT_SINK_FAILED");
});

test("tls rejects a receiver with the wrong name", async (t) => {
  const server = await startServer(t);
  const sink = new SyslogSink({ ...sinkOptions(server, "tls"), tls: { ca: server.caFile, serverName: "other.example" } }, silentLogger());
  t.teardown(() => sink.close());
  const error = await t.throwsAsync(sink.send(spooledChain(1)));
  t.regex(error?.message ?? "", /TLS handshake failed/);
});
