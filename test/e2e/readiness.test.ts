// End to end on the real kernel. The readiness server on 15021 returns 503, with a JSON body that
// names the failing check, until the configuration is read, capture is attached and every
// enrolled pod has a certificate. It returns 200 from then on, and 503 again once the agent stops.
// The metrics and readiness servers listen on the node's own address, and the admin API does not.
//
// Each test builds its own one-node cluster and removes it at its end. The clusters run one after
// the other because their pods get the same addresses. The Istio CA and the fake Kubernetes API
// server run in this process, so every command runs asynchronously to keep them serving.

import test from "ava";
import { execFile } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { loadNative, netnsSocket } from "../../agent/capture/native";
import { testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { IstioCaServer } from "../harness/istio-ca-server";
import type { NamespaceSpec } from "../harness/manifests";
import { listenOn } from "../harness/netns-sockets";
import { RoundClient, startRoundServer } from "../harness/round-trip";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aardy");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CA_PORT_IN_NODE = 15012;
const CLUSTER_ID = "aardy-cluster";
const TOKEN = `aardy-token-${process.pid}-${Date.now().toString(36)}`;
const AGENT_IDENTITY = { trustDomain: "cluster.local", namespace: "istio-system", serviceAccount: "ztunnel" };
const SERVER_PORT = 9000;
const NAMESPACES: NamespaceSpec[] = [{ name: "ready", ambient: true }];

/** The body of /healthz/ready on the readiness server, which every pod can reach, so it carries no detail. */
interface ReadinessBody {
  ready: boolean;
  checks: Record<string, boolean>;
  stopping?: boolean;
}

/** The admin API's /healthz/ready, with the details the readiness server leaves out. */
interface ReadinessDetail extends ReadinessBody {
  enrolled: number;
  pending: string[];
  kubernetes?: unknown;
}

/** Reads the admin API's detailed readiness inside the node's namespace. */
async function readinessDetail(cluster: Cluster, node: string): Promise<ReadinessDetail> {
  const probe = await httpGet(cluster.topology.node(node).netns, "http://127.0.0.1:15000/healthz/ready");
  return JSON.parse(probe.body) as ReadinessDetail;
}

interface Probe {
  /** The HTTP status; 0 when no response arrived. */
  status: number;
  body: string;
}

test.before(() => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  loadNative();
});

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Sends GET `url` with curl inside a network namespace, asynchronously; status 0 when no response arrived within 3 s. */
function httpGet(netns: string, url: string): Promise<Probe> {
  return new Promise((resolve) => {
    execFile("nsenter", [`--net=/var/run/netns/${netns}`, "--", "curl", "-sS", "--max-time", "3", "-w", "\n%{http_code}", url], { encoding: "utf8", timeout: 10_000 }, (_error, stdout) => {
      const newline = stdout.lastIndexOf("\n");
      resolve({ status: Number(stdout.slice(newline + 1)) || 0, body: stdout.slice(0, Math.max(newline, 0)) });
    });
  });
}

/** Returns the node's address on its pod bridge, which servers bound to 0.0.0.0 listen on and 127.0.0.1 ones do not. */
function nodeAddress(cluster: Cluster, node: string): string {
  return cluster.topology.node(node).podCidr.replace(/\.0\/24$/, ".1");
}

/** Reads /healthz/ready from the readiness server on the node's own address. */
async function readiness(cluster: Cluster, node: string): Promise<{ status: number; body: ReadinessBody | undefined; text: string }> {
  const probe = await httpGet(cluster.topology.node(node).netns, `http://${nodeAddress(cluster, node)}:15021/healthz/ready`);
  let body: ReadinessBody | undefined;
  try {
    body = JSON.parse(probe.body) as ReadinessBody;
  } catch {
    body = undefined;
  }
  return { status: probe.status, body, text: probe.body };
}

/** Polls the readiness until `predicate` holds; throws with the last response after `timeoutMs`. */
async function waitReadiness(
  cluster: Cluster,
  node: string,
  predicate: (response: Awaited<ReturnType<typeof readiness>>) => boolean,
  description: string,
  timeoutMs: number,
): Promise<Awaited<ReturnType<typeof readiness>>> {
  const deadline = Date.now() + timeoutMs;
  let last = await readiness(cluster, node);
  while (!predicate(last)) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${description}; last readiness: ${last.status} ${last.text}`);
    await sleep(200);
    last = await readiness(cluster, node);
  }
  return last;
}

/** Listens on 127.0.0.1:15012 inside a node namespace and passes each connection to the CA on the host. */
async function forwardCaInto(netns: string, caPort: number): Promise<net.Server> {
  const forwarder = net.createServer((inbound) => {
    const outbound = net.connect(caPort, "127.0.0.1");
    inbound.on("error", () => outbound.destroy());
    outbound.on("error", () => inbound.destroy());
    inbound.pipe(outbound).pipe(inbound);
  });
  await listenOn(forwarder, netnsSocket(`/var/run/netns/${netns}`, { agentSocket: false, bindIp: "127.0.0.1", port: CA_PORT_IN_NODE, backlog: 64 }));
  return forwarder;
}

test.serial("certificates wait for the CA", async (t) => {
  const node = "aardy-ca";
  const ca = await IstioCaServer.start({ tokens: { [TOKEN]: AGENT_IDENTITY }, trustedNodeAccounts: [AGENT_IDENTITY], clusterId: CLUSTER_ID });
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), `${PREFIX}c-`));
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
  ];
  const nodes: NodeSpec[] = [{ name: node, pods: [{ name: "app", namespace: "ready", serviceAccount: "app" }] }];
  const cluster = Cluster.create({ prefix: `${PREFIX}c`, nodes, namespaces: NAMESPACES, workDir, agentArgs });
  let forwarder: net.Server | undefined;
  try {
    // Nothing listens on the CA address inside the node yet, so every certificate request is refused.
    const started = cluster.startAgents(["app"]);
    started.catch(() => undefined);
    const waiting = await waitReadiness(cluster, node, (response) => response.body?.checks.certificates === false && response.body.checks.capture === true, "the certificates check to fail", 20_000);
    t.is(waiting.status, 503);
    t.false(waiting.body!.ready);
    t.true(waiting.body!.checks.configuration);
    t.is(ca.requests.length, 0);
    // The pod's listeners wait 10 s for a certificate, then its enrolment is retried. The node
    // stays unready through those retries, also between two of them.
    const watchUntil = Date.now() + 14_000;
    const answers = new Set<string>();
    while (Date.now() < watchUntil) {
      const probe = await readiness(cluster, node);
      answers.add(`${probe.status} enrolment=${probe.body?.checks.enrolment} certificates=${probe.body?.checks.certificates}`);
      t.is(probe.status, 503, probe.text);
      await sleep(200);
    }
    t.log([...answers].join("; "));

    forwarder = await forwardCaInto(cluster.topology.node(node).netns, Number(ca.address.split(":").pop()));
    // The retry delay doubles from 1 s, and only a few requests failed so far, so the next one comes within seconds.
    const ready = await waitReadiness(cluster, node, (response) => response.status === 200, "readiness once the CA responds", 30_000);
    t.true(ready.body!.ready);
    t.true(Object.values(ready.body!.checks).every(Boolean), ready.text);
    t.true(ca.requests.some((request) => request.issuedIdentity === "spiffe://cluster.local/ns/ready/sa/app"));
    // The pod's listeners start once its certificate arrives. startAgents() waits 15 s at most for the
    // enrolment, which passed while the CA was down, so its result is not awaited.
    let detail = await readinessDetail(cluster, node);
    const deadline = Date.now() + 30_000;
    while (detail.enrolled !== 1 && Date.now() < deadline) {
      await sleep(200);
      detail = await readinessDetail(cluster, node);
    }
    t.is(detail.enrolled, 1);
    t.deepEqual(detail.pending, []);
  } finally {
    await cluster.destroy({ removeWorkDir: true });
    forwarder?.close();
    await ca.close();
  }
});

test.serial("configuration and capture wait for the API server", async (t) => {
  const node = "aardy-kube";
  const nodes: NodeSpec[] = [
    {
      name: node,
      pods: [
        { name: "client", namespace: "ready", serviceAccount: "client" },
        { name: "server", namespace: "ready", serviceAccount: "server" },
      ],
    },
  ];
  const cluster = await Cluster.createWithApi({ prefix: `${PREFIX}k`, nodes, namespaces: NAMESPACES });
  const netns = cluster.topology.node(node).netns;
  let openClient: RoundClient | undefined;
  try {
    await startRoundServer(cluster.topology, "server", SERVER_PORT);
    cluster.kube!.setOutage(true);
    const started = cluster.startAgents(["client", "server"]);
    started.catch(() => undefined);

    // The admin API serves requests before the first list of the API server.
    const deadline = Date.now() + 15_000;
    let status = await httpGet(netns, "http://127.0.0.1:15000/status");
    while (status.status !== 200 && Date.now() < deadline) {
      await sleep(200);
      status = await httpGet(netns, "http://127.0.0.1:15000/status");
    }
    t.is(status.status, 200, `the admin API did not respond to /status: ${status.body}`);
    t.false((JSON.parse(status.body) as { ready: boolean }).ready);
    const waiting = await readiness(cluster, node);
    t.is(waiting.status, 503, waiting.text);
    t.false(waiting.body!.ready);
    t.false(waiting.body!.checks.configuration, waiting.text);
    t.false(waiting.body!.checks.capture, waiting.text);
    // The readiness server shows the checks alone; the admin API has the details.
    t.deepEqual(Object.keys(waiting.body!).sort(), ["checks", "ready"]);
    t.is((await readinessDetail(cluster, node)).enrolled, 0);

    cluster.kube!.setOutage(false);
    await started;
    const ready = await waitReadiness(cluster, node, (response) => response.status === 200, "readiness once the API server responds", 20_000);
    t.true(Object.values(ready.body!.checks).every(Boolean), ready.text);
    t.is((await readinessDetail(cluster, node)).enrolled, 2);

    // The metrics server listens on the node's address too; the admin API only on 127.0.0.1.
    const metrics = await httpGet(netns, `http://${nodeAddress(cluster, node)}:15020/metrics`);
    t.is(metrics.status, 200);
    t.regex(metrics.body, /^ambient_agent_enrolled_pods 2$/m);
    t.is((await httpGet(netns, `http://${nodeAddress(cluster, node)}:15000/status`)).status, 0, "the admin API responded on the node's address");

    // An open connection keeps the agent draining after SIGTERM, long enough to read the readiness.
    const connected = await RoundClient.connect(cluster.topology, "client", cluster.topology.pod("server").ip, SERVER_PORT);
    openClient = connected.client;
    await openClient.round(100, 100);
    const agent = cluster.agent(node);
    const mark = agent.lines.length;
    agent.signal("SIGTERM");
    await agent.waitForLog((line) => line.msg === "draining: closing the listeners and waiting for open connections", 5_000, "the drain", mark);
    const stopping = await readiness(cluster, node);
    t.is(stopping.status, 503, stopping.text);
    t.false(stopping.body!.ready);
    t.true(stopping.body!.stopping);
    await agent.waitExit(20_000);
  } finally {
    openClient?.kill();
    await cluster.destroy({ removeWorkDir: true });
  }
});
