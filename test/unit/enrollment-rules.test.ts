import test from "ava";
import { enrollmentReasons } from "../../agent/audit/control";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import {
  DEFAULT_ENROLLMENT_SETTINGS,
  enrolledWorkloads,
  enrollmentDecision,
  excludedLabelledNamespaces,
  isAmbient,
  onePerIp,
  type EnrollmentRule,
  type EnrollmentSettings,
} from "../../agent/enroll/enrollment";
import { MeshState } from "../../agent/state/mesh-state";
import type { ClusterSnapshot, Namespace, Workload } from "../../agent/state/types";

const NODE = "node-a";
const AMBIENT = { "istio.io/dataplane-mode": "ambient" };
const NONE = { "istio.io/dataplane-mode": "none" };
const SIDECAR = { "sidecar.istio.io/status": '{"containers":["istio-proxy"]}' };

function namespace(name: string, labels: Record<string, string> = {}): Namespace {
  return { name, labels, source: { file: "ns.yaml", document: 0 } };
}

function workload(uid: string, options: Partial<Workload> = {}): Workload {
  const [ns, name] = uid.split("/");
  return {
    uid,
    name,
    namespace: ns,
    serviceAccount: "default",
    nodeName: NODE,
    ip: "10.0.0.1",
    labels: {},
    namedPorts: {},
    hostNetwork: false,
    ready: true,
    source: { file: "pods.yaml", document: 0 },
    ...options,
  };
}

function snapshot(namespaces: Namespace[], workloads: Workload[]): ClusterSnapshot {
  return {
    namespaces: new Map(namespaces.map((item) => [item.name, item])),
    workloads: new Map(workloads.map((item) => [item.uid, item])),
    services: new Map(),
    authorizationPolicies: new Map(),
    peerAuthentications: new Map(),
  };
}

/** A cluster with an ambient namespace "mesh", an unlabelled one "plain", and kube-system labelled ambient. */
const NAMESPACES = [namespace("mesh", AMBIENT), namespace("plain"), namespace("kube-system", AMBIENT)];

interface Case {
  name: string;
  workload: Workload;
  settings?: EnrollmentSettings;
  rule: EnrollmentRule;
  enrolled: boolean;
}

const CASES: Case[] = [
  { name: "namespace label enrolls", workload: workload("mesh/a"), rule: "namespaceLabel", enrolled: true },
  { name: "pod label enrolls", workload: workload("plain/a", { labels: AMBIENT }), rule: "podLabel", enrolled: true },
  { name: "pod label beats absent namespace", workload: workload("gone/a", { labels: AMBIENT }), rule: "podLabel", enrolled: true },
  { name: "pod label in ambient namespace", workload: workload("mesh/a", { labels: AMBIENT }), rule: "podLabel", enrolled: true },
  { name: "no label", workload: workload("plain/a"), rule: "notLabelled", enrolled: false },
  { name: "unknown namespace", workload: workload("gone/a"), rule: "notLabelled", enrolled: false },
  { name: "other pod label value", workload: workload("plain/a", { labels: { "istio.io/dataplane-mode": "sidecar" } }), rule: "notLabelled", enrolled: false },
  { name: "sidecar in ambient namespace", workload: workload("mesh/a", { annotations: SIDECAR }), rule: "sidecar", enrolled: false },
  { name: "sidecar with empty status", workload: workload("mesh/a", { annotations: { "sidecar.istio.io/status": "" } }), rule: "sidecar", enrolled: false },
  { name: "sidecar beats pod label", workload: workload("plain/a", { labels: AMBIENT, annotations: SIDECAR }), rule: "sidecar", enrolled: false },
  { name: "sidecar beats opt-out", workload: workload("mesh/a", { labels: NONE, annotations: SIDECAR }), rule: "sidecar", enrolled: false },
  { name: "other annotations ignored", workload: workload("mesh/a", { annotations: { "sidecar.istio.io/inject": "true" } }), rule: "namespaceLabel", enrolled: true },
  { name: "opt-out beats namespace", workload: workload("mesh/a", { labels: NONE }), rule: "podOptOut", enrolled: false },
  { name: "opt-out without labels", workload: workload("plain/a", { labels: NONE }), rule: "notLabelled", enrolled: false },
  { name: "host network", workload: workload("mesh/a", { hostNetwork: true }), rule: "hostNetwork", enrolled: false },
  { name: "host network with pod label", workload: workload("plain/a", { labels: AMBIENT, hostNetwork: true }), rule: "hostNetwork", enrolled: false },
  { name: "opt-out beats host network", workload: workload("mesh/a", { labels: NONE, hostNetwork: true }), rule: "podOptOut", enrolled: false },
  { name: "kube-system excluded", workload: workload("kube-system/dns"), rule: "excludedNamespace", enrolled: false },
  { name: "exclusion beats pod label", workload: workload("kube-system/dns", { labels: AMBIENT }), rule: "excludedNamespace", enrolled: false },
  { name: "empty exclusion list", workload: workload("kube-system/dns"), settings: { excludedNamespaces: [] }, rule: "namespaceLabel", enrolled: true },
  { name: "custom exclusion", workload: workload("mesh/a"), settings: { excludedNamespaces: ["mesh"] }, rule: "excludedNamespace", enrolled: false },
];

for (const item of CASES) {
  test(`decision: ${item.name}`, (t) => {
    const state = new MeshState(snapshot(NAMESPACES, [item.workload]));
    const decision = enrollmentDecision(state, item.workload, item.settings);
    t.is(decision.rule, item.rule);
    t.is(decision.enrolled, item.enrolled);
    t.is(isAmbient(state, item.workload, item.settings), item.enrolled);
    t.true(decision.reason.length > 0);
  });
}

test("decision reasons as sentences", (t) => {
  const state = new MeshState(snapshot(NAMESPACES, []));
  const reason = (item: Workload) => enrollmentDecision(state, item).reason;
  t.is(reason(workload("kube-system/dns")), "namespace kube-system is excluded from ambient mode");
  t.is(reason(workload("mesh/a")), "namespace mesh is labelled istio.io/dataplane-mode=ambient");
  t.is(reason(workload("plain/a", { labels: AMBIENT })), "pod is labelled istio.io/dataplane-mode=ambient");
  t.is(reason(workload("plain/a")), "neither namespace plain nor the pod is labelled istio.io/dataplane-mode=ambient");
  t.is(reason(workload("gone/a")), "namespace gone is not in the mesh state and the pod is not labelled istio.io/dataplane-mode=ambient");
  t.is(reason(workload("mesh/a", { annotations: SIDECAR })), "pod has an Istio sidecar (annotation sidecar.istio.io/status)");
  t.is(reason(workload("mesh/a", { labels: NONE })), "pod is labelled istio.io/dataplane-mode=none");
  t.is(reason(workload("mesh/a", { hostNetwork: true })), "pod uses the host network");
});

test("default settings exclude kube-system", (t) => {
  t.deepEqual(DEFAULT_ENROLLMENT_SETTINGS.excludedNamespaces, ["kube-system"]);
});

test("enrolled workloads apply settings", (t) => {
  const pods = [workload("mesh/a"), workload("kube-system/dns"), workload("plain/b", { labels: AMBIENT }), workload("mesh/far", { nodeName: "node-b" })];
  const state = new MeshState(snapshot(NAMESPACES, pods));
  t.deepEqual(enrolledWorkloads(state, NODE).map((item) => item.uid), ["mesh/a", "plain/b"]);
  t.deepEqual(enrolledWorkloads(state, NODE, { excludedNamespaces: [] }).map((item) => item.uid), ["kube-system/dns", "mesh/a", "plain/b"]);
  t.deepEqual(enrolledWorkloads(state, NODE, { excludedNamespaces: ["mesh", "plain"] }).map((item) => item.uid), ["kube-system/dns"]);
});

test("excluded labelled namespaces", (t) => {
  const namespaces = [...NAMESPACES, namespace("istio-system", AMBIENT), namespace("legacy")];
  const state = new MeshState(snapshot(namespaces, []));
  t.deepEqual(excludedLabelledNamespaces(state), ["kube-system"]);
  t.deepEqual(excludedLabelledNamespaces(state, { excludedNamespaces: ["legacy", "istio-system", "kube-system"] }), ["istio-system", "kube-system"]);
  t.deepEqual(excludedLabelledNamespaces(state, { excludedNamespaces: [] }), []);
});

test("sidecar annotation from manifest", (t) => {
  const manifests = `apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: injected, namespace: mesh, annotations: {sidecar.istio.io/status: '{"version":"x"}'}}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: mesh}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.2}
`;
  const result = parseManifests("sidecar.yaml", manifests);
  t.deepEqual(result.problems, []);
  const state = new MeshState(buildSnapshot(result.objects));
  t.deepEqual(enrolledWorkloads(state, NODE).map((item) => item.uid), ["mesh/plain"]);
});

test("enrollment reasons for new rules", (t) => {
  const web = workload("plain/web");
  const labelled = { ...web, labels: AMBIENT };
  const cluster = (items: Workload[], namespaces = NAMESPACES) => snapshot(namespaces, items);
  t.deepEqual([...enrollmentReasons(cluster([web]), cluster([labelled]), NODE)], [["plain/web", "pod labelled istio.io/dataplane-mode=ambient"]]);
  t.deepEqual([...enrollmentReasons(cluster([labelled]), cluster([web]), NODE)], [["plain/web", "pod label istio.io/dataplane-mode=ambient removed"]]);

  const meshWeb = workload("mesh/web");
  const injected = { ...meshWeb, annotations: SIDECAR };
  t.deepEqual([...enrollmentReasons(cluster([meshWeb]), cluster([injected]), NODE)], [["mesh/web", "pod has an Istio sidecar"]]);
  t.deepEqual([...enrollmentReasons(cluster([injected]), cluster([meshWeb]), NODE)], [["mesh/web", "pod no longer has an Istio sidecar"]]);

  const dns = workload("kube-system/dns");
  t.deepEqual([...enrollmentReasons(undefined, cluster([dns, meshWeb]), NODE)], [["mesh/web", "agent start"]]);
  t.deepEqual([...enrollmentReasons(undefined, cluster([dns]), NODE, { excludedNamespaces: [] })], [["kube-system/dns", "agent start"]]);
  t.deepEqual([...enrollmentReasons(cluster([dns]), cluster([dns]), NODE, { excludedNamespaces: [] })], []);
});

test("enrollment reasons when pod label outlives namespace", (t) => {
  const labelled = workload("plain/web", { labels: AMBIENT });
  const before = snapshot([namespace("plain", AMBIENT)], [labelled]);
  const after = snapshot([namespace("plain")], [labelled]);
  t.deepEqual([...enrollmentReasons(before, after, NODE)], [], "the pod label keeps the pod enrolled");
});

test("one workload per IP: the lower rank wins, a tie keeps none", (t) => {
  const workload = (uid: string, ip: string, deleting = false): Workload =>
    ({ uid, name: uid, namespace: "shop", serviceAccount: "sa", nodeName: "n1", ip, labels: {}, namedPorts: {}, hostNetwork: false, ready: true, source: { file: "t", document: 0 }, ...(deleting && { deleting }) }) as Workload;
  const rank = (w: Workload): number => (w.deleting ? 2 : 0);
  const { kept, conflicts } = onePerIp([workload("api", "10.1.0.5"), workload("ghost", "10.1.0.5", true), workload("db", "10.1.0.6")], rank);
  t.deepEqual(kept.map((w) => w.uid), ["api", "db"]);
  t.deepEqual(conflicts, []);
  const tie = onePerIp([workload("a", "10.1.0.7"), workload("b", "10.1.0.7"), workload("c", "10.1.0.8")], rank);
  t.deepEqual(tie.kept.map((w) => w.uid), ["c"]);
  t.deepEqual(tie.conflicts, [{ ip: "10.1.0.7", uids: ["a", "b"] }]);
});
