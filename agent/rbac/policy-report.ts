// Reports on every AuthorizationPolicy and PeerAuthentication of a mesh state: how each one is
// enforced, what the manifest reader rejected, and the messages the agent logs about them. Pure:
// no I/O.

import type { ManifestProblem } from "../discovery/manifest-problem";
import { DEFAULT_ROOT_NAMESPACE, type MeshState } from "../state/mesh-state";
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
  /**
   * enforced: applied as written; partial: applied with the changes its warnings name; ignored:
   * selects no pod, because it has a selector in the root namespace.
   */
  status: "enforced" | "partial" | "ignored";
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
  /** The first problem's message, when the row stands for several problems of one document. */
  message: string;
  /** Number of manifest problems in this row, because a document with several YAML errors is one row. */
  problems: number;
  /**
   * Whether a last valid version still serves: the state contains an object of that key, or, for a
   * file rejected as a whole for its syntax, objects read from that file before.
   */
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
export function policyStatuses(state: MeshState, problems: readonly ManifestProblem[], rootNamespace = DEFAULT_ROOT_NAMESPACE): PolicyStatusReport {
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
  const peerAuthentications = [...state.snapshot.peerAuthentications.values()].sort(byUid).map((policy) => peerAuthenticationStatus(policy, rootNamespace));
  const rejected = rejectedPolicies(state, problems);
  return { authorizationPolicies, peerAuthentications, rejected };
}

function peerAuthenticationStatus(policy: PeerAuthentication, rootNamespace: string): PeerAuthenticationStatus {
  const ref = peerAuthenticationRef(policy);
  const selector = policy.selector !== undefined && { selector: policy.selector };
  const ignored = ignoredPeerAuthenticationWarning(policy, rootNamespace);
  // The mode warnings of an ignored policy do not matter, because it applies to no pod.
  if (ignored !== undefined) return { ...ref, ...selector, warnings: [ignored], status: "ignored" };
  return { ...ref, ...selector, status: ref.warnings.length > 0 ? "partial" : "enforced" };
}

/**
 * Returns the warning for a PeerAuthentication that selects no pod: as in istiod, a selector in
 * the root namespace matches nothing, so only selector-less root policies apply (mesh-wide).
 */
function ignoredPeerAuthenticationWarning(policy: PeerAuthentication, rootNamespace: string): string | undefined {
  if (policy.namespace !== rootNamespace || Object.keys(policy.selector ?? {}).length === 0) return undefined;
  return `PeerAuthentication ${policy.uid} selects no pod: a selector is ignored in the root namespace ${rootNamespace}; move the policy to the namespace of the pods it is for, or remove spec.selector to make it mesh-wide`;
}

/**
 * Lists one row per rejected object, in problem order. The problems of one document of unknown
 * kind (often several YAML errors) become one row that counts them.
 */
function rejectedPolicies(state: MeshState, problems: readonly ManifestProblem[]): RejectedPolicy[] {
  const rows: RejectedPolicy[] = [];
  const documentRows = new Map<string, RejectedPolicy>();
  for (const problem of problems) {
    const row = rejectedPolicy(state, problem);
    if (row === undefined) continue;
    if (row.kind !== undefined) {
      rows.push(row);
      continue;
    }
    const key = `${problem.file}\n${problem.object}`;
    const earlier = documentRows.get(key);
    if (earlier !== undefined) {
      earlier.problems++;
      continue;
    }
    documentRows.set(key, row);
    rows.push(row);
  }
  return rows;
}

/** Returns the policy kind and "namespace/name" that a problem's object names, or undefined for other objects. */
export function problemPolicy(problem: Pick<ManifestProblem, "object">): { kind: "AuthorizationPolicy" | "PeerAuthentication"; uid: string } | undefined {
  for (const kind of ["AuthorizationPolicy", "PeerAuthentication"] as const) {
    if (problem.object.startsWith(`${kind} `)) return { kind, uid: problem.object.slice(kind.length + 1) };
  }
  return undefined;
}

function rejectedPolicy(state: MeshState, problem: ManifestProblem): RejectedPolicy | undefined {
  const base = { object: problem.object, file: problem.file, ...(problem.line !== undefined && { line: problem.line }), field: problem.field, message: problem.message, problems: 1 };
  const policy = problemPolicy(problem);
  if (policy !== undefined) {
    const map = policy.kind === "AuthorizationPolicy" ? state.snapshot.authorizationPolicies : state.snapshot.peerAuthentications;
    return { kind: policy.kind, ...base, lastValidServing: map.has(policy.uid) };
  }
  // A document whose kind is unknown (a syntax error, a missing kind) may be a policy.
  if (problem.object.startsWith("document ")) return { ...base, lastValidServing: rejectsWholeFile(problem) && hasObjectsFrom(state, problem.file) };
  return undefined;
}

/**
 * Returns whether the problem rejected its whole file, so the manifest reader keeps serving the
 * objects it read from that file before. Other document problems drop that document alone.
 */
function rejectsWholeFile(problem: ManifestProblem): boolean {
  return problem.wholeFile === true;
}

function hasObjectsFrom(state: MeshState, file: string): boolean {
  const { namespaces, workloads, services, authorizationPolicies, peerAuthentications } = state.snapshot;
  const maps: ReadonlyMap<string, { source: { file: string } }>[] = [namespaces, workloads, services, authorizationPolicies, peerAuthentications];
  return maps.some((map) => [...map.values()].some((object) => object.source.file === file));
}

/** A warning or rejection message about one policy, for the agent's log. */
export interface PolicyMessage {
  kind: "AuthorizationPolicy" | "PeerAuthentication";
  policy: string;
  file: string;
  message: string;
}

/** Lists the rejection messages and warnings of every policy of the state, for logging when a state is applied. */
export function policyMessages(state: MeshState, rootNamespace = DEFAULT_ROOT_NAMESPACE): PolicyMessage[] {
  const messages: PolicyMessage[] = [];
  for (const policy of state.snapshot.authorizationPolicies.values()) {
    const status = policyStatus(policy);
    const base = { kind: "AuthorizationPolicy" as const, policy: policy.uid, file: policy.source.file };
    if (status.message !== undefined) messages.push({ ...base, message: status.message });
    for (const warning of status.warnings) messages.push({ ...base, message: warning });
  }
  for (const policy of state.snapshot.peerAuthentications.values()) {
    for (const warning of peerAuthenticationStatus(policy, rootNamespace).warnings) {
      messages.push({ kind: "PeerAuthentication", policy: policy.uid, file: policy.source.file, message: warning });
    }
  }
  return messages;
}
