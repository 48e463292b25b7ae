import type { Decision, Identity } from "../state/types";

/** The facts of one inbound connection that L4 authorization uses. */
export interface RbacConnection {
  /** The peer identity proven by mTLS; undefined for plaintext connections. */
  sourceIdentity?: Identity;
  sourceIp: string;
  /**
   * Set by diagnostics that know the peer's identity but not its address: every match that checks
   * the source address then fails, its not* forms included. Never set for real connections.
   */
  sourceIpUnknown?: boolean;
  destinationIp: string;
  /** The target (container) port the client asked for. */
  destinationPort: number;
}

/**
 * Why a connection was allowed or denied:
 * - allowed_by_policy: an ALLOW policy matched;
 * - no_policy: no ALLOW policy applies to the workload and no DENY policy matched;
 * - denied_by_policy: a DENY policy matched;
 * - no_allow_match: ALLOW policies apply, and none matched;
 * - mtls_required: a STRICT PeerAuthentication and a connection without a peer identity.
 */
export type AuthorizationReason = "allowed_by_policy" | "no_policy" | "denied_by_policy" | "no_allow_match" | "mtls_required";

export type PolicyKind = "AuthorizationPolicy" | "PeerAuthentication";

/** A dry-run policy that would have changed the outcome, had it been enforced. */
export interface DryRunEffect {
  /** "namespace/name". */
  policy: string;
  /** Index in spec.rules of the rule that matched; absent when the effect comes from no rule matching. */
  rule?: number;
  decision: Decision;
}

export interface AuthorizationResult {
  decision: Decision;
  reason: AuthorizationReason;
  /** "namespace/name" of the policy that decided; absent when the default decided. */
  policy?: string;
  /** The kind of `policy`. */
  policyKind?: PolicyKind;
  /** Index in spec.rules of the rule that matched, for a decision by an AuthorizationPolicy. */
  rule?: number;
  /** Dry-run policies that would have changed the outcome, for the log. */
  dryRun: DryRunEffect[];
}
