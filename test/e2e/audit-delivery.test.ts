// End to end on the real kernel: audit records reach their remote sinks with nothing lost. A client
// pod on one node opens a short connection to a server pod on the other node every 50 ms while
// (1) both nodes' OTLP receivers and syslog servers are down for 30 s, (2) the client node's agent
// is killed with SIGKILL and restarted, and (3) it is stopped with SIGTERM and restarted. Each time,
// every record in a node's local file (the spool's first sink) arrives at every remote sink, each
// exactly once after de-duplication by id, and every connection has exactly one completion record,
// after its opened record.

import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { startHttpServer } from "../harness/clients";
import type { LoopConnection, LoopSummary } from "../harness/connection-loop";
import { OtlpReceiverProcess, pickPort } from "../harness/otlp-receiver-process";
import { RsyslogServer, parseOutputLine, parseStructuredData } from "../harness/rsyslog";
import type { NodeSpec } from "../harness/topology";
import { verifyAuditFiles } from "../../agent/audit/verify";

const PREFIX_FAMILY = testPrefixFamily("aaaud");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aaaud-n1";
const SERVER_NODE = "aaaud-n2";
const HTTP_PORT = 8080;
const LOOP_SCRIPT = path.join(__dirname, "..", "harness", "connection-loop.js");
/** How long the agents may take to ship their backlog once the sinks are back (their backoff is at most 30 s). */
const CATCH_UP_MS = 90_000;

const NODES: NodeSpec[] = [
  { name: CLIENT_NODE, pods: [{ name: "client", namespace: "shop", serviceAccount: "client" }] },
  { name: SERVER_NODE, pods: [{ name: "server", namespace: "backend", serviceAccount: "server" }] },
];

interface Sinks {
  otlp: OtlpReceiverProcess;
  syslog: RsyslogServer;
}

let cluster: Cluster | undefined;
const sinks = new Map<string, Sinks>();

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created");
  return cluster;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  const otlpPort = await pickPort();
  const syslogPort = await pickPort();
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "shop", ambient: true },
      { name: "backend", ambient: true },
    ],
    agentArgs: ["--audit-sink", `otlp://127.0.0.1:${otlpPort}`, "--audit-sink", `syslog+tcp://127.0.0.1:${syslogPort}`, "--audit-sink", "stdout"],
  });
  const c = cluster;
  for (const node of [CLIENT_NODE, SERVER_NODE]) {
    const netns = c.topology.node(node).netns;
    const otlp = new OtlpReceiverProcess(c.topology, netns, otlpPort, path.join(c.workDir, `otlp-${node}.jsonl`));
    await otlp.start();
    const syslog = await RsyslogServer.start({ prefix: `${PREFIX}-${node}`, netns, tcpPort: syslogPort });
    sinks.set(node, { otlp, syslog });
  }
  const root = path.join(c.workDir, "site");
  fs.mkdirSync(root, { recursive: true });
  fs.writeFileSync(path.join(root, "index.html"), "ok\n");
  await startHttpServer(c.topology, "server", root, HTTP_PORT);
  await c.startAgents(["client", "server"]);
});

test.after.always(async () => {
  for (const { otlp, syslog } of sinks.values()) {
    await otlp.stop().catch(() => undefined);
    await syslog.cleanup().catch(() => undefined);
  }
  await cluster?.destroy({ removeWorkDir: true });
});

/** Runs the connection loop in the client pod for `durationMs`, one connection per 50 ms. */
function startLoop(durationMs: number): Promise<LoopSummary> {
  const c = theCluster();
  const server = c.topology.pod("server");
  const child = c.topology.spawn(c.topology.pod("client").netns, process.execPath, [LOOP_SCRIPT, server.ip, String(HTTP_PORT), "50", String(durationMs)]);
  let output = "";
  child.stdout!.on("data", (chunk: Buffer) => (output += chunk.toString()));
  return new Promise((resolve, reject) => {
    child.once("exit", (code) => (code === 0 ? resolve(JSON.parse(output) as LoopSummary) : reject(new Error(`the connection loop exited with ${code}`))));
  });
}

/** Reads the records of a node's local audit file. */
function fileRecords(node: string): Record<string, any>[] {
  return theCluster().auditRecords(node, "*");
}

/** Records a syslog server stored, parsed back from the MSG part, with the id of the structured data. */
function syslogRecords(server: RsyslogServer): { id: string; record: Record<string, any> }[] {
  if (!fs.existsSync(server.outputFile)) return [];
  return fs
    .readFileSync(server.outputFile, "utf8")
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => {
      const message = parseOutputLine(line);
      return { id: parseStructuredData(message.structuredData).params.id, record: JSON.parse(message.msg) };
    });
}

/** Waits until every record of the node's file reached both sinks; returns the ids still missing at the deadline. */
async function waitForDelivery(node: string): Promise<{ otlp: string[]; syslog: string[] }> {
  const deadline = Date.now() + CATCH_UP_MS;
  for (;;) {
    const expected = fileRecords(node).map((record) => record.id as string);
    const otlpIds = new Set(sinks.get(node)!.otlp.records().map((record) => record.id));
    const syslogIds = new Set(syslogRecords(sinks.get(node)!.syslog).map((record) => record.id));
    const missing = { otlp: expected.filter((id) => !otlpIds.has(id)), syslog: expected.filter((id) => !syslogIds.has(id)) };
    if ((missing.otlp.length === 0 && missing.syslog.length === 0) || Date.now() > deadline) return missing;
    await sleep(500);
  }
}

/**
 * Checks one node: the local chain is intact, each sink has exactly the file's records after
 * de-duplication, and each connection has one completion record after its opened record.
 */
async function assertDelivered(t: import("ava").ExecutionContext, node: string): Promise<Record<string, any>[]> {
  const missing = await waitForDelivery(node);
  t.deepEqual(missing.otlp, [], `${node}: records missing at the OTLP receiver`);
  t.deepEqual(missing.syslog, [], `${node}: records missing at rsyslog`);

  const report = await verifyAuditFiles([theCluster().auditFile(node)]);
  t.true(report.intact, `${node}: ${JSON.stringify(report.problems.slice(0, 3))}`);
  // No record may carry a certificate, a key or a token (a JWT starts with a base64 JSON object).
  t.notRegex(fs.readFileSync(theCluster().auditFile(node), "utf8"), /-----BEGIN|eyJ[A-Za-z0-9_-]{6,}\.eyJ/);

  const records = fileRecords(node);
  const byId = new Map(records.map((record) => [record.id as string, record]));
  t.is(byId.size, records.length, `${node}: ids in the file are unique`);
  const otlp = sinks.get(node)!.otlp.records();
  const otlpUnique = new Map(otlp.map((received) => [received.id, received]));
  t.is(otlpUnique.size, byId.size, `${node}: the OTLP receiver holds exactly the file's records`);
  for (const [id, received] of otlpUnique) t.is(received.seq, byId.get(id)?.seq, `${node}: OTLP record ${id} has the file's seq`);
  const syslog = syslogRecords(sinks.get(node)!.syslog);
  const syslogUnique = new Map(syslog.map((received) => [received.id, received.record]));
  t.is(syslogUnique.size, byId.size, `${node}: rsyslog holds exactly the file's records`);
  for (const [id, record] of syslogUnique) t.is(record.hash, byId.get(id)?.hash, `${node}: syslog record ${id} is the file's line`);
  t.log(`${node}: ${records.length} records; duplicates resent: OTLP ${otlp.length - otlpUnique.size}, syslog ${syslog.length - syslogUnique.size}`);

  // The harness writes each agent's standard output, where the stdout sink writes, to LOG.stdout.
  // A SIGKILL can cut the line being written; the next agent sends that record again.
  const stdoutIds = new Set<string>();
  let tornLines = 0;
  for (const line of fs.readFileSync(`${theCluster().logFile(node)}.stdout`, "utf8").split("\n")) {
    if (line === "") continue;
    try {
      stdoutIds.add(JSON.parse(line).id as string);
    } catch {
      tornLines += 1;
    }
  }
  t.true(tornLines <= 1, `${node}: ${tornLines} torn lines on stdout, at most one per kill`);
  t.deepEqual([...byId.keys()].filter((id) => !stdoutIds.has(id)), [], `${node}: records missing on stdout`);

  assertOnePerConnection(t, node, [...otlpUnique.values()].map((received) => received.record));
  return records;
}

/** Checks that each connection has one completion record, after its opened record (if any) in seq order. */
function assertOnePerConnection(t: import("ava").ExecutionContext, node: string, records: Record<string, any>[]): void {
  const connections = new Map<string, { opened: number[]; completed: number[] }>();
  for (const record of records) {
    if (record.type !== "connection.opened" && record.type !== "connection.completed") continue;
    const entry = connections.get(record.connection_id) ?? { opened: [], completed: [] };
    (record.type === "connection.opened" ? entry.opened : entry.completed).push(record.seq);
    connections.set(record.connection_id, entry);
  }
  for (const [id, entry] of connections) {
    t.is(entry.completed.length, 1, `${node}: connection ${id} has one completion record`);
    t.true(entry.opened.length <= 1, `${node}: connection ${id} has at most one opened record`);
    if (entry.opened.length === 1) t.true(entry.opened[0] < entry.completed[0], `${node}: connection ${id} opened before it completed`);
  }
}

/** Client connections that succeeded must each have an outbound record on the client node and an inbound one on the server node. */
function assertClientConnectionsRecorded(t: import("ava").ExecutionContext, connections: LoopConnection[], clientRecords: Record<string, any>[], serverRecords: Record<string, any>[]): void {
  const portsOf = (records: Record<string, any>[], direction: string): Set<number> =>
    new Set(
      records
        .filter((record) => record.type === "connection.completed" && record.direction === direction && record.established && !record.error)
        .map((record) => Number(String(record.src.addr).split(":").pop())),
    );
  const outbound = portsOf(clientRecords, "outbound");
  const inbound = portsOf(serverRecords, "inbound");
  const succeeded = connections.filter((connection) => connection.ok);
  t.true(succeeded.length > 0, "some client connections succeeded");
  t.deepEqual(succeeded.filter((connection) => !outbound.has(connection.localPort)).map((connection) => connection.localPort), [], "successful connections without an outbound record");
  t.deepEqual(succeeded.filter((connection) => !inbound.has(connection.localPort)).map((connection) => connection.localPort), [], "successful connections without an inbound record");
}

async function metrics(node: string): Promise<string> {
  const c = theCluster();
  return c.topology.exec(c.topology.node(node).netns, "curl", ["-sS", "http://127.0.0.1:15000/metrics"]);
}

test.serial("sinks down for 30 s lose no record", async (t) => {
  const loop = startLoop(45_000);
  await sleep(5_000);
  for (const { otlp, syslog } of sinks.values()) {
    await otlp.stop();
    await syslog.stop();
  }
  await sleep(30_000);
  for (const { otlp, syslog } of sinks.values()) {
    await otlp.start();
    await syslog.run();
  }
  const summary = await loop;
  t.true(summary.connections.filter((connection) => connection.ok).length > 500, "the client made steady traffic");
  const clientRecords = await assertDelivered(t, CLIENT_NODE);
  const serverRecords = await assertDelivered(t, SERVER_NODE);
  assertClientConnectionsRecorded(t, summary.connections, clientRecords, serverRecords);

  const text = await metrics(CLIENT_NODE);
  const failures = /ambient_agent_audit_sink_failures_total\{sink="otlp:[^"]+"\} (\d+)/.exec(text);
  t.truthy(failures, text);
  t.true(Number(failures![1]) > 0, "the OTLP sink failed while the receiver was down");
  t.regex(text, /ambient_agent_audit_sink_dropped_records_total\{sink="otlp:[^"]+"\} 0\n/);
  t.regex(text, /ambient_agent_audit_queue_dropped_records_total 0\n/);
  t.false(fileRecords(CLIENT_NODE).some((record) => record.type === "audit.gap"), "no gap record");
});

test.serial("agent killed mid-stream loses no record", async (t) => {
  const c = theCluster();
  const loop = startLoop(20_000);
  // A connection held open across the kill gets its completion record from the next agent.
  const server = c.topology.pod("server");
  const holderStartedAt = Date.now();
  const holder = c.topology.spawn(c.topology.pod("client").netns, "python3", [
    "-c",
    `import socket, time\nconnection = socket.create_connection(("${server.ip}", ${HTTP_PORT}))\nprint(connection.getsockname()[1], flush=True)\ntime.sleep(60)`,
  ]);
  const holderPort = await new Promise<number>((resolve) => holder.stdout!.once("data", (chunk: Buffer) => resolve(Number(chunk.toString().trim()))));
  // An earlier connection of the file's runs may have used the same source port, so the record must be newer.
  const opened = await c.waitForAudit(
    CLIENT_NODE,
    (record) => record.src.addr.endsWith(`:${holderPort}`) && Date.parse(record.time) >= holderStartedAt - 1_000,
    10_000,
    "connection.opened",
  );
  await sleep(5_000);
  const killedAt = Date.now();
  await c.agent(CLIENT_NODE).kill();
  await sleep(1_000);
  await c.restartAgent(CLIENT_NODE, ["client"]);
  const restartedAt = Date.now();
  const summary = await loop;

  const clientRecords = await assertDelivered(t, CLIENT_NODE);
  const serverRecords = await assertDelivered(t, SERVER_NODE);
  const starts = clientRecords.filter((record) => record.type === "agent.started");
  t.is(starts[starts.length - 1].previous_stop, "unclean");
  // A connection that ended just before the kill may have had its records only in memory.
  const settled = summary.connections.filter((connection) => connection.endMs < killedAt - 500 || connection.startMs > restartedAt);
  assertClientConnectionsRecorded(t, settled, clientRecords, serverRecords);
  const interrupted = clientRecords.filter((record) => record.error?.code === "AGENT_INTERRUPTED");
  t.log(`connections completed after the restart with AGENT_INTERRUPTED: ${interrupted.length}`);
  for (const record of interrupted) t.true(record.seq > starts[starts.length - 1].seq);
  const held = clientRecords.filter((record) => record.type === "connection.completed" && record.connection_id === opened.connection_id);
  t.is(held.length, 1, "the held connection has one completion record");
  t.is(held[0]?.error?.code, "AGENT_INTERRUPTED");
  t.is(held[0]?.bytes_sent, undefined, "bytes are unknown after a kill");
  holder.kill("SIGKILL");
});

test.serial("agent restarted with SIGTERM loses no record", async (t) => {
  const c = theCluster();
  const loop = startLoop(15_000);
  await sleep(5_000);
  await c.agent(CLIENT_NODE).stop();
  await c.restartAgent(CLIENT_NODE, ["client"]);
  const summary = await loop;

  const clientRecords = await assertDelivered(t, CLIENT_NODE);
  const serverRecords = await assertDelivered(t, SERVER_NODE);
  const starts = clientRecords.filter((record) => record.type === "agent.started");
  t.is(starts[starts.length - 1].previous_stop, "clean");
  const stops = clientRecords.filter((record) => record.type === "agent.stopped");
  t.true(stops.length >= 1);
  assertClientConnectionsRecorded(t, summary.connections, clientRecords, serverRecords);
});
