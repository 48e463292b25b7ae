// OTLP's LogsService as @grpc/proto-loader loads it from agent/audit/proto, the message shapes it
// encodes and decodes, and the conversion between JSON values and OTLP's AnyValue. The test receiver
// decodes with these definitions; the sink encodes with its own writer (otlp-encode.ts), which the
// tests compare with them byte for byte.

import fs from "node:fs";
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { AgentError } from "../../errors";

/**
 * The folder that contains opentelemetry/proto/... It stays in the source tree because tsc copies no
 * .proto files to dist/. From dist/agent/audit/sinks the source tree is four folders up.
 */
export const OTLP_PROTO_ROOT = path.resolve(__dirname, "..", "..", "..", "..", "agent", "audit", "proto");
export const LOGS_SERVICE_PROTO = "opentelemetry/proto/collector/logs/v1/logs_service.proto";

/**
 * keepCase keeps the field names of the .proto files. 64-bit integers decode as decimal strings
 * because nanosecond timestamps exceed Number.MAX_SAFE_INTEGER; encoding accepts strings and numbers.
 * oneofs adds a `value` member naming the AnyValue member that is set.
 */
const LOADER_OPTIONS: protoLoader.Options = { keepCase: true, longs: String, enums: Number, defaults: false, oneofs: true };

/** OTLP's AnyValue: at most one member is set, and none means an empty value. */
export interface AnyValueMessage {
  string_value?: string;
  bool_value?: boolean;
  /** A decimal string when decoded; a number or a decimal string when encoded. */
  int_value?: string | number;
  double_value?: number;
  array_value?: { values?: AnyValueMessage[] };
  kvlist_value?: { values?: KeyValueMessage[] };
  bytes_value?: Buffer;
  /** Set by the decoder: the name of the member that is set. */
  value?: string;
}

export interface KeyValueMessage {
  key: string;
  value?: AnyValueMessage;
}

export interface LogRecordMessage {
  /** Nanoseconds since the Unix epoch as a decimal string; "0" when unknown. */
  time_unix_nano: string;
  observed_time_unix_nano: string;
  severity_number: number;
  severity_text: string;
  body?: AnyValueMessage;
  attributes?: KeyValueMessage[];
  event_name?: string;
}

export interface ResourceLogsMessage {
  resource?: { attributes?: KeyValueMessage[] };
  scope_logs?: { scope?: { name?: string; version?: string }; log_records?: LogRecordMessage[] }[];
}

export interface ExportLogsRequestMessage {
  resource_logs?: ResourceLogsMessage[];
}

export interface ExportLogsResponseMessage {
  partial_success?: { rejected_log_records?: string | number; error_message?: string };
}

export interface LogsServiceClient extends grpc.Client {
  Export(
    request: ExportLogsRequestMessage,
    metadata: grpc.Metadata,
    options: grpc.CallOptions,
    callback: (error: grpc.ServiceError | null, response?: ExportLogsResponseMessage) => void,
  ): grpc.ClientUnaryCall;
}

/** The loaded service: a client constructor whose `service` member is the definition a server adds. */
export type LogsServiceConstructor = grpc.ServiceClientConstructor;

let loadedService: LogsServiceConstructor | undefined;

/**
 * Loads opentelemetry.proto.collector.logs.v1.LogsService, once per process. Throws AgentError
 * INTERNAL naming the path when the definitions are missing, which means the installation lacks
 * agent/audit/proto.
 */
export function loadLogsService(protoRoot: string = OTLP_PROTO_ROOT): LogsServiceConstructor {
  if (loadedService !== undefined && protoRoot === OTLP_PROTO_ROOT) return loadedService;
  const file = path.join(protoRoot, LOGS_SERVICE_PROTO);
  if (!fs.existsSync(file)) {
    throw new AgentError("INTERNAL", `the OTLP protocol file ${file} is missing: install agent/audit/proto next to dist/`);
  }
  const definition = protoLoader.loadSync(LOGS_SERVICE_PROTO, { ...LOADER_OPTIONS, includeDirs: [protoRoot] });
  const root = grpc.loadPackageDefinition(definition) as unknown as {
    opentelemetry: { proto: { collector: { logs: { v1: { LogsService: LogsServiceConstructor } } } } };
  };
  const service = root.opentelemetry.proto.collector.logs.v1.LogsService;
  if (protoRoot === OTLP_PROTO_ROOT) loadedService = service;
  return service;
}

/**
 * Converts a JSON value to an AnyValue: objects to kvlist_value (in key order, undefined members
 * left out), arrays to array_value, safe integers to int_value, other numbers to double_value, and
 * null to an empty AnyValue.
 */
export function toAnyValue(value: unknown): AnyValueMessage {
  if (value === null || value === undefined) return {};
  switch (typeof value) {
    case "string":
      return { string_value: value };
    case "boolean":
      return { bool_value: value };
    case "number":
      return Number.isSafeInteger(value) ? { int_value: value } : { double_value: value };
    case "bigint":
      return { int_value: value.toString() };
    case "object":
      if (Array.isArray(value)) return { array_value: { values: value.map(toAnyValue) } };
      return { kvlist_value: { values: toKeyValues(value as Record<string, unknown>) } };
    default:
      // Functions and symbols do not occur in records parsed from JSON.
      return { string_value: String(value) };
  }
}

/** Converts an object's members to KeyValues in key order, leaving out undefined members. */
export function toKeyValues(object: Record<string, unknown>): KeyValueMessage[] {
  const values: KeyValueMessage[] = [];
  for (const [key, member] of Object.entries(object)) {
    if (member !== undefined) values.push({ key, value: toAnyValue(member) });
  }
  return values;
}

/**
 * Converts a decoded AnyValue back to a JSON value: kvlist_value to an object, array_value to an
 * array, int_value to a number (exact up to Number.MAX_SAFE_INTEGER), bytes_value to base64, and an
 * empty AnyValue to null.
 */
export function fromAnyValue(value: AnyValueMessage | undefined): unknown {
  if (value === undefined || value === null) return null;
  if (value.string_value !== undefined) return value.string_value;
  if (value.bool_value !== undefined) return value.bool_value;
  if (value.int_value !== undefined) return Number(value.int_value);
  if (value.double_value !== undefined) return value.double_value;
  if (value.array_value !== undefined) return (value.array_value.values ?? []).map(fromAnyValue);
  if (value.kvlist_value !== undefined) return fromKeyValues(value.kvlist_value.values ?? []);
  if (value.bytes_value !== undefined) return Buffer.from(value.bytes_value).toString("base64");
  return null;
}

/** Converts decoded KeyValues to an object; a repeated key keeps its last value. */
export function fromKeyValues(values: readonly KeyValueMessage[]): Record<string, unknown> {
  const object: Record<string, unknown> = {};
  for (const { key, value } of values) object[key] = fromAnyValue(value);
  return object;
}
