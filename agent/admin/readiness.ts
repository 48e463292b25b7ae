// The node's readiness for /healthz/ready and agentctl status: configuration read (from the API
// server, every resource listed once), capture attached, a usable certificate for every identity
// of the enrolled pods, and with a CNI folder the plugin chained. The body also carries the state
// of each Kubernetes API watch.

import type { KubeHealth } from "../discovery/kube-source";
import type { CertificateStatus } from "../identity/cert-manager";
import { TextResponse } from "./server";

export interface ReadinessInputs {
  configurationRead: boolean;
  kubernetes?: KubeHealth;
  captureAttached: boolean;
  enrolmentRunning: boolean;
  certificates: readonly CertificateStatus[];
  /** The CNI plugin's chaining, when the agent runs with a CNI configuration folder. */
  cni?: { chained: boolean; file?: string; outcome: string };
  enrolled: number;
  stopping: boolean;
}

/** The readiness checks by name, and whether the node is ready: every check passes and the agent is not stopping. */
export interface Readiness {
  ready: boolean;
  checks: Record<string, boolean>;
}

/** Computes the readiness checks that /healthz/ready and /status report. */
export function readinessChecks(inputs: ReadinessInputs): Readiness {
  const kube = inputs.kubernetes;
  const checks: Record<string, boolean> = {
    configuration: inputs.configurationRead && (kube === undefined || kube.synced),
    capture: inputs.captureAttached,
    enrolment: inputs.enrolmentRunning,
    // A certificate being refreshed still serves.
    certificates: inputs.certificates.every((certificate) => certificate.state === "valid" || certificate.state === "refreshing"),
    // New pods start uncaptured while the plugin is missing from the runtime's configuration.
    ...(inputs.cni && { cni: inputs.cni.chained }),
  };
  return { ready: Object.values(checks).every(Boolean) && !inputs.stopping, checks };
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
    enrolled: inputs.enrolled,
  };
  return new TextResponse("application/json", JSON.stringify(body, null, 2) + "\n", ready ? 200 : 503);
}
