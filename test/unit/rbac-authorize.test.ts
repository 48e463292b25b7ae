import test from "ava";
import { authorize, policyWarnings } from "../../agent/rbac/authorize";
import { policyStatus } from "../../agent/rbac/warnings";
import type { AuthorizationResult, RbacConnection } from "../../agent/rbac/types";
import type { AuthorizationPolicy, PolicyOperation, PolicyRule, PolicySource } from "../../agent/state/types";

function policy(name: string, action: AuthorizationPolicy["action"], rules?: PolicyRule[], extra: Partial<AuthorizationPolicy> = {}): AuthorizationPolicy {
  return {
    uid: `demo/${name}`,
    name,
    namespace: "demo",
    action,
    rules,
    dryRun: false,
    source: { file: "test", document: 0 },
    ...extra,
  };
}

const MTLS: RbacConnection = {
  sourceIdentity: { trustDomain: "cluster.local", namespace: "demo", serviceAccount: "client" },
  sourceIp: "10.244.1.11",
  destinationIp: "10.244.1.10",
  destinationPort: 8080,
};

const PLAINTEXT: RbacConnection = { ...MTLS, sourceIdentity: undefined };

const OTHER_NS: RbacConnection = {
  ...MTLS,
  sourceIdentity: { trustDomain: "cluster.local", namespace: "other", serviceAccount: "default" },
  sourceIp: "10.245.0.5",
};

interface Case {
  name: string;
  connection?: RbacConnection;
  policies: AuthorizationPolicy[];
  trustDomain?: string;
  trustDomainAliases?: string[];
  expected: Pick<AuthorizationResult, "decision" | "reason"> & { policy?: string };
}

const from = (source: PolicySource): PolicyRule => ({ from: [{ source }] });
const to = (operation: PolicyOperation): PolicyRule => ({ to: [{ operation }] });

const ALLOWED = (policy: string) => ({ decision: "allow" as const, reason: "allowed_by_policy" as const, policy: `demo/${policy}` });
const DENIED = (policy: string) => ({ decision: "deny" as const, reason: "denied_by_policy" as const, policy: `demo/${policy}` });
const NO_POLICY = { decision: "allow" as const, reason: "no_policy" as const };
const NO_MATCH = { decision: "deny" as const, reason: "no_allow_match" as const };

const cases: Case[] = [
  // Precedence.
  { name: "no policies allow", policies: [], expected: NO_POLICY },
  { name: "allow without rules denies all", policies: [policy("p", "ALLOW")], expected: NO_MATCH },
  { name: "allow with empty rules list denies all", policies: [policy("p", "ALLOW", [])], expected: NO_MATCH },
  { name: "allow with empty rule allows all", policies: [policy("p", "ALLOW", [{}])], expected: ALLOWED("p") },
  { name: "deny without rules matches nothing", policies: [policy("d", "DENY")], expected: NO_POLICY },
  { name: "deny with empty rule denies all", policies: [policy("d", "DENY", [{}])], expected: DENIED("d") },
  { name: "deny wins over allow", policies: [policy("a", "ALLOW", [{}]), policy("d", "DENY", [{}])], expected: DENIED("d") },
  {
    name: "any allow policy may match",
    policies: [policy("a", "ALLOW", [from({ namespaces: ["nope"] })]), policy("b", "ALLOW", [from({ namespaces: ["demo"] })])],
    expected: ALLOWED("b"),
  },
  { name: "audit ignored", policies: [policy("x", "AUDIT", [{}])], expected: NO_POLICY },
  { name: "custom ignored", policies: [policy("x", "CUSTOM", [{}])], expected: NO_POLICY },
  { name: "dry-run deny not enforced", policies: [policy("d", "DENY", [{}], { dryRun: true })], expected: NO_POLICY },
  { name: "dry-run allow not enforced", policies: [policy("a", "ALLOW", [from({ namespaces: ["nope"] })], { dryRun: true })], expected: NO_POLICY },

  // Principals.
  { name: "principal exact", policies: [policy("p", "ALLOW", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])], expected: ALLOWED("p") },
  { name: "principal mismatch", policies: [policy("p", "ALLOW", [from({ principals: ["cluster.local/ns/demo/sa/other"] })])], expected: NO_MATCH },
  { name: "principal prefix", policies: [policy("p", "ALLOW", [from({ principals: ["cluster.local/ns/demo/*"] })])], expected: ALLOWED("p") },
  { name: "principal suffix", policies: [policy("p", "ALLOW", [from({ principals: ["*/sa/client"] })])], expected: ALLOWED("p") },
  { name: "principal wildcard mtls", policies: [policy("p", "ALLOW", [from({ principals: ["*"] })])], expected: ALLOWED("p") },
  { name: "principal wildcard plaintext", connection: PLAINTEXT, policies: [policy("p", "ALLOW", [from({ principals: ["*"] })])], expected: NO_MATCH },
  { name: "notPrincipals wildcard denies plaintext", connection: PLAINTEXT, policies: [policy("strict", "DENY", [from({ notPrincipals: ["*"] })])], expected: DENIED("strict") },
  { name: "notPrincipals wildcard passes mtls", policies: [policy("strict", "DENY", [from({ notPrincipals: ["*"] })])], expected: NO_POLICY },
  { name: "spiffe prefix is not part of principal", policies: [policy("p", "ALLOW", [from({ principals: ["spiffe://cluster.local/ns/demo/sa/client"] })])], expected: NO_MATCH },
  {
    name: "cluster.local aliases trust domain",
    connection: { ...MTLS, sourceIdentity: { trustDomain: "example.org", namespace: "demo", serviceAccount: "client" } },
    trustDomain: "example.org",
    policies: [policy("p", "ALLOW", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: ALLOWED("p"),
  },
  {
    name: "no alias without trust domain option",
    connection: { ...MTLS, sourceIdentity: { trustDomain: "example.org", namespace: "demo", serviceAccount: "client" } },
    policies: [policy("p", "ALLOW", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: NO_MATCH,
  },
  {
    name: "principal of the mesh's trust domain matches a peer of an alias",
    connection: { ...MTLS, sourceIdentity: { trustDomain: "old.example", namespace: "demo", serviceAccount: "client" } },
    trustDomain: "example.org",
    trustDomainAliases: ["old.example"],
    policies: [policy("p", "ALLOW", [from({ principals: ["example.org/ns/demo/sa/client"] })])],
    expected: ALLOWED("p"),
  },
  {
    name: "principal of an alias matches a peer of the mesh's trust domain",
    connection: { ...MTLS, sourceIdentity: { trustDomain: "example.org", namespace: "demo", serviceAccount: "client" } },
    trustDomain: "example.org",
    trustDomainAliases: ["old.example"],
    policies: [policy("p", "ALLOW", [from({ principals: ["old.example/ns/demo/sa/client"] })])],
    expected: ALLOWED("p"),
  },
  {
    name: "notPrincipals of the mesh's trust domain also excludes the alias",
    connection: { ...MTLS, sourceIdentity: { trustDomain: "old.example", namespace: "demo", serviceAccount: "client" } },
    trustDomain: "example.org",
    trustDomainAliases: ["old.example"],
    policies: [policy("p", "DENY", [from({ notPrincipals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: { decision: "allow", reason: "no_policy" },
  },
  {
    name: "a trust domain that is not an alias stays apart",
    connection: { ...MTLS, sourceIdentity: { trustDomain: "stranger.example", namespace: "demo", serviceAccount: "client" } },
    trustDomain: "example.org",
    trustDomainAliases: ["old.example"],
    policies: [policy("p", "ALLOW", [from({ principals: ["example.org/ns/demo/sa/client"] })])],
    expected: NO_MATCH,
  },

  // Namespaces and service accounts.
  { name: "namespace match", policies: [policy("p", "ALLOW", [from({ namespaces: ["demo"] })])], expected: ALLOWED("p") },
  { name: "namespace plaintext never matches", connection: PLAINTEXT, policies: [policy("p", "ALLOW", [from({ namespaces: ["*"] })])], expected: NO_MATCH },
  { name: "notNamespaces excludes", connection: OTHER_NS, policies: [policy("p", "ALLOW", [from({ notNamespaces: ["other"] })])], expected: NO_MATCH },
  { name: "notNamespaces passes plaintext", connection: PLAINTEXT, policies: [policy("d", "DENY", [from({ notNamespaces: ["demo"] })])], expected: DENIED("d") },
  { name: "serviceAccount with namespace", policies: [policy("p", "ALLOW", [from({ serviceAccounts: ["demo/client"] })])], expected: ALLOWED("p") },
  { name: "serviceAccount defaults to policy namespace", policies: [policy("p", "ALLOW", [from({ serviceAccounts: ["client"] })])], expected: ALLOWED("p") },
  { name: "serviceAccount other namespace", connection: OTHER_NS, policies: [policy("p", "ALLOW", [from({ serviceAccounts: ["default"] })])], expected: NO_MATCH },
  { name: "serviceAccount plaintext", connection: PLAINTEXT, policies: [policy("p", "ALLOW", [from({ serviceAccounts: ["demo/client"] })])], expected: NO_MATCH },
  { name: "notServiceAccounts excludes", policies: [policy("d", "DENY", [from({ notServiceAccounts: ["demo/client"] })])], expected: NO_POLICY },

  // IP blocks.
  { name: "ipBlocks cidr", connection: PLAINTEXT, policies: [policy("p", "ALLOW", [from({ ipBlocks: ["10.244.0.0/16"] })])], expected: ALLOWED("p") },
  { name: "ipBlocks single ip", policies: [policy("p", "ALLOW", [from({ ipBlocks: ["10.244.1.11"] })])], expected: ALLOWED("p") },
  { name: "ipBlocks mismatch", connection: OTHER_NS, policies: [policy("p", "ALLOW", [from({ ipBlocks: ["10.244.0.0/16"] })])], expected: NO_MATCH },
  { name: "notIpBlocks denies outsiders", connection: OTHER_NS, policies: [policy("d", "DENY", [from({ notIpBlocks: ["10.244.0.0/16"] })])], expected: DENIED("d") },
  {
    name: "ipv4-mapped source matches ipv4 block",
    connection: { ...MTLS, sourceIp: "::ffff:10.244.1.11" },
    policies: [policy("p", "ALLOW", [from({ ipBlocks: ["10.244.1.0/24"] })])],
    expected: ALLOWED("p"),
  },
  {
    name: "ipv6 block",
    connection: { ...MTLS, sourceIp: "fd00::1:5" },
    policies: [policy("p", "ALLOW", [from({ ipBlocks: ["fd00::/64"] })])],
    expected: ALLOWED("p"),
  },

  // Fields and entries combine.
  { name: "fields are ANDed", policies: [policy("p", "ALLOW", [from({ namespaces: ["demo"], ipBlocks: ["192.168.0.0/16"] })])], expected: NO_MATCH },
  {
    name: "from entries are ORed",
    policies: [policy("p", "ALLOW", [{ from: [{ source: { namespaces: ["nope"] } }, { source: { ipBlocks: ["10.244.1.11"] } }] }])],
    expected: ALLOWED("p"),
  },
  { name: "from and to are ANDed", policies: [policy("p", "ALLOW", [{ ...from({ namespaces: ["demo"] }), ...to({ ports: ["9090"] }) }])], expected: NO_MATCH },
  { name: "rules are ORed", policies: [policy("p", "ALLOW", [to({ ports: ["9090"] }), to({ ports: ["8080"] })])], expected: ALLOWED("p") },

  // Ports.
  { name: "ports match target port", policies: [policy("p", "ALLOW", [to({ ports: ["8080"] })])], expected: ALLOWED("p") },
  { name: "notPorts", policies: [policy("d", "DENY", [to({ notPorts: ["8080"] })])], expected: NO_POLICY },
  { name: "notPorts other port denies", connection: { ...MTLS, destinationPort: 22 }, policies: [policy("d", "DENY", [to({ notPorts: ["8080"] })])], expected: DENIED("d") },

  // Conditions.
  { name: "when source.ip", policies: [policy("p", "ALLOW", [{ when: [{ key: "source.ip", values: ["10.244.1.0/24"] }] }])], expected: ALLOWED("p") },
  { name: "when destination.port notValues", policies: [policy("p", "ALLOW", [{ when: [{ key: "destination.port", notValues: ["8080"] }] }])], expected: NO_MATCH },
  { name: "when destination.ip", policies: [policy("p", "ALLOW", [{ when: [{ key: "destination.ip", values: ["10.244.1.10"] }] }])], expected: ALLOWED("p") },
  { name: "when source.namespace", policies: [policy("p", "ALLOW", [{ when: [{ key: "source.namespace", values: ["demo"] }] }])], expected: ALLOWED("p") },
  { name: "when source.principal", policies: [policy("p", "ALLOW", [{ when: [{ key: "source.principal", values: ["*/sa/client"] }] }])], expected: ALLOWED("p") },
  {
    name: "when conditions are ANDed",
    policies: [policy("p", "ALLOW", [{ when: [{ key: "source.namespace", values: ["demo"] }, { key: "destination.port", values: ["1"] }] }])],
    expected: NO_MATCH,
  },

  // HTTP-only fields.
  { name: "allow rule with methods is dropped", policies: [policy("p", "ALLOW", [to({ ports: ["8080"], methods: ["GET"] })])], expected: NO_MATCH },
  {
    name: "allow keeps other rules",
    policies: [policy("p", "ALLOW", [to({ methods: ["GET"] }), from({ namespaces: ["demo"] })])],
    expected: ALLOWED("p"),
  },
  { name: "allow rule with request principals dropped", policies: [policy("p", "ALLOW", [from({ requestPrincipals: ["*"] })])], expected: NO_MATCH },
  { name: "deny keeps l4 part of rule", policies: [policy("d", "DENY", [to({ ports: ["8080"], methods: ["POST"] })])], expected: DENIED("d") },
  { name: "deny with only http fields never matches", policies: [policy("d", "DENY", [to({ paths: ["/admin"] })])], expected: NO_POLICY },
  {
    name: "deny with http when key never matches",
    policies: [policy("d", "DENY", [{ ...from({ namespaces: ["demo"] }), when: [{ key: "request.headers[x]", values: ["1"] }] }])],
    expected: NO_POLICY,
  },
  { name: "deny remoteIpBlocks needs http", policies: [policy("d", "DENY", [from({ remoteIpBlocks: ["0.0.0.0/0"] })])], expected: NO_POLICY },
];

for (const testCase of cases) {
  test(`authorize: ${testCase.name}`, (t) => {
    const result = authorize(testCase.connection ?? MTLS, testCase.policies, { trustDomain: testCase.trustDomain, trustDomainAliases: testCase.trustDomainAliases });
    t.is(result.decision, testCase.expected.decision);
    t.is(result.reason, testCase.expected.reason);
    t.is(result.policy, testCase.expected.policy);
  });
}

test("dry-run deny reported on allow", (t) => {
  const result = authorize(MTLS, [policy("d", "DENY", [{}], { dryRun: true })]);
  t.deepEqual(result.dryRun, [{ policy: "demo/d", rule: 0, decision: "deny" }]);
});

test("dry-run allow reported on deny", (t) => {
  const result = authorize(MTLS, [policy("a", "ALLOW", [to({ ports: ["9"] })]), policy("b", "ALLOW", [{}], { dryRun: true })]);
  t.is(result.decision, "deny");
  t.deepEqual(result.dryRun, [{ policy: "demo/b", rule: 0, decision: "allow" }]);
});

test("dry-run allow that misses would deny", (t) => {
  const result = authorize(MTLS, [policy("a", "ALLOW", [to({ ports: ["9"] })], { dryRun: true })]);
  t.is(result.decision, "allow");
  t.deepEqual(result.dryRun, [{ policy: "demo/a", decision: "deny" }]);
});

test("dry-run without effect not reported", (t) => {
  const result = authorize(MTLS, [policy("a", "ALLOW", [{}]), policy("d", "DENY", [to({ ports: ["9"] })], { dryRun: true })]);
  t.deepEqual(result.dryRun, []);
});

test("warnings: clean policy has none", (t) => {
  t.deepEqual(policyWarnings(policy("p", "ALLOW", [from({ namespaces: ["demo"] })])), []);
});

test("warnings: allow with http fields", (t) => {
  const warnings = policyWarnings(policy("p", "ALLOW", [to({ ports: ["80"], methods: ["GET"] })]));
  t.is(warnings.length, 1);
  t.regex(warnings[0], /^AuthorizationPolicy demo\/p: spec\.rules\[0\] uses HTTP attributes \(to\[0\]\.operation\.methods\).*ALLOW rule matches no connection/);
});

test("warnings: deny keeps l4 part", (t) => {
  const warnings = policyWarnings(policy("d", "DENY", [to({ ports: ["80"], methods: ["GET"] })]));
  t.is(warnings.length, 1);
  t.regex(warnings[0], /enforced on its L4 fields only/);
});

test("warnings: deny without l4 part", (t) => {
  const warnings = policyWarnings(policy("d", "DENY", [{ when: [{ key: "request.auth.claims[iss]", values: ["x"] }] }]));
  t.is(warnings.length, 1);
  t.regex(warnings[0], /when\[0\] has no L4 field left, so this DENY rule never matches/);
});

test("audit and custom policies are rejected with a status", (t) => {
  for (const action of ["AUDIT", "CUSTOM"] as const) {
    const status = policyStatus(policy("a", action, [{}]));
    t.is(status.state, "rejected");
    t.regex(status.message ?? "", new RegExp(`AuthorizationPolicy demo/a: spec.action ${action} is not supported`));
    t.is(authorize(MTLS, [policy("a", action, [{}])]).reason, "no_policy");
  }
});

test("warnings: spiffe-prefixed principal", (t) => {
  const rule: PolicyRule = { from: [{ source: { principals: ["spiffe://cluster.local/ns/demo/sa/client"] } }] };
  const warnings = policyWarnings(policy("p", "ALLOW", [rule]));
  t.is(warnings.length, 1);
  t.regex(warnings[0], /spec\.rules\[0\]\.from\[0\]\.source\.principals\[0\] starts with "spiffe:\/\/"/);
  t.is(authorize(MTLS, [policy("p", "ALLOW", [rule])]).decision, "deny");
});
