// End to end on the real kernel: the proxies' limits. A pod that opens more connections than
// --max-connections-per-pod gets the extra ones refused while another pod's HBONE transfer goes
// on, idle connections through 15001 and 15006 are closed after --idle-timeout, and connections
// to a proxy port are refused. Each refusal must show as an audit record and in
// ambient_agent_refused_connections_total, and both agents must stay up and ready.

// The pod network of this file. The topology reads it when the harness loads, so it is set before the imports.
process.env.AA_TEST_POD_NET ??= "10.232";

import test from "ava";
import { AbuseCluster, assertBlobReceived, type ServedBlob } from "../harness/abuse";
import { testPrefixFamily } from "../harness/agent-process";
import { startSlowClient, type HeldConnection } from "../harness/slow-client";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aalim");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aalim-n1";
const SERVER_NODE = "aalim-n2";
const AGENT_NODES = [CLIENT_NODE, SERVER_NODE];
const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "hog", namespace: "lim", serviceAccount: "hog" },
      { name: "pa", namespace: "lim", serviceAccount: "pa" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "server", namespace: "lim", serviceAccount: "server" },
      { name: "pb", namespace: "lim", serviceAccount: "pb" },
      { name: "outsider", namespace: "plain", serviceAccount: "default" },
    ],
  },
];
const ENROLLED = ["hog", "pa", "server", "pb"];
const PER_POD_LIMIT = 4;
const IDLE_TIMEOUT_S = 2;
/** Port of the reading sink in pods server and outsider. */
const SINK_PORT = 9001;
const BLOB_SIZE = 8 * 1024 * 1024;

const abuse = new AbuseCluster();
let blob: ServedBlob;

/** Runs `hold` of the slow client in a pod: `count` connections to host:port, each writing `payload` a byte every 200 ms. */
function hold(pod: string, host: string, port: number, count: number, durationMs: number, payload = ""): Promise<HeldConnection[]> {
  const args = ["hold", host, String(port), String(count), "200", String(durationMs), payload];
  return startSlowClient(abuse.cluster.topology, abuse.netnsOf(pod), args).done.then((summary) => summary.connections);
}

test.before(async () => {
  const options = {
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "lim", ambient: true },
      { name: "plain", ambient: false },
    ],
    agentArgs: ["--max-connections-per-pod", String(PER_POD_LIMIT), "--idle-timeout", String(IDLE_TIMEOUT_S)],
    agentLogLevel: "info",
  };
  await abuse.start(PREFIX_FAMILY, options, async (cluster) => {
    blob = await abuse.serveBlob(["pb"], 8080, BLOB_SIZE);
    for (const pod of ["server", "outsider"]) abuse.startSinkServer(pod, { drainPort: SINK_PORT });
    await cluster.startAgents(ENROLLED);
  });
});

test.after.always(async () => {
  await abuse.destroy();
});

test.serial("agent.started lists the limits", async (t) => {
  const started = await abuse.cluster.waitForAudit(CLIENT_NODE, () => true, 10_000, "agent.started");
  t.is(started.settings.limits.max_connections_per_pod, PER_POD_LIMIT);
  t.is(started.settings.limits.idle_timeout_ms, IDLE_TIMEOUT_S * 1000);
  t.is(started.settings.limits.max_connections_per_peer, 512);
});

test.serial("pod over its connection limit is refused", async (t) => {
  const c = abuse.cluster;
  const extra = 3;
  const before = await abuse.refusedTotal(CLIENT_NODE, "outbound", "connections_per_pod");
  // 30 bytes at one per 200 ms keep the held connections busy for 6 s, past the idle timeout.
  const held = hold("hog", abuse.ipOf("server"), SINK_PORT, PER_POD_LIMIT + extra, 5_000, "x".repeat(30));
  const transfer = await abuse.fetchBlob("pa", "pb", blob);
  const connections = await held;

  assertBlobReceived(t, transfer, blob, "the transfer between pa and pb while hog was refused");
  const closed = connections.filter((connection) => connection.closedMs !== null);
  t.is(closed.length, extra, `connections the agent closed: ${JSON.stringify(connections)}`);
  t.true(
    connections.every((connection) => connection.connectedMs !== null),
    "a connect failed: capture should accept it and the agent refuse it",
  );

  const record = await c.waitForAudit(
    CLIENT_NODE,
    (entry) => entry.reason === "connections_per_pod" && entry.listener === "outbound" && entry.src.workload === "hog",
    10_000,
    "connection.refused",
  );
  t.is(record.port, 15001);
  t.is(record.limit, PER_POD_LIMIT);
  t.is(record.dst.addr, `${abuse.ipOf("server")}:${SINK_PORT}`);
  t.regex(record.message, /--max-connections-per-pod/);
  t.true(record.count >= 1);
  t.is((await abuse.refusedTotal(CLIENT_NODE, "outbound", "connections_per_pod")) - before, extra);
  await abuse.assertAgentsServe(t, AGENT_NODES);
});

test.serial("idle connections are closed", async (t) => {
  const c = abuse.cluster;
  const before = {
    outbound: await abuse.refusedTotal(CLIENT_NODE, "outbound", "idle_timeout"),
    plaintext: await abuse.refusedTotal(SERVER_NODE, "inbound_plaintext", "idle_timeout"),
  };
  // 15001 passthrough (outsider is outside the mesh) and 15006 plaintext, each sending 5 bytes, then silent.
  const [outbound, plaintext] = await Promise.all([
    hold("pa", abuse.ipOf("outsider"), SINK_PORT, 1, 10_000, "hello"),
    hold("outsider", abuse.ipOf("server"), SINK_PORT, 1, 10_000, "hello"),
  ]);
  t.not(outbound[0].closedMs, null, "the idle connection through 15001 was still open after 10 s");
  t.not(plaintext[0].closedMs, null, "the idle connection through 15006 was still open after 10 s");

  const outboundRecord = await c.waitForAudit(CLIENT_NODE, (entry) => entry.src.workload === "pa" && entry.dst.addr === `${abuse.ipOf("outsider")}:${SINK_PORT}`);
  t.is(outboundRecord.error?.code, "IDLE_TIMEOUT");
  t.is(outboundRecord.bytes_sent, 5);
  const plaintextRecord = await c.waitForAudit(SERVER_NODE, (entry) => entry.transport === "plaintext" && String(entry.src.addr).startsWith(`${abuse.ipOf("outsider")}:`));
  t.is(plaintextRecord.error?.code, "IDLE_TIMEOUT");
  t.is(plaintextRecord.bytes_sent, 5);
  t.true((await abuse.refusedTotal(CLIENT_NODE, "outbound", "idle_timeout")) > before.outbound);
  t.true((await abuse.refusedTotal(SERVER_NODE, "inbound_plaintext", "idle_timeout")) > before.plaintext);
  await abuse.assertAgentsServe(t, AGENT_NODES);
});

test.serial("proxy ports are never a destination", async (t) => {
  const c = abuse.cluster;
  const runs = await Promise.all([
    hold("hog", abuse.ipOf("server"), 15008, 1, 3_000),
    hold("hog", abuse.ipOf("hog"), 15006, 1, 3_000),
    hold("outsider", abuse.ipOf("server"), 15006, 1, 3_000),
  ]);
  for (const [connection] of runs) t.not(connection.closedMs, null, `a connection to a proxy port stayed open: ${JSON.stringify(connection)}`);

  const refused = (node: string, listener: string, dst: string): Promise<Record<string, any>> =>
    c.waitForAudit(node, (entry) => entry.reason === "proxy_port_target" && entry.listener === listener && entry.dst?.addr === dst, 10_000, "connection.refused");
  const mesh = await refused(CLIENT_NODE, "outbound", `${abuse.ipOf("server")}:15008`);
  t.regex(mesh.message, /a pod in the mesh/);
  // Capture leaves a pod's connections to its own proxy ports alone, so they reach 15006 directly.
  const self = await refused(CLIENT_NODE, "inbound_plaintext", `${abuse.ipOf("hog")}:15006`);
  t.is(self.port, 15006);
  const plaintext = await refused(SERVER_NODE, "inbound_plaintext", `${abuse.ipOf("server")}:15006`);
  t.is(plaintext.src.addr.split(":")[0], abuse.ipOf("outsider"));
  t.true((await abuse.refusedTotal(CLIENT_NODE, "outbound", "proxy_port_target")) >= 1);
  t.true((await abuse.refusedTotal(CLIENT_NODE, "inbound_plaintext", "proxy_port_target")) >= 1);
  t.true((await abuse.refusedTotal(SERVER_NODE, "inbound_plaintext", "proxy_port_target")) >= 1);
  await abuse.assertAgentsServe(t, AGENT_NODES);
});
