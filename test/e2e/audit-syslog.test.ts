// The syslog sink against a real rsyslogd on 127.0.0.1, over plain TCP and over TLS: records
// arrive whole, and none is lost when rsyslog stops or dies while records are sent.

import test, { type ExecutionContext } from "ava";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import pino from "pino";

import { GENESIS_HASH, sealLine } from "../../agent/audit/chain";
import type { SealedRecord } from "../../agent/audit/record";
import type { SpooledRecord } from "../../agent/audit/sink";
import { SyslogSink, type SyslogSinkOptions } from "../../agent/audit/sinks/syslog";
import { formatSyslogMessage, checkSyslogHeader } from "../../agent/audit/sinks/syslog-format";
import { silentLogger } from "../../agent/log";
import { endLeftoverProcesses } from "../harness/pid-registry";
import { RSYSLOG_SERVER_NAME, RsyslogServer, parseOutputLine, parseStructuredData, type ReceivedMessage } from "../harness/rsyslog";

const PREFIX = "aasyslog";
const NODE = "aasyslog-node";

test.before(() => endLeftoverProcesses(PREFIX));

/** Builds records 1..count of one chain, sealed and spooled as the pipeline does. `padding` sets the length of each record's dst.workload. */
function spooledChain(count: number, firstSeq = 1, padding: (seq: number) => number = () => 0): SpooledRecord[] {
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
      dst: { addr: "10.0.0.2:8080", workload: `wëb${"p".repeat(padding(seq))}`, namespace: "demo" },
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

async function startServer(t: ExecutionContext, maxMessageSize?: string): Promise<RsyslogServer> {
  const server = await RsyslogServer.start({ prefix: PREFIX, maxMessageSize });
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

/** Returns every message in rsyslog's output file, whatever its APP-NAME. */
function allMessages(server: RsyslogServer): ReceivedMessage[] {
  if (!fs.existsSync(server.outputFile)) return [];
  return fs
    .readFileSync(server.outputFile, "utf8")
    .split("\n")
    .filter((line) => line !== "")
    .map(parseOutputLine);
}

/** Returns the padding that makes the message of record `seq` of spooledChain exactly `bytes` long. */
function paddingForMessageBytes(seq: number, bytes: number): number {
  const header = checkSyslogHeader({ facility: "authpriv", hostname: NODE, procId: String(process.pid), sdId: "audit@32473" });
  const messageBytes = (padding: number): number => {
    const record = spooledChain(1, seq, () => padding)[0];
    return Buffer.byteLength(formatSyslogMessage(header, record.record, record.line), "utf8");
  };
  return bytes - messageBytes(0);
}

test("oversized record arrives as stand-in at rsyslog's 8k", async (t) => {
  const server = await startServer(t, "8k");
  const logs: { level: number; msg: string; seq?: number; bytes?: number; stand_ins?: number }[] = [];
  const logger = pino({ level: "warn" }, { write: (line: string) => logs.push(JSON.parse(line) as (typeof logs)[number]) });
  const sink = new SyslogSink(sinkOptions(server, "tcp"), logger);
  t.teardown(() => sink.close());
  // seq 2 is a 20 KB record, seq 3 fills the 8192-byte limit exactly, seq 4 is one byte over it.
  const exact = paddingForMessageBytes(3, 8192);
  const paddings: Record<number, number> = { 2: 20_000, 3: exact, 4: exact + 1 };
  const records = spooledChain(5, 1, (seq) => paddings[seq] ?? 0);

  await sink.send(records);
  await server.waitForMessages((received) => received.some((message) => message.msg === records[4].line));
  await new Promise((resolve) => setTimeout(resolve, 300));
  const messages = allMessages(server);

  t.is(messages.length, records.length, `messages with APP-NAMEs ${messages.map((message) => message.appName.slice(0, 20)).join(", ")}`);
  t.true(messages.every((message) => message.appName === "ambient-agent"));
  t.is(messages[0].msg, records[0].line);
  t.is(messages[2].msg, records[2].line, "a message of exactly 8192 bytes arrives whole");
  t.is(messages[4].msg, records[4].line);
  for (const index of [1, 3]) {
    const record = records[index];
    const standIn = JSON.parse(messages[index].msg) as Record<string, unknown>;
    t.deepEqual(standIn, {
      time: record.record.time,
      type: record.record.type,
      v: 1,
      seq: record.seq,
      id: record.id,
      node: NODE,
      truncated: true,
      bytes: Buffer.byteLength(record.line, "utf8"),
      hash: record.record.hash,
    });
    t.deepEqual(parseStructuredData(messages[index].structuredData).params, { id: record.id, seq: String(record.seq), v: "1" });
    t.is(messages[index].hostname, NODE);
    t.is(messages[index].msgId, "connection.completed");
  }
  const warnings = logs.filter((line) => line.msg.includes("stand-in"));
  t.is(warnings.length, 1, "the second stand-in within a minute logs no warning");
  t.is(warnings[0].level, 40);
  t.is(warnings[0].seq, 2);
  t.is(warnings[0].bytes, Buffer.byteLength(records[1].line, "utf8"));
});

test("maximum message size below 2048 is rejected", (t) => {
  const error = t.throws(() => new SyslogSink({ host: "127.0.0.1", port: 514, node: NODE, maxMessageBytes: 1024 }, silentLogger()));
  t.is((error as { code?: string }).code, "INVALID_AUDIT_SINK");
  t.regex(error?.message ?? "", /at least 2048/);
});

/** A TCP receiver on 127.0.0.1 that stores the octet-counted frames of each connection with their arrival time. */
class FrameReceiver {
  readonly frames: { connection: number; seq: number; at: number }[] = [];
  private readonly sockets = new Set<net.Socket>();
  private connections = 0;
  private constructor(readonly server: net.Server) {}

  static async start(): Promise<FrameReceiver> {
    const receiver = new FrameReceiver(net.createServer());
    receiver.server.on("connection", (socket) => receiver.accept(socket));
    await new Promise<void>((resolve) => receiver.server.listen(0, "127.0.0.1", resolve));
    return receiver;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Destroys every open connection, as a receiver that restarts does. */
  breakConnections(): void {
    for (const socket of this.sockets) socket.destroy();
  }

  async stop(): Promise<void> {
    this.breakConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  private accept(socket: net.Socket): void {
    const connection = ++this.connections;
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
    socket.on("error", () => undefined);
    let pending = Buffer.alloc(0);
    socket.on("data", (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      for (;;) {
        const space = pending.indexOf(0x20);
        if (space < 0) return;
        const length = Number(pending.subarray(0, space).toString("ascii"));
        if (pending.length < space + 1 + length) return;
        const message = pending.subarray(space + 1, space + 1 + length).toString("utf8");
        pending = pending.subarray(space + 1 + length);
        const seq = Number(/ seq="(\d+)"/.exec(message)?.[1]);
        this.frames.push({ connection, seq, at: Date.now() });
      }
    });
  }
}

/** Polls until `done` holds, for at most 5 s. */
async function waitFor(done: () => boolean): Promise<void> {
  for (let attempt = 0; attempt < 250 && !done(); attempt++) await new Promise((resolve) => setTimeout(resolve, 20));
}

// Serial, so that no other test runs while Date.now is replaced by a clock that only this test advances.
test.serial("replay ends a window after the first write while the receiver flaps", async (t) => {
  const realNow = Date.now;
  let clock = realNow();
  Date.now = () => clock;
  t.teardown(() => {
    Date.now = realNow;
  });
  const receiver = await FrameReceiver.start();
  t.teardown(() => receiver.stop());
  const windowMs = 650;
  const sink = new SyslogSink(
    { host: "127.0.0.1", port: receiver.port, node: NODE, connectTimeoutMs: 2_000, ackTimeoutMs: 2_000, replayWindowMs: windowMs },
    silentLogger(),
  );
  t.teardown(() => sink.close());
  const records = spooledChain(16);

  // One record per connection. On the test's clock, the receiver breaks each connection 150 ms
  // after the previous send. It does so 15 times, for 2.25 s: more than three replay windows.
  for (const record of records) {
    if (record.seq > 1) {
      clock += 150;
      receiver.breakConnections();
    }
    await sendWithRetry(sink, [[record]], async () => undefined);
    await waitFor(() => receiver.frames.some((frame) => frame.seq === record.seq));
  }
  t.log(`seq of the frames on each connection: ${JSON.stringify(receiver.frames.map((frame) => [frame.connection, frame.seq]))}`);

  t.deepEqual([...new Set(receiver.frames.map((frame) => frame.seq))].sort((a, b) => a - b), records.map((record) => record.seq));
  t.true(receiver.frames.filter((frame) => frame.seq === 1).length >= 2, "seq 1 was replayed on a later connection");
  for (const record of records) {
    const copies = receiver.frames.filter((frame) => frame.seq === record.seq);
    const late = copies.filter((frame) => frame.at > copies[0].at + windowMs);
    t.is(late.length, 0, `seq ${record.seq} arrived again ${late.map((frame) => frame.at - copies[0].at).join(", ")} ms after its first write`);
  }
});

test("ack timeout covers a write the receiver never reads", async (t) => {
  // The receiver accepts the connection but never reads, so a write larger than the socket buffers never completes.
  const sockets: net.Socket[] = [];
  const server = net.createServer({ pauseOnConnect: true }, (socket) => sockets.push(socket));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  });
  const ackTimeoutMs = 1_000;
  const port = (server.address() as net.AddressInfo).port;
  const sink = new SyslogSink({ host: "127.0.0.1", port, node: NODE, ackTimeoutMs, maxMessageBytes: 64 * 1024 }, silentLogger());
  t.teardown(() => sink.close());
  // 600 records of about 40 KB: 24 MB, more than the send and receive buffers of a loopback connection hold.
  const records = spooledChain(600, 1, () => 40_000);

  const started = Date.now();
  const outcome = await Promise.race([
    sink.send(records).then(
      () => "resolved",
      (error: Error) => error,
    ),
    new Promise((resolve) => setTimeout(() => resolve("still pending"), ackTimeoutMs + 4_000)),
  ]);
  const elapsed = Date.now() - started;

  t.true(outcome instanceof Error, `send() ${String(outcome)}`);
  t.regex((outcome as Error).message, /did not take and acknowledge the written records within 1000 ms/);
  t.is((outcome as { code?: string }).code, "AUDIT_SINK_FAILED");
  t.true(elapsed < ackTimeoutMs + 1_000, `send() rejected after ${elapsed} ms`);
});
