import crypto from "node:crypto";
import test from "ava";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import {
  certificateViews,
  changeLogLevels,
  configDump,
  connectionViews,
  parseChain,
  serviceViews,
  statusView,
  workloadViews,
  type AdminSources,
  type ConnectionSource,
} from "../../agent/admin/routes";
import type { ConnectionView } from "../../agent/admin/views";
import { DEFAULT_ENROLLMENT_SETTINGS } from "../../agent/enroll/enrollment";
import type { EnrolledWorkload } from "../../agent/enroll/reconciler";
import { AgentError } from "../../agent/errors";
import type { CertificateStatus } from "../../agent/identity/cert-manager";
import { LogLevels, silentLogger } from "../../agent/log";
import { DEFAULT_LIMITS, limitSettings } from "../../agent/proxy/limits";
import { MeshState } from "../../agent/state/mesh-state";
import type { Direction } from "../../agent/state/types";
import { agentVersion } from "../../agent/version";
import { createIntermediate, createLeaf, createRoot } from "./cert-fixtures";

const MANIFESTS = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web-sa}
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: stuck, namespace: shop, labels: {app: stuck}}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: shop, labels: {app: web}}
spec: {nodeName: node-b}
status: {podIP: 10.0.1.1, phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: plain}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: new, namespace: shop}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, action: ALLOW, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
`;

function meshState(): MeshState {
  const result = parseManifests("routes.yaml", MANIFESTS);
  if (result.problems.length > 0) throw new Error(JSON.stringify(result.problems));
  return new MeshState(buildSnapshot(result.objects));
}

function enrolledEntry(state: MeshState, uid: string, cookie: bigint): EnrolledWorkload {
  const workload = state.workload(uid)!;
  return {
    workload,
    identity: { trustDomain: "cluster.local", namespace: workload.namespace, serviceAccount: workload.serviceAccount },
    netnsPath: `/var/run/netns/${workload.name}`,
    cookie,
  } as EnrolledWorkload;
}

function connection(workload: string, direction: Direction, id: string): ConnectionView {
  return {
    id,
    workload,
    direction,
    local: "10.0.0.1:40000",
    remote: "10.0.0.2:8080",
    protocol: "HBONE",
    startedAt: new Date(0).toISOString(),
    durationMs: 5,
    bytesSent: 1,
    bytesRecv: 2,
  };
}

function fakeConnections(views: ConnectionView[]): ConnectionSource {
  return {
    views: (direction) => views.filter((view) => direction === undefined || view.direction === direction),
    counts: () => ({
      inbound: views.filter((view) => view.direction === "inbound").length,
      outbound: views.filter((view) => view.direction === "outbound").length,
    }),
  };
}

function sources(overrides: Partial<AdminSources> = {}): AdminSources {
  const state = meshState();
  const enrolled = [enrolledEntry(state, "shop/web", 11n), enrolledEntry(state, "shop/api", 12n)];
  return {
    node: "node-a",
    version: "1.2.3",
    startedAt: Date.now() - 90_000,
    configurationSource: "manifests",
    rootNamespace: "istio-system",
    trustDomain: () => "cluster.local",
    state: () => state,
    enrollmentSettings: () => DEFAULT_ENROLLMENT_SETTINGS,
    enrolled: () => enrolled,
    desired: () => ["shop/web", "shop/api", "shop/stuck", "shop/new"].map((uid) => state.workload(uid)!),
    ambiguous: () => [],
    isolated: () => [{ workload: "shop/stuck", netns: "/var/run/netns/stuck", cookie: 13n }],
    certificates: () => [],
    identity: () => undefined,
    captureSelection: () => ({ requested: "auto", mode: "nftables", reason: "no sk_lookup", features: [], missing: [] }),
    captureAttached: () => true,
    captureUsage: () => undefined,
    captureEntries: () => ({ error: "capture runs in nftables mode, which pins no eBPF entries" }),
    kubernetes: () => undefined,
    cni: () => undefined,
    problems: () => [],
    connections: () =>
      fakeConnections([connection("shop/web", "outbound", "c1"), connection("shop/web", "inbound", "c2"), connection("shop/api", "inbound", "c3")]),
    stopping: () => false,
    ...overrides,
  };
}

test("workloads sorted by namespace and name", (t) => {
  const admin = sources();
  const views = workloadViews(admin, admin.state()!);
  t.deepEqual(
    views.map((view) => view.uid),
    ["plain/db", "shop/api", "shop/new", "shop/remote", "shop/stuck", "shop/web"],
  );
});

test("workload states from the reconciler", (t) => {
  const admin = sources();
  const byUid = new Map(workloadViews(admin, admin.state()!).map((view) => [view.uid, view]));
  t.is(byUid.get("shop/web")?.state, "Up");
  // Listeners that failed to start are retried, so the pod is still pending.
  t.is(byUid.get("shop/stuck")?.state, "Pending");
  t.is(byUid.get("shop/new")?.state, "Pending");
  t.is(byUid.get("plain/db")?.state, "NotEnrolled");
  t.is(byUid.get("shop/remote")?.state, "Remote");
  t.false(byUid.get("shop/remote")!.local);
  const ambiguous = sources({ ambiguous: () => [{ workload: "shop/stuck", ip: "10.0.0.9", netns: "/var/run/netns/stuck", cookie: 13n }] });
  const stuck = workloadViews(ambiguous, ambiguous.state()!).find((view) => view.uid === "shop/stuck");
  t.is(stuck?.state, "Isolated");
});

test("workload view fields", (t) => {
  const admin = sources();
  const web = workloadViews(admin, admin.state()!).find((view) => view.uid === "shop/web")!;
  t.deepEqual(web.ips, ["10.0.0.1", "fd00::1"]);
  t.is(web.identity, "spiffe://cluster.local/ns/shop/sa/web-sa");
  t.is(web.protocol, "HBONE");
  t.is(web.reason, "namespace shop is labelled istio.io/dataplane-mode=ambient");
  const db = workloadViews(admin, admin.state()!).find((view) => view.uid === "plain/db")!;
  t.is(db.protocol, "TCP");
  t.regex(db.reason ?? "", /not labelled|dataplane-mode/);
});

test("services with endpoints", (t) => {
  const [web] = serviceViews(meshState());
  t.is(web.name, "web");
  t.deepEqual(web.vips, ["10.96.0.10"]);
  t.deepEqual(web.ports, [{ name: "http", port: 80, targetPort: 8080, protocol: "TCP" }]);
  // shop/remote is Pending, so not ready.
  t.is(web.endpoints.total, 4);
  t.is(web.endpoints.healthy, 3);
  t.deepEqual(web.endpoints.addresses, ["10.0.0.1", "10.0.0.2", "fd00::1"]);
});

test("connections filtered by direction", (t) => {
  const admin = sources();
  t.is(connectionViews(admin, new URLSearchParams()).length, 3);
  t.deepEqual(
    connectionViews(admin, new URLSearchParams("direction=inbound")).map((view) => view.id),
    ["c2", "c3"],
  );
  t.deepEqual(
    connectionViews(admin, new URLSearchParams("direction=outbound")).map((view) => view.id),
    ["c1"],
  );
});

test("connections reject a bad direction", (t) => {
  const error = t.throws(() => connectionViews(sources(), new URLSearchParams("direction=sideways")), { instanceOf: AgentError });
  t.is(error?.code, "INVALID_QUERY");
  t.regex(error?.message ?? "", /"sideways"/);
});

test("status counts and checks", (t) => {
  const now = Date.now();
  const status = statusView(sources({ startedAt: now - 90_000 }), now);
  t.is(status.version, "1.2.3");
  t.is(status.node, "node-a");
  t.is(status.uptimeSeconds, 90);
  // Pods not served yet are counted, but only their certificates could make the node unready.
  t.true(status.ready);
  t.deepEqual(status.checks, { configuration: true, capture: true, enrolment: true, certificates: true });
  t.is(status.enrolled, 2);
  t.is(status.isolated, 0);
  t.is(status.pending, 2);
  t.deepEqual(status.connections, { inbound: 2, outbound: 1 });
  t.is(status.configuration.workloads, 6);
  t.is(status.configuration.services, 1);
  t.is(status.configuration.policies, 3);
  t.is(status.capture?.mode, "nftables");
  t.deepEqual(status.capture?.programs, []);
});

test("status not ready while stopping", (t) => {
  const status = statusView(sources({ stopping: () => true }));
  t.false(status.ready);
});

test("status certificate counts", (t) => {
  const certificates: CertificateStatus[] = [
    { identity: "a", state: "valid", failures: 0, workloads: [], notAfter: "2030-01-02T00:00:00.000Z" },
    { identity: "b", state: "failing", failures: 2, workloads: [], notAfter: "2030-01-01T00:00:00.000Z" },
  ];
  // Renewals of b fail, but its certificate is valid until 2030, so its pods are still served.
  const status = statusView(sources({ certificates: () => certificates }));
  t.true(status.checks.certificates);
  const expired = statusView(sources({ certificates: () => [{ ...certificates[1], notAfter: "2020-01-01T00:00:00.000Z" }] }));
  t.false(expired.checks.certificates);
  const none = statusView(sources({ certificates: () => [{ identity: "c", state: "failing", failures: 1, workloads: [] }] }));
  t.false(none.checks.certificates);
  t.deepEqual(status.certificates, { total: 2, valid: 1, refreshing: 0, pending: 0, failing: 1, expired: 0, nextExpiry: "2030-01-01T00:00:00.000Z" });
});

test("certificate chain types without keys", async (t) => {
  const root = await createRoot({ name: "test-root" });
  const intermediate = await createIntermediate(root, { name: "test-intermediate" });
  const leaf = await createLeaf(intermediate, { uris: ["spiffe://cluster.local/ns/shop/sa/web-sa"] });
  const chainPem = leaf.chainPem + root.certPem;
  const status: CertificateStatus = {
    identity: "spiffe://cluster.local/ns/shop/sa/web-sa",
    state: "valid",
    failures: 0,
    workloads: ["shop/web"],
    notBefore: leaf.notBefore.toISOString(),
    notAfter: leaf.notAfter.toISOString(),
    // A key in the text must not reach the view.
    chainPem: leaf.keyPem + chainPem,
  };
  const [view] = certificateViews([status]);
  t.deepEqual(
    view.chain.map((entry) => entry.type),
    ["Leaf", "Intermediate", "Root"],
  );
  t.is(view.chain[1].subject, "CN=test-intermediate");
  t.is(view.chain[2].subject, "CN=test-root");
  t.is(view.chain[0].notAfter, leaf.notAfter.toISOString());
  t.regex(view.chain[0].serialNumber, /^[0-9A-F]+$/);
  t.true(view.expiresInSeconds! > 0);
  const text = JSON.stringify(view);
  t.false(text.includes("PRIVATE KEY"));
  t.false(text.includes("chainPem"));
});

test("parse chain of a leaf only", async (t) => {
  const root = await createRoot({ name: "only-root" });
  const leaf = await createLeaf(root, { dnsNames: ["example.test"] });
  t.deepEqual(
    parseChain(leaf.certPem).map((entry) => entry.type),
    ["Leaf"],
  );
  t.deepEqual(parseChain(""), []);
});

test("parse chain appends issuing root", async (t) => {
  const root = await createRoot({ name: "issuing-root" });
  const other = await createRoot({ name: "other-root" });
  const leaf = await createLeaf(root, { uris: ["spiffe://cluster.local/ns/shop/sa/web"] });
  const roots = [other.certPem, root.certPem].map((pem) => new crypto.X509Certificate(pem));
  const chain = parseChain(leaf.certPem, roots);
  t.deepEqual(
    chain.map((entry) => entry.type),
    ["Leaf", "Root"],
  );
  t.is(chain[1].subject, "CN=issuing-root");
  // A chain that ends with its root gets no second copy of it.
  t.deepEqual(
    parseChain(leaf.certPem + root.certPem, roots).map((entry) => entry.type),
    ["Leaf", "Root"],
  );
});

test("config dump fields", (t) => {
  const dump = configDump(sources());
  t.is(dump.version, "1.2.3");
  t.is(dump.node, "node-a");
  t.is(dump.trustDomain, "cluster.local");
  t.is((dump.workloads as unknown[]).length, 6);
  t.is((dump.services as unknown[]).length, 1);
  const policies = dump.policies as { rules?: unknown[]; selector?: unknown; source: string }[];
  t.true(policies.every((policy) => /^routes\.yaml, document \d+$/.test(policy.source)));
  t.is(policies[0].rules?.length, 1);
  t.deepEqual(policies[1].selector, { app: "web" });
  t.deepEqual(policies.map(({ rules, selector, source, ...rest }) => rest), [
    { kind: "AuthorizationPolicy", namespace: "istio-system", name: "deny-all", scope: "Global", action: "DENY" },
    { kind: "AuthorizationPolicy", namespace: "shop", name: "allow-web", scope: "WorkloadSelector", action: "ALLOW" },
    { kind: "PeerAuthentication", namespace: "shop", name: "strict", scope: "Namespace", action: "STRICT", portLevelMtls: {} },
  ]);
  t.deepEqual(dump.workloadState, {
    "shop/web": { state: "Up", netns: "/var/run/netns/web", cookie: "11", connections: { inbound: 1, outbound: 1 } },
    "shop/api": { state: "Up", netns: "/var/run/netns/api", cookie: "12", connections: { inbound: 1, outbound: 0 } },
  });
  t.deepEqual(dump.captureMode, { mode: "nftables", requested: "auto", reason: "no sk_lookup", features: [] });
  t.deepEqual(dump.enrolled, [
    { workload: "shop/web", ip: "10.0.0.1", netns: "/var/run/netns/web", cookie: "11" },
    { workload: "shop/api", ip: "10.0.0.2", netns: "/var/run/netns/api", cookie: "12" },
  ]);
  t.deepEqual(dump.isolated, [{ workload: "shop/stuck", netns: "/var/run/netns/stuck", cookie: "13" }]);
  t.notThrows(() => JSON.stringify(dump));
});

test("config dump before configuration", (t) => {
  const dump = configDump(sources({ state: () => undefined, enrolled: () => undefined }));
  t.deepEqual(dump.workloads, []);
  t.deepEqual(dump.policies, []);
  t.deepEqual(dump.workloadState, {});
});

test("logging change rejects bad input", (t) => {
  const levels = new LogLevels();
  const logger = silentLogger();
  const unknown = t.throws(() => changeLogLevels(levels, new URLSearchParams("level=nope:debug"), "127.0.0.1", logger), { instanceOf: AgentError });
  t.regex(unknown?.message ?? "", /unknown log component "nope".*valid components: .*cni/);
  const badLevel = t.throws(() => changeLogLevels(levels, new URLSearchParams("level=loud"), "127.0.0.1", logger), { instanceOf: AgentError });
  t.regex(badLevel?.message ?? "", /unknown log level "loud".*valid levels: fatal/);
  t.throws(() => changeLogLevels(levels, new URLSearchParams(""), "127.0.0.1", logger), { message: /exactly one of/ });
  t.throws(() => changeLogLevels(levels, new URLSearchParams("level=debug&reset"), "127.0.0.1", logger), { message: /exactly one of/ });
});

test("logging change applies and resets", (t) => {
  const levels = new LogLevels({ default: "info", components: { cni: "debug" } });
  const logger = silentLogger();
  const changed = changeLogLevels(levels, new URLSearchParams("level=cni:warn,access:error"), "127.0.0.1", logger);
  t.is(changed.components.cni, "warn");
  t.is(changed.components.access, "error");
  t.is(changed.default, "info");
  const reset = changeLogLevels(levels, new URLSearchParams("reset"), "127.0.0.1", logger);
  t.is(reset.components.cni, "debug");
  t.is(reset.components.access, "info");
});

test("version from package.json", (t) => {
  t.regex(agentVersion(), /^\d+\.\d+\.\d+/);
});

test("capture usage failure reported", (t) => {
  const failing = sources({
    captureUsage: () => {
      throw new Error("map ambient_agent_pods is gone");
    },
  });
  const status = statusView(failing);
  t.deepEqual(status.capture?.programs, []);
  t.deepEqual(status.capture?.maps, []);
  t.deepEqual(configDump(failing).captureUsage, { error: "cannot read the capture programs and maps: map ambient_agent_pods is gone" });
});

test("capture usage listed", (t) => {
  const usage = { programs: [{ name: "connect4", type: "cgroup_sock_addr", attachedTo: "/sys/fs/cgroup" }], maps: [{ name: "pods", entries: 2, maxEntries: 1024 }] };
  const status = statusView(sources({ captureUsage: () => usage }));
  t.deepEqual(status.capture?.programs, usage.programs);
  t.deepEqual(status.capture?.maps, usage.maps);
});

test("config dump lists the limits in force", (t) => {
  t.is(configDump(sources()).limits, undefined);
  const limits = { ...DEFAULT_LIMITS, maxConnectionsPerPod: 7, idleTimeoutMs: 0 };
  t.deepEqual(configDump(sources({ limits: () => limits })).limits, limitSettings(limits));
});

test("status lists refusals with their limit", (t) => {
  t.is(statusView(sources()).refusals, undefined);
  const totals = [
    { listener: "outbound", reason: "connections_per_pod", count: 3 },
    { listener: "inbound", reason: "tls_handshake", count: 2 },
    { listener: "inbound", reason: "handshake_timeout", count: 0 },
  ];
  t.deepEqual(statusView(sources({ refusals: () => totals })).refusals, [
    { listener: "inbound", reason: "tls_handshake", count: 2 },
    { listener: "outbound", reason: "connections_per_pod", count: 3, flag: "--max-connections-per-pod" },
  ]);
});
