// End to end with the configuration from the fake Kubernetes API server, while it changes: pods
// created and deleted at runtime, AuthorizationPolicies added, broken and removed, and a Service
// whose endpoints come from an EndpointSlice.

import test from "ava";
import type { ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { curl, startHttpServer, type CurlResult } from "../harness/clients";
import { testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { auditMark, authorizationPolicyObject, endpointSliceObject, podObject, serviceObject } from "../harness/kube-objects";
import type { NodeSpec, Topology } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aakube");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "kchurn-n1";
const SERVER_NODE = "kchurn-n2";
const HTTP_PORT = 8080;
const SLICE_VIP = "10.96.88.10";

const NODES: NodeSpec[] = [
  { name: CLIENT_NODE, pods: [{ name: "client", namespace: "shop", serviceAccount: "client" }] },
  { name: SERVER_NODE, pods: [{ name: "api", namespace: "shop", serviceAccount: "api" }] },
];

const DENY_CLIENT = {
  selector: { matchLabels: { app: "api" } },
  action: "DENY",
  rules: [{ from: [{ source: { principals: ["cluster.local/ns/shop/sa/client"] } }] }],
};

let cluster: Cluster | undefined;
/** Pods added at runtime and not removed yet, removed by the after hook when a test fails. */
const addedPods = new Set<string>();
/** The HTTP server of each pod, by pod name. */
const servers = new Map<string, ChildProcess>();

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

/** Starts python's HTTP server in `pod`, serving a page that names the pod. */
async function servePage(pod: string): Promise<void> {
  const c = theCluster();
  const site = path.join(c.workDir, `site-${pod}`);
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "index.html"), `${pod}\n`);
  servers.set(pod, await startHttpServer(c.topology, pod, site, HTTP_PORT));
}

/**
 * Deletes a runtime pod as a container runtime does. Its server is ended first and waited for,
 * because a namespace lives on, with its address, while a process runs in it.
 */
async function deletePod(topology: Topology, pod: string): Promise<void> {
  const server = servers.get(pod);
  if (server && server.exitCode === null && server.signalCode === null) {
    const exited = new Promise((resolve) => server.once("exit", resolve));
    server.kill("SIGKILL");
    await exited;
  }
  servers.delete(pod);
  topology.removePod(pod);
  addedPods.delete(pod);
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = await Cluster.createWithApi({ prefix: PREFIX, nodes: NODES, namespaces: [{ name: "shop", ambient: true }] });
  await servePage("api");
  await cluster.startAgents(["client", "api"]);
});

test.after.always(async () => {
  for (const pod of [...addedPods]) if (cluster) await deletePod(cluster.topology, pod);
  await cluster?.destroy({ removeWorkDir: true });
});

/**
 * Fetches a URL from the client pod and returns curl's outcome with the client node's outbound
 * record for it, whose destination is one of `destinations` ("ip:port").
 */
async function fetchFromClient(url: string, ...destinations: string[]): Promise<{ result: CurlResult; outbound: Record<string, any> }> {
  const c = theCluster();
  const mark = auditMark(c, CLIENT_NODE);
  const result = await curl(c.topology, "client", url, 5);
  const outbound = await c.waitForAudit(CLIENT_NODE, (r) => r.seq > mark && r.direction === "outbound" && destinations.includes(r.dst.addr), 5_000);
  return { result, outbound };
}

/** Fetches the page of `pod` from the client and returns the server node's inbound record of it. */
async function fetchPod(pod: string): Promise<{ result: CurlResult; inbound: Record<string, any> }> {
  const c = theCluster();
  const target = c.topology.pod(pod);
  const mark = auditMark(c, SERVER_NODE);
  const result = await curl(c.topology, "client", `http://${target.ip}:${HTTP_PORT}/`, 5);
  const inbound = await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.direction === "inbound" && r.dst.addr === `${target.ip}:${HTTP_PORT}`, 5_000);
  return { result, inbound };
}

/** Puts a policy object and waits for the server node's audit record of `type` that names it. */
async function putPolicy(spec: Record<string, unknown>, type: string): Promise<Record<string, any>> {
  const c = theCluster();
  const mark = auditMark(c, SERVER_NODE);
  c.kube!.put(authorizationPolicyObject("shop", "deny-client", spec));
  return c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.policy?.name === "deny-client", 10_000, type);
}

test.serial("runtime pod enrolled, then unenrolled on delete", async (t) => {
  const c = theCluster();
  const kube = c.kube!;
  const pod = c.topology.addPodTo(SERVER_NODE, { name: "fresh", namespace: "shop", serviceAccount: "fresh" });
  addedPods.add("fresh");
  await servePage("fresh");
  const mark = auditMark(c, SERVER_NODE);
  kube.put(podObject(pod));
  const enrolled = await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.workload === "fresh", 10_000, "workload.enrolled");
  t.is(enrolled.reason, "pod created");
  t.is(enrolled.ip, pod.ip);
  const { result, inbound } = await fetchPod("fresh");
  t.is(result.exitCode, 0, result.stderr);
  t.is(result.body.toString(), "fresh\n");
  t.is(inbound.transport, "hbone");
  t.is(inbound.dst.identity, "spiffe://cluster.local/ns/shop/sa/fresh");

  const removeMark = auditMark(c, SERVER_NODE);
  kube.remove("pods", "shop", "fresh");
  const unenrolled = await c.waitForAudit(SERVER_NODE, (r) => r.seq > removeMark && r.workload === "fresh", 10_000, "workload.unenrolled");
  t.is(unenrolled.reason, "pod deleted");
  // The network namespace still serves the page, but outside the mesh, so the client's agent passes the connection through.
  const after = await fetchFromClient(`http://${pod.ip}:${HTTP_PORT}/`, `${pod.ip}:${HTTP_PORT}`);
  t.is(after.result.exitCode, 0, after.result.stderr);
  t.is(after.outbound.transport, "plaintext");
  await deletePod(c.topology, "fresh");
});

test.serial("pod burst enrolled and unenrolled", async (t) => {
  const c = theCluster();
  const kube = c.kube!;
  const names = ["burst-a", "burst-b", "burst-c"];
  const pods = names.map((name) => {
    const pod = c.topology.addPodTo(SERVER_NODE, { name, namespace: "shop", serviceAccount: "burst" });
    addedPods.add(name);
    return pod;
  });
  for (const name of names) await servePage(name);
  const mark = auditMark(c, SERVER_NODE);
  for (const pod of pods) kube.put(podObject(pod));
  for (const name of names) await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.workload === name, 10_000, "workload.enrolled");
  const fetched = await Promise.all(names.map((name) => fetchPod(name)));
  for (const [index, { result, inbound }] of fetched.entries()) {
    t.is(result.body.toString(), `${names[index]}\n`, result.stderr);
    t.is(inbound.transport, "hbone");
  }

  const removeMark = auditMark(c, SERVER_NODE);
  for (const name of names) kube.remove("pods", "shop", name);
  for (const name of names) {
    const record = await c.waitForAudit(SERVER_NODE, (r) => r.seq > removeMark && r.workload === name, 10_000, "workload.unenrolled");
    t.is(record.reason, "pod deleted");
  }
  for (const name of names) await deletePod(c.topology, name);
  const { result, inbound } = await fetchPod("api");
  t.is(result.exitCode, 0, result.stderr);
  t.is(inbound.transport, "hbone");
});

test.serial("DENY policy survives invalid version until removed", async (t) => {
  const c = theCluster();
  const added = await putPolicy(DENY_CLIENT, "policy.added");
  t.is(added.policy.kind, "AuthorizationPolicy");
  t.is(added.policy.namespace, "shop");
  const denied = await fetchPod("api");
  t.not(denied.result.exitCode, 0, "the DENY policy stops the request");
  t.is(denied.inbound.decision, "deny");
  t.is(denied.inbound.policy, "shop/deny-client");

  const rejected = await putPolicy({ ...DENY_CLIENT, action: "REJECT" }, "policy.rejected");
  t.regex(rejected.message, /REJECT/);
  const stillDenied = await fetchPod("api");
  t.not(stillDenied.result.exitCode, 0, "the last valid version still denies");
  t.is(stillDenied.inbound.decision, "deny");
  t.is(stillDenied.inbound.policy, "shop/deny-client");

  const mark = auditMark(c, SERVER_NODE);
  c.kube!.remove("authorizationpolicies", "shop", "deny-client");
  await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.policy?.name === "deny-client", 10_000, "policy.removed");
  const allowed = await fetchPod("api");
  t.is(allowed.result.exitCode, 0, allowed.result.stderr);
  t.is(allowed.inbound.decision, "allow");
});

test.serial("EndpointSlice Service routes VIP to listed pod", async (t) => {
  const c = theCluster();
  const kube = c.kube!;
  const api = c.topology.pod("api");
  // No selector: only the slice can give the Service an endpoint.
  kube.put(serviceObject("shop", "api-sliced", SLICE_VIP, [{ name: "http", port: 80, targetPort: HTTP_PORT }]));
  kube.put(endpointSliceObject("api-sliced", "api-sliced-1", [api], [{ name: "http", port: HTTP_PORT }]));
  // The agent routes the VIP once both objects reached it. Until then the client's connection fails,
  // and its record may come only after the agent's own connect timeout, so the wait reads no record.
  const deadline = Date.now() + 30_000;
  let routed = await curl(c.topology, "client", `http://${SLICE_VIP}/`, 5);
  while (routed.exitCode !== 0 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 200));
    routed = await curl(c.topology, "client", `http://${SLICE_VIP}/`, 5);
  }
  t.is(routed.exitCode, 0, routed.stderr);
  const attempt = await fetchFromClient(`http://${SLICE_VIP}/`, `${api.ip}:${HTTP_PORT}`);
  t.is(attempt.result.exitCode, 0, attempt.result.stderr);
  t.is(attempt.result.body.toString(), "api\n");
  t.is(attempt.outbound.dst.service, "shop/api-sliced");
  t.is(attempt.outbound.transport, "hbone");
});

test.serial("IP twin takes nothing over", async (t) => {
  const c = theCluster();
  const api = c.topology.pod("api");
  const agent = c.agent(SERVER_NODE);
  const from = agent.lines.length;
  // A pod being deleted whose address the network plugin gave to api, as Kubernetes shows for a while.
  const ghost = { ...podObject({ ...api, name: "ghost", serviceAccount: "admin" }), metadata: { name: "ghost", namespace: "shop", labels: { app: "ghost" }, deletionTimestamp: new Date().toISOString() } };
  c.kube!.put(ghost);
  await new Promise((resolve) => setTimeout(resolve, 1_500));
  t.false(agent.lines.slice(from).some((line) => line.msg === "workload enrolled" && line.workload === "shop/ghost"), "the second pod was enrolled");
  const during = await fetchPod("api");
  t.is(during.inbound.transport, "hbone");
  t.is(during.inbound.dst.identity, "spiffe://cluster.local/ns/shop/sa/api");

  c.kube!.remove("pods", "shop", "ghost");
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  // api's own capture must be intact: its outbound connections still go through the agent.
  const mark = auditMark(c, SERVER_NODE);
  // The client pod serves nothing: the connection fails, but its record shows that capture holds.
  await curl(c.topology, "api", `http://${c.topology.pod("client").ip}:${HTTP_PORT}/`, 5);
  const outbound = await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.direction === "outbound" && r.src.workload === "api", 5_000);
  t.is(outbound.src.identity, "spiffe://cluster.local/ns/shop/sa/api");
});

test.serial("deleting pod never takes live namespace", async (t) => {
  const c = theCluster();
  const api = c.topology.pod("api");
  const agent = c.agent(SERVER_NODE);
  const from = agent.lines.length;
  const mark = auditMark(c, SERVER_NODE);
  const ghost = { ...podObject({ ...api, name: "ghost2", serviceAccount: "admin" }), metadata: { name: "ghost2", namespace: "shop", labels: { app: "ghost2" }, deletionTimestamp: new Date().toISOString() } };
  c.kube!.put(ghost);
  // api leaves the mesh but keeps its address: the pod being deleted must not get its namespace.
  c.kube!.put(podObject(api, { labels: { "istio.io/dataplane-mode": "none" } }));
  await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.workload === "api", 10_000, "workload.unenrolled");
  await new Promise((resolve) => setTimeout(resolve, 1_500));
  t.false(agent.lines.slice(from).some((line) => line.msg === "workload enrolled" && line.workload === "shop/ghost2"), "the pod being deleted was enrolled in api's namespace");
  c.kube!.remove("pods", "shop", "ghost2");
  c.kube!.put(podObject(api));
  await agent.waitEnrolled("shop/api", 10_000, from);
});

test.serial("restart keeps pod against an IP twin", async (t) => {
  const c = theCluster();
  const api = c.topology.pod("api");
  c.kube!.put(podObject({ ...api, name: "twin", serviceAccount: "admin" }));
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  await c.agent(SERVER_NODE).stop();
  const mark = auditMark(c, SERVER_NODE);
  const agent = await c.restartAgent(SERVER_NODE);
  await agent.waitEnrolled("shop/api", 10_000);
  t.false(agent.lines.some((line) => line.msg === "workload enrolled" && line.workload === "shop/twin"));
  t.false(c.auditRecords(SERVER_NODE, "workload.unenrolled").some((r) => r.seq > mark && r.workload === "api"), "the restart released api");
  c.kube!.remove("pods", "shop", "twin");
});
