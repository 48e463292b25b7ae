// End to end over IPv6 on the real kernel: a dual-stack cluster of two nodes, one real agent per
// node, real eBPF capture and TLS, curl, python3's HTTP server and python3 clients as the
// applications. Pods have an IPv4 and an IPv6 address (status.podIPs), except v4only, whose
// manifest lists IPv4 only.

import test from "ava";
import { execFile, execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { NFTABLES_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { curl, PacketCapture, sha256, writeRandomFile } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { writeManifest } from "../harness/manifests";
import { listNetns, type NodeSpec } from "../harness/topology";

const execFileAsync = promisify(execFile);

const PREFIX_FAMILY = testPrefixFamily("aad6");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const MARKER = "plaintext-marker-6d1b04c7";
const APP_PORT = 8080;
const CLIENT_TIMEOUT_S = 5;
const BLOB_SIZE = 8 * 1024 * 1024;

const NODES: NodeSpec[] = [
  {
    name: "d6n1",
    pods: [
      { name: "web", namespace: "shop", serviceAccount: "web" },
      { name: "scraper", namespace: "shop", serviceAccount: "scraper" },
      { name: "legacy", namespace: "legacy", serviceAccount: "default" },
      { name: "v4only", namespace: "shop", serviceAccount: "v4only", ipv6: false },
    ],
  },
  { name: "d6n2", pods: [{ name: "api", namespace: "backend", serviceAccount: "api" }] },
];

const ENROLLED = ["web", "scraper", "v4only", "api"];

const STRICT_MTLS = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: backend
spec:
  mtls:
    mode: STRICT
`;

/** Denies the scraper pod's IPv6 address by source ipBlocks; its IPv4 address stays allowed. */
function denyByIpv6Block(scraperIp6: string): string {
  return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-scraper-ipv6
  namespace: backend
spec:
  action: DENY
  rules:
    - from:
        - source:
            ipBlocks: ["${scraperIp6}/128"]
`;
}

/** Allows every source except one IPv6 address, by source notIpBlocks. */
function allowAllButIpv6(excludedIp6: string): string {
  return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all-but-node
  namespace: backend
spec:
  action: ALLOW
  rules:
    - from:
        - source:
            notIpBlocks: ["${excludedIp6}/128"]
`;
}

/**
 * Python client: connects to host:port over IPv6 (AF_INET6), sends an HTTP GET for /marker.html
 * and prints the address getpeername() returns, then the status line. Prints the errno name when
 * the connection fails.
 */
const PEERNAME_SCRIPT = `
import errno, socket, sys
try:
    conn = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    conn.settimeout(${CLIENT_TIMEOUT_S})
    conn.connect((sys.argv[1], int(sys.argv[2])))
    peer = conn.getpeername()
    conn.sendall(b"GET /marker.html HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    reply = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        reply += chunk
    print(peer[0], peer[1], reply.split(b"\\r\\n", 1)[0].decode())
except socket.timeout:
    print("timeout")
except OSError as error:
    print(errno.errorcode.get(error.errno, str(error)))
`;

let cluster: Cluster | undefined;
let blobSha = "";

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function ip6Of(pod: string): string {
  const ip6 = theCluster().topology.pod(pod).ip6;
  if (ip6 === undefined) throw new Error(`pod ${pod} has no IPv6 address`);
  return ip6;
}

function api6Url(file: string): string {
  return `http://[${ip6Of("api")}]:${APP_PORT}/${file}`;
}

function api4Url(file: string): string {
  return `http://${theCluster().topology.pod("api").ip}:${APP_PORT}/${file}`;
}

/** Runs the python client in a pod; returns "<peer ip> <peer port> <status line>" or an errno name. */
async function connectWithPeername(pod: string, host: string, port: number): Promise<string> {
  const netns = theCluster().topology.pod(pod).netns;
  const { stdout } = await execFileAsync("nsenter", [`--net=/var/run/netns/${netns}`, "python3", "-c", PEERNAME_SCRIPT, host, String(port)], {
    timeout: (CLIENT_TIMEOUT_S + 5) * 1000,
    encoding: "utf8",
  });
  return stdout.trim();
}

/** Runs curl in a node's namespace (outside every pod) and returns its exit code and output. */
async function curlFromNode(node: string, url: string): Promise<{ exitCode: number; output: string }> {
  const netns = theCluster().topology.node(node).netns;
  try {
    const { stdout } = await execFileAsync("ip", ["netns", "exec", netns, "curl", "-sS", "--max-time", String(CLIENT_TIMEOUT_S), url], { encoding: "utf8" });
    return { exitCode: 0, output: stdout };
  } catch (error) {
    const failure = error as { code?: number; stderr?: string };
    return { exitCode: typeof failure.code === "number" ? failure.code : -1, output: failure.stderr ?? String(error) };
  }
}

/** Starts python3's HTTP server on [::]:port, which serves IPv4 and IPv6, and waits until it listens. */
async function startDualStackHttpServer(c: Cluster, pod: string, root: string, port: number): Promise<void> {
  const netns = c.topology.pod(pod).netns;
  const server = c.topology.spawn(netns, "python3", ["-m", "http.server", String(port), "--bind", "::", "--directory", root], {
    stdio: ["ignore", "ignore", "ignore"],
  });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (c.topology.exec(netns, "ss", ["-Hltn", `sport = :${port}`], { allowFail: true }).trim() !== "") return;
    if (server.exitCode !== null) throw new Error(`HTTP server in ${pod} exited with code ${server.exitCode}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`HTTP server in ${pod} did not listen on [::]:${port} within 10 s`);
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "shop", ambient: true },
      { name: "backend", ambient: true },
      { name: "legacy", ambient: false },
    ],
    dualStack: true,
  });
  writeManifest(cluster.manifestsDir, "policies.yaml", denyByIpv6Block(ip6Of("scraper")));
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "marker.html"), `${MARKER}\n`.repeat(64));
  blobSha = writeRandomFile(path.join(site, "blob.bin"), BLOB_SIZE);
  await startDualStackHttpServer(cluster, "api", site, APP_PORT);
  await cluster.startAgents(ENROLLED);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("topology gives pods both families", (t) => {
  const c = theCluster();
  const podsYaml = fs.readFileSync(path.join(c.manifestsDir, "pods.yaml"), "utf8");
  t.regex(podsYaml, new RegExp(`podIPs:\\n    - ip: ${c.topology.pod("web").ip.replace(/\./g, "\\.")}\\n    - ip: "${ip6Of("web")}"`));
  t.is(c.topology.pod("v4only").ip6, undefined);
  const addresses = c.topology.exec(c.topology.pod("web").netns, "ip", ["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]);
  t.true(addresses.includes(`${ip6Of("web")}/64`), addresses);
});

test.serial("enrolled pods talk over IPv6 mTLS HBONE", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "node-link6.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node("d6n1").netns, "n-link", pcap);
  const result = await curl(c.topology, "web", api6Url("marker.html"));
  await capture.stop();

  t.is(result.exitCode, 0, result.stderr);
  t.is(result.status, 200);
  t.true(result.body.toString().includes(MARKER));

  const raw = fs.readFileSync(pcap);
  t.false(raw.includes(Buffer.from(MARKER)), "application bytes crossed the node link in plaintext");
  const packets = execFileSync("tshark", ["-r", pcap, "-T", "fields", "-e", "ipv6.src", "-e", "tcp.dstport", "-e", "tcp.srcport"], { encoding: "utf8" })
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => line.split("\t"));
  t.true(packets.length > 0, `no packet crossed the node link (${raw.length} bytes of capture)`);
  t.true(
    packets.every(([, dst, src]) => dst === "15008" || src === "15008"),
    `traffic on ports other than 15008: ${JSON.stringify(packets.slice(0, 5))}`,
  );
  t.true(
    packets.every(([source]) => source === ip6Of("web") || source === ip6Of("api")),
    `the tunnel did not run between the pods' IPv6 addresses: ${JSON.stringify(packets.slice(0, 5))}`,
  );

  const inbound = await c.waitForAudit("d6n2", (record) => record.direction === "inbound" && String(record.src.addr).startsWith(`[${ip6Of("web")}]:`));
  t.is(inbound.transport, "hbone");
  t.is(inbound.decision, "allow");
  t.is(inbound.src.identity, "spiffe://cluster.local/ns/shop/sa/web");
  t.is(inbound.dst.addr, `[${ip6Of("api")}]:${APP_PORT}`);
  t.is(inbound.dst.identity, "spiffe://cluster.local/ns/backend/sa/api");
  t.is(inbound.dst.hbone_addr, `[${ip6Of("api")}]:15008`);
  const outbound = await c.waitForAudit("d6n1", (record) => record.direction === "outbound" && record.dst.addr === `[${ip6Of("api")}]:${APP_PORT}`);
  t.is(outbound.transport, "hbone");
  t.is(outbound.src.identity, "spiffe://cluster.local/ns/shop/sa/web");
  t.true(String(outbound.src.addr).startsWith(`[${ip6Of("web")}]:`), outbound.src.addr);
  t.is(outbound.dst.identity, "spiffe://cluster.local/ns/backend/sa/api");
  t.is(outbound.dst.hbone_addr, `[${ip6Of("api")}]:15008`);
});

test.serial("8 MB over IPv6 arrives byte-exact", async (t) => {
  const c = theCluster();
  const result = await curl(c.topology, "web", api6Url("blob.bin"), 30);
  t.is(result.exitCode, 0, result.stderr);
  t.is(result.body.length, BLOB_SIZE);
  t.is(sha256(result.body), blobSha);
  const inbound = await c.waitForAudit("d6n2", (record) => String(record.src.addr).startsWith(`[${ip6Of("web")}]:`) && record.bytes_recv >= BLOB_SIZE);
  t.is(inbound.transport, "hbone");
});

test.serial("IPv4 still works in a dual-stack cluster", async (t) => {
  const c = theCluster();
  const result = await curl(c.topology, "web", api4Url("marker.html"));
  t.is(result.exitCode, 0, result.stderr);
  t.true(result.body.toString().includes(MARKER));
  const webIp = c.topology.pod("web").ip;
  const inbound = await c.waitForAudit("d6n2", (record) => record.direction === "inbound" && String(record.src.addr).startsWith(`${webIp}:`));
  t.is(inbound.transport, "hbone");
  t.is(inbound.src.identity, "spiffe://cluster.local/ns/shop/sa/web");
  t.is(inbound.dst.addr, `${c.topology.pod("api").ip}:${APP_PORT}`);
});

test.serial("getpeername shows the dialled IPv6 address", async (t) => {
  const output = await connectWithPeername("web", ip6Of("api"), APP_PORT);
  t.is(output, `${ip6Of("api")} ${APP_PORT} HTTP/1.0 200 OK`);
});

test.serial("IPv6 client outside the mesh gets plaintext inbound", async (t) => {
  const c = theCluster();
  const legacy6 = ip6Of("legacy");
  const result = await curl(c.topology, "legacy", api6Url("marker.html"));
  t.is(result.exitCode, 0, result.stderr);
  t.true(result.body.toString().includes(MARKER));

  const inbound = await c.waitForAudit("d6n2", (record) => String(record.src.addr).startsWith(`[${legacy6}]:`));
  t.is(inbound.direction, "inbound");
  t.is(inbound.transport, "plaintext");
  t.is(inbound.src.identity, undefined);
  t.is(inbound.decision, "allow");
  t.is(inbound.dst.addr, `[${ip6Of("api")}]:${APP_PORT}`);
  const captured = c.auditRecords("d6n1").filter((record) => String(record.src.addr).startsWith(`[${legacy6}]:`));
  t.deepEqual(captured, [], "a connection of the pod outside the mesh went through its node's agent");
});

test.serial("IPv6 client on a node gets plaintext inbound", async (t) => {
  const c = theCluster();
  const nodeIp6 = c.topology.node("d6n1").linkIp6 ?? "";
  const result = await curlFromNode("d6n1", api6Url("marker.html"));
  t.is(result.exitCode, 0, result.output);
  t.true(result.output.includes(MARKER));
  const inbound = await c.waitForAudit("d6n2", (record) => String(record.src.addr).startsWith(`[${nodeIp6}]:`));
  t.is(inbound.transport, "plaintext");
  t.is(inbound.decision, "allow");
  t.is(inbound.dst.addr, `[${ip6Of("api")}]:${APP_PORT}`);
});

test.serial("STRICT PeerAuthentication denies IPv6 plaintext", async (t) => {
  const c = theCluster();
  const node2 = c.agent("d6n2");
  const legacy6 = ip6Of("legacy");
  let mark = node2.lines.length;
  writeManifest(c.manifestsDir, "strict.yaml", STRICT_MTLS);
  try {
    await node2.waitForLog((entry) => entry.msg === "configuration updated", 10_000, "the PeerAuthentication", mark);
    const plaintext = await curl(c.topology, "legacy", api6Url("marker.html"));
    t.not(plaintext.exitCode, 0, "IPv6 plaintext reached a STRICT pod");
    t.is(plaintext.status, 0);
    const record = await c.waitForAudit("d6n2", (entry) => entry.reason === "mtls_required" && String(entry.src.addr).startsWith(`[${legacy6}]:`));
    t.is(record.decision, "deny");
    t.is(record.transport, "plaintext");
    t.is(record.error?.code, "MTLS_REQUIRED");
    const mutual = await curl(c.topology, "web", api6Url("marker.html"));
    t.is(mutual.exitCode, 0, mutual.stderr);
  } finally {
    mark = node2.lines.length;
    fs.rmSync(path.join(c.manifestsDir, "strict.yaml"), { force: true });
    await node2.waitForLog((entry) => entry.msg === "configuration updated", 10_000, "the PeerAuthentication removal", mark);
  }
});

test.serial("ipBlocks rule matches the IPv6 source", async (t) => {
  const c = theCluster();
  const scraper6 = ip6Of("scraper");
  const denied = await curl(c.topology, "scraper", api6Url("marker.html"));
  t.not(denied.exitCode, 0, "the DENY rule on the scraper's IPv6 address let its call through");
  t.is(denied.status, 0);
  const record = await c.waitForAudit("d6n2", (entry) => String(entry.src.addr).startsWith(`[${scraper6}]:`) && entry.decision === "deny");
  t.is(record.policy, "backend/deny-scraper-ipv6");
  t.is(record.transport, "hbone");
  t.is(record.src.identity, "spiffe://cluster.local/ns/shop/sa/scraper");

  // The rule names the IPv6 address only, so the same pod over IPv4 is allowed.
  const allowed = await curl(c.topology, "scraper", api4Url("marker.html"));
  t.is(allowed.exitCode, 0, allowed.stderr);
});

test.serial("notIpBlocks rule matches the IPv6 source", async (t) => {
  const c = theCluster();
  const node2 = c.agent("d6n2");
  const nodeIp6 = c.topology.node("d6n1").linkIp6 ?? "";
  let mark = node2.lines.length;
  writeManifest(c.manifestsDir, "allow.yaml", allowAllButIpv6(nodeIp6));
  try {
    await node2.waitForLog((entry) => entry.msg === "configuration updated" && entry.policies === 2, 10_000, "the ALLOW policy", mark);
    const denied = await curlFromNode("d6n1", api6Url("marker.html"));
    t.not(denied.exitCode, 0, "the node's IPv6 address, excluded by notIpBlocks, was allowed");
    const record = await c.waitForAudit("d6n2", (entry) => String(entry.src.addr).startsWith(`[${nodeIp6}]:`) && entry.decision === "deny");
    t.is(record.reason, "no_allow_match");

    const allowed = await curl(c.topology, "legacy", api6Url("marker.html"));
    t.is(allowed.exitCode, 0, allowed.stderr);
    const allowRecord = await c.waitForAudit("d6n2", (entry) => String(entry.src.addr).startsWith(`[${ip6Of("legacy")}]:`) && entry.policy === "backend/allow-all-but-node");
    t.is(allowRecord.decision, "allow");
  } finally {
    mark = node2.lines.length;
    fs.rmSync(path.join(c.manifestsDir, "allow.yaml"), { force: true });
    await node2.waitForLog((entry) => entry.msg === "configuration updated" && entry.policies === 1, 10_000, "the ALLOW policy removal", mark);
  }
});

test.serial("pod without a listed IPv6 address cannot bypass", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("v4only");
  // The pod gives itself an IPv6 address and route that its manifest does not list. The kernel
  // could then route the call, so only capture keeps it from the application.
  const prefix6 = (c.topology.node("d6n1").podCidr6 ?? "").replace(/\/64$/, "");
  const ip6 = `${prefix6}99`;
  c.topology.exec(pod.netns, "ip", ["-6", "addr", "add", `${ip6}/64`, "dev", "eth0", "nodad"]);
  try {
    c.topology.exec(pod.netns, "ip", ["-6", "route", "add", "default", "via", `${prefix6}1`]);
    // eBPF capture fails the connect() itself; nftables capture rejects the SYN with an ICMPv6
    // administratively-prohibited error.
    t.is(await connectWithPeername("v4only", ip6Of("api"), APP_PORT), NFTABLES_CAPTURE ? "EACCES" : "EPERM");
    const served = await curl(c.topology, "v4only", api4Url("marker.html"));
    t.is(served.exitCode, 0, served.stderr);
  } finally {
    c.topology.exec(pod.netns, "ip", ["-6", "addr", "del", `${ip6}/64`, "dev", "eth0"], { allowFail: true });
  }
  const reached = c.auditRecords("d6n2").filter((record) => String(record.src.addr).startsWith(`[${ip6}]:`));
  t.deepEqual(reached, [], "the unlisted IPv6 address reached the server's agent");
});

test.serial("killed agent fails closed over IPv6", async (t) => {
  const c = theCluster();
  await c.agent("d6n2").kill();
  const plaintext = await curl(c.topology, "legacy", api6Url("marker.html"), 3);
  t.not(plaintext.exitCode, 0, "IPv6 plaintext reached an enrolled pod while its agent was down");
  t.is(plaintext.status, 0);
  await c.restartAgent("d6n2", ["api"]);
  const served = await curl(c.topology, "web", api6Url("marker.html"));
  t.is(served.exitCode, 0, served.stderr);
  const allowed = await curl(c.topology, "legacy", api6Url("marker.html"));
  t.is(allowed.exitCode, 0, allowed.stderr);

  await c.agent("d6n1").kill();
  const outbound = await connectWithPeername("web", ip6Of("api"), APP_PORT);
  t.is(outbound, "ECONNREFUSED", "an enrolled pod's IPv6 connection was not refused while its agent was down");
  await c.restartAgent("d6n1", ["web", "scraper", "v4only"]);
  const again = await curl(c.topology, "web", api6Url("marker.html"));
  t.is(again.exitCode, 0, again.stderr);
});

test.serial("teardown leaves no namespace or pin", async (t) => {
  const c = theCluster();
  const pinRoots = [...c.topology.nodes.keys()].map((node) => c.pinRoot(node));
  // nftables capture pins nothing.
  for (const pinRoot of pinRoots) t.is(fs.existsSync(pinRoot), !NFTABLES_CAPTURE, `${pinRoot} ${NFTABLES_CAPTURE ? "exists under nftables capture" : "is missing before teardown"}`);
  await c.destroy();
  t.deepEqual(listNetns().filter((name) => name.startsWith(PREFIX)), []);
  for (const pinRoot of pinRoots) t.false(fs.existsSync(pinRoot), `${pinRoot} still exists`);
});
