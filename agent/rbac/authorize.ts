// L4 authorization of one inbound connection with Istio's precedence as ztunnel enforces it:
// 1. a STRICT PeerAuthentication denies a connection without a peer identity;
// 2. any matching DENY policy denies;
// 3. with no ALLOW policy for the workload, the connection is allowed;
// 4. a matching ALLOW policy allows, and otherwise the connection is denied.
// Dry-run policies are evaluated next to the enforced ones and reported, never enforced.
// Pure: no I/O and no clock, so the proxies and `agentctl authz` get the same result.

import type { AuthorizationPolicy } from "../state/types";
import { compilePolicy, matchingRuleOf, type CompiledRule, type MatchContext, type TrustDomains } from "./compile";
import { mayMatchIdentity } from "./prefilter";
import { mtlsRequirement, type MtlsRequirement, type PeerAuthenticationScopes } from "./peer-authentication";
import type { AuthorizationResult, DryRunEffect, RbacConnection } from "./types";

export { policyWarnings } from "./warnings";

export interface AuthorizeOptions {
  /**
   * The mesh's trust domain. Principals written with the trust domain "cluster.local" then match
   * identities of this trust domain, as Istio rewrites them.
   */
  trustDomain?: string;
  /** Trust domains that count as the mesh's own: a principal of any of them matches all of them. */
  trustDomainAliases?: readonly string[];
}

/** Everything that decides connections to one workload. */
export interface WorkloadPolicies {
  /** The AuthorizationPolicies that apply, in uid order (see MeshState.policiesForWorkload). */
  policies: readonly AuthorizationPolicy[];
  peerAuthentications?: PeerAuthenticationScopes;
}

/** A policy and those of its rules whose identity prefilters one peer identity passes. */
interface Candidate {
  policy: AuthorizationPolicy;
  rules: readonly CompiledRule[];
}

/** The candidates of each kind for one peer identity, in uid order. */
interface Candidates {
  deny: readonly Candidate[];
  allow: readonly Candidate[];
  dryRunDeny: readonly Candidate[];
  dryRunAllow: readonly Candidate[];
}

/**
 * Bounds on the candidate lists kept per workload: the peer identities, and the candidates over all
 * of them. Past either, the lists are dropped and built again as connections arrive.
 */
const MAX_CANDIDATE_KEYS = 1_024;
const MAX_CANDIDATE_ENTRIES = 200_000;

/**
 * The compiled policies of one workload. Build it once per mesh state and workload; evaluate()
 * then only runs the compiled checks. Policies with action AUDIT or CUSTOM take no part: ztunnel
 * supports neither (see policyStatus).
 */
export class WorkloadAuthorizer {
  /** Every policy of each kind, each as a candidate with all of its rules. */
  readonly #all: Candidates;
  readonly #peerAuthentications: PeerAuthenticationScopes;
  /**
   * The candidates by peer principal (empty for plaintext). Only their rules can match, so a
   * decision walks these alone. Keys are identities, never ports: a client that tries many ports
   * adds no entry.
   */
  readonly #candidates = new Map<string, Candidates>();
  #candidateEntries = 0;

  constructor(policies: WorkloadPolicies, options: AuthorizeOptions = {}) {
    const trustDomains: TrustDomains = { trustDomain: options.trustDomain, aliases: options.trustDomainAliases };
    const all = { deny: [] as Candidate[], allow: [] as Candidate[], dryRunDeny: [] as Candidate[], dryRunAllow: [] as Candidate[] };
    for (const policy of policies.policies) {
      if (policy.action !== "ALLOW" && policy.action !== "DENY") continue;
      const { rules } = compilePolicy(policy, trustDomains);
      const candidate = { policy, rules };
      if (policy.dryRun) (policy.action === "DENY" ? all.dryRunDeny : all.dryRunAllow).push(candidate);
      else (policy.action === "DENY" ? all.deny : all.allow).push(candidate);
    }
    this.#all = all;
    this.#peerAuthentications = policies.peerAuthentications ?? {};
  }

  /** The mutual TLS requirement for a workload port. */
  mtls(port: number): MtlsRequirement {
    return mtlsRequirement(this.#peerAuthentications, port);
  }

  /** Decides whether a connection is allowed, by which policy and rule, and why. */
  evaluate(connection: RbacConnection): AuthorizationResult {
    if (connection.sourceIdentity === undefined) {
      const denial = this.#strictDenial(connection.destinationPort);
      if (denial !== undefined) return denial;
    }
    const context = matchContextOf(connection);
    const candidates = this.#candidatesFor(context);
    const result = this.#decide(context, candidates);
    const effects = this.#dryRunEffects(result, context, candidates);
    if (effects.length > 0) result.dryRun = effects;
    return result;
  }

  /** Returns the denial of a connection without a peer identity where PeerAuthentication is STRICT. */
  #strictDenial(port: number): AuthorizationResult | undefined {
    const mtls = this.mtls(port);
    if (mtls.mode !== "STRICT") return undefined;
    if (mtls.policy === undefined) return { decision: "deny", reason: "mtls_required", dryRun: [] };
    return { decision: "deny", reason: "mtls_required", policy: mtls.policy, policyKind: "PeerAuthentication", dryRun: [] };
  }

  #candidatesFor(context: MatchContext): Candidates {
    const key = context.principal ?? "";
    let candidates = this.#candidates.get(key);
    if (candidates === undefined) {
      const all = this.#all;
      candidates = {
        deny: passing(all.deny, context),
        allow: passing(all.allow, context),
        dryRunDeny: passing(all.dryRunDeny, context),
        dryRunAllow: passing(all.dryRunAllow, context),
      };
      const entries = candidates.deny.length + candidates.allow.length + candidates.dryRunDeny.length + candidates.dryRunAllow.length;
      if (this.#candidates.size >= MAX_CANDIDATE_KEYS || this.#candidateEntries + entries > MAX_CANDIDATE_ENTRIES) {
        this.#candidates.clear();
        this.#candidateEntries = 0;
      }
      this.#candidates.set(key, candidates);
      this.#candidateEntries += entries;
    }
    return candidates;
  }

  // Results are written as whole object literals: an object spread here cost more than the rest of
  // a decision in the authorization benchmark.
  #decide(context: MatchContext, candidates: Candidates): AuthorizationResult {
    const deny = firstMatch(candidates.deny, context);
    if (deny !== undefined) {
      return { decision: "deny", reason: "denied_by_policy", policy: deny.policy.uid, policyKind: "AuthorizationPolicy", rule: deny.rule, dryRun: [] };
    }
    // Whether any ALLOW policy applies counts every one, not only the candidates.
    if (this.#all.allow.length === 0) return { decision: "allow", reason: "no_policy", dryRun: [] };
    const allow = firstMatch(candidates.allow, context);
    if (allow !== undefined) {
      return { decision: "allow", reason: "allowed_by_policy", policy: allow.policy.uid, policyKind: "AuthorizationPolicy", rule: allow.rule, dryRun: [] };
    }
    return { decision: "deny", reason: "no_allow_match", dryRun: [] };
  }

  /** Lists the dry-run policies that would have changed the enforced outcome, had they been enforced. */
  #dryRunEffects(outcome: AuthorizationResult, context: MatchContext, candidates: Candidates): DryRunEffect[] {
    const effects: DryRunEffect[] = [];
    if (outcome.decision === "allow") {
      // A matching DENY would have denied an allowed connection.
      for (const candidate of candidates.dryRunDeny) {
        const rule = matchingRuleOf(candidate.rules, context);
        if (rule >= 0) effects.push({ policy: candidate.policy.uid, rule, decision: "deny" });
      }
      // With no enforced ALLOW policy, dry-run ALLOW policies would have denied a connection none of them matches.
      if (effects.length === 0 && outcome.reason === "no_policy" && this.#all.dryRunAllow.length > 0) {
        if (firstMatch(candidates.dryRunAllow, context) === undefined) {
          for (const candidate of this.#all.dryRunAllow) effects.push({ policy: candidate.policy.uid, decision: "deny" });
        }
      }
      return effects;
    }
    // A matching ALLOW would have allowed a connection that no enforced ALLOW matched.
    if (outcome.reason === "no_allow_match") {
      for (const candidate of candidates.dryRunAllow) {
        const rule = matchingRuleOf(candidate.rules, context);
        if (rule >= 0) effects.push({ policy: candidate.policy.uid, rule, decision: "allow" });
      }
    }
    return effects;
  }
}

/**
 * Returns the candidates of `list` that have a rule whose identity prefilter the connection passes,
 * each with those rules. A policy that keeps every rule keeps its candidate object, so the lists of
 * many identities share them.
 */
function passing(list: readonly Candidate[], context: MatchContext): Candidate[] {
  const result: Candidate[] = [];
  for (const candidate of list) {
    const rules = candidate.rules.filter((rule) => mayMatchIdentity(rule.prefilter, context));
    if (rules.length === candidate.rules.length) result.push(candidate);
    else if (rules.length > 0) result.push({ policy: candidate.policy, rules });
  }
  return result;
}

/** Returns the first policy of `list` with a matching rule, and that rule's index. */
function firstMatch(list: readonly Candidate[], context: MatchContext): { policy: AuthorizationPolicy; rule: number } | undefined {
  for (let index = 0; index < list.length; index += 1) {
    const rule = matchingRuleOf(list[index].rules, context);
    if (rule >= 0) return { policy: list[index].policy, rule };
  }
  return undefined;
}

/**
 * Decides one connection against `policies`, the AuthorizationPolicies that apply to the
 * destination workload. Compiles on every call: use WorkloadAuthorizer for repeated decisions.
 */
export function authorize(
  connection: RbacConnection,
  policies: readonly AuthorizationPolicy[],
  options: AuthorizeOptions = {},
): AuthorizationResult {
  return new WorkloadAuthorizer({ policies }, options).evaluate(connection);
}

function matchContextOf(connection: RbacConnection): MatchContext {
  const identity = connection.sourceIdentity;
  return {
    identity,
    principal: identity && `${identity.trustDomain}/ns/${identity.namespace}/sa/${identity.serviceAccount}`,
    sourceIp: connection.sourceIp,
    destinationIp: connection.destinationIp,
    destinationPort: connection.destinationPort,
    sourceAddress: undefined,
    destinationAddress: undefined,
  };
}
