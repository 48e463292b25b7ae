// Ships audit records to an OpenTelemetry collector as OTLP logs over gRPC: one LogsService/Export
// call per batch, or several when its lines exceed MAX_REQUEST_LINE_BYTES. Each record's `id`
// travels as the log.record.uid attribute, so a receiver drops the copies that a resent batch
// delivers again. The channel is kept across calls, and grpc-js reconnects by itself after the
// collector restarts. otlp-encode.ts writes the requests' protobuf bytes directly, because
// building proto-loader's message objects took 7 to 14 times as much CPU per record (measured on
// batches of 500 connection records of about 1 kB).

import fs from "node:fs";
import * as grpc from "@grpc/grpc-js";
import { AgentError } from "../../errors";
import type { Logger } from "../../log";
import type { AuditSink, SendResult, SpooledRecord } from "../sink";
import { decodeExportResponse, encodeExportRequest } from "./otlp-encode";
import type { ExportLogsResponseMessage } from "./otlp-proto";

export const DEFAULT_OTLP_TIMEOUT_MS = 10_000;

/** The gRPC method path of opentelemetry.proto.collector.logs.v1.LogsService/Export. */
export const EXPORT_METHOD = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/**
 * Upper bound of grpc-js's reconnect backoff (its default is 120 s), so a collector that comes back
 * is reached again within about this long, plus the pipeline's own retry delay.
 */
const MAX_RECONNECT_BACKOFF_MS = 5_000;

/**
 * Maximum summed length of the JSON lines of the records in one Export request. A record's encoded
 * log record is about 1.3 times its line (measured with connection records of about 800 bytes), so
 * a request stays near 2.6 MB, under the 4 MiB that gRPC servers, the collector's included, accept
 * by default. Larger batches are split into several calls.
 */
export const MAX_REQUEST_LINE_BYTES = 2 * 1024 * 1024;
/** Largest encoded request sent: below the 4 MiB that gRPC servers accept by default, with room for framing. */
const MAX_REQUEST_BYTES = 3.5 * 1024 * 1024;

/** Maximum length of a collector's error_message in a log line; the rest is cut off. */
const MAX_LOGGED_MESSAGE_LENGTH = 500;

export interface OtlpTlsOptions {
  /** PEM file with the roots the collector's certificate must chain to; the system roots when absent. */
  ca?: string;
  /** PEM file with the client certificate chain for mutual TLS; requires `key`. */
  cert?: string;
  /** PEM file with the client private key; requires `cert`. */
  key?: string;
  /** The name checked against the collector's certificate, and sent as the :authority. Default the host of `endpoint`. */
  serverName?: string;
}

export interface OtlpSinkOptions {
  /** The collector's OTLP/gRPC address, "host:port" or "[ipv6]:port", for example 127.0.0.1:4317. */
  endpoint: string;
  /** TLS settings; absent means plaintext HTTP/2, for a collector on the node itself. */
  tls?: OtlpTlsOptions;
  /** gRPC metadata sent with every call, such as authorization. Values are never logged. */
  headers?: Record<string, string>;
  /** Deadline of one Export call, milliseconds. Default 10 000. */
  timeoutMs?: number;
  /** The node name, sent as the resource attribute k8s.node.name. */
  node: string;
}

export class OtlpLogsSink implements AuditSink {
  readonly name: string;
  /**
   * A remote call costs the agent far more than one record, so a batch that is not full waits up to
   * 500 ms to fill: at low rates this cut the agent's CPU per connection measurably (docs/benchmarks.md).
   */
  readonly lingerMs = 500;
  readonly endpoint: string;
  readonly #client: grpc.Client;
  readonly #metadata: grpc.Metadata;
  readonly #timeoutMs: number;
  readonly #node: string;
  readonly #logger: Logger;
  #failureStreak = 0;
  #rejectedTotal = 0;
  #lastWarning: string | undefined;
  #closed = false;

  /** Throws AgentError INVALID_AUDIT_SINK when the endpoint, a TLS file or a header is invalid. */
  constructor(options: OtlpSinkOptions, logger: Logger) {
    const host = parseEndpointHost(options.endpoint);
    this.endpoint = options.endpoint;
    this.name = `otlp:${options.endpoint}`;
    this.#timeoutMs = checkTimeout(options.timeoutMs ?? DEFAULT_OTLP_TIMEOUT_MS, options.endpoint);
    this.#node = options.node;
    this.#metadata = buildMetadata(options.headers ?? {}, options.endpoint);
    this.#logger = logger.child({ sink: this.name });

    this.#client = new grpc.Client(options.endpoint, buildCredentials(options), buildChannelOptions(options, host));
  }

  /** Returns undefined because a collector reports nothing about what it already holds, so the pipeline starts at its own cursor. */
  async open(): Promise<undefined> {
    return undefined;
  }

  /**
   * Exports the batch, in one call unless its lines exceed MAX_REQUEST_LINE_BYTES. Resolves when
   * the collector accepted every call, also when it rejected some records for good (partial
   * success, logged as a warning). Rejects with AgentError AUDIT_SINK_FAILED on the first gRPC
   * error, so that the pipeline sends the whole batch again: the calls before it are delivered twice.
   */
  async send(batch: readonly SpooledRecord[]): Promise<SendResult> {
    if (this.#closed) {
      throw new AgentError("AUDIT_SINK_FAILED", `the OTLP sink for ${this.endpoint} is closed; ${batch.length} audit records were not sent`);
    }
    let rejected = 0;
    const chunks = splitByLineBytes(batch, MAX_REQUEST_LINE_BYTES);
    while (chunks.length > 0) {
      const chunk = chunks.shift()!;
      const request = encodeExportRequest(chunk, this.#node);
      // Values such as long arrays of small numbers encode larger than their JSON: halve such a chunk.
      if (request.length > MAX_REQUEST_BYTES && chunk.length > 1) {
        const half = Math.ceil(chunk.length / 2);
        chunks.unshift(chunk.slice(0, half), chunk.slice(half));
        continue;
      }
      let response: ExportLogsResponseMessage;
      try {
        response = await this.export(request);
      } catch (error) {
        throw this.exportFailed(chunk, error as grpc.ServiceError);
      }
      rejected += this.exportSucceeded(chunk, response);
    }
    return { rejected };
  }

  /** Closes the channel; a call in flight fails with CANCELLED. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#client.close();
  }

  /** Sends one ExportLogsServiceRequest that encodeExportRequest() encoded, so serializing returns the bytes as they are. */
  private export(request: Buffer): Promise<ExportLogsResponseMessage> {
    const deadline = Date.now() + this.#timeoutMs;
    return new Promise((resolve, reject) => {
      this.#client.makeUnaryRequest<Buffer, ExportLogsResponseMessage>(
        EXPORT_METHOD,
        passEncoded,
        decodeExportResponse,
        request,
        this.#metadata.clone(),
        { deadline },
        (error, response) => {
          if (error) reject(error);
          else resolve(response ?? {});
        },
      );
    });
  }

  /** Logs a recovery or a partial success, and returns how many records the collector rejected (at most the batch's). */
  private exportSucceeded(batch: readonly SpooledRecord[], response: ExportLogsResponseMessage): number {
    if (this.#failureStreak > 0) {
      this.#logger.info({ failures: this.#failureStreak }, "OTLP export succeeded again after failed attempts");
      this.#failureStreak = 0;
    }

    const partial = response.partial_success;
    // A collector may report any number: a count above the call's records, or below 0, is clamped.
    const reported = Number(partial?.rejected_log_records ?? 0);
    const rejected = Number.isFinite(reported) ? Math.min(Math.max(reported, 0), batch.length) : 0;
    const message = (partial?.error_message ?? "").slice(0, MAX_LOGGED_MESSAGE_LENGTH);
    if (rejected > 0) {
      this.#rejectedTotal += rejected;
      this.#logger.warn(
        { rejected, records: batch.length, firstSeq: batch[0].seq, lastSeq: batch[batch.length - 1].seq, rejectedTotal: this.#rejectedTotal, message },
        "the OTLP collector rejected audit records for good; they are not sent again",
      );
    } else if (message !== "" && message !== this.#lastWarning) {
      // A full success may carry a warning; it is logged once until it changes.
      this.#logger.warn({ message }, "the OTLP collector accepted the batch and returned a warning");
    }
    this.#lastWarning = message === "" ? undefined : message;
    return rejected;
  }

  private exportFailed(batch: readonly SpooledRecord[], error: grpc.ServiceError): AgentError {
    const status = grpc.status[error.code] ?? String(error.code);
    const detail = error.details || error.message;
    const seqs = `seq ${batch[0].seq}-${batch[batch.length - 1].seq}`;
    const message =
      `OTLP export of ${batch.length} audit records (${seqs}) to ${this.endpoint} failed: ${status} (${detail}); ` +
      `${failureAdvice(error.code, this.endpoint, this.#timeoutMs)}`;

    this.#failureStreak += 1;
    if (this.#failureStreak === 1) this.#logger.warn({ status, detail, records: batch.length }, "OTLP export failed; the batch will be sent again");
    else this.#logger.debug({ status, detail, records: batch.length, failures: this.#failureStreak }, "OTLP export failed again");
    return new AgentError("AUDIT_SINK_FAILED", message, { cause: error });
  }
}

/**
 * Splits a batch into runs of records whose lines add up to at most `maxBytes`, in order. A record
 * longer than `maxBytes` travels alone.
 */
// NOTE: a single record larger than the collector's maximum message size fails with
// RESOURCE_EXHAUSTED on every attempt, and the pipeline retries it without end.
export function splitByLineBytes(batch: readonly SpooledRecord[], maxBytes: number): SpooledRecord[][] {
  const chunks: SpooledRecord[][] = [];
  let chunk: SpooledRecord[] = [];
  let bytes = 0;
  for (const record of batch) {
    const lineBytes = Buffer.byteLength(record.line);
    if (chunk.length > 0 && bytes + lineBytes > maxBytes) {
      chunks.push(chunk);
      chunk = [];
      bytes = 0;
    }
    chunk.push(record);
    bytes += lineBytes;
  }
  if (chunk.length > 0) chunks.push(chunk);
  return chunks;
}

function passEncoded(request: Buffer): Buffer {
  return request;
}

/** Returns what to check for a failed call's status. */
function failureAdvice(code: grpc.status, endpoint: string, timeoutMs: number): string {
  switch (code) {
    case grpc.status.DEADLINE_EXCEEDED:
      return `no response within ${timeoutMs} ms; check that the collector is running and reachable at ${endpoint}`;
    case grpc.status.UNAVAILABLE:
      return `check that the collector listens at ${endpoint} and that the sink's TLS settings (plaintext or TLS, CA, server name) match it`;
    case grpc.status.UNAUTHENTICATED:
    case grpc.status.PERMISSION_DENIED:
      return "check the authorization headers and the client certificate configured for the sink";
    case grpc.status.RESOURCE_EXHAUSTED:
      return "the collector is overloaded or the request exceeds its maximum message size";
    case grpc.status.UNIMPLEMENTED:
      return `check that ${endpoint} is an OTLP/gRPC endpoint with the logs pipeline enabled`;
    default:
      return "the pipeline retries the batch";
  }
}

/** Returns the host part of "host:port" or "[ipv6]:port"; throws INVALID_AUDIT_SINK otherwise. */
export function parseEndpointHost(endpoint: string): string {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^\s:[\]/]+)):(\d{1,5})$/.exec(endpoint);
  const port = match === null ? NaN : Number(match[3]);
  if (match === null || port < 1 || port > 65535) {
    throw new AgentError("INVALID_AUDIT_SINK", `invalid OTLP endpoint "${endpoint}": expected host:port or [ipv6]:port, for example 127.0.0.1:4317`);
  }
  return match[1] ?? match[2];
}

function checkTimeout(timeoutMs: number, endpoint: string): number {
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) {
    throw new AgentError("INVALID_AUDIT_SINK", `invalid timeout ${timeoutMs} ms for the OTLP sink ${endpoint}: expected a positive number of milliseconds`);
  }
  return timeoutMs;
}

/** Builds the call metadata. Error messages name the header but never its value. */
function buildMetadata(headers: Record<string, string>, endpoint: string): grpc.Metadata {
  const metadata = new grpc.Metadata();
  for (const [name, value] of Object.entries(headers)) {
    const key = name.toLowerCase();
    const invalid = (problem: string): AgentError =>
      new AgentError("INVALID_AUDIT_SINK", `invalid header "${name}" for the OTLP sink ${endpoint}: ${problem}`);
    if (key.startsWith("grpc-") || key.endsWith("-bin")) throw invalid("names starting with grpc- or ending in -bin are not allowed");
    if (typeof value !== "string") throw invalid("the value must be a string");
    try {
      metadata.set(key, value);
    } catch {
      throw invalid("the name or the value contains characters that gRPC metadata does not allow (printable ASCII only)");
    }
  }
  return metadata;
}

function buildCredentials(options: OtlpSinkOptions): grpc.ChannelCredentials {
  const tls = options.tls;
  if (tls === undefined) return grpc.credentials.createInsecure();
  if ((tls.cert === undefined) !== (tls.key === undefined)) {
    throw new AgentError("INVALID_AUDIT_SINK", `the OTLP sink ${options.endpoint} sets only one of the TLS cert and key files: set both for mutual TLS, or neither`);
  }
  const ca = tls.ca === undefined ? null : readPemFile(tls.ca, "CA", options.endpoint);
  const cert = tls.cert === undefined ? null : readPemFile(tls.cert, "client certificate", options.endpoint);
  const key = tls.key === undefined ? null : readPemFile(tls.key, "client key", options.endpoint);
  return grpc.credentials.createSsl(ca, key, cert);
}

// NOTE: the TLS files are read once, when the sink is created. A rotated client certificate takes
// effect only when the sink is created again.
function readPemFile(file: string, what: string, endpoint: string): Buffer {
  let contents: Buffer;
  try {
    contents = fs.readFileSync(file);
  } catch (error) {
    throw new AgentError("INVALID_AUDIT_SINK", `the ${what} file ${file} of the OTLP sink ${endpoint} cannot be read: ${(error as Error).message}`, { cause: error });
  }
  if (!contents.includes("-----BEGIN ")) {
    throw new AgentError("INVALID_AUDIT_SINK", `the ${what} file ${file} of the OTLP sink ${endpoint} contains no PEM block`);
  }
  return contents;
}

function buildChannelOptions(options: OtlpSinkOptions, host: string): grpc.ChannelOptions {
  const channelOptions: grpc.ChannelOptions = { "grpc.max_reconnect_backoff_ms": MAX_RECONNECT_BACKOFF_MS };
  const serverName = options.tls?.serverName;
  if (options.tls !== undefined && serverName !== undefined && serverName !== host) {
    channelOptions["grpc.ssl_target_name_override"] = serverName;
    channelOptions["grpc.default_authority"] = serverName;
  }
  return channelOptions;
}
