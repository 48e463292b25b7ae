// L4 authorization of one inbound connection with Istio's precedence as ztunnel enforces it:
// 1. a STRICT PeerAuthentication denies a connection without a peer identity;
// 2. any matching DENY policy denies;
// 3. with no ALLOW policy for the workload, the connection is allowed;
// 4. a matching ALLOW policy allows, and otherwise the connection is denied.
// Dry-run policies are evaluated next to the enforced ones and reported, never enforced.
// Pure: no I/O and no clock, so the proxies and `agentctl authz` get the same answer.

import type { AuthorizationPolicy } from "../state/types";
import { compilePolicy, matchingRule, type CompiledPolicy, type MatchContext, type TrustDomains } from "./compile";
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

type Outcome = Omit<AuthorizationResult, "dryRun">;

/**
 * The compiled policies of one workload. Build it once per mesh state and workload; evaluate()
 * then only runs the compiled checks. Policies with action AUDIT or CUSTOM take no part: ztunnel
 * supports neither (see policyStatus).
 */
export class WorkloadAuthorizer {
  readonly #deny: CompiledPolicy[] = [];
  readonly #allow: CompiledPolicy[] = [];
  readonly #dryRunDeny: CompiledPolicy[] = [];
  readonly #dryRunAllow: CompiledPolicy[] = [];
  readonly #peerAuthentications: PeerAuthenticationScopes;

  constructor(policies: WorkloadPolicies, options: AuthorizeOptions = {}) {
    const trustDomains: TrustDomains = { trustDomain: options.trustDomain, aliases: options.trustDomainAliases };
    for (const policy of policies.policies) {
      if (policy.action !== "ALLOW" && policy.action !== "DENY") continue;
      const compiled = compilePolicy(policy, trustDomains);
      if (policy.dryRun) (policy.action === "DENY" ? this.#dryRunDeny : this.#dryRunAllow).push(compiled);
      else (policy.action === "DENY" ? this.#deny : this.#allow).push(compiled);
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
    const outcome = this.#decide(connection, context);
    return { ...outcome, dryRun: this.#dryRunEffects(outcome, context) };
  }

  #decide(connection: RbacConnection, context: MatchContext): Outcome {
    if (connection.sourceIdentity === undefined) {
      const mtls = this.mtls(connection.destinationPort);
      if (mtls.mode === "STRICT") return { decision: "deny", reason: "mtls_required", ...peerAuthenticationRef(mtls) };
    }
    for (const compiled of this.#deny) {
      const rule = matchingRule(compiled, context);
      if (rule >= 0) return { decision: "deny", reason: "denied_by_policy", ...policyRef(compiled, rule) };
    }
    if (this.#allow.length === 0) return { decision: "allow", reason: "no_policy" };
    for (const compiled of this.#allow) {
      const rule = matchingRule(compiled, context);
      if (rule >= 0) return { decision: "allow", reason: "allowed_by_policy", ...policyRef(compiled, rule) };
    }
    return { decision: "deny", reason: "no_allow_match" };
  }

  /** Lists the dry-run policies that would have changed the enforced outcome, had they been enforced. */
  #dryRunEffects(outcome: Outcome, context: MatchContext): DryRunEffect[] {
    const effects: DryRunEffect[] = [];
    if (outcome.decision === "allow") {
      // A matching DENY would have denied an allowed connection.
      for (const compiled of this.#dryRunDeny) {
        const rule = matchingRule(compiled, context);
        if (rule >= 0) effects.push({ policy: compiled.policy.uid, rule, decision: "deny" });
      }
      // With no enforced ALLOW policy, dry-run ALLOW policies would have denied a connection none of them matches.
      if (effects.length === 0 && outcome.reason === "no_policy" && this.#dryRunAllow.length > 0) {
        if (!this.#dryRunAllow.some((compiled) => matchingRule(compiled, context) >= 0)) {
          for (const compiled of this.#dryRunAllow) effects.push({ policy: compiled.policy.uid, decision: "deny" });
        }
      }
      return effects;
    }
    // A matching ALLOW would have allowed a connection that no enforced ALLOW matched.
    if (outcome.reason === "no_allow_match") {
      for (const compiled of this.#dryRunAllow) {
        const rule = matchingRule(compiled, context);
        if (rule >= 0) effects.push({ policy: compiled.policy.uid, rule, decision: "allow" });
      }
    }
    return effects;
  }
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

function policyRef(compiled: CompiledPolicy, rule: number): Pick<Outcome, "policy" | "policyKind" | "rule"> {
  return { policy: compiled.policy.uid, policyKind: "AuthorizationPolicy", rule };
}

function peerAuthenticationRef(mtls: MtlsRequirement): Pick<Outcome, "policy" | "policyKind"> {
  return mtls.policy === undefined ? {} : { policy: mtls.policy, policyKind: "PeerAuthentication" };
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
