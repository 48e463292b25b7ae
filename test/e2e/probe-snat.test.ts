// End to end on the real kernel: --probe-snat. Each harness node's network namespace is its host's
// (the harness passes --host-netns), so a curl run there is the kubelet probing a pod. The pods of
// the strict namespace are enrolled under STRICT mTLS. With --probe-snat the node's plain HTTP GET
// reaches the application from the probe source address, over IPv4 and IPv6. Connections of
// another pod, and of another node, keep their source and are refused. So do a SYN that a pod
// forges with the node's address as its source, and a connection of the node from a transparent
// socket that has another address as its source. The table's sets follow enrolment, the table
// stays while no agent runs, a failure to write it shows in readiness without holding back
// enrolment, and an agent started without the switch removes it.

// The pod network of this file. The topology reads it when the harness loads, so it is set before the imports.
process.env.AA_TEST_POD_NET ??= "10.226";

import test, { type ExecutionContext } from "ava";
import { execFileSync, spawnSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { nftBinary } from "../../agent/capture/nft/capture";
import { PROBE_SNAT_SET4, PROBE_SNAT_SET6, PROBE_SNAT_TABLE_FAMILY, PROBE_SNAT_TABLE_NAME } from "../../agent/capture/nft/probe-snat-ruleset";
import { DEFAULT_PROBE_SOURCES } from "../../agent/capture/ebpf/exemptions";
import { AGENT_BIN, AGENTCTL_BIN, testPrefixFamily } from "../harness/agent-process";
import { PacketCapture } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { podsYaml, writeManifest } from "../harness/manifests";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aasnat");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aasnat-n1";
const SERVER_NODE = "aasnat-n2";
const APP_PORT = 8080;
const [PROBE_SOURCE4, PROBE_SOURCE6] = DEFAULT_PROBE_SOURCES;
const TABLE = `${PROBE_SNAT_TABLE_FAMILY} ${PROBE_SNAT_TABLE_NAME}`;
const NO_SNAT_REASON = "mtls_required";

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "outsider", namespace: "legacy", serviceAccount: "default" },
      { name: "web", namespace: "strict", serviceAccount: "web" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "app", namespace: "strict", serviceAccount: "app" },
      { name: "second", namespace: "strict", serviceAccount: "second" },
    ],
  },
];

const ENROLLED = ["web", "app", "second"];

const STRICT_POLICY = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: strict
spec:
  mtls:
    mode: STRICT
`;

/** Responds to each HTTP request with the peer address it came from, and prints that address on its own line. */
const PEER_SERVER = `
import socket, sys
server = socket.socket(socket.AF_INET6)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", int(sys.argv[1])))
server.listen(16)
while True:
    connection, peer = server.accept()
    address = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
    print(address, flush=True)
    try:
        connection.recv(4096)
        body = address.encode()
        connection.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
    except OSError:
        pass
    connection.close()
`;

/**
 * Sends one TCP SYN with a forged source address through an AF_PACKET socket on eth0, as a pod
 * with CAP_NET_RAW can: argv is the IP version, source, destination, destination MAC address,
 * source port and destination port. The kernel neither checks nor rewrites the source.
 */
const FORGED_SYN = `
import socket, struct, sys

def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

version, source, destination, mac = sys.argv[1:5]
sport, dport = int(sys.argv[5]), int(sys.argv[6])
family = socket.AF_INET if version == "4" else socket.AF_INET6
src, dst = socket.inet_pton(family, source), socket.inet_pton(family, destination)
tcp = struct.pack("!HHIIBBHHH", sport, dport, 0x5EED, 0, 5 << 4, 0x02, 64240, 0, 0)
if version == "4":
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    ethertype = 0x0800
else:
    pseudo = src + dst + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, src, dst)
    ethertype = 0x86DD
tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ethertype))
sock.sendto(ip + tcp, ("eth0", ethertype, 0, 0, bytes.fromhex(mac.replace(":", ""))))
`;

/**
 * Opens one TCP connection from a socket with IP_TRANSPARENT (IPV6_TRANSPARENT, 75, for IPv6)
 * bound to an address that is not the namespace's own, as a proxy that keeps its clients'
 * addresses does. argv is the IP version, source, source port, destination and destination port.
 * Only its SYN matters, so a failed or timed-out connect is fine.
 */
const TRANSPARENT_CONNECT = `
import socket, sys

version, source, sport, destination, dport = sys.argv[1:6]
if version == "4":
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
else:
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, 75, 1)
sock.bind((source, int(sport)))
sock.settimeout(1)
try:
    sock.connect((destination, int(dport)))
except OSError:
    pass
`;

interface Fixture {
  cluster: Cluster;
  /** Peer addresses that the application of each pod saw, by pod name, in order. */
  peers: Map<string, string[]>;
}

let fixture: Fixture | undefined;

function theFixture(): Fixture {
  if (!fixture) throw new Error("the cluster was not created");
  return fixture;
}

function startPeerServer(cluster: Cluster, pod: string, peers: Map<string, string[]>): ChildProcess {
  const seen: string[] = [];
  peers.set(pod, seen);
  const server = cluster.topology.spawn(cluster.topology.pod(pod).netns, "python3", ["-c", PEER_SERVER, String(APP_PORT)]);
  let pending = "";
  server.stdout!.on("data", (chunk: Buffer) => {
    pending += chunk.toString();
    const lines = pending.split("\n");
    pending = lines.pop() ?? "";
    seen.push(...lines.filter((line) => line !== ""));
  });
  return server;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  const cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "strict", ambient: true },
      { name: "legacy", ambient: false },
    ],
    extraManifests: { "policies.yaml": STRICT_POLICY },
    agentArgs: ["--probe-snat"],
    dualStack: true,
  });
  fixture = { cluster, peers: new Map() };
  for (const pod of ENROLLED) startPeerServer(cluster, pod, fixture.peers);
  await waitFor(() => ENROLLED.every((pod) => listening(cluster, pod)), "the peer servers to listen");
  await cluster.startAgents(ENROLLED);
});

test.after.always(async () => {
  await fixture?.cluster.destroy({ removeWorkDir: true });
});

function listening(cluster: Cluster, pod: string): boolean {
  return cluster.topology.exec(cluster.topology.pod(pod).netns, "ss", ["-Hltn", `sport = :${APP_PORT}`], { allowFail: true }).trim() !== "";
}

/** Polls `condition` every 100 ms until it holds; throws after `timeoutMs`. */
async function waitFor(condition: () => boolean, description: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${description}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

interface Probe {
  /** curl's exit code: 0 on success. */
  exitCode: number;
  /** The HTTP status, 0 when no response arrived. */
  status: number;
  body: string;
  stderr: string;
}

/** Runs a plain HTTP GET with curl inside a namespace, as the kubelet's httpGet probe does. */
function httpGet(netns: string, ip: string): Probe {
  const host = ip.includes(":") ? `[${ip}]` : ip;
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", "curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", `http://${host}:${APP_PORT}/`], {
    encoding: "utf8",
    timeout: 15_000,
  });
  const newline = result.stdout.lastIndexOf("\n");
  return { exitCode: result.status ?? -1, status: Number(result.stdout.slice(newline + 1)) || 0, body: result.stdout.slice(0, Math.max(newline, 0)), stderr: result.stderr.trim() };
}

/** Probes a pod from its node's namespace, the kubelet's place. */
function probeFromNode(pod: string, family: 4 | 6 = 4): Probe {
  const { topology } = theFixture().cluster;
  const handle = topology.pod(pod);
  return httpGet(topology.node(handle.node).netns, family === 4 ? handle.ip : handle.ip6!);
}

function assertServedFrom(t: ExecutionContext, probe: Probe, source: string, description: string): void {
  t.is(probe.exitCode, 0, `${description}: curl failed: ${probe.stderr}`);
  t.is(probe.status, 200, `${description}: HTTP status`);
  t.is(probe.body, source, `${description}: the address the application saw`);
}

function assertRejected(t: ExecutionContext, probe: Probe, description: string): void {
  t.not(probe.exitCode, 0, `${description}: the request was served with status ${probe.status}: ${probe.body}`);
  t.is(probe.status, 0, `${description}: HTTP status`);
  t.is(probe.body, "", `${description}: the client received bytes`);
}

/** Waits for the server node's inbound record of a connection from `sourceIp` to the pod and returns it. */
async function inboundRecordFrom(sourceIp: string, pod: string, mark: number): Promise<Record<string, any>> {
  const { cluster } = theFixture();
  const destination = `${cluster.topology.pod(pod).ip}:${APP_PORT}`;
  const deadline = Date.now() + 10_000;
  for (;;) {
    const found = cluster
      .auditRecords(SERVER_NODE)
      .slice(mark)
      .find((record) => record.direction === "inbound" && String(record.src.addr).startsWith(`${sourceIp}:`) && record.dst.addr === destination);
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`no inbound record on ${SERVER_NODE} from ${sourceIp} to ${destination} within 10 s`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Returns the node's own address of `family` on its pod bridge, the source of its connections to its pods. */
function nodeBridgeIp(node: string, family: 4 | 6 = 4): string {
  const { cluster } = theFixture();
  const pod = [...cluster.topology.pods.values()].find((candidate) => candidate.node === node)!;
  return family === 4 ? pod.ip.replace(/\.\d+$/, ".1") : pod.ip6!.replace(/::[0-9a-f]+$/, "::1");
}

/** Reads the MAC address of an interface in a namespace. */
function macAddress(netns: string, iface: string): string {
  const [link] = JSON.parse(theFixture().cluster.topology.exec(netns, "ip", ["-j", "link", "show", iface])) as { address: string }[];
  return link.address;
}

/** How a forged SYN reaches the destination pod: its Ethernet destination is the pod itself (bridged) or the node's bridge (routed by the node). */
type ForgedSynRoute = "bridged" | "routed";

/** Sends a SYN from a pod's namespace to a pod on the same node, with that node's bridge address as its forged source. */
function sendForgedSyn(from: string, to: string, family: 4 | 6, route: ForgedSynRoute, sourcePort: number): void {
  const { topology } = theFixture().cluster;
  const target = topology.pod(to);
  const mac = route === "bridged" ? macAddress(target.netns, "eth0") : macAddress(topology.node(target.node).netns, "br0");
  const destination = family === 4 ? target.ip : target.ip6!;
  const args = ["-c", FORGED_SYN, String(family), nodeBridgeIp(target.node, family), destination, mac, String(sourcePort), String(APP_PORT)];
  topology.exec(topology.pod(from).netns, "python3", args);
}

/** Connects from a pod's node to the pod from a transparent socket that has the client pod's address as its source. */
function connectTransparently(client: string, to: string, family: 4 | 6, sourcePort: number): void {
  const { topology } = theFixture().cluster;
  const target = topology.pod(to);
  const [source, destination] = family === 4 ? [topology.pod(client).ip, target.ip] : [topology.pod(client).ip6!, target.ip6!];
  const args = ["-c", TRANSPARENT_CONNECT, String(family), source, String(sourcePort), destination, String(APP_PORT)];
  topology.exec(topology.node(target.node).netns, "python3", args);
}

/** Polls a capture file every 100 ms for 10 s at most, until it contains a SYN from each port; returns the SYNs' sources. */
async function waitForSyns(pcap: string, ports: number[]): Promise<Map<number, string>> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const sources = synSources(pcap);
    if (ports.every((port) => sources.has(port)) || Date.now() > deadline) return sources;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Returns the source address of each TCP SYN in a capture file, by TCP source port. */
function synSources(pcap: string): Map<number, string> {
  const fields = ["-e", "tcp.srcport", "-e", "ip.src", "-e", "ipv6.src"];
  // tshark's warning about running as root goes nowhere, because this runs once per poll.
  const output = execFileSync("tshark", ["-r", pcap, "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0", "-T", "fields", ...fields], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  const sources = new Map<number, string>();
  for (const line of output.split("\n").filter((row) => row.trim() !== "")) {
    const [port, ip4, ip6] = line.split("\t");
    sources.set(Number(port), ip4 || ip6);
  }
  return sources;
}

/** Returns the elements of the probe SNAT table's sets in a node's namespace, or undefined when the table is absent. */
function tableElements(node: string): { ipv4: string[]; ipv6: string[] } | undefined {
  const { cluster } = theFixture();
  const netns = cluster.topology.node(node).netns;
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", nftBinary(), "-j", "list", "table", PROBE_SNAT_TABLE_FAMILY, PROBE_SNAT_TABLE_NAME], { encoding: "utf8" });
  if (result.status !== 0) {
    if (/No such file or directory/.test(result.stderr)) return undefined;
    throw new Error(`listing ${TABLE} in ${netns} failed: ${result.stderr}`);
  }
  const objects = (JSON.parse(result.stdout) as { nftables: Record<string, any>[] }).nftables;
  const elements = (name: string): string[] => {
    const set = objects.find((object) => object.set?.name === name)?.set;
    if (set === undefined) throw new Error(`${TABLE} in ${netns} has no set ${name}: ${result.stdout}`);
    return ((set.elem ?? []) as string[]).slice().sort();
  };
  return { ipv4: elements(PROBE_SNAT_SET4), ipv6: elements(PROBE_SNAT_SET6) };
}

/** The enrolled pods' addresses that a node's table should contain. */
function expectedElements(pods: string[]): { ipv4: string[]; ipv6: string[] } {
  const { topology } = theFixture().cluster;
  return { ipv4: pods.map((pod) => topology.pod(pod).ip).sort(), ipv6: pods.map((pod) => topology.pod(pod).ip6!).sort() };
}

async function waitForElements(node: string, pods: string[], description: string): Promise<void> {
  const expected = JSON.stringify(expectedElements(pods));
  await waitFor(() => JSON.stringify(tableElements(node)) === expected, `${description}: ${TABLE} of ${node} to contain ${expected}, got ${JSON.stringify(tableElements(node))}`);
}

/** Reads the admin API's /healthz/ready of a node's agent. */
function readiness(node: string): Record<string, any> {
  const { cluster } = theFixture();
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${cluster.topology.node(node).netns}`, "--", "curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/healthz/ready"], { encoding: "utf8" });
  return JSON.parse(result.stdout) as Record<string, any>;
}

function agentctlStatus(node: string): string {
  const { cluster } = theFixture();
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${cluster.topology.node(node).netns}`, "--", process.execPath, AGENTCTL_BIN, "status"], { encoding: "utf8", timeout: 30_000 });
  return result.stdout + result.stderr;
}

test.serial("probe-snat without a probe source is a usage error", (t) => {
  const dir = theFixture().cluster.workDir;
  const result = spawnSync(process.execPath, [AGENT_BIN, "run", "--node", "aasnat-usage", "--manifests", dir, "--ca-dir", dir, "--probe-snat", "--probe-source", "none"], {
    encoding: "utf8",
    timeout: 20_000,
  });
  t.is(result.status, 2, result.stderr);
  t.regex(result.stderr, /--probe-snat needs a probe source address to rewrite kubelet probes to, but --probe-source is "none"/);
});

test.serial("node's probe reaches the application", (t) => {
  assertServedFrom(t, probeFromNode("app"), PROBE_SOURCE4, "IPv4 probe of app");
  assertServedFrom(t, probeFromNode("app", 6), PROBE_SOURCE6, "IPv6 probe of app");
  assertServedFrom(t, probeFromNode("web"), PROBE_SOURCE4, "IPv4 probe of web on the other node");
});

test.serial("other pods and nodes stay captured", async (t) => {
  const { cluster, peers } = theFixture();
  const outsider = cluster.topology.pod("outsider");
  const app = cluster.topology.pod("app");

  let mark = cluster.auditRecords(SERVER_NODE).length;
  assertRejected(t, httpGet(outsider.netns, app.ip), "outsider pod to app");
  const fromPod = await inboundRecordFrom(outsider.ip, "app", mark);
  t.is(fromPod.decision, "deny");
  t.is(fromPod.reason, NO_SNAT_REASON);

  // The other node's connection is forwarded by the server's node, which leaves its source alone.
  mark = cluster.auditRecords(SERVER_NODE).length;
  const clientNodeIp = cluster.topology.node(CLIENT_NODE).linkIp;
  assertRejected(t, httpGet(cluster.topology.node(CLIENT_NODE).netns, app.ip), "client node to app");
  const fromNode = await inboundRecordFrom(clientNodeIp, "app", mark);
  t.is(fromNode.decision, "deny");
  t.is(fromNode.reason, NO_SNAT_REASON);

  const seen = peers.get("app")!;
  t.false(seen.includes(outsider.ip), `the application saw the outsider pod: ${seen.join(", ")}`);
  t.false(seen.includes(clientNodeIp), `the application saw the client node: ${seen.join(", ")}`);
});

test.serial("forged node source stays captured", async (t) => {
  const { cluster } = theFixture();
  const outsider = cluster.topology.pod("outsider");
  const nodeIp = (family: 4 | 6): string => nodeBridgeIp(CLIENT_NODE, family);
  // outsider and web are both on the client node. br_netfilter, on by default in every network
  // namespace of this kernel, passes bridged frames through the node's IPv4 and IPv6 postrouting
  // chains. A routed IPv4 packet with a local source is dropped as a martian before it gets there,
  // but a routed IPv6 one is not. The transparent sockets are the node's own, but speak for
  // another address, which is what `fib saddr type local` is kept for.
  const cases = [
    { description: "IPv4 SYN bridged to web", sourcePort: 41001, expected: nodeIp(4), send: () => sendForgedSyn("outsider", "web", 4, "bridged", 41001) },
    { description: "IPv6 SYN bridged to web", sourcePort: 41002, expected: nodeIp(6), send: () => sendForgedSyn("outsider", "web", 6, "bridged", 41002) },
    { description: "IPv6 SYN routed to web", sourcePort: 41003, expected: nodeIp(6), send: () => sendForgedSyn("outsider", "web", 6, "routed", 41003) },
    { description: "IPv4 transparent node socket", sourcePort: 41004, expected: outsider.ip, send: () => connectTransparently("outsider", "web", 4, 41004) },
    { description: "IPv6 transparent node socket", sourcePort: 41005, expected: outsider.ip6!, send: () => connectTransparently("outsider", "web", 6, 41005) },
  ];
  const pcap = path.join(cluster.workDir, "forged-syn.pcap");
  const capture = await PacketCapture.start(cluster.topology, cluster.topology.pod("web").netns, "eth0", pcap);
  let seen: Map<number, string>;
  try {
    for (const { send } of cases) send();
    seen = await waitForSyns(pcap, cases.map((syn) => syn.sourcePort));
  } finally {
    await capture.stop();
  }
  // The source that reached web's namespace is the one its inbound capture judges.
  for (const { description, sourcePort, expected } of cases) {
    t.is(seen.get(sourcePort), expected, `${description}: the source address that reached web`);
  }

  // The node's own connections still get the probe source.
  assertServedFrom(t, probeFromNode("web"), PROBE_SOURCE4, "IPv4 probe of web");
  assertServedFrom(t, probeFromNode("web", 6), PROBE_SOURCE6, "IPv6 probe of web");
});

test.serial("status shows the table", (t) => {
  const { cluster } = theFixture();
  const netns = `/var/run/netns/${cluster.topology.node(SERVER_NODE).netns}`;
  const body = readiness(SERVER_NODE);
  t.true(body.ready);
  t.true(body.checks.probeSnat);
  t.deepEqual(body.probeSnat, { installed: true, table: TABLE, netns, sources: [PROBE_SOURCE4, PROBE_SOURCE6], pods: { ipv4: 2, ipv6: 2 } });
  const status = agentctlStatus(SERVER_NODE);
  t.regex(status, /^  probeSnat\s+ok$/m);
  t.true(status.includes(`probe snat: table ${TABLE} in ${netns}, to ${PROBE_SOURCE4} and ${PROBE_SOURCE6}, for 2 IPv4 and 2 IPv6 pod addresses`), status);
});

test.serial("sets follow enrolment", async (t) => {
  const { cluster } = theFixture();
  await waitForElements(SERVER_NODE, ["app", "second"], "after start");
  await waitForElements(CLIENT_NODE, ["web"], "after start");

  const second = cluster.topology.pod("second");
  const agent = cluster.agent(SERVER_NODE);
  let mark = agent.lines.length;
  second.labels = { "istio.io/dataplane-mode": "none" };
  writeManifest(cluster.manifestsDir, "pods.yaml", podsYaml(cluster.topology));
  await agent.waitForLog((line) => line.msg === "workload unenrolled" && line.workload === "strict/second", 10_000, "unenrolment of second", mark);
  await waitForElements(SERVER_NODE, ["app"], "after second's unenrolment");
  // Not enrolled, the pod gets the node's probe from the node's address.
  assertServedFrom(t, probeFromNode("second"), nodeBridgeIp(SERVER_NODE), "probe of unenrolled second");

  mark = agent.lines.length;
  second.labels = {};
  writeManifest(cluster.manifestsDir, "pods.yaml", podsYaml(cluster.topology));
  await cluster.waitEnrolled(["second"], () => mark);
  await waitForElements(SERVER_NODE, ["app", "second"], "after second's enrolment");
  assertServedFrom(t, probeFromNode("second"), PROBE_SOURCE4, "probe of enrolled second");
});

test.serial("table stays while no agent runs", async (t) => {
  const { cluster } = theFixture();
  await cluster.agent(SERVER_NODE).stop();
  t.deepEqual(tableElements(SERVER_NODE), expectedElements(["app", "second"]));
  assertServedFrom(t, probeFromNode("app"), PROBE_SOURCE4, "IPv4 probe of app with no agent");
  assertServedFrom(t, probeFromNode("app", 6), PROBE_SOURCE6, "IPv6 probe of app with no agent");
});

test.serial("failed table holds readiness only", async (t) => {
  const { cluster } = theFixture();
  const notNamespace = path.join(cluster.workDir, "not-a-network-namespace");
  fs.writeFileSync(notNamespace, "");
  const agent = await cluster.restartAgent(SERVER_NODE, ["app", "second"], ["--probe-snat", "--host-netns", notNamespace]);
  const failure = await agent.waitForLog((line) => typeof line.msg === "string" && line.msg.startsWith("writing the probe SNAT table failed"), 10_000, "the failed write");
  t.is(failure.level, 50, "logged at error level");

  const body = readiness(SERVER_NODE);
  t.false(body.ready);
  t.false(body.checks.probeSnat);
  t.true(body.checks.enrolment);
  t.is(body.enrolled, 2);
  t.like(body.probeSnat, { installed: false, netns: notNamespace });
  t.truthy(body.probeSnat.error);
  const status = agentctlStatus(SERVER_NODE);
  t.regex(status, /^  probeSnat\s+not ready$/m);
  t.true(status.includes(`probe snat: table ${TABLE} in ${notNamespace} not in place (`), status);
  // The node's own table is not this agent's, and stays as the last agent left it.
  t.deepEqual(tableElements(SERVER_NODE), expectedElements(["app", "second"]));
  await agent.stop();
});

test.serial("start without the switch removes the table", async (t) => {
  const { cluster } = theFixture();
  const agent = await cluster.restartAgent(SERVER_NODE, ["app", "second"], []);
  await agent.waitForLog((line) => line.msg === "removed the probe SNAT table: kubelet probes come from the node's address again", 10_000, "the table's removal");
  t.is(tableElements(SERVER_NODE), undefined);
  t.false("probeSnat" in readiness(SERVER_NODE).checks);

  const mark = cluster.auditRecords(SERVER_NODE).length;
  assertRejected(t, probeFromNode("app"), "IPv4 probe of app without --probe-snat");
  const record = await inboundRecordFrom(nodeBridgeIp(SERVER_NODE), "app", mark);
  t.is(record.decision, "deny");
  t.is(record.reason, NO_SNAT_REASON);
  assertRejected(t, probeFromNode("app", 6), "IPv6 probe of app without --probe-snat");
});
