// Builders of the control records (record.ts ControlRecord): what changed in the agent's own
// configuration and state, as opposed to one connection. Pure apart from agentVersion(), which reads
// package.json once. No record built here contains a private key, a certificate PEM or a token:
// certificates are described by serial and fingerprint, and settings values that look like PEM
// blocks or JWTs are replaced.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { ManifestProblem } from "../discovery/manifest-problem";
import { DRY_RUN_ANNOTATION } from "../discovery/manifest-policies";
import {
  DATAPLANE_MODE_AMBIENT,
  DATAPLANE_MODE_LABEL,
  DATAPLANE_MODE_NONE,
  DEFAULT_ENROLLMENT_SETTINGS,
  enrollmentDecision,
  type EnrollmentRule,
  type EnrollmentSettings,
} from "../enroll/enrollment";
import type { EnrollmentEvent } from "../enroll/reconciler";
import type { CertificateIssuedEvent } from "../identity/cert-manager";
import { formatSpiffeId } from "../identity/spiffe";
import { problemPolicy } from "../rbac/policy-report";
import { policyStatus } from "../rbac/warnings";
import type { AuthorizationPolicy, ClusterSnapshot, PeerAuthentication, Workload } from "../state/types";
import type { ControlRecord, PolicyChange, PolicyRef } from "./record";

/** Changes listed in one policy.changed record; the rest are counted in `changes_omitted`. */
export const MAX_POLICY_CHANGES = 50;
/** Characters of a before or after value kept in a policy change, measured as JSON. */
export const MAX_CHANGE_VALUE_CHARS = 256;

type PolicyKind = "AuthorizationPolicy" | "PeerAuthentication";
type PolicyObject = AuthorizationPolicy | PeerAuthentication;

// ---------------------------------------------------------------------------------------------
// Policies

/**
 * Builds policy.added, policy.removed and policy.changed records for the AuthorizationPolicies and
 * PeerAuthentications that differ between two snapshots, sorted by kind and namespace/name. With
 * `before` undefined (agent start) every policy is added. A policy whose fields and file are
 * unchanged yields no record, even when its position inside the file moved.
 */
export function policyRecords(before: ClusterSnapshot | undefined, after: ClusterSnapshot, node: string, time: string): ControlRecord[] {
  return [
    ...kindRecords("AuthorizationPolicy", before?.authorizationPolicies, after.authorizationPolicies, node, time),
    ...kindRecords("PeerAuthentication", before?.peerAuthentications, after.peerAuthentications, node, time),
  ];
}

function kindRecords(
  kind: PolicyKind,
  before: ReadonlyMap<string, PolicyObject> | undefined,
  after: ReadonlyMap<string, PolicyObject>,
  node: string,
  time: string,
): ControlRecord[] {
  const uids = [...new Set([...(before?.keys() ?? []), ...after.keys()])].sort();
  const records: ControlRecord[] = [];
  for (const uid of uids) {
    const old = before?.get(uid);
    const current = after.get(uid);
    if (current === undefined) {
      records.push({ type: "policy.removed", time, node, policy: policyRef(kind, old!), file: old!.source.file });
    } else if (old === undefined) {
      records.push({ type: "policy.added", time, node, policy: policyRef(kind, current), file: current.source.file });
    } else {
      const record = changedRecord(kind, old, current, node, time);
      if (record !== undefined) records.push(record);
    }
  }
  return records;
}

function changedRecord(kind: PolicyKind, before: PolicyObject, after: PolicyObject, node: string, time: string): ControlRecord | undefined {
  const changes = diffValues(policyView(kind, before), policyView(kind, after), "");
  const moved = before.source.file !== after.source.file;
  if (changes.length === 0 && !moved) return undefined;

  const listed = changes.slice(0, MAX_POLICY_CHANGES).map(capChange);
  return {
    type: "policy.changed",
    time,
    node,
    policy: policyRef(kind, after),
    file: after.source.file,
    ...(moved && { previous_file: before.source.file }),
    changes: listed,
    ...(changes.length > listed.length && { changes_omitted: changes.length - listed.length }),
  };
}

function policyRef(kind: PolicyKind, policy: PolicyObject): PolicyRef {
  return { kind, namespace: policy.namespace, name: policy.name };
}

/**
 * Returns the policy in the shape of its manifest (metadata and spec), so that change paths name
 * the fields an operator wrote. Fields the reader filled with defaults appear with those defaults:
 * an absent spec.action is "ALLOW", an absent mtls mode "UNSET".
 */
function policyView(kind: PolicyKind, policy: PolicyObject): Record<string, unknown> {
  if (kind === "AuthorizationPolicy") {
    const authorization = policy as AuthorizationPolicy;
    return {
      metadata: { annotations: authorization.dryRun ? { [DRY_RUN_ANNOTATION]: "true" } : {} },
      spec: {
        ...selectorView(authorization.selector),
        action: authorization.action,
        ...(authorization.rules !== undefined && { rules: authorization.rules }),
      },
    };
  }
  const peer = policy as PeerAuthentication;
  const portLevelMtls = Object.fromEntries(Object.entries(peer.portLevelMtls).map(([port, mode]) => [port, { mode }]));
  return {
    spec: {
      ...selectorView(peer.selector),
      mtls: { mode: peer.mode },
      ...(Object.keys(portLevelMtls).length > 0 && { portLevelMtls }),
    },
  };
}

function selectorView(selector: PolicyObject["selector"]): Record<string, unknown> {
  return selector === undefined ? {} : { selector: { matchLabels: selector } };
}

/**
 * Lists the paths where two JSON-like values differ. Mappings and lists are compared member by
 * member. Where one side is absent or the types differ, the whole value at that path is one change.
 * Map keys are joined with dots as written, even keys that contain dots (metadata.annotations.istio.io/dry-run).
 */
export function diffValues(before: unknown, after: unknown, at: string): PolicyChange[] {
  if (Array.isArray(before) && Array.isArray(after)) {
    const changes: PolicyChange[] = [];
    for (let index = 0; index < Math.max(before.length, after.length); index++) {
      changes.push(...diffValues(before[index], after[index], `${at}[${index}]`));
    }
    return changes;
  }
  if (isMapping(before) && isMapping(after)) {
    const keys = [...new Set([...Object.keys(after), ...Object.keys(before)])];
    return keys.flatMap((key) => diffValues(before[key], after[key], at === "" ? key : `${at}.${key}`));
  }
  if (JSON.stringify(before) === JSON.stringify(after)) return [];
  return [{ path: at, ...(before !== undefined && { before }), ...(after !== undefined && { after }) }];
}

function isMapping(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function capChange(change: PolicyChange): PolicyChange {
  const capped: PolicyChange = { path: change.path };
  if ("before" in change) capped.before = capValue(change.before);
  if ("after" in change) capped.after = capValue(change.after);
  return capped;
}

/** Returns the value, or its JSON text cut to MAX_CHANGE_VALUE_CHARS with the number of characters left out. */
export function capValue(value: unknown): unknown {
  const json = JSON.stringify(value) ?? "";
  if (json.length <= MAX_CHANGE_VALUE_CHARS) return value;
  return `${json.slice(0, MAX_CHANGE_VALUE_CHARS)}… (${json.length - MAX_CHANGE_VALUE_CHARS} more characters)`;
}

// ---------------------------------------------------------------------------------------------
// Rejected policies

/**
 * Builds a policy.rejected record for each problem of an AuthorizationPolicy or PeerAuthentication
 * in `current` that `previous` does not have. A problem is thus recorded once while it lasts, and
 * again when it returns after a fix. Problems are matched by file, object, field and message, so
 * an edit that only moves the problem's line does not record it again.
 */
export function rejectionRecords(previous: readonly ManifestProblem[], current: readonly ManifestProblem[], node: string, time: string): ControlRecord[] {
  const known = new Set(previous.map(problemKey));
  const records: ControlRecord[] = [];
  for (const problem of current) {
    const policy = problemPolicy(problem);
    if (policy === undefined || known.has(problemKey(problem))) continue;
    known.add(problemKey(problem));
    records.push({
      type: "policy.rejected",
      time,
      node,
      policy: { kind: policy.kind, ...splitUid(policy.uid) },
      file: problem.file,
      ...(problem.line !== undefined && { line: problem.line }),
      message: problem.field === "" ? problem.message : `${problem.field}: ${problem.message}`,
    });
  }
  return records;
}

function problemKey(problem: ManifestProblem): string {
  return JSON.stringify([problem.file, problem.object, problem.field, problem.message]);
}

function splitUid(uid: string): { namespace?: string; name: string } {
  const slash = uid.indexOf("/");
  return slash < 0 ? { name: uid } : { namespace: uid.slice(0, slash), name: uid.slice(slash + 1) };
}

/**
 * Lists the AuthorizationPolicies that the manifest reader accepted but the agent does not enforce
 * (action AUDIT or CUSTOM), as manifest problems, so that rejectionRecords() records them with the
 * reader's own rejections. They carry no line, because the snapshot keeps none.
 */
export function unenforcedPolicyProblems(snapshot: ClusterSnapshot): ManifestProblem[] {
  const problems: ManifestProblem[] = [];
  for (const policy of snapshot.authorizationPolicies.values()) {
    const status = policyStatus(policy);
    if (status.state !== "rejected" || status.message === undefined) continue;
    problems.push({
      file: policy.source.file,
      document: policy.source.document,
      object: `AuthorizationPolicy ${policy.uid}`,
      field: "",
      message: status.message,
    });
  }
  return problems;
}

// ---------------------------------------------------------------------------------------------
// Certificates

/** Builds certificate.issued or certificate.rotated from the leaf's public fields; never its key or PEM. */
export function certificateRecord(event: CertificateIssuedEvent, node: string, time: string): ControlRecord {
  const leaf = new crypto.X509Certificate(event.certificate.certPem);
  return {
    type: event.rotated ? "certificate.rotated" : "certificate.issued",
    time,
    node,
    identity: formatSpiffeId(event.identity),
    serial: leaf.serialNumber.toLowerCase(),
    not_before: event.certificate.notBefore.toISOString(),
    not_after: event.certificate.notAfter.toISOString(),
    fingerprint_sha256: crypto.createHash("sha256").update(leaf.raw).digest("hex"),
    issuer: leaf.issuer.split("\n").join(", "),
  };
}

// ---------------------------------------------------------------------------------------------
// Enrollment

/** Builds workload.enrolled or workload.unenrolled. */
export function workloadRecord(event: EnrollmentEvent, node: string, time: string): ControlRecord {
  return {
    type: event.action === "enrolled" ? "workload.enrolled" : "workload.unenrolled",
    time,
    node,
    workload: event.workload.name,
    namespace: event.workload.namespace,
    ...(event.workload.ip !== "" && { ip: event.workload.ip }),
    identity: formatSpiffeId(event.identity),
    reason: event.reason,
  };
}

/** Reason of the enrollments found when the agent starts. */
export const AGENT_START_REASON = "agent start";

/**
 * Explains, for each workload that is enrolled in one snapshot and not in the other, why it entered
 * or left the enrolled set of `node`: keyed by workload uid. With `before` undefined every enrolled
 * workload has the reason "agent start". The rules are those of enrolledWorkloads in
 * enroll/enrollment.ts: this node, an IP, then enrollmentDecision with `settings`.
 */
export function enrollmentReasons(
  before: ClusterSnapshot | undefined,
  after: ClusterSnapshot,
  node: string,
  settings: EnrollmentSettings = DEFAULT_ENROLLMENT_SETTINGS,
): Map<string, string> {
  const ruleOf = (snapshot: ClusterSnapshot, workload: Workload) => enrollmentRule(snapshot, workload, node, settings);
  const reasons = new Map<string, string>();
  for (const workload of after.workloads.values()) {
    const now = ruleOf(after, workload);
    if (!ENROLLING_RULES.has(now)) continue;
    const old = before?.workloads.get(workload.uid);
    if (before === undefined) reasons.set(workload.uid, AGENT_START_REASON);
    else if (old === undefined) reasons.set(workload.uid, "pod created");
    else {
      const was = ruleOf(before, old);
      if (!ENROLLING_RULES.has(was)) reasons.set(workload.uid, enrolledBecause(was, now, workload));
    }
  }
  if (before === undefined) return reasons;
  for (const old of before.workloads.values()) {
    const was = ruleOf(before, old);
    if (!ENROLLING_RULES.has(was)) continue;
    const workload = after.workloads.get(old.uid);
    if (workload === undefined) reasons.set(old.uid, "pod deleted");
    else {
      const now = ruleOf(after, workload);
      if (!ENROLLING_RULES.has(now)) reasons.set(old.uid, unenrolledBecause(now, was, workload));
    }
  }
  return reasons;
}

/** node and ip come before enrollmentDecision's rules, as in enrolledWorkloads. */
type NodeRule = "node" | "ip" | EnrollmentRule;

const ENROLLING_RULES: ReadonlySet<NodeRule> = new Set<NodeRule>(["podLabel", "namespaceLabel"]);

/** Returns the first rule that keeps the workload out of `node`'s enrolled set, or the rule that enrolls it. */
function enrollmentRule(snapshot: ClusterSnapshot, workload: Workload, node: string, settings: EnrollmentSettings): NodeRule {
  if (workload.nodeName !== node) return "node";
  if (workload.ip === "") return "ip";
  const namespaces = { namespace: (name: string) => snapshot.namespaces.get(name) };
  return enrollmentDecision(namespaces, workload, settings).rule;
}

/** Explains an enrollment: `was` is the rule that kept the workload out, `now` the rule that enrolls it. */
function enrolledBecause(was: NodeRule, now: NodeRule, workload: Workload): string {
  switch (was) {
    case "node":
      return "pod scheduled to this node";
    case "ip":
      return "pod got an IP";
    case "hostNetwork":
      return "pod no longer uses the host network";
    case "podOptOut":
      return `pod label ${DATAPLANE_MODE_LABEL}=${DATAPLANE_MODE_NONE} removed`;
    case "sidecar":
      return "pod no longer has an Istio sidecar";
    case "excludedNamespace":
      return `namespace ${workload.namespace} no longer excluded from ambient mode`;
    default:
      return now === "podLabel" ? `pod labelled ${AMBIENT_LABEL}` : `namespace labelled ${AMBIENT_LABEL}`;
  }
}

/** Explains an unenrollment: `now` is the rule that keeps the workload out, `was` the rule that enrolled it. */
function unenrolledBecause(now: NodeRule, was: NodeRule, workload: Workload): string {
  switch (now) {
    case "node":
      return `pod moved to node ${workload.nodeName}`;
    case "ip":
      return "pod has no IP";
    case "hostNetwork":
      return "pod uses the host network";
    case "podOptOut":
      return `pod labelled ${DATAPLANE_MODE_LABEL}=${DATAPLANE_MODE_NONE}`;
    case "sidecar":
      return "pod has an Istio sidecar";
    case "excludedNamespace":
      return `namespace ${workload.namespace} is excluded from ambient mode`;
    default:
      return was === "podLabel" ? `pod label ${AMBIENT_LABEL} removed` : "namespace no longer ambient";
  }
}

const AMBIENT_LABEL = `${DATAPLANE_MODE_LABEL}=${DATAPLANE_MODE_AMBIENT}`;

// ---------------------------------------------------------------------------------------------
// The agent

export interface AgentStartedInput {
  /** Default agentVersion(). */
  version?: string;
  /** Default process.pid. */
  pid?: number;
  /** The end of the previous agent on this node, when known: a clean stop, or a crash or kill. */
  previousStop?: "clean" | "unclean";
  /** The agent's settings. Functions and undefined values are dropped, and values that look like secrets are replaced. */
  settings: Record<string, unknown>;
}

export function agentStartedRecord(input: AgentStartedInput, node: string, time: string): ControlRecord {
  return {
    type: "agent.started",
    time,
    node,
    version: input.version ?? agentVersion(),
    pid: input.pid ?? process.pid,
    ...(input.previousStop !== undefined && { previous_stop: input.previousStop }),
    settings: publicSettings(input.settings),
  };
}

export function agentStoppedRecord(input: { reason: string; openConnections: number }, node: string, time: string): ControlRecord {
  return { type: "agent.stopped", time, node, reason: input.reason, open_connections: input.openConnections };
}

export interface CaptureModeInput {
  /** The mode in use: ebpf or nftables. */
  mode: string;
  /** The mode the operator asked for: ebpf, nftables or auto. */
  requested: string;
  reason: string;
  previousMode?: string;
}

export function captureModeRecord(input: CaptureModeInput, node: string, time: string): ControlRecord {
  return {
    type: "capture.mode",
    time,
    node,
    mode: input.mode,
    requested: input.requested,
    reason: input.reason,
    ...(input.previousMode !== undefined && { previous_mode: input.previousMode }),
  };
}

/** Text put in place of a settings value that looks like a secret. */
export const REDACTED = "[redacted]";

const SECRET_NAME = /(secret|password|passwd|private.?key|token$|^key$|keypem|credential)/i;
const PEM_BLOCK = /-----BEGIN [A-Z0-9 ]+-----/;
const JWT = /\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*/;

/**
 * Returns a JSON-safe copy of `settings`: undefined values and functions dropped, bigints and
 * Dates as strings, Maps and Sets as objects and lists. A value is replaced by REDACTED when its
 * name looks like a secret's (except names ending in "File", which hold paths), or when it is a
 * string holding a PEM block or a JWT.
 */
export function publicSettings(settings: Record<string, unknown>): Record<string, unknown> {
  return toPublic(settings, 0) as Record<string, unknown>;
}

function toPublic(value: unknown, depth: number): unknown {
  if (typeof value === "string") return PEM_BLOCK.test(value) || JWT.test(value) ? REDACTED : value;
  if (typeof value === "bigint") return value.toString();
  if (typeof value !== "object" || value === null) return value;
  if (depth > 8) return REDACTED;
  if (value instanceof Date) return value.toISOString();
  if (Array.isArray(value) || value instanceof Set) return [...value].map((item) => toPublic(item, depth + 1));
  const entries = value instanceof Map ? [...value.entries()] : Object.entries(value);
  const copy: Record<string, unknown> = {};
  for (const [key, item] of entries) {
    if (item === undefined || typeof item === "function") continue;
    const name = String(key);
    copy[name] = SECRET_NAME.test(name) && !/file$/i.test(name) ? REDACTED : toPublic(item, depth + 1);
  }
  return copy;
}

let version: string | undefined;

/** Returns the version in the agent's package.json, found upwards from this file (source or dist); "unknown" when none is found. */
export function agentVersion(): string {
  if (version !== undefined) return version;
  version = "unknown";
  for (let dir = __dirname; ; dir = path.dirname(dir)) {
    const file = path.join(dir, "package.json");
    if (fs.existsSync(file)) {
      const manifest = JSON.parse(fs.readFileSync(file, "utf8")) as { name?: string; version?: string };
      if (manifest.name === "ambient-agent" && typeof manifest.version === "string") {
        version = manifest.version;
        break;
      }
    }
    if (path.dirname(dir) === dir) break;
  }
  return version;
}
