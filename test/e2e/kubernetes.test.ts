// End to end with the configuration from a Kubernetes API server (the fake one of the harness):
// agents list and watch it from inside their node namespaces, enrol pods by label, and mark them.
// Enrolment follows the namespace label as it changes, and the pod label, the sidecar annotation
// and the excluded namespaces override it.

import test from "ava";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { curl, startHttpServer } from "../harness/clients";
import { AGENTCTL_BIN, testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { annotationOf, auditMark, podObject, waitForObject } from "../harness/kube-objects";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aakube");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "kube-n1";
const SERVER_NODE = "kube-n2";
const HTTP_PORT = 8080;
const MODE_LABEL = "istio.io/dataplane-mode";
const REDIRECTION = "ambient.istio.io/redirection";
const EXCLUDED_WARNING = /^namespace legacy is labelled istio\.io\/dataplane-mode=ambient but is excluded/;

const NODES: NodeSpec[] = [
  { name: CLIENT_NODE, pods: [{ name: "client", namespace: "shop", serviceAccount: "client" }] },
  {
    name: SERVER_NODE,
    pods: [
      { name: "api", namespace: "shop", serviceAccount: "api" },
      // In a namespace without the label, which the first test labels and unlabels.
      { name: "web", namespace: "web", serviceAccount: "web" },
      { name: "optout", namespace: "shop", serviceAccount: "optout", labels: { [MODE_LABEL]: "none" } },
      { name: "optin", namespace: "plain", serviceAccount: "optin", labels: { [MODE_LABEL]: "ambient" } },
      // Gets the sidecar injector's annotation before the agents start.
      { name: "sidecar", namespace: "shop", serviceAccount: "sidecar" },
      { name: "legacy", namespace: "legacy", serviceAccount: "legacy" },
    ],
  },
];
const SERVED_PODS = ["api", "web", "optout", "optin", "sidecar", "legacy"];

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = await Cluster.createWithApi({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "shop", ambient: true },
      { name: "web", ambient: false },
      { name: "plain", ambient: false },
      { name: "legacy", ambient: true },
    ],
    agentArgs: ["--excluded-namespaces", "legacy"],
  });
  cluster.kube!.put(podObject(cluster.topology.pod("sidecar"), { annotations: { "sidecar.istio.io/status": '{"containers":["istio-proxy"]}' } }));
  for (const pod of SERVED_PODS) {
    const site = path.join(cluster.workDir, `site-${pod}`);
    fs.mkdirSync(site, { recursive: true });
    fs.writeFileSync(path.join(site, "index.html"), `${pod}\n`);
    await startHttpServer(cluster.topology, pod, site, HTTP_PORT);
  }
  await cluster.startAgents(["client", "api", "optin"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

/**
 * Fetches the page of `pod` from the client pod, checks the body, and returns the client node's
 * outbound record and, when the destination is in the mesh, the server node's inbound one.
 */
async function fetchFromClient(pod: string): Promise<{ outbound: Record<string, any>; inbound: Record<string, any> | undefined }> {
  const c = theCluster();
  const target = c.topology.pod(pod);
  const clientMark = auditMark(c, CLIENT_NODE);
  const serverMark = auditMark(c, SERVER_NODE);
  const result = await curl(c.topology, "client", `http://${target.ip}:${HTTP_PORT}/`);
  if (result.exitCode !== 0 || result.body.toString() !== `${pod}\n`) {
    throw new Error(`client to ${pod}: curl exit ${result.exitCode}, body ${JSON.stringify(result.body.toString())}, ${result.stderr}`);
  }
  const destination = `${target.ip}:${HTTP_PORT}`;
  const outbound = await c.waitForAudit(CLIENT_NODE, (r) => r.seq > clientMark && r.direction === "outbound" && r.dst.addr === destination, 5_000);
  // A captured connection's inbound record follows within milliseconds; waiting lets its absence mean something.
  await new Promise((resolve) => setTimeout(resolve, 300));
  const inbound = c.auditRecords(SERVER_NODE).find((r) => r.seq > serverMark && r.direction === "inbound" && r.dst.addr === destination);
  return { outbound, inbound };
}

/** Waits until the fake API server shows the redirection annotation of a pod as `value` (undefined: absent). */
async function waitForRedirection(pod: string, value: string | undefined): Promise<void> {
  const c = theCluster();
  const handle = c.topology.pod(pod);
  await waitForObject(c.kube!, "pods", handle.namespace, pod, (object) => annotationOf(object, REDIRECTION) === value, 10_000, `${REDIRECTION}=${value ?? "(absent)"}`);
}

function enrolmentRecords(node: string, pod: string, type: "workload.enrolled" | "workload.unenrolled"): Record<string, any>[] {
  return theCluster()
    .auditRecords(node, type)
    .filter((record) => record.workload === pod);
}

/** Runs `agentctl status -o json` in a node's namespace and returns the parsed readiness. */
function agentStatus(node: string): Record<string, any> {
  const netns = theCluster().topology.node(node).netns;
  let output: string;
  try {
    output = execFileSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", process.execPath, AGENTCTL_BIN, "status", "-o", "json"], { encoding: "utf8", stdio: "pipe" });
  } catch (error) {
    // agentctl status exits non-zero when the agent is not ready, with the JSON still on stdout.
    output = (error as { stdout?: string }).stdout ?? "";
  }
  return JSON.parse(output);
}

test.serial("pods listed from the API server are enrolled and talk over HBONE", async (t) => {
  const c = theCluster();
  const api = c.topology.pod("api");
  const result = await curl(c.topology, "client", `http://${api.ip}:8080/`);
  t.is(result.exitCode, 0, result.stderr);
  t.is(result.body.toString(), "api\n");
  const record = await c.waitForAudit(SERVER_NODE, (r) => r.direction === "inbound" && r.src?.workload === "client", 5_000);
  t.is(record.transport, "hbone");
  t.is(record.src.identity, "spiffe://cluster.local/ns/shop/sa/client");
  await waitForRedirection("api", "enabled");
  await waitForRedirection("client", "enabled");
});

test.serial("namespace label enrols and unenrols pods", async (t) => {
  const c = theCluster();
  const kube = c.kube!;

  const before = await fetchFromClient("web");
  t.is(before.outbound.transport, "plaintext", "a pod of an unlabelled namespace is reached in plaintext");
  t.is(before.inbound, undefined, "the server node's agent does not intercept a pod outside the mesh");
  t.deepEqual(enrolmentRecords(SERVER_NODE, "web", "workload.enrolled"), []);
  t.is(annotationOf(kube.get("pods", "web", "web"), REDIRECTION), undefined);

  const labelMark = auditMark(c, SERVER_NODE);
  kube.patchLabels("namespaces", undefined, "web", { [MODE_LABEL]: "ambient" });
  const enrolled = await c.waitForAudit(SERVER_NODE, (r) => r.seq > labelMark && r.workload === "web", 10_000, "workload.enrolled");
  t.is(enrolled.namespace, "web");
  t.is(enrolled.reason, "namespace labelled istio.io/dataplane-mode=ambient");
  await waitForRedirection("web", "enabled");
  const during = await fetchFromClient("web");
  t.is(during.outbound.transport, "hbone");
  const inbound = await c.waitForAudit(SERVER_NODE, (r) => r.seq > labelMark && r.direction === "inbound" && r.dst.workload === "web", 5_000);
  t.is(inbound.transport, "hbone");
  t.is(inbound.src.identity, "spiffe://cluster.local/ns/shop/sa/client");

  const unlabelMark = auditMark(c, SERVER_NODE);
  kube.patchLabels("namespaces", undefined, "web", { [MODE_LABEL]: null });
  const unenrolled = await c.waitForAudit(SERVER_NODE, (r) => r.seq > unlabelMark && r.workload === "web", 10_000, "workload.unenrolled");
  t.is(unenrolled.reason, "namespace no longer ambient");
  await waitForRedirection("web", undefined);
  const after = await fetchFromClient("web");
  t.is(after.outbound.transport, "plaintext", "the pod is reached in plaintext again");
  t.is(after.inbound, undefined);
});

test.serial("pod label, sidecar and exclusion override namespace", async (t) => {
  const c = theCluster();
  const kube = c.kube!;

  // istio.io/dataplane-mode=none in an ambient namespace opts the pod out.
  const optout = await fetchFromClient("optout");
  t.is(optout.outbound.transport, "plaintext");
  t.is(optout.inbound, undefined);
  t.deepEqual(enrolmentRecords(SERVER_NODE, "optout", "workload.enrolled"), []);
  t.is(annotationOf(kube.get("pods", "shop", "optout"), REDIRECTION), undefined);

  // istio.io/dataplane-mode=ambient in an unlabelled namespace opts the pod in.
  const [optinRecord] = enrolmentRecords(SERVER_NODE, "optin", "workload.enrolled");
  t.is(optinRecord?.reason, "agent start");
  await waitForRedirection("optin", "enabled");
  const optin = await fetchFromClient("optin");
  t.is(optin.outbound.transport, "hbone");
  const optinInbound = await c.waitForAudit(SERVER_NODE, (r) => r.direction === "inbound" && r.dst.workload === "optin", 5_000);
  t.is(optinInbound.transport, "hbone");

  // A pod with an Istio sidecar is left to it, in an ambient namespace.
  const sidecar = await fetchFromClient("sidecar");
  t.is(sidecar.outbound.transport, "plaintext");
  t.deepEqual(enrolmentRecords(SERVER_NODE, "sidecar", "workload.enrolled"), []);
  t.is(annotationOf(kube.get("pods", "shop", "sidecar"), REDIRECTION), undefined);

  // An excluded namespace stays out although labelled, and each agent warns once.
  const legacy = await fetchFromClient("legacy");
  t.is(legacy.outbound.transport, "plaintext");
  t.deepEqual(enrolmentRecords(SERVER_NODE, "legacy", "workload.enrolled"), []);
  t.is(annotationOf(kube.get("pods", "legacy", "legacy"), REDIRECTION), undefined);
  const agent = c.agent(SERVER_NODE);
  const fromLine = agent.lines.length;
  kube.patchLabels("namespaces", undefined, "legacy", { team: "billing" });
  await agent.waitForLog((line) => line.msg === "configuration updated", 10_000, "the update after relabelling namespace legacy", fromLine);
  for (const node of [CLIENT_NODE, SERVER_NODE]) {
    const warnings = c.agent(node).lines.filter((line) => EXCLUDED_WARNING.test(String(line.msg ?? "")));
    t.is(warnings.length, 1, `the agent of ${node} warns once about namespace legacy`);
  }

  // Only api and optin are enrolled on the server node.
  const changes = c.auditRecords(SERVER_NODE, "*").filter((r) => r.type.startsWith("workload.")).map((r) => `${r.type} ${r.workload} ${r.reason}`);
  t.is(agentStatus(SERVER_NODE).enrolled, 2, changes.join("\n"));
});

test.serial("pods gone while down released by name", async (t) => {
  const c = theCluster();
  // optin is enrolled by its pod label; api by its namespace. Both leave while the agent is down.
  await c.agent(SERVER_NODE).stop();
  const mark = auditMark(c, SERVER_NODE);
  c.kube!.remove("pods", "plain", "optin");
  c.kube!.patchLabels("pods", "shop", "api", { [MODE_LABEL]: "none" });
  const agent = await c.restartAgent(SERVER_NODE);
  const released = await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.workload === "optin", 10_000, "workload.unenrolled");
  t.is(released.reason, "while no agent ran: pod deleted");
  const optedOut = await c.waitForAudit(SERVER_NODE, (r) => r.seq > mark && r.workload === "api", 10_000, "workload.unenrolled");
  t.is(optedOut.reason, `while no agent ran: pod is labelled ${MODE_LABEL}=none`);
  const line = await agent.waitForLog((entry) => entry.msg === "released the capture of a pod that is no longer enrolled" && entry.workload === "shop/api", 5_000, "the release line");
  t.truthy(line.cookie);
  await waitForRedirection("api", undefined);
  const { outbound } = await fetchFromClient("api");
  t.is(outbound.transport, "plaintext");
});
