// The node's readiness for /healthz/ready and agentctl status: configuration read (from the API
// server, every resource listed once), capture attached, enrolment running, a usable certificate
// for every identity of the pods to enrol, with a CNI folder the plugin chained, and with
// --probe-snat the probe SNAT table in place, without which kubelet probes of enrolled pods are
// captured and refused under STRICT mTLS. The body also carries the pods not served yet and the
// state of each Kubernetes API watch.

import type { KubeHealth } from "../discovery/kube-source";
import type { CertificateStatus } from "../identity/cert-manager";
import type { ProbeSnatStatus } from "../capture/nft/probe-snat";
import { TextResponse } from "./server";

/** Pods named in the readiness body's `pending` list at most. */
const PENDING_LISTED = 20;

export interface ReadinessInputs {
  configurationRead: boolean;
  kubernetes?: KubeHealth;
  captureAttached: boolean;
  enrolmentRunning: boolean;
  /** Pods of this node to enrol that are not served yet, by uid. */
  pending: readonly string[];
  certificates: readonly CertificateStatus[];
  /** The CNI plugin's chaining, when the agent runs with a CNI configuration folder. */
  cni?: { chained: boolean; file?: string; outcome: string };
  /** The probe SNAT table, when the agent runs with --probe-snat. */
  probeSnat?: ProbeSnatStatus;
  enrolled: number;
  stopping: boolean;
}

/** The readiness checks by name, and whether the node is ready: every check passes and the agent is not stopping. */
export interface Readiness {
  ready: boolean;
  checks: Record<string, boolean>;
}

/** Computes the readiness checks that /healthz/ready and /status report. */
export function readinessChecks(inputs: ReadinessInputs, now = Date.now()): Readiness {
  const kube = inputs.kubernetes;
  const checks: Record<string, boolean> = {
    configuration: inputs.configurationRead && (kube === undefined || kube.synced),
    capture: inputs.captureAttached,
    // Pods still waited for are listed but do not make the node unready: one pod whose namespace
    // never appears would otherwise hold back every rolling update. Their certificates are
    // requested before their listeners start, so a failing CA shows in the certificates check.
    enrolment: inputs.enrolmentRunning,
    certificates: inputs.certificates.every((certificate) => servesUntilExpiry(certificate, now)),
    // New pods start uncaptured while the plugin is missing from the runtime's configuration.
    ...(inputs.cni && { cni: inputs.cni.chained }),
    // Enrolment goes on without the table, but the kubelet's probes of enrolled pods then fail.
    ...(inputs.probeSnat && { probeSnat: inputs.probeSnat.installed }),
  };
  return { ready: Object.values(checks).every(Boolean) && !inputs.stopping, checks };
}

/**
 * Tells whether a certificate serves its pods: valid, being renewed, or still valid while its
 * renewals fail (the CA may come back before it expires).
 */
function servesUntilExpiry(certificate: CertificateStatus, now: number): boolean {
  if (certificate.state === "valid" || certificate.state === "refreshing") return true;
  return certificate.state === "failing" && certificate.notAfter !== undefined && Date.parse(certificate.notAfter) > now;
}

/** Builds the readiness response: 200 when every check passes, 503 otherwise, with a JSON body either way. */
export function readinessResponse(inputs: ReadinessInputs): TextResponse {
  const kube = inputs.kubernetes;
  const { ready, checks } = readinessChecks(inputs);
  const body = {
    ready,
    checks,
    kubernetes: kube && { server: kube.server, synced: kube.synced, watching: kube.watching, resources: kube.resources },
    cni: inputs.cni,
    probeSnat: inputs.probeSnat,
    enrolled: inputs.enrolled,
    ...(inputs.stopping && { stopping: true }),
    // Capped, so that a node with thousands of pods not served yet keeps a small response.
    pending: inputs.pending.slice(0, PENDING_LISTED),
    ...(inputs.pending.length > PENDING_LISTED && { pendingTotal: inputs.pending.length }),
  };
  return new TextResponse("application/json", JSON.stringify(body, null, 2) + "\n", ready ? 200 : 503);
}
