// Turns an AuthorizationPolicy into the L4 matcher that ztunnel evaluates, following Istio's
// ambient translation:
// - a rule becomes a list of clauses that must all match: one clause for its `from` entries,
//   one for its `to` entries, and one per `when` condition;
// - a clause matches when any of its matches does;
// - a match checks its fields with AND and the values of one field with OR, and a not* list
//   must contain no matching value;
// - a match with no L4 field left (only HTTP fields, or an HTTP `when` key) never matches;
// - an ALLOW rule with any HTTP field is dropped whole, because an L4 proxy cannot prove it;
// - a policy without rules never matches.

import { cidrContains, canonicalIp, parseCidr, type Cidr } from "../state/ip";
import type { AuthorizationPolicy, Identity, PolicyCondition, PolicyOperation, PolicyRule, PolicySource } from "../state/types";
import { httpOperationFields, httpSourceFields, isL4Condition } from "./l4-fields";

/** The connection attributes the matcher reads, prepared once per authorization. */
export interface MatchContext {
  identity?: Identity;
  /** "<trust domain>/ns/<namespace>/sa/<service account>", the SPIFFE id without "spiffe://". */
  principal?: string;
  sourceIp: string;
  destinationIp: string;
  destinationPort: number;
}

type Check = (context: MatchContext) => boolean;

/** A conjunction of field checks; an empty list never matches. */
type Match = Check[];

/** A disjunction of matches. */
type Clause = Match[];

/** A conjunction of clauses; an empty list matches every connection (`rules: [{}]`). */
type Clauses = Clause[];

/** One rule of spec.rules that can match, with its position there. */
export interface CompiledRule {
  /** Zero-based index in spec.rules, for the audit record and `agentctl authz`. */
  index: number;
  clauses: Clauses;
}

export interface CompiledPolicy {
  policy: AuthorizationPolicy;
  rules: CompiledRule[];
}

/** Istio writes principals with the trust domain "cluster.local" to mean the mesh's own trust domain. */
const LOCAL_TRUST_DOMAIN_ALIAS = "cluster.local";

const cache = new WeakMap<AuthorizationPolicy, Map<string, CompiledPolicy>>();

/** The mesh's trust domain and the other trust domains that count as the same one. */
export interface TrustDomains {
  trustDomain?: string;
  aliases?: readonly string[];
}

/** Compiles a policy, once per policy object, trust domain and aliases. */
export function compilePolicy(policy: AuthorizationPolicy, trustDomains: TrustDomains = {}): CompiledPolicy {
  const byTrustDomain = cache.get(policy) ?? new Map<string, CompiledPolicy>();
  cache.set(policy, byTrustDomain);
  const key = [trustDomains.trustDomain ?? "", ...(trustDomains.aliases ?? [])].join(" ");
  let compiled = byTrustDomain.get(key);
  if (compiled === undefined) {
    const rules: CompiledRule[] = [];
    (policy.rules ?? []).forEach((rule, index) => {
      const clauses = compileRule(rule, policy, trustDomains);
      if (clauses !== undefined) rules.push({ index, clauses });
    });
    compiled = { policy, rules };
    byTrustDomain.set(key, compiled);
  }
  return compiled;
}

/** Returns the spec.rules index of the first rule that matches the connection, or -1 when none does. */
export function matchingRule(compiled: CompiledPolicy, context: MatchContext): number {
  for (const rule of compiled.rules) {
    if (rule.clauses.every((clause) => clause.some((match) => match.length > 0 && match.every((check) => check(context))))) {
      return rule.index;
    }
  }
  return -1;
}

/** Returns the rule's clauses, or undefined when the rule is dropped (an ALLOW rule with HTTP fields). */
export function compileRule(rule: PolicyRule, policy: AuthorizationPolicy, trustDomains: TrustDomains = {}): Clauses | undefined {
  if (policy.action === "ALLOW" && ruleNeedsHttp(rule)) return undefined;
  const clauses: Clauses = [];
  if (rule.to !== undefined && rule.to.length > 0) {
    clauses.push(rule.to.map((entry) => compileOperation(entry.operation)));
  }
  if (rule.from !== undefined && rule.from.length > 0) {
    clauses.push(rule.from.map((entry) => compileSource(entry.source, policy.namespace, trustDomains)));
  }
  for (const condition of rule.when ?? []) {
    clauses.push([compileCondition(condition, trustDomains)]);
  }
  return clauses;
}

export function ruleNeedsHttp(rule: PolicyRule): boolean {
  return (
    (rule.from ?? []).some((entry) => httpSourceFields(entry.source).length > 0) ||
    (rule.to ?? []).some((entry) => httpOperationFields(entry.operation).length > 0) ||
    (rule.when ?? []).some((condition) => !isL4Condition(condition))
  );
}

function compileSource(source: PolicySource, policyNamespace: string, trustDomains: TrustDomains): Match {
  const match: Match = [];
  const principals = (list?: string[]) => list?.flatMap((pattern) => expandTrustDomain(pattern, trustDomains));
  addCheck(match, principals(source.principals), principals(source.notPrincipals), matchPrincipal);
  addCheck(match, source.namespaces, source.notNamespaces, matchNamespace);
  const domains = (list?: string[]) => list?.flatMap((pattern) => expandDomainPattern(pattern, trustDomains));
  addCheck(match, domains(source.trustDomains), domains(source.notTrustDomains), matchTrustDomain);
  addCheck(match, source.serviceAccounts, source.notServiceAccounts, (value, context) =>
    matchServiceAccount(value, policyNamespace, context),
  );
  addCheck(match, cidrs(source.ipBlocks), cidrs(source.notIpBlocks), (cidr, context) => matchIp(cidr, context.sourceIp));
  return match;
}

function compileOperation(operation: PolicyOperation): Match {
  const match: Match = [];
  addCheck(match, ports(operation.ports), ports(operation.notPorts), (port, context) => port === context.destinationPort);
  return match;
}

/** Compiles an L4 `when` condition; any other key gives an empty match, which never matches. */
function compileCondition(condition: PolicyCondition, trustDomains: TrustDomains): Match {
  const match: Match = [];
  const { values, notValues } = condition;
  switch (condition.key) {
    case "source.ip":
      addCheck(match, cidrs(values), cidrs(notValues), (cidr, context) => matchIp(cidr, context.sourceIp));
      break;
    case "destination.ip":
      addCheck(match, cidrs(values), cidrs(notValues), (cidr, context) => matchIp(cidr, context.destinationIp));
      break;
    case "destination.port":
      addCheck(match, ports(values), ports(notValues), (port, context) => port === context.destinationPort);
      break;
    case "source.namespace":
      addCheck(match, values, notValues, matchNamespace);
      break;
    case "source.principal": {
      const alias = (list?: string[]) => list?.flatMap((pattern) => expandTrustDomain(pattern, trustDomains));
      addCheck(match, alias(values), alias(notValues), matchPrincipal);
      break;
    }
  }
  return match;
}

/**
 * Adds the check of one field: some value of `positive` must match, and no value of `negative`.
 * An empty or absent list is not checked.
 */
function addCheck<T>(
  match: Match,
  positive: readonly (T | undefined)[] | undefined,
  negative: readonly (T | undefined)[] | undefined,
  test: (value: T, context: MatchContext) => boolean,
): void {
  const matchesAny = (list: readonly (T | undefined)[], context: MatchContext) =>
    list.some((value) => value !== undefined && test(value, context));
  if (positive !== undefined && positive.length > 0) match.push((context) => matchesAny(positive, context));
  if (negative !== undefined && negative.length > 0) match.push((context) => !matchesAny(negative, context));
}

/** Istio string match: "*" needs a non-empty value, "*suffix", "prefix*", otherwise exact. */
export function matchString(pattern: string, value: string): boolean {
  if (pattern === "*") return value !== "";
  if (pattern.startsWith("*")) return value.endsWith(pattern.slice(1));
  if (pattern.endsWith("*")) return value.startsWith(pattern.slice(0, -1));
  return value === pattern;
}

/** Matches a principal pattern. A connection without a proven identity has no principal and matches none. */
function matchPrincipal(pattern: string, context: MatchContext): boolean {
  return context.principal !== undefined && matchString(pattern, context.principal);
}

/** Matches the source namespace, taken from the peer's SPIFFE id, so plaintext connections match none. */
function matchNamespace(pattern: string, context: MatchContext): boolean {
  return context.identity !== undefined && matchString(pattern, context.identity.namespace);
}

/** Matches the trust domain of the peer's SPIFFE id, so plaintext connections match none. */
function matchTrustDomain(pattern: string, context: MatchContext): boolean {
  return context.identity !== undefined && matchString(pattern, context.identity.trustDomain);
}

/** serviceAccounts entries are "namespace/name", or "name" in the policy's namespace; exact match only. */
function matchServiceAccount(entry: string, policyNamespace: string, context: MatchContext): boolean {
  if (context.identity === undefined) return false;
  const slash = entry.indexOf("/");
  const namespace = slash === -1 ? policyNamespace : entry.slice(0, slash);
  const serviceAccount = slash === -1 ? entry : entry.slice(slash + 1);
  return context.identity.namespace === namespace && context.identity.serviceAccount === serviceAccount;
}

function matchIp(cidr: Cidr, ip: string): boolean {
  return cidrContains(cidr, canonicalIp(ip));
}

/** Parses CIDRs; an invalid entry stays as undefined, which matches nothing (and so excludes nothing). */
function cidrs(list?: string[]): (Cidr | undefined)[] | undefined {
  return list?.map((text) => parseCidr(text));
}

function ports(list?: string[]): (number | undefined)[] | undefined {
  return list?.map((text) => {
    if (!/^[0-9]{1,5}$/.test(text)) return undefined;
    const port = Number(text);
    return port >= 1 && port <= 65535 ? port : undefined;
  });
}

/**
 * Rewrites a principal pattern whose trust domain is the mesh's own or one of its aliases into one
 * pattern per trust domain of that set, as istiod does. "cluster.local" always counts as the mesh's
 * own. A policy written for any of them then matches peers of all of them; other patterns stay.
 */
function expandTrustDomain(pattern: string, trustDomains: TrustDomains): string[] {
  const slash = pattern.indexOf("/");
  if (slash < 0) return [pattern];
  return expandDomainPattern(pattern.slice(0, slash), trustDomains).map((domain) => `${domain}${pattern.slice(slash)}`);
}

/** Rewrites a trust domain that is the mesh's own, "cluster.local" or an alias into all of them; keeps any other. */
function expandDomainPattern(domain: string, { trustDomain, aliases = [] }: TrustDomains): string[] {
  if (trustDomain === undefined) return [domain];
  if (domain !== LOCAL_TRUST_DOMAIN_ALIAS && domain !== trustDomain && !aliases.includes(domain)) return [domain];
  return [trustDomain, ...aliases];
}
