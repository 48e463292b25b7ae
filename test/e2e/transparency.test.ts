// End to end on the real kernel: source-address transparency of the inbound proxies. Two nodes run
// one real agent each. The application in the server pod replies with the peer address that
// getpeername() gives it, so the test reads which client address the application saw, for an
// HBONE connection from another node and for plaintext through port 15006.

import test from "ava";
import { execFile, execFileSync } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { AgentProcess } from "../harness/agent-process";
import { PacketCapture } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { namespaceYaml, writeManifest, type NamespaceSpec } from "../harness/manifests";
import { registerPid } from "../harness/pid-registry";
import type { NodeSpec } from "../harness/topology";

const execFileAsync = promisify(execFile);

const PREFIX_FAMILY = "aatpx";
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const APP_PORT = 8080;

const NODES: NodeSpec[] = [
  {
    name: "tpx1",
    pods: [
      { name: "client", namespace: "front", serviceAccount: "client" },
      { name: "outsider", namespace: "plain", serviceAccount: "default" },
    ],
  },
  { name: "tpx2", pods: [{ name: "server", namespace: "back", serviceAccount: "server" }] },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "front", ambient: true },
  { name: "back", ambient: true },
  { name: "plain", ambient: false },
];

/** Accepts connections and writes each one's peer address, as getpeername() returns it, then closes it. */
const PEER_SERVER = `
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(64)
while True:
    connection, _ = server.accept()
    try:
        connection.sendall(("%s:%d\\n" % connection.getpeername()).encode())
    except OSError:
        pass
    connection.close()
`;

/**
 * Connects to argv[1]:argv[2] and prints the peer address that getpeername() returns, its own
 * address, and the reply, separated by spaces.
 */
const PEER_CLIENT = `
import socket, sys
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
peer = "%s:%d" % connection.getpeername()
own = "%s:%d" % connection.getsockname()
reply = b""
while True:
    chunk = connection.recv(4096)
    if not chunk:
        break
    reply += chunk
print(peer, own, reply.decode().strip())
`;

interface PeerExchange {
  /** What getpeername() returned in the client. */
  dialled: string;
  /** The client's own address. */
  own: string;
  /** The peer address that the application in the server pod saw. */
  seenByApp: string;
}

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function serverIp(): string {
  return theCluster().topology.pod("server").ip;
}

/** Runs PEER_CLIENT in a pod against the server's application and parses its output. */
async function exchange(pod: string): Promise<PeerExchange> {
  const c = theCluster();
  const { stdout } = await execFileAsync(
    "ip",
    ["netns", "exec", c.topology.pod(pod).netns, "python3", "-c", PEER_CLIENT, serverIp(), String(APP_PORT)],
    { timeout: 15_000 },
  );
  const [dialled, own, seenByApp] = stdout.trim().split(" ");
  return { dialled, own, seenByApp };
}

function ipOf(address: string): string {
  return address.slice(0, address.lastIndexOf(":"));
}

function portOf(address: string): number {
  return Number(address.slice(address.lastIndexOf(":") + 1));
}

/** Returns the IPv4 policy rules of a pod, one per line. */
function rulesOf(pod: string): string {
  const c = theCluster();
  return c.topology.exec(c.topology.pod(pod).netns, "ip", ["-4", "rule", "show"]);
}

function table100Of(pod: string): string {
  const c = theCluster();
  return c.topology.exec(c.topology.pod(pod).netns, "ip", ["-4", "route", "show", "table", "100"]);
}

/** Returns [source port, destination port] of each TCP packet in a capture file. */
function packetPorts(file: string): number[][] {
  return execFileSync("tshark", ["-r", file, "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport"], { encoding: "utf8" })
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => line.split("\t").map(Number));
}

/** Replaces the agent of `node` with one started with `extraArgs`, and waits until it enrolled `pods`. */
async function restartAgentWith(node: string, extraArgs: string[], pods: string[]): Promise<AgentProcess> {
  const c = theCluster();
  await c.agent(node).stop();
  const agent = new AgentProcess({
    node,
    nodeNetns: c.topology.node(node).netns,
    manifestsDir: c.manifestsDir,
    caDir: c.caDir,
    auditFile: c.auditFile(node),
    pinRoot: c.pinRoot(node),
    logFile: c.logFile(node),
    extraArgs,
  });
  c.agents.set(node, agent);
  registerPid(PREFIX, agent.pid);
  await agent.waitReady();
  await c.waitEnrolled(pods);
  return agent;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES });
  const server = cluster.topology.spawn(cluster.topology.pod("server").netns, "python3", ["-c", PEER_SERVER, String(APP_PORT)]);
  const deadline = Date.now() + 10_000;
  while (cluster.topology.exec(cluster.topology.pod("server").netns, "ss", ["-Hltn", `sport = :${APP_PORT}`]).trim() === "") {
    if (server.exitCode !== null) throw new Error(`the peer server exited with code ${server.exitCode}`);
    if (Date.now() > deadline) throw new Error(`the peer server did not listen on ${APP_PORT} within 10 s`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await cluster.startAgents(["client", "server"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("enrolment installs transparent routing", (t) => {
  t.regex(rulesOf("server"), /^32765:\s+from all fwmark 0x1539\/0xffff lookup 100\s*$/m);
  t.regex(table100Of("server"), /^local default dev lo\b/m);
  const c = theCluster();
  const sysctl = c.topology.exec(c.topology.pod("server").netns, "sysctl", ["-n", "net.ipv4.tcp_fwmark_accept"]);
  t.is(sysctl.trim(), "1");
  t.notRegex(rulesOf("outsider"), /0x1539/, "a pod outside the mesh got the rule");
});

test.serial("HBONE app sees the client pod IP", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "server-veth.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node("tpx2").netns, "v-server", pcap);
  let result: PeerExchange;
  try {
    result = await exchange("client");
  } finally {
    await capture.stop();
  }

  t.is(result.dialled, `${serverIp()}:${APP_PORT}`, "getpeername in the client app returns the dialled address");
  t.is(ipOf(result.own), c.topology.pod("client").ip);
  t.is(ipOf(result.seenByApp), c.topology.pod("client").ip);
  const inbound = await c.waitForAudit("tpx2", (record) => record.direction === "inbound" && record.transport === "hbone");
  t.is(inbound.decision, "allow");
  // Had sk_lookup captured the proxy's own connection from the client pod's IP, 15006 would have
  // recorded it as a plaintext connection from that IP.
  const clientIp = c.topology.pod("client").ip;
  t.false(
    c.auditRecords("tpx2").some((record) => record.transport === "plaintext" && String(record.src.addr).startsWith(`${clientIp}:`)),
    "the connection to the application was captured again",
  );
  // The tunnel arrives on 15008; the application's port never appears on the pod's veth, so the
  // application's replies to the client pod's IP stayed in the pod.
  const ports = packetPorts(pcap);
  t.true(ports.some(([source, destination]) => source === 15008 || destination === 15008), "no HBONE packet crossed the server pod's veth");
  t.deepEqual(
    ports.filter(([source, destination]) => source === APP_PORT || destination === APP_PORT),
    [],
    "packets of the application's port crossed the server pod's veth",
  );
});

test.serial("plaintext app sees the outside client IP", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "server-veth-plain.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node("tpx2").netns, "v-server", pcap);
  let result: PeerExchange;
  try {
    result = await exchange("outsider");
  } finally {
    await capture.stop();
  }

  const outsiderIp = c.topology.pod("outsider").ip;
  t.is(result.dialled, `${serverIp()}:${APP_PORT}`);
  t.is(ipOf(result.seenByApp), outsiderIp);
  t.not(portOf(result.seenByApp), portOf(result.own), "the proxy's connection reused the client's port");
  const inbound = await c.waitForAudit("tpx2", (record) => record.transport === "plaintext" && String(record.src.addr).startsWith(`${outsiderIp}:`));
  t.is(inbound.decision, "allow");
  // Every packet on the veth belongs to the client's own connection: none of the application's
  // replies to the proxy's port left the pod.
  const clientPort = portOf(result.own);
  const ports = packetPorts(pcap);
  t.true(ports.length > 0, "no packet crossed the server pod's veth");
  t.deepEqual(
    ports.filter(([source, destination]) => source !== clientPort && destination !== clientPort),
    [],
    "packets of another connection crossed the server pod's veth",
  );
});

test.serial("restart finds the routing in place", async (t) => {
  const agent = await restartAgentWith("tpx2", [], ["server"]);
  const line = await agent.waitForLog((entry) => String(entry.msg).startsWith("transparent-source routing"), 5_000, "the transparent-source log line");
  t.is(line.msg, "transparent-source routing already in place");
  t.is(rulesOf("server").match(/0x1539/g)?.length, 1, "the rule was added twice");
  const result = await exchange("client");
  t.is(ipOf(result.seenByApp), theCluster().topology.pod("client").ip);
});

test.serial("option off: app sees the pod IP", async (t) => {
  await restartAgentWith("tpx2", ["--no-transparent-source"], ["server"]);
  const hbone = await exchange("client");
  t.is(hbone.dialled, `${serverIp()}:${APP_PORT}`);
  t.is(ipOf(hbone.seenByApp), serverIp());
  const plaintext = await exchange("outsider");
  t.is(ipOf(plaintext.seenByApp), serverIp());
});

test.serial("unenrolment removes the routing", async (t) => {
  const c = theCluster();
  await restartAgentWith("tpx2", [], ["server"]);
  t.regex(rulesOf("server"), /0x1539/);
  const agent = c.agent("tpx2");
  const from = agent.lines.length;
  const namespaces = NAMESPACES.map((spec) => (spec.name === "back" ? { ...spec, ambient: false } : spec));
  writeManifest(c.manifestsDir, "namespaces.yaml", namespaces.map(namespaceYaml).join("---\n"));
  await agent.waitForLog((line) => line.msg === "workload unenrolled" && line.workload === "back/server", 15_000, "unenrolment of back/server", from);
  t.notRegex(rulesOf("server"), /0x1539/);
  t.is(table100Of("server").trim(), "");
  // Outside the mesh the application is reached directly, with the client's own address.
  const result = await exchange("outsider");
  t.is(result.seenByApp, result.own);
});
