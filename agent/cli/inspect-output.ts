// Table output of `agentctl workloads`, `services`, `certificates`, `connections`, `log` and the
// /status part of `agentctl status`. The columns follow `istioctl ztunnel-config`.

import type { CertificateChainEntry, CertificateView, ConnectionView, LogLevelsView, RefusalView, ServiceView, StatusView, WorkloadView } from "../admin/views";
import { cell, countOf, formatBytes, formatDuration, formatTable } from "./output";

export function formatWorkloads(workloads: readonly WorkloadView[]): string {
  const rows = workloads.map((workload) => [
    workload.namespace,
    workload.name,
    cell(workload.ips.join(",")),
    cell(workload.node),
    workload.protocol,
    workload.state,
  ]);
  return formatTable(["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "STATE"], rows);
}

export function formatServices(services: readonly ServiceView[]): string {
  const rows = services.map((service) => [
    service.namespace,
    service.name,
    cell(service.vips.join(",")),
    cell(service.ports.map(portLabel).join(",")),
    `${service.endpoints.healthy}/${service.endpoints.total}`,
  ]);
  return formatTable(["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "PORTS", "ENDPOINTS"], rows);
}

/** "80/TCP", or "80->8080/TCP" when the target port differs. */
function portLabel(port: ServiceView["ports"][number]): string {
  const target = String(port.targetPort) === String(port.port) ? "" : `->${port.targetPort}`;
  return `${port.port}${target}/${port.protocol}`;
}

/**
 * Formats one row per certificate of each identity's chain. The leaf's STATE is the certificate
 * manager's state; an intermediate's or root's STATE comes from its validity period at `now`.
 * Identities without a certificate (pending, failing) get one row, and every identity with an
 * error gets a line below the table.
 */
export function formatCertificates(certificates: readonly CertificateView[], now: Date = new Date()): string {
  const rows: string[][] = [];
  const notes: string[] = [];
  for (const certificate of certificates) {
    if (certificate.chain.length === 0) rows.push([certificate.identity, "-", certificate.state, "-", "-", "-", "-"]);
    for (const entry of certificate.chain) {
      const state = entry.type === "Leaf" ? certificate.state : periodState(entry, now);
      rows.push([certificate.identity, entry.type, state, entry.serialNumber, entry.notBefore, entry.notAfter, expiresIn(entry.notAfter, now)]);
    }
    if (certificate.lastError !== undefined || certificate.failures > 0) notes.push(certificateNote(certificate));
  }
  const table = formatTable(["IDENTITY", "TYPE", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "EXPIRES IN"], rows);
  return notes.length === 0 ? table : table + "\n" + notes.join("\n") + "\n";
}

function periodState(entry: CertificateChainEntry, now: Date): string {
  if (Date.parse(entry.notAfter) <= now.getTime()) return "expired";
  if (Date.parse(entry.notBefore) > now.getTime()) return "not yet valid";
  return "valid";
}

/** "89d 23h", or "expired 2h ago". */
function expiresIn(notAfter: string, now: Date): string {
  const at = Date.parse(notAfter);
  if (Number.isNaN(at)) return "-";
  const seconds = (at - now.getTime()) / 1000;
  return seconds > 0 ? formatDuration(seconds) : `expired ${formatDuration(-seconds)} ago`;
}

/** Formats one line per identity whose certificate is not valid, at most MAX_LISTED_CERTIFICATES. */
function unhealthyCertificateLines(certificates: readonly CertificateView[]): string[] {
  const lines = certificates.slice(0, MAX_LISTED_CERTIFICATES).map((certificate) => {
    const retry = certificate.nextRetryAt === undefined ? "" : `, next retry at ${certificate.nextRetryAt}`;
    const error = certificate.lastError === undefined ? "" : `: ${certificate.lastError}`;
    return `  ${certificate.identity}: ${certificate.state}${retry}${error}`;
  });
  const more = certificates.length - lines.length;
  if (more > 0) lines.push(`  and ${more} more: agentctl certificates lists them`);
  return lines;
}

function certificateNote(certificate: CertificateView): string {
  const retry = certificate.nextRetryAt === undefined ? "" : `, next retry at ${certificate.nextRetryAt}`;
  const error = certificate.lastError === undefined ? "" : `: ${certificate.lastError}`;
  return `${certificate.identity}: ${certificate.failures} failed ${certificate.failures === 1 ? "request" : "requests"}${retry}${error}`;
}

/** Formats open connections. IDENTITY is the peer's: the source's for inbound, the destination's for outbound. */
export function formatConnections(connections: readonly ConnectionView[]): string {
  const rows = connections.map((connection) => [
    connection.workload,
    connection.direction,
    connection.local,
    connection.remote,
    cell(connection.remoteTarget),
    connection.protocol,
    cell(connection.direction === "inbound" ? connection.srcIdentity : connection.dstIdentity),
    formatBytes(connection.bytesSent),
    formatBytes(connection.bytesRecv),
    formatDuration(connection.durationMs / 1000),
  ]);
  return formatTable(["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL", "IDENTITY", "BYTES SENT", "BYTES RECV", "AGE"], rows);
}

/** Formats the default level, then each component's level in name order. */
export function formatLogLevels(levels: LogLevelsView): string {
  const components = Object.entries(levels.components).sort(([a], [b]) => a.localeCompare(b));
  return formatTable(["COMPONENT", "LEVEL"], [["(default)", levels.default], ...components]);
}

/** Identities with a certificate that is not valid that `agentctl status` lists; `agentctl certificates` lists all. */
const MAX_LISTED_CERTIFICATES = 10;

/**
 * Formats the node summary of GET /status, the part of `agentctl status` above the Kubernetes
 * watches. `unhealthy` lists the identities whose certificate is not valid, from GET /certificates.
 */
export function formatStatusView(status: StatusView, now: Date = new Date(), unhealthy: readonly CertificateView[] = []): string {
  const lines = [`agent: version ${status.version} on node ${status.node} (pid ${status.pid}, up ${formatDuration(status.uptimeSeconds)})`];
  lines.push(...readinessLines(status.ready, status.checks));
  lines.push(...captureLines(status));
  const configuration = status.configuration;
  lines.push(
    `configuration: from ${configuration.source}: ${countOf(configuration.workloads, "workload")}, ${countOf(configuration.services, "service")}, ${countOf(configuration.policies, "policy", "policies")}, ${configuration.rejected} rejected`,
  );
  lines.push(`pods: ${status.enrolled} enrolled, ${status.pending} pending, ${status.isolated} isolated`);
  lines.push(certificateLine(status.certificates, now));
  lines.push(...unhealthyCertificateLines(unhealthy));
  lines.push(`connections: ${status.connections.inbound} inbound, ${status.connections.outbound} outbound`);
  if (status.refusals !== undefined) lines.push(...refusalLines(status.refusals));
  return lines.join("\n") + "\n";
}

/** Formats "ready: yes" or "ready: no", then one line per readiness check. */
export function readinessLines(ready: boolean, checks: Readonly<Record<string, boolean>>): string[] {
  const lines = [`ready: ${ready ? "yes" : "no"}`];
  for (const [check, ok] of Object.entries(checks)) lines.push(`  ${check.padEnd(14)} ${ok ? "ok" : "not ready"}`);
  return lines;
}

function captureLines(status: StatusView): string[] {
  const capture = status.capture;
  if (capture === undefined) return ["capture: not attached"];
  // The reason of a mode chosen by name is "requested with --capture MODE" already.
  const why = capture.requested === capture.mode ? capture.reason : `--capture ${capture.requested}: ${capture.reason}`;
  const lines = [`capture: ${capture.mode} (${why})`];
  if (capture.programs.length > 0) {
    const programs = capture.programs.map((program) => [program.name, program.type, program.attachedTo]);
    lines.push(formatTable(["PROGRAM", "TYPE", "ATTACHED TO"], programs, "  ").trimEnd());
  }
  if (capture.maps.length > 0) {
    const maps = capture.maps.map((map) => [map.name, `${map.entries}/${map.maxEntries}`, usagePercent(map.entries, map.maxEntries)]);
    lines.push(formatTable(["MAP", "ENTRIES/MAX", "USED"], maps, "  ").trimEnd());
  }
  return lines;
}

function usagePercent(entries: number, maxEntries: number): string {
  if (maxEntries <= 0) return "-";
  const percent = (entries / maxEntries) * 100;
  // A few entries of a large map would round to 0.0%, which reads as empty.
  if (entries > 0 && percent < 0.1) return "<0.1%";
  return `${percent.toFixed(1)}%`;
}

function certificateLine(certificates: StatusView["certificates"], now: Date): string {
  const counts = `${certificates.total} total: ${certificates.valid} valid, ${certificates.refreshing} refreshing, ${certificates.pending} pending, ${certificates.failing} failing, ${certificates.expired} expired`;
  if (certificates.nextExpiry === undefined) return `certificates: ${counts}`;
  return `certificates: ${counts}; next expiry ${certificates.nextExpiry} (${expiresIn(certificates.nextExpiry, now)})`;
}

/**
 * Formats the connections refused or closed by a limit since start as a table by listener and
 * reason, with the flag of each limit. The refusal totals count both kinds. None gives one line.
 */
function refusalLines(refusals: readonly RefusalView[]): string[] {
  if (refusals.length === 0) return ["connections refused or closed by a limit: none"];
  const rows = refusals.map((refusal) => [refusal.listener, refusal.reason, String(refusal.count), refusal.flag ?? "-"]);
  return ["connections refused or closed by a limit (docs/limits.md):", formatTable(["LISTENER", "REASON", "COUNT", "LIMIT"], rows, "  ").trimEnd()];
}
