// agentctl status: whether the node's agent is ready, and the state of each of its Kubernetes API
// watches, from the admin API's /healthz/ready, and the node summary from /status.

import type { StatusView } from "../admin/views";
import { adminJson, adminRequest, RouteNotFoundError } from "./admin-client";
import { formatStatusView, readinessLines } from "./inspect-output";
import { formatTable } from "./output";

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
}

/** Reads /healthz/ready, which responds with 200 when ready and 503 when not, both with a JSON body. */
export async function fetchReadiness(address: string): Promise<Readiness> {
  const { status, text } = await adminRequest(address, "GET", "/healthz/ready");
  try {
    return JSON.parse(text) as Readiness;
  } catch {
    throw new Error(`the admin API at ${address} responded to /healthz/ready with status ${status} and no JSON: ${text.trim().slice(0, 200)}; is this agent older than agentctl?`);
  }
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
  if (readiness.cni !== undefined) {
    lines.push(readiness.cni.chained ? `cni plugin: chained into ${readiness.cni.file}` : `cni plugin: not chained (${readiness.cni.outcome}): new pods start without waiting for capture`);
  }
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

/** The output of `agentctl status`: the /status view when the agent serves it, and the readiness. */
export interface StatusReport {
  status?: StatusView;
  readiness: Readiness;
}

/**
 * Reads /status and /healthz/ready together. An agent without /status (status 404: older than
 * agentctl) gives a report with the readiness alone.
 */
export async function fetchStatusReport(address: string): Promise<StatusReport> {
  const [status, readiness] = await Promise.all([
    adminJson(address, "/status").catch((error: unknown) => {
      if (error instanceof RouteNotFoundError) return undefined;
      throw error;
    }),
    fetchReadiness(address),
  ]);
  return { status: status as StatusView | undefined, readiness };
}

/**
 * Returns the report as one JSON object: the readiness body, with the /status fields over it.
 * Both have ready, checks and enrolled; the readiness alone has kubernetes and cni.
 */
export function statusData(report: StatusReport): object {
  return report.status === undefined ? report.readiness : { ...report.readiness, ...report.status };
}

/** Formats the report: the node summary, then the CNI plugin and the Kubernetes watches. */
export function formatStatusReport(report: StatusReport, now: Date = new Date()): string {
  if (report.status === undefined) return formatReadiness(report.readiness);
  return formatStatusView(report.status, now) + formatWatches(report.readiness);
}

/** Tells whether both the readiness route and /status report the agent ready. */
export function reportReady(report: StatusReport): boolean {
  return report.readiness.ready && (report.status?.ready ?? true);
}
