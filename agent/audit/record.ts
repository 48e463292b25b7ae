import type { Decision, Direction } from "../state/types";

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

/** One connection seen by the agent; exactly one record per connection and direction. */
export interface AuditRecord {
  /** RFC 3339 time at which the connection ended. */
  time: string;
  /** RFC 3339 time at which the connection was accepted. */
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
  dry_run?: { policy: string; rule?: number; decision: Decision }[];
  /** Machine-readable reason, such as allowed_by_policy, no_policy, denied_by_policy or no_allow_match (docs/audit.md lists all). */
  reason: string;
  bytes_sent: number;
  bytes_recv: number;
  duration_ms: number;
  /** Stable error code and message when the connection failed; absent on success. */
  error?: { code: string; message: string };
}

/** A destination for records. write() must not throw and must not lose a record it accepted. */
export interface AuditSink {
  write(record: AuditRecord): void;
  /** Resolves once every accepted record is durably written, or the sink gave up and logged it. */
  flush(): Promise<void>;
  close(): Promise<void>;
}
