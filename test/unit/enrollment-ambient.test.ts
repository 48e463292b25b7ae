import test from "ava";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import { diffEnrollment, enrolledWorkloads, isAmbient } from "../../agent/enroll/enrollment";
import { MeshState } from "../../agent/state/mesh-state";
import type { Workload } from "../../agent/state/types";

const MANIFESTS = `
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: mesh}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: mesh, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: mesh}
spec: {nodeName: node-a, hostNetwork: true}
status: {podIP: 192.168.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: mesh}
spec: {nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: mesh}
spec: {nodeName: node-b}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: orphan, namespace: unknown-ns}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.4}
`;

function state(): MeshState {
  const result = parseManifests("enroll.yaml", MANIFESTS);
  if (result.problems.length > 0) throw new Error(JSON.stringify(result.problems));
  return new MeshState(buildSnapshot(result.objects));
}

test("ambient rules per pod", (t) => {
  const mesh = state();
  const ambient = (uid: string) => isAmbient(mesh, mesh.workload(uid)!);
  t.true(ambient("mesh/a"));
  t.false(ambient("mesh/opted-out"));
  t.false(ambient("mesh/host"));
  t.true(ambient("mesh/pending"));
  t.false(ambient("legacy/old"));
  t.false(ambient("unknown-ns/orphan"));
});

test("enrolled workloads on node", (t) => {
  const mesh = state();
  t.deepEqual(enrolledWorkloads(mesh, "node-a").map((workload) => workload.uid), ["mesh/a"]);
  t.deepEqual(enrolledWorkloads(mesh, "node-b").map((workload) => workload.uid), ["mesh/remote"]);
  t.deepEqual(enrolledWorkloads(mesh, "node-c"), []);
});

function workload(uid: string, ip: string, serviceAccount = "default"): Workload {
  const [namespace, name] = uid.split("/");
  return {
    uid, name, namespace, serviceAccount, nodeName: "n", ip, labels: {}, namedPorts: {}, hostNetwork: false, ready: true,
    source: { file: "f", document: 0 },
  };
}

test("diff added removed changed", (t) => {
  const before = [workload("a/keep", "10.0.0.1"), workload("a/gone", "10.0.0.2"), workload("a/moved", "10.0.0.3"), workload("a/sa", "10.0.0.4")];
  const after = [
    workload("a/keep", "10.0.0.1"),
    workload("a/moved", "10.0.0.30"),
    workload("a/sa", "10.0.0.4", "other"),
    workload("a/new", "10.0.0.5"),
  ];
  const diff = diffEnrollment(before, after);
  t.deepEqual(diff.added.map((entry) => entry.uid), ["a/new"]);
  t.deepEqual(diff.removed.map((entry) => entry.uid), ["a/gone"]);
  t.deepEqual(diff.changed.map((entry) => [entry.before.ip, entry.after.ip, entry.after.serviceAccount]), [
    ["10.0.0.3", "10.0.0.30", "default"],
    ["10.0.0.4", "10.0.0.4", "other"],
  ]);
});

test("diff of equal sets is empty", (t) => {
  const set = [workload("a/x", "10.0.0.1")];
  t.deepEqual(diffEnrollment(set, [...set]), { added: [], removed: [], changed: [] });
});
