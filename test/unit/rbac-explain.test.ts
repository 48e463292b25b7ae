import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { ManifestSource, parseManifests } from "../../agent/discovery/manifests";
import { silentLogger } from "../../agent/log";
import type { ManifestProblem } from "../../agent/discovery/manifest-problem";
import { AgentError, type ErrorCode } from "../../agent/errors";
import {
  checkAccess,
  explainWorkload,
  findWorkload,
  parseDestinationQuery,
  parseSourceQuery,
  policyMessages,
  policyStatuses,
  type PortDecision,
} from "../../agent/rbac/explain";
import type { AuthorizationSettings } from "../../agent/rbac/authorize";
import { MeshState } from "../../agent/state/mesh-state";
import { formatPolicyStatuses, formatWorkloadExplanation } from "../../agent/cli/authz-output";

const SETTINGS: AuthorizationSettings = { trustDomain: "cluster.local", rootNamespace: "istio-system" };

function namespace(name: string, ambient: boolean): string {
  const labels = ambient ? "\n  labels: {istio.io/dataplane-mode: ambient}" : "";
  return `apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ${name}${labels}\n`;
}

function pod(namespaceName: string, name: string, serviceAccount: string, ip: string, labels = `{app: ${name}}`): string {
  return `apiVersion: v1
kind: Pod
metadata: {name: ${name}, namespace: ${namespaceName}, labels: ${labels}}
spec:
  nodeName: node-a
  serviceAccountName: ${serviceAccount}
  containers:
    - name: app
      image: example.invalid/app
      ports: [{name: http, containerPort: 8080}]
status: {podIP: "${ip}"}
`;
}

function policy(name: string, namespaceName: string, spec: string, annotations = ""): string {
  return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ${name}, namespace: ${namespaceName}${annotations}}
spec: ${spec}
`;
}

function peerAuthentication(name: string, namespaceName: string, spec: string): string {
  return `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ${name}, namespace: ${namespaceName}}
spec: ${spec}
`;
}

const BASE = [
  namespace("shop", true),
  namespace("backend", true),
  namespace("legacy", false),
  namespace("istio-system", false),
  pod("shop", "web", "web", "10.1.0.2"),
  pod("shop", "scraper", "scraper", "10.1.0.3"),
  pod("shop", "optout", "web", "10.1.0.4", "{app: optout, istio.io/dataplane-mode: none}"),
  pod("legacy", "old", "default", "10.1.0.9"),
  pod("backend", "api", "api", "10.2.0.2"),
  pod("backend", "api2", "api", "10.2.0.3", "{app: api}"),
  pod("backend", "db", "db", "10.2.0.4"),
  `apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec: {clusterIP: "10.96.0.10", selector: {app: api}, ports: [{port: 80, targetPort: http, protocol: TCP}]}
`,
  `apiVersion: v1
kind: Service
metadata: {name: empty, namespace: backend}
spec: {clusterIP: "10.96.0.11", selector: {app: nothing}, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}
`,
];

const ALLOW_WEB = policy(
  "allow-web",
  "backend",
  `{selector: {matchLabels: {app: api}}, action: ALLOW, rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}], to: [{operation: {ports: ["8080"]}}]}]}`,
);
const DENY_SCRAPER = policy("deny-scraper", "backend", `{action: DENY, rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/scraper"]}}]}]}`);
const MESH_DENY_9000 = policy("deny-9000", "istio-system", `{action: DENY, rules: [{to: [{operation: {ports: ["9000"]}}]}]}`);
const DRY_RUN_DENY = policy("dry-deny-web", "backend", `{action: DENY, rules: [{from: [{source: {namespaces: ["shop"]}}], when: [{key: destination.port, values: ["8443"]}]}]}`, ', annotations: {"istio.io/dry-run": "true"}');
const CUSTOM = policy("ext", "backend", `{action: CUSTOM, provider: {name: ext}, rules: [{}]}`);

function parse(documents: string[]): { state: MeshState; problems: ManifestProblem[] } {
  const result = parseManifests("/manifests/mesh.yaml", documents.join("---\n"));
  return { state: new MeshState(buildSnapshot(result.objects)), problems: result.problems };
}

function mesh(...extra: string[]): MeshState {
  const { state, problems } = parse([...BASE, ...extra]);
  if (problems.length > 0) throw new Error(JSON.stringify(problems));
  return state;
}

function only(results: PortDecision[]): PortDecision {
  if (results.length !== 1) throw new Error(`expected one result, got ${JSON.stringify(results)}`);
  return results[0];
}

function queryError(t: import("ava").ExecutionContext, run: () => unknown, code: ErrorCode, pattern: RegExp): void {
  const error = t.throws(run);
  t.true(error instanceof AgentError, String(error));
  t.is((error as AgentError).code, code);
  t.regex(error!.message, pattern);
}

// ---- parsing ---------------------------------------------------------------------------------

test("source forms parse", (t) => {
  t.deepEqual(parseSourceQuery("spiffe://cluster.local/ns/shop/sa/web"), { kind: "identity", identity: { trustDomain: "cluster.local", namespace: "shop", serviceAccount: "web" } });
  t.deepEqual(parseSourceQuery("example.org/ns/shop/sa/web"), { kind: "identity", identity: { trustDomain: "example.org", namespace: "shop", serviceAccount: "web" } });
  t.deepEqual(parseSourceQuery("shop/web"), { kind: "pod", uid: "shop/web" });
  t.deepEqual(parseSourceQuery("10.1.0.9"), { kind: "ip", ip: "10.1.0.9" });
  t.deepEqual(parseSourceQuery("::ffff:10.1.0.9"), { kind: "ip", ip: "10.1.0.9" });
  t.deepEqual(parseSourceQuery("FD00::1"), { kind: "ip", ip: "fd00::1" });
});

test("malformed sources name the forms", (t) => {
  queryError(t, () => parseSourceQuery(""), "INVALID_QUERY", /missing source; write spiffe:\/\//);
  queryError(t, () => parseSourceQuery("Shop/Web"), "INVALID_QUERY", /invalid source "Shop\/Web"; write/);
  queryError(t, () => parseSourceQuery("spiffe://cluster.local/ns/shop"), "INVALID_QUERY", /invalid source .*path is not \/ns/);
  queryError(t, () => parseSourceQuery("10.1.0.300"), "INVALID_QUERY", /invalid source "10.1.0.300"/);
});

test("destination forms parse", (t) => {
  t.deepEqual(parseDestinationQuery("backend/api"), { kind: "pod", uid: "backend/api" });
  t.deepEqual(parseDestinationQuery("backend/api:8080"), { kind: "pod", uid: "backend/api", port: 8080 });
  t.deepEqual(parseDestinationQuery("10.2.0.2:8080"), { kind: "ip", ip: "10.2.0.2", port: 8080 });
  t.deepEqual(parseDestinationQuery("10.2.0.2"), { kind: "ip", ip: "10.2.0.2" });
  t.deepEqual(parseDestinationQuery("[fd00::2]:8080"), { kind: "ip", ip: "fd00::2", port: 8080 });
  t.deepEqual(parseDestinationQuery("fd00::2"), { kind: "ip", ip: "fd00::2" });
});

test("malformed destinations name the value", (t) => {
  queryError(t, () => parseDestinationQuery("backend/api:0"), "INVALID_QUERY", /invalid port "0" in destination "backend\/api:0"; use a port from 1 to 65535/);
  queryError(t, () => parseDestinationQuery("backend/api:http"), "INVALID_QUERY", /invalid port "http"/);
  queryError(t, () => parseDestinationQuery("api"), "INVALID_QUERY", /invalid destination "api"; write a pod NAMESPACE\/NAME\[:PORT\]/);
  queryError(t, () => parseDestinationQuery(""), "INVALID_QUERY", /missing destination/);
});

test("unknown pod is UNKNOWN_WORKLOAD", (t) => {
  const state = mesh();
  queryError(t, () => findWorkload(state, "backend/nope"), "UNKNOWN_WORKLOAD", /pod backend\/nope is not in the agent's mesh state/);
  queryError(t, () => checkAccess(state, SETTINGS, "shop/nope", "backend/api:8080"), "UNKNOWN_WORKLOAD", /shop\/nope/);
  queryError(t, () => findWorkload(state, "api"), "INVALID_QUERY", /write NAMESPACE\/NAME/);
});

// ---- checkAccess -----------------------------------------------------------------------------

test("enrolled pod source uses its identity", (t) => {
  const check = checkAccess(mesh(ALLOW_WEB, DENY_SCRAPER), SETTINGS, "shop/web", "backend/api:8080");
  t.is(check.source.transport, "hbone");
  t.is(check.source.identity, "spiffe://cluster.local/ns/shop/sa/web");
  t.is(check.source.ip, "10.1.0.2");
  const result = only(check.results);
  t.is(result.decision, "allow");
  t.is(result.reason, "allowed_by_policy");
  t.is(result.policy, "backend/allow-web");
  t.is(result.policyKind, "AuthorizationPolicy");
  t.is(result.rule, 0);
  t.is(result.workload, "backend/api");
  t.is(result.port, 8080);
  t.true(result.enforced);
  t.deepEqual(result.mtls, { mode: "PERMISSIVE" });
  t.is(result.explanation, "allowed: rules[0] of ALLOW policy backend/allow-web matches");
});

test("identity source is denied by policy", (t) => {
  const check = checkAccess(mesh(ALLOW_WEB, DENY_SCRAPER), SETTINGS, "spiffe://cluster.local/ns/shop/sa/scraper", "backend/api:8080");
  const result = only(check.results);
  t.is(result.decision, "deny");
  t.is(result.reason, "denied_by_policy");
  t.is(result.policy, "backend/deny-scraper");
  t.is(result.rule, 0);
  t.is(result.explanation, "denied: rules[0] of DENY policy backend/deny-scraper matches");
  t.is(check.source.ip, undefined);
  t.true(check.notes.some((note) => /no IP: rules on source IPs/.test(note)));
});

test("identity without trust domain prefix", (t) => {
  const result = only(checkAccess(mesh(ALLOW_WEB), SETTINGS, "cluster.local/ns/shop/sa/web", "backend/api:8080").results);
  t.is(result.reason, "allowed_by_policy");
});

test("foreign trust domain fails before policy", (t) => {
  const result = only(checkAccess(mesh(), SETTINGS, "spiffe://other.org/ns/shop/sa/web", "backend/db:8080").results);
  t.is(result.decision, "deny");
  t.is(result.reason, "wrong_trust_domain");
  t.regex(result.explanation, /trust domain other.org is not accepted \(accepted: cluster.local\)/);
  const alias = only(checkAccess(mesh(), { ...SETTINGS, trustDomainAliases: ["other.org"] }, "spiffe://other.org/ns/shop/sa/web", "backend/db:8080").results);
  t.is(alias.reason, "no_policy");
});

test("pod not enrolled connects in plaintext", (t) => {
  const check = checkAccess(mesh(ALLOW_WEB), SETTINGS, "legacy/old", "backend/api:8080");
  t.is(check.source.transport, "plaintext");
  t.is(check.source.identity, undefined);
  t.is(check.source.ip, "10.1.0.9");
  t.true(check.notes.some((note) => /legacy\/old is not enrolled \(neither namespace legacy nor the pod is labelled istio.io\/dataplane-mode=ambient\)/.test(note)));
  const result = only(check.results);
  t.is(result.decision, "deny");
  t.is(result.reason, "no_allow_match");
  t.is(result.explanation, "denied: ALLOW policies apply to backend/api (backend/allow-web) and none matches");
});

test("opted-out pod connects in plaintext", (t) => {
  const check = checkAccess(mesh(), SETTINGS, "shop/optout", "backend/db:8080");
  t.is(check.source.transport, "plaintext");
  t.true(check.notes.some((note) => /labelled istio.io\/dataplane-mode=none/.test(note)));
  t.is(only(check.results).reason, "no_policy");
});

test("IP source is plaintext", (t) => {
  const check = checkAccess(mesh(), SETTINGS, "10.1.0.2", "backend/db:8080");
  t.is(check.source.transport, "plaintext");
  t.is(check.source.workload, "shop/web");
  t.true(check.notes.some((note) => /enrolled pod shop\/web, whose connections carry its identity; pass --from shop\/web/.test(note)));
  const outside = checkAccess(mesh(), SETTINGS, "192.0.2.7", "backend/db:8080");
  t.is(outside.source.workload, undefined);
  t.deepEqual(outside.notes, []);
});

test("IP source matches ipBlocks", (t) => {
  const allowBlock = policy("allow-block", "backend", `{selector: {matchLabels: {app: db}}, rules: [{from: [{source: {ipBlocks: ["192.0.2.0/24"]}}]}]}`);
  t.is(only(checkAccess(mesh(allowBlock), SETTINGS, "192.0.2.7", "backend/db:8080").results).reason, "allowed_by_policy");
  t.is(only(checkAccess(mesh(allowBlock), SETTINGS, "198.51.100.7", "backend/db:8080").results).reason, "no_allow_match");
});

test("STRICT denies plaintext and names the PeerAuthentication", (t) => {
  const strict = peerAuthentication("strict", "backend", "{mtls: {mode: STRICT}}");
  const plaintext = only(checkAccess(mesh(strict), SETTINGS, "legacy/old", "backend/db:8080").results);
  t.is(plaintext.decision, "deny");
  t.is(plaintext.reason, "mtls_required");
  t.is(plaintext.policy, "backend/strict");
  t.is(plaintext.policyKind, "PeerAuthentication");
  t.deepEqual(plaintext.mtls, { mode: "STRICT", policy: "backend/strict", scope: "namespace" });
  t.regex(plaintext.explanation, /^denied: PeerAuthentication backend\/strict sets STRICT mutual TLS for port 8080, and a plaintext connection has no peer identity$/);
  const tunnelled = only(checkAccess(mesh(strict), SETTINGS, "shop/web", "backend/db:8080").results);
  t.is(tunnelled.decision, "allow");
  t.is(tunnelled.mtls?.mode, "STRICT");
});

test("destination not enrolled is not protected", (t) => {
  const result = only(checkAccess(mesh(), SETTINGS, "shop/web", "legacy/old:8080").results);
  t.is(result.decision, "allow");
  t.is(result.reason, "not_enrolled");
  t.false(result.enforced);
  t.is(result.mtls, undefined);
  t.regex(result.explanation, /^not protected: pod legacy\/old is not enrolled \(neither namespace legacy nor the pod is labelled/);
});

test("address outside the mesh is not protected", (t) => {
  const result = only(checkAccess(mesh(), SETTINGS, "shop/web", "192.0.2.1:443").results);
  t.is(result.reason, "unknown_destination");
  t.false(result.enforced);
  t.is(result.port, 443);
});

test("pod IP destination finds its pod", (t) => {
  const result = only(checkAccess(mesh(DENY_SCRAPER), SETTINGS, "shop/scraper", "10.2.0.4:8080").results);
  t.is(result.workload, "backend/db");
  t.is(result.reason, "denied_by_policy");
});

test("Service VIP resolves to each endpoint's target port", (t) => {
  const check = checkAccess(mesh(ALLOW_WEB), SETTINGS, "shop/web", "10.96.0.10:80");
  t.deepEqual(
    check.results.map((result) => [result.workload, result.ip, result.port, result.service, result.servicePort, result.reason]),
    [
      ["backend/api", "10.2.0.2", 8080, "backend/api", 80, "allowed_by_policy"],
      ["backend/api2", "10.2.0.3", 8080, "backend/api", 80, "allowed_by_policy"],
    ],
  );
  const denied = checkAccess(mesh(ALLOW_WEB), SETTINGS, "shop/scraper", "10.96.0.10:80");
  t.deepEqual(denied.results.map((result) => result.reason), ["no_allow_match", "no_allow_match"]);
});

test("Service VIP problems come back as resets", (t) => {
  const empty = only(checkAccess(mesh(), SETTINGS, "shop/web", "10.96.0.11:80").results);
  t.is(empty.decision, "deny");
  t.is(empty.reason, "no_healthy_endpoint");
  t.regex(empty.explanation, /^reset: Service backend\/empty port 80 has no ready endpoint/);
  const wrongPort = only(checkAccess(mesh(), SETTINGS, "shop/web", "10.96.0.10:81").results);
  t.is(wrongPort.reason, "no_service_port");
  queryError(t, () => checkAccess(mesh(), SETTINGS, "shop/web", "10.96.0.10"), "INVALID_QUERY", /cluster IP of Service backend\/api, which needs a port: write 10.96.0.10:PORT with one of its TCP ports \(80\)/);
});

test("port omitted checks every policy port and others", (t) => {
  const portLevel = peerAuthentication("api-ports", "backend", "{selector: {matchLabels: {app: api}}, portLevelMtls: {\"9090\": {mode: STRICT}}}");
  const check = checkAccess(mesh(ALLOW_WEB, MESH_DENY_9000, DRY_RUN_DENY, portLevel), SETTINGS, "shop/web", "backend/api");
  t.deepEqual(
    check.results.map((result) => [result.port, result.decision, result.reason, result.policy ?? null]),
    [
      [8080, "allow", "allowed_by_policy", "backend/allow-web"],
      [8443, "deny", "no_allow_match", null],
      [9000, "deny", "denied_by_policy", "istio-system/deny-9000"],
      [9090, "deny", "no_allow_match", null],
      ["other", "deny", "no_allow_match", null],
    ],
  );
  t.deepEqual(check.results.find((result) => result.port === 9090)?.mtls, { mode: "STRICT", policy: "backend/api-ports", scope: "port" });
  t.true(check.notes.some((note) => /no port given/.test(note)));
});

test("other ports hide the stand-in port", (t) => {
  const strict = peerAuthentication("strict", "backend", "{mtls: {mode: STRICT}}");
  const check = checkAccess(mesh(strict, MESH_DENY_9000), SETTINGS, "legacy/old", "backend/db");
  t.deepEqual(check.results.map((result) => [result.port, result.reason]), [
    [9000, "mtls_required"],
    ["other", "mtls_required"],
  ]);
  t.is(check.results[0].explanation, "denied: PeerAuthentication backend/strict sets STRICT mutual TLS for port 9000, and a plaintext connection has no peer identity");
  t.is(check.results[1].explanation, "denied: PeerAuthentication backend/strict sets STRICT mutual TLS for other ports, and a plaintext connection has no peer identity");
});

test("bare IPv6 destination notes brackets", (t) => {
  const state = mesh(pod("backend", "v6", "v6", "fd00:234:2::10"));
  const check = checkAccess(state, SETTINGS, "shop/web", "fd00:234:2::10:8080");
  t.is(only(check.results).reason, "unknown_destination");
  t.true(
    check.notes.includes("fd00:234:2::10:8080 is read as the IPv6 address fd00:234:2::10:8080, which no pod or Service has; to give a port with an IPv6 address, write [ADDRESS]:PORT, for example [fd00:234:2::10]:8080"),
    JSON.stringify(check.notes),
  );
  const unknown = checkAccess(state, SETTINGS, "shop/web", "fd00:99::1");
  t.deepEqual(unknown.notes, ["fd00:99::1 is read as the IPv6 address fd00:99::1, which no pod or Service has; to give a port with an IPv6 address, write [ADDRESS]:PORT"]);
  const known = checkAccess(state, SETTINGS, "shop/web", "fd00:234:2::10");
  t.is(known.results[0].workload, "backend/v6");
  t.false(known.notes.some((note) => /\[ADDRESS\]:PORT/.test(note)));
  const bracketed = checkAccess(state, SETTINGS, "shop/web", "[fd00:99::1]:8080");
  t.deepEqual(bracketed.notes, []);
});

test("proxy port is refused", (t) => {
  const result = only(checkAccess(mesh(), SETTINGS, "shop/web", "backend/db:15008").results);
  t.is(result.decision, "deny");
  t.is(result.reason, "proxy_port");
});

test("dry-run effect is explained", (t) => {
  const result = only(checkAccess(mesh(DRY_RUN_DENY), SETTINGS, "shop/web", "backend/db:8443").results);
  t.is(result.decision, "allow");
  t.deepEqual(result.dryRun, [{ policy: "backend/dry-deny-web", rule: 0, decision: "deny" }]);
  t.regex(result.explanation, /; dry-run policy backend\/dry-deny-web rules\[0\] would deny it$/);
});

// ---- explainWorkload -------------------------------------------------------------------------

test("explain lists policies in evaluation order", (t) => {
  const state = mesh(ALLOW_WEB, DENY_SCRAPER, MESH_DENY_9000, DRY_RUN_DENY, CUSTOM);
  const explanation = explainWorkload(state, SETTINGS, findWorkload(state, "backend/api"));
  t.true(explanation.enrolled);
  t.is(explanation.identity, "spiffe://cluster.local/ns/backend/sa/api");
  t.deepEqual(
    explanation.policies.map((entry) => [entry.uid, entry.action, entry.scope, entry.status, entry.rules]),
    [
      ["backend/deny-scraper", "DENY", "namespace", "enforced", 1],
      ["istio-system/deny-9000", "DENY", "mesh", "enforced", 1],
      ["backend/allow-web", "ALLOW", "workload", "enforced", 1],
      ["backend/dry-deny-web", "DENY", "namespace", "dry-run", 1],
      ["backend/ext", "CUSTOM", "namespace", "rejected", 1],
    ],
  );
  t.deepEqual(explanation.policies[2].selector, { app: "api" });
  t.regex(explanation.policies[4].message ?? "", /spec.action CUSTOM is not supported by an L4 proxy/);
  t.is(explanation.policies[0].file, "/manifests/mesh.yaml");
});

test("explain counts dropped HTTP rules", (t) => {
  const http = policy("http-allow", "backend", `{action: ALLOW, rules: [{to: [{operation: {methods: ["GET"]}}]}, {from: [{source: {namespaces: ["shop"]}}]}]}`);
  const state = mesh(http);
  const [entry] = explainWorkload(state, SETTINGS, findWorkload(state, "backend/db")).policies;
  t.is(entry.rules, 2);
  t.is(entry.enforcedRules, 1);
  t.is(entry.warnings.length, 1);
  t.regex(entry.warnings[0], /spec.rules\[0\] uses HTTP attributes \(to\[0\].operation.methods\)/);
});

test("explain shows PeerAuthentication scopes and port modes", (t) => {
  const mesh_ = peerAuthentication("default", "istio-system", "{mtls: {mode: STRICT}}");
  const namespaceWide = peerAuthentication("ns", "backend", "{mtls: {mode: UNSET}}");
  const selected = peerAuthentication("api-ports", "backend", "{selector: {matchLabels: {app: api}}, portLevelMtls: {\"8080\": {mode: PERMISSIVE}, \"9090\": {mode: DISABLE}}}");
  const state = mesh(mesh_, namespaceWide, selected);
  const explanation = explainWorkload(state, SETTINGS, findWorkload(state, "backend/api"));
  t.is(explanation.peerAuthentication.mesh?.uid, "istio-system/default");
  t.is(explanation.peerAuthentication.namespace?.mode, "UNSET");
  t.is(explanation.peerAuthentication.workload?.uid, "backend/api-ports");
  t.deepEqual(explanation.peerAuthentication.ports, [
    { port: 8080, mode: "PERMISSIVE", policy: "backend/api-ports", scope: "port" },
    { port: 9090, mode: "PERMISSIVE", policy: "backend/api-ports", scope: "port" },
    { port: "other", mode: "STRICT", policy: "istio-system/default", scope: "mesh" },
  ]);
  t.regex(explanation.peerAuthentication.workload?.warnings[0] ?? "", /portLevelMtls.9090.mode DISABLE is treated as PERMISSIVE/);
});

test("explain of a pod not enrolled says why", (t) => {
  const state = mesh();
  const explanation = explainWorkload(state, SETTINGS, findWorkload(state, "legacy/old"));
  t.false(explanation.enrolled);
  t.is(explanation.identity, undefined);
  t.is(explanation.notEnrolledReason, "neither namespace legacy nor the pod is labelled istio.io/dataplane-mode=ambient");
});

test("explain table of a pod not enrolled", (t) => {
  const state = mesh(peerAuthentication("strict", "legacy", "{mtls: {mode: STRICT}}"));
  const text = formatWorkloadExplanation(explainWorkload(state, SETTINGS, findWorkload(state, "legacy/old")));
  t.regex(text, /^ENROLLED   no: neither namespace legacy nor the pod is labelled istio.io\/dataplane-mode=ambient; the agent enforces no policy on this pod$/m);
  t.notRegex(text, /unless PeerAuthentication requires mutual TLS/);
  t.regex(text, /^  none: every connection is allowed, because no agent checks policies on a pod that is not enrolled$/m);
  t.regex(text, /^  not enforced: connections to a pod that is not enrolled are plaintext and no agent checks mutual TLS/m);

  const enrolled = formatWorkloadExplanation(explainWorkload(state, SETTINGS, findWorkload(state, "backend/db")));
  t.regex(enrolled, /^  none: every connection is allowed unless PeerAuthentication requires mutual TLS$/m);
  t.notRegex(enrolled, /not enforced/);
});

test("explain table marks policies of a pod not enrolled", (t) => {
  const state = mesh(policy("deny-all", "legacy", "{action: DENY, rules: [{}]}"));
  const text = formatWorkloadExplanation(explainWorkload(state, SETTINGS, findWorkload(state, "legacy/old")));
  t.regex(text, /^  not enforced: no agent checks policies on a pod that is not enrolled; the ones listed apply once it is enrolled$/m);
  t.regex(text, /legacy\/deny-all\s+DENY/);
});

// ---- policyStatuses --------------------------------------------------------------------------

const INVALID_POLICY = policy("broken", "backend", `{action: DENY, rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]}`);

test("statuses list policies and a rejected one", (t) => {
  const { state, problems } = parse([...BASE, ALLOW_WEB, DRY_RUN_DENY, CUSTOM, INVALID_POLICY, peerAuthentication("loose", "backend", "{mtls: {mode: DISABLE}}")]);
  const report = policyStatuses(state, problems);
  t.deepEqual(
    report.authorizationPolicies.map((entry) => [entry.uid, entry.status]),
    [
      ["backend/allow-web", "enforced"],
      ["backend/dry-deny-web", "dry-run"],
      ["backend/ext", "rejected"],
    ],
  );
  t.deepEqual(report.peerAuthentications.map((entry) => [entry.uid, entry.mode, entry.status]), [["backend/loose", "DISABLE", "partial"]]);
  t.is(report.rejected.length, 1);
  const [rejected] = report.rejected;
  t.is(rejected.kind, "AuthorizationPolicy");
  t.is(rejected.object, "AuthorizationPolicy backend/broken");
  t.is(rejected.file, "/manifests/mesh.yaml");
  t.is(rejected.field, "spec.rules[0].from[0].source.ipBlocks[0]");
  t.regex(rejected.message, /10.0.0.0\/33/);
  t.is(typeof rejected.line, "number");
  t.false(rejected.lastValidServing);
});

test("rejected policy with a serving version", (t) => {
  const { state } = parse([...BASE, policy("broken", "backend", "{action: DENY}")]);
  const { problems } = parse([INVALID_POLICY]);
  const [rejected] = policyStatuses(state, problems).rejected;
  t.true(rejected.lastValidServing);
});

test("document of unknown kind is listed", (t) => {
  const problem: ManifestProblem = { file: "/manifests/bad.yaml", document: 0, line: 3, object: "document 1", field: "", message: "cannot be read: bad indentation" };
  const [rejected] = policyStatuses(mesh(), [problem, { ...problem, object: "Pod shop/x", field: "status.podIP" }]).rejected;
  t.is(rejected.kind, undefined);
  t.is(rejected.object, "document 1");
  t.is(policyStatuses(mesh(), [problem]).rejected.length, 1);
});

test("root namespace selector is ignored", (t) => {
  const selected = peerAuthentication("api-strict", "istio-system", "{selector: {matchLabels: {app: api}}, mtls: {mode: DISABLE}}");
  const meshWide = peerAuthentication("default", "istio-system", "{mtls: {mode: STRICT}}");
  const state = mesh(selected, meshWide);
  const report = policyStatuses(state, [], "istio-system");
  t.deepEqual(report.peerAuthentications.map((entry) => [entry.uid, entry.status]), [
    ["istio-system/api-strict", "ignored"],
    ["istio-system/default", "enforced"],
  ]);
  const [warning] = report.peerAuthentications[0].warnings;
  t.is(report.peerAuthentications[0].warnings.length, 1);
  t.is(
    warning,
    "PeerAuthentication istio-system/api-strict selects no pod: a selector is ignored in the root namespace istio-system; move the policy to the namespace of the pods it is for, or remove spec.selector to make it mesh-wide",
  );
  t.deepEqual(report.peerAuthentications[1].warnings, []);
  t.regex(formatPolicyStatuses(report), /istio-system\/api-strict\s+app=api\s+DISABLE\s+-\s+ignored\s+mesh.yaml/);

  // Another root namespace makes the same policy an ordinary namespace policy.
  t.deepEqual(policyStatuses(state, [], "mesh-root").peerAuthentications.map((entry) => entry.status), ["partial", "enforced"]);

  const messages = policyMessages(state, "istio-system").filter((message) => message.policy === "istio-system/api-strict");
  t.deepEqual(messages, [{ kind: "PeerAuthentication", policy: "istio-system/api-strict", file: "/manifests/mesh.yaml", message: warning }]);
  t.is(policyMessages(state).find((message) => message.policy === "istio-system/api-strict")?.message, warning);
});

test("policy messages name policy and file", (t) => {
  const http = policy("http-allow", "backend", `{action: ALLOW, rules: [{to: [{operation: {methods: ["GET"]}}]}]}`);
  const messages = policyMessages(mesh(http, CUSTOM, peerAuthentication("loose", "backend", "{mtls: {mode: DISABLE}}")));
  t.deepEqual(
    messages.map((message) => [message.kind, message.policy, message.file]),
    [
      ["AuthorizationPolicy", "backend/http-allow", "/manifests/mesh.yaml"],
      ["AuthorizationPolicy", "backend/ext", "/manifests/mesh.yaml"],
      ["PeerAuthentication", "backend/loose", "/manifests/mesh.yaml"],
    ],
  );
  t.regex(messages[0].message, /spec.rules\[0\]/);
});

const BROKEN_YAML = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: x, namespace: backend
spec:
  action: [DENY
`;

test("YAML errors of one document are one row", (t) => {
  const { problems } = parse([namespace("extra", false), BROKEN_YAML]);
  t.true(problems.length >= 2, "the fixture has several YAML errors in one document");
  const report = policyStatuses(mesh(), problems);
  t.is(report.rejected.length, 1);
  const [rejected] = report.rejected;
  t.is(rejected.object, "document 2");
  t.is(rejected.problems, problems.length);
  t.is(rejected.message, problems[0].message);
  t.is(rejected.line, problems[0].line);
  // The fixture state has objects of /manifests/mesh.yaml, which a syntax error keeps serving.
  t.true(rejected.lastValidServing);

  const table = formatPolicyStatuses(report).split("\n").filter((line) => line.includes("document 2"));
  t.is(table.length, 1);
  t.regex(table[0], new RegExp(`last valid version\\s+invalid YAML: .* \\(${problems.length - 1} more problems? in this document\\)$`));
});

test("YAML error in a new file serves nothing", (t) => {
  const { problems } = parseManifests("/manifests/new.yaml", BROKEN_YAML);
  const [rejected] = policyStatuses(mesh(), problems).rejected;
  t.false(rejected.lastValidServing);
  const table = formatPolicyStatuses(policyStatuses(mesh(), problems));
  t.regex(table, /document 1\s+\/manifests\/new.yaml:\d+\s+-\s+nothing\s+invalid YAML/);
});

test("document without kind serves nothing", (t) => {
  const { problems } = parse(["apiVersion: v1\nmetadata: {name: nokind}\n"]);
  t.is(problems.length, 1);
  const [rejected] = policyStatuses(mesh(), problems).rejected;
  t.is(rejected.object, "document 1");
  t.is(rejected.problems, 1);
  t.false(rejected.lastValidServing, "the rest of the file serves, but this document has no earlier version");
});

test("manifest source keeps problems of current files", async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aactl-unit-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "policies.yaml");
  fs.writeFileSync(file, INVALID_POLICY);
  fs.writeFileSync(path.join(dir, "pods.yaml"), BASE.join("---\n"));
  const source = new ManifestSource(dir, silentLogger(), { pollIntervalMs: 60_000 });
  await source.start();
  t.teardown(() => source.stop());
  t.deepEqual(source.problems().map((problem) => [problem.file, problem.object]), [[file, "AuthorizationPolicy backend/broken"]]);

  fs.writeFileSync(file, policy("broken", "backend", "{action: DENY}"));
  await source.refresh();
  t.deepEqual(source.problems(), []);

  // Broken again: the last valid version of the same object keeps serving.
  fs.writeFileSync(file, INVALID_POLICY + "# broken again\n");
  await source.refresh();
  t.is(source.problems().length, 1);
  const report = policyStatuses(new MeshState(source.snapshot()), source.problems());
  t.true(report.rejected[0].lastValidServing);
  t.deepEqual(report.authorizationPolicies.map((entry) => entry.uid), ["backend/broken"]);

  // A syntax error keeps the file's objects, and its document is one row marked as serving.
  fs.writeFileSync(file, policy("broken", "backend", "{action: DENY}") + "---\n" + BROKEN_YAML);
  await source.refresh();
  t.true(source.problems().length >= 2);
  const broken = policyStatuses(new MeshState(source.snapshot()), source.problems());
  t.deepEqual(broken.rejected.map((row) => [row.object, row.file, row.lastValidServing]), [["document 2", file, true]]);
  t.deepEqual(broken.authorizationPolicies.map((entry) => entry.uid), ["backend/broken"]);

  fs.rmSync(file);
  await source.refresh();
  t.deepEqual(source.problems(), []);
});

test("identity source fails notIpBlocks rules", (t) => {
  const denyOutside = policy("deny-outside", "backend", `{action: DENY, rules: [{from: [{source: {notIpBlocks: ["10.1.0.0/16"]}}]}]}`);
  const state = mesh(denyOutside);
  // The pod's own address is inside the block, so the real connection is allowed.
  t.is(checkAccess(state, SETTINGS, "shop/web", "backend/api:8080").results[0].reason, "no_policy");
  // Without an address, the rule is not decided as matching either.
  const byIdentity = checkAccess(state, SETTINGS, "spiffe://cluster.local/ns/shop/sa/web", "backend/api:8080");
  t.is(byIdentity.results[0].decision, "allow");
  t.is(byIdentity.results[0].reason, "no_policy");
  t.true(byIdentity.notes.some((note) => note.includes("notIpBlocks")));
});

test("excluded inbound port is not protected", (t) => {
  const excludedPod = `apiVersion: v1
kind: Pod
metadata:
  name: ex
  namespace: backend
  labels: {app: ex}
  annotations: {traffic.sidecar.istio.io/excludeInboundPorts: "9001"}
spec: {nodeName: node-a, serviceAccountName: ex}
status: {podIP: "10.2.0.9"}
`;
  const strict = peerAuthentication("strict", "backend", "{mtls: {mode: STRICT}}");
  const state = mesh(excludedPod, strict);
  const excluded = checkAccess(state, SETTINGS, "legacy/old", "backend/ex:9001").results[0];
  t.is(excluded.reason, "port_excluded");
  t.is(excluded.decision, "allow");
  t.false(excluded.enforced);
  t.is(checkAccess(state, SETTINGS, "legacy/old", "backend/ex:9000").results[0].reason, "mtls_required");
  const ports = checkAccess(state, SETTINGS, "legacy/old", "backend/ex").results.map((result) => result.port);
  t.deepEqual(ports, [9001, "other"]);
  t.deepEqual(explainWorkload(state, SETTINGS, findWorkload(state, "backend/ex")).excludedInboundPorts, [9001]);
});
