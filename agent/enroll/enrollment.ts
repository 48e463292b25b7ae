// Enrollment rules: the workloads that run in ambient mode. These are pure functions of the mesh
// state, so the reconciler can compute the wanted set on every change and act only on the difference.

import type { MeshState } from "../state/mesh-state";
import { workloadIps } from "../state/ip";
import type { Namespace, Workload } from "../state/types";

export const DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode";
export const DATAPLANE_MODE_AMBIENT = "ambient";
export const DATAPLANE_MODE_NONE = "none";

/** The annotation the Istio sidecar injector sets on every pod it injects. */
export const SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status";

export interface EnrollmentSettings {
  /** Namespaces whose pods never enroll, even when a label requests ambient mode. */
  excludedNamespaces: readonly string[];
}

/** kube-system runs the cluster's own network and DNS pods, which must never depend on the agent. */
export const DEFAULT_ENROLLMENT_SETTINGS: EnrollmentSettings = { excludedNamespaces: ["kube-system"] };

/** The part of the mesh state that the enrollment rules read. MeshState provides it. */
export interface NamespaceLookup {
  namespace(name: string): Namespace | undefined;
}

/**
 * The rule that decided a workload's enrollment, in the order they are checked:
 * - excludedNamespace: the namespace is in the settings' excluded list;
 * - notLabelled: neither the namespace nor the pod is labelled istio.io/dataplane-mode=ambient;
 * - sidecar: the pod carries the sidecar.istio.io/status annotation;
 * - podOptOut: the pod is labelled istio.io/dataplane-mode=none;
 * - hostNetwork: the pod uses the host network;
 * - podLabel, namespaceLabel: enrolled, by the pod's label or else by its namespace's.
 */
export type EnrollmentRule = "excludedNamespace" | "notLabelled" | "sidecar" | "podOptOut" | "hostNetwork" | "podLabel" | "namespaceLabel";

export interface EnrollmentDecision {
  enrolled: boolean;
  /** A short sentence for logs and audit records, such as "namespace kube-system is excluded from ambient mode". */
  reason: string;
  rule: EnrollmentRule;
}

export interface EnrollmentDiff {
  added: Workload[];
  removed: Workload[];
  /** Same uid, new IP or service account: the proxies must be rebuilt for the new address or identity. */
  changed: { before: Workload; after: Workload }[];
}

/**
 * Decides whether a workload is in ambient mode, with the rules of the istio-cni node agent
 * (PodRedirectionEnabled in istio/istio cni/pkg/util/podutil.go), checked in this order:
 * 1. a pod in an excluded namespace never enrolls;
 * 2. the namespace or the pod must be labelled istio.io/dataplane-mode=ambient;
 * 3. a pod with an Istio sidecar (annotation sidecar.istio.io/status, any value) is left to the sidecar;
 * 4. the pod label istio.io/dataplane-mode=none opts out, and wins over the namespace label;
 * 5. a hostNetwork pod shares the node's network namespace, so capturing it would capture the node.
 * The node and the pod IP are not checked here: enrolledWorkloads adds those.
 */
export function enrollmentDecision(
  state: NamespaceLookup,
  workload: Workload,
  settings: EnrollmentSettings = DEFAULT_ENROLLMENT_SETTINGS,
): EnrollmentDecision {
  if (settings.excludedNamespaces.includes(workload.namespace)) {
    return notEnrolled("excludedNamespace", `namespace ${workload.namespace} is excluded from ambient mode`);
  }
  const podMode = workload.labels[DATAPLANE_MODE_LABEL];
  const namespaceMode = state.namespace(workload.namespace)?.labels[DATAPLANE_MODE_LABEL];
  if (podMode !== DATAPLANE_MODE_AMBIENT && namespaceMode !== DATAPLANE_MODE_AMBIENT) {
    return notEnrolled("notLabelled", notLabelledReason(state, workload));
  }
  if (workload.annotations?.[SIDECAR_STATUS_ANNOTATION] !== undefined) {
    return notEnrolled("sidecar", `pod has an Istio sidecar (annotation ${SIDECAR_STATUS_ANNOTATION})`);
  }
  if (podMode === DATAPLANE_MODE_NONE) {
    return notEnrolled("podOptOut", `pod is labelled ${DATAPLANE_MODE_LABEL}=${DATAPLANE_MODE_NONE}`);
  }
  if (workload.hostNetwork) return notEnrolled("hostNetwork", "pod uses the host network");

  if (podMode === DATAPLANE_MODE_AMBIENT) {
    return { enrolled: true, rule: "podLabel", reason: `pod is labelled ${DATAPLANE_MODE_LABEL}=${DATAPLANE_MODE_AMBIENT}` };
  }
  return {
    enrolled: true,
    rule: "namespaceLabel",
    reason: `namespace ${workload.namespace} is labelled ${DATAPLANE_MODE_LABEL}=${DATAPLANE_MODE_AMBIENT}`,
  };
}

/** Tells whether a workload is in ambient mode; enrollmentDecision lists the rules. */
export function isAmbient(
  state: NamespaceLookup,
  workload: Workload,
  settings: EnrollmentSettings = DEFAULT_ENROLLMENT_SETTINGS,
): boolean {
  return enrollmentDecision(state, workload, settings).enrolled;
}

/** Returns the ambient workloads on `nodeName` that have an IP, sorted by uid. */
export function enrolledWorkloads(
  state: MeshState,
  nodeName: string,
  settings: EnrollmentSettings = DEFAULT_ENROLLMENT_SETTINGS,
): Workload[] {
  return state.workloadsOnNode(nodeName).filter((workload) => workload.ip !== "" && isAmbient(state, workload, settings));
}

/**
 * Returns the names of the namespaces labelled istio.io/dataplane-mode=ambient that the settings
 * exclude, sorted. Their pods stay out of the mesh although the label requests ambient mode, so the
 * daemon warns about them.
 */
export function excludedLabelledNamespaces(state: MeshState, settings: EnrollmentSettings = DEFAULT_ENROLLMENT_SETTINGS): string[] {
  return [...state.snapshot.namespaces.values()]
    .filter((namespace) => namespace.labels[DATAPLANE_MODE_LABEL] === DATAPLANE_MODE_AMBIENT)
    .map((namespace) => namespace.name)
    .filter((name) => settings.excludedNamespaces.includes(name))
    .sort();
}

/** Compares two enrolled sets by uid. */
export function diffEnrollment(before: Workload[], after: Workload[]): EnrollmentDiff {
  const beforeByUid = new Map(before.map((workload) => [workload.uid, workload]));
  const afterByUid = new Map(after.map((workload) => [workload.uid, workload]));
  const diff: EnrollmentDiff = { added: [], removed: [], changed: [] };

  for (const workload of after) {
    const previous = beforeByUid.get(workload.uid);
    if (previous === undefined) diff.added.push(workload);
    else if (previous.ip !== workload.ip || previous.serviceAccount !== workload.serviceAccount) {
      diff.changed.push({ before: previous, after: workload });
    }
  }
  for (const workload of before) {
    if (!afterByUid.has(workload.uid)) diff.removed.push(workload);
  }
  return diff;
}

function notEnrolled(rule: EnrollmentRule, reason: string): EnrollmentDecision {
  return { enrolled: false, rule, reason };
}

function notLabelledReason(state: NamespaceLookup, workload: Workload): string {
  const wanted = `${DATAPLANE_MODE_LABEL}=${DATAPLANE_MODE_AMBIENT}`;
  if (state.namespace(workload.namespace) === undefined) {
    return `namespace ${workload.namespace} is not in the mesh state and the pod is not labelled ${wanted}`;
  }
  return `neither namespace ${workload.namespace} nor the pod is labelled ${wanted}`;
}

/** Workloads of one node that claim the same IP, which one network namespace cannot serve twice. */
export interface IpConflict {
  ip: string;
  uids: string[];
}

/**
 * Keeps at most one workload per IP: the one with the lowest `rank`. When several share the lowest
 * rank for an IP, none of them is kept for it, and the conflict is returned. For a while Kubernetes
 * shows a pod being deleted and the pod that got its address with the same IP, so the rank decides
 * which one the namespace of that address serves.
 */
export function onePerIp(workloads: readonly Workload[], rank: (workload: Workload) => number): { kept: Workload[]; conflicts: IpConflict[] } {
  const byIp = new Map<string, Workload[]>();
  for (const workload of workloads) {
    for (const ip of workloadIps(workload)) byIp.set(ip, [...(byIp.get(ip) ?? []), workload]);
  }
  const dropped = new Set<string>();
  const conflicts: IpConflict[] = [];
  for (const [ip, claimants] of byIp) {
    if (claimants.length < 2) continue;
    const best = Math.min(...claimants.map(rank));
    const winners = claimants.filter((workload) => rank(workload) === best);
    for (const workload of claimants) if (winners.length > 1 || workload !== winners[0]) dropped.add(workload.uid);
    if (winners.length > 1) conflicts.push({ ip, uids: winners.map((workload) => workload.uid).sort() });
  }
  return { kept: workloads.filter((workload) => !dropped.has(workload.uid)), conflicts };
}
