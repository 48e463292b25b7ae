// End to end through an outage of the (fake) Kubernetes API server: the agents report that their
// watches are down, keep serving the last state read, DENY policy included, and apply what changed
// meanwhile once the server is back. A compaction that expires their resourceVersion makes them
// list again, without losing a change.

import test from "ava";
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { curl, startHttpServer, type CurlResult } from "../harness/clients";
import { AGENTCTL_BIN, testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { auditMark, authorizationPolicyObject, podObject, serviceObject } from "../harness/kube-objects";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aakube");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "kout-n1";
const SERVER_NODE = "kout-n2";
const HTTP_PORT = 8080;

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "client", namespace: "shop", serviceAccount: "client" },
      { name: "other", namespace: "shop", serviceAccount: "other" },
    ],
  },
  { name: SERVER_NODE, pods: [{ name: "api", namespace: "shop", serviceAccount: "api" }] },
];

const DENY_CLIENT = {
  selector: { matchLabels: { app: "api" } },
  action: "DENY",
  rules: [{ from: [{ source: { principals: ["cluster.local/ns/shop/sa/client"] } }] }],
};

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function servePage(pod: string): Promise<void> {
  const c = theCluster();
  const site = path.join(c.workDir, `site-${pod}`);
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "index.html"), `${pod}\n`);
  await startHttpServer(c.topology, pod, site, HTTP_PORT);
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = await Cluster.createWithApi({ prefix: PREFIX, nodes: NODES, namespaces: [{ name: "shop", ambient: true }] });
  await servePage("api");
  await cluster.startAgents(["client", "other", "api"]);
});

test.after.always(async () => {
  cluster?.kube?.setOutage(false);
  await cluster?.destroy({ removeWorkDir: true });
});

/** Fetches the page of `pod` from `from` and returns the server node's inbound record of it. */
async function fetchPod(from: string, pod: string): Promise<{ result: CurlResult; inbound: Record<string, any> }> {
  const c = theCluster();
  const target = c.topology.pod(pod);
  const mark = auditMark(c, SERVER_NODE);
  const result = await curl(c.topology, from, `http://${target.ip}:${HTTP_PORT}/`, 5);
  const inbound = await c.waitForAudit(
    SERVER_NODE,
    (r) => r.seq > mark && r.direction === "inbound" && r.dst.addr === `${target.ip}:${HTTP_PORT}` && r.src.workload === from,
    5_000,
  );
  return { result, inbound };
}

/**
 * Runs a command in a node's namespace and resolves with its standard output, also when it exits
 * non-zero (agentctl status does when the agent is not ready). Asynchronous, so that the fake API
 * server in this process keeps serving the agents meanwhile.
 */
function runInNode(node: string, command: string, args: string[]): Promise<string> {
  const netns = theCluster().topology.node(node).netns;
  return new Promise((resolve) => {
    execFile("nsenter", [`--net=/var/run/netns/${netns}`, "--", command, ...args], { encoding: "utf8", timeout: 10_000 }, (_error, stdout) => resolve(stdout));
  });
}

/** Runs `agentctl status` in a node's namespace with `-o json` or the table. */
function agentctlStatus(node: string, format: "json" | "table"): Promise<string> {
  return runInNode(node, process.execPath, [AGENTCTL_BIN, "status", "-o", format]);
}

interface WatchHealth {
  resource: string;
  watching: boolean;
  absent: boolean;
  lastError?: string;
  expired: number;
}

interface KubeStatus {
  watching: boolean;
  synced: boolean;
  resources: WatchHealth[];
}

async function kubeStatus(node: string): Promise<KubeStatus> {
  return JSON.parse(await agentctlStatus(node, "json")).kubernetes;
}

/** Polls agentctl status of `node` until `predicate` holds; throws with the last status after `timeoutMs`. */
async function waitForKubeStatus(node: string, predicate: (status: KubeStatus) => boolean, timeoutMs: number, description: string): Promise<KubeStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await kubeStatus(node);
    if (predicate(status)) return status;
    if (Date.now() > deadline) throw new Error(`agent of ${node}: no ${description} within ${timeoutMs} ms; status:\n${JSON.stringify(status, null, 1)}`);
    await sleep(250);
  }
}

test.serial("outage keeps last state, applies changes after", async (t) => {
  const c = theCluster();
  const kube = c.kube!;
  const addedMark = auditMark(c, SERVER_NODE);
  kube.put(authorizationPolicyObject("shop", "deny-client", DENY_CLIENT));
  await c.waitForAudit(SERVER_NODE, (r) => r.seq > addedMark && r.policy?.name === "deny-client", 10_000, "policy.added");
  t.is((await fetchPod("client", "api")).inbound.decision, "deny");

  kube.setOutage(true);
  for (const node of [CLIENT_NODE, SERVER_NODE]) {
    const status = await waitForKubeStatus(node, (s) => !s.watching && s.resources.every((r) => r.absent || r.lastError), 10_000, "watch down");
    t.true(status.synced, "the resources stay listed");
  }
  t.regex(await agentctlStatus(SERVER_NODE, "table"), /not watching: serving the last state read/);
  const ready = await runInNode(SERVER_NODE, "curl", ["-s", "-w", "\n%{http_code}", "http://127.0.0.1:15000/healthz/ready"]);
  const code = ready.slice(ready.lastIndexOf("\n") + 1);
  t.is(code, "200", "readiness stays 200 through an outage once the configuration was read");
  t.false(JSON.parse(ready.slice(0, ready.lastIndexOf("\n"))).kubernetes.watching, "/healthz/ready reports the watches down");

  // Changes made while the agents cannot see them.
  kube.remove("authorizationpolicies", "shop", "deny-client");
  const late = c.topology.addPodTo(SERVER_NODE, { name: "late", namespace: "shop", serviceAccount: "late" });
  await servePage("late");
  kube.put(podObject(late));

  const denied = await fetchPod("client", "api");
  t.not(denied.result.exitCode, 0, "the DENY policy stays in force during the outage");
  t.is(denied.inbound.decision, "deny");
  t.is(denied.inbound.policy, "shop/deny-client");
  const allowed = await fetchPod("other", "api");
  t.is(allowed.result.exitCode, 0, allowed.result.stderr);
  t.is(allowed.inbound.transport, "hbone");
  t.deepEqual(c.auditRecords(SERVER_NODE, "workload.enrolled").filter((r) => r.workload === "late"), [], "no pod is enrolled from changes the agent cannot see");

  const backMark = auditMark(c, SERVER_NODE);
  kube.setOutage(false);
  await c.waitForAudit(SERVER_NODE, (r) => r.seq > backMark && r.policy?.name === "deny-client", 20_000, "policy.removed");
  await c.waitForAudit(SERVER_NODE, (r) => r.seq > backMark && r.workload === "late", 20_000, "workload.enrolled");
  for (const node of [CLIENT_NODE, SERVER_NODE]) await waitForKubeStatus(node, (s) => s.watching, 20_000, "watch up again");
  const afterwards = await fetchPod("client", "api");
  t.is(afterwards.result.exitCode, 0, afterwards.result.stderr);
  t.is(afterwards.inbound.decision, "allow");
  const reached = await fetchPod("client", "late");
  t.is(reached.result.body.toString(), "late\n", reached.result.stderr);
  t.is(reached.inbound.transport, "hbone");
});

test.serial("compaction forces lossless relist", async (t) => {
  const c = theCluster();
  const kube = c.kube!;
  const expiredOf = (status: KubeStatus) => status.resources.reduce((sum, r) => sum + r.expired, 0);
  const before = new Map<string, number>();
  for (const node of [CLIENT_NODE, SERVER_NODE]) before.set(node, expiredOf(await kubeStatus(node)));
  const mark = auditMark(c, SERVER_NODE);
  // A change that the watches have not delivered yet puts every agent's resourceVersion behind the
  // compaction, so each watch that resumes gets 410 Gone.
  kube.put(serviceObject("shop", "marker", "10.96.88.20", [{ port: 80, targetPort: HTTP_PORT }], { app: "api" }));
  kube.compact();
  kube.closeWatches();
  // Made before the agents watch again: only the relist can show it to them.
  kube.put(authorizationPolicyObject("shop", "deny-client", DENY_CLIENT));
  for (const node of [CLIENT_NODE, SERVER_NODE]) {
    await waitForKubeStatus(node, (s) => s.watching && expiredOf(s) > before.get(node)!, 20_000, "relist after 410");
  }
  await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.policy?.name === "deny-client", 10_000, "policy.added");
  const denied = await fetchPod("client", "api");
  t.is(denied.inbound.decision, "deny");
  t.is(denied.inbound.policy, "shop/deny-client");
  const viaMarker = await curl(c.topology, "other", "http://10.96.88.20/", 5);
  t.is(viaMarker.body.toString(), "api\n", `the Service put just before the compaction routes: ${viaMarker.stderr}`);
  const allowed = await fetchPod("other", "late");
  t.is(allowed.result.body.toString(), "late\n", allowed.result.stderr);
  t.is(allowed.inbound.transport, "hbone", "the pod enrolled before the relist stays enrolled");
  t.deepEqual(
    c.auditRecords(SERVER_NODE, "workload.unenrolled").filter((r) => r.seq > mark),
    [],
    "the relist unenrols nothing",
  );
});
