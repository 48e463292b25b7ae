// End to end on the real kernel: two nodes, pods as network namespaces, one agent process per node,
// real eBPF capture, real TLS, curl and python3's HTTP server as the applications.

import test, { type ExecutionContext } from "ava";
import { execFileSync, spawnSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { AGENT_BIN, AGENTCTL_BIN, NFTABLES_CAPTURE, TEST_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { curl, PacketCapture, sha256, startHttpServer, writeRandomFile } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { namespaceYaml, podsYaml, writeManifest } from "../harness/manifests";
import { DENY_SCRAPER_POLICY, SCENARIO_ENROLLED, SCENARIO_NAMESPACES, SCENARIO_NODES, SCENARIO_POLICIES } from "../harness/scenario";
import { listNetns } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aae2e");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const MARKER = "plaintext-marker-7f3a9c1e";
const BLOB_SIZE = 20 * 1024 * 1024;


const STRICT_MTLS = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: backend
spec:
  mtls:
    mode: STRICT
`;

let cluster: Cluster | undefined;
let blobSha = "";
const agentPids: number[] = [];

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function dbUrl(file: string): string {
  return `http://${theCluster().topology.pod("db").ip}:8080/${file}`;
}

function apiUrl(file: string): string {
  return `http://${theCluster().topology.pod("api").ip}:8080/${file}`;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: SCENARIO_NODES,
    namespaces: SCENARIO_NAMESPACES,
    extraManifests: { "policies.yaml": SCENARIO_POLICIES },
  });
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "marker.html"), `${MARKER}\n`.repeat(64));
  blobSha = writeRandomFile(path.join(site, "blob.bin"), BLOB_SIZE);
  await startHttpServer(cluster.topology, "api", site, 8080);
  await startHttpServer(cluster.topology, "db", site, 8080);
  await cluster.startAgents(SCENARIO_ENROLLED);
  for (const agent of cluster.agents.values()) if (agent.pid) agentPids.push(agent.pid);
  cluster.onAgentSpawned = (pid) => agentPids.push(pid);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("enrolled pods talk over mTLS HBONE across nodes", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "node-link.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node("node1").netns, "n-link", pcap);
  const result = await curl(c.topology, "web", apiUrl("marker.html"));
  await capture.stop();

  t.is(result.exitCode, 0, result.stderr);
  t.is(result.status, 200);
  t.true(result.body.toString().includes(MARKER));

  const raw = fs.readFileSync(pcap);
  t.false(raw.includes(Buffer.from(MARKER)), "application bytes crossed the node link in plaintext");
  const ports = execFileSync("tshark", ["-r", pcap, "-T", "fields", "-e", "tcp.dstport", "-e", "tcp.srcport"], { encoding: "utf8" })
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => line.split("\t").map(Number));
  t.true(ports.length > 0, `no packet crossed the node link (${raw.length} bytes of capture)`);
  t.true(ports.every(([dst, src]) => dst === 15008 || src === 15008), `traffic on ports other than 15008: ${JSON.stringify(ports.slice(0, 5))}`);
  const tls = execFileSync(
    "tshark",
    ["-r", pcap, "-d", "tcp.port==15008,tls", "-Y", "tls.handshake.type == 1", "-T", "fields", "-e", "tls.handshake.extensions.supported_version", "-e", "tls.handshake.extensions_alpn_str"],
    { encoding: "utf8" },
  );
  t.regex(tls, /0x0304/, "the client hello does not offer TLS 1.3");
  t.regex(tls, /h2/, "the client hello does not offer ALPN h2");

  const inbound = await c.waitForAudit("node2", (record) => record.direction === "inbound" && record.src.addr.startsWith(c.topology.pod("web").ip + ":"));
  t.is(inbound.decision, "allow");
  t.is(inbound.policy, "backend/api-allow-web");
  t.is(inbound.src.identity, "spiffe://cluster.local/ns/shop/sa/web");
  t.is(inbound.transport, "hbone");
  const outbound = await c.waitForAudit("node1", (record) => record.direction === "outbound" && record.src.workload === "web");
  t.is(outbound.transport, "hbone");
  t.is(outbound.dst.addr, `${c.topology.pod("api").ip}:8080`);
  t.is(outbound.dst.identity, "spiffe://cluster.local/ns/backend/sa/api");
});

test.serial("policy deny resets the client and writes a deny record", async (t) => {
  const c = theCluster();
  const result = await curl(c.topology, "scraper", apiUrl("marker.html"));
  t.not(result.exitCode, 0);
  t.is(result.status, 0);
  t.regex(result.stderr, /reset by peer|Recv failure|Empty reply/i);

  const inbound = await c.waitForAudit("node2", (record) => record.direction === "inbound" && record.src.identity === "spiffe://cluster.local/ns/shop/sa/scraper");
  t.is(inbound.decision, "deny");
  t.is(inbound.policy, "backend/deny-scraper");
  t.is(inbound.bytes_sent, 0);
  const outbound = await c.waitForAudit("node1", (record) => record.direction === "outbound" && record.src.workload === "scraper");
  t.is(outbound.decision, "deny");
});

test.serial("pod outside the mesh is not captured outbound", async (t) => {
  const c = theCluster();
  const legacyIp = c.topology.pod("legacy").ip;
  const result = await curl(c.topology, "legacy", dbUrl("marker.html"));
  t.is(result.exitCode, 0, result.stderr);
  t.true(result.body.toString().includes(MARKER));

  const inbound = await c.waitForAudit("node2", (record) => String(record.src.addr).startsWith(legacyIp + ":"));
  const captured = c.auditRecords("node1").filter((record) => String(record.src.addr).startsWith(legacyIp + ":"));
  t.deepEqual(captured, [], "a connection of the legacy pod went through its node's agent");
  t.is(inbound.transport, "plaintext");
  t.is(inbound.src.identity, undefined);
  t.is(inbound.decision, "allow");
  t.is(inbound.reason, "no_policy");
});

test.serial("plaintext to a policed pod is denied at its inbound", async (t) => {
  const c = theCluster();
  const legacyIp = c.topology.pod("legacy").ip;
  const result = await curl(c.topology, "legacy", apiUrl("marker.html"));
  t.not(result.exitCode, 0);
  t.is(result.status, 0);

  const inbound = await c.waitForAudit("node2", (record) => String(record.src.addr).startsWith(legacyIp + ":") && record.decision === "deny");
  t.is(inbound.transport, "plaintext");
  t.is(inbound.reason, "no_allow_match");
  t.is(inbound.bytes_sent, 0);
});

test.serial("STRICT PeerAuthentication rejects plaintext live", async (t) => {
  const c = theCluster();
  const node2 = c.agent("node2");
  const mark = node2.lines.length;
  writeManifest(c.manifestsDir, "strict.yaml", STRICT_MTLS);
  await node2.waitForLog((entry) => entry.msg === "configuration updated", 10_000, "the PeerAuthentication", mark);

  const plaintext = await curl(c.topology, "legacy", dbUrl("marker.html"));
  t.not(plaintext.exitCode, 0, "plaintext reached a STRICT pod");
  const record = await c.waitForAudit("node2", (entry) => entry.reason === "mtls_required");
  t.is(record.decision, "deny");
  t.is(record.error.code, "MTLS_REQUIRED");
  const mutual = await curl(c.topology, "web", dbUrl("marker.html"));
  t.is(mutual.exitCode, 0, mutual.stderr);

  fs.rmSync(path.join(c.manifestsDir, "strict.yaml"));
  await node2.waitForLog((entry) => entry.msg === "configuration updated", 10_000, "the PeerAuthentication removal", node2.lines.length);
});

test.serial("agent connections are never captured again", async (t) => {
  const c = theCluster();
  const result = await curl(c.topology, "web", apiUrl("marker.html"));
  t.is(result.exitCode, 0, result.stderr);
  await new Promise((resolve) => setTimeout(resolve, 500));
  const looped = c.auditRecords("node1").filter((record) => String(record.dst.addr).endsWith(":15008") || String(record.dst.addr).endsWith(":15001"));
  t.deepEqual(looped, [], "the outbound proxy's own tunnel connection was captured");
  const node2Outbound = c.auditRecords("node2").filter((record) => record.direction === "outbound");
  t.deepEqual(node2Outbound, [], "the inbound proxy's connection to the application was captured outbound");
  const apiIp = c.topology.pod("api").ip;
  const recaptured = c.auditRecords("node2").filter((record) => String(record.src.addr).startsWith(apiIp + ":"));
  t.deepEqual(recaptured, [], "the inbound proxy's connection to the application was captured inbound");
});

test.serial("20 MB transfer arrives byte-exact", async (t) => {
  const c = theCluster();
  const result = await curl(c.topology, "web", apiUrl("blob.bin"), 60);
  t.is(result.exitCode, 0, result.stderr);
  t.is(result.body.length, BLOB_SIZE);
  t.is(sha256(result.body), blobSha);
  const inbound = await c.waitForAudit("node2", (record) => record.direction === "inbound" && record.bytes_recv >= BLOB_SIZE);
  t.true(inbound.bytes_recv >= BLOB_SIZE, "bytes_recv counts the bytes from the application back to the client");
});

/**
 * Formats the last records since `marks` (record counts per node) whose error is not STREAM_RESET, for
 * a failure message. The resetting clients below make hundreds of STREAM_RESET records.
 */
function failedRecords(c: ReturnType<typeof theCluster>, marks: Record<string, number>): string {
  const failed = (node: string): string =>
    JSON.stringify(c.auditRecords(node).slice(marks[node]).filter((record) => record.error !== undefined && record.error.code !== "STREAM_RESET").slice(-4));
  return `\nnode1 failures: ${failed("node1")}\nnode2 failures: ${failed("node2")}`;
}

test.serial("bytes of a client that closes at once arrive", async (t) => {
  // A client that writes and closes before the agent accepts its connection finishes its socket
  // at once. The agent must still find where the connection was going, so that the bytes arrive.
  const c = theCluster();
  const port = 9071;
  const marks = { node1: c.auditRecords("node1").length, node2: c.auditRecords("node2").length };
  const connections = 300;
  const size = 100;
  const server = c.topology.spawn(c.topology.pod("db").netns, "python3", [
    "-u",
    "-c",
    [
      "import socket, sys",
      "server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
      "server.bind(('0.0.0.0', int(sys.argv[1]))); server.listen(512); total = 0; print(0, flush=True)",
      "while True:",
      "    connection, _ = server.accept()",
      // The resetting clients below may reset a connection before the server read it.
      "    try:",
      "        while (chunk := connection.recv(65536)): total += len(chunk)",
      "    except ConnectionResetError:",
      "        pass",
      "    connection.close(); print(total, flush=True)",
    ].join("\n"),
    String(port),
  ], { stdio: ["ignore", "pipe", "ignore"] });
  let received = -1;
  let output = "";
  server.stdout!.on("data", (chunk: Buffer) => {
    // A chunk may end inside a line, so only whole lines are read.
    output += chunk.toString();
    const lines = output.split("\n");
    output = lines.pop()!;
    if (lines.length > 0) received = Number(lines[lines.length - 1]);
  });
  try {
    // The server prints 0 once it listens.
    const listening = Date.now() + 10_000;
    while (received < 0 && Date.now() < listening) await new Promise((resolve) => setTimeout(resolve, 50));
    t.is(received, 0, "the byte-counting server did not start");
    const client = [
      "import socket, sys",
      "for _ in range(int(sys.argv[3])):",
      "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)",
      `    s.sendall(b"x" * ${size}); s.close()`,
    ].join("\n");
    const sent = spawnSync("ip", ["netns", "exec", c.topology.pod("web").netns, "python3", "-c", client, c.topology.pod("db").ip, String(port), String(connections)], {
      encoding: "utf8",
      timeout: 60_000,
    });
    if (sent.status !== 0) t.fail(`the client exited with ${sent.status}: ${sent.stderr}${failedRecords(c, marks)}`);
    const deadline = Date.now() + 15_000;
    while (received < connections * size && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
    t.is(received, connections * size);
    // Clients that reset at once (SO_LINGER 0), also after their own FIN, leave no original
    // destination behind either.
    const linger = 's.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00")';
    for (const ending of [`${linger}; s.close()`, `s.shutdown(socket.SHUT_WR); ${linger}; s.close()`]) {
      const resetting = client.replace("s.close()", ending);
      const reset = spawnSync("ip", ["netns", "exec", c.topology.pod("web").netns, "python3", "-c", resetting, c.topology.pod("db").ip, String(port), String(connections)], {
        encoding: "utf8",
        timeout: 60_000,
      });
      if (reset.status !== 0) t.fail(`the resetting client exited with ${reset.status}: ${reset.stderr}${failedRecords(c, marks)}`);
    }
    if (!NFTABLES_CAPTURE) {
      let left = -1;
      const leftDeadline = Date.now() + 10_000;
      do {
        await new Promise((resolve) => setTimeout(resolve, 200));
        const dump = execFileSync("bpftool", ["-j", "map", "dump", "pinned", path.join(c.pinRoot("node1"), "maps", "aa_orig_dst")], { encoding: "utf8" });
        left = (JSON.parse(dump) as unknown[]).length;
      } while (left > 0 && Date.now() < leftDeadline);
      t.is(left, 0, "original destinations left in aa_orig_dst");
    }
  } finally {
    server.kill("SIGKILL");
  }
});

test.serial("sequential connections share one pooled HBONE connection", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "pool.pcap");
  const capture = await PacketCapture.start(c.topology, c.topology.node("node1").netns, "n-link", pcap);
  const results = [];
  for (let index = 0; index < 5; index += 1) results.push(await curl(c.topology, "web", apiUrl("marker.html")));
  await capture.stop();

  for (const result of results) t.is(result.exitCode, 0, result.stderr);
  const hellos = execFileSync("tshark", ["-r", pcap, "-d", "tcp.port==15008,tls", "-Y", "tls.handshake.type == 1", "-T", "fields", "-e", "frame.number"], {
    encoding: "utf8",
  })
    .split("\n")
    .filter((line) => line.trim() !== "");
  // Earlier tests may have left a pooled connection from web to api open: then no handshake at all.
  t.true(hellos.length <= 1, `${hellos.length} TLS handshakes for 5 connections; the pool should reuse one connection`);
  const syns = execFileSync("tshark", ["-r", pcap, "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0 && tcp.dstport == 15008", "-T", "fields", "-e", "frame.number"], {
    encoding: "utf8",
  })
    .split("\n")
    .filter((line) => line.trim() !== "");
  t.true(syns.length <= 1, `${syns.length} TCP connections to 15008 for 5 tunnelled connections`);
});

test.serial("invalid manifest is rejected and last good state serves", async (t) => {
  const c = theCluster();
  const bad = `apiVersion: v1\nkind: Pod\nmetadata:\n  name: broken\n  namespace: shop\nspec:\n  nodeName: node1\nstatus:\n  podIP: 10.244.1.999\n`;
  const mark = c.agent("node1").lines.length;
  writeManifest(c.manifestsDir, "broken.yaml", bad);
  const line = await c.agent("node1").waitForLog(
    (entry) => typeof entry.msg === "string" && entry.msg.includes("broken.yaml"),
    10_000,
    "the rejection of broken.yaml",
    mark,
  );
  t.regex(String(line.msg), /broken\.yaml/);
  t.regex(String(line.msg), /Pod shop\/broken/);
  t.regex(String(line.msg), /status\.podIP/);
  const result = await curl(c.topology, "web", apiUrl("marker.html"));
  t.is(result.exitCode, 0, result.stderr);
  fs.rmSync(path.join(c.manifestsDir, "broken.yaml"));
});

test.serial("policy change applies live", async (t) => {
  const c = theCluster();
  const node2 = c.agent("node2");
  const denyWeb = DENY_SCRAPER_POLICY.replace("deny-scraper", "deny-web-now").replace("sa/scraper", "sa/web");
  let mark = node2.lines.length;
  writeManifest(c.manifestsDir, "deny-web.yaml", denyWeb);
  await node2.waitForLog((entry) => entry.msg === "configuration updated" && entry.policies === 3, 10_000, "the new policy", mark);
  const denied = await curl(c.topology, "web", apiUrl("marker.html"));
  t.not(denied.exitCode, 0);
  const record = await c.waitForAudit("node2", (entry) => entry.policy === "backend/deny-web-now");
  t.is(record.decision, "deny");

  mark = node2.lines.length;
  fs.rmSync(path.join(c.manifestsDir, "deny-web.yaml"));
  await node2.waitForLog((entry) => entry.msg === "configuration updated" && entry.policies === 2, 10_000, "the policy removal", mark);
  const allowed = await curl(c.topology, "web", apiUrl("marker.html"));
  t.is(allowed.exitCode, 0, allowed.stderr);
});

test.serial("SIGHUP re-reads the manifests and keeps serving", async (t) => {
  const c = theCluster();
  const node2 = c.agent("node2");
  const mark = node2.lines.length;
  node2.signal("SIGHUP");
  await node2.waitForLog((entry) => entry.msg === "re-reading the manifests and the CA folder", 10_000, "the reload", mark);
  t.true(node2.running);
  const result = await curl(c.topology, "web", apiUrl("marker.html"));
  t.is(result.exitCode, 0, result.stderr);
});

test.serial("namespace label and pod opt-out apply live", async (t) => {
  const c = theCluster();
  const node1 = c.agent("node1");
  const webIp = c.topology.pod("web").ip;
  const unenrolled = (uid: string, from: number) =>
    node1.waitForLog((entry) => entry.msg === "workload unenrolled" && entry.workload === uid, 10_000, `unenrollment of ${uid}`, from);

  // Without the namespace label, web is outside the mesh: its call to db is plaintext and not captured on node1.
  let mark = node1.lines.length;
  writeManifest(c.manifestsDir, "namespaces.yaml", SCENARIO_NAMESPACES.map((spec) => namespaceYaml({ ...spec, ambient: spec.ambient && spec.name !== "shop" })).join("---\n"));
  await unenrolled("shop/web", mark);
  const plaintext = await curl(c.topology, "web", dbUrl("marker.html"));
  t.is(plaintext.exitCode, 0, plaintext.stderr);
  const inbound = await c.waitForAudit("node2", (record) => String(record.src.addr).startsWith(webIp + ":") && record.transport === "plaintext");
  t.is(inbound.src.identity, undefined);
  t.deepEqual(c.auditRecords("node1").filter((record) => record.src.addr === inbound.src.addr), [], "node1 captured an unenrolled pod");

  // The label back: web is enrolled again and reaches api over mTLS.
  mark = node1.lines.length;
  writeManifest(c.manifestsDir, "namespaces.yaml", SCENARIO_NAMESPACES.map(namespaceYaml).join("---\n"));
  await c.waitEnrolled(["web"], () => mark);
  const mutual = await curl(c.topology, "web", apiUrl("marker.html"));
  t.is(mutual.exitCode, 0, mutual.stderr);

  // The pod label istio.io/dataplane-mode=none opts web out while its namespace stays ambient.
  mark = node1.lines.length;
  c.topology.pod("web").labels = { "istio.io/dataplane-mode": "none" };
  writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  await unenrolled("shop/web", mark);
  t.false(
    JSON.stringify(node1.lines.slice(mark)).includes('"msg":"workload enrolled","workload":"shop/web"'),
    "web was enrolled again despite its opt-out label",
  );

  mark = node1.lines.length;
  c.topology.pod("web").labels = {};
  writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  await c.waitEnrolled(["web"], () => mark);
});

test.serial("killed agent fails closed and a restart serves again", async (t) => {
  const c = theCluster();
  await c.agent("node2").kill();

  // Nothing serves db now: plaintext must not reach the application, and HBONE has no listener.
  const plaintext = await curl(c.topology, "legacy", dbUrl("marker.html"), 3);
  t.not(plaintext.exitCode, 0, "plaintext reached an enrolled pod while its agent was down");
  t.is(plaintext.status, 0);
  const mutual = await curl(c.topology, "web", dbUrl("marker.html"), 3);
  t.not(mutual.exitCode, 0);

  await c.restartAgent("node2", ["api", "db"]);
  const served = await curl(c.topology, "web", dbUrl("marker.html"));
  t.is(served.exitCode, 0, served.stderr);
  const allowed = await curl(c.topology, "legacy", dbUrl("marker.html"));
  t.is(allowed.exitCode, 0, allowed.stderr);

  await c.agent("node1").kill();
  const outbound = await curl(c.topology, "web", dbUrl("marker.html"), 3);
  t.is(outbound.exitCode, 7, `an enrolled pod's connection was not refused while its agent was down: ${outbound.stderr}`);
  await c.restartAgent("node1", ["web", "scraper"]);
  const again = await curl(c.topology, "web", dbUrl("marker.html"));
  t.is(again.exitCode, 0, again.stderr);
});

test.serial("second agent for a node is rejected", async (t) => {
  const c = theCluster();
  const first = c.agent("node1");
  const second = spawnSync(
    "nsenter",
    [`--net=/var/run/netns/${c.topology.node("node1").netns}`, "--", process.execPath, AGENT_BIN, "run", "--node", "node1", "--manifests", c.manifestsDir,
      "--ca-dir", c.caDir, "--audit-file", path.join(c.workDir, "second.jsonl"), "--audit-spool", path.join(c.workDir, "second-spool"), "--pin-root", `${c.pinRoot("node1")}-second`, "--admin", "127.0.0.1:15099",
      "--capture", TEST_CAPTURE],
    { encoding: "utf8", timeout: 20_000 },
  );
  t.is(second.status, 1, second.stderr);
  t.regex(second.stderr, /another agent \(PID \d+ in its own PID namespace\) already serves the node node1/);
  t.false(fs.existsSync(`${c.pinRoot("node1")}-second`), "the second agent attached capture before it gave up");
  t.true(first.running);

  // Removing capture under a running agent is refused, also through a symbolic link to its pin
  // root. nftables capture pins nothing, so there is nothing to remove.
  if (!NFTABLES_CAPTURE) assertPinnedCaptureKept(t, c);

  const result = await curl(c.topology, "web", apiUrl("marker.html"));
  t.is(result.exitCode, 0, result.stderr);
  const plaintext = await curl(c.topology, "legacy", apiUrl("marker.html"));
  t.not(plaintext.exitCode, 0, "the second agent opened a policed pod");
});

test.serial("pod whose listeners fail stays isolated", async (t) => {
  const c = theCluster();
  const db = c.topology.pod("db");
  const agent = c.agent("node2");
  if (!NFTABLES_CAPTURE) {
    // While db is enrolled, cgroup/bind4 keeps its proxy ports for the agent.
    const refused = spawnSync("ip", ["netns", "exec", db.netns, "python3", "-c", "import socket; socket.socket().bind(('0.0.0.0', 15008))"], { encoding: "utf8" });
    t.regex(refused.stderr, /Operation not permitted/, "a process in an enrolled pod bound its HBONE port");
  }

  // A process takes port 15008 while db is outside the mesh, so the agent cannot start db's
  // listeners when db joins again.
  let mark = agent.lines.length;
  db.labels = { "istio.io/dataplane-mode": "none" };
  writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  await agent.waitForLog((line) => line.msg === "workload unenrolled" && line.workload === "backend/db", 10_000, "unenrollment of db", mark);
  const squatter = c.topology.spawn(db.netns, "python3", [
    "-c",
    "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0',15008)); s.listen(); print('bound', flush=True); time.sleep(60)",
  ]);
  await waitForOutput(squatter, /bound/, "the process taking port 15008");
  db.labels = {};
  writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  await agent.waitForLog((line) => line.msg === "workload isolated until its listeners start" && line.workload === "backend/db", 10_000, "isolation of db");

  const plaintext = await curl(c.topology, "legacy", dbUrl("marker.html"), 3);
  t.not(plaintext.exitCode, 0, "plaintext reached a pod whose listeners failed");
  t.is(plaintext.status, 0);
  const squatted = await curl(c.topology, "legacy", `http://${c.topology.pod("db").ip}:15008/`, 3);
  t.is(squatted.exitCode, 7, `a process holding the HBONE port of an isolated pod was reachable: ${squatted.stderr}`);
  const outbound = spawnSync("ip", ["netns", "exec", c.topology.pod("db").netns, "curl", "-sS", "--max-time", "3", apiUrl("marker.html")], { encoding: "utf8" });
  t.not(outbound.status, 0, "an isolated pod reached another pod around the mesh");

  mark = agent.lines.length;
  squatter.kill("SIGKILL");
  await c.waitEnrolled(["db"], () => mark);
  const served = await curl(c.topology, "legacy", dbUrl("marker.html"));
  t.is(served.exitCode, 0, served.stderr);
});

/** Checks that `agentctl capture remove` refuses to remove the pins of a running agent, also through a symbolic link. */
function assertPinnedCaptureKept(t: ExecutionContext, c: Cluster): void {
  const link = path.join(c.workDir, "pin-root-link");
  fs.symlinkSync(c.pinRoot("node1"), link);
  const removal = spawnSync(process.execPath, [AGENTCTL_BIN, "capture", "remove", "--pin-root", link], { encoding: "utf8" });
  t.is(removal.status, 1);
  t.regex(removal.stderr, /serves .*; removing its capture would open its pods/);
  t.true(fs.existsSync(path.join(c.pinRoot("node1"), "links")));
}

/** Resolves once `child` prints a line matching `pattern`; rejects when it exits first or after 10 s. */
function waitForOutput(child: ChildProcess, pattern: RegExp, description: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let output = "";
    const timer = setTimeout(() => finish(new Error(`${description} printed nothing matching ${pattern} within 10 s: ${output}`)), 10_000);
    const onData = (chunk: Buffer): void => {
      output += chunk.toString();
      if (pattern.test(output)) finish();
    };
    const onExit = (code: number | null): void => finish(new Error(`${description} exited with code ${code}: ${output}`));
    const finish = (error?: Error): void => {
      clearTimeout(timer);
      child.stdout?.off("data", onData);
      child.stderr?.off("data", onData);
      child.off("exit", onExit);
      if (error) reject(error);
      else resolve();
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    child.once("exit", onExit);
  });
}

/** Returns the IDs of the programs behind the links pinned under `pinRoot`. */
function pinnedProgramIds(pinRoot: string): number[] {
  const links = path.join(pinRoot, "links");
  if (!fs.existsSync(links)) return [];
  return fs.readdirSync(links).map((name) => {
    const info = JSON.parse(execFileSync("bpftool", ["link", "show", "pinned", path.join(links, name), "-j"], { encoding: "utf8" }));
    return info.prog_id as number;
  });
}

test.serial("teardown leaves no namespace, pin or process", async (t) => {
  const c = theCluster();
  const pinRoots = [...c.topology.nodes.keys()].map((node) => c.pinRoot(node));
  const programIds = pinRoots.flatMap(pinnedProgramIds);
  if (!NFTABLES_CAPTURE) t.true(programIds.length >= 4, `expected pinned links of both agents, found programs ${programIds.join(", ")}`);

  await c.destroy();
  t.deepEqual(listNetns().filter((name) => name.startsWith(PREFIX)), []);
  for (const pinRoot of pinRoots) t.false(fs.existsSync(pinRoot), `${pinRoot} still exists`);
  for (const file of c.lockFiles()) t.false(fs.existsSync(file), `lock file ${file} still exists`);
  for (const pid of agentPids) t.false(fs.existsSync(`/proc/${pid}`) && !fs.readFileSync(`/proc/${pid}/stat`, "utf8").includes(") Z "), `agent ${pid} still runs`);
  // Other agents on the machine may attach programs of the same names, so compare IDs.
  const listing = execFileSync("bpftool", ["cgroup", "show", "/sys/fs/cgroup/unified", "-j"], { encoding: "utf8" }).trim();
  const attached = (listing === "" ? [] : JSON.parse(listing)) as { id: number }[];
  const left = attached.filter((program) => programIds.includes(program.id));
  t.deepEqual(left, [], "programs of this run are still attached to the cgroup");
});
