// End to end with IPv6-only pods on the real kernel: a dual-stack cluster of two nodes, one real
// agent per node, real eBPF capture (nftables capture with AA_TEST_CAPTURE=nftables) and TLS. The
// pods client6 and db6 have no IPv4 address but loopback, and their manifests list their IPv6
// address alone (status.podIP and status.podIPs). api is dual-stack with its IPv6 address listed
// first (IPv6-first), and legacy is a dual-stack pod outside the mesh.

import test from "ava";
import { execFile, execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { AGENTCTL_BIN, NFTABLES_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { curl, PacketCapture } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { podsYaml, writeManifest } from "../harness/manifests";
import { nftCaptureTable, nftStatePods } from "../harness/nft-state";
import { listNetns, POD_NETWORK, type NodeSpec } from "../harness/topology";

const execFileAsync = promisify(execFile);

const PREFIX_FAMILY = testPrefixFamily("aav6o");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const MARKER = "ipv6-only-marker-3f9a51e2";
const APP_PORT = 8080;
const CLIENT_TIMEOUT_S = 5;

const NODES: NodeSpec[] = [
  {
    name: "v6o1",
    pods: [
      { name: "client6", namespace: "shop", serviceAccount: "client6", ipv6Only: true },
      { name: "legacy", namespace: "legacy", serviceAccount: "default" },
    ],
  },
  {
    name: "v6o2",
    pods: [
      { name: "api", namespace: "backend", serviceAccount: "api", ipv6First: true },
      { name: "db6", namespace: "backend", serviceAccount: "db6", ipv6Only: true },
    ],
  },
];

const ENROLLED = ["client6", "api", "db6"];

const STRICT_MTLS = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: backend
spec:
  mtls:
    mode: STRICT
`;

/**
 * Python client: connects to host:port with a socket of the given family ("4" or "6"), sends an
 * HTTP GET for /marker.html and prints the status line, or the errno name when connect() fails.
 */
const CONNECT_SCRIPT = `
import errno, socket, sys
family = socket.AF_INET if sys.argv[3] == "4" else socket.AF_INET6
try:
    conn = socket.socket(family, socket.SOCK_STREAM)
    conn.settimeout(${CLIENT_TIMEOUT_S})
    conn.connect((sys.argv[1], int(sys.argv[2])))
    conn.sendall(b"GET /marker.html HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    reply = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        reply += chunk
    print(reply.split(b"\\r\\n", 1)[0].decode())
except socket.timeout:
    print("timeout")
except OSError as error:
    print(errno.errorcode.get(error.errno, str(error)))
`;

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created. Fix the first failure above and rerun.");
  return cluster;
}

function ip6Of(pod: string): string {
  const ip6 = theCluster().topology.pod(pod).ip6;
  if (ip6 === undefined) throw new Error(`pod ${pod} has no IPv6 address`);
  return ip6;
}

function urlOf(pod: string): string {
  return `http://[${ip6Of(pod)}]:${APP_PORT}/marker.html`;
}

/** Runs the python client in a pod and returns the status line or an errno name. */
async function connectFrom(pod: string, host: string, port: number, family: 4 | 6): Promise<string> {
  const netns = theCluster().topology.pod(pod).netns;
  const { stdout } = await execFileAsync("nsenter", [`--net=/var/run/netns/${netns}`, "python3", "-c", CONNECT_SCRIPT, host, String(port), String(family)], {
    timeout: (CLIENT_TIMEOUT_S + 5) * 1000,
    encoding: "utf8",
  });
  return stdout.trim();
}

/** Starts python3's HTTP server on [::]:port and waits until it listens. */
async function startHttpServer6(c: Cluster, pod: string, root: string): Promise<void> {
  const netns = c.topology.pod(pod).netns;
  const server = c.topology.spawn(netns, "python3", ["-m", "http.server", String(APP_PORT), "--bind", "::", "--directory", root], {
    stdio: ["ignore", "ignore", "ignore"],
  });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (c.topology.exec(netns, "ss", ["-Hltn", `sport = :${APP_PORT}`], { allowFail: true }).trim() !== "") return;
    if (server.exitCode !== null) throw new Error(`HTTP server in ${pod} exited with code ${server.exitCode}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`HTTP server in ${pod} did not listen on [::]:${APP_PORT} within 10 s`);
}

interface ConfigDump {
  enrolled: { workload: string; ip: string; cookie: string }[];
}

/** Runs `agentctl config` in the node's namespace, where the agent's admin API listens. */
function configDump(node: string): ConfigDump {
  const netns = theCluster().topology.node(node).netns;
  const output = execFileSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", process.execPath, AGENTCTL_BIN, "config"], { encoding: "utf8" });
  return JSON.parse(output) as ConfigDump;
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
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "marker.html"), `${MARKER}\n`.repeat(64));
  await startHttpServer6(cluster, "api", site);
  await startHttpServer6(cluster, "db6", site);
  await cluster.startAgents(ENROLLED);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("IPv6-only pod has no IPv4 address", (t) => {
  const c = theCluster();
  const pod = c.topology.pod("client6");
  t.is(pod.ip, ip6Of("client6"));
  const podsYaml = fs.readFileSync(path.join(c.manifestsDir, "pods.yaml"), "utf8");
  t.true(podsYaml.includes(`  podIP: "${ip6Of("client6")}"\n  podIPs:\n    - ip: "${ip6Of("client6")}"\n`), podsYaml);
  const addresses4 = c.topology.exec(pod.netns, "ip", ["-4", "-o", "addr", "show", "scope", "global"]);
  t.is(addresses4.trim(), "");
});

registerCaptureTests();

function registerCaptureTests(): void {
  test.serial("agentctl config lists the IPv6-only pod", (t) => {
    const entry = configDump("v6o1").enrolled.find((candidate) => candidate.workload === "shop/client6");
    t.truthy(entry, "shop/client6 is not enrolled");
    t.is(entry?.ip, ip6Of("client6"));
  });

  test.serial("IPv6-only pod calls over HBONE", async (t) => {
    const c = theCluster();
    const pcap = path.join(c.workDir, "node-link.pcap");
    const capture = await PacketCapture.start(c.topology, c.topology.node("v6o1").netns, "n-link", pcap);
    const toApi = await curl(c.topology, "client6", urlOf("api"));
    const toDb = await curl(c.topology, "client6", urlOf("db6"));
    await capture.stop();

    t.is(toApi.exitCode, 0, toApi.stderr);
    t.true(toApi.body.toString().includes(MARKER));
    t.is(toDb.exitCode, 0, toDb.stderr);
    t.true(toDb.body.toString().includes(MARKER));

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
    const tunnelEnds = new Set([ip6Of("client6"), ip6Of("api"), ip6Of("db6")]);
    t.true(
      packets.every(([source]) => tunnelEnds.has(source)),
      `the tunnels did not run between the pods' IPv6 addresses: ${JSON.stringify(packets.slice(0, 5))}`,
    );

    for (const server of ["api", "db6"]) {
      const inbound = await c.waitForAudit(
        "v6o2",
        (record) => record.direction === "inbound" && record.dst.addr === `[${ip6Of(server)}]:${APP_PORT}` && String(record.src.addr).startsWith(`[${ip6Of("client6")}]:`),
      );
      t.is(inbound.transport, "hbone");
      t.is(inbound.decision, "allow");
      t.is(inbound.src.identity, "spiffe://cluster.local/ns/shop/sa/client6");
      t.is(inbound.dst.hbone_addr, `[${ip6Of(server)}]:15008`);
    }
    const outbound = await c.waitForAudit("v6o1", (record) => record.direction === "outbound" && record.dst.addr === `[${ip6Of("db6")}]:${APP_PORT}`);
    t.is(outbound.transport, "hbone");
    t.is(outbound.src.identity, "spiffe://cluster.local/ns/shop/sa/client6");
    t.is(outbound.dst.identity, "spiffe://cluster.local/ns/backend/sa/db6");
  });

  test.serial("plaintext client reaches the IPv6-only pod's 15006", async (t) => {
    const c = theCluster();
    const legacy6 = ip6Of("legacy");
    const result = await curl(c.topology, "legacy", urlOf("db6"));
    t.is(result.exitCode, 0, result.stderr);
    t.true(result.body.toString().includes(MARKER));
    const inbound = await c.waitForAudit("v6o2", (record) => String(record.src.addr).startsWith(`[${legacy6}]:`));
    t.is(inbound.direction, "inbound");
    t.is(inbound.transport, "plaintext");
    t.is(inbound.dst.addr, `[${ip6Of("db6")}]:${APP_PORT}`);
  });

  test.serial("IPv6-first pod is captured over IPv4", async (t) => {
    const c = theCluster();
    const podsYaml = fs.readFileSync(path.join(c.manifestsDir, "pods.yaml"), "utf8");
    t.true(podsYaml.includes(`  podIP: "${ip6Of("api")}"\n  podIPs:\n    - ip: "${ip6Of("api")}"\n`), podsYaml);
    const api4 = c.topology.pod("api").ip;
    const entry = configDump("v6o2").enrolled.find((candidate) => candidate.workload === "backend/api");
    t.truthy(entry, "backend/api is not enrolled");

    const legacy4 = c.topology.pod("legacy").ip;
    const result = await curl(c.topology, "legacy", `http://${api4}:${APP_PORT}/marker.html`);
    t.is(result.exitCode, 0, result.stderr);
    t.true(result.body.toString().includes(MARKER));
    const inbound = await c.waitForAudit("v6o2", (record) => String(record.src.addr).startsWith(`${legacy4}:`));
    t.is(inbound.transport, "plaintext");
    t.is(inbound.dst.addr, `${api4}:${APP_PORT}`);
  });

  test.serial("STRICT denies IPv6 plaintext to the IPv6-only pod", async (t) => {
    const c = theCluster();
    const node2 = c.agent("v6o2");
    const legacy6 = ip6Of("legacy");
    let mark = node2.lines.length;
    writeManifest(c.manifestsDir, "strict.yaml", STRICT_MTLS);
    try {
      await node2.waitForLog((entry) => entry.msg === "configuration updated", 10_000, "the PeerAuthentication", mark);
      const plaintext = await curl(c.topology, "legacy", urlOf("db6"));
      t.not(plaintext.exitCode, 0, "IPv6 plaintext reached a STRICT IPv6-only pod");
      t.is(plaintext.status, 0);
      const record = await c.waitForAudit("v6o2", (entry) => entry.reason === "mtls_required" && String(entry.src.addr).startsWith(`[${legacy6}]:`));
      t.is(record.decision, "deny");
      t.is(record.dst.addr, `[${ip6Of("db6")}]:${APP_PORT}`);
      const mutual = await curl(c.topology, "client6", urlOf("db6"));
      t.is(mutual.exitCode, 0, mutual.stderr);
    } finally {
      mark = node2.lines.length;
      fs.rmSync(path.join(c.manifestsDir, "strict.yaml"), { force: true });
      await node2.waitForLog((entry) => entry.msg === "configuration updated", 10_000, "the PeerAuthentication removal", mark);
    }
  });

  test.serial("IPv4 from the IPv6-only pod fails closed", async (t) => {
    const c = theCluster();
    const pod = c.topology.pod("client6");
    const api4 = c.topology.pod("api").ip;
    // A route makes the kernel able to send IPv4, so only capture keeps the call from leaving.
    const route = `${POD_NETWORK}.2.0/24`;
    c.topology.exec(pod.netns, "ip", ["route", "add", route, "dev", "eth0"]);
    try {
      // eBPF rejects the connect itself, but nftables rejects its SYN with ICMP administratively prohibited.
      const refused = NFTABLES_CAPTURE ? "EHOSTUNREACH" : "EPERM";
      t.is(await connectFrom("client6", api4, APP_PORT, 4), refused);
      t.is(await connectFrom("client6", `::ffff:${api4}`, APP_PORT, 6), refused);
      // Loopback stays inside the pod, as for every enrolled pod.
      t.is(await connectFrom("client6", "127.0.0.1", 1, 4), "ECONNREFUSED");
    } finally {
      c.topology.exec(pod.netns, "ip", ["route", "del", route, "dev", "eth0"], { allowFail: true });
    }
    const reached = c.auditRecords("v6o2").filter((record) => record.dst.addr === `${api4}:${APP_PORT}` && record.src.workload === "client6");
    t.deepEqual(reached, [], "an IPv4 connection of the IPv6-only pod reached the server's agent");
  });

  test.serial("IPv6-only pod stays captured across a restart", async (t) => {
    const c = theCluster();
    await c.agent("v6o2").kill();
    const plaintext = await curl(c.topology, "legacy", urlOf("db6"), 3);
    t.not(plaintext.exitCode, 0, "IPv6 plaintext reached the IPv6-only pod while its agent was down");
    await c.restartAgent("v6o2", ["api", "db6"]);
    const served = await curl(c.topology, "client6", urlOf("db6"));
    t.is(served.exitCode, 0, served.stderr);
    const allowed = await curl(c.topology, "legacy", urlOf("db6"));
    t.is(allowed.exitCode, 0, allowed.stderr);
  });

  if (NFTABLES_CAPTURE) {
    test.serial("nftables table of the IPv6-only pod", (t) => {
      const c = theCluster();
      const pod = c.topology.pod("db6");
      const cookie = configDump("v6o2").enrolled.find((entry) => entry.workload === "backend/db6")?.cookie;
      const listed = nftStatePods("v6o2").filter((entry) => entry.cookie === cookie);
      t.deepEqual(
        listed.map((entry) => [entry.podIp, entry.podIp6, entry.state]),
        [[ip6Of("db6"), ip6Of("db6"), "captured"]],
        "the state folder does not keep db6 under its IPv6 address",
      );
      const table = nftCaptureTable(`/var/run/netns/${pod.netns}`) ?? "";
      t.true(table.includes(`elements = { ${ip6Of("db6")} }`), table);
      t.true(table.includes("meta nfproto ipv4 meta l4proto tcp drop"), `inbound IPv4 is not dropped:\n${table}`);
      t.regex(table, /ip daddr != 127\.0\.0\.0\/8 reject with icmp admin-prohibited/, "outbound IPv4 is not rejected");
      t.notRegex(table, new RegExp(`ip [sd]addr ${POD_NETWORK.replaceAll(".", "\\.")}`), "the table names an IPv4 pod address");
    });
  }

  test.serial("opt-out releases the IPv6-only pod", async (t) => {
    const c = theCluster();
    const pod = c.topology.pod("client6");
    const node = c.agent("v6o1");
    const cookie = configDump("v6o1").enrolled.find((entry) => entry.workload === "shop/client6")?.cookie;
    t.truthy(cookie, "shop/client6 is not enrolled");

    const mark = node.lines.length;
    pod.labels = { "istio.io/dataplane-mode": "none" };
    writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
    await node.waitForLog((line) => line.msg === "workload unenrolled" && line.workload === "shop/client6", 10_000, "unenrollment of shop/client6", mark);

    t.false(configDump("v6o1").enrolled.some((entry) => entry.workload === "shop/client6"), "agentctl config still lists shop/client6");
    if (NFTABLES_CAPTURE) {
      t.is(nftCaptureTable(`/var/run/netns/${pod.netns}`), undefined, "the released pod kept its nftables table");
      t.deepEqual(nftStatePods("v6o1").filter((entry) => entry.cookie === cookie), [], "the released pod kept its nftables state file");
    } else {
      t.false(fs.existsSync(path.join(c.pinRoot("v6o1"), "links", `sk_lookup-${cookie}`)), "the released pod kept its sk_lookup link");
    }
    // Outside the mesh, its call reaches db6's plaintext port directly.
    const direct = await curl(c.topology, "client6", urlOf("db6"));
    t.is(direct.exitCode, 0, direct.stderr);
    const inbound = await c.waitForAudit("v6o2", (record) => record.transport === "plaintext" && String(record.src.addr).startsWith(`[${ip6Of("client6")}]:`));
    t.is(inbound.dst.addr, `[${ip6Of("db6")}]:${APP_PORT}`);
  });
}

test.serial("teardown leaves no namespace or pin", async (t) => {
  const c = theCluster();
  const pinRoots = [...c.topology.nodes.keys()].map((node) => c.pinRoot(node));
  await c.destroy();
  t.deepEqual(listNetns().filter((name) => name.startsWith(PREFIX)), []);
  for (const pinRoot of pinRoots) t.false(fs.existsSync(pinRoot), `${pinRoot} still exists`);
});
