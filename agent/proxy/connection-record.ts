// The audit record of one proxied connection, filled in as the connection progresses and written
// exactly once, from the proxies' finally paths, so that failures are recorded too.

import crypto from "node:crypto";
import type { AuditPeer, AuditRecord, AuditRecorder, ConnectionFields, Transport } from "../audit/record";
import { AgentError, ERROR_CODES, errorCodeOf } from "../errors";
import { accessLogger, type Logger } from "../log";
import type { AuthorizationResult } from "../rbac/types";
import type { Decision, Direction, Workload } from "../state/types";
import type { ByteCounters } from "./copy";

/** The registry that records join while their connection is open, such as the agent's ConnectionTracker. */
export interface ConnectionRegistry {
  /** Registers a record when its connection is accepted. */
  add(record: ConnectionRecord): void;
  /** Reports the establishment of a registered connection. */
  opened(record: ConnectionRecord): void;
  /** Removes a record once it is written. */
  remove(record: ConnectionRecord): void;
}

export interface ConnectionRecordInit {
  node: string;
  direction: Direction;
  transport: Transport;
  src: AuditPeer;
  dst: AuditPeer;
  /** The tracker of the agent's open connections; the record registers with it now and leaves it in write(). */
  tracker?: ConnectionRegistry;
  /** The uid (namespace/name) of the enrolled pod whose proxy serves the connection. */
  workload?: string;
}

/** Describes a workload as one side of an audit record. */
export function peerOf(addr: string, workload: Workload | undefined, identity?: string): AuditPeer {
  const peer: AuditPeer = { addr };
  if (workload) {
    peer.workload = workload.name;
    peer.namespace = workload.namespace;
  }
  if (identity) {
    peer.identity = identity;
  }
  return peer;
}

export class ConnectionRecord {
  readonly id = crypto.randomUUID();
  /** Milliseconds since the epoch, kept as a number: a record lives as long as its connection. */
  readonly #startedAt = Date.now();
  readonly #startedNs = process.hrtime.bigint();
  readonly #node: string;
  readonly #direction: Direction;
  readonly #tracker: ConnectionRegistry | undefined;
  /** The uid of the enrolled pod whose proxy serves the connection; empty when the proxy did not give it. */
  readonly workload: string;
  /**
   * Bytes copied so far, which the copy adds to while the connection is open: forward is from the
   * source to the destination, backward the other way.
   */
  readonly counters: ByteCounters = { bytesForward: 0, bytesBackward: 0 };
  #written = false;
  #opened = false;

  src: AuditPeer;
  dst: AuditPeer;
  transport: Transport;
  decision: Decision = "allow";
  reason = "allowed";
  policy: string | undefined;
  policyKind: AuthorizationResult["policyKind"];
  rule: number | undefined;
  dryRun: AuthorizationResult["dryRun"] = [];
  error: { code: string; message: string } | undefined;
  /**
   * Whether the proxy routed the connection, whatever authorization decides next. Outbound, that is
   * once a route was chosen. Inbound, it is once the CONNECT request or the dialled address passed
   * its checks. Istio's TCP metrics count only routed connections, as ztunnel does.
   */
  routed = false;

  constructor(init: ConnectionRecordInit) {
    this.#node = init.node;
    this.#direction = init.direction;
    this.src = { ...init.src };
    this.dst = { ...init.dst };
    this.transport = init.transport;
    this.workload = init.workload ?? "";
    this.#tracker = init.tracker;
    this.#tracker?.add(this);
  }

  /** Bytes from the source to the destination, counted while they flow. */
  get bytesSent(): number {
    return this.counters.bytesForward;
  }

  set bytesSent(bytes: number) {
    this.counters.bytesForward = bytes;
  }

  /** Bytes from the destination to the source, counted while they flow. */
  get bytesRecv(): number {
    return this.counters.bytesBackward;
  }

  set bytesRecv(bytes: number) {
    this.counters.bytesBackward = bytes;
  }

  get direction(): Direction {
    return this.#direction;
  }

  /** Milliseconds since the epoch at which the proxy accepted the connection. */
  get startedAt(): number {
    return this.#startedAt;
  }

  /** Whether the connection was established: authorized and connected to its destination. */
  get established(): boolean {
    return this.#opened;
  }

  /** Records the first failure; later ones are consequences of it. */
  fail(error: unknown): void {
    this.error ??= {
      code: errorCodeOf(error),
      message: error instanceof Error ? error.message : String(error),
    };
  }

  /** Records a refusal before any byte flowed: decision deny with a reason and the error behind it. */
  deny(reason: string, error: AgentError, policy?: string): void {
    this.decision = "deny";
    this.reason = reason;
    this.policy = policy;
    this.fail(error);
  }

  /** Records an authorization result: the decision, its reason, the deciding policy and rule, dry-run effects. */
  authorized(result: AuthorizationResult): void {
    this.decision = result.decision;
    this.reason = result.reason;
    this.policy = result.policy;
    this.policyKind = result.policyKind;
    this.rule = result.rule;
    this.dryRun = result.dryRun;
  }

  /** The fields shared by the opened and the completed record. */
  #fields(): ConnectionFields {
    const fields: ConnectionFields = {
      start: new Date(this.#startedAt).toISOString(),
      node: this.#node,
      connection_id: this.id,
      direction: this.#direction,
      src: this.src,
      dst: this.dst,
      transport: this.transport,
      decision: this.decision,
      reason: this.reason,
    };
    if (this.policy !== undefined) {
      fields.policy = this.policy;
      if (this.policyKind !== undefined) fields.policy_kind = this.policyKind;
    }
    if (this.rule !== undefined) fields.rule = this.rule;
    if (this.dryRun.length > 0) fields.dry_run = this.dryRun;
    return fields;
  }

  /** Builds the completion record; the time is the end of the connection. */
  toAuditRecord(): AuditRecord {
    const record: AuditRecord = {
      type: "connection.completed",
      time: new Date().toISOString(),
      ...this.#fields(),
      established: this.#opened,
      bytes_sent: this.bytesSent,
      bytes_recv: this.bytesRecv,
      duration_ms: Number(process.hrtime.bigint() - this.#startedNs) / 1e6,
    };
    if (this.error !== undefined) {
      record.flag = flagOf(this.error.code);
      record.error = this.error;
    }
    return record;
  }

  /**
   * Writes the `connection.opened` record once the connection is established (authorized and
   * connected to its destination); every call after the first does nothing. The source and
   * destination objects are copied, because the proxies keep filling them in.
   */
  opened(sink: AuditRecorder): void {
    if (this.#opened || this.#written) return;
    this.#opened = true;
    this.routed = true;
    this.#tracker?.opened(this);
    const fields = this.#fields();
    fields.src = { ...fields.src };
    fields.dst = { ...fields.dst };
    try {
      sink.write({ type: "connection.opened", time: new Date().toISOString(), ...fields });
    } catch {
      // write() of the pipeline does not throw; a test double that throws loses only this record.
    }
  }

  /**
   * Writes the record to the sink and logs the connection's end; every call after the first does
   * nothing. `context` adds fields to the log line only, such as request headers. The line carries
   * the connection's id and addresses itself, so callers need no child logger per connection.
   */
  write(sink: AuditRecorder, logger: Logger, context?: Record<string, unknown>): void {
    if (this.#written) {
      return;
    }
    this.#written = true;
    this.#tracker?.remove(this);
    const record = this.toAuditRecord();
    try {
      sink.write(record);
    } catch (error) {
      logger.error({ err: error, connection_id: record.connection_id }, "audit sink rejected a connection record");
    }
    // The record's fields are redacted by now; request headers are not, so they stay out of the log then.
    logConnectionEnd(logger, record, sink.redacting ? undefined : context);
  }
}

/**
 * Returns the error of a connection that authorization denied. `client` names the client, as in
 * "spiffe://cluster.local/ns/a/sa/b" or "plaintext client 10.0.0.1:40000".
 */
export function denialError(result: AuthorizationResult, client: string, destination: string): AgentError {
  if (result.reason === "mtls_required") {
    const policy = result.policy === undefined ? "PeerAuthentication" : `PeerAuthentication ${result.policy}`;
    return new AgentError("MTLS_REQUIRED", `${client} may not connect to ${destination}: ${policy} requires mutual TLS (STRICT) on this port`);
  }
  const by = result.policy === undefined ? "no ALLOW policy matches" : `AuthorizationPolicy ${result.policy} rules[${result.rule}] denies it`;
  return new AgentError("POLICY_DENIED", `${client} may not connect to ${destination}: ${by} (${result.reason})`);
}

function logConnectionEnd(proxyLogger: Logger, record: AuditRecord, context: Record<string, unknown> | undefined): void {
  // Component "access", like ztunnel's access log, so that its level is set apart from the proxy's.
  const logger = accessLogger(proxyLogger);
  const failed = record.error !== undefined;
  if (!logger.isLevelEnabled(failed ? "warn" : "info")) {
    return;
  }
  const fields: Record<string, unknown> = {
    connection_id: record.connection_id,
    direction: record.direction,
    "src.addr": record.src.addr,
    "src.identity": record.src.identity,
    "dst.addr": record.dst.addr,
    "dst.service": record.dst.service,
    "dst.hbone_addr": record.dst.hbone_addr,
    "dst.identity": record.dst.identity,
    ...context,
    decision: record.decision,
    policy: record.policy,
    rule: record.rule,
    dry_run: record.dry_run,
    reason: record.reason,
    bytes_sent: record.bytes_sent,
    bytes_recv: record.bytes_recv,
    duration_ms: Math.round((record.duration_ms ?? 0) * 1000) / 1000,
    flag: record.error ? flagOf(record.error.code) : undefined,
    error: record.error?.message,
  };
  if (failed) {
    logger.warn(fields, "connection failed");
  } else {
    logger.info(fields, "connection complete");
  }
}

/** Returns the response flag of an error code, such as DENY for POLICY_DENIED; INTERNAL for an unknown code. */
export function flagOf(code: string): string {
  return code in ERROR_CODES ? ERROR_CODES[code as keyof typeof ERROR_CODES].flag : "INTERNAL";
}
