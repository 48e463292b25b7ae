// The audit record schema, version 1 (docs/audit.md). Every record is one JSON object with the
// envelope fields (`time`, `type`, `node`, and the chain fields added when the record is spooled)
// followed by the fields of its type.

import type { Decision, Direction } from "../state/types";

/** Version of the record schema, written in every record as `v`. */
export const AUDIT_SCHEMA_VERSION = 1;

/** One side of a connection in an audit record. Fields are omitted when unknown. */
export interface AuditPeer {
  /** "ip:port". */
  addr: string;
  workload?: string;
  namespace?: string;
  /** SPIFFE URI, present only when proven by a certificate (source) or expected of the peer (destination). */
  identity?: string;
  service?: string;
  /** Destination only: "ip:15008" when the connection went through an HBONE tunnel. */
  hbone_addr?: string;
}

/** The transport of the bytes between the two nodes. */
export type Transport = "hbone" | "plaintext";

/** A dry-run policy that would have changed the decision. */
export interface DryRunEffect {
  policy: string;
  rule?: number;
  decision: Decision;
}

/** Fields shared by the opened and the completed record of a connection. */
export interface ConnectionFields {
  /** RFC 3339 time at which the agent accepted the connection. */
  start: string;
  node: string;
  connection_id: string;
  direction: Direction;
  src: AuditPeer;
  dst: AuditPeer;
  transport: Transport;
  decision: Decision;
  /** "namespace/name" of the policy that decided, absent when no policy decided. */
  policy?: string;
  /** The kind of `policy`: AuthorizationPolicy, or PeerAuthentication for a STRICT denial. */
  policy_kind?: "AuthorizationPolicy" | "PeerAuthentication";
  /** Index in the AuthorizationPolicy's spec.rules of the rule that matched. */
  rule?: number;
  /** Dry-run policies (istio.io/dry-run) that would have changed the decision, had they been enforced. */
  dry_run?: DryRunEffect[];
  /** Machine-readable reason, such as allowed_by_policy, no_policy, denied_by_policy or no_allow_match (docs/audit.md lists all). */
  reason: string;
}

/** Written once a connection is established: authorized, and connected to its destination. */
export interface ConnectionOpenedRecord extends ConnectionFields {
  type: "connection.opened";
  /** RFC 3339 time at which the connection was established. */
  time: string;
}

/** Written exactly once per connection, when it ends, including refused and failed ones. */
export interface ConnectionCompletedRecord extends ConnectionFields {
  type: "connection.completed";
  /** RFC 3339 time at which the connection ended. */
  time: string;
  /** Whether a `connection.opened` record was written for the connection. */
  established: boolean;
  /** Bytes from the source to the destination application; absent when unknown (after an agent crash). */
  bytes_sent?: number;
  /** Bytes from the destination application back to the source; absent when unknown. */
  bytes_recv?: number;
  /** Time from `start` to `time`; absent when unknown. */
  duration_ms?: number;
  /** Response flag of the error code (docs/audit.md), present with `error`. */
  flag?: string;
  /** Stable error code and message when the connection failed; absent on success. */
  error?: { code: string; message: string };
}

/** A policy named in a control record. */
export interface PolicyRef {
  kind: string;
  namespace?: string;
  name?: string;
}

/** The agent's listeners as `connection.refused` names them. */
export type RefusalListener = "outbound" | "inbound" | "inbound_plaintext" | "admin" | "metrics" | "readiness";

/** The cause for which a listener refused a connection or a limit closed one (docs/limits.md describes each). */
export type RefusalReason =
  | "connections_per_pod"
  | "connections_per_peer"
  | "streams_per_connection"
  | "streams_per_peer"
  | "header_list_size"
  | "handshake_timeout"
  | "tls_handshake"
  | "http2_protocol"
  | "http2_flood"
  | "idle_timeout"
  | "buffered_bytes"
  | "proxy_port_target"
  | "admin_connections"
  | "request_timeout";

/**
 * The record of connections refused before they had a connection record: at the TCP, TLS or
 * HTTP/2 level, or by a limit at accept. Refusals with the same listener, reason, source IP and
 * destination within one window are folded into one record with their `count`.
 */
export interface ConnectionRefusedRecord {
  type: "connection.refused";
  time: string;
  node: string;
  listener: RefusalListener;
  /** The listener's port, such as 15001, 15008, 15006, 15000, 15020 or 15021. */
  port: number;
  /** The client: "ip:port" at least, and its workload, namespace and identity when known. */
  src: AuditPeer;
  /** The pod, or the original destination, when known. */
  dst?: AuditPeer;
  reason: RefusalReason;
  /** One sentence naming the value and the limit. */
  message: string;
  /** The configured limit, when a limit refused the connection: a count, bytes, or seconds for a timeout. */
  limit?: number;
  /** Refusals with the same key since the previous record for that key, at least 1. */
  count: number;
  /** RFC 3339 time of the first of those `count` refusals. */
  first_time: string;
}

/** Records about the agent itself rather than one connection. */
export type ControlRecord =
  | { type: "agent.started"; time: string; node: string; version: string; pid: number; previous_stop?: "clean" | "unclean"; settings: Record<string, unknown> }
  | { type: "agent.stopped"; time: string; node: string; reason: string; open_connections: number }
  | { type: "capture.mode"; time: string; node: string; mode: string; requested: string; reason: string; previous_mode?: string }
  | { type: "workload.enrolled" | "workload.unenrolled"; time: string; node: string; workload: string; namespace: string; ip?: string; identity?: string; reason: string }
  | { type: "policy.added" | "policy.changed" | "policy.removed"; time: string; node: string; policy: PolicyRef; file?: string; previous_file?: string; changes?: PolicyChange[]; changes_omitted?: number }
  | { type: "policy.rejected"; time: string; node: string; policy: PolicyRef; file: string; line?: number; message: string }
  | { type: "certificate.issued" | "certificate.rotated"; time: string; node: string; identity: string; serial: string; not_before: string; not_after: string; fingerprint_sha256: string; issuer?: string }
  | ConnectionRefusedRecord
  | { type: "audit.gap"; time: string; node: string; reason: "queue_full" | "spool_full" | "spool_damaged"; lost: number; first_time?: string; last_time?: string; sink?: string; first_seq?: number; last_seq?: number; unreported_lost?: number; unreported_first_seq?: number };

/**
 * One changed field of a policy: its path in the object, and the values before and after (absent
 * when the field did not exist). A `policy.changed` record lists at most 50, and `changes_omitted`
 * counts the rest. `previous_file` is set when the policy moved to another manifest file.
 */
export interface PolicyChange {
  path: string;
  before?: unknown;
  after?: unknown;
}

/** A record as the agent produces it, before the pipeline adds the chain fields. */
export type AuditEvent = ConnectionOpenedRecord | ConnectionCompletedRecord | ControlRecord;

/** The fields the pipeline adds when it spools a record; `hash` is computed over the rest of the line. */
export interface ChainFields {
  v: number;
  /** Position in this node's chain, starting at 1 and increasing by one per record. */
  seq: number;
  /** Random UUID of the record, the key for de-duplication at the sinks. */
  id: string;
  /** `hash` of the record with seq - 1, or 64 zeros for seq 1. */
  prev_hash: string;
}

/** A record as spooled and shipped: the event with its chain fields and hash. */
export type SealedRecord = AuditEvent & ChainFields & { hash: string };

/** The legacy name of the completed connection record, which the proxies build. */
export type AuditRecord = ConnectionCompletedRecord;

/** The data path's view of the audit pipeline: hands a record over and returns at once. */
export interface AuditRecorder {
  /** Queues the record. A recorder that redacts does it in place before returning, so later readers of the object see the redacted values. */
  write(record: AuditEvent): void;
  /** True when redaction rules apply, so that callers leave unredacted details (such as request headers) out of their logs. */
  readonly redacting?: boolean;
}
