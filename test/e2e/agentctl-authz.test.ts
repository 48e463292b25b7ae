// End to end on the real kernel: `agentctl authz check`, `authz explain` and `policies` against a
// running agent, compared with the audit records of real connections, and with a manifest folder
// that contains one invalid policy next to valid ones.

import test, { type ExecutionContext } from "ava";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { AGENTCTL_BIN, testPrefixFamily } from "../harness/agent-process";
import { curl, startHttpServer } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { serviceYaml, writeManifest } from "../harness/manifests";
import type { NodeSpec } from "../harness/topology";
import type { AccessCheck, PolicyStatusReport, WorkloadExplanation } from "../../agent/rbac/explain";

const PREFIX_FAMILY = testPrefixFamily("aactl");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aactl-n1";
const SERVER_NODE = "aactl-n2";
/** Outside the harness's pod ranges (10.N.<node>.0/24) and node link. */
const API_VIP = "10.96.72.10";

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "web", namespace: "shop", serviceAccount: "web" },
      { name: "scraper", namespace: "shop", serviceAccount: "scraper" },
      { name: "legacy", namespace: "legacy", serviceAccount: "default" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "api", namespace: "backend", serviceAccount: "api", namedPorts: { http: 8080 } },
      { name: "db", namespace: "backend", serviceAccount: "db", namedPorts: { http: 8080 } },
    ],
  },
];

const POLICIES = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-allow-web, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
      to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-scraper, namespace: backend}
spec:
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/scraper"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-deny-post, namespace: backend}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
    - to: [{operation: {methods: ["POST"], ports: ["9999"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db-strict, namespace: backend}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
`;

const INVALID_POLICY = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken-block, namespace: backend}
spec:
  action: DENY
  rules:
    - from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]
`;

const DB_DENY_POST_WARNING = /AuthorizationPolicy backend\/db-deny-post: spec.rules\[0\] uses HTTP attributes \(to\[0\].operation.methods\)/;

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "shop", ambient: true },
      { name: "backend", ambient: true },
      { name: "legacy", ambient: false },
    ],
    extraManifests: {
      "policies.yaml": POLICIES,
      "invalid.yaml": INVALID_POLICY,
      "services.yaml": serviceYaml({ name: "api", namespace: "backend", vip: API_VIP, selector: { app: "api" }, ports: [{ port: 80, targetPort: "http" }] }),
    },
  });
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "index.html"), "hello\n");
  await startHttpServer(cluster.topology, "api", site, 8080);
  await startHttpServer(cluster.topology, "db", site, 8080);
  await cluster.startAgents(["web", "scraper", "api", "db"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

interface AgentctlResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the built agentctl inside the server node's namespace, where that node's agent serves its admin API. */
function agentctl(...args: string[]): AgentctlResult {
  const netns = theCluster().topology.node(SERVER_NODE).netns;
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", process.execPath, AGENTCTL_BIN, ...args], { encoding: "utf8", timeout: 20_000 });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Runs agentctl with `-o json`, checks that it exited 0, and parses its output. */
function agentctlJson<T>(t: ExecutionContext, ...args: string[]): T {
  const result = agentctl(...args, "-o", "json");
  t.is(result.status, 0, `agentctl ${args.join(" ")} failed: ${result.stderr}`);
  return JSON.parse(result.stdout) as T;
}

function podIp(name: string): string {
  return theCluster().topology.pod(name).ip;
}

/** Waits for the server node's inbound audit record of a connection from `client`. */
function inboundRecordFrom(client: string): Promise<Record<string, any>> {
  return theCluster().waitForAudit(SERVER_NODE, (record) => record.direction === "inbound" && String(record.src.addr).startsWith(`${podIp(client)}:`));
}

test.serial("check matches an allowed connection", async (t) => {
  const check = agentctlJson<AccessCheck>(t, "authz", "check", "--from", "shop/web", "--to", "backend/api:8080");
  t.is(check.source.identity, "spiffe://cluster.local/ns/shop/sa/web");
  t.is(check.results.length, 1);
  const [result] = check.results;

  const response = await curl(theCluster().topology, "web", `http://${podIp("api")}:8080/`);
  t.is(response.exitCode, 0, response.stderr);
  const record = await inboundRecordFrom("web");
  t.is(record.decision, "allow");
  t.deepEqual([result.decision, result.reason, result.policy, result.rule], [record.decision, record.reason, record.policy, record.rule]);
  t.is(result.policy, "backend/api-allow-web");

  const table = agentctl("authz", "check", "--from", "shop/web", "--to", "backend/api:8080");
  t.is(table.status, 0, table.stderr);
  t.is(
    table.stdout.split("\n")[0],
    "ALLOW spiffe://cluster.local/ns/shop/sa/web -> backend/api:8080 by AuthorizationPolicy backend/api-allow-web rules[0] (allowed_by_policy)",
  );
});

test.serial("check matches a denied connection", async (t) => {
  const table = agentctl("authz", "check", "--from", "shop/scraper", "--to", "backend/api:8080");
  t.is(table.status, 0, "a denial is an answer, not an error");
  t.is(
    table.stdout.split("\n")[0],
    "DENY  spiffe://cluster.local/ns/shop/sa/scraper -> backend/api:8080 by AuthorizationPolicy backend/deny-scraper rules[0] (denied_by_policy)",
  );
  const [result] = agentctlJson<AccessCheck>(t, "authz", "check", "--from", "shop/scraper", "--to", "backend/api:8080").results;

  const response = await curl(theCluster().topology, "scraper", `http://${podIp("api")}:8080/`);
  t.not(response.exitCode, 0);
  const record = await inboundRecordFrom("scraper");
  t.deepEqual([result.decision, result.reason, result.policy, result.rule], [record.decision, record.reason, record.policy, record.rule]);
});

test.serial("check matches plaintext to a STRICT pod", async (t) => {
  const check = agentctlJson<AccessCheck>(t, "authz", "check", "--from", "legacy/legacy", "--to", `${podIp("db")}:8080`);
  t.is(check.source.transport, "plaintext");
  const [result] = check.results;
  t.is(result.reason, "mtls_required");
  t.is(result.policy, "backend/db-strict");

  const response = await curl(theCluster().topology, "legacy", `http://${podIp("db")}:8080/`);
  t.not(response.exitCode, 0);
  const record = await inboundRecordFrom("legacy");
  t.is(record.transport, "plaintext");
  t.deepEqual([result.decision, result.reason, result.policy, result.policyKind], [record.decision, record.reason, record.policy, record.policy_kind]);
});

test.serial("check through a Service VIP", async (t) => {
  const check = agentctlJson<AccessCheck>(t, "authz", "check", "--from", "shop/web", "--to", `${API_VIP}:80`);
  t.deepEqual(
    check.results.map((result) => [result.workload, result.service, result.servicePort, result.port, result.decision]),
    [["backend/api", "backend/api", 80, 8080, "allow"]],
  );
  const table = agentctl("authz", "check", "--from", "shop/web", "--to", `${API_VIP}:80`);
  t.regex(table.stdout, /^ALLOW spiffe:\/\/cluster.local\/ns\/shop\/sa\/web -> backend\/api:8080 via Service backend\/api port 80 by AuthorizationPolicy backend\/api-allow-web rules\[0\]/);
});

test.serial("check without port lists policy ports", (t) => {
  const check = agentctlJson<AccessCheck>(t, "authz", "check", "--from", "shop/web", "--to", "backend/db");
  t.deepEqual(check.results.map((result) => [result.port, result.decision, result.reason]), [
    // The DENY rule is enforced on its port alone: an L4 proxy cannot see the method.
    [9999, "deny", "denied_by_policy"],
    ["other", "allow", "no_policy"],
  ]);
  const table = agentctl("authz", "check", "--from", "shop/web", "--to", "backend/db");
  t.regex(table.stdout, /-> backend\/db:<other ports> \(no_policy\)/);

  // The explanation names no stand-in port number for the other ports.
  const plaintext = agentctl("authz", "check", "--from", "legacy/legacy", "--to", "backend/db");
  t.is(plaintext.status, 0, plaintext.stderr);
  t.regex(plaintext.stdout, /-> backend\/db:<other ports> by PeerAuthentication backend\/db-strict \(mtls_required\)\n\s+denied: PeerAuthentication backend\/db-strict sets STRICT mutual TLS for other ports,/);
});

test.serial("explain lists policies in order", (t) => {
  const explanation = agentctlJson<WorkloadExplanation>(t, "authz", "explain", "backend/api");
  t.true(explanation.enrolled);
  t.deepEqual(
    explanation.policies.map((policy) => [policy.uid, policy.action, policy.scope, policy.status]),
    [
      ["backend/deny-scraper", "DENY", "namespace", "enforced"],
      ["backend/api-allow-web", "ALLOW", "workload", "enforced"],
    ],
  );
  const db = agentctlJson<WorkloadExplanation>(t, "authz", "explain", "backend/db");
  t.deepEqual(db.peerAuthentication.ports, [{ port: "other", mode: "STRICT", policy: "backend/db-strict", scope: "workload" }]);

  const table = agentctl("authz", "explain", "backend/db");
  t.is(table.status, 0, table.stderr);
  t.regex(table.stdout, /backend\/db-deny-post\s+DENY\s+workload app=db\s+enforced\s+1\s+policies.yaml/);
  t.regex(table.stdout, /workload\s+backend\/db-strict\s+STRICT/);
  t.regex(table.stdout, DB_DENY_POST_WARNING);
});

test.serial("policies report the invalid one", (t) => {
  const report = agentctlJson<PolicyStatusReport>(t, "policies");
  t.deepEqual(
    report.authorizationPolicies.map((policy) => [policy.uid, policy.status]),
    [
      ["backend/api-allow-web", "enforced"],
      ["backend/db-deny-post", "enforced"],
      ["backend/deny-scraper", "enforced"],
    ],
  );
  t.regex(report.authorizationPolicies[1].warnings.join("\n"), DB_DENY_POST_WARNING);
  t.is(report.rejected.length, 1);
  const [rejected] = report.rejected;
  t.is(rejected.object, "AuthorizationPolicy backend/broken-block");
  t.is(rejected.file, path.join(theCluster().manifestsDir, "invalid.yaml"));
  t.is(rejected.field, "spec.rules[0].from[0].source.ipBlocks[0]");
  t.regex(rejected.message, /10\.0\.0\.0\/33/);
  t.false(rejected.lastValidServing);

  const table = agentctl("policies");
  t.is(table.status, 0, table.stderr);
  t.regex(table.stdout, /AuthorizationPolicy backend\/broken-block\s+\S+invalid.yaml:\d+\s+spec.rules\[0\].from\[0\].source.ipBlocks\[0\]\s+nothing\s+.*10\.0\.0\.0\/33/);
  t.regex(table.stdout, /backend\/db-strict\s+app=db\s+STRICT/);
});

test.serial("policy warning is logged once", async (t) => {
  const c = theCluster();
  const agent = c.agent(SERVER_NODE);
  const warnings = () => agent.lines.filter((line) => line.level === 40 && DB_DENY_POST_WARNING.test(String(line.msg)));
  t.is(warnings().length, 1, "the warning was not logged once at start");
  t.is(warnings()[0].policy, "backend/db-deny-post");

  // A new snapshot with the same policy does not log the warning again.
  const mark = agent.lines.length;
  writeManifest(c.manifestsDir, "extra.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: aactl-extra}\n");
  await agent.waitForLog((line) => line.msg === "configuration updated", 10_000, "the new snapshot", mark);
  t.is(warnings().length, 1);
});

test.serial("exit status 2 on bad usage", (t) => {
  const cases: [string[], RegExp][] = [
    [["authz", "check", "--from", "shop/web"], /missing --to DESTINATION/],
    [["authz", "check", "--from", "Shop", "--to", "backend/api:8080"], /invalid source "Shop"/],
    [["authz", "check", "--from", "shop/web", "--to", "backend/api:99999"], /invalid port "99999"/],
    [["authz", "check", "--from", "shop/web", "--to", "backend/api", "-o", "xml"], /invalid -o "xml": use table, json, yaml/],
    [["authz", "explain"], /missing pod/],
    [["authz", "frobnicate"], /unknown authz command "frobnicate"/],
    [["policies", "--bogus"], /^agentctl policies: unknown option --bogus; the options are --admin, -o$/m],
    [["authz", "check", "--from", "shop/web", "--to", API_VIP], /needs a port/],
  ];
  for (const [args, message] of cases) {
    const result = agentctl(...args);
    t.is(result.status, 2, `agentctl ${args.join(" ")}: ${result.stderr}`);
    t.regex(result.stderr, message);
    t.regex(result.stderr, /\nrun agentctl --help for every command and option\n$/);
  }
});

test.serial("exit status 1 on errors", (t) => {
  const unknown = agentctl("authz", "explain", "backend/nope");
  t.is(unknown.status, 1);
  t.regex(unknown.stderr, /pod backend\/nope is not in the agent's mesh state/);
  t.notRegex(unknown.stderr, /usage:/);

  // Port 1 on the node namespace's loopback has no listener.
  const unreachable = agentctl("policies", "--admin", "127.0.0.1:1");
  t.is(unreachable.status, 1);
  t.regex(unreachable.stderr, /cannot reach the agent's admin API at 127.0.0.1:1/);
});

test.serial("config dump and readiness still served", (t) => {
  const config = agentctl("config");
  t.is(config.status, 0, config.stderr);
  t.is((JSON.parse(config.stdout) as { node: string }).node, SERVER_NODE);
  const netns = theCluster().topology.node(SERVER_NODE).netns;
  const ready = spawnSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", "curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/healthz/ready"], { encoding: "utf8" });
  const readiness = JSON.parse(ready.stdout) as { ready: boolean; checks: Record<string, boolean> };
  t.true(readiness.ready, ready.stdout);
  t.true(Object.values(readiness.checks).every(Boolean));
});
