// The mutual TLS requirement that PeerAuthentication sets for one port of a workload, as ambient
// enforces it. Only STRICT changes a decision: it denies connections without a peer identity
// (plaintext to port 15006). DISABLE cannot be honoured by a mesh that always tunnels with mutual
// TLS, so it counts as PERMISSIVE, as in Istio's ambient mode.

import { DEFAULT_ROOT_NAMESPACE, type MeshState, type PeerAuthenticationScopes } from "../state/mesh-state";
import type { PeerAuthentication, Workload } from "../state/types";

export type { PeerAuthenticationScopes } from "../state/mesh-state";

export type MtlsScope = "mesh" | "namespace" | "workload" | "port";

export interface MtlsRequirement {
  mode: "STRICT" | "PERMISSIVE";
  /** "namespace/name" of the PeerAuthentication that set the mode; absent when none did. */
  policy?: string;
  /** The scope of that policy; "port" for a portLevelMtls entry. */
  scope?: MtlsScope;
}

/**
 * Returns the requirement for connections to `port` (a workload port). Each scope overrides the
 * one above it unless its mode is UNSET: mesh, namespace, workload, then the workload policy's
 * portLevelMtls entry for the port. Nothing set means PERMISSIVE.
 */
export function mtlsRequirement(scopes: PeerAuthenticationScopes, port: number): MtlsRequirement {
  let requirement: MtlsRequirement = { mode: "PERMISSIVE" };
  for (const scope of ["mesh", "namespace", "workload"] as const) {
    const policy = scopes[scope];
    if (policy !== undefined && policy.mode !== "UNSET") requirement = { mode: effective(policy.mode), policy: policy.uid, scope };
  }
  const portMode = scopes.workload?.portLevelMtls[port];
  if (portMode !== undefined && portMode !== "UNSET") {
    requirement = { mode: effective(portMode), policy: scopes.workload!.uid, scope: "port" };
  }
  return requirement;
}

/** Returns the mutual TLS requirement for connections to `port` (a workload port) of a workload of `state`. */
export function mtlsFor(state: MeshState, workload: Workload, port: number, rootNamespace = DEFAULT_ROOT_NAMESPACE): MtlsRequirement {
  return mtlsRequirement(state.peerAuthenticationsFor(workload, rootNamespace), port);
}

function effective(mode: PeerAuthentication["mode"]): MtlsRequirement["mode"] {
  return mode === "STRICT" ? "STRICT" : "PERMISSIVE";
}

/** Returns one message per part of the policy that ambient does not enforce as written. */
export function peerAuthenticationWarnings(policy: PeerAuthentication): string[] {
  const warnings: string[] = [];
  if (policy.mode === "DISABLE") {
    warnings.push(`PeerAuthentication ${policy.uid}: spec.mtls.mode DISABLE is treated as PERMISSIVE; the mesh always uses mutual TLS between enrolled pods and cannot turn it off`);
  }
  for (const [port, mode] of Object.entries(policy.portLevelMtls)) {
    if (mode === "DISABLE") {
      warnings.push(`PeerAuthentication ${policy.uid}: spec.portLevelMtls.${port}.mode DISABLE is treated as PERMISSIVE; the mesh always uses mutual TLS between enrolled pods and cannot turn it off`);
    }
  }
  return warnings;
}
