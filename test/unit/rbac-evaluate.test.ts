// Table-driven tests of WorkloadAuthorizer.evaluate: one table per area, each row the policies,
// the connection and the expected decision, reason, policy and rule. The MeshState tests at the
// end check which policies apply to a workload across namespaces, selectors and state changes.

import test from "ava";
import { WorkloadAuthorizer, type AuthorizeOptions } from "../../agent/rbac/authorize";
import type { AuthorizationReason, DryRunEffect, PolicyKind, RbacConnection } from "../../agent/rbac/types";
import type { PeerAuthenticationScopes } from "../../agent/rbac/peer-authentication";
import { authorizerFor, type AuthorizationSettings } from "../../agent/rbac/authorize";
import { mtlsFor } from "../../agent/rbac/peer-authentication";
import { emptySnapshot, MeshState } from "../../agent/state/mesh-state";
import type {
  AuthorizationPolicy,
  ClusterSnapshot,
  Decision,
  Labels,
  MtlsMode,
  PeerAuthentication,
  PolicyCondition,
  PolicyOperation,
  PolicyRule,
  PolicySource,
  Workload,
} from "../../agent/state/types";

// ---------------------------------------------------------------------------------------------
// Builders

function policy(name: string, action: AuthorizationPolicy["action"], rules?: PolicyRule[], extra: Partial<AuthorizationPolicy> = {}): AuthorizationPolicy {
  const namespace = extra.namespace ?? "demo";
  return {
    uid: `${namespace}/${name}`,
    name,
    namespace,
    action,
    rules,
    dryRun: false,
    source: { file: "test", document: 0 },
    ...extra,
  };
}

const allow = (name: string, rules?: PolicyRule[], extra?: Partial<AuthorizationPolicy>) => policy(name, "ALLOW", rules, extra);
const deny = (name: string, rules?: PolicyRule[], extra?: Partial<AuthorizationPolicy>) => policy(name, "DENY", rules, extra);
const dryRun = { dryRun: true };

const from = (...sources: PolicySource[]): PolicyRule => ({ from: sources.map((source) => ({ source })) });
const to = (...operations: PolicyOperation[]): PolicyRule => ({ to: operations.map((operation) => ({ operation })) });
const when = (...conditions: PolicyCondition[]): PolicyRule => ({ when: conditions });

function peerAuthentication(
  name: string,
  namespace: string,
  mode: MtlsMode,
  extra: { selector?: Labels; portLevelMtls?: Record<number, MtlsMode> } = {},
): PeerAuthentication {
  return {
    uid: `${namespace}/${name}`,
    name,
    namespace,
    selector: extra.selector,
    mode,
    portLevelMtls: extra.portLevelMtls ?? {},
    source: { file: "test", document: 0 },
  };
}

// ---------------------------------------------------------------------------------------------
// Connections

/** An mTLS connection from demo/client (10.244.1.11) to 10.244.1.10:8080. */
const MTLS: RbacConnection = {
  sourceIdentity: { trustDomain: "cluster.local", namespace: "demo", serviceAccount: "client" },
  sourceIp: "10.244.1.11",
  destinationIp: "10.244.1.10",
  destinationPort: 8080,
};

/** The same addresses without a peer identity (plaintext to port 15006). */
const PLAINTEXT: RbacConnection = { ...MTLS, sourceIdentity: undefined };

/** An mTLS connection from other/default (10.245.0.5). */
const OTHER: RbacConnection = {
  ...MTLS,
  sourceIdentity: { trustDomain: "cluster.local", namespace: "other", serviceAccount: "default" },
  sourceIp: "10.245.0.5",
};

/** An mTLS connection from a peer of the trust domain example.org. */
const FOREIGN: RbacConnection = {
  ...MTLS,
  sourceIdentity: { trustDomain: "example.org", namespace: "demo", serviceAccount: "client" },
};

/** An mTLS connection over IPv6, with the source address in a non-canonical text form. */
const IPV6: RbacConnection = { ...MTLS, sourceIp: "fd00:0:0:1:0:0:0:5", destinationIp: "fd00::10" };

const onPort = (connection: RbacConnection, destinationPort: number): RbacConnection => ({ ...connection, destinationPort });

// ---------------------------------------------------------------------------------------------
// Expected outcomes

interface Expected {
  decision: Decision;
  reason: AuthorizationReason;
  policy?: string;
  policyKind?: PolicyKind;
  rule?: number;
  /** Checked only when given. */
  dryRun?: DryRunEffect[];
}

const ALLOWED = (uid: string, rule = 0): Expected => ({ decision: "allow", reason: "allowed_by_policy", policy: uid, policyKind: "AuthorizationPolicy", rule });
const DENIED = (uid: string, rule = 0): Expected => ({ decision: "deny", reason: "denied_by_policy", policy: uid, policyKind: "AuthorizationPolicy", rule });
const NO_POLICY: Expected = { decision: "allow", reason: "no_policy" };
const NO_MATCH: Expected = { decision: "deny", reason: "no_allow_match" };
const MTLS_REQUIRED = (uid: string): Expected => ({ decision: "deny", reason: "mtls_required", policy: uid, policyKind: "PeerAuthentication" });

interface Row {
  name: string;
  policies?: AuthorizationPolicy[];
  peerAuthentications?: PeerAuthenticationScopes;
  /** MTLS when absent. */
  connection?: RbacConnection;
  options?: AuthorizeOptions;
  expected: Expected;
}

/** Registers one test per row; each field of the result gets its own assertion. */
function table(area: string, rows: Row[]): void {
  for (const row of rows) {
    test(`${area}: ${row.name}`, (t) => {
      const authorizer = new WorkloadAuthorizer({ policies: row.policies ?? [], peerAuthentications: row.peerAuthentications }, row.options);
      const result = authorizer.evaluate(row.connection ?? MTLS);
      t.is(result.decision, row.expected.decision, "decision");
      t.is(result.reason, row.expected.reason, "reason");
      t.is(result.policy, row.expected.policy, "policy");
      t.is(result.policyKind, row.expected.policyKind, "policyKind");
      t.is(result.rule, row.expected.rule, "rule");
      if (row.expected.dryRun !== undefined) t.deepEqual(result.dryRun, row.expected.dryRun, "dryRun");
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Source fields

table("principals", [
  { name: "exact match", policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])], expected: ALLOWED("demo/p") },
  { name: "other principal", policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/sa/web"] })])], expected: NO_MATCH },
  { name: "spiffe prefix never matches", policies: [allow("p", [from({ principals: ["spiffe://cluster.local/ns/demo/sa/client"] })])], expected: NO_MATCH },
  { name: "notPrincipals excludes the peer", policies: [deny("d", [from({ notPrincipals: ["cluster.local/ns/demo/sa/client"] })])], expected: NO_POLICY },
  { name: "notPrincipals passes another peer", connection: OTHER, policies: [deny("d", [from({ notPrincipals: ["cluster.local/ns/demo/sa/client"] })])], expected: DENIED("demo/d") },
]);

table("namespaces", [
  { name: "match", policies: [allow("p", [from({ namespaces: ["demo"] })])], expected: ALLOWED("demo/p") },
  { name: "other namespace", connection: OTHER, policies: [allow("p", [from({ namespaces: ["demo"] })])], expected: NO_MATCH },
  { name: "notNamespaces excludes", policies: [deny("d", [from({ notNamespaces: ["demo"] })])], expected: NO_POLICY },
  { name: "notNamespaces passes other", connection: OTHER, policies: [deny("d", [from({ notNamespaces: ["demo"] })])], expected: DENIED("demo/d") },
]);

table("serviceAccounts", [
  { name: "name in the policy namespace", policies: [allow("p", [from({ serviceAccounts: ["client"] })])], expected: ALLOWED("demo/p") },
  {
    name: "name in another policy namespace",
    policies: [allow("p", [from({ serviceAccounts: ["client"] })], { namespace: "other" })],
    expected: NO_MATCH,
  },
  { name: "namespace/name", policies: [allow("p", [from({ serviceAccounts: ["demo/client"] })])], expected: ALLOWED("demo/p") },
  { name: "namespace/name of another peer", policies: [allow("p", [from({ serviceAccounts: ["other/client"] })])], expected: NO_MATCH },
  {
    name: "namespace/name across namespaces",
    connection: OTHER,
    policies: [allow("p", [from({ serviceAccounts: ["other/default"] })])],
    expected: ALLOWED("demo/p"),
  },
  { name: "notServiceAccounts excludes by name", policies: [deny("d", [from({ notServiceAccounts: ["client"] })])], expected: NO_POLICY },
  { name: "notServiceAccounts passes other", connection: OTHER, policies: [deny("d", [from({ notServiceAccounts: ["client"] })])], expected: DENIED("demo/d") },
  { name: "notServiceAccounts namespace/name", policies: [deny("d", [from({ notServiceAccounts: ["demo/client"] })])], expected: NO_POLICY },
]);

table("ipBlocks", [
  { name: "ipv4 cidr", policies: [allow("p", [from({ ipBlocks: ["10.244.0.0/16"] })])], expected: ALLOWED("demo/p") },
  { name: "ipv4 single address", policies: [allow("p", [from({ ipBlocks: ["10.244.1.11"] })])], expected: ALLOWED("demo/p") },
  { name: "other single address", policies: [allow("p", [from({ ipBlocks: ["10.244.1.12"] })])], expected: NO_MATCH },
  { name: "cidr without the source", connection: OTHER, policies: [allow("p", [from({ ipBlocks: ["10.244.0.0/16"] })])], expected: NO_MATCH },
  { name: "ipv6 cidr", connection: IPV6, policies: [allow("p", [from({ ipBlocks: ["fd00:0:0:1::/64"] })])], expected: ALLOWED("demo/p") },
  { name: "ipv6 single address", connection: IPV6, policies: [allow("p", [from({ ipBlocks: ["fd00:0:0:1::5"] })])], expected: ALLOWED("demo/p") },
  { name: "ipv6 cidr without the source", connection: IPV6, policies: [allow("p", [from({ ipBlocks: ["fd00:0:0:2::/64"] })])], expected: NO_MATCH },
  { name: "ipv4 cidr never matches ipv6", connection: IPV6, policies: [allow("p", [from({ ipBlocks: ["0.0.0.0/0"] })])], expected: NO_MATCH },
  { name: "ipv4-mapped source", connection: { ...MTLS, sourceIp: "::ffff:10.244.1.11" }, policies: [allow("p", [from({ ipBlocks: ["10.244.1.11"] })])], expected: ALLOWED("demo/p") },
  { name: "notIpBlocks excludes", policies: [deny("d", [from({ notIpBlocks: ["10.244.0.0/16"] })])], expected: NO_POLICY },
  { name: "notIpBlocks passes other", connection: OTHER, policies: [deny("d", [from({ notIpBlocks: ["10.244.0.0/16"] })])], expected: DENIED("demo/d") },
  { name: "notIpBlocks ipv6", connection: IPV6, policies: [deny("d", [from({ notIpBlocks: ["fd00::/16"] })])], expected: NO_POLICY },
]);

table("trustDomains", [
  { name: "match", policies: [allow("p", [from({ trustDomains: ["cluster.local"] })])], expected: ALLOWED("demo/p") },
  { name: "other trust domain", connection: FOREIGN, policies: [allow("p", [from({ trustDomains: ["cluster.local"] })])], expected: NO_MATCH },
  { name: "suffix pattern", policies: [allow("p", [from({ trustDomains: ["*.local"] })])], expected: ALLOWED("demo/p") },
  { name: "notTrustDomains excludes", policies: [deny("d", [from({ notTrustDomains: ["cluster.local"] })])], expected: NO_POLICY },
  { name: "notTrustDomains passes other", connection: FOREIGN, policies: [deny("d", [from({ notTrustDomains: ["cluster.local"] })])], expected: DENIED("demo/d") },
]);

// remoteIpBlocks and requestPrincipals need HTTP: Istio derives them from X-Forwarded-For and a JWT.
table("http source fields", [
  { name: "allow remoteIpBlocks dropped", policies: [allow("p", [from({ remoteIpBlocks: ["0.0.0.0/0"] })])], expected: NO_MATCH },
  { name: "allow notRemoteIpBlocks dropped", policies: [allow("p", [from({ notRemoteIpBlocks: ["192.0.2.0/24"] })])], expected: NO_MATCH },
  { name: "allow requestPrincipals dropped", policies: [allow("p", [from({ requestPrincipals: ["*"] })])], expected: NO_MATCH },
  { name: "allow notRequestPrincipals dropped", policies: [allow("p", [from({ notRequestPrincipals: ["x/y"] })])], expected: NO_MATCH },
  {
    name: "allow with l4 field still dropped",
    policies: [allow("p", [from({ namespaces: ["demo"], remoteIpBlocks: ["0.0.0.0/0"] })])],
    expected: NO_MATCH,
  },
  { name: "deny remoteIpBlocks alone never matches", policies: [deny("d", [from({ remoteIpBlocks: ["0.0.0.0/0"] })])], expected: NO_POLICY },
  { name: "deny requestPrincipals alone never matches", policies: [deny("d", [from({ requestPrincipals: ["*"] })])], expected: NO_POLICY },
  {
    name: "deny keeps namespaces next to remoteIpBlocks",
    policies: [deny("d", [from({ namespaces: ["demo"], remoteIpBlocks: ["192.0.2.0/24"] })])],
    expected: DENIED("demo/d"),
  },
  {
    name: "deny keeps namespaces next to requestPrincipals",
    connection: OTHER,
    policies: [deny("d", [from({ namespaces: ["demo"], requestPrincipals: ["*"] })])],
    expected: NO_POLICY,
  },
]);

// ---------------------------------------------------------------------------------------------
// Combining fields, entries, sections and rules

table("combining", [
  { name: "fields ANDed, one fails", policies: [allow("p", [from({ namespaces: ["demo"], ipBlocks: ["192.168.0.0/16"] })])], expected: NO_MATCH },
  { name: "fields ANDed, all match", policies: [allow("p", [from({ namespaces: ["demo"], ipBlocks: ["10.244.0.0/16"] })])], expected: ALLOWED("demo/p") },
  { name: "list values ORed", policies: [allow("p", [from({ namespaces: ["x", "y", "demo"] })])], expected: ALLOWED("demo/p") },
  { name: "not list values ORed", policies: [deny("d", [from({ notNamespaces: ["x", "demo"] })])], expected: NO_POLICY },
  {
    name: "field and its not form ANDed",
    policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/*"], notPrincipals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: NO_MATCH,
  },
  { name: "from entries ORed", policies: [allow("p", [from({ namespaces: ["x"] }, { ipBlocks: ["10.244.1.11"] })])], expected: ALLOWED("demo/p") },
  { name: "to entries ORed", policies: [allow("p", [to({ ports: ["1"] }, { ports: ["8080"] })])], expected: ALLOWED("demo/p") },
  { name: "from and to ANDed, to fails", policies: [allow("p", [{ ...from({ namespaces: ["demo"] }), ...to({ ports: ["9090"] }) }])], expected: NO_MATCH },
  { name: "from and to ANDed, both match", policies: [allow("p", [{ ...from({ namespaces: ["demo"] }), ...to({ ports: ["8080"] }) }])], expected: ALLOWED("demo/p") },
  {
    name: "from, to and when ANDed, when fails",
    policies: [allow("p", [{ ...from({ namespaces: ["demo"] }), ...to({ ports: ["8080"] }), ...when({ key: "source.ip", values: ["192.0.2.1"] }) }])],
    expected: NO_MATCH,
  },
  { name: "when conditions ANDed", policies: [allow("p", [when({ key: "source.namespace", values: ["demo"] }, { key: "destination.port", values: ["1"] })])], expected: NO_MATCH },
  { name: "rules ORed", policies: [allow("p", [to({ ports: ["9090"] }), from({ namespaces: ["demo"] })])], expected: ALLOWED("demo/p", 1) },
]);

// ---------------------------------------------------------------------------------------------
// Plaintext connections: no identity, so identity fields never match and their not* forms always do

table("plaintext", [
  { name: "principals wildcard", connection: PLAINTEXT, policies: [allow("p", [from({ principals: ["*"] })])], expected: NO_MATCH },
  { name: "namespaces wildcard", connection: PLAINTEXT, policies: [allow("p", [from({ namespaces: ["*"] })])], expected: NO_MATCH },
  { name: "serviceAccounts", connection: PLAINTEXT, policies: [allow("p", [from({ serviceAccounts: ["demo/client"] })])], expected: NO_MATCH },
  { name: "trustDomains wildcard", connection: PLAINTEXT, policies: [allow("p", [from({ trustDomains: ["*"] })])], expected: NO_MATCH },
  { name: "ipBlocks still match", connection: PLAINTEXT, policies: [allow("p", [from({ ipBlocks: ["10.244.1.0/24"] })])], expected: ALLOWED("demo/p") },
  { name: "ports still match", connection: PLAINTEXT, policies: [allow("p", [to({ ports: ["8080"] })])], expected: ALLOWED("demo/p") },
  { name: "notPrincipals wildcard", connection: PLAINTEXT, policies: [deny("d", [from({ notPrincipals: ["*"] })])], expected: DENIED("demo/d") },
  { name: "notPrincipals wildcard, mtls", policies: [deny("d", [from({ notPrincipals: ["*"] })])], expected: NO_POLICY },
  { name: "notNamespaces", connection: PLAINTEXT, policies: [deny("d", [from({ notNamespaces: ["demo"] })])], expected: DENIED("demo/d") },
  { name: "notServiceAccounts", connection: PLAINTEXT, policies: [deny("d", [from({ notServiceAccounts: ["demo/client"] })])], expected: DENIED("demo/d") },
  { name: "notTrustDomains", connection: PLAINTEXT, policies: [deny("d", [from({ notTrustDomains: ["cluster.local"] })])], expected: DENIED("demo/d") },
  { name: "when source.principal wildcard", connection: PLAINTEXT, policies: [allow("p", [when({ key: "source.principal", values: ["*"] })])], expected: NO_MATCH },
  { name: "when source.principal notValues", connection: PLAINTEXT, policies: [deny("d", [when({ key: "source.principal", notValues: ["*"] })])], expected: DENIED("demo/d") },
  { name: "when source.namespace", connection: PLAINTEXT, policies: [allow("p", [when({ key: "source.namespace", values: ["*"] })])], expected: NO_MATCH },
  { name: "when source.namespace notValues", connection: PLAINTEXT, policies: [deny("d", [when({ key: "source.namespace", notValues: ["demo"] })])], expected: DENIED("demo/d") },
]);

// ---------------------------------------------------------------------------------------------
// Ports: compared with the target (container) port

table("ports", [
  { name: "match", policies: [allow("p", [to({ ports: ["8080"] })])], expected: ALLOWED("demo/p") },
  { name: "other port", policies: [allow("p", [to({ ports: ["9090"] })])], expected: NO_MATCH },
  { name: "one of several", policies: [allow("p", [to({ ports: ["9090", "8080"] })])], expected: ALLOWED("demo/p") },
  { name: "notPorts excludes", policies: [allow("p", [to({ notPorts: ["8080"] })])], expected: NO_MATCH },
  { name: "notPorts passes other", policies: [allow("p", [to({ notPorts: ["9090"] })])], expected: ALLOWED("demo/p") },
  { name: "ports and notPorts ANDed", policies: [allow("p", [to({ ports: ["8080"], notPorts: ["8080"] })])], expected: NO_MATCH },
  { name: "deny on port", connection: onPort(MTLS, 22), policies: [deny("d", [to({ ports: ["22"] })])], expected: DENIED("demo/d") },
  { name: "deny on other port", policies: [deny("d", [to({ ports: ["22"] })])], expected: NO_POLICY },
]);

// ---------------------------------------------------------------------------------------------
// Conditions: the L4 keys with values and notValues, and an HTTP key

table("when", [
  { name: "source.ip values", policies: [allow("p", [when({ key: "source.ip", values: ["10.244.1.0/24"] })])], expected: ALLOWED("demo/p") },
  { name: "source.ip values miss", policies: [allow("p", [when({ key: "source.ip", values: ["10.245.0.0/16"] })])], expected: NO_MATCH },
  { name: "source.ip notValues", policies: [allow("p", [when({ key: "source.ip", notValues: ["10.244.1.11"] })])], expected: NO_MATCH },
  { name: "source.ip notValues passes", policies: [allow("p", [when({ key: "source.ip", notValues: ["10.245.0.0/16"] })])], expected: ALLOWED("demo/p") },
  {
    name: "source.ip values and notValues",
    policies: [allow("p", [when({ key: "source.ip", values: ["10.244.0.0/16"], notValues: ["10.244.1.11"] })])],
    expected: NO_MATCH,
  },
  { name: "source.ip ipv6", connection: IPV6, policies: [allow("p", [when({ key: "source.ip", values: ["fd00:0:0:1::/64"] })])], expected: ALLOWED("demo/p") },
  { name: "source.namespace values", policies: [allow("p", [when({ key: "source.namespace", values: ["demo"] })])], expected: ALLOWED("demo/p") },
  { name: "source.namespace values miss", policies: [allow("p", [when({ key: "source.namespace", values: ["other"] })])], expected: NO_MATCH },
  { name: "source.namespace notValues", policies: [allow("p", [when({ key: "source.namespace", notValues: ["demo"] })])], expected: NO_MATCH },
  { name: "source.namespace notValues passes", policies: [allow("p", [when({ key: "source.namespace", notValues: ["other"] })])], expected: ALLOWED("demo/p") },
  { name: "source.principal values", policies: [allow("p", [when({ key: "source.principal", values: ["cluster.local/ns/demo/sa/client"] })])], expected: ALLOWED("demo/p") },
  { name: "source.principal values miss", policies: [allow("p", [when({ key: "source.principal", values: ["cluster.local/ns/demo/sa/web"] })])], expected: NO_MATCH },
  { name: "source.principal notValues", policies: [allow("p", [when({ key: "source.principal", notValues: ["*/sa/client"] })])], expected: NO_MATCH },
  { name: "destination.ip values", policies: [allow("p", [when({ key: "destination.ip", values: ["10.244.1.10"] })])], expected: ALLOWED("demo/p") },
  { name: "destination.ip values miss", policies: [allow("p", [when({ key: "destination.ip", values: ["10.244.2.0/24"] })])], expected: NO_MATCH },
  { name: "destination.ip notValues", policies: [allow("p", [when({ key: "destination.ip", notValues: ["10.244.1.0/24"] })])], expected: NO_MATCH },
  { name: "destination.ip ipv6", connection: IPV6, policies: [allow("p", [when({ key: "destination.ip", values: ["fd00::10"] })])], expected: ALLOWED("demo/p") },
  { name: "destination.port values", policies: [allow("p", [when({ key: "destination.port", values: ["8080"] })])], expected: ALLOWED("demo/p") },
  { name: "destination.port values miss", policies: [allow("p", [when({ key: "destination.port", values: ["9090"] })])], expected: NO_MATCH },
  { name: "destination.port notValues", policies: [allow("p", [when({ key: "destination.port", notValues: ["8080"] })])], expected: NO_MATCH },
  { name: "destination.port notValues passes", policies: [allow("p", [when({ key: "destination.port", notValues: ["9090"] })])], expected: ALLOWED("demo/p") },
  { name: "http key drops allow rule", policies: [allow("p", [when({ key: "request.headers[x-id]", values: ["1"] })])], expected: NO_MATCH },
  {
    name: "http key next to l4 key drops allow rule",
    policies: [allow("p", [when({ key: "source.namespace", values: ["demo"] }, { key: "request.auth.claims[iss]", values: ["x"] })])],
    expected: NO_MATCH,
  },
  { name: "http key in deny never matches", policies: [deny("d", [when({ key: "request.headers[x-id]", values: ["1"] })])], expected: NO_POLICY },
  {
    name: "http key in deny stops the whole rule",
    policies: [deny("d", [{ ...from({ namespaces: ["demo"] }), ...when({ key: "request.headers[x-id]", notValues: ["1"] }) }])],
    expected: NO_POLICY,
  },
]);

// ---------------------------------------------------------------------------------------------
// String forms

table("string match", [
  { name: "exact", policies: [allow("p", [from({ namespaces: ["demo"] })])], expected: ALLOWED("demo/p") },
  { name: "exact is not prefix", policies: [allow("p", [from({ namespaces: ["dem"] })])], expected: NO_MATCH },
  { name: "prefix", policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/*"] })])], expected: ALLOWED("demo/p") },
  { name: "prefix miss", policies: [allow("p", [from({ principals: ["cluster.local/ns/other/*"] })])], expected: NO_MATCH },
  { name: "suffix", policies: [allow("p", [from({ principals: ["*/sa/client"] })])], expected: ALLOWED("demo/p") },
  { name: "suffix miss", policies: [allow("p", [from({ principals: ["*/sa/web"] })])], expected: NO_MATCH },
  { name: "namespace prefix", policies: [allow("p", [from({ namespaces: ["de*"] })])], expected: ALLOWED("demo/p") },
  { name: "namespace suffix", policies: [allow("p", [from({ namespaces: ["*mo"] })])], expected: ALLOWED("demo/p") },
  { name: "wildcard", policies: [allow("p", [from({ principals: ["*"] })])], expected: ALLOWED("demo/p") },
  { name: "wildcard needs a value", connection: PLAINTEXT, policies: [allow("p", [from({ principals: ["*"] })])], expected: NO_MATCH },
  { name: "not wildcard excludes any value", policies: [deny("d", [from({ notNamespaces: ["*"] })])], expected: NO_POLICY },
  { name: "not wildcard passes absent value", connection: PLAINTEXT, policies: [deny("d", [from({ notNamespaces: ["*"] })])], expected: DENIED("demo/d") },
  { name: "when value prefix", policies: [allow("p", [when({ key: "source.principal", values: ["cluster.local/*"] })])], expected: ALLOWED("demo/p") },
]);

// ---------------------------------------------------------------------------------------------
// Empty sections, empty specs and several rules

table("empty sections", [
  { name: "spec {} allow allows nothing", policies: [allow("p")], expected: NO_MATCH },
  { name: "spec {} deny denies nothing", policies: [deny("d")], expected: NO_POLICY },
  { name: "rules [] allow allows nothing", policies: [allow("p", [])], expected: NO_MATCH },
  { name: "rules [] deny denies nothing", policies: [deny("d", [])], expected: NO_POLICY },
  { name: "rules [{}] allow allows all", connection: PLAINTEXT, policies: [allow("p", [{}])], expected: ALLOWED("demo/p") },
  { name: "rules [{}] deny denies all", policies: [deny("d", [{}])], expected: DENIED("demo/d") },
  { name: "from [] matches all", policies: [allow("p", [{ from: [] }])], expected: ALLOWED("demo/p") },
  { name: "to [] matches all", policies: [allow("p", [{ to: [] }])], expected: ALLOWED("demo/p") },
  { name: "when [] matches all", policies: [allow("p", [{ when: [] }])], expected: ALLOWED("demo/p") },
  { name: "all three empty", connection: OTHER, policies: [deny("d", [{ from: [], to: [], when: [] }])], expected: DENIED("demo/d") },
]);

table("rule index", [
  { name: "first matching rule", policies: [allow("p", [to({ ports: ["9090"] }), from({ namespaces: ["demo"] }), {}])], expected: ALLOWED("demo/p", 1) },
  { name: "dropped http rule keeps numbering", policies: [allow("p", [to({ methods: ["GET"] }), from({ namespaces: ["demo"] })])], expected: ALLOWED("demo/p", 1) },
  {
    name: "dropped rules before a match",
    policies: [allow("p", [when({ key: "request.headers[x]", values: ["1"] }), to({ ports: ["9090"] }), to({ paths: ["/"] }), {}])],
    expected: ALLOWED("demo/p", 3),
  },
  { name: "deny with http-only rule first", policies: [deny("d", [to({ paths: ["/admin"] }), from({ namespaces: ["demo"] })])], expected: DENIED("demo/d", 1) },
  { name: "deny rule with l4 and http parts", policies: [deny("d", [to({ ports: ["9090"] }), to({ ports: ["8080"], methods: ["POST"] })])], expected: DENIED("demo/d", 1) },
  {
    name: "first matching policy in given order",
    policies: [allow("a", [to({ ports: ["1"] })]), allow("b", [to({ ports: ["2"] }), {}]), allow("c", [{}])],
    expected: ALLOWED("demo/b", 1),
  },
  { name: "first matching deny policy", policies: [deny("a", [to({ ports: ["1"] })]), deny("b", [{}]), deny("c", [{}])], expected: DENIED("demo/b") },
]);

// ---------------------------------------------------------------------------------------------
// Precedence, dry-run and unsupported actions

table("precedence", [
  { name: "no policy allows", expected: NO_POLICY },
  { name: "deny not matching, no allow", policies: [deny("d", [to({ ports: ["1"] })])], expected: NO_POLICY },
  { name: "deny over allow", policies: [allow("a", [{}]), deny("d", [{}])], expected: DENIED("demo/d") },
  { name: "allow when deny misses", policies: [allow("a", [{}]), deny("d", [to({ ports: ["1"] })])], expected: ALLOWED("demo/a") },
  { name: "allow present, none matches", policies: [allow("a", [to({ ports: ["1"] })]), allow("b", [from({ namespaces: ["x"] })])], expected: NO_MATCH },
  { name: "one of several allows matches", policies: [allow("a", [to({ ports: ["1"] })]), allow("b", [from({ namespaces: ["demo"] })])], expected: ALLOWED("demo/b") },
  { name: "allow of another peer denies", connection: OTHER, policies: [allow("a", [from({ namespaces: ["demo"] })])], expected: NO_MATCH },
]);

table("dry-run", [
  { name: "deny matches alone", policies: [deny("d", [{}], dryRun)], expected: { ...NO_POLICY, dryRun: [{ policy: "demo/d", rule: 0, decision: "deny" }] } },
  { name: "deny misses", policies: [deny("d", [to({ ports: ["1"] })], dryRun)], expected: { ...NO_POLICY, dryRun: [] } },
  {
    name: "deny matches an allowed connection",
    policies: [allow("a", [{}]), deny("d", [to({ ports: ["9090"] }), {}], dryRun)],
    expected: { ...ALLOWED("demo/a"), dryRun: [{ policy: "demo/d", rule: 1, decision: "deny" }] },
  },
  { name: "deny next to enforced deny", policies: [deny("e", [{}]), deny("d", [{}], dryRun)], expected: { ...DENIED("demo/e"), dryRun: [] } },
  { name: "deny next to missed allow", policies: [allow("a", [to({ ports: ["1"] })]), deny("d", [{}], dryRun)], expected: { ...NO_MATCH, dryRun: [] } },
  { name: "allow matches alone", policies: [allow("a", [{}], dryRun)], expected: { ...NO_POLICY, dryRun: [] } },
  { name: "allow misses alone", policies: [allow("a", [to({ ports: ["1"] })], dryRun)], expected: { ...NO_POLICY, dryRun: [{ policy: "demo/a", decision: "deny" }] } },
  {
    name: "two allows miss alone",
    policies: [allow("a", [to({ ports: ["1"] })], dryRun), allow("b", [], dryRun)],
    expected: { ...NO_POLICY, dryRun: [{ policy: "demo/a", decision: "deny" }, { policy: "demo/b", decision: "deny" }] },
  },
  { name: "one of two allows matches alone", policies: [allow("a", [to({ ports: ["1"] })], dryRun), allow("b", [{}], dryRun)], expected: { ...NO_POLICY, dryRun: [] } },
  {
    name: "allow matches a denied connection",
    policies: [allow("a", [to({ ports: ["1"] })]), allow("b", [to({ ports: ["1"] }), {}], dryRun)],
    expected: { ...NO_MATCH, dryRun: [{ policy: "demo/b", rule: 1, decision: "allow" }] },
  },
  { name: "allow misses next to matching allow", policies: [allow("a", [{}]), allow("b", [to({ ports: ["1"] })], dryRun)], expected: { ...ALLOWED("demo/a"), dryRun: [] } },
  { name: "allow next to enforced deny", policies: [deny("e", [{}]), allow("b", [{}], dryRun)], expected: { ...DENIED("demo/e"), dryRun: [] } },
  {
    name: "deny matches and allow misses",
    policies: [deny("d", [{}], dryRun), allow("a", [to({ ports: ["1"] })], dryRun)],
    expected: { ...NO_POLICY, dryRun: [{ policy: "demo/d", rule: 0, decision: "deny" }] },
  },
  {
    name: "strict mtls decides first",
    connection: PLAINTEXT,
    policies: [allow("a", [{}], dryRun)],
    peerAuthentications: { mesh: peerAuthentication("default", "istio-system", "STRICT") },
    expected: { ...MTLS_REQUIRED("istio-system/default"), dryRun: [] },
  },
]);

table("actions", [
  { name: "custom takes no part", policies: [policy("c", "CUSTOM", [{}])], expected: NO_POLICY },
  { name: "audit takes no part", policies: [policy("x", "AUDIT", [{}])], expected: NO_POLICY },
  { name: "custom is no allow policy", policies: [policy("c", "CUSTOM", [{}]), deny("d", [to({ ports: ["1"] })])], expected: NO_POLICY },
  { name: "custom next to a missed allow", policies: [policy("c", "CUSTOM", [{}]), allow("a", [to({ ports: ["1"] })])], expected: NO_MATCH },
  { name: "audit next to a matching allow", policies: [policy("x", "AUDIT", [{}]), allow("a", [{}])], expected: ALLOWED("demo/a") },
]);

// ---------------------------------------------------------------------------------------------
// HTTP-only operation fields

const HTTP_OPERATIONS: [string, PolicyOperation][] = [
  ["methods", { methods: ["GET"] }],
  ["notMethods", { notMethods: ["DELETE"] }],
  ["paths", { paths: ["/api/*"] }],
  ["notPaths", { notPaths: ["/admin"] }],
  ["hosts", { hosts: ["web.demo"] }],
  ["notHosts", { notHosts: ["evil.example"] }],
];

table("http operation fields", [
  ...HTTP_OPERATIONS.map(([field, operation]): Row => ({
    name: `allow rule with ${field} dropped`,
    policies: [allow("p", [to({ ports: ["8080"], ...operation })])],
    expected: NO_MATCH,
  })),
  ...HTTP_OPERATIONS.map(([field, operation]): Row => ({
    name: `deny rule keeps ports next to ${field}`,
    policies: [deny("d", [to({ ports: ["8080"], ...operation })])],
    expected: DENIED("demo/d"),
  })),
  ...HTTP_OPERATIONS.map(([field, operation]): Row => ({
    name: `deny rule with only ${field} never matches`,
    policies: [deny("d", [to(operation)])],
    expected: NO_POLICY,
  })),
  { name: "allow keeps other rules", policies: [allow("p", [to({ methods: ["GET"] }), to({ ports: ["8080"] })])], expected: ALLOWED("demo/p", 1) },
  { name: "deny keeps ports, other port", policies: [deny("d", [to({ ports: ["9090"], methods: ["GET"] })])], expected: NO_POLICY },
  {
    // The `to` entry has no L4 field left, so the `to` section cannot match and the rule never does.
    name: "deny with l4 from and http-only to",
    policies: [deny("d", [{ ...from({ namespaces: ["demo"] }), ...to({ methods: ["GET"] }) }])],
    expected: NO_POLICY,
  },
  {
    name: "deny with http-only entry next to l4 entry",
    policies: [deny("d", [to({ methods: ["GET"] }, { ports: ["8080"] })])],
    expected: DENIED("demo/d"),
  },
]);

// ---------------------------------------------------------------------------------------------
// Trust domains: "cluster.local" and aliases, rewritten as istiod does

const EXAMPLE_ORG: AuthorizeOptions = { trustDomain: "example.org" };
const WITH_ALIAS: AuthorizeOptions = { trustDomain: "example.org", trustDomainAliases: ["old.example"] };
const OLD_PEER: RbacConnection = { ...MTLS, sourceIdentity: { trustDomain: "old.example", namespace: "demo", serviceAccount: "client" } };

table("trust domain aliases", [
  { name: "cluster.local without trust domain", policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])], expected: ALLOWED("demo/p") },
  {
    name: "cluster.local means the mesh's domain",
    connection: FOREIGN,
    options: EXAMPLE_ORG,
    policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: ALLOWED("demo/p"),
  },
  {
    name: "cluster.local rewritten away",
    options: EXAMPLE_ORG,
    policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: NO_MATCH,
  },
  {
    name: "cluster.local without option",
    connection: FOREIGN,
    policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: NO_MATCH,
  },
  {
    name: "mesh domain matches alias peer",
    connection: OLD_PEER,
    options: WITH_ALIAS,
    policies: [allow("p", [from({ principals: ["example.org/ns/demo/sa/client"] })])],
    expected: ALLOWED("demo/p"),
  },
  {
    name: "alias matches mesh domain peer",
    connection: FOREIGN,
    options: WITH_ALIAS,
    policies: [allow("p", [from({ principals: ["old.example/ns/demo/sa/client"] })])],
    expected: ALLOWED("demo/p"),
  },
  {
    name: "cluster.local matches alias peer",
    connection: OLD_PEER,
    options: WITH_ALIAS,
    policies: [allow("p", [from({ principals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: ALLOWED("demo/p"),
  },
  {
    name: "notPrincipals covers aliases",
    connection: OLD_PEER,
    options: WITH_ALIAS,
    policies: [deny("d", [from({ notPrincipals: ["cluster.local/ns/demo/sa/client"] })])],
    expected: NO_POLICY,
  },
  {
    name: "unrelated domain stays",
    connection: FOREIGN,
    options: WITH_ALIAS,
    policies: [allow("p", [from({ principals: ["stranger.example/ns/demo/sa/client"] })])],
    expected: NO_MATCH,
  },
  {
    name: "wildcard domain kept",
    connection: OLD_PEER,
    options: WITH_ALIAS,
    policies: [allow("p", [from({ principals: ["*/ns/demo/sa/client"] })])],
    expected: ALLOWED("demo/p"),
  },
  {
    name: "when source.principal rewritten",
    connection: FOREIGN,
    options: EXAMPLE_ORG,
    policies: [allow("p", [when({ key: "source.principal", values: ["cluster.local/ns/demo/sa/client"] })])],
    expected: ALLOWED("demo/p"),
  },
  {
    name: "trustDomains cluster.local rewritten",
    connection: FOREIGN,
    options: EXAMPLE_ORG,
    policies: [allow("p", [from({ trustDomains: ["cluster.local"] })])],
    expected: ALLOWED("demo/p"),
  },
  {
    name: "trustDomains alias",
    connection: OLD_PEER,
    options: WITH_ALIAS,
    policies: [allow("p", [from({ trustDomains: ["example.org"] })])],
    expected: ALLOWED("demo/p"),
  },
]);

// ---------------------------------------------------------------------------------------------
// PeerAuthentication scopes and portLevelMtls

const MESH = (mode: MtlsMode) => peerAuthentication("default", "istio-system", mode);
const NAMESPACE = (mode: MtlsMode) => peerAuthentication("ns", "demo", mode);
const WORKLOAD = (mode: MtlsMode, portLevelMtls?: Record<number, MtlsMode>) =>
  peerAuthentication("web", "demo", mode, { selector: { app: "web" }, portLevelMtls });

table("peer authentication", [
  { name: "none", connection: PLAINTEXT, expected: NO_POLICY },
  { name: "mesh strict", connection: PLAINTEXT, peerAuthentications: { mesh: MESH("STRICT") }, expected: MTLS_REQUIRED("istio-system/default") },
  { name: "mesh strict, mtls peer", peerAuthentications: { mesh: MESH("STRICT") }, expected: NO_POLICY },
  { name: "mesh permissive", connection: PLAINTEXT, peerAuthentications: { mesh: MESH("PERMISSIVE") }, expected: NO_POLICY },
  { name: "mesh disable counts as permissive", connection: PLAINTEXT, peerAuthentications: { mesh: MESH("DISABLE") }, expected: NO_POLICY },
  { name: "mesh unset", connection: PLAINTEXT, peerAuthentications: { mesh: MESH("UNSET") }, expected: NO_POLICY },
  { name: "namespace strict", connection: PLAINTEXT, peerAuthentications: { namespace: NAMESPACE("STRICT") }, expected: MTLS_REQUIRED("demo/ns") },
  {
    name: "namespace permissive over mesh strict",
    connection: PLAINTEXT,
    peerAuthentications: { mesh: MESH("STRICT"), namespace: NAMESPACE("PERMISSIVE") },
    expected: NO_POLICY,
  },
  {
    name: "namespace unset inherits mesh strict",
    connection: PLAINTEXT,
    peerAuthentications: { mesh: MESH("STRICT"), namespace: NAMESPACE("UNSET") },
    expected: MTLS_REQUIRED("istio-system/default"),
  },
  {
    name: "namespace strict over mesh permissive",
    connection: PLAINTEXT,
    peerAuthentications: { mesh: MESH("PERMISSIVE"), namespace: NAMESPACE("STRICT") },
    expected: MTLS_REQUIRED("demo/ns"),
  },
  { name: "workload strict", connection: PLAINTEXT, peerAuthentications: { workload: WORKLOAD("STRICT") }, expected: MTLS_REQUIRED("demo/web") },
  {
    name: "workload permissive over namespace strict",
    connection: PLAINTEXT,
    peerAuthentications: { namespace: NAMESPACE("STRICT"), workload: WORKLOAD("PERMISSIVE") },
    expected: NO_POLICY,
  },
  {
    name: "workload disable over namespace strict",
    connection: PLAINTEXT,
    peerAuthentications: { namespace: NAMESPACE("STRICT"), workload: WORKLOAD("DISABLE") },
    expected: NO_POLICY,
  },
  {
    name: "workload unset inherits namespace strict",
    connection: PLAINTEXT,
    peerAuthentications: { namespace: NAMESPACE("STRICT"), workload: WORKLOAD("UNSET") },
    expected: MTLS_REQUIRED("demo/ns"),
  },
  {
    name: "workload strict over mesh permissive",
    connection: PLAINTEXT,
    peerAuthentications: { mesh: MESH("PERMISSIVE"), namespace: NAMESPACE("PERMISSIVE"), workload: WORKLOAD("STRICT") },
    expected: MTLS_REQUIRED("demo/web"),
  },
  {
    name: "port strict over workload permissive",
    connection: PLAINTEXT,
    peerAuthentications: { workload: WORKLOAD("PERMISSIVE", { 8080: "STRICT" }) },
    expected: MTLS_REQUIRED("demo/web"),
  },
  {
    name: "port strict, other port",
    connection: onPort(PLAINTEXT, 9090),
    peerAuthentications: { workload: WORKLOAD("PERMISSIVE", { 8080: "STRICT" }) },
    expected: NO_POLICY,
  },
  {
    name: "port permissive over workload strict",
    connection: PLAINTEXT,
    peerAuthentications: { workload: WORKLOAD("STRICT", { 8080: "PERMISSIVE" }) },
    expected: NO_POLICY,
  },
  {
    name: "port permissive, other port strict",
    connection: onPort(PLAINTEXT, 9090),
    peerAuthentications: { workload: WORKLOAD("STRICT", { 8080: "PERMISSIVE" }) },
    expected: MTLS_REQUIRED("demo/web"),
  },
  {
    name: "port disable over workload strict",
    connection: PLAINTEXT,
    peerAuthentications: { workload: WORKLOAD("STRICT", { 8080: "DISABLE" }) },
    expected: NO_POLICY,
  },
  {
    name: "port unset inherits workload strict",
    connection: PLAINTEXT,
    peerAuthentications: { workload: WORKLOAD("STRICT", { 8080: "UNSET" }) },
    expected: MTLS_REQUIRED("demo/web"),
  },
  {
    name: "port permissive over mesh strict",
    connection: PLAINTEXT,
    peerAuthentications: { mesh: MESH("STRICT"), workload: WORKLOAD("UNSET", { 8080: "PERMISSIVE" }) },
    expected: NO_POLICY,
  },
  {
    name: "strict before a matching allow",
    connection: PLAINTEXT,
    policies: [allow("a", [from({ ipBlocks: ["10.244.0.0/16"] })])],
    peerAuthentications: { namespace: NAMESPACE("STRICT") },
    expected: MTLS_REQUIRED("demo/ns"),
  },
  {
    name: "strict, mtls peer then policies",
    policies: [deny("d", [from({ namespaces: ["demo"] })])],
    peerAuthentications: { namespace: NAMESPACE("STRICT") },
    expected: DENIED("demo/d"),
  },
  {
    name: "permissive then policies",
    connection: PLAINTEXT,
    policies: [deny("d", [from({ notPrincipals: ["*"] })])],
    peerAuthentications: { namespace: NAMESPACE("PERMISSIVE") },
    expected: DENIED("demo/d"),
  },
]);

test("peer authentication: mtls names scope", (t) => {
  const authorizer = new WorkloadAuthorizer({ policies: [], peerAuthentications: { mesh: MESH("STRICT"), workload: WORKLOAD("UNSET", { 8080: "PERMISSIVE" }) } });
  t.deepEqual(authorizer.mtls(8080), { mode: "PERMISSIVE", policy: "demo/web", scope: "port" });
  t.deepEqual(authorizer.mtls(9090), { mode: "STRICT", policy: "istio-system/default", scope: "mesh" });
  t.deepEqual(new WorkloadAuthorizer({ policies: [] }).mtls(8080), { mode: "PERMISSIVE" });
});

// ---------------------------------------------------------------------------------------------
// Through MeshState: which policies apply to a workload

function workload(namespace: string, name: string, labels: Labels, ip: string): Workload {
  return {
    uid: `${namespace}/${name}`,
    name,
    namespace,
    serviceAccount: name,
    nodeName: "node-a",
    ip,
    labels,
    namedPorts: {},
    hostNetwork: false,
    ready: true,
    source: { file: "test", document: 0 },
  };
}

const WEB = workload("demo", "web", { app: "web" }, "10.244.1.10");
const DB = workload("demo", "db", { app: "db" }, "10.244.1.12");
const API = workload("other", "api", { app: "web" }, "10.244.2.10");

function snapshotOf(workloads: Workload[], policies: AuthorizationPolicy[], peerAuthentications: PeerAuthentication[] = []): ClusterSnapshot {
  return {
    ...emptySnapshot(),
    workloads: new Map(workloads.map((item) => [item.uid, item])),
    authorizationPolicies: new Map(policies.map((item) => [item.uid, item])),
    peerAuthentications: new Map(peerAuthentications.map((item) => [item.uid, item])),
  };
}

/** Decides `connection` to the workload `uid` of `state`, as the inbound proxy does. */
function decide(state: MeshState, uid: string, connection: RbacConnection = MTLS, settings: AuthorizationSettings = {}) {
  const target = state.workload(uid);
  if (target === undefined) throw new Error(`workload ${uid} missing from the test state`);
  return authorizerFor(state, target, settings).evaluate(connection);
}

test("mesh state: root namespace policy applies everywhere", (t) => {
  const state = new MeshState(snapshotOf([WEB, API], [deny("deny-all", [{}], { namespace: "istio-system" })]));
  t.is(decide(state, "demo/web").policy, "istio-system/deny-all");
  t.is(decide(state, "other/api").policy, "istio-system/deny-all");
  t.is(decide(state, "other/api").reason, "denied_by_policy");
});

test("mesh state: root namespace selector spans namespaces", (t) => {
  const rootDeny = deny("deny-web", [{}], { namespace: "istio-system", selector: { app: "web" } });
  const state = new MeshState(snapshotOf([WEB, DB, API], [rootDeny]));
  t.is(decide(state, "demo/web").reason, "denied_by_policy");
  t.is(decide(state, "other/api").reason, "denied_by_policy");
  t.is(decide(state, "demo/db").reason, "no_policy");
});

test("mesh state: selector stays in its namespace", (t) => {
  const state = new MeshState(snapshotOf([WEB, API], [deny("deny-web", [{}], { namespace: "other", selector: { app: "web" } })]));
  t.is(decide(state, "other/api").policy, "other/deny-web");
  t.is(decide(state, "demo/web").reason, "no_policy");
});

test("mesh state: custom root namespace", (t) => {
  const policies = [deny("mesh-deny", [{}], { namespace: "mesh-root" }), deny("deny-all", [{}], { namespace: "istio-system" })];
  const state = new MeshState(snapshotOf([WEB], policies));
  const custom = decide(state, "demo/web", MTLS, { rootNamespace: "mesh-root" });
  t.is(custom.policy, "mesh-root/mesh-deny");
  t.deepEqual(state.policiesForWorkload(WEB, "mesh-root").map((item) => item.uid), ["mesh-root/mesh-deny"]);
  t.is(decide(state, "demo/web").policy, "istio-system/deny-all");
});

test("mesh state: policies ordered by uid", (t) => {
  const policies = [allow("b", [{}]), allow("a", [{}]), allow("z", [{}], { namespace: "istio-system" })];
  const state = new MeshState(snapshotOf([WEB], policies));
  t.deepEqual(state.policiesForWorkload(WEB).map((item) => item.uid), ["demo/a", "demo/b", "istio-system/z"]);
  t.is(decide(state, "demo/web").policy, "demo/a");
});

test("mesh state: selector added between states", (t) => {
  const namespaceWide = allow("allow-other", [from({ namespaces: ["other"] })]);
  const before = new MeshState(snapshotOf([WEB, DB], [namespaceWide]));
  t.is(decide(before, "demo/db").reason, "no_allow_match");
  t.is(decide(before, "demo/web").reason, "no_allow_match");

  const selected = { ...namespaceWide, selector: { app: "web" } };
  const after = new MeshState(snapshotOf([WEB, DB], [selected]), before);
  t.is(decide(after, "demo/db").reason, "no_policy");
  t.is(decide(after, "demo/web").reason, "no_allow_match");
  t.is(decide(after, "demo/web", OTHER).policy, "demo/allow-other");
});

test("mesh state: selector removed between states", (t) => {
  const selected = deny("deny-demo", [from({ namespaces: ["demo"] })], { selector: { app: "web" } });
  const before = new MeshState(snapshotOf([WEB, DB], [selected]));
  t.is(decide(before, "demo/db").reason, "no_policy");

  const namespaceWide: AuthorizationPolicy = { ...selected, selector: undefined };
  const after = new MeshState(snapshotOf([WEB, DB], [namespaceWide]), before);
  t.is(decide(after, "demo/db").policy, "demo/deny-demo");
  t.is(decide(after, "demo/web").policy, "demo/deny-demo");
});

test("mesh state: label change brings workload under selector", (t) => {
  const selected = deny("deny-web", [{}], { selector: { app: "web" } });
  const unlabelled = { ...WEB, labels: { app: "web-old" } };
  const before = new MeshState(snapshotOf([unlabelled], [selected]));
  t.is(decide(before, "demo/web").reason, "no_policy");

  const after = new MeshState(snapshotOf([WEB], [selected]), before);
  t.is(decide(after, "demo/web").policy, "demo/deny-web");
});

test("mesh state: authorizer cached per settings", (t) => {
  const state = new MeshState(snapshotOf([WEB], [allow("a", [{}])]));
  t.is(authorizerFor(state, WEB), authorizerFor(state, WEB));
  t.not(authorizerFor(state, WEB), authorizerFor(state, WEB, { trustDomain: "example.org" }));
});

test("mesh state: peer authentication scopes", (t) => {
  const peers = [
    peerAuthentication("default", "istio-system", "STRICT"),
    peerAuthentication("lax", "other", "PERMISSIVE"),
    peerAuthentication("db-lax", "demo", "PERMISSIVE", { selector: { app: "db" } }),
  ];
  const state = new MeshState(snapshotOf([WEB, DB, API], [], peers));
  t.deepEqual(decide(state, "demo/web", PLAINTEXT), { ...MTLS_REQUIRED("istio-system/default"), dryRun: [] });
  t.is(decide(state, "other/api", PLAINTEXT).reason, "no_policy");
  t.is(decide(state, "demo/db", PLAINTEXT).reason, "no_policy");
  t.deepEqual(mtlsFor(state, DB, 8080), { mode: "PERMISSIVE", policy: "demo/db-lax", scope: "workload" });
});

test("mesh state: root selector peer authentication selects nothing", (t) => {
  const rootSelected = peerAuthentication("strict-web", "istio-system", "STRICT", { selector: { app: "web" } });
  const state = new MeshState(snapshotOf([WEB, API], [], [rootSelected]));
  t.is(decide(state, "demo/web", PLAINTEXT).reason, "no_policy");
  t.is(decide(state, "other/api", PLAINTEXT).reason, "no_policy");
  t.deepEqual(mtlsFor(state, WEB, 8080), { mode: "PERMISSIVE" });
});

test("mesh state: custom root namespace peer authentication", (t) => {
  const state = new MeshState(snapshotOf([WEB], [], [peerAuthentication("default", "mesh-root", "STRICT")]));
  t.is(decide(state, "demo/web", PLAINTEXT, { rootNamespace: "mesh-root" }).policy, "mesh-root/default");
  t.is(decide(state, "demo/web", PLAINTEXT).reason, "no_policy");
});
