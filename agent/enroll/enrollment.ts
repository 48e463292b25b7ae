// Enrollment rules: the workloads that run in ambient mode. These are pure functions of the mesh
// state, so the reconciler can compute the wanted set on every change and act only on the difference.

import type { MeshState } from "../state/mesh-state";
import type { Workload } from "../state/types";

export const DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode";
export const DATAPLANE_MODE_AMBIENT = "ambient";
export const DATAPLANE_MODE_NONE = "none";

export interface EnrollmentDiff {
  added: Workload[];
  removed: Workload[];
  /** Same uid, new IP or service account: the proxies must be rebuilt for the new address or identity. */
  changed: { before: Workload; after: Workload }[];
}

/**
 * Tells whether a workload is in ambient mode: its namespace is labelled
 * istio.io/dataplane-mode=ambient, the pod is not labelled istio.io/dataplane-mode=none, and it
 * does not use the host network (a hostNetwork pod shares the node's network namespace, so
 * capturing it would capture the node).
 */
export function isAmbient(state: MeshState, workload: Workload): boolean {
  if (workload.hostNetwork) return false;
  if (workload.labels[DATAPLANE_MODE_LABEL] === DATAPLANE_MODE_NONE) return false;
  const namespace = state.namespace(workload.namespace);
  return namespace?.labels[DATAPLANE_MODE_LABEL] === DATAPLANE_MODE_AMBIENT;
}

/** Returns the ambient workloads on `nodeName` that have an IP, sorted by uid. */
export function enrolledWorkloads(state: MeshState, nodeName: string): Workload[] {
  return state.workloadsOnNode(nodeName).filter((workload) => workload.ip !== "" && isAmbient(state, workload));
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
