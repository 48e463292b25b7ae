import test from "ava";
import { canonicalIp, cidrContains, parseCidr } from "../../agent/state/ip";
import { MeshState } from "../../agent/state/mesh-state";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { mtlsFor } from "../../agent/rbac/peer-authentication";
import { parseManifests } from "../../agent/discovery/manifests";

const MANIFESTS = `
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web}}
spec: {nodeName: node-a}
status: {podIP: "fd00::a"}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: demo, labels: {app: db}}
spec: {nodeName: node-b}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: host-agent, namespace: demo}
spec: {nodeName: node-b, hostNetwork: true}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: other, labels: {app: web}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIPs: ["10.96.0.10", "fd00:96::10"], selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: demo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: demo}
spec: {selector: {matchLabels: {app: web}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-only, namespace: demo}
spec: {selector: {matchLabels: {app: db}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {action: DENY}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all-web, namespace: istio-system}
spec: {selector: {matchLabels: {app: web}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: other}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: demo}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: demo}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: UNSET}, portLevelMtls: {"9090": {mode: PERMISSIVE}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: lax, namespace: other}
spec: {mtls: {mode: PERMISSIVE}}
`;

function state(): MeshState {
  const result = parseManifests("state.yaml", MANIFESTS);
  if (result.problems.length > 0) throw new Error(JSON.stringify(result.problems));
  return new MeshState(buildSnapshot(result.objects));
}

test("workload by ip in any form", (t) => {
  const mesh = state();
  t.is(mesh.workloadByIp("FD00:0:0::A")?.uid, "demo/web");
  t.is(mesh.workloadByIp("::ffff:10.0.1.3")?.uid, "other/api");
  t.is(mesh.workloadByIp("10.9.9.9"), undefined);
});

test("pod network wins over host network", (t) => {
  t.is(state().workloadByIp("10.0.0.2")?.uid, "demo/db");
});

test("service by vip and selector", (t) => {
  const mesh = state();
  t.is(mesh.serviceByVip("10.96.0.10")?.uid, "demo/web");
  t.is(mesh.serviceByVip("fd00:96:0::10")?.uid, "demo/web");
  const web = mesh.workload("demo/web")!;
  t.deepEqual(mesh.servicesForWorkload(web).map((service) => service.uid), ["demo/web"]);
  t.deepEqual(mesh.servicesForWorkload(mesh.workload("other/api")!), []);
  t.deepEqual(mesh.workloadsForService(mesh.service("demo/web")!).map((workload) => workload.uid), ["demo/web"]);
});

test("service cluster IP that is a pod IP is not routed", (t) => {
  const hijack = `
apiVersion: v1
kind: Service
metadata: {name: hijack, namespace: other}
spec: {clusterIP: 10.0.0.2, selector: {app: web}, ports: [{port: 8080, targetPort: 8080}]}
`;
  const result = parseManifests("state.yaml", MANIFESTS + "---" + hijack);
  t.deepEqual(result.problems, []);
  const mesh = new MeshState(buildSnapshot(result.objects));
  t.is(mesh.serviceByVip("10.0.0.2"), undefined);
  t.is(mesh.workloadByIp("10.0.0.2")?.uid, "demo/db");
  t.deepEqual(
    mesh.vipConflicts().map(({ service, vip, workload }) => [service.uid, vip, workload?.uid]),
    [["other/hijack", "10.0.0.2", "demo/db"]],
  );
  t.is(mesh.serviceByVip("10.96.0.10")?.uid, "demo/web");
});

test("two Services with one cluster IP: the earlier holder keeps it", (t) => {
  const duplicate = `
apiVersion: v1
kind: Service
metadata: {name: aaa-dup, namespace: other}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
`;
  const before = state();
  const result = parseManifests("state.yaml", MANIFESTS + "---" + duplicate);
  t.deepEqual(result.problems, []);
  const after = new MeshState(buildSnapshot(result.objects), before);
  t.is(after.serviceByVip("10.96.0.10")?.uid, "demo/web");
  t.deepEqual(
    after.vipConflicts().map(({ service, vip, other }) => [service.uid, vip, other?.uid]),
    [["other/aaa-dup", "10.96.0.10", "demo/web"]],
  );
  // With no earlier state, neither Service gets the address, whatever the order of names.
  const fresh = new MeshState(buildSnapshot(result.objects));
  t.is(fresh.serviceByVip("10.96.0.10"), undefined);
  t.is(fresh.vipConflicts().length, 1);
  // The second cluster IP of demo/web is not contested and keeps working.
  t.is(fresh.serviceByVip("fd00:96::10")?.uid, "demo/web");
});

test("workloads on node", (t) => {
  const mesh = state();
  t.deepEqual(mesh.workloadsOnNode("node-a").map((workload) => workload.uid), ["demo/web", "other/api"]);
  t.deepEqual(mesh.workloadsOnNode("node-b").map((workload) => workload.uid), ["demo/db", "demo/host-agent"]);
  t.deepEqual(mesh.workloadsOnNode("node-z"), []);
  t.is(mesh.namespace("demo")?.labels["istio.io/dataplane-mode"], "ambient");
});

test("policies for workload by scope", (t) => {
  const mesh = state();
  const uids = (uid: string) => mesh.policiesForWorkload(mesh.workload(uid)!).map((policy) => policy.uid);
  t.deepEqual(uids("demo/web"), ["demo/ns-wide", "demo/web-only", "istio-system/all-web", "istio-system/mesh-wide"]);
  t.deepEqual(uids("demo/db"), ["demo/db-only", "demo/ns-wide", "istio-system/mesh-wide"]);
  t.deepEqual(uids("other/api"), ["istio-system/all-web", "istio-system/mesh-wide", "other/elsewhere"]);
});

test("custom root namespace", (t) => {
  const mesh = state();
  const web = mesh.workload("demo/web")!;
  t.deepEqual(mesh.policiesForWorkload(web, "mesh-root").map((policy) => policy.uid), ["demo/ns-wide", "demo/web-only"]);
});

test("peer authentication scopes and mode", (t) => {
  const mesh = state();
  const web = mesh.workload("demo/web")!;
  const scopes = mesh.peerAuthenticationsFor(web);
  t.is(scopes.mesh?.uid, "istio-system/mesh");
  t.is(scopes.namespace?.uid, "demo/ns");
  t.is(scopes.workload?.uid, "demo/web");
  t.is(mtlsFor(mesh, web, 8080).mode, "STRICT");
  t.is(mtlsFor(mesh, web, 9090).mode, "PERMISSIVE");
  t.is(mtlsFor(mesh, mesh.workload("other/api")!, 8080).mode, "PERMISSIVE");
  t.is(mtlsFor(mesh, web, 8080, "mesh-root").mode, "PERMISSIVE");
});

test("empty state", (t) => {
  const mesh = new MeshState();
  t.is(mesh.workloadByIp("10.0.0.1"), undefined);
  t.deepEqual(mesh.workloads(), []);
});

test("canonical ip forms", (t) => {
  t.is(canonicalIp("10.1.2.3"), "10.1.2.3");
  t.is(canonicalIp("::FFFF:10.1.2.3"), "10.1.2.3");
  t.is(canonicalIp("::ffff:a01:203"), "10.1.2.3");
  t.is(canonicalIp("FD00:0000::0001"), "fd00::1");
  t.is(canonicalIp("not-an-ip"), "not-an-ip");
});

test("cidr contains", (t) => {
  t.true(cidrContains(parseCidr("10.0.0.0/8")!, "10.200.1.1"));
  t.false(cidrContains(parseCidr("10.0.0.0/8")!, "11.0.0.1"));
  t.true(cidrContains(parseCidr("0.0.0.0/0")!, "192.0.2.1"));
  t.true(cidrContains(parseCidr("fd00::/16")!, "fd00:1::5"));
  t.false(cidrContains(parseCidr("fd00::/16")!, "10.0.0.1"));
  t.true(cidrContains(parseCidr("::ffff:10.0.0.0/104")!, "10.1.1.1"));
  t.true(cidrContains(parseCidr("10.0.0.0/8")!, "::ffff:10.1.1.1"));
  t.is(parseCidr("10.0.0.0/33"), undefined);
  t.is(parseCidr("10.0.0/8"), undefined);
});
