// L4 authorization of one inbound connection against the AuthorizationPolicies that apply to its
// destination workload, with Istio's precedence as ztunnel enforces it. Pure: no I/O, no clock.

import type { AuthorizationPolicy } from "../state/types";
import { compilePolicy, policyMatches, type MatchContext } from "./compile";
import type { AuthorizationResult, RbacConnection } from "./types";

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

type Outcome = Omit<AuthorizationResult, "dryRun">;

/**
 * Decides whether a connection is allowed. `policies` are those that apply to the destination
 * workload (see MeshState.policiesForWorkload). Policies with action AUDIT or CUSTOM take no
 * part in the decision: AUDIT only marks requests for logging and CUSTOM delegates to an external
 * authorizer, neither of which ztunnel supports.
 */
export function authorize(
  connection: RbacConnection,
  policies: readonly AuthorizationPolicy[],
  options: AuthorizeOptions = {},
): AuthorizationResult {
  const context = matchContextOf(connection);
  const matches = (policy: AuthorizationPolicy) => policyMatches(compilePolicy(policy, { trustDomain: options.trustDomain, aliases: options.trustDomainAliases }), context);

  // Dry-run policies (annotation istio.io/dry-run: "true") are evaluated and reported, never enforced.
  const enforced = policies.filter((policy) => !policy.dryRun);
  const outcome = decide(enforced, matches);
  const dryRun = dryRunEffects(
    policies.filter((policy) => policy.dryRun),
    outcome,
    matches,
  );
  return { ...outcome, dryRun };
}

function decide(policies: readonly AuthorizationPolicy[], matches: (policy: AuthorizationPolicy) => boolean): Outcome {
  // 1. If any DENY policy matches the connection, deny it.
  const denying = policies.find((policy) => policy.action === "DENY" && matches(policy));
  if (denying !== undefined) return { decision: "deny", policy: denying.uid, reason: "denied_by_policy" };

  // 2. If no ALLOW policy applies to the workload, allow the connection.
  const allowPolicies = policies.filter((policy) => policy.action === "ALLOW");
  if (allowPolicies.length === 0) return { decision: "allow", reason: "no_policy" };

  // 3. If any ALLOW policy matches the connection, allow it.
  const allowing = allowPolicies.find((policy) => matches(policy));
  if (allowing !== undefined) return { decision: "allow", policy: allowing.uid, reason: "allowed_by_policy" };

  // 4. Otherwise deny it.
  return { decision: "deny", reason: "no_allow_match" };
}

/** Lists the dry-run policies that would have changed the enforced outcome, had they been enforced. */
function dryRunEffects(
  dryRunPolicies: readonly AuthorizationPolicy[],
  outcome: Outcome,
  matches: (policy: AuthorizationPolicy) => boolean,
): AuthorizationResult["dryRun"] {
  const effects: AuthorizationResult["dryRun"] = [];
  const dryRunAllows = dryRunPolicies.filter((policy) => policy.action === "ALLOW");

  if (outcome.decision === "allow") {
    // A matching DENY would have denied an allowed connection.
    for (const policy of dryRunPolicies) {
      if (policy.action === "DENY" && matches(policy)) effects.push({ policy: policy.uid, decision: "deny" });
    }
    // With no enforced ALLOW policy, dry-run ALLOW policies would have denied a connection none of them matches.
    if (effects.length === 0 && outcome.reason === "no_policy" && dryRunAllows.length > 0 && !dryRunAllows.some(matches)) {
      for (const policy of dryRunAllows) effects.push({ policy: policy.uid, decision: "deny" });
    }
    return effects;
  }

  // A matching ALLOW would have allowed a connection that no enforced ALLOW matched.
  if (outcome.reason === "no_allow_match") {
    for (const policy of dryRunAllows) {
      if (matches(policy)) effects.push({ policy: policy.uid, decision: "allow" });
    }
  }
  return effects;
}

function matchContextOf(connection: RbacConnection): MatchContext {
  const identity = connection.sourceIdentity;
  return {
    identity,
    principal: identity && `${identity.trustDomain}/ns/${identity.namespace}/sa/${identity.serviceAccount}`,
    sourceIp: connection.sourceIp,
    destinationIp: connection.destinationIp,
    destinationPort: connection.destinationPort,
  };
}
