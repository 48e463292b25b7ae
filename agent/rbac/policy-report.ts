// Reports on every AuthorizationPolicy and PeerAuthentication of a mesh state: how each one is
// enforced, what the manifest reader rejected, and the messages the agent logs about them. Pure:
// no I/O.

import type { ManifestProblem } from "../discovery/manifest-problem";
import type { MeshState } from "../state/mesh-state";
import type { AuthorizationPolicy, Labels, MtlsMode, PeerAuthentication } from "../state/types";
import { peerAuthenticationWarnings } from "./peer-authentication";
import { policyStatus } from "./warnings";

/** A PeerAuthentication as the reports show it, with the warnings about its modes. */
export interface PeerAuthenticationRef {
  uid: string;
  mode: MtlsMode;
  portLevelMtls: Readonly<Record<number, MtlsMode>>;
  warnings: string[];
  file: string;
}

export function peerAuthenticationRef(policy: PeerAuthentication): PeerAuthenticationRef {
  return { uid: policy.uid, mode: policy.mode, portLevelMtls: policy.portLevelMtls, warnings: peerAuthenticationWarnings(policy), file: policy.source.file };
}

export interface AuthorizationPolicyStatus {
  uid: string;
  action: AuthorizationPolicy["action"];
  selector?: Labels;
  status: "enforced" | "dry-run" | "rejected";
  message?: string;
  warnings: string[];
  rules: number;
  file: string;
}

export interface PeerAuthenticationStatus extends PeerAuthenticationRef {
  selector?: Labels;
  /** enforced: applied as written; partial: applied with the changes its warnings name. */
  status: "enforced" | "partial";
}

/** A policy that the manifest reader rejected, or a file problem that may hide policies. */
export interface RejectedPolicy {
  /** "AuthorizationPolicy" or "PeerAuthentication"; absent when the problem's object kind is unknown. */
  kind?: "AuthorizationPolicy" | "PeerAuthentication";
  /** The object as the problem names it: "AuthorizationPolicy demo/x", or "document 2" when unknown. */
  object: string;
  file: string;
  line?: number;
  field: string;
  message: string;
  /** Whether a last valid version of the object still serves, because the state contains an object of that key. */
  lastValidServing: boolean;
}

export interface PolicyStatusReport {
  authorizationPolicies: AuthorizationPolicyStatus[];
  peerAuthentications: PeerAuthenticationStatus[];
  rejected: RejectedPolicy[];
}

/**
 * Lists every AuthorizationPolicy and PeerAuthentication with how it is enforced, and the manifest
 * problems that rejected objects of those kinds or whole documents of unknown kind.
 */
export function policyStatuses(state: MeshState, problems: readonly ManifestProblem[]): PolicyStatusReport {
  const byUid = <T extends { uid: string }>(a: T, b: T) => (a.uid < b.uid ? -1 : a.uid > b.uid ? 1 : 0);
  const authorizationPolicies = [...state.snapshot.authorizationPolicies.values()].sort(byUid).map((policy) => {
    const status = policyStatus(policy);
    return {
      uid: policy.uid,
      action: policy.action,
      ...(policy.selector !== undefined && { selector: policy.selector }),
      status: status.state,
      ...(status.message !== undefined && { message: status.message }),
      warnings: status.warnings,
      rules: policy.rules?.length ?? 0,
      file: policy.source.file,
    };
  });
  const peerAuthentications = [...state.snapshot.peerAuthentications.values()].sort(byUid).map((policy) => {
    const ref = peerAuthenticationRef(policy);
    return { ...ref, ...(policy.selector !== undefined && { selector: policy.selector }), status: ref.warnings.length > 0 ? ("partial" as const) : ("enforced" as const) };
  });
  const rejected = problems.flatMap((problem) => rejectedPolicy(state, problem));
  return { authorizationPolicies, peerAuthentications, rejected };
}

function rejectedPolicy(state: MeshState, problem: ManifestProblem): RejectedPolicy[] {
  const base = { object: problem.object, file: problem.file, ...(problem.line !== undefined && { line: problem.line }), field: problem.field, message: problem.message };
  for (const kind of ["AuthorizationPolicy", "PeerAuthentication"] as const) {
    if (!problem.object.startsWith(`${kind} `)) continue;
    const uid = problem.object.slice(kind.length + 1);
    const map = kind === "AuthorizationPolicy" ? state.snapshot.authorizationPolicies : state.snapshot.peerAuthentications;
    return [{ kind, ...base, lastValidServing: map.has(uid) }];
  }
  // A document whose kind is unknown (a syntax error, a missing kind) may be a policy.
  if (problem.object.startsWith("document ")) return [{ ...base, lastValidServing: false }];
  return [];
}

/** A warning or rejection message about one policy, for the agent's log. */
export interface PolicyMessage {
  kind: "AuthorizationPolicy" | "PeerAuthentication";
  policy: string;
  file: string;
  message: string;
}

/** Lists the rejection messages and warnings of every policy of the state, for logging when a state is applied. */
export function policyMessages(state: MeshState): PolicyMessage[] {
  const messages: PolicyMessage[] = [];
  for (const policy of state.snapshot.authorizationPolicies.values()) {
    const status = policyStatus(policy);
    const base = { kind: "AuthorizationPolicy" as const, policy: policy.uid, file: policy.source.file };
    if (status.message !== undefined) messages.push({ ...base, message: status.message });
    for (const warning of status.warnings) messages.push({ ...base, message: warning });
  }
  for (const policy of state.snapshot.peerAuthentications.values()) {
    for (const warning of peerAuthenticationWarnings(policy)) {
      messages.push({ kind: "PeerAuthentication", policy: policy.uid, file: policy.source.file, message: warning });
    }
  }
  return messages;
}
