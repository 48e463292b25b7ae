import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import test from "ava";
import {
  AGENT_START_REASON,
  MAX_CHANGE_VALUE_CHARS,
  MAX_POLICY_CHANGES,
  REDACTED,
  agentStartedRecord,
  agentStoppedRecord,
  agentVersion,
  captureModeRecord,
  certificateRecord,
  enrollmentReasons,
  policyRecords,
  rejectionRecords,
  unenforcedPolicyProblems,
  workloadRecord,
} from "../../agent/audit/control";
import type { ControlRecord } from "../../agent/audit/record";
import { buildSnapshot } from "../../agent/discovery/manifest-merge";
import { parseManifests, type ManifestProblem } from "../../agent/discovery/manifests";
import { EmbeddedCa, initCa } from "../../agent/identity/ca";
import { CertManager, type CertificateIssuedEvent } from "../../agent/identity/cert-manager";
import { silentLogger } from "../../agent/log";
import type { ClusterSnapshot, Identity, Workload } from "../../agent/state/types";

const NODE = "n1";
const TIME = "2026-12-05T07:00:00.000Z";
const HOUR = 3600_000;

const ALLOW = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/demo/sa/client", "cluster.local/ns/demo/sa/other"]}
    to:
    - operation: {ports: ["8080"]}
`;

const STRICT = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
`;

/** Parses manifest files into one snapshot, and returns the problems too. */
function read(files: Record<string, string>): { snapshot: ClusterSnapshot; problems: ManifestProblem[] } {
  const results = Object.entries(files).map(([file, text]) => parseManifests(file, text));
  return { snapshot: buildSnapshot(results.flatMap((result) => result.objects)), problems: results.flatMap((result) => result.problems) };
}

function snapshotOf(files: Record<string, string>): ClusterSnapshot {
  const { snapshot, problems } = read(files);
  if (problems.length > 0) throw new Error(`unexpected manifest problems: ${problems.map((problem) => problem.message).join("; ")}`);
  return snapshot;
}

type PolicyChangeRecord = Extract<ControlRecord, { type: "policy.added" | "policy.changed" | "policy.removed" }>;

function onlyChange(records: ControlRecord[]): PolicyChangeRecord {
  if (records.length !== 1 || records[0].type !== "policy.changed") throw new Error(`expected one policy.changed, got ${JSON.stringify(records)}`);
  return records[0];
}

test("policy records at agent start add every policy", (t) => {
  const after = snapshotOf({ "a.yaml": ALLOW, "p.yaml": STRICT });
  t.deepEqual(policyRecords(undefined, after, NODE, TIME), [
    { type: "policy.added", time: TIME, node: NODE, policy: { kind: "AuthorizationPolicy", namespace: "demo", name: "allow-client" }, file: "a.yaml" },
    { type: "policy.added", time: TIME, node: NODE, policy: { kind: "PeerAuthentication", namespace: "demo", name: "strict" }, file: "p.yaml" },
  ]);
});

test("policy records removed policy", (t) => {
  const before = snapshotOf({ "a.yaml": ALLOW, "p.yaml": STRICT });
  const after = snapshotOf({ "a.yaml": ALLOW });
  t.deepEqual(policyRecords(before, after, NODE, TIME), [
    { type: "policy.removed", time: TIME, node: NODE, policy: { kind: "PeerAuthentication", namespace: "demo", name: "strict" }, file: "p.yaml" },
  ]);
});

test("policy records unchanged policy yields nothing", (t) => {
  const before = snapshotOf({ "a.yaml": ALLOW, "p.yaml": STRICT });
  // The same policy as a later document of its file, with other formatting.
  const after = snapshotOf({ "a.yaml": `apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\n${ALLOW.replace("action: ALLOW", "action:   ALLOW")}`, "p.yaml": STRICT });
  t.deepEqual(policyRecords(before, after, NODE, TIME), []);
});

test("policy records changed principal", (t) => {
  const before = snapshotOf({ "a.yaml": ALLOW });
  const after = snapshotOf({ "a.yaml": ALLOW.replace("sa/other", "sa/admin") });
  const record = onlyChange(policyRecords(before, after, NODE, TIME));
  t.deepEqual(record.policy, { kind: "AuthorizationPolicy", namespace: "demo", name: "allow-client" });
  t.is(record.file, "a.yaml");
  t.is(record.previous_file, undefined);
  t.deepEqual(record.changes, [
    { path: "spec.rules[0].from[0].source.principals[1]", before: "cluster.local/ns/demo/sa/other", after: "cluster.local/ns/demo/sa/admin" },
  ]);
});

test("policy records changed action and added rule", (t) => {
  const before = snapshotOf({ "a.yaml": ALLOW });
  const after = snapshotOf({ "a.yaml": `${ALLOW.replace("action: ALLOW", "action: DENY")}  - to:\n    - operation: {ports: ["9090"]}\n` });
  const record = onlyChange(policyRecords(before, after, NODE, TIME));
  t.deepEqual(record.changes, [
    { path: "spec.action", before: "ALLOW", after: "DENY" },
    { path: "spec.rules[1]", after: { to: [{ operation: { ports: ["9090"] } }] } },
  ]);
});

test("policy records dry-run annotation", (t) => {
  const before = snapshotOf({ "a.yaml": ALLOW });
  const after = snapshotOf({ "a.yaml": ALLOW.replace("namespace: demo}", `namespace: demo, annotations: {"istio.io/dry-run": "true"}}`) });
  const record = onlyChange(policyRecords(before, after, NODE, TIME));
  t.deepEqual(record.changes, [{ path: "metadata.annotations.istio.io/dry-run", after: "true" }]);

  const back = onlyChange(policyRecords(after, before, NODE, TIME));
  t.deepEqual(back.changes, [{ path: "metadata.annotations.istio.io/dry-run", before: "true" }]);
});

test("policy records move to another file", (t) => {
  const before = snapshotOf({ "a.yaml": ALLOW });
  const after = snapshotOf({ "b.yaml": ALLOW });
  const record = onlyChange(policyRecords(before, after, NODE, TIME));
  t.is(record.file, "b.yaml");
  t.is(record.previous_file, "a.yaml");
  t.deepEqual(record.changes, []);
});

test("policy records peer authentication modes", (t) => {
  const before = snapshotOf({ "p.yaml": STRICT });
  const after = snapshotOf({
    "p.yaml": STRICT.replace("spec:\n", "spec:\n  selector: {matchLabels: {app: web}}\n  portLevelMtls: {\"9090\": {mode: PERMISSIVE}}\n").replace("STRICT}", "PERMISSIVE}"),
  });
  const record = onlyChange(policyRecords(before, after, NODE, TIME));
  t.deepEqual(record.changes, [
    { path: "spec.selector", after: { matchLabels: { app: "web" } } },
    { path: "spec.mtls.mode", before: "STRICT", after: "PERMISSIVE" },
    { path: "spec.portLevelMtls", after: { "9090": { mode: "PERMISSIVE" } } },
  ]);
});

test("policy records cap changes and values", (t) => {
  const many = Array.from({ length: 60 }, (_, index) => `"cluster.local/ns/demo/sa/a${index}"`).join(", ");
  const longName = `cluster.local/ns/demo/sa/${"x".repeat(400)}`;
  const before = snapshotOf({ "a.yaml": ALLOW.replace(`"cluster.local/ns/demo/sa/client", "cluster.local/ns/demo/sa/other"`, many) });
  const after = snapshotOf({ "a.yaml": ALLOW.replace(`"cluster.local/ns/demo/sa/client", "cluster.local/ns/demo/sa/other"`, many.replace(/sa\/a/g, "sa/b").replace('"cluster.local/ns/demo/sa/b0"', `"${longName}"`)) });
  const record = onlyChange(policyRecords(before, after, NODE, TIME));

  t.is(record.changes?.length, MAX_POLICY_CHANGES);
  t.is(record.changes_omitted, 60 - MAX_POLICY_CHANGES);
  const first = record.changes![0];
  t.is(first.path, "spec.rules[0].from[0].source.principals[0]");
  t.is(first.before, "cluster.local/ns/demo/sa/a0");
  t.true(typeof first.after === "string" && first.after.length < MAX_CHANGE_VALUE_CHARS + 40, "a long value is cut");
  t.regex(first.after as string, /… \(\d+ more characters\)$/);
});

test("rejection records once while it lasts", (t) => {
  const broken = ALLOW.replace("action: ALLOW", "action: ALLOWED");
  const first = read({ "a.yaml": broken, "p.yaml": STRICT }).problems;
  t.true(first.length > 0);

  const records = rejectionRecords([], first, NODE, TIME);
  t.deepEqual(records, [
    {
      type: "policy.rejected",
      time: TIME,
      node: NODE,
      policy: { kind: "AuthorizationPolicy", namespace: "demo", name: "allow-client" },
      file: "a.yaml",
      line: 6,
      message: `spec.action: invalid action "ALLOWED"; use ALLOW, DENY, AUDIT or CUSTOM`,
    },
  ]);

  // The same problem one line further down is the same rejection.
  const moved = read({ "a.yaml": `# a comment\n${broken}` }).problems;
  t.is(moved[0].line, 7);
  t.deepEqual(rejectionRecords(first, moved, NODE, TIME), []);

  // Fixed, then broken again: recorded again.
  const fixed = read({ "a.yaml": ALLOW }).problems;
  t.deepEqual(rejectionRecords(moved, fixed, NODE, TIME), []);
  t.is(rejectionRecords(fixed, first, NODE, TIME).length, 1);
});

test("rejection records skip other kinds", (t) => {
  const { problems } = read({ "pod.yaml": "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo}\nspec: {nodeName: 7}\n", "bad.yaml": "kind: [" });
  t.true(problems.length >= 2);
  t.deepEqual(rejectionRecords([], problems, NODE, TIME), []);
});

test("rejection records unenforced action", (t) => {
  const custom = snapshotOf({ "c.yaml": ALLOW.replace("action: ALLOW", "action: CUSTOM") });
  const problems = unenforcedPolicyProblems(custom);
  const records = rejectionRecords([], problems, NODE, TIME);
  t.is(records.length, 1);
  const record = records[0] as Extract<ControlRecord, { type: "policy.rejected" }>;
  t.is(record.file, "c.yaml");
  t.deepEqual(record.policy, { kind: "AuthorizationPolicy", namespace: "demo", name: "allow-client" });
  t.regex(record.message, /spec\.action CUSTOM is not supported/);
  t.deepEqual(rejectionRecords(problems, unenforcedPolicyProblems(custom), NODE, TIME), []);
  t.deepEqual(unenforcedPolicyProblems(snapshotOf({ "a.yaml": ALLOW })), []);
});

// ---------------------------------------------------------------------------------------------
// Certificates

const sleep: Identity = { trustDomain: "cluster.local", namespace: "default", serviceAccount: "sleep" };

async function loadCa(): Promise<EmbeddedCa> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-control-"));
  try {
    await initCa(dir);
    return await EmbeddedCa.load(dir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function waitUntil(condition: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test.serial("certificate records issued then rotated", async (t) => {
  const ca = await loadCa();
  const clock = { now: Date.now() };
  const events: CertificateIssuedEvent[] = [];
  const fromOption: boolean[] = [];
  const manager = new CertManager({ issue: (identity) => ca.issue(identity) }, silentLogger(), {
    now: () => clock.now,
    onIssued: (event) => fromOption.push(event.rotated),
  });
  t.teardown(() => manager.close());
  const stop = manager.onIssued((event) => events.push(event));
  manager.onIssued(() => {
    throw new Error("a failing listener does not stop the others");
  });

  const first = await manager.get(sleep);
  clock.now += 13 * HOUR;
  await manager.get(sleep);
  await waitUntil(() => events.length === 2, "the rotation");
  stop();

  t.deepEqual(events.map((event) => event.rotated), [false, true]);
  t.deepEqual(fromOption, [false, true]);
  t.is(events[0].certificate.certPem, first.certPem);

  const issued = certificateRecord(events[0], NODE, TIME);
  const rotated = certificateRecord(events[1], NODE, TIME);
  const leaf = new crypto.X509Certificate(first.certPem);
  t.deepEqual(issued, {
    type: "certificate.issued",
    time: TIME,
    node: NODE,
    identity: "spiffe://cluster.local/ns/default/sa/sleep",
    serial: leaf.serialNumber.toLowerCase(),
    not_before: first.notBefore.toISOString(),
    not_after: first.notAfter.toISOString(),
    fingerprint_sha256: crypto.createHash("sha256").update(leaf.raw).digest("hex"),
    issuer: leaf.issuer.split("\n").join(", "),
  });
  t.regex(issued.type === "certificate.issued" ? issued.serial : "", /^[0-9a-f]+$/);
  t.is(rotated.type, "certificate.rotated");
  t.not((rotated as typeof issued & { serial: string }).serial, (issued as { serial: string }).serial);
  t.is(leaf.fingerprint256.replace(/:/g, "").toLowerCase(), (issued as { fingerprint_sha256: string }).fingerprint_sha256);
});

// ---------------------------------------------------------------------------------------------
// Enrollment

function workload(name: string, overrides: Partial<Workload> = {}): Workload {
  return {
    uid: `demo/${name}`,
    name,
    namespace: "demo",
    serviceAccount: name,
    nodeName: NODE,
    ip: "10.0.0.5",
    labels: {},
    namedPorts: {},
    hostNetwork: false,
    ready: true,
    source: { file: "pods.yaml", document: 0 },
    ...overrides,
  };
}

test("workload records enrolled and unenrolled", (t) => {
  const web = workload("web");
  t.deepEqual(workloadRecord({ action: "enrolled", workload: web, identity: sleep, reason: AGENT_START_REASON }, NODE, TIME), {
    type: "workload.enrolled",
    time: TIME,
    node: NODE,
    workload: "web",
    namespace: "demo",
    ip: "10.0.0.5",
    identity: "spiffe://cluster.local/ns/default/sa/sleep",
    reason: "agent start",
  });
  const record = workloadRecord({ action: "unenrolled", workload: { ...web, ip: "" }, identity: sleep, reason: "pod deleted" }, NODE, TIME);
  t.is(record.type, "workload.unenrolled");
  t.false("ip" in record);
});

function cluster(ambient: boolean, workloads: Workload[]): ClusterSnapshot {
  const labels: Record<string, string> = ambient ? { "istio.io/dataplane-mode": "ambient" } : {};
  return {
    namespaces: new Map([["demo", { name: "demo", labels, source: { file: "ns.yaml", document: 0 } }]]),
    workloads: new Map(workloads.map((item) => [item.uid, item])),
    services: new Map(),
    authorizationPolicies: new Map(),
    peerAuthentications: new Map(),
  };
}

test("enrollment reasons per rule", (t) => {
  const web = workload("web");
  const api = workload("api");
  t.deepEqual([...enrollmentReasons(undefined, cluster(true, [web, workload("far", { nodeName: "n2" })]), NODE)], [["demo/web", AGENT_START_REASON]]);
  t.deepEqual([...enrollmentReasons(cluster(false, [web]), cluster(true, [web]), NODE)], [["demo/web", "namespace labelled istio.io/dataplane-mode=ambient"]]);
  t.deepEqual([...enrollmentReasons(cluster(true, [web]), cluster(false, [web]), NODE)], [["demo/web", "namespace no longer ambient"]]);
  t.deepEqual([...enrollmentReasons(cluster(true, [web]), cluster(true, [api]), NODE)], [["demo/api", "pod created"], ["demo/web", "pod deleted"]]);
  t.deepEqual([...enrollmentReasons(cluster(true, [web]), cluster(true, [{ ...web, nodeName: "n2" }]), NODE)], [["demo/web", "pod moved to node n2"]]);
  t.deepEqual([...enrollmentReasons(cluster(true, [{ ...web, ip: "" }]), cluster(true, [web]), NODE)], [["demo/web", "pod got an IP"]]);
  t.deepEqual(
    [...enrollmentReasons(cluster(true, [web]), cluster(true, [{ ...web, labels: { "istio.io/dataplane-mode": "none" } }]), NODE)],
    [["demo/web", "pod labelled istio.io/dataplane-mode=none"]],
  );
  t.deepEqual([...enrollmentReasons(cluster(true, [web]), cluster(true, [{ ...web, ip: "10.0.0.6" }]), NODE)], [], "an IP change is the reconciler's to explain");
});

// ---------------------------------------------------------------------------------------------
// The agent

test("agent started record", (t) => {
  const record = agentStartedRecord(
    {
      previousStop: "unclean",
      settings: {
        node: NODE,
        identity: { ca: { kind: "istio", address: "istiod:15012", tokenFile: "/var/run/token", token: "abc" }, trustDomainAliases: [] },
        capture: "auto",
        drainTimeoutMs: 5000,
        onEvent: () => undefined,
        missing: undefined,
        inline: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
      },
    },
    NODE,
    TIME,
  );
  const packageJson = JSON.parse(fs.readFileSync(path.join(__dirname, "../../../package.json"), "utf8")) as { version: string };
  t.deepEqual(record, {
    type: "agent.started",
    time: TIME,
    node: NODE,
    version: packageJson.version,
    pid: process.pid,
    previous_stop: "unclean",
    settings: {
      node: NODE,
      identity: { ca: { kind: "istio", address: "istiod:15012", tokenFile: "/var/run/token", token: REDACTED }, trustDomainAliases: [] },
      capture: "auto",
      drainTimeoutMs: 5000,
      inline: REDACTED,
    },
  });
  t.is(agentVersion(), packageJson.version);
});

test("agent stopped and capture mode records", (t) => {
  t.deepEqual(agentStoppedRecord({ reason: "SIGTERM", openConnections: 3 }, NODE, TIME), {
    type: "agent.stopped",
    time: TIME,
    node: NODE,
    reason: "SIGTERM",
    open_connections: 3,
  });
  t.deepEqual(captureModeRecord({ mode: "nftables", requested: "auto", reason: "cgroup sock_addr hook unavailable" }, NODE, TIME), {
    type: "capture.mode",
    time: TIME,
    node: NODE,
    mode: "nftables",
    requested: "auto",
    reason: "cgroup sock_addr hook unavailable",
  });
});

// ---------------------------------------------------------------------------------------------
// Privacy

test.serial("control records hold no key, certificate or token", async (t) => {
  const ca = await loadCa();
  const issued = await ca.issue(sleep);
  const jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJl";
  const before = snapshotOf({ "a.yaml": ALLOW, "p.yaml": STRICT });
  const after = snapshotOf({ "a.yaml": ALLOW.replace("sa/other", "sa/admin") });
  const problems = read({ "b.yaml": ALLOW.replace("allow-client", "broken").replace("action: ALLOW", "action: X") }).problems;

  const records: ControlRecord[] = [
    agentStartedRecord({ settings: { node: NODE, token: jwt, auth: `Bearer ${jwt}`, ca: { keyPem: issued.keyPem, rootPem: issued.caRootsPem, chain: [issued.chainPem] } } }, NODE, TIME),
    captureModeRecord({ mode: "ebpf", requested: "auto", reason: "every hook attached" }, NODE, TIME),
    ...policyRecords(undefined, before, NODE, TIME),
    ...policyRecords(before, after, NODE, TIME),
    ...rejectionRecords([], problems, NODE, TIME),
    certificateRecord({ identity: sleep, rotated: false, certificate: issued }, NODE, TIME),
    certificateRecord({ identity: sleep, rotated: true, certificate: issued }, NODE, TIME),
    workloadRecord({ action: "enrolled", workload: workload("web"), identity: sleep, reason: AGENT_START_REASON }, NODE, TIME),
    agentStoppedRecord({ reason: "SIGTERM", openConnections: 0 }, NODE, TIME),
  ];
  t.is(records.length, 11);
  const text = records.map((record) => JSON.stringify(record)).join("\n");
  t.false(text.includes("PRIVATE KEY"));
  t.false(text.includes("BEGIN CERTIFICATE"));
  t.false(text.includes("-----BEGIN"));
  t.notRegex(text, /eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+/);
  t.false(text.includes(issued.keyPem.split("\n")[1]), "no line of the key's base64");
});
