import type { Decision, Identity } from "../state/types";

/** The facts of one inbound connection that L4 authorization uses. */
export interface RbacConnection {
  /** The peer identity proven by mTLS; undefined for plaintext connections. */
  sourceIdentity?: Identity;
  sourceIp: string;
  destinationIp: string;
  /** The target (container) port the client asked for. */
  destinationPort: number;
}

export interface AuthorizationResult {
  decision: Decision;
  /** "namespace/name" of the policy that decided; absent when the default decided. */
  policy?: string;
  /** allowed_by_policy | no_policy | denied_by_policy | no_allow_match */
  reason: "allowed_by_policy" | "no_policy" | "denied_by_policy" | "no_allow_match";
  /** Dry-run policies that would have changed the outcome, for the log. */
  dryRun: { policy: string; decision: Decision }[];
}
