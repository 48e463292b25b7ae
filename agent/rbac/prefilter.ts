// The destination ports and peer identities that a connection needs for a compiled rule to match.
// A rule that names ports, principals, service accounts or source namespaces can then be skipped
// for most connections without a walk through its clauses. Each set is a necessary condition
// only, so a connection that passes still goes through the full match, and a rule that cannot be
// narrowed gets no set.

import type { Check, Clause, Clauses, Match, MatchContext, StringPattern } from "./match";

export interface Prefilter {
  /** Target ports outside this set match no rule; absent when any port may match. */
  ports?: ReadonlySet<number>;
  /**
   * Peer identities that may match, as keys: "p:" and a principal, "s:namespace/account", or
   * "n:namespace". A peer with none of its keys in the set matches no rule, and neither does a
   * plaintext connection. Absent when any peer may match.
   */
  identities?: ReadonlySet<string>;
}

/** Tells whether the connection has what the prefilter needs; false means the rule cannot match. */
export function mayMatch(prefilter: Prefilter, context: MatchContext): boolean {
  const ports = prefilter.ports;
  if (ports !== undefined && !ports.has(context.destinationPort)) return false;
  return mayMatchIdentity(prefilter, context);
}

/** Tells whether the connection's peer identity is one the prefilter allows; ports are not checked. */
export function mayMatchIdentity(prefilter: Prefilter, context: MatchContext): boolean {
  const identities = prefilter.identities;
  if (identities === undefined) return true;
  const identity = context.identity;
  if (identity === undefined) return false;
  return (
    identities.has(`n:${identity.namespace}`) ||
    identities.has(`s:${identity.namespace}/${identity.serviceAccount}`) ||
    identities.has(`p:${context.principal}`)
  );
}

/** A set of values that a match needs, or undefined when the match accepts any value. */
type Needed<T> = Set<T> | undefined;

export function prefilterOf(clauses: Clauses): Prefilter {
  const prefilter: Prefilter = {};
  const ports = neededByClauses(clauses, portsNeededBy);
  if (ports !== undefined) prefilter.ports = ports;
  const identities = neededByClauses(clauses, identitiesNeededBy);
  if (identities !== undefined) prefilter.identities = identities;
  return prefilter;
}

/** Clauses are ANDed, so what any one clause needs the rule needs too: the smallest such set is kept. */
function neededByClauses<T>(clauses: Clauses, neededByMatch: (match: Match) => Needed<T>): Needed<T> {
  return smallest(clauses.map((clause) => neededByClause(clause, neededByMatch)));
}

/** Matches are ORed, so a clause needs the union of its matches' sets. An empty match never matches and adds nothing. */
function neededByClause<T>(clause: Clause, neededByMatch: (match: Match) => Needed<T>): Needed<T> {
  const union = new Set<T>();
  for (const match of clause) {
    if (match.length === 0) continue;
    const needed = neededByMatch(match);
    if (needed === undefined) return undefined;
    for (const value of needed) union.add(value);
  }
  return union;
}

/** Returns the smallest set that a positive check of the match needs: checks are ANDed, so each one's set is necessary. */
function neededByChecks<T>(match: Match, neededByCheck: (check: Check) => Needed<T>): Needed<T> {
  return smallest(match.filter((check) => !check.negate).map(neededByCheck));
}

function portsNeededBy(match: Match): Needed<number> {
  return neededByChecks(match, (check) => (check.field === "port" ? new Set(check.values) : undefined));
}

function identitiesNeededBy(match: Match): Needed<string> {
  return neededByChecks(match, (check) => {
    switch (check.field) {
      case "namespace":
        return allDefined(check.values.map((pattern) => (pattern.kind === "exact" ? `n:${pattern.text}` : undefined)));
      case "principal":
        return allDefined(check.values.map(identityKeyOfPrincipal));
      case "serviceAccount":
        return new Set(check.values.map((account) => `s:${account.namespace}/${account.name}`));
      default:
        return undefined;
    }
  });
}

/**
 * Returns the identity key that every principal matching the pattern has: "p:" and the principal
 * for an exact one, or "n:" and the namespace for a prefix that ends after "td/ns/NAMESPACE/".
 * Trust domains and namespaces contain no "/", so the namespace is the third segment.
 */
function identityKeyOfPrincipal(pattern: StringPattern): string | undefined {
  if (pattern.kind === "exact") return `p:${pattern.text}`;
  if (pattern.kind !== "prefix") return undefined;
  const namespace = /^[^/]+\/ns\/([^/]+)\//.exec(pattern.text)?.[1];
  return namespace === undefined ? undefined : `n:${namespace}`;
}

function allDefined<T>(values: (T | undefined)[]): Needed<T> {
  return values.every((value) => value !== undefined) ? new Set(values as T[]) : undefined;
}

/** Returns the smallest of the restricting sets, or undefined when none restricts. */
function smallest<T>(sets: Needed<T>[]): Needed<T> {
  let result: Needed<T>;
  for (const set of sets) {
    if (set !== undefined && (result === undefined || set.size < result.size)) result = set;
  }
  return result;
}
