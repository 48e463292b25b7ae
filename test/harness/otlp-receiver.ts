// An OTLP/gRPC logs receiver for tests: a grpc-js server for LogsService/Export built from the
// agent's own OTLP definitions, listening on 127.0.0.1. It decodes every log record back to plain
// objects and keeps them in arrival order, duplicates included, and it fails, rejects, delays or
// goes away on demand, so tests can check that each audit record arrives exactly once after de-dup.

import * as grpc from "@grpc/grpc-js";
import { EVENT_NAME_ATTRIBUTE, RECORD_ID_ATTRIBUTE, SEQ_ATTRIBUTE } from "../../agent/audit/sinks/otlp-mapping";
import {
  fromAnyValue,
  fromKeyValues,
  loadLogsService,
  type ExportLogsRequestMessage,
  type ExportLogsResponseMessage,
  type LogRecordMessage,
} from "../../agent/audit/sinks/otlp-proto";

export interface OtlpReceiverOptions {
  /** Port on 127.0.0.1; 0 (the default) picks a free one, which restart() keeps. */
  port?: number;
  /** Serve TLS with this certificate chain and key (PEM) instead of plaintext. */
  tls?: {
    certChainPem: string;
    keyPem: string;
    /** When set, clients must present a certificate that chains to these roots (PEM). */
    clientCaPem?: string;
  };
}

/** One log record as the receiver decoded it. */
export interface ReceivedLogRecord {
  /** The log.record.uid attribute: the audit record's id. */
  id: string;
  /** The audit.seq attribute. */
  seq: number;
  /** The event_name field. */
  type: string;
  /** The body, decoded from its kvlist to a plain object. */
  record: Record<string, unknown>;
  severity: number;
  severityText: string;
  timeUnixNano: string;
  observedTimeUnixNano: string;
  attributes: Record<string, unknown>;
  resource: Record<string, unknown>;
  scope: { name?: string; version?: string };
}

/** One Export call and the response the receiver sent. */
export interface ReceivedExport {
  /** Metadata of the call, names lowercase, each with its values. */
  metadata: Record<string, string[]>;
  records: number;
  /** The status of the response: OK for accepted calls, partial successes included. */
  status: grpc.status;
  /** Records reported as rejected through partial_success. */
  rejected: number;
}

type ExportCall = grpc.ServerUnaryCall<ExportLogsRequestMessage, ExportLogsResponseMessage>;
type ExportCallback = grpc.sendUnaryData<ExportLogsResponseMessage>;

export class OtlpReceiver {
  /** Every accepted log record in arrival order, duplicates included. */
  readonly records: ReceivedLogRecord[] = [];
  readonly exports: ReceivedExport[] = [];
  readonly #options: OtlpReceiverOptions;
  #server: grpc.Server | undefined;
  #port = 0;
  readonly #failures: { code: grpc.status; details: string }[] = [];
  readonly #rejections: { count: number; message: string }[] = [];
  readonly #delays: number[] = [];
  readonly #waiters = new Set<() => void>();

  private constructor(options: OtlpReceiverOptions) {
    this.#options = options;
    this.#port = options.port ?? 0;
  }

  /** Starts a receiver on 127.0.0.1. */
  static async start(options: OtlpReceiverOptions = {}): Promise<OtlpReceiver> {
    const receiver = new OtlpReceiver(options);
    await receiver.listen();
    return receiver;
  }

  /** "127.0.0.1:<port>", the sink's endpoint. */
  get address(): string {
    return `127.0.0.1:${this.#port}`;
  }

  get port(): number {
    return this.#port;
  }

  get running(): boolean {
    return this.#server !== undefined;
  }

  /** Fails the next `count` calls with `code` and stores none of their records. */
  failNext(count: number, code: grpc.status = grpc.status.UNAVAILABLE, details = "injected failure"): void {
    for (let i = 0; i < count; i += 1) this.#failures.push({ code, details });
  }

  /**
   * Replies to the next call with a partial success that rejects `count` records: the last `count`
   * records of that call are dropped, and the rest are stored.
   */
  rejectNext(count: number, message = "injected rejection"): void {
    this.#rejections.push({ count, message });
  }

  /** Delays the reply to the next call by `ms`. */
  delayNext(ms: number): void {
    this.#delays.push(ms);
  }

  /** Returns the first copy of each record, ordered by seq. */
  uniqueRecords(): ReceivedLogRecord[] {
    const byId = new Map<string, ReceivedLogRecord>();
    for (const record of this.records) if (!byId.has(record.id)) byId.set(record.id, record);
    return [...byId.values()].sort((a, b) => a.seq - b.seq);
  }

  /** Counts the stored records whose id arrived before. */
  duplicateCount(): number {
    return this.records.length - new Set(this.records.map((record) => record.id)).size;
  }

  /** Resolves once at least `count` distinct ids arrived; rejects after `timeoutMs`. */
  async waitForUnique(count: number, timeoutMs = 10_000): Promise<void> {
    const reached = (): boolean => new Set(this.records.map((record) => record.id)).size >= count;
    if (reached()) return;
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (!reached()) return;
        clearTimeout(timer);
        this.#waiters.delete(check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.#waiters.delete(check);
        reject(new Error(`the OTLP receiver has ${new Set(this.records.map((record) => record.id)).size} distinct records after ${timeoutMs} ms; expected ${count}`));
      }, timeoutMs);
      this.#waiters.add(check);
    });
  }

  /** Stops listening and drops open connections, as a crashed collector would. Records are kept. */
  async stop(): Promise<void> {
    const server = this.#server;
    if (server === undefined) return;
    this.#server = undefined;
    server.forceShutdown();
  }

  /** Starts listening again on the same port, after stop(). */
  async restart(): Promise<void> {
    await this.stop();
    await this.listen();
  }

  private async listen(): Promise<void> {
    const server = new grpc.Server();
    const Service = loadLogsService();
    server.addService(Service.service, {
      Export: (call: ExportCall, callback: ExportCallback) => this.handle(call, callback),
    });
    this.#port = await new Promise<number>((resolve, reject) => {
      server.bindAsync(`127.0.0.1:${this.#port}`, this.credentials(), (error, port) => (error ? reject(error) : resolve(port)));
    });
    this.#server = server;
  }

  private credentials(): grpc.ServerCredentials {
    const tls = this.#options.tls;
    if (tls === undefined) return grpc.ServerCredentials.createInsecure();
    const clientCa = tls.clientCaPem === undefined ? null : Buffer.from(tls.clientCaPem);
    return grpc.ServerCredentials.createSsl(clientCa, [{ private_key: Buffer.from(tls.keyPem), cert_chain: Buffer.from(tls.certChainPem) }], clientCa !== null);
  }

  private handle(call: ExportCall, callback: ExportCallback): void {
    const delay = this.#delays.shift();
    if (delay === undefined) this.answer(call, callback);
    else setTimeout(() => this.answer(call, callback), delay).unref();
  }

  private answer(call: ExportCall, callback: ExportCallback): void {
    const decoded = decodeRequest(call.request);
    const metadata = metadataOf(call.metadata);

    const failure = this.#failures.shift();
    if (failure !== undefined) {
      this.exports.push({ metadata, records: decoded.length, status: failure.code, rejected: 0 });
      callback({ code: failure.code, details: failure.details });
      return;
    }

    const rejection = this.#rejections.shift();
    const rejected = Math.min(rejection?.count ?? 0, decoded.length);
    this.records.push(...decoded.slice(0, decoded.length - rejected));
    this.exports.push({ metadata, records: decoded.length, status: grpc.status.OK, rejected });
    for (const waiter of [...this.#waiters]) waiter();

    if (rejection === undefined) callback(null, {});
    else callback(null, { partial_success: { rejected_log_records: rejected, error_message: rejection.message } });
  }
}

/** Decodes every log record of a request, resource and scope included. */
export function decodeRequest(request: ExportLogsRequestMessage): ReceivedLogRecord[] {
  const records: ReceivedLogRecord[] = [];
  for (const resourceLogs of request.resource_logs ?? []) {
    const resource = fromKeyValues(resourceLogs.resource?.attributes ?? []);
    for (const scopeLogs of resourceLogs.scope_logs ?? []) {
      const scope = { name: scopeLogs.scope?.name, version: scopeLogs.scope?.version };
      for (const logRecord of scopeLogs.log_records ?? []) records.push(decodeLogRecord(logRecord, resource, scope));
    }
  }
  return records;
}

function decodeLogRecord(
  logRecord: LogRecordMessage,
  resource: Record<string, unknown>,
  scope: ReceivedLogRecord["scope"],
): ReceivedLogRecord {
  const attributes = fromKeyValues(logRecord.attributes ?? []);
  const body = fromAnyValue(logRecord.body);
  return {
    id: String(attributes[RECORD_ID_ATTRIBUTE] ?? ""),
    seq: Number(attributes[SEQ_ATTRIBUTE] ?? NaN),
    type: logRecord.event_name ?? String(attributes[EVENT_NAME_ATTRIBUTE] ?? ""),
    record: body !== null && typeof body === "object" && !Array.isArray(body) ? (body as Record<string, unknown>) : {},
    severity: logRecord.severity_number ?? 0,
    severityText: logRecord.severity_text ?? "",
    timeUnixNano: logRecord.time_unix_nano ?? "0",
    observedTimeUnixNano: logRecord.observed_time_unix_nano ?? "0",
    attributes,
    resource,
    scope,
  };
}

function metadataOf(metadata: grpc.Metadata): Record<string, string[]> {
  const result: Record<string, string[]> = {};
  // getMap() keeps only the first value of each key, so it only lists the keys; get() returns every value.
  for (const key of Object.keys(metadata.getMap())) result[key] = metadata.get(key).map(String);
  return result;
}
