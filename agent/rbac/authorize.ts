// L4 authorization of one inbound connection with Istio's precedence as ztunnel enforces it:
// 1. a STRICT PeerAuthentication denies a connection without a peer identity;
// 2. any matching DENY policy denies;
// 3. with no ALLOW policy for the workload, the connection is allowed;
// 4. a matching ALLOW policy allows, and otherwise the connection is denied.
// Dry-run policies are evaluated next to the enforced ones and reported, never enforced.
// Pure: no I/O and no clock, so the proxies and `agentctl authz` get the same result.

import type { AuthorizationPolicy } from "../state/types";
import { compilePolicy, matchingRuleOf, type CompiledPolicy, type CompiledRule, type MatchContext, type TrustDomains } from "./compile";
import { mayMatch } from "./prefilter";
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

/** A policy and those of its rules whose prefilters one peer identity and target port pass. */
interface Candidate {
  policy: AuthorizationPolicy;
  rules: CompiledRule[];
}

/** The candidates of each kind for one peer identity and target port, in uid order. */
interface Candidates {
  deny: Candidate[];
  allow: Candidate[];
  dryRunDeny: Candidate[];
  dryRunAllow: Candidate[];
}

/** Bound on the candidate lists kept per workload; past it the lists are dropped and built again. */
const MAX_CANDIDATE_KEYS = 1_024;

/**
 * The compiled policies of one workload. Build it once per mesh state and workload; evaluate()
 * then only runs the compiled checks. Policies with action AUDIT or CUSTOM take no part: ztunnel
 * supports neither (see policyStatus).
 */
export class WorkloadAuthorizer {
  readonly #all: { deny: CompiledPolicy[]; allow: CompiledPolicy[]; dryRunDeny: CompiledPolicy[]; dryRunAllow: CompiledPolicy[] } = {
    deny: [],
    allow: [],
    dryRunDeny: [],
    dryRunAllow: [],
  };
  readonly #peerAuthentications: PeerAuthenticationScopes;
  /**
   * The rules whose prefilters pass, by peer principal (empty for plaintext) and target port. Only
   * these can match, so a decision walks these alone.
   */
  readonly #candidates = new Map<string, Candidates>();

  constructor(policies: WorkloadPolicies, options: AuthorizeOptions = {}) {
    const trustDomains: TrustDomains = { trustDomain: options.trustDomain, aliases: options.trustDomainAliases };
    for (const policy of policies.policies) {
      if (policy.action !== "ALLOW" && policy.action !== "DENY") continue;
      const compiled = compilePolicy(policy, trustDomains);
      if (policy.dryRun) (policy.action === "DENY" ? this.#all.dryRunDeny : this.#all.dryRunAllow).push(compiled);
      else (policy.action === "DENY" ? this.#all.deny : this.#all.allow).push(compiled);
    }
    this.#peerAuthentications = policies.peerAuthentications ?? {};
  }

  /** The mutual TLS requirement for a workload port. */
  mtls(port: number): MtlsRequirement {
    return mtlsRequirement(this.#peerAuthentications, port);
  }

  /** Decides whether a connection is allowed, by which policy and rule, and why. */
  evaluate(connection: RbacConnection): AuthorizationResult {
    const context = matchContextOf(connection);
    const candidates = this.#candidatesFor(context);
    const result = this.#decide(connection, context, candidates);
    const effects = this.#dryRunEffects(result, context, candidates);
    if (effects.length > 0) result.dryRun = effects;
    return result;
  }

  #candidatesFor(context: MatchContext): Candidates {
    const key = `${context.principal ?? ""} ${context.destinationPort}`;
    let candidates = this.#candidates.get(key);
    if (candidates === undefined) {
      const passing = (list: CompiledPolicy[]): Candidate[] =>
        list
          .map((compiled) => ({ policy: compiled.policy, rules: compiled.rules.filter((rule) => mayMatch(rule.prefilter, context)) }))
          .filter((candidate) => candidate.rules.length > 0);
      const all = this.#all;
      candidates = { deny: passing(all.deny), allow: passing(all.allow), dryRunDeny: passing(all.dryRunDeny), dryRunAllow: passing(all.dryRunAllow) };
      if (this.#candidates.size >= MAX_CANDIDATE_KEYS) this.#candidates.clear();
      this.#candidates.set(key, candidates);
    }
    return candidates;
  }

  // Results are written as whole object literals: an object spread here cost more than the rest of
  // a decision in the authorization benchmark.
  #decide(connection: RbacConnection, context: MatchContext, candidates: Candidates): AuthorizationResult {
    if (connection.sourceIdentity === undefined) {
      const mtls = this.mtls(connection.destinationPort);
      if (mtls.mode === "STRICT") {
        if (mtls.policy === undefined) return { decision: "deny", reason: "mtls_required", dryRun: [] };
        return { decision: "deny", reason: "mtls_required", policy: mtls.policy, policyKind: "PeerAuthentication", dryRun: [] };
      }
    }
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
          for (const compiled of this.#all.dryRunAllow) effects.push({ policy: compiled.policy.uid, decision: "deny" });
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
