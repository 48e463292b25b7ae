import test from "ava";
import net from "node:net";
import { WorkloadAuthorizer } from "../../agent/rbac/authorize";
import { compilePolicy, matchingRule, parseAddress, type CompiledPolicy, type MatchContext, type TrustDomains } from "../../agent/rbac/compile";
import type { AuthorizationPolicy, Identity, PolicyRule, PolicySource } from "../../agent/state/types";

/** A small deterministic generator (mulberry32), so a failure reproduces with its seed. */
function random(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let value = state;
    value = Math.imul(value ^ (value >>> 15), value | 1);
    value ^= value + Math.imul(value ^ (value >>> 7), value | 61);
    return ((value ^ (value >>> 14)) >>> 0) / 4294967296;
  };
}

const NAMESPACES = ["a", "b", "ab", "c"];
const ACCOUNTS = ["x", "y"];
const PORTS = ["80", "81", "8080"];

function pick<T>(next: () => number, values: readonly T[]): T {
  return values[Math.floor(next() * values.length)];
}

function some<T>(next: () => number, values: readonly T[]): T[] {
  const count = 1 + Math.floor(next() * 2);
  return Array.from({ length: count }, () => pick(next, values));
}

function principalPattern(next: () => number): string {
  const namespace = pick(next, NAMESPACES);
  return pick(next, [
    `cluster.local/ns/${namespace}/sa/${pick(next, ACCOUNTS)}`,
    `cluster.local/ns/${namespace}/*`,
    `cluster.local/ns/${namespace}*`,
    `*/sa/${pick(next, ACCOUNTS)}`,
    "*",
  ]);
}

function randomSource(next: () => number): PolicySource {
  const source: PolicySource = {};
  const fields = 1 + Math.floor(next() * 2);
  for (let index = 0; index < fields; index += 1) {
    switch (Math.floor(next() * 7)) {
      case 0:
        source.principals = Array.from({ length: 1 + Math.floor(next() * 2) }, () => principalPattern(next));
        break;
      case 1:
        source.notPrincipals = [principalPattern(next)];
        break;
      case 2:
        source.namespaces = some(next, [...NAMESPACES, "a*", "*b"]);
        break;
      case 3:
        source.notNamespaces = some(next, NAMESPACES);
        break;
      case 4:
        source.serviceAccounts = some(next, ["x", "b/y", "a/x"]);
        break;
      case 5:
        source.ipBlocks = some(next, ["10.0.0.0/8", "10.1.2.3"]);
        break;
      default:
        source.notIpBlocks = ["10.1.0.0/16"];
    }
  }
  return source;
}

function randomRule(next: () => number): PolicyRule {
  const rule: PolicyRule = {};
  if (next() < 0.6) rule.from = Array.from({ length: 1 + Math.floor(next() * 2) }, () => ({ source: randomSource(next) }));
  if (next() < 0.6) {
    rule.to = Array.from({ length: 1 + Math.floor(next() * 2) }, () =>
      next() < 0.7 ? { operation: { ports: some(next, PORTS) } } : { operation: { notPorts: some(next, PORTS) } },
    );
  }
  if (next() < 0.3) {
    rule.when = [
      pick(next, [
        { key: "destination.port", values: some(next, PORTS) },
        { key: "source.namespace", values: some(next, NAMESPACES) },
        { key: "source.principal", values: [principalPattern(next)] },
        { key: "source.ip", notValues: ["10.9.0.0/16"] },
        { key: "request.headers[x]", values: ["y"] },
      ]),
    ];
  }
  return rule;
}

function randomPolicy(next: () => number): AuthorizationPolicy {
  const action = next() < 0.5 ? "ALLOW" : "DENY";
  const count = Math.floor(next() * 3);
  return {
    uid: "demo/p",
    name: "p",
    namespace: pick(next, NAMESPACES),
    action,
    rules: Array.from({ length: count }, () => randomRule(next)),
    dryRun: false,
    source: { file: "generated", document: 0 },
  };
}

function randomContext(next: () => number): MatchContext {
  const identity: Identity | undefined =
    next() < 0.2
      ? undefined
      : { trustDomain: pick(next, ["cluster.local", "cluster.local", "other.td"]), namespace: pick(next, NAMESPACES), serviceAccount: pick(next, ACCOUNTS) };
  return {
    identity,
    principal: identity && `${identity.trustDomain}/ns/${identity.namespace}/sa/${identity.serviceAccount}`,
    sourceIp: pick(next, ["10.1.2.3", "10.9.0.1", "192.168.0.1"]),
    sourceIpUnknown: false,
    destinationIp: "10.2.0.1",
    destinationPort: Number(pick(next, [...PORTS, "9090"])),
    sourceAddress: undefined,
    destinationAddress: undefined,
  };
}

function withoutPrefilter(compiled: CompiledPolicy): CompiledPolicy {
  return { ...compiled, rules: compiled.rules.map((rule) => ({ ...rule, prefilter: {} })) };
}

const narrows = (compiled: CompiledPolicy) => compiled.rules.some((rule) => rule.prefilter.ports !== undefined || rule.prefilter.identities !== undefined);
const portSkips = (compiled: CompiledPolicy, port: number) =>
  compiled.rules.length > 0 && compiled.rules.every((rule) => rule.prefilter.ports !== undefined && !rule.prefilter.ports.has(port));

test("prefilter never changes the matching rule", (t) => {
  const next = random(20261205);
  let narrowed = 0;
  let skipped = 0;
  for (let round = 0; round < 3_000; round += 1) {
    const trustDomains = next() < 0.5 ? { trustDomain: "cluster.local" } : { trustDomain: "mesh.example", aliases: ["other.td"] };
    const compiled = compilePolicy(randomPolicy(next), trustDomains);
    if (narrows(compiled)) narrowed += 1;
    for (let connection = 0; connection < 10; connection += 1) {
      const context = randomContext(next);
      const expected = matchingRule(withoutPrefilter(compiled), { ...context });
      const actual = matchingRule(compiled, { ...context });
      if (actual !== expected) {
        t.fail(`round ${round}: rule ${actual} instead of ${expected} for ${JSON.stringify(compiled.policy.rules)} and ${JSON.stringify(context)}`);
        return;
      }
      if (expected === -1 && portSkips(compiled, context.destinationPort)) skipped += 1;
    }
  }
  // The generator must produce policies the prefilter narrows, or the comparison proves nothing.
  t.true(narrowed > 500, `${narrowed} narrowed policies`);
  t.true(skipped > 1_000, `${skipped} connections skipped by port`);
});

test("prefilter ports per rule", (t) => {
  const policy = (rules: PolicyRule[]): AuthorizationPolicy => ({
    uid: "demo/p",
    name: "p",
    namespace: "demo",
    action: "ALLOW",
    rules,
    dryRun: false,
    source: { file: "test", document: 0 },
  });
  const ports = (rules: PolicyRule[]) => compilePolicy(policy(rules)).rules.map((rule) => (rule.prefilter.ports ? [...rule.prefilter.ports] : undefined));
  t.deepEqual(ports([{ to: [{ operation: { ports: ["80", "81"] } }] }, {}]), [[80, 81], undefined]);
  t.deepEqual(ports([{ to: [{ operation: { notPorts: ["80"] } }] }]), [undefined]);
  t.deepEqual(ports([{ to: [{ operation: { ports: ["80"] } }], when: [{ key: "destination.port", values: ["80", "81", "82"] }] }]), [[80]]);
  t.deepEqual(ports([{ to: [{ operation: { ports: ["80"] } }, { operation: { notPorts: ["81"] } }] }]), [undefined]);
});

test("prefilter identities from principals", (t) => {
  const identities = (source: PolicySource) =>
    compilePolicy({
      uid: "demo/p",
      name: "p",
      namespace: "demo",
      action: "DENY",
      rules: [{ from: [{ source }] }],
      dryRun: false,
      source: { file: "test", document: 0 },
    }).rules[0].prefilter.identities;
  t.deepEqual([...(identities({ principals: ["cluster.local/ns/a/sa/x", "cluster.local/ns/b/*"] }) ?? [])], ["p:cluster.local/ns/a/sa/x", "n:b"]);
  t.is(identities({ principals: ["cluster.local/ns/a*"] }), undefined);
  t.deepEqual([...(identities({ serviceAccounts: ["x"] }) ?? [])], ["s:demo/x"]);
  t.is(identities({ namespaces: ["a*"] }), undefined);
  t.deepEqual([...(identities({ namespaces: ["a", "b"], principals: ["cluster.local/ns/a/sa/x"] }) ?? [])], ["p:cluster.local/ns/a/sa/x"]);
});

test("parseAddress reads IPv4 as net does", (t) => {
  const next = random(4);
  const pieces = ["0", "1", "01", "9", "10", "99", "100", "199", "255", "256", "300", "", ".", "a", " "];
  for (let round = 0; round < 5_000; round += 1) {
    const text = Array.from({ length: 1 + Math.floor(next() * 7) }, () => pick(next, pieces)).join(pick(next, [".", "."]));
    const address = parseAddress(text);
    if (net.isIPv4(text)) {
      const expected = text.split(".").reduce((value, octet) => value * 256 + Number(octet), 0);
      t.deepEqual(address, { family: 4, value: expected }, text);
    } else {
      t.is(address, undefined, text);
    }
  }
});

/** Decides as WorkloadAuthorizer does, from compiled policies whose prefilters are emptied. */
function referenceDecision(policies: AuthorizationPolicy[], context: MatchContext, trustDomains: TrustDomains) {
  const compiled = policies
    .filter((policy) => !policy.dryRun && (policy.action === "ALLOW" || policy.action === "DENY"))
    .map((policy) => withoutPrefilter(compilePolicy(policy, trustDomains)));
  const first = (action: string) => {
    for (const policy of compiled.filter((entry) => entry.policy.action === action)) {
      const rule = matchingRule(policy, { ...context });
      if (rule >= 0) return { policy: policy.policy.uid, rule };
    }
    return undefined;
  };
  const deny = first("DENY");
  if (deny !== undefined) return { decision: "deny", reason: "denied_by_policy", ...deny };
  if (!compiled.some((policy) => policy.policy.action === "ALLOW")) return { decision: "allow", reason: "no_policy" };
  const allow = first("ALLOW");
  if (allow !== undefined) return { decision: "allow", reason: "allowed_by_policy", ...allow };
  return { decision: "deny", reason: "no_allow_match" };
}

test("workload authorizer equals the reference", (t) => {
  const next = random(77);
  let decided = 0;
  for (let round = 0; round < 400; round += 1) {
    const trustDomains = next() < 0.5 ? { trustDomain: "cluster.local" } : { trustDomain: "mesh.example", aliases: ["other.td"] };
    const policies = Array.from({ length: 1 + Math.floor(next() * 6) }, (_, index) => ({
      ...randomPolicy(next),
      uid: `demo/p${index}`,
      name: `p${index}`,
      dryRun: next() < 0.1,
    }));
    const authorizer = new WorkloadAuthorizer({ policies }, { trustDomain: trustDomains.trustDomain, trustDomainAliases: trustDomains.aliases });
    // Each authorizer decides 40 connections, so later ones reuse the candidate lists of earlier ones.
    for (let connection = 0; connection < 40; connection += 1) {
      const context = randomContext(next);
      const result = authorizer.evaluate({
        sourceIdentity: context.identity,
        sourceIp: context.sourceIp,
        destinationIp: context.destinationIp,
        destinationPort: context.destinationPort,
      });
      const expected = referenceDecision(policies, context, trustDomains);
      const actual = { decision: result.decision, reason: result.reason, ...(result.policy === undefined ? {} : { policy: result.policy, rule: result.rule }) };
      if (JSON.stringify(actual) !== JSON.stringify(expected)) {
        t.fail(`round ${round}: ${JSON.stringify(actual)} instead of ${JSON.stringify(expected)} for ${JSON.stringify(context)}`);
        return;
      }
      if (result.reason !== "no_policy") decided += 1;
    }
  }
  t.true(decided > 4_000, `${decided} decisions by a policy`);
});

test("candidate lists stay bounded", (t) => {
  const policies: AuthorizationPolicy[] = Array.from({ length: 300 }, (_, index) => ({
    uid: `demo/p${String(index).padStart(3, "0")}`,
    name: `p${index}`,
    namespace: "demo",
    action: "DENY",
    rules: [{ from: [{ source: { namespaces: [`team-${index}`] } }] }, { to: [{ operation: { ports: ["9"] } }] }],
    dryRun: false,
    source: { file: "test", document: 0 },
  }));
  const authorizer = new WorkloadAuthorizer({ policies }, { trustDomain: "cluster.local" });
  for (let peer = 0; peer < 2_000; peer += 1) {
    const result = authorizer.evaluate({
      sourceIdentity: { trustDomain: "cluster.local", namespace: `team-${peer % 300}`, serviceAccount: `sa-${peer}` },
      sourceIp: "10.0.0.1",
      destinationIp: "10.0.0.2",
      destinationPort: 80,
    });
    t.is(result.policy, `demo/p${String(peer % 300).padStart(3, "0")}`);
    const size = authorizer.candidateCacheSize();
    t.true(size.identities <= 1_024, `${size.identities} identities kept`);
  }
  // Ports are no key: a plaintext client trying every port adds one entry at most.
  const before = authorizer.candidateCacheSize().identities;
  for (let port = 1; port <= 2_000; port += 1) authorizer.evaluate({ sourceIp: "10.0.0.3", destinationIp: "10.0.0.2", destinationPort: port });
  t.true(authorizer.candidateCacheSize().identities <= before + 1);
});

test("compiled policies differ per trust domain", (t) => {
  const policy = randomPolicy(random(5));
  policy.rules = [{ from: [{ source: { principals: ["cluster.local/ns/a/sa/x"] } }] }];
  const local = compilePolicy(policy, { trustDomain: "cluster.local" });
  const aliased = compilePolicy(policy, { trustDomain: "mesh.example", aliases: ["cluster.local"] });
  t.not(local, aliased);
  const context = (trustDomain: string): MatchContext => ({
    identity: { trustDomain, namespace: "a", serviceAccount: "x" },
    principal: `${trustDomain}/ns/a/sa/x`,
    sourceIp: "10.0.0.1",
    sourceIpUnknown: false,
    destinationIp: "10.0.0.2",
    destinationPort: 80,
    sourceAddress: undefined,
    destinationAddress: undefined,
  });
  t.is(matchingRule(local, context("mesh.example")), -1);
  t.is(matchingRule(aliased, context("mesh.example")), 0);
});

test("mapped IPv6 blocks match at their IPv4 boundary", (t) => {
  const policy = randomPolicy(random(6));
  const matches = (block: string, ip: string): boolean => {
    policy.rules = [{ from: [{ source: { ipBlocks: [block] } }] }];
    const compiled = compilePolicy({ ...policy }, {});
    return matchingRule(compiled, { identity: undefined, principal: undefined, sourceIp: ip, sourceIpUnknown: false, destinationIp: "10.0.0.2", destinationPort: 80, sourceAddress: undefined, destinationAddress: undefined }) === 0;
  };
  t.true(matches("::ffff:10.1.0.0/112", "10.1.255.255"));
  t.false(matches("::ffff:10.1.0.0/112", "10.2.0.0"));
  t.true(matches("::ffff:10.1.2.0/120", "10.1.2.200"));
  t.false(matches("::ffff:10.1.2.0/120", "10.1.3.1"));
  t.true(matches("::ffff:0.0.0.0/96", "192.0.2.1"));
  t.true(matches("::ffff:10.1.2.3/128", "::ffff:10.1.2.3"));
  t.false(matches("::ffff:10.1.2.3/128", "10.1.2.4"));
});
