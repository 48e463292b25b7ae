// Table output of `agentctl authz check`, `agentctl authz explain` and `agentctl policies`. The
// JSON output is the admin API's body unchanged; these functions only lay it out for a terminal.

import path from "node:path";
import type { AccessCheck, AppliedPolicy, PeerAuthenticationRef, PolicyStatusReport, PortDecision, WorkloadExplanation } from "../rbac/explain";
import { countOf, formatTable } from "./output";

/** Formats a check: one line per destination port with the decision first, then its explanation. */
export function formatAccessCheck(check: AccessCheck): string {
  const lines: string[] = [];
  const source = sourceLabel(check);
  for (const result of check.results) {
    lines.push(`${result.decision.toUpperCase().padEnd(5)} ${source} -> ${destinationLabel(result)}${decidedBy(result)} (${result.reason})`);
    lines.push(`      ${result.explanation}`);
    if (result.mtls !== undefined) lines.push(`      mTLS ${result.mtls.mode}${result.mtls.policy === undefined ? " (no PeerAuthentication sets it)" : ` by PeerAuthentication ${result.mtls.policy} (${result.mtls.scope})`}`);
  }
  if (check.results.length === 0) lines.push(`no destination: ${check.destination} leads nowhere`);
  for (const note of check.notes) lines.push(`note: ${note}`);
  return lines.join("\n") + "\n";
}

function sourceLabel(check: AccessCheck): string {
  const { source } = check;
  if (source.identity !== undefined) return source.identity;
  const name = source.workload ?? source.ip ?? source.query;
  const ip = source.workload !== undefined && source.ip !== undefined ? ` ${source.ip}` : "";
  return `${name}${ip} (plaintext)`;
}

function destinationLabel(result: PortDecision): string {
  const host = result.workload ?? result.ip;
  const port = result.port === "other" ? "<other ports>" : String(result.port);
  const via = result.service === undefined ? "" : ` via Service ${result.service} port ${result.servicePort}`;
  return `${host}:${port}${via}`;
}

function decidedBy(result: PortDecision): string {
  if (result.policy === undefined) return "";
  const rule = result.rule === undefined ? "" : ` rules[${result.rule}]`;
  return ` by ${result.policyKind ?? "policy"} ${result.policy}${rule}`;
}

/** Formats what decides connections to one pod. */
export function formatWorkloadExplanation(explanation: WorkloadExplanation): string {
  const lines: string[] = [];
  lines.push(`POD        ${explanation.workload} (${explanation.ip === "" ? "no IP" : explanation.ip})`);
  lines.push(
    explanation.enrolled
      ? `ENROLLED   yes, identity ${explanation.identity}`
      : `ENROLLED   no: ${explanation.notEnrolledReason}; the agent enforces no policy on this pod`,
  );
  if (explanation.excludedInboundPorts.length > 0) {
    lines.push(
      `EXCLUDED   inbound ports ${explanation.excludedInboundPorts.join(", ")} (traffic.sidecar.istio.io/excludeInboundPorts): no mutual TLS, policy or audit applies to them`,
    );
  }
  lines.push("");
  lines.push("AUTHORIZATION POLICIES (evaluation order)");
  if (explanation.policies.length === 0) {
    lines.push(
      explanation.enrolled
        ? "  none: every connection is allowed unless PeerAuthentication requires mutual TLS"
        : "  none: every connection is allowed, because no agent checks policies on a pod that is not enrolled",
    );
  } else {
    if (!explanation.enrolled) lines.push("  not enforced: no agent checks policies on a pod that is not enrolled; the ones listed apply once it is enrolled");
    lines.push(...table(["POLICY", "ACTION", "SCOPE", "STATUS", "RULES", "FILE"], explanation.policies.map(appliedPolicyRow)));
    lines.push(...explanation.policies.flatMap(policyDetails));
  }
  lines.push("");
  lines.push("PEER AUTHENTICATION");
  if (!explanation.enrolled) lines.push("  not enforced: connections to a pod that is not enrolled are plaintext and no agent checks mutual TLS; the modes listed apply once it is enrolled");
  const scopes = (["mesh", "namespace", "workload"] as const).flatMap((scope) => {
    const ref = explanation.peerAuthentication[scope];
    return ref === undefined ? [] : [[scope, ref.uid, ref.mode, path.basename(ref.file)]];
  });
  if (scopes.length === 0) lines.push("  none: PERMISSIVE on every port");
  else lines.push(...table(["SCOPE", "POLICY", "MODE", "FILE"], scopes));
  const ports = explanation.peerAuthentication.ports.map((entry) => [
    entry.port === "other" ? "other" : String(entry.port),
    entry.mode,
    entry.policy === undefined ? "-" : `${entry.policy} (${entry.scope})`,
  ]);
  lines.push(...table(["PORT", "EFFECTIVE MODE", "SET BY"], ports));
  const warnings = (["mesh", "namespace", "workload"] as const).flatMap((scope) => explanation.peerAuthentication[scope]?.warnings ?? []);
  lines.push(...warnings.map((warning) => `  warning: ${warning}`));
  return lines.join("\n") + "\n";
}

function appliedPolicyRow(policy: AppliedPolicy): string[] {
  const scope = policy.selector === undefined ? policy.scope : `${policy.scope} ${selectorText(policy.selector)}`;
  const rules = policy.enforcedRules === policy.rules ? String(policy.rules) : `${policy.enforcedRules}/${policy.rules}`;
  return [policy.uid, policy.action, scope, policy.status, rules, path.basename(policy.file)];
}

function policyDetails(policy: { uid: string; message?: string; warnings: string[] }): string[] {
  const lines = policy.message === undefined ? [] : [`  rejected: ${policy.message}`];
  return [...lines, ...policy.warnings.map((warning) => `  warning: ${warning}`)];
}

/** Formats every policy with its status, then the rejected ones. */
export function formatPolicyStatuses(report: PolicyStatusReport): string {
  const lines: string[] = ["AUTHORIZATION POLICIES"];
  if (report.authorizationPolicies.length === 0) lines.push("  none");
  else {
    const rows = report.authorizationPolicies.map((policy) => [
      policy.uid,
      policy.action,
      policy.selector === undefined ? "-" : selectorText(policy.selector),
      policy.status,
      policy.warnings.length > 0 ? `${policy.rules} (${countOf(policy.warnings.length, "warning")})` : String(policy.rules),
      path.basename(policy.file),
    ]);
    lines.push(...table(["POLICY", "ACTION", "SELECTOR", "STATUS", "RULES", "FILE"], rows));
    lines.push(...report.authorizationPolicies.flatMap(policyDetails));
  }
  lines.push("", "PEER AUTHENTICATIONS");
  if (report.peerAuthentications.length === 0) lines.push("  none");
  else {
    const rows = report.peerAuthentications.map((policy) => [
      policy.uid,
      policy.selector === undefined ? "-" : selectorText(policy.selector),
      policy.mode,
      portModes(policy),
      policy.status,
      path.basename(policy.file),
    ]);
    lines.push(...table(["POLICY", "SELECTOR", "MODE", "PORTS", "STATUS", "FILE"], rows));
    lines.push(...report.peerAuthentications.flatMap(policyDetails));
  }
  lines.push("", "REJECTED");
  if (report.rejected.length === 0) lines.push("  none");
  else {
    const rows = report.rejected.map((problem) => [
      problem.object,
      problem.line === undefined ? problem.file : `${problem.file}:${problem.line}`,
      problem.field === "" ? "-" : problem.field,
      problem.lastValidServing ? "last valid version" : "nothing",
      problem.problems > 1 ? `${problem.message} (${countOf(problem.problems - 1, "more problem")} in this document)` : problem.message,
    ]);
    lines.push(...table(["OBJECT", "FILE", "FIELD", "SERVING", "MESSAGE"], rows));
  }
  return lines.join("\n") + "\n";
}

function portModes(policy: PeerAuthenticationRef): string {
  const entries = Object.entries(policy.portLevelMtls);
  return entries.length === 0 ? "-" : entries.map(([port, mode]) => `${port}=${mode}`).join(",");
}

function selectorText(selector: Readonly<Record<string, string>>): string {
  const pairs = Object.entries(selector).map(([key, value]) => `${key}=${value}`);
  return pairs.length === 0 ? "{}" : pairs.join(",");
}

/** Lays out rows under a header, indented by two spaces, as the lines of the table. */
function table(header: string[], rows: string[][]): string[] {
  return formatTable(header, rows, "  ").trimEnd().split("\n");
}
