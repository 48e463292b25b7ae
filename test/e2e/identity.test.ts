// Workload identity end to end. Two agents get their pods' certificates from an Istio CA over gRPC
// (the protocol-faithful stand-in in test/harness/istio-ca-server.ts) and rotate them every few
// seconds under traffic. They ride out a failing CA and a CA that signs for the wrong identity, and
// never write a key or the token to a log or an audit record.
//
// The agents run inside the node namespaces, where 127.0.0.1 is the namespace's own loopback. A
// small forwarder listens on 127.0.0.1:15012 inside each node namespace and passes connections to
// the CA on the host's loopback.

import test from "ava";
import { status as grpcStatus } from "@grpc/grpc-js";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { loadNative, netnsSocket } from "../../agent/capture/native";
import { testPrefixFamily } from "../harness/agent-process";
import { curl, startHttpServer, writeRandomFile } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { IstioCaServer } from "../harness/istio-ca-server";
import type { NamespaceSpec } from "../harness/manifests";
import { listenOn } from "../harness/netns-sockets";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aaid");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CA_PORT_IN_NODE = 15012;
const CLUSTER_ID = "aa-test-cluster";
/** Certificates live 20 s, so each is re-issued every 10 s or so. */
const CERT_TTL_SECONDS = 20;
const TOKEN = `test-token-${process.pid}-${Date.now().toString(36)}-k7Qz`;
const AGENT_IDENTITY = { trustDomain: "cluster.local", namespace: "istio-system", serviceAccount: "ztunnel" };
const CLIENT_ID = "spiffe://cluster.local/ns/id-client/sa/client";
const SERVER_ID = "spiffe://cluster.local/ns/id-server/sa/server";

const NODES: NodeSpec[] = [
  { name: "id-n1", pods: [{ name: "client", namespace: "id-client", serviceAccount: "client" }] },
  { name: "id-n2", pods: [{ name: "server", namespace: "id-server", serviceAccount: "server" }] },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "id-client", ambient: true },
  { name: "id-server", ambient: true },
];

/** Reads a URL 16 KiB every 100 ms and prints the body's SHA-256: one slow, long-lived connection. */
const SLOW_DOWNLOAD = `
import hashlib, sys, time, urllib.request
digest = hashlib.sha256()
with urllib.request.urlopen(sys.argv[1], timeout=30) as response:
    while True:
        chunk = response.read(16384)
        if not chunk:
            break
        digest.update(chunk)
        time.sleep(0.1)
print(digest.hexdigest())
`;

let cluster: Cluster | undefined;
let ca: IstioCaServer | undefined;
const forwarders: net.Server[] = [];
let blobSha = "";

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function theCa(): IstioCaServer {
  if (!ca) throw new Error("the CA was not started; see the first failure");
  return ca;
}

/** Listens on 127.0.0.1:15012 inside a node namespace and passes each connection to the CA on the host. */
async function forwardCaInto(netns: string, caPort: number): Promise<void> {
  const forwarder = net.createServer((inbound) => {
    const outbound = net.connect(caPort, "127.0.0.1");
    inbound.on("error", () => outbound.destroy());
    outbound.on("error", () => inbound.destroy());
    inbound.pipe(outbound).pipe(inbound);
  });
  forwarders.push(forwarder);
  await listenOn(forwarder, netnsSocket(`/var/run/netns/${netns}`, { agentSocket: false, bindIp: "127.0.0.1", port: CA_PORT_IN_NODE, backlog: 64 }));
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  loadNative();
  // Leaves signed by an intermediate, as with a plugged-in CA: peers must verify through it.
  ca = await IstioCaServer.start({ tokens: { [TOKEN]: AGENT_IDENTITY }, trustedNodeAccounts: [AGENT_IDENTITY], clusterId: CLUSTER_ID, intermediate: true });
  const caPort = Number(ca.address.split(":").pop());
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), `${PREFIX}-`));
  const tokenFile = path.join(workDir, "istio-token");
  const rootFile = path.join(workDir, "ca-root.pem");
  fs.writeFileSync(tokenFile, TOKEN, { mode: 0o600 });
  fs.writeFileSync(rootFile, ca.tlsRootPem);
  const agentArgs = [
    "--ca-address", `127.0.0.1:${CA_PORT_IN_NODE}`,
    "--ca-server-name", "istiod.istio-system.svc",
    "--ca-root-cert", rootFile,
    "--ca-token-file", tokenFile,
    "--cluster-id", CLUSTER_ID,
    "--cert-ttl", String(CERT_TTL_SECONDS),
  ];
  cluster = Cluster.create({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES, workDir, agentArgs });
  for (const node of cluster.topology.nodes.values()) await forwardCaInto(node.netns, caPort);
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "hello.txt"), "hello\n");
  blobSha = writeRandomFile(path.join(site, "blob.bin"), 5 * 1024 * 1024);
  await startHttpServer(cluster.topology, "server", site, 8080);
  await cluster.startAgents(["client", "server"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
  for (const forwarder of forwarders) forwarder.close();
  await ca?.close();
});

function serverUrl(file: string): string {
  return `http://${theCluster().topology.pod("server").ip}:8080/${file}`;
}

/** Requests of the CA for `identity` so far. */
function requestsFor(identity: string) {
  return theCa().requests.filter((request) => request.csrIdentity === identity);
}

async function waitFor(condition: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

test.serial("Istio CA requests carry token, cluster id and impersonation", async (t) => {
  const result = await curl(theCluster().topology, "client", serverUrl("hello.txt"));
  t.is(result.status, 200, result.stderr);

  for (const identity of [CLIENT_ID, SERVER_ID]) {
    const [first] = requestsFor(identity);
    t.truthy(first, `a request for ${identity}`);
    t.true(first.tokenOk);
    t.is(first.token, TOKEN);
    t.is(first.clusterId, CLUSTER_ID);
    t.is(first.impersonatedIdentity, identity);
    t.is(first.csrNameCount, 1);
    t.is(first.ttlSeconds, CERT_TTL_SECONDS);
    t.is(first.issuedIdentity, identity);
  }
  const record = await theCluster().waitForAudit("id-n2", (entry) => entry.direction === "inbound" && entry.dst.workload === "server");
  t.is(record.src.identity, CLIENT_ID);
  t.is(record.decision, "allow");
});

test.serial("rotation keeps a download and new connections working", async (t) => {
  const c = theCluster();
  const before = requestsFor(CLIENT_ID).length + requestsFor(SERVER_ID).length;
  const rotatedFrom = (node: string) => c.agent(node).lines.length;
  const startLines = { n1: rotatedFrom("id-n1"), n2: rotatedFrom("id-n2") };
  // About 32 s at 160 KiB/s: the stream outlives a rotation on each side by more than the 20 s PING timeout.
  const download = c.topology.spawn(c.topology.pod("client").netns, "python3", ["-c", SLOW_DOWNLOAD, serverUrl("blob.bin")]);
  let downloadOutput = "";
  download.stdout!.on("data", (chunk: Buffer) => (downloadOutput += chunk.toString()));
  const downloadDone = new Promise<number | null>((resolve) => download.once("exit", resolve));

  const failures: string[] = [];
  let requests = 0;
  while (download.exitCode === null && requests < 200) {
    const result = await curl(c.topology, "client", serverUrl("hello.txt"), 5);
    requests += 1;
    if (result.status !== 200) failures.push(`exit ${result.exitCode} status ${result.status}: ${result.stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 150));
  }

  t.is(await downloadDone, 0);
  t.is(downloadOutput.trim(), blobSha, "the long download is byte-exact across rotations");
  t.deepEqual(failures, [], `${failures.length} of ${requests} new connections failed`);
  t.true(requests >= 20, `only ${requests} requests`);
  t.true(requestsFor(CLIENT_ID).length + requestsFor(SERVER_ID).length >= before + 2, "both identities were re-issued");
  const rotated = (node: string, from: number, message: string) => c.agent(node).lines.slice(from).some((line) => line.msg === message);
  t.true(rotated("id-n1", startLines.n1, "workload certificate rotated"), "the client's certificate rotated");
  t.true(rotated("id-n2", startLines.n2, "inbound HBONE certificate rotated"), "the server's listener took its new certificate");
});

test.serial("failing CA retried with growing delays", async (t) => {
  const c = theCluster();
  const from = c.agent("id-n1").lines.length;
  const serverFrom = c.agent("id-n2").lines.length;
  theCa().failNext(6, grpcStatus.UNAVAILABLE, "istiod is restarting");
  const failed = () =>
    c
      .agent("id-n1")
      .lines.slice(from)
      .filter((line) => line.msg?.startsWith("workload certificate refresh failed") && line.identity === CLIENT_ID);

  const failures: string[] = [];
  const deadline = Date.now() + CERT_TTL_SECONDS * 1000;
  while (failed().length < 2 && Date.now() < deadline) {
    const result = await curl(c.topology, "client", serverUrl("hello.txt"), 5);
    if (result.status !== 200) failures.push(`exit ${result.exitCode}: ${result.stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }

  const lines = failed();
  t.true(lines.length >= 2, "two refreshes failed");
  t.deepEqual(failures, [], "connections kept working on the current certificate");
  const [first, second] = lines.map((line) => Number(line.retryInMs));
  t.true(first >= 800 && first <= 1200, `first retry after ${first} ms`);
  t.true(second >= 1600 && second <= 2400, `second retry after ${second} ms`);
  await c.agent("id-n1").waitForLog((line) => line.msg === "workload certificate rotated" && line.identity === CLIENT_ID, 20_000, "a rotation after the CA recovered", from);
  // Both sides hold a fresh certificate again before the next test makes the CA misbehave.
  await c.agent("id-n2").waitForLog((line) => line.msg === "workload certificate rotated" && line.identity === SERVER_ID, 20_000, "the server's rotation", serverFrom);
});

test.serial("CA response for another identity rejected", async (t) => {
  const c = theCluster();
  const from = c.agent("id-n1").lines.length;
  theCa().wrongIdentity(true);
  try {
    const rejected = await c
      .agent("id-n1")
      .waitForLog((line) => line.msg?.startsWith("workload certificate refresh failed") === true && line.identity === CLIENT_ID, CERT_TTL_SECONDS * 1000, "a rejected answer", from);
    t.is(rejected.code, "IDENTITY_ERROR");
    t.regex(String(rejected.error), /the leaf certificate is for spiffe:\/\/\S+, not the requested spiffe:\/\/cluster\.local\/ns\/id-client\/sa\/client/);
    const result = await curl(c.topology, "client", serverUrl("hello.txt"), 5);
    t.is(result.status, 200, result.stderr);
  } finally {
    theCa().wrongIdentity(false);
  }
  await c.agent("id-n1").waitForLog((line) => line.msg === "workload certificate rotated" && line.identity === CLIENT_ID, 20_000, "a rotation with a correct answer", from);
});

test.serial("no key, CSR or token in logs or audit", (t) => {
  const c = theCluster();
  const texts = fs
    .readdirSync(c.workDir)
    .filter((name) => name.endsWith(".log") || name.endsWith(".jsonl"))
    .map((name) => ({ name, text: fs.readFileSync(path.join(c.workDir, name), "utf8") }));
  t.true(texts.length >= 4, "both agents' logs and audit files were read");
  t.true(texts.some(({ text }) => text.includes("workload certificate issued")), "the logs cover issuance");
  for (const { name, text } of texts) {
    t.false(text.includes(TOKEN), `${name} contains the token`);
    t.false(text.includes("PRIVATE KEY"), `${name} contains a PEM private key`);
    t.false(text.includes("CERTIFICATE REQUEST"), `${name} contains a CSR`);
    // Every PKCS#8 ECDSA P-256 key starts with these bytes, whatever its value.
    t.false(text.includes("MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH"), `${name} contains a PKCS#8 key in base64`);
    t.false(/bearer\s+\S/i.test(text), `${name} contains an authorization header`);
  }
});
