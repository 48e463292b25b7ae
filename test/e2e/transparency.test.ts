// End to end on the real kernel: source-address transparency of the inbound proxies. Two nodes run
// one real agent each, in a dual-stack cluster. The application in the server pod replies with the
// peer address that getpeername() gives it, so the test reads which client address the
// application saw. The cases are an HBONE connection from another node and plaintext through
// port 15006, each over IPv4 and over IPv6.

import test from "ava";
import { execFile, execFileSync } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { AgentProcess, NFTABLES_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { curl, PacketCapture } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { namespaceYaml, writeManifest, type NamespaceSpec } from "../harness/manifests";
import { removeNftState } from "../harness/nft-state";
import { registerPid } from "../harness/pid-registry";
import type { NodeSpec } from "../harness/topology";

const execFileAsync = promisify(execFile);

const PREFIX_FAMILY = testPrefixFamily("aatpx");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const APP_PORT = 8080;
/** Node names differ per capture mode: an agent locks its node name, and nftables keeps state per node name. */
const CLIENT_NODE = NFTABLES_CAPTURE ? "ntpx1" : "tpx1";
const SERVER_NODE = NFTABLES_CAPTURE ? "ntpx2" : "tpx2";

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "client", namespace: "front", serviceAccount: "client" },
      { name: "outsider", namespace: "plain", serviceAccount: "default" },
    ],
  },
  { name: SERVER_NODE, pods: [{ name: "server", namespace: "back", serviceAccount: "server" }] },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "front", ambient: true },
  { name: "back", ambient: true },
  { name: "plain", ambient: false },
];

/**
 * Listens on 0.0.0.0:port and [::]:port, accepts connections and writes each one's peer address,
 * as getpeername() returns it, then closes it.
 */
const PEER_SERVER = `
import selectors, socket, sys
port = int(sys.argv[1])
selector = selectors.DefaultSelector()
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    server.bind((host, port))
    server.listen(64)
    selector.register(server, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        connection, _ = key.fileobj.accept()
        try:
            peer = connection.getpeername()
            connection.sendall(("%s:%d\\n" % (peer[0], peer[1])).encode())
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
peer = "%s:%d" % connection.getpeername()[:2]
own = "%s:%d" % connection.getsockname()[:2]
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
  if (!cluster) throw new Error("the cluster was not created. Fix the first failure above and rerun.");
  return cluster;
}

function serverIp(): string {
  return theCluster().topology.pod("server").ip;
}

function ip6Of(pod: string): string {
  const ip6 = theCluster().topology.pod(pod).ip6;
  if (ip6 === undefined) throw new Error(`pod ${pod} has no IPv6 address`);
  return ip6;
}

/**
 * Runs PEER_CLIENT in a pod against the server's application, at its IPv4 or IPv6 address, and
 * parses its output. Addresses come without brackets, as ip:port.
 */
async function exchange(pod: string, family: 4 | 6 = 4): Promise<PeerExchange> {
  const c = theCluster();
  const server = family === 6 ? ip6Of("server") : serverIp();
  const { stdout } = await execFileAsync(
    "ip",
    ["netns", "exec", c.topology.pod(pod).netns, "python3", "-c", PEER_CLIENT, server, String(APP_PORT)],
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

/** Returns the policy rules of one address family in a pod, one per line. */
function rulesOf(pod: string, family: 4 | 6 = 4): string {
  const c = theCluster();
  return c.topology.exec(c.topology.pod(pod).netns, "ip", [`-${family}`, "rule", "show"]);
}

/**
 * Returns the routes of table 100 in a pod, or "" when the table does not exist: `ip -6` fails
 * for an IPv6 table that was never created.
 */
function table100Of(pod: string, family: 4 | 6 = 4): string {
  const c = theCluster();
  return c.topology.exec(c.topology.pod(pod).netns, "ip", [`-${family}`, "route", "show", "table", "100"], { allowFail: family === 6 });
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
    spoolDir: c.spoolDir(node),
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
  cluster = Cluster.create({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES, dualStack: true });
  const server = cluster.topology.spawn(cluster.topology.pod("server").netns, "python3", ["-c", PEER_SERVER, String(APP_PORT)]);
  const deadline = Date.now() + 10_000;
  const listening = (): number =>
    cluster!.topology.exec(cluster!.topology.pod("server").netns, "ss", ["-Hltn", `sport = :${APP_PORT}`]).trim().split("\n").filter(Boolean).length;
  while (listening() < 2) {
    if (server.exitCode !== null) throw new Error(`the peer server exited with code ${server.exitCode}`);
    if (Date.now() > deadline) throw new Error(`the peer server did not listen on ${APP_PORT} within 10 s`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await cluster.startAgents(["client", "server"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
  removeNftState([CLIENT_NODE, SERVER_NODE]);
});

test.serial("enrolment installs transparent routing", (t) => {
  t.regex(rulesOf("server"), /^32765:\s+from all fwmark 0x1539\/0xffff lookup 100\s*$/m);
  t.regex(table100Of("server"), /^local default dev lo\b/m);
  const c = theCluster();
  const sysctl = c.topology.exec(c.topology.pod("server").netns, "sysctl", ["-n", "net.ipv4.tcp_fwmark_accept"]);
  t.is(sysctl.trim(), "1");
  t.notRegex(rulesOf("outsider"), /0x1539/, "a pod outside the mesh got the rule");
});

test.serial("enrolment installs IPv6 transparent routing", (t) => {
  t.regex(rulesOf("server", 6), /^32765:\s+from all fwmark 0x1539\/0xffff lookup 100\s*$/m);
  t.regex(table100Of("server", 6), /^local default dev lo\b/m);
  t.notRegex(rulesOf("outsider", 6), /0x1539/, "a pod outside the mesh got the IPv6 rule");
});

test.serial("HBONE app sees the client pod IP", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "server-veth.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node(SERVER_NODE).netns, "v-server", pcap);
  let result: PeerExchange;
  try {
    result = await exchange("client");
  } finally {
    await capture.stop();
  }

  t.is(result.dialled, `${serverIp()}:${APP_PORT}`, "getpeername in the client app returns the dialled address");
  t.is(ipOf(result.own), c.topology.pod("client").ip);
  t.is(ipOf(result.seenByApp), c.topology.pod("client").ip);
  const inbound = await c.waitForAudit(SERVER_NODE, (record) => record.direction === "inbound" && record.transport === "hbone");
  t.is(inbound.decision, "allow");
  // Had capture taken the proxy's own connection from the client pod's IP (sk_lookup, or the
  // nftables redirect), 15006 would have recorded it as a plaintext connection from that IP.
  const clientIp = c.topology.pod("client").ip;
  t.false(
    c.auditRecords(SERVER_NODE).some((record) => record.transport === "plaintext" && String(record.src.addr).startsWith(`${clientIp}:`)),
    "the connection to the application was captured again",
  );
  // The tunnel arrives on 15008. The application's port never appears on the pod's veth, so the
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
  const capture = await PacketCapture.start(c.topology, c.topology.node(SERVER_NODE).netns, "v-server", pcap);
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
  const inbound = await c.waitForAudit(SERVER_NODE, (record) => record.transport === "plaintext" && String(record.src.addr).startsWith(`${outsiderIp}:`));
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

test.serial("closed port refuses the proxy at once", async (t) => {
  // The kernel replies with a reset to the proxy's transparent SYN to a port where nothing listens.
  // With net.ipv4.fwmark_reflect that reset carries the proxy's mark and comes back to it, so
  // the connect fails with ECONNREFUSED instead of waiting out its timeout while the reset
  // leaves the pod for the real client.
  const c = theCluster();
  const outsiderIp = c.topology.pod("outsider").ip;
  const closedPort = 9797;
  const result = await curl(c.topology, "outsider", `http://${serverIp()}:${closedPort}/`, 12);
  t.not(result.exitCode, 0, "a closed port answered");
  const record = await c.waitForAudit(SERVER_NODE, (entry) => entry.dst?.addr === `${serverIp()}:${closedPort}` && String(entry.src.addr).startsWith(`${outsiderIp}:`));
  t.is(record.error?.code, "UPSTREAM_CONNECT_FAILED");
  t.regex(String(record.error?.message), /ECONNREFUSED/, "the proxy's connect was not refused by the kernel's reset");
});

test.serial("HBONE over IPv6: app sees the client pod IPv6", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "server-veth6.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node(SERVER_NODE).netns, "v-server", pcap);
  let result: PeerExchange;
  try {
    result = await exchange("client", 6);
  } finally {
    await capture.stop();
  }

  const client6 = ip6Of("client");
  t.is(result.dialled, `${ip6Of("server")}:${APP_PORT}`, "getpeername in the client app returns the dialled IPv6 address");
  t.is(ipOf(result.own), client6);
  t.is(ipOf(result.seenByApp), client6);
  const inbound = await c.waitForAudit(SERVER_NODE, (record) => record.transport === "hbone" && String(record.src.addr).startsWith(`[${client6}]:`));
  t.is(inbound.direction, "inbound");
  t.is(inbound.decision, "allow");
  t.is(inbound.dst.addr, `[${ip6Of("server")}]:${APP_PORT}`);
  // Had capture taken the proxy's own IPv6 connection (sk_lookup without its aa_own_conns6 entry,
  // or the nftables redirect), 15006 would have recorded it as a plaintext connection from the
  // client pod's IPv6 address.
  t.false(
    c.auditRecords(SERVER_NODE).some((record) => record.transport === "plaintext" && String(record.src.addr).startsWith(`[${client6}]:`)),
    "the IPv6 connection to the application was captured again",
  );
  const ports = packetPorts(pcap);
  t.true(ports.some(([source, destination]) => source === 15008 || destination === 15008), "no HBONE packet crossed the server pod's veth");
  t.deepEqual(
    ports.filter(([source, destination]) => source === APP_PORT || destination === APP_PORT),
    [],
    "packets of the application's port crossed the server pod's veth",
  );
});

test.serial("plaintext over IPv6: app sees the outside client IPv6", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "server-veth6-plain.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node(SERVER_NODE).netns, "v-server", pcap);
  let result: PeerExchange;
  try {
    result = await exchange("outsider", 6);
  } finally {
    await capture.stop();
  }

  const outsider6 = ip6Of("outsider");
  t.is(result.dialled, `${ip6Of("server")}:${APP_PORT}`);
  t.is(ipOf(result.own), outsider6);
  t.is(ipOf(result.seenByApp), outsider6);
  t.not(portOf(result.seenByApp), portOf(result.own), "the proxy's IPv6 connection reused the client's port");
  const inbound = await c.waitForAudit(SERVER_NODE, (record) => record.transport === "plaintext" && String(record.src.addr).startsWith(`[${outsider6}]:`));
  t.is(inbound.decision, "allow");
  t.is(inbound.dst.addr, `[${ip6Of("server")}]:${APP_PORT}`);
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
  const agent = await restartAgentWith(SERVER_NODE, [], ["server"]);
  const line = await agent.waitForLog((entry) => String(entry.msg).startsWith("transparent-source routing"), 5_000, "the transparent-source log line");
  t.is(line.msg, "transparent-source routing already in place");
  const line6 = await agent.waitForLog((entry) => String(entry.msg).startsWith("IPv6 transparent-source routing"), 5_000, "the IPv6 transparent-source log line");
  t.is(line6.msg, "IPv6 transparent-source routing already in place");
  t.is(rulesOf("server").match(/0x1539/g)?.length, 1, "the rule was added twice");
  t.is(rulesOf("server", 6).match(/0x1539/g)?.length, 1, "the IPv6 rule was added twice");
  const result = await exchange("client");
  t.is(ipOf(result.seenByApp), theCluster().topology.pod("client").ip);
  const result6 = await exchange("client", 6);
  t.is(ipOf(result6.seenByApp), ip6Of("client"));
});

test.serial("option off: app sees the pod IP", async (t) => {
  await restartAgentWith(SERVER_NODE, ["--no-transparent-source"], ["server"]);
  const hbone = await exchange("client");
  t.is(hbone.dialled, `${serverIp()}:${APP_PORT}`);
  t.is(ipOf(hbone.seenByApp), serverIp());
  const plaintext = await exchange("outsider");
  t.is(ipOf(plaintext.seenByApp), serverIp());
  const hbone6 = await exchange("client", 6);
  t.is(hbone6.dialled, `${ip6Of("server")}:${APP_PORT}`);
  t.is(ipOf(hbone6.seenByApp), ip6Of("server"));
  const plaintext6 = await exchange("outsider", 6);
  t.is(ipOf(plaintext6.seenByApp), ip6Of("server"));
});

test.serial("unenrolment removes the routing", async (t) => {
  const c = theCluster();
  await restartAgentWith(SERVER_NODE, [], ["server"]);
  t.regex(rulesOf("server"), /0x1539/);
  const agent = c.agent(SERVER_NODE);
  const from = agent.lines.length;
  const namespaces = NAMESPACES.map((spec) => (spec.name === "back" ? { ...spec, ambient: false } : spec));
  writeManifest(c.manifestsDir, "namespaces.yaml", namespaces.map(namespaceYaml).join("---\n"));
  await agent.waitForLog((line) => line.msg === "workload unenrolled" && line.workload === "back/server", 15_000, "unenrolment of back/server", from);
  t.notRegex(rulesOf("server"), /0x1539/);
  t.is(table100Of("server").trim(), "");
  t.notRegex(rulesOf("server", 6), /0x1539/);
  t.is(table100Of("server", 6).trim(), "");
  // Outside the mesh the application is reached directly, with the client's own address.
  const result = await exchange("outsider");
  t.is(result.seenByApp, result.own);
});
