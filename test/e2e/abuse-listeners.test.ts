// End to end on the real kernel: hostile clients on every listener of the agent. The cases are slow
// writers and readers on 15001, 15006 and 15008, and headers trickled to the admin, metrics and
// readiness servers. Others open more connections from one address than those servers take, or
// dial a proxy port or the agent's own ports, and a pod reaches for the admin API.
//
// Every test checks three outcomes: both agents still run and their readiness returns 200, a
// transfer between two other pods over HBONE arrived byte-exact while the abuse ran, and the
// agent recorded the refusal (an audit record with the reason, and a higher
// ambient_agent_refused_connections_total{listener,reason}).
//
// The agents run with short limits so that the file stays short: --idle-timeout 2,
// --handshake-timeout 2 and --max-connections-per-peer 8. The HTTP servers' own limits are
// fixed: 5 s for a request's headers (then 408, recorded with reason request_timeout), 8
// connections per remote address.
//
// What a pod may reach of the agent: GET /metrics and /stats/prometheus on the node's address at
// 15020, and GET /healthz/ready at 15021 with only `ready`, `checks` and `stopping`. Both reject
// every other method with 405. The admin API (15000) listens on the loopback address of the
// agent's network namespace, which no pod reaches.

// The pod network of this file. The topology reads it when the harness loads, so it is set before the imports.
process.env.AA_TEST_POD_NET ??= "10.234";

import test, { type ExecutionContext } from "ava";
import { AbuseCluster, assertBlobReceived, curlInNetns, sleep, type ServedBlob } from "../harness/abuse";
import { testPrefixFamily } from "../harness/agent-process";
import { startSlowClient } from "../harness/slow-client";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aaslo");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aaslo-n1";
const SERVER_NODE = "aaslo-n2";
const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "client", namespace: "slo", serviceAccount: "client" },
      { name: "pa", namespace: "slo", serviceAccount: "pa" },
      { name: "outsider", namespace: "plain", serviceAccount: "default" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "server", namespace: "slo", serviceAccount: "server" },
      { name: "pb", namespace: "slo", serviceAccount: "pb" },
    ],
  },
];
const ENROLLED = ["client", "pa", "server", "pb"];
const IDLE_TIMEOUT_S = 2;
const HANDSHAKE_TIMEOUT_S = 2;
const PER_PEER_LIMIT = 8;
/** The admin, metrics and readiness servers' fixed limits (agent/admin/server.ts). */
const SERVER_PER_SOURCE_LIMIT = 8;
const SERVER_HEADERS_TIMEOUT_MS = 5_000;
/** Port of the server pod's reading sink, and of its sink that accepts and never reads. */
const DRAIN_PORT = 9001;
const NEVER_READ_PORT = 9002;
const BLOB_SIZE = 4 * 1024 * 1024;
/** The agent's memory may grow by this much while a destination that never reads is flooded. */
const RSS_GROWTH_LIMIT = 64 * 1024 * 1024;
const REQUEST = "GET /metrics HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n";

const abuse = new AbuseCluster();
let blob: ServedBlob;

/** A refusal an abuse test expects: on which node, counted under which listener and reason, and the audit record that shows it. */
interface ExpectedRefusal {
  node: string;
  listener: string;
  reason: string;
  /** The audit record type: connection.refused, or connection.completed for a limit that closed a recorded connection. */
  type: "connection.refused" | "connection.completed";
  record: (record: Record<string, any>) => boolean;
}

/**
 * Runs `run` while pod pa fetches a blob from pod pb over HBONE, then checks the three outcomes:
 * both agents run and are ready, the blob arrived byte-exact, and at least one of `expected` was
 * recorded and counted. Returns what `run` returned.
 */
async function checkAbuse<T>(t: ExecutionContext, expected: ExpectedRefusal[], run: () => Promise<T>): Promise<T> {
  const before = await Promise.all(expected.map((refusal) => abuse.refusedTotal(refusal.node, refusal.listener, refusal.reason)));
  const running = run();
  const transfer = await abuse.fetchBlob("pa", "pb", blob);
  const result = await running;

  assertBlobReceived(t, transfer, blob, "the transfer between pa and pb during the abuse");
  await abuse.assertAgentsServe(t, [CLIENT_NODE, SERVER_NODE]);
  await waitRecorded(t, expected, before);
  return result;
}

/** Waits up to 15 s for one of `expected` to show in the audit file with its counter above `before`. */
async function waitRecorded(t: ExecutionContext, expected: ExpectedRefusal[], before: number[]): Promise<void> {
  const c = abuse.cluster;
  const deadline = Date.now() + 15_000;
  for (;;) {
    for (const [index, refusal] of expected.entries()) {
      const record = c.auditRecords(refusal.node, refusal.type).find(refusal.record);
      if (record === undefined) continue;
      const after = await abuse.refusedTotal(refusal.node, refusal.listener, refusal.reason);
      if (after <= before[index]) continue;
      t.pass(`${refusal.node} recorded ${refusal.listener}/${refusal.reason} and counted ${after - before[index]}`);
      return;
    }
    if (Date.now() > deadline) {
      const latest = expected.map((refusal) => `${refusal.node} ${refusal.type}: ${JSON.stringify(c.auditRecords(refusal.node, refusal.type).slice(-3))}`);
      t.fail(`none of ${expected.map((refusal) => `${refusal.node} ${refusal.listener}/${refusal.reason}`).join(", ")} was recorded and counted; latest records:\n${latest.join("\n")}`);
      return;
    }
    await sleep(200);
  }
}

/** Tells whether a completed connection ended with `code`. */
function endedWith(code: string): (record: Record<string, any>) => boolean {
  return (record) => record.error?.code === code;
}

function refusedFor(reason: string, listener: string, match: (record: Record<string, any>) => boolean = () => true): (record: Record<string, any>) => boolean {
  return (record) => record.reason === reason && record.listener === listener && match(record);
}

function srcIp(record: Record<string, any>): string {
  return String(record.src?.addr ?? "").replace(/:\d+$/, "");
}

test.before(async () => {
  const options = {
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "slo", ambient: true },
      { name: "plain", ambient: false },
    ],
    agentArgs: [
      "--idle-timeout", String(IDLE_TIMEOUT_S),
      "--handshake-timeout", String(HANDSHAKE_TIMEOUT_S),
      "--max-connections-per-peer", String(PER_PEER_LIMIT),
    ],
    agentLogLevel: "info",
  };
  await abuse.start(PREFIX_FAMILY, options, async (cluster) => {
    blob = await abuse.serveBlob(["pb"], 8080, BLOB_SIZE);
    abuse.startSinkServer("server", { drainPort: DRAIN_PORT, neverReadPort: NEVER_READ_PORT });
    await cluster.startAgents(ENROLLED);
  });
});

test.after.always(async () => {
  await abuse.destroy();
});

test.serial("15001 trickling writer is closed when idle", async (t) => {
  const payload = "abcdef";
  const summary = await checkAbuse(
    t,
    // Both agents time the same silence, so either may close the connection first.
    [
      { node: CLIENT_NODE, listener: "outbound", reason: "idle_timeout", type: "connection.completed", record: (record) => endedWith("IDLE_TIMEOUT")(record) && record.src.workload === "client" && record.bytes_sent === payload.length },
      { node: SERVER_NODE, listener: "inbound", reason: "idle_timeout", type: "connection.completed", record: (record) => endedWith("IDLE_TIMEOUT")(record) && srcIp(record) === abuse.ipOf("client") && record.bytes_sent === payload.length },
    ],
    async () => {
      const run = startSlowClient(abuse.cluster.topology, abuse.netnsOf("client"), ["hold", abuse.ipOf("server"), String(DRAIN_PORT), "1", "400", "10000", payload]);
      return run.done;
    },
  );
  const [connection] = summary.connections;
  t.not(connection.connectedMs, null);
  t.not(connection.closedMs, null, "the idle connection was still open after 10 s");
  t.is(connection.written, payload.length);
});

test.serial("15001 flood to non-reading destination stays bounded", async (t) => {
  const rssBefore = { client: abuse.agentRss(CLIENT_NODE), server: abuse.agentRss(SERVER_NODE) };
  let rssDuring = { client: 0, server: 0 };
  const summary = await checkAbuse(
    t,
    [
      { node: CLIENT_NODE, listener: "outbound", reason: "idle_timeout", type: "connection.completed", record: (record) => endedWith("IDLE_TIMEOUT")(record) && String(record.dst.addr).endsWith(`:${NEVER_READ_PORT}`) },
      { node: SERVER_NODE, listener: "inbound", reason: "idle_timeout", type: "connection.completed", record: (record) => endedWith("IDLE_TIMEOUT")(record) && String(record.dst.addr).endsWith(`:${NEVER_READ_PORT}`) },
    ],
    async () => {
      const run = startSlowClient(abuse.cluster.topology, abuse.netnsOf("client"), ["flood", abuse.ipOf("server"), String(NEVER_READ_PORT), String(1024 * 1024 * 1024), "8000"]);
      await run.connected;
      // Measured once the buffers on the way are full, before the idle timeout closes the connection.
      await sleep(1_500);
      rssDuring = { client: abuse.agentRss(CLIENT_NODE), server: abuse.agentRss(SERVER_NODE) };
      return run.done;
    },
  );
  const [connection] = summary.connections;
  t.true(connection.written >= 4 * 1024 * 1024, `only ${connection.written} bytes were written; the destination did not stall a flood`);
  t.true(connection.written < 1024 * 1024 * 1024, "the never-reading destination took every byte of the flood");
  t.not(connection.closedMs, null, "the stalled connection was still open after 8 s");
  for (const side of ["client", "server"] as const) {
    const growth = rssDuring[side] - rssBefore[side];
    t.log(`${side} node agent: VmRSS ${rssBefore[side]} before, ${rssDuring[side]} during the stall (${connection.written} bytes written)`);
    t.true(growth < RSS_GROWTH_LIMIT, `the ${side} node's agent grew by ${growth} bytes while ${connection.written} bytes waited`);
  }
});

test.serial("15006 trickling client is closed when idle", async (t) => {
  const payload = "abcdef";
  const summary = await checkAbuse(
    t,
    [{ node: SERVER_NODE, listener: "inbound_plaintext", reason: "idle_timeout", type: "connection.completed", record: (record) => endedWith("IDLE_TIMEOUT")(record) && srcIp(record) === abuse.ipOf("outsider") && record.transport === "plaintext" }],
    () => startSlowClient(abuse.cluster.topology, abuse.netnsOf("outsider"), ["hold", abuse.ipOf("server"), String(DRAIN_PORT), "1", "400", "10000", payload]).done,
  );
  const [connection] = summary.connections;
  t.not(connection.closedMs, null, "the idle plaintext connection was still open after 10 s");
  t.is(connection.written, payload.length);
});

test.serial("15006 connections over per-peer limit are refused", async (t) => {
  const extra = 4;
  const summary = await checkAbuse(
    t,
    [{ node: SERVER_NODE, listener: "inbound_plaintext", reason: "connections_per_peer", type: "connection.refused", record: refusedFor("connections_per_peer", "inbound_plaintext", (record) => srcIp(record) === abuse.ipOf("outsider") && record.limit === PER_PEER_LIMIT) }],
    () => startSlowClient(abuse.cluster.topology, abuse.netnsOf("outsider"), ["hold", abuse.ipOf("server"), String(NEVER_READ_PORT), String(PER_PEER_LIMIT + extra), "100", "1500"]).done,
  );
  const refused = summary.connections.filter((connection) => connection.closedMs !== null && connection.closedMs < 1_000);
  t.is(refused.length, extra, `connections closed at once: ${JSON.stringify(summary.connections)}`);
});

test.serial("15008 unfinished TLS handshake is closed", async (t) => {
  // One connection sends nothing; the other trickles the start of a TLS record, a byte every 300 ms.
  const c = abuse.cluster;
  const summaries = await checkAbuse(
    t,
    [{ node: SERVER_NODE, listener: "inbound", reason: "handshake_timeout", type: "connection.refused", record: refusedFor("handshake_timeout", "inbound", (record) => srcIp(record) === abuse.ipOf("outsider")) }],
    () =>
      Promise.all([
        startSlowClient(c.topology, abuse.netnsOf("outsider"), ["hold", abuse.ipOf("server"), "15008", "1", "300", "8000"]).done,
        startSlowClient(c.topology, abuse.netnsOf("outsider"), ["hold", abuse.ipOf("server"), "15008", "1", "300", "8000", "\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc\\x03\\x03" + "r".repeat(40)]).done,
      ]),
  );
  for (const summary of summaries) {
    const [connection] = summary.connections;
    t.not(connection.connectedMs, null);
    t.not(connection.closedMs, null, `a connection to 15008 without a TLS handshake was still open after 8 s: ${JSON.stringify(connection)}`);
    t.true(connection.closedMs! < HANDSHAKE_TIMEOUT_S * 1000 + 4_000, `closed only after ${connection.closedMs} ms`);
  }
});

test.serial("HTTP servers drop slow and excess clients", async (t) => {
  // Pod outsider is outside the mesh, so it reaches the node's metrics and readiness servers directly.
  // The admin API only listens on 127.0.0.1, so a client on 127.0.0.2 in the node's namespace acts as a remote one.
  const c = abuse.cluster;
  const extra = 3;
  const count = String(SERVER_PER_SOURCE_LIMIT + extra);
  const listeners = ["metrics", "readiness", "admin"];
  const timeoutsBefore = await Promise.all(listeners.map((listener) => abuse.refusedTotal(CLIENT_NODE, listener, "request_timeout")));

  const runs = await checkAbuse(
    t,
    [
      { node: CLIENT_NODE, listener: "metrics", reason: "admin_connections", type: "connection.refused", record: refusedFor("admin_connections", "metrics", (record) => srcIp(record) === abuse.ipOf("outsider")) },
    ],
    () =>
      Promise.all([
        startSlowClient(c.topology, abuse.netnsOf("outsider"), ["hold", abuse.nodeAddress(CLIENT_NODE), "15020", count, "300", "9000", REQUEST]).done,
        startSlowClient(c.topology, abuse.netnsOf("outsider"), ["hold", abuse.nodeAddress(CLIENT_NODE), "15021", count, "300", "9000", REQUEST]).done,
        startSlowClient(c.topology, c.topology.node(CLIENT_NODE).netns, ["hold", "127.0.0.1", "15000", count, "300", "9000", REQUEST, "127.0.0.2"]).done,
      ]),
  );

  for (const [index, listener] of listeners.entries()) {
    const connections = runs[index].connections;
    const dropped = connections.filter((connection) => connection.received === 0 && connection.closedMs !== null && connection.closedMs < 1_000);
    const timedOut = connections.filter((connection) => connection.head.startsWith("HTTP/1.1 408"));
    t.is(dropped.length, extra, `${listener}: connections dropped at once: ${JSON.stringify(connections)}`);
    t.is(timedOut.length, SERVER_PER_SOURCE_LIMIT, `${listener}: connections closed with 408: ${JSON.stringify(connections)}`);
    for (const connection of timedOut) t.true(connection.closedMs! < SERVER_HEADERS_TIMEOUT_MS + 3_000, `${listener}: a trickling client held its slot for ${connection.closedMs} ms`);

    const refused = c.auditRecords(CLIENT_NODE, "connection.refused").filter(refusedFor("admin_connections", listener));
    t.true(refused.length > 0, `no admin_connections refusal of the ${listener} server was recorded`);

    // The first 408 of each client address is written at once; the others are folded into a later record.
    const timeoutRecords = c.auditRecords(CLIENT_NODE, "connection.refused").filter(refusedFor("request_timeout", listener));
    t.true(timeoutRecords.length > 0, `no request_timeout refusal of the ${listener} server was recorded`);
    t.true(timeoutRecords.every((record) => record.limit === SERVER_HEADERS_TIMEOUT_MS / 1000), `${listener}: ${JSON.stringify(timeoutRecords)}`);

    const timeoutsAfter = await abuse.refusedTotal(CLIENT_NODE, listener, "request_timeout");
    t.true(timeoutsAfter - timeoutsBefore[index] >= timedOut.length, `${listener}: ${timedOut.length} clients got 408, the counter rose by ${timeoutsAfter - timeoutsBefore[index]}`);
  }

  // The slots are free again.
  t.is((await curlInNetns(abuse.netnsOf("outsider"), [`http://${abuse.nodeAddress(CLIENT_NODE)}:15020/metrics`])).status, 200);
  t.is((await curlInNetns(c.topology.node(CLIENT_NODE).netns, ["--interface", "127.0.0.2", "http://127.0.0.1:15000/healthz/ready"])).status, 200);
});

test.serial("pod reaches only metrics and readiness", async (t) => {
  // The client pod is enrolled: its connections to the node's address pass its outbound proxy (15001).
  const c = abuse.cluster;
  const node = abuse.nodeAddress(CLIENT_NODE);
  await checkAbuse(
    t,
    [{ node: CLIENT_NODE, listener: "metrics", reason: "admin_connections", type: "connection.refused", record: refusedFor("admin_connections", "metrics", (record) => srcIp(record) === abuse.ipOf("client")) }],
    async () => {
      const admin = await curlInNetns(abuse.netnsOf("client"), [`http://${node}:15000/healthz/ready`]);
      t.is(admin.status, 0, `a pod reached the admin API on the node's address: ${admin.body}`);
      const loopback = await curlInNetns(abuse.netnsOf("client"), ["http://127.0.0.1:15000/healthz/ready"]);
      t.is(loopback.status, 0, "the pod's own loopback served an admin API");
      const outsider = await curlInNetns(abuse.netnsOf("outsider"), [`http://${node}:15000/healthz/ready`]);
      t.is(outsider.status, 0, "a pod outside the mesh reached the admin API");

      const metrics = await curlInNetns(abuse.netnsOf("client"), [`http://${node}:15020/metrics`]);
      t.is(metrics.status, 200);
      t.regex(metrics.body, /ambient_agent_/);
      const post = await curlInNetns(abuse.netnsOf("client"), ["-X", "POST", `http://${node}:15020/logging?level=debug`]);
      t.is(post.status, 405, "the metrics server took a POST");
      const dump = await curlInNetns(abuse.netnsOf("client"), [`http://${node}:15020/config_dump`]);
      t.is(dump.status, 404, "the metrics server served an admin route");
      const ready = await curlInNetns(abuse.netnsOf("client"), [`http://${node}:15021/healthz/ready`]);
      t.is(ready.status, 200);
      t.deepEqual(Object.keys(JSON.parse(ready.body)).sort(), ["checks", "ready"]);

      // More connections through 15001 to the metrics server than it takes from one address.
      return startSlowClient(c.topology, abuse.netnsOf("client"), ["hold", node, "15020", String(SERVER_PER_SOURCE_LIMIT + 2), "100", "1500"]).done;
    },
  );
  const failed = c.auditRecords(CLIENT_NODE).find((record) => record.dst?.addr === `${node}:15000` && record.src.workload === "client");
  t.is(failed?.error?.code, "UPSTREAM_CONNECT_FAILED", "the outbound proxy did not record the refused connect to the admin port");
});

test.serial("proxy ports as destination are refused", async (t) => {
  const c = abuse.cluster;
  const targets = [
    ...[15001, 15006, 15008].map((port) => ({ pod: "client", url: `http://${abuse.ipOf("server")}:${port}/` })),
    ...[15001, 15006, 15008].map((port) => ({ pod: "client", url: `http://${abuse.ipOf("client")}:${port}/` })),
    ...[15001, 15006].map((port) => ({ pod: "outsider", url: `http://${abuse.ipOf("server")}:${port}/` })),
  ];
  const outcomes = await checkAbuse(
    t,
    [
      { node: CLIENT_NODE, listener: "outbound", reason: "proxy_port_target", type: "connection.refused", record: refusedFor("proxy_port_target", "outbound", (record) => record.dst?.addr === `${abuse.ipOf("server")}:15008`) },
    ],
    () => Promise.all(targets.map((target) => curlInNetns(abuse.netnsOf(target.pod), [target.url]).then((outcome) => ({ ...target, ...outcome })))),
  );
  for (const outcome of outcomes) t.is(outcome.status, 0, `${outcome.pod} got a response from ${outcome.url}: ${outcome.body}`);
  for (const port of [15001, 15006, 15008]) {
    const recorded = c.auditRecords(CLIENT_NODE, "connection.refused").some(refusedFor("proxy_port_target", "outbound", (record) => record.dst?.addr === `${abuse.ipOf("server")}:${port}`));
    t.true(recorded, `no proxy_port_target refusal for ${abuse.ipOf("server")}:${port}`);
  }
  // The pod's own proxy ports are not captured: its connections meet the listeners directly.
  const refusedOnClientNode = c.auditRecords(CLIENT_NODE, "connection.refused");
  t.true(refusedOnClientNode.some(refusedFor("proxy_port_target", "inbound_plaintext", (record) => record.dst?.addr === `${abuse.ipOf("client")}:15006`)), "no refusal of the pod's connection to its own 15006");
  t.true(refusedOnClientNode.some(refusedFor("tls_handshake", "inbound", (record) => record.dst?.addr === `${abuse.ipOf("client")}:15008`)), "no refusal of the pod's plaintext to its own 15008");
  const ownOutbound = await c.waitForAudit(CLIENT_NODE, (record) => record.direction === "outbound" && record.reason === "no_original_destination", 5_000);
  t.is(ownOutbound.decision, "deny");
  const refusedOnServerNode = c.auditRecords(SERVER_NODE, "connection.refused");
  t.true(
    refusedOnServerNode.some(refusedFor("proxy_port_target", "inbound_plaintext", (record) => record.dst?.addr === `${abuse.ipOf("server")}:15006` && srcIp(record) === abuse.ipOf("outsider"))),
    "no refusal of a plaintext client's connection to 15006",
  );
});

/** Logs the agents' refusal records when a test failed, for the investigation. */
test.afterEach.always((t) => {
  if (t.passed || !abuse.created) return;
  for (const node of [CLIENT_NODE, SERVER_NODE]) t.log(`${node} connection.refused: ${JSON.stringify(abuse.cluster.auditRecords(node, "connection.refused").slice(-5))}`);
});
