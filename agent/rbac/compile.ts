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

import net from "node:net";
import { canonicalIp, parseCidr } from "../state/ip";
import type { AuthorizationPolicy, Identity, PolicyCondition, PolicyOperation, PolicyRule, PolicySource } from "../state/types";
import { httpOperationFields, httpSourceFields, isL4Condition } from "./l4-fields";
import type { Address, Check, CidrMatcher, Clause, Clauses, Match, MatchContext, ServiceAccountRef, StringPattern } from "./match";
import { mayMatch, prefilterOf, type Prefilter } from "./prefilter";

export type { Address, MatchContext } from "./match";

/** One rule of spec.rules that can match, with its position there. */
export interface CompiledRule {
  /** Zero-based index in spec.rules, for the audit record and `agentctl authz`. */
  index: number;
  clauses: Clauses;
  /** Values that a connection needs for the rule to match, checked first (see prefilter.ts). */
  prefilter: Prefilter;
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
      if (clauses !== undefined) rules.push({ index, clauses, prefilter: prefilterOf(clauses) });
    });
    compiled = { policy, rules };
    byTrustDomain.set(key, compiled);
  }
  return compiled;
}

/** Returns the spec.rules index of the first rule that matches the connection, or -1 when none does. */
export function matchingRule(compiled: CompiledPolicy, context: MatchContext): number {
  const rules = compiled.rules;
  for (let index = 0; index < rules.length; index += 1) {
    if (mayMatch(rules[index].prefilter, context) && clausesMatch(rules[index].clauses, context)) return rules[index].index;
  }
  return -1;
}

/**
 * Returns what matchingRule returns, for rules whose identity prefilters the connection is known
 * to pass (see WorkloadAuthorizer). Their port prefilters are checked here.
 */
export function matchingRuleOf(rules: readonly CompiledRule[], context: MatchContext): number {
  // Plain loops instead of every() and some(): this runs for each policy of each connection.
  for (let index = 0; index < rules.length; index += 1) {
    const ports = rules[index].prefilter.ports;
    if (ports !== undefined && !ports.has(context.destinationPort)) continue;
    if (clausesMatch(rules[index].clauses, context)) return rules[index].index;
  }
  return -1;
}

function clausesMatch(clauses: Clauses, context: MatchContext): boolean {
  for (let index = 0; index < clauses.length; index += 1) {
    if (!clauseMatches(clauses[index], context)) return false;
  }
  return true;
}

function clauseMatches(clause: Clause, context: MatchContext): boolean {
  for (let index = 0; index < clause.length; index += 1) {
    if (matchMatches(clause[index], context)) return true;
  }
  return false;
}

function matchMatches(match: Match, context: MatchContext): boolean {
  if (match.length === 0) return false;
  for (let index = 0; index < match.length; index += 1) {
    const check = match[index];
    if (check.field === "sourceIp" && context.sourceIpUnknown) return false;
    if (anyValueMatches(check, context) === check.negate) return false;
  }
  return true;
}

/** Tells whether some value of the check matches; identity fields never match a connection without identity. */
function anyValueMatches(check: Check, context: MatchContext): boolean {
  switch (check.field) {
    case "principal":
      return context.principal !== undefined && anyStringMatches(check.values, context.principal);
    case "namespace":
      return context.identity !== undefined && anyStringMatches(check.values, context.identity.namespace);
    case "trustDomain":
      return context.identity !== undefined && anyStringMatches(check.values, context.identity.trustDomain);
    case "serviceAccount":
      return context.identity !== undefined && anyServiceAccountMatches(check.values, context.identity);
    case "sourceIp":
      return anyCidrMatches(check.values, sourceAddressOf(context));
    case "destinationIp":
      return anyCidrMatches(check.values, destinationAddressOf(context));
    case "port":
      return check.values.includes(context.destinationPort);
  }
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
  const principals = (list?: string[]) => patterns(list?.flatMap((pattern) => expandTrustDomain(pattern, trustDomains)));
  addCheck(match, "principal", principals(source.principals), principals(source.notPrincipals));
  addCheck(match, "namespace", patterns(source.namespaces), patterns(source.notNamespaces));
  const domains = (list?: string[]) => patterns(list?.flatMap((pattern) => expandDomainPattern(pattern, trustDomains)));
  addCheck(match, "trustDomain", domains(source.trustDomains), domains(source.notTrustDomains));
  const accounts = (list?: string[]) => list?.map((entry) => serviceAccountRef(entry, policyNamespace));
  addCheck(match, "serviceAccount", accounts(source.serviceAccounts), accounts(source.notServiceAccounts));
  addCheck(match, "sourceIp", cidrs(source.ipBlocks), cidrs(source.notIpBlocks));
  return match;
}

function compileOperation(operation: PolicyOperation): Match {
  const match: Match = [];
  addCheck(match, "port", ports(operation.ports), ports(operation.notPorts));
  return match;
}

/** Compiles an L4 `when` condition; any other key gives an empty match, which never matches. */
function compileCondition(condition: PolicyCondition, trustDomains: TrustDomains): Match {
  const match: Match = [];
  const { values, notValues } = condition;
  switch (condition.key) {
    case "source.ip":
      addCheck(match, "sourceIp", cidrs(values), cidrs(notValues));
      break;
    case "destination.ip":
      addCheck(match, "destinationIp", cidrs(values), cidrs(notValues));
      break;
    case "destination.port":
      addCheck(match, "port", ports(values), ports(notValues));
      break;
    case "source.namespace":
      addCheck(match, "namespace", patterns(values), patterns(notValues));
      break;
    case "source.principal": {
      const alias = (list?: string[]) => patterns(list?.flatMap((pattern) => expandTrustDomain(pattern, trustDomains)));
      addCheck(match, "principal", alias(values), alias(notValues));
      break;
    }
  }
  return match;
}

/**
 * Adds the check of one field: some value of `positive` must match, and no value of `negative`.
 * An empty or absent list is not checked.
 */
function addCheck<C extends Check>(
  match: Match,
  field: C["field"],
  positive: readonly (C["values"][number] | undefined)[] | undefined,
  negative: readonly (C["values"][number] | undefined)[] | undefined,
): void {
  if (positive !== undefined && positive.length > 0) match.push({ field, negate: false, values: definedValues(positive) } as Check);
  if (negative !== undefined && negative.length > 0) match.push({ field, negate: true, values: definedValues(negative) } as Check);
}

/** Drops the entries that failed to parse: they match nothing, so leaving them out changes no result. */
function definedValues<T>(list: readonly (T | undefined)[]): T[] {
  return list.filter((value): value is T => value !== undefined);
}

function patterns(list?: readonly string[]): StringPattern[] | undefined {
  return list?.map(stringPattern);
}

/** Prepares an Istio string match: "*" needs a non-empty value, then "*suffix", "prefix*", otherwise exact. */
function stringPattern(pattern: string): StringPattern {
  if (pattern === "*") return { kind: "any", text: "" };
  if (pattern.startsWith("*")) return { kind: "suffix", text: pattern.slice(1) };
  if (pattern.endsWith("*")) return { kind: "prefix", text: pattern.slice(0, -1) };
  return { kind: "exact", text: pattern };
}

function anyStringMatches(values: readonly StringPattern[], value: string): boolean {
  for (let index = 0; index < values.length; index += 1) {
    const pattern = values[index];
    switch (pattern.kind) {
      case "exact":
        if (value === pattern.text) return true;
        break;
      case "prefix":
        if (value.startsWith(pattern.text)) return true;
        break;
      case "suffix":
        if (value.endsWith(pattern.text)) return true;
        break;
      case "any":
        if (value !== "") return true;
        break;
    }
  }
  return false;
}

/** serviceAccounts entries are "namespace/name", or "name" in the policy's namespace; exact match only. */
function serviceAccountRef(entry: string, policyNamespace: string): ServiceAccountRef {
  const slash = entry.indexOf("/");
  return slash === -1 ? { namespace: policyNamespace, name: entry } : { namespace: entry.slice(0, slash), name: entry.slice(slash + 1) };
}

function anyServiceAccountMatches(values: readonly ServiceAccountRef[], identity: Identity): boolean {
  for (let index = 0; index < values.length; index += 1) {
    if (values[index].namespace === identity.namespace && values[index].name === identity.serviceAccount) return true;
  }
  return false;
}

function sourceAddressOf(context: MatchContext): Address | null {
  if (context.sourceAddress === undefined) context.sourceAddress = parseAddress(context.sourceIp) ?? null;
  return context.sourceAddress;
}

function destinationAddressOf(context: MatchContext): Address | null {
  if (context.destinationAddress === undefined) context.destinationAddress = parseAddress(context.destinationIp) ?? null;
  return context.destinationAddress;
}

function anyCidrMatches(values: readonly CidrMatcher[], address: Address | null): boolean {
  if (address === null) return false;
  for (let index = 0; index < values.length; index += 1) {
    const cidr = values[index];
    if (cidr.family !== address.family) continue;
    if (cidr.family === 4 ? ((address.value as number) & cidr.mask) >>> 0 === cidr.network : ((address.value as bigint) & cidr.mask) === cidr.network) {
      return true;
    }
  }
  return false;
}

/**
 * Parses CIDRs once, at compile time, so that a check is a mask and a compare. An invalid entry
 * stays as undefined, which matches nothing (and so excludes nothing).
 */
function cidrs(list?: string[]): (CidrMatcher | undefined)[] | undefined {
  return list?.map((text) => cidrMatcher(text));
}

/**
 * Prepares a CIDR with the rules of cidrContains: addresses compare in canonical form, and an
 * IPv4-mapped IPv6 block such as ::ffff:10.0.0.0/104 matches as its IPv4 equivalent.
 */
function cidrMatcher(text: string): CidrMatcher | undefined {
  const cidr = parseCidr(text);
  if (cidr === undefined) return undefined;
  const base = parseAddress(cidr.address);
  if (base === undefined) return undefined;
  if (base.family === 4) {
    const prefix = cidr.family === 6 ? Math.max(0, cidr.prefix - 96) : cidr.prefix;
    const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
    return { family: 4, network: ((base.value as number) & mask) >>> 0, mask };
  }
  const all = (1n << 128n) - 1n;
  const mask = all ^ ((1n << BigInt(128 - cidr.prefix)) - 1n);
  return { family: 6, network: (base.value as bigint) & mask, mask };
}

/** Parses an address in any text form; IPv4-mapped IPv6 becomes IPv4. Undefined when it is not an IP address. */
export function parseAddress(text: string): Address | undefined {
  // Most connections are IPv4: a dotted quad is read directly, without the regular expressions.
  const ipv4 = parseDottedQuad(text);
  if (ipv4 !== undefined) return { family: 4, value: ipv4 };
  const canonical = canonicalIp(text);
  const family = net.isIP(canonical);
  if (family === 4) {
    const octets = canonical.split(".");
    return { family: 4, value: ((+octets[0] << 24) | (+octets[1] << 16) | (+octets[2] << 8) | +octets[3]) >>> 0 };
  }
  if (family !== 6 || canonical.includes(".")) return undefined;
  const [head, tail] = canonical.includes("::") ? canonical.split("::") : [canonical, undefined];
  const headGroups = head === "" ? [] : head.split(":");
  const tailGroups = tail === undefined || tail === "" ? [] : tail.split(":");
  const zeros = tail === undefined ? 0 : 8 - headGroups.length - tailGroups.length;
  const groups = [...headGroups, ...Array<string>(zeros).fill("0"), ...tailGroups];
  // A zone id ("fe80::1%eth0") or any other group that is not hexadecimal makes the text no address here.
  if (groups.length !== 8 || !groups.every((group) => /^[0-9a-f]{1,4}$/i.test(group))) return undefined;
  return { family: 6, value: groups.reduce((value, group) => (value << 16n) | BigInt(parseInt(group, 16)), 0n) };
}

/**
 * Returns a dotted-quad IPv4 address as an unsigned 32-bit number, or undefined for any other
 * text. It accepts what net.isIPv4 accepts: four decimal octets of 0 to 255 without leading zeros.
 */
function parseDottedQuad(text: string): number | undefined {
  let value = 0;
  let octet = 0;
  let digits = 0;
  let dots = 0;
  for (let index = 0; index < text.length; index += 1) {
    const code = text.charCodeAt(index);
    if (code === 46) {
      if (digits === 0 || dots === 3) return undefined;
      value = value * 256 + octet;
      octet = 0;
      digits = 0;
      dots += 1;
      continue;
    }
    if (code < 48 || code > 57 || (digits > 0 && octet === 0)) return undefined;
    octet = octet * 10 + (code - 48);
    digits += 1;
    if (octet > 255) return undefined;
  }
  if (dots !== 3 || digits === 0) return undefined;
  return value * 256 + octet;
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
