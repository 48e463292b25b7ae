// Filtering of audit records read back from files: the filters of `agentctl audit query`, parsed
// from their command-line values, and a streaming reader that yields the records that match.

import { AgentError } from "../errors";
import { readFileLines } from "./line-reader";

/** The record types of schema version 1, to warn about a --type that can match nothing. */
export const KNOWN_RECORD_TYPES: readonly string[] = [
  "connection.opened",
  "connection.completed",
  "agent.started",
  "agent.stopped",
  "capture.mode",
  "workload.enrolled",
  "workload.unenrolled",
  "policy.added",
  "policy.changed",
  "policy.removed",
  "policy.rejected",
  "certificate.issued",
  "certificate.rotated",
  "audit.gap",
];

/** The largest --limit: that many lines are held in memory until the files end (about 50 MB at 500 bytes a line). */
export const MAX_QUERY_LIMIT = 100_000;

/** Filter values as given on the command line; absent ones do not filter. */
export interface AuditQueryOptions {
  identity?: string;
  workload?: string;
  namespace?: string;
  decision?: string;
  policy?: string;
  type?: string;
  since?: string;
  until?: string;
  limit?: string;
}

/** A text to match exactly, or as a prefix when the option ended with `*` (identity) or `.` (type). */
export interface TextMatch {
  value: string;
  prefix: boolean;
}

/** Parsed filters. A record must match every filter that is set. */
export interface AuditQuery {
  identity?: TextMatch;
  workload?: { namespace?: string; name: string };
  namespace?: string;
  decision?: "allow" | "deny";
  /** "namespace/name". */
  policy?: string;
  type?: TextMatch;
  /** Milliseconds since the epoch; records with `time` before it do not match. */
  since?: number;
  /** Milliseconds since the epoch; records with `time` after it do not match. */
  until?: number;
  /** Only the last `limit` matches are returned. */
  limit?: number;
}

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;
const SPIFFE_ID = /^spiffe:\/\/[^/\s*]+\/ns\/[^/\s*]+\/sa\/[^/\s*]+$/;
const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:[Zz]|([+-])(\d{2}):(\d{2}))$/;
const DURATION = /^(\d+)(s|m|h|d)$/;
const DURATION_UNIT_MS: Record<string, number> = { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

function invalid(option: string, value: string, expected: string): AgentError {
  return new AgentError("INVALID_QUERY", `invalid --${option} ${JSON.stringify(value)}: ${expected}`);
}

/** Parses the filter options. Throws an AgentError INVALID_QUERY that names the value and the expected form. */
export function parseAuditQuery(options: AuditQueryOptions, now = Date.now()): AuditQuery {
  const query: AuditQuery = {};
  if (options.identity !== undefined) query.identity = parseIdentity(options.identity);
  if (options.workload !== undefined) query.workload = parseWorkload(options.workload);
  if (options.namespace !== undefined) {
    if (!DNS_LABEL.test(options.namespace) || options.namespace.length > 63) throw invalid("namespace", options.namespace, "write a Kubernetes namespace name, for example demo");
    query.namespace = options.namespace;
  }
  if (options.decision !== undefined) {
    if (options.decision !== "allow" && options.decision !== "deny") throw invalid("decision", options.decision, "use allow or deny");
    query.decision = options.decision;
  }
  if (options.policy !== undefined) {
    const [namespace, name, ...rest] = options.policy.split("/");
    if (rest.length > 0 || name === undefined || !DNS_LABEL.test(namespace) || !DNS_SUBDOMAIN.test(name)) {
      throw invalid("policy", options.policy, "write NAMESPACE/NAME of the policy, for example shop/allow-frontend");
    }
    query.policy = options.policy;
  }
  if (options.type !== undefined) query.type = parseType(options.type);
  if (options.since !== undefined) query.since = parseTime("since", options.since, now);
  if (options.until !== undefined) query.until = parseTime("until", options.until, now);
  if (query.since !== undefined && query.until !== undefined && query.since > query.until) {
    throw new AgentError("INVALID_QUERY", `invalid time range: --since ${options.since} is after --until ${options.until}; swap the two values`);
  }
  if (options.limit !== undefined) query.limit = parseLimit(options.limit);
  return query;
}

/** Accepts spiffe://TD/ns/NS/sa/SA, the same without spiffe://, or a prefix ending with `*`. */
function parseIdentity(text: string): TextMatch {
  const prefix = text.endsWith("*");
  const bare = prefix ? text.slice(0, -1) : text;
  const value = bare === "" || bare.startsWith("spiffe://") || "spiffe://".startsWith(bare) ? bare : `spiffe://${bare}`;
  const valid = prefix ? !/[\s*]/.test(value) : SPIFFE_ID.test(value);
  if (!valid) {
    throw invalid("identity", text, "write spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT (spiffe:// may be left out), or a prefix ending with *, for example spiffe://cluster.local/ns/shop/*");
  }
  return { value, prefix };
}

function parseWorkload(text: string): { namespace?: string; name: string } {
  const parts = text.split("/");
  const name = parts[parts.length - 1];
  const namespace = parts.length === 2 ? parts[0] : undefined;
  const valid = parts.length <= 2 && DNS_SUBDOMAIN.test(name) && (namespace === undefined || DNS_LABEL.test(namespace));
  if (!valid) throw invalid("workload", text, "write NAMESPACE/NAME or NAME of a pod, for example shop/web");
  return namespace === undefined ? { name } : { namespace, name };
}

function parseType(text: string): TextMatch {
  const prefix = text.endsWith(".");
  const valid = prefix ? /^[a-z]+\.$/.test(text) : /^[a-z]+\.[a-z_]+$/.test(text);
  if (!valid) throw invalid("type", text, "write a record type such as connection.completed, or a prefix ending with a dot such as policy.");
  return { value: text, prefix };
}

/** Parses an RFC 3339 time, or a duration (30s, 15m, 2h, 7d) counted back from `now`. */
function parseTime(option: string, text: string, now: number): number {
  const duration = DURATION.exec(text);
  if (duration) return now - Number(duration[1]) * DURATION_UNIT_MS[duration[2]];
  const time = parseRfc3339(text);
  if (time === undefined) {
    throw invalid(option, text, "write an RFC 3339 time such as 2026-03-01T10:00:00Z, or a duration before now in seconds, minutes, hours or days such as 30s, 15m, 2h or 7d");
  }
  return time;
}

/**
 * Returns milliseconds since the epoch, or undefined when a field is out of range. Date.parse()
 * rolls 2026-02-31 over to March 3, so each field is checked against the date it builds. A leap
 * second (:60) is rejected, as Date cannot hold it.
 */
function parseRfc3339(text: string): number | undefined {
  const match = RFC3339.exec(text);
  if (match === null) return undefined;
  const [year, month, day, hour, minute, second] = match.slice(1, 7).map(Number);
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hour, minute, second, match[7] === undefined ? 0 : Number(`${match[7].slice(1)}00`.slice(0, 3)));
  const fields = [date.getUTCFullYear(), date.getUTCMonth() + 1, date.getUTCDate(), date.getUTCHours(), date.getUTCMinutes(), date.getUTCSeconds()];
  if (fields.some((field, index) => field !== [year, month, day, hour, minute, second][index])) return undefined;
  if (match[8] === undefined) return date.getTime();
  const [offsetHours, offsetMinutes] = [Number(match[9]), Number(match[10])];
  if (offsetHours > 23 || offsetMinutes > 59) return undefined;
  const offset = (offsetHours * 60 + offsetMinutes) * 60_000;
  return match[8] === "+" ? date.getTime() - offset : date.getTime() + offset;
}

function parseLimit(text: string): number {
  const limit = /^\d+$/.test(text) ? Number(text) : Number.NaN;
  if (!(limit >= 1 && limit <= MAX_QUERY_LIMIT)) throw invalid("limit", text, `write a whole number of records from 1 to ${MAX_QUERY_LIMIT}`);
  return limit;
}

/** Whether a --type that is well formed can match any record type of schema version 1. */
export function typeIsKnown(type: TextMatch): boolean {
  return KNOWN_RECORD_TYPES.some((known) => (type.prefix ? known.startsWith(type.value) : known === type.value));
}

/** A record as read from a file: any JSON object, since files may hold records of other versions. */
export type StoredRecord = Record<string, unknown>;

interface Peer {
  workload?: unknown;
  namespace?: unknown;
  identity?: unknown;
}

/** Checks one record against every filter that is set. */
export function matchesQuery(record: StoredRecord, query: AuditQuery): boolean {
  const type = typeof record.type === "string" ? record.type : "";
  if (query.type !== undefined && !matchesText(type, query.type)) return false;
  if (query.since !== undefined || query.until !== undefined) {
    const time = typeof record.time === "string" ? Date.parse(record.time) : Number.NaN;
    if (Number.isNaN(time)) return false;
    if (query.since !== undefined && time < query.since) return false;
    if (query.until !== undefined && time > query.until) return false;
  }
  return type.startsWith("connection.") ? matchesConnection(record, query) : matchesControl(record, type, query);
}

function matchesConnection(record: StoredRecord, query: AuditQuery): boolean {
  const peers = [record.src, record.dst].filter((peer): peer is Peer => typeof peer === "object" && peer !== null);
  if (query.identity !== undefined && !peers.some((peer) => typeof peer.identity === "string" && matchesText(peer.identity, query.identity!))) return false;
  if (query.workload !== undefined && !peers.some((peer) => matchesWorkload(peer.namespace, peer.workload, query.workload!))) return false;
  if (query.namespace !== undefined && !peers.some((peer) => peer.namespace === query.namespace)) return false;
  if (query.decision !== undefined && record.decision !== query.decision) return false;
  if (query.policy !== undefined && record.policy !== query.policy && !dryRunPolicies(record).includes(query.policy)) return false;
  return true;
}

/**
 * Control records carry no decision, so --decision excludes them. --identity applies to the
 * workload.* and certificate.* records, --workload to workload.*, --namespace to workload.* and
 * policy.*, and --policy to policy.*.
 */
function matchesControl(record: StoredRecord, type: string, query: AuditQuery): boolean {
  if (query.decision !== undefined) return false;
  const policy = type.startsWith("policy.") && typeof record.policy === "object" && record.policy !== null ? (record.policy as { namespace?: unknown; name?: unknown }) : undefined;
  const isWorkload = type.startsWith("workload.");
  if (query.identity !== undefined) {
    const identity = isWorkload || type.startsWith("certificate.") ? record.identity : undefined;
    if (typeof identity !== "string" || !matchesText(identity, query.identity)) return false;
  }
  if (query.workload !== undefined && !(isWorkload && matchesWorkload(record.namespace, record.workload, query.workload))) return false;
  if (query.namespace !== undefined) {
    const namespace = isWorkload ? record.namespace : policy?.namespace;
    if (namespace !== query.namespace) return false;
  }
  if (query.policy !== undefined && (policy === undefined || `${policy.namespace}/${policy.name}` !== query.policy)) return false;
  return true;
}

function matchesText(text: string, match: TextMatch): boolean {
  return match.prefix ? text.startsWith(match.value) : text === match.value;
}

function matchesWorkload(namespace: unknown, name: unknown, match: { namespace?: string; name: string }): boolean {
  return name === match.name && (match.namespace === undefined || namespace === match.namespace);
}

function dryRunPolicies(record: StoredRecord): unknown[] {
  return Array.isArray(record.dry_run) ? record.dry_run.map((entry: { policy?: unknown } | null) => entry?.policy) : [];
}

/** A record that matched, with its line unchanged. */
export interface QueryMatch {
  /** The bytes of the line, without its 0x0A: they are only valid until `onMatch` returns or resolves. */
  bytes: Buffer;
  record: StoredRecord;
}

export interface QuerySummary {
  /** Lines that hold a JSON object. */
  records: number;
  matched: number;
  /** Lines skipped because they are not a JSON object (torn or edited lines) or longer than MAX_LINE_BYTES. */
  skipped: number;
  /** File and line number of the first skipped line. */
  firstSkipped?: string;
}

/**
 * Streams the records of `files` in order and hands every match to `onMatch`, or with a limit the
 * last `limit` matches once the files are read. `onMatch` may return a promise to pause reading
 * (for example until stdout drains). Rejects when a file cannot be read.
 */
export async function queryAuditFiles(
  files: readonly string[],
  query: AuditQuery,
  onMatch: (match: QueryMatch) => void | Promise<void>,
): Promise<QuerySummary> {
  const summary: QuerySummary = { records: 0, matched: 0, skipped: 0 };
  // With a limit, copies of the last `limit` matching lines are kept in a ring and parsed again at the end.
  const ring: Buffer[] = [];
  for (const file of files) {
    for await (const line of readFileLines(file)) {
      const record = line.tooLong ? undefined : parseRecord(line.bytes);
      if (record === undefined) {
        summary.skipped += 1;
        summary.firstSkipped ??= `${file}:${line.number}`;
        continue;
      }
      summary.records += 1;
      if (!matchesQuery(record, query)) continue;
      summary.matched += 1;
      if (query.limit === undefined) {
        await onMatch({ bytes: line.bytes, record });
        continue;
      }
      ring[(summary.matched - 1) % query.limit] = Buffer.from(line.bytes);
    }
  }
  if (query.limit !== undefined) {
    const start = summary.matched > query.limit ? summary.matched % query.limit : 0;
    for (let index = 0; index < ring.length; index += 1) {
      const bytes = ring[(start + index) % ring.length];
      await onMatch({ bytes, record: parseRecord(bytes)! });
    }
  }
  return summary;
}

/** Parses a line as a JSON object. Invalid UTF-8 is decoded to U+FFFD: `audit verify` reports it. */
function parseRecord(bytes: Buffer): StoredRecord | undefined {
  try {
    const value: unknown = JSON.parse(bytes.toString("utf8"));
    return typeof value === "object" && value !== null && !Array.isArray(value) ? (value as StoredRecord) : undefined;
  } catch {
    return undefined;
  }
}
