// agentctl status: whether the node's agent is ready, and the state of each of its Kubernetes API
// watches, from the admin API's /healthz/ready, and the node summary from /status.

import type { CertificateView, StatusView } from "../admin/views";
import { adminList, adminRequest, adminView, bodyExcerpt, notAnAgentError, RouteNotFoundError } from "./admin-client";
import { formatStatusView, readinessLines } from "./inspect-output";
import { formatTable } from "./output";
import { CERTIFICATE_SHAPE, READINESS_KUBERNETES_SHAPE, READINESS_SHAPE, shapeProblem, STATUS_CAPTURE_SHAPE, STATUS_SHAPE } from "./view-shapes";

interface ResourceHealth {
  resource: string;
  synced: boolean;
  watching: boolean;
  absent: boolean;
  resourceVersion: string;
  lastError?: string;
  lastErrorTime?: string;
  lastEventTime?: string;
  lists: number;
  watches: number;
  expired: number;
}

export interface Readiness {
  ready: boolean;
  checks: Record<string, boolean>;
  enrolled: number;
  kubernetes?: { server: string; synced: boolean; watching: boolean; resources: ResourceHealth[] };
  cni?: { chained: boolean; file?: string; outcome: string };
  /** The probe SNAT table (--probe-snat), absent without it. */
  probeSnat?: { installed: boolean; table: string; netns: string; sources: string[]; pods: { ipv4: number; ipv6: number }; error?: string };
  /** Pods of the node to enrol that are not served yet (the first 20), and their number when there are more. */
  pending?: string[];
  pendingTotal?: number;
  /** True once the agent has begun to shut down: it drains its connections and exits. */
  stopping?: boolean;
}

/**
 * Reads /healthz/ready, which responds with 200 when ready and 503 when not, both with a JSON body.
 * Any other response comes from a server that is no agent.
 */
export async function fetchReadiness(address: string): Promise<Readiness> {
  const requestPath = "/healthz/ready";
  const { status, text } = await adminRequest(address, "GET", requestPath);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw notAnAgentError(address, "GET", requestPath, `status ${status} and no JSON: ${bodyExcerpt(text)}`);
  }
  if (status !== 200 && status !== 503) throw notAnAgentError(address, "GET", requestPath, `status ${status}`);
  const problem = shapeProblem(body, READINESS_SHAPE) ?? nestedProblem(body, "kubernetes", READINESS_KUBERNETES_SHAPE);
  if (problem !== undefined) throw notAnAgentError(address, "GET", requestPath, problem);
  return body as Readiness;
}

/** Checks the optional object field `field` of `body` against `shape`. */
function nestedProblem(body: unknown, field: string, shape: Parameters<typeof shapeProblem>[1]): string | undefined {
  const value = (body as Record<string, unknown>)[field];
  return value === undefined ? undefined : shapeProblem(value, shape, field);
}

/** Returns the LISTED column: "absent" for a resource the server does not serve. */
function listedColumn(resource: ResourceHealth): string {
  if (resource.absent) return "absent";
  return resource.synced ? "yes" : "no";
}

/** Formats the readiness as text: the checks, then one line per watched resource. */
export function formatReadiness(readiness: Readiness): string {
  const lines = readinessLines(readiness.ready, readiness.checks);
  lines.push(`enrolled pods: ${readiness.enrolled}`);
  return lines.join("\n") + "\n" + formatWatches(readiness);
}

/** Formats the CNI plugin's state and the Kubernetes API watches, one line per watched resource. */
export function formatWatches(readiness: Readiness): string {
  const lines: string[] = [];
  const pending = readiness.pending ?? [];
  if (pending.length > 0) {
    const more = (readiness.pendingTotal ?? pending.length) - pending.length;
    lines.push(`waiting for pods: ${pending.join(", ")}${more > 0 ? ` and ${more} more` : ""} (their logs under "enroll" say why)`);
  }
  if (readiness.cni !== undefined) {
    lines.push(readiness.cni.chained ? `cni plugin: chained into ${readiness.cni.file}` : `cni plugin: not chained (${readiness.cni.outcome}): new pods start without waiting for capture`);
  }
  if (readiness.probeSnat !== undefined) lines.push(probeSnatLine(readiness.probeSnat));
  const kube = readiness.kubernetes;
  if (kube === undefined) {
    lines.push("configuration source: manifest files");
    return lines.join("\n") + "\n";
  }
  let watching = "watching";
  if (!kube.watching) watching = kube.synced ? "not watching: serving the last state read" : "not watching";
  lines.push(`kubernetes: ${kube.server} (${kube.synced ? "listed" : "not listed yet: no pod is enrolled until every resource is"}, ${watching})`);
  const rows = kube.resources.map((resource) => [
    resource.resource,
    listedColumn(resource),
    resource.watching ? "yes" : "no",
    resource.resourceVersion || "-",
    String(resource.lists),
    String(resource.expired),
    resource.lastError ? `${resource.lastErrorTime ?? ""} ${resource.lastError}`.trim() : "-",
  ]);
  lines.push(formatTable(["RESOURCE", "LISTED", "WATCHING", "VERSION", "LISTS", "EXPIRED", "LAST ERROR"], rows, "  ").trimEnd());
  return lines.join("\n") + "\n";
}

/** Formats the probe SNAT table's line: where it is and how many pod addresses it has, or why it is missing. */
function probeSnatLine(probeSnat: NonNullable<Readiness["probeSnat"]>): string {
  const where = `table ${probeSnat.table} in ${probeSnat.netns}`;
  if (!probeSnat.installed) {
    return `probe snat: ${where} not in place (${probeSnat.error ?? "not written yet"}): kubelet probes of enrolled pods come from the node's address and are captured`;
  }
  return `probe snat: ${where}, to ${probeSnat.sources.join(" and ")}, for ${probeSnat.pods.ipv4} IPv4 and ${probeSnat.pods.ipv6} IPv6 pod addresses`;
}

/** The output of `agentctl status`: the /status view when the agent serves it, and the readiness. */
export interface StatusReport {
  status?: StatusView;
  readiness: Readiness;
  /** The identities whose certificate is not valid (pending, failing, expired), from /certificates. */
  unhealthyCertificates?: CertificateView[];
}

/** Certificate states that agentctl status lists one by one. */
const UNHEALTHY_CERTIFICATE_STATES: readonly string[] = ["failing", "expired", "pending"];

/**
 * Reads /status and /healthz/ready together, then /certificates when /status counts certificates
 * that are not valid. An agent without /status (status 404: older than agentctl) gives a report
 * with the readiness alone.
 */
export async function fetchStatusReport(address: string): Promise<StatusReport> {
  const [status, readiness] = await Promise.all([
    adminView<StatusView>(address, "/status", STATUS_SHAPE).catch((error: unknown) => {
      if (error instanceof RouteNotFoundError) return undefined;
      throw error;
    }),
    fetchReadiness(address),
  ]);
  const captureProblem = status === undefined ? undefined : nestedProblem(status, "capture", STATUS_CAPTURE_SHAPE);
  if (captureProblem !== undefined) throw notAnAgentError(address, "GET", "/status", captureProblem);
  const report: StatusReport = { status, readiness };
  const counts = status?.certificates;
  if (counts !== undefined && counts.failing + counts.expired + counts.pending > 0) {
    const certificates = await adminList<CertificateView>(address, "/certificates", "certificates", CERTIFICATE_SHAPE).catch((error: unknown) => {
      if (error instanceof RouteNotFoundError) return [];
      throw error;
    });
    report.unhealthyCertificates = certificates.filter((certificate) => UNHEALTHY_CERTIFICATE_STATES.includes(certificate.state));
  }
  return report;
}

/**
 * Returns the report as one JSON object: the readiness body, with the /status fields over it.
 * Both have ready, checks and enrolled; the readiness alone has kubernetes and cni. Its list of
 * pods not served yet becomes pendingPods, because /status counts them in pending.
 */
export function statusData(report: StatusReport): object {
  if (report.status === undefined) return report.readiness;
  const { pending, pendingTotal, ...readiness } = report.readiness;
  return { ...readiness, ...report.status, pendingPods: pending ?? [], ...(pendingTotal !== undefined && { pendingPodsTotal: pendingTotal }) };
}

/**
 * Formats the report: the node summary with the identities whose certificate is not valid, then
 * the CNI plugin and the Kubernetes watches.
 */
export function formatStatusReport(report: StatusReport, now: Date = new Date()): string {
  const stopping = report.readiness.stopping === true || report.status?.stopping === true;
  if (report.status === undefined) return withStopping(formatReadiness(report.readiness), stopping);
  return withStopping(formatStatusView(report.status, now, report.unhealthyCertificates), stopping) + formatWatches(report.readiness);
}

export const STOPPING_LINE = "stopping: the agent is draining its connections and exits soon";

/**
 * Puts the stopping line in place of "ready: no", whose checks all pass while the agent stops.
 * A check that fails as well keeps its line below.
 */
function withStopping(text: string, stopping: boolean): string {
  if (!stopping) return text;
  return text.replace(/^ready: (yes|no)$/m, STOPPING_LINE);
}

/** Tells whether both the readiness route and /status report the agent ready. */
export function reportReady(report: StatusReport): boolean {
  return report.readiness.ready && (report.status?.ready ?? true);
}
