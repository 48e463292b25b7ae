// End to end on the real kernel: the proxies' limits. A pod that opens more connections than
// --max-connections-per-pod gets the extra ones refused while another pod's HBONE transfer goes
// on, idle connections through 15001 and 15006 are closed after --idle-timeout, and connections
// to a proxy port are refused. Each refusal must show as an audit record and in
// ambient_agent_refused_connections_total, and both agents must stay up and ready.

// The pod network of this file. The topology reads it when the harness loads, so it is set before the imports.
process.env.AA_TEST_POD_NET ??= "10.232";

import test, { type ExecutionContext } from "ava";
import { execFile } from "node:child_process";
import path from "node:path";
import { testPrefixFamily } from "../harness/agent-process";
import { curl, sha256, startHttpServer, writeRandomFile } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { parsePrometheusText, sumOf } from "../harness/prometheus-text";
import { startSlowClient, type HeldConnection } from "../harness/slow-client";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aalim");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aalim-n1";
const SERVER_NODE = "aalim-n2";
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
const METRIC = "ambient_agent_refused_connections_total";

/** Accepts on SINK_PORT and reads every connection until its end, sending nothing back. */
const SINK_SERVER = `
import socketserver
class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        while self.request.recv(65536):
            pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", ${SINK_PORT}), Sink).serve_forever()
`;

let cluster: Cluster | undefined;
let blobSha = "";

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function ipOf(pod: string): string {
  return theCluster().topology.pod(pod).ip;
}

/** Runs `hold` of the slow client in a pod: `count` connections to host:port, each writing `payload` a byte every 200 ms. */
function hold(pod: string, host: string, port: number, count: number, durationMs: number, payload = ""): Promise<HeldConnection[]> {
  const c = theCluster();
  const args = ["hold", host, String(port), String(count), "200", String(durationMs), payload];
  return startSlowClient(c.topology, c.topology.pod(pod).netns, args).done.then((summary) => summary.connections);
}

/** GETs a path of a node's metrics (15020) or readiness (15021) server from inside the node's namespace. */
function getFromNode(node: string, url: string): Promise<{ status: number; body: string }> {
  const netns = theCluster().topology.node(node).netns;
  return new Promise((resolve) => {
    const args = [`--net=/var/run/netns/${netns}`, "--", "curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", url];
    execFile("nsenter", args, { encoding: "utf8", timeout: 10_000 }, (_error, stdout) => {
      const newline = stdout.lastIndexOf("\n");
      resolve({ status: Number(stdout.slice(newline + 1)) || 0, body: stdout.slice(0, Math.max(newline, 0)) });
    });
  });
}

async function refusedCount(node: string, listener: string, reason: string): Promise<number> {
  const response = await getFromNode(node, "http://127.0.0.1:15020/metrics");
  if (response.status !== 200) throw new Error(`GET /metrics of ${node} returned ${response.status}`);
  return sumOf(parsePrometheusText(response.body), METRIC, { listener, reason });
}

/** Checks that both agents still run and that their readiness returns 200. */
async function assertAgentsServe(t: ExecutionContext): Promise<void> {
  const c = theCluster();
  for (const node of [CLIENT_NODE, SERVER_NODE]) {
    t.true(c.agent(node).running, `the agent of ${node} exited:\n${c.agent(node).tail()}`);
    t.is((await getFromNode(node, "http://127.0.0.1:15021/healthz/ready")).status, 200, `the readiness of ${node}`);
  }
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "lim", ambient: true },
      { name: "plain", ambient: false },
    ],
    agentArgs: ["--max-connections-per-pod", String(PER_POD_LIMIT), "--idle-timeout", String(IDLE_TIMEOUT_S)],
    agentLogLevel: "info",
  });
  try {
    const site = path.join(cluster.workDir, "site");
    blobSha = writeRandomFile(path.join(site, "blob.bin"), BLOB_SIZE);
    await startHttpServer(cluster.topology, "pb", site, 8080);
    // The prefix in their command lines lets removeLeftovers() end them after a crashed run.
    for (const pod of ["server", "outsider"]) cluster.topology.spawn(cluster.topology.pod(pod).netns, "python3", ["-c", SINK_SERVER, PREFIX], { stdio: "ignore" });
    await cluster.startAgents(ENROLLED);
  } catch (error) {
    await cluster.destroy({ removeWorkDir: true });
    cluster = undefined;
    throw error;
  }
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("agent.started lists the limits", async (t) => {
  const started = await theCluster().waitForAudit(CLIENT_NODE, () => true, 10_000, "agent.started");
  t.is(started.settings.limits.max_connections_per_pod, PER_POD_LIMIT);
  t.is(started.settings.limits.idle_timeout_ms, IDLE_TIMEOUT_S * 1000);
  t.is(started.settings.limits.max_connections_per_peer, 512);
});

test.serial("pod over its connection limit is refused", async (t) => {
  const c = theCluster();
  const extra = 3;
  const before = await refusedCount(CLIENT_NODE, "outbound", "connections_per_pod");
  // 30 bytes at one per 200 ms keep the held connections busy for 6 s, past the idle timeout.
  const held = hold("hog", ipOf("server"), SINK_PORT, PER_POD_LIMIT + extra, 5_000, "x".repeat(30));
  const transfer = await curl(c.topology, "pa", `http://${ipOf("pb")}:8080/blob.bin`, 30);
  const connections = await held;

  t.is(transfer.exitCode, 0, `the transfer between pa and pb failed while hog was refused: ${transfer.stderr}`);
  t.is(transfer.body.length, BLOB_SIZE);
  t.is(sha256(transfer.body), blobSha);
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
  t.is(record.dst.addr, `${ipOf("server")}:${SINK_PORT}`);
  t.regex(record.message, /--max-connections-per-pod/);
  t.true(record.count >= 1);
  t.is((await refusedCount(CLIENT_NODE, "outbound", "connections_per_pod")) - before, extra);
  await assertAgentsServe(t);
});

test.serial("idle connections are closed", async (t) => {
  const c = theCluster();
  const before = {
    outbound: await refusedCount(CLIENT_NODE, "outbound", "idle_timeout"),
    plaintext: await refusedCount(SERVER_NODE, "inbound_plaintext", "idle_timeout"),
  };
  // 15001 passthrough (outsider is outside the mesh) and 15006 plaintext, each sending 5 bytes, then silent.
  const [outbound, plaintext] = await Promise.all([
    hold("pa", ipOf("outsider"), SINK_PORT, 1, 10_000, "hello"),
    hold("outsider", ipOf("server"), SINK_PORT, 1, 10_000, "hello"),
  ]);
  t.not(outbound[0].closedMs, null, "the idle connection through 15001 was still open after 10 s");
  t.not(plaintext[0].closedMs, null, "the idle connection through 15006 was still open after 10 s");

  const outboundRecord = await c.waitForAudit(CLIENT_NODE, (entry) => entry.src.workload === "pa" && entry.dst.addr === `${ipOf("outsider")}:${SINK_PORT}`);
  t.is(outboundRecord.error?.code, "IDLE_TIMEOUT");
  t.is(outboundRecord.bytes_sent, 5);
  const plaintextRecord = await c.waitForAudit(SERVER_NODE, (entry) => entry.transport === "plaintext" && String(entry.src.addr).startsWith(`${ipOf("outsider")}:`));
  t.is(plaintextRecord.error?.code, "IDLE_TIMEOUT");
  t.is(plaintextRecord.bytes_sent, 5);
  t.true((await refusedCount(CLIENT_NODE, "outbound", "idle_timeout")) > before.outbound);
  t.true((await refusedCount(SERVER_NODE, "inbound_plaintext", "idle_timeout")) > before.plaintext);
  await assertAgentsServe(t);
});

test.serial("proxy ports are never a destination", async (t) => {
  const c = theCluster();
  const runs = await Promise.all([
    hold("hog", ipOf("server"), 15008, 1, 3_000),
    hold("hog", ipOf("hog"), 15006, 1, 3_000),
    hold("outsider", ipOf("server"), 15006, 1, 3_000),
  ]);
  for (const [connection] of runs) t.not(connection.closedMs, null, `a connection to a proxy port stayed open: ${JSON.stringify(connection)}`);

  const refused = (node: string, listener: string, dst: string): Promise<Record<string, any>> =>
    c.waitForAudit(node, (entry) => entry.reason === "proxy_port_target" && entry.listener === listener && entry.dst?.addr === dst, 10_000, "connection.refused");
  const mesh = await refused(CLIENT_NODE, "outbound", `${ipOf("server")}:15008`);
  t.regex(mesh.message, /a pod in the mesh/);
  // Capture leaves a pod's connections to its own proxy ports alone, so they reach 15006 directly.
  const self = await refused(CLIENT_NODE, "inbound_plaintext", `${ipOf("hog")}:15006`);
  t.is(self.port, 15006);
  const plaintext = await refused(SERVER_NODE, "inbound_plaintext", `${ipOf("server")}:15006`);
  t.is(plaintext.src.addr.split(":")[0], ipOf("outsider"));
  t.true((await refusedCount(CLIENT_NODE, "outbound", "proxy_port_target")) >= 1);
  t.true((await refusedCount(CLIENT_NODE, "inbound_plaintext", "proxy_port_target")) >= 1);
  t.true((await refusedCount(SERVER_NODE, "inbound_plaintext", "proxy_port_target")) >= 1);
  await assertAgentsServe(t);
});
