// L4 authorization of one inbound connection with Istio's precedence as ztunnel enforces it:
// 1. a STRICT PeerAuthentication denies a connection without a peer identity;
// 2. any matching DENY policy denies;
// 3. with no ALLOW policy for the workload, the connection is allowed;
// 4. a matching ALLOW policy allows, and otherwise the connection is denied.
// Dry-run policies are evaluated next to the enforced ones and reported, never enforced.
// Pure: no I/O and no clock, so the proxies and `agentctl authz` get the same result.

import type { EnrollmentSettings } from "../enroll/enrollment";
import { DEFAULT_ROOT_NAMESPACE, type MeshState } from "../state/mesh-state";
import type { AuthorizationPolicy, Workload } from "../state/types";
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

/** The settings authorization needs besides the mesh state: the root namespace and the trust domains. */
export interface AuthorizationSettings extends AuthorizeOptions {
  /** Namespace whose policies apply mesh-wide; default istio-system. */
  rootNamespace?: string;
  /** The enrolment rules, for the diagnostics that show whether a pod is protected; default DEFAULT_ENROLLMENT_SETTINGS. */
  enrollment?: EnrollmentSettings;
}

/** The authorizers of each workload of each mesh state, built on first use with the settings of `key`. */
const authorizers = new WeakMap<MeshState, WeakMap<Workload, { key: string; authorizer: WorkloadAuthorizer }>>();

/**
 * Returns the compiled AuthorizationPolicies and PeerAuthentications of a workload of `state`.
 * The first call per state and workload compiles them; later calls with the same settings reuse them.
 */
export function authorizerFor(state: MeshState, workload: Workload, settings: AuthorizationSettings = {}): WorkloadAuthorizer {
  const rootNamespace = settings.rootNamespace ?? DEFAULT_ROOT_NAMESPACE;
  const key = [rootNamespace, settings.trustDomain ?? "", ...(settings.trustDomainAliases ?? [])].join(" ");
  let byWorkload = authorizers.get(state);
  if (byWorkload === undefined) {
    byWorkload = new WeakMap();
    authorizers.set(state, byWorkload);
  }
  const cached = byWorkload.get(workload);
  if (cached !== undefined && cached.key === key) return cached.authorizer;
  const authorizer = new WorkloadAuthorizer(
    { policies: state.policiesForWorkload(workload, rootNamespace), peerAuthentications: state.peerAuthenticationsFor(workload, rootNamespace) },
    settings,
  );
  byWorkload.set(workload, { key, authorizer });
  return authorizer;
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
  /** The policy's place in uid order among the policies of its kind, so merged lists keep that order. */
  position: number;
}

/**
 * The candidates of one kind for one peer identity. `shared` contains the policies whose rules name
 * no identity, the same for every peer, and `own` those that this peer's identity lets through. Both
 * are in uid order, and a decision walks them merged in that order.
 */
interface CandidateList {
  shared: readonly Candidate[];
  own: readonly Candidate[];
}

/** The candidates of each kind for one peer identity. */
interface Candidates {
  deny: CandidateList;
  allow: CandidateList;
  dryRunDeny: CandidateList;
  dryRunAllow: CandidateList;
}

type Kind = keyof Candidates;
const KINDS: readonly Kind[] = ["deny", "allow", "dryRunDeny", "dryRunAllow"];

/**
 * Bounds on the identity-specific candidates kept per workload: the peer identities, and the
 * candidates over all of them. Past either, they are dropped and built again as connections arrive.
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
  readonly #all: Record<Kind, Candidate[]> = { deny: [], allow: [], dryRunDeny: [], dryRunAllow: [] };
  /** The policies of each kind whose rules name no identity. */
  readonly #shared: Record<Kind, Candidate[]> = { deny: [], allow: [], dryRunDeny: [], dryRunAllow: [] };
  readonly #peerAuthentications: PeerAuthenticationScopes;
  /**
   * The identity-specific candidates by peer principal (empty for plaintext). Only these and the
   * shared ones can match, so a decision walks these alone. Keys are identities, never ports: a
   * client that tries many ports adds no entry.
   */
  readonly #candidates = new Map<string, Candidates>();
  #candidateEntries = 0;

  constructor(policies: WorkloadPolicies, options: AuthorizeOptions = {}) {
    const trustDomains: TrustDomains = { trustDomain: options.trustDomain, aliases: options.trustDomainAliases };
    for (const policy of policies.policies) {
      if (policy.action !== "ALLOW" && policy.action !== "DENY") continue;
      const kind = kindOf(policy);
      const { rules } = compilePolicy(policy, trustDomains);
      const candidate = { policy, rules, position: this.#all[kind].length };
      this.#all[kind].push(candidate);
      if (rules.every((rule) => rule.prefilter.identities === undefined)) this.#shared[kind].push(candidate);
    }
    this.#peerAuthentications = policies.peerAuthentications ?? {};
  }

  /** Counts the peer identities with candidate lists kept now, and their identity-specific candidates. */
  candidateCacheSize(): { identities: number; entries: number } {
    return { identities: this.#candidates.size, entries: this.#candidateEntries };
  }

  /** Returns the mutual TLS requirement for a workload port. */
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
      const own = (kind: Kind): CandidateList => ({ shared: this.#shared[kind], own: passing(this.#all[kind], context) });
      const built: Candidates = { deny: own("deny"), allow: own("allow"), dryRunDeny: own("dryRunDeny"), dryRunAllow: own("dryRunAllow") };
      const entries = KINDS.reduce((sum, kind) => sum + built[kind].own.length, 0);
      if (this.#candidates.size >= MAX_CANDIDATE_KEYS || this.#candidateEntries + entries > MAX_CANDIDATE_ENTRIES) {
        this.#candidates.clear();
        this.#candidateEntries = 0;
      }
      this.#candidates.set(key, built);
      this.#candidateEntries += entries;
      candidates = built;
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
      forEachInOrder(candidates.dryRunDeny, (candidate) => {
        const rule = matchingRuleOf(candidate.rules, context);
        if (rule >= 0) effects.push({ policy: candidate.policy.uid, rule, decision: "deny" });
        return false;
      });
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
      forEachInOrder(candidates.dryRunAllow, (candidate) => {
        const rule = matchingRuleOf(candidate.rules, context);
        if (rule >= 0) effects.push({ policy: candidate.policy.uid, rule, decision: "allow" });
        return false;
      });
    }
    return effects;
  }
}

/** Returns the candidate list that an ALLOW or DENY policy belongs to. */
function kindOf(policy: AuthorizationPolicy): Kind {
  if (policy.dryRun) return policy.action === "DENY" ? "dryRunDeny" : "dryRunAllow";
  return policy.action === "DENY" ? "deny" : "allow";
}

/**
 * Returns the candidates of `list` that name an identity, each with those of its rules whose
 * identity prefilter the connection passes. The shared candidates, whose rules name none, are left
 * out: they stay in the CandidateList's shared part.
 */
function passing(list: readonly Candidate[], context: MatchContext): Candidate[] {
  const result: Candidate[] = [];
  for (const candidate of list) {
    if (candidate.rules.every((rule) => rule.prefilter.identities === undefined)) continue;
    const rules = candidate.rules.filter((rule) => mayMatchIdentity(rule.prefilter, context));
    if (rules.length === candidate.rules.length) result.push(candidate);
    else if (rules.length > 0) result.push({ policy: candidate.policy, rules, position: candidate.position });
  }
  return result;
}

/**
 * Calls `visit` with the candidates of both parts of `list` in uid order, until it returns true.
 * Returns the candidate it stopped at.
 */
function forEachInOrder(list: CandidateList, visit: (candidate: Candidate) => boolean): Candidate | undefined {
  const { shared, own } = list;
  let next = 0;
  let nextOwn = 0;
  while (next < shared.length || nextOwn < own.length) {
    const takeShared = nextOwn >= own.length || (next < shared.length && shared[next].position < own[nextOwn].position);
    const candidate = takeShared ? shared[next++] : own[nextOwn++];
    if (visit(candidate)) return candidate;
  }
  return undefined;
}

/**
 * Returns the first policy of `list` with a matching rule, and that rule's index. It merges the two
 * parts inline, as forEachInOrder does, without a callback per candidate, because it runs for every
 * connection.
 */
function firstMatch(list: CandidateList, context: MatchContext): { policy: AuthorizationPolicy; rule: number } | undefined {
  const { shared, own } = list;
  let next = 0;
  let nextOwn = 0;
  while (next < shared.length || nextOwn < own.length) {
    const takeShared = nextOwn >= own.length || (next < shared.length && shared[next].position < own[nextOwn].position);
    const candidate = takeShared ? shared[next++] : own[nextOwn++];
    const rule = matchingRuleOf(candidate.rules, context);
    if (rule >= 0) return { policy: candidate.policy, rule };
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
    sourceIpUnknown: connection.sourceIpUnknown === true,
    destinationIp: connection.destinationIp,
    destinationPort: connection.destinationPort,
    sourceAddress: undefined,
    destinationAddress: undefined,
  };
}
