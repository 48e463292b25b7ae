// Maps sealed audit records to OTLP log records: one ExportLogsServiceRequest per batch, with one
// resource (the agent on its node) and one instrumentation scope.

import type { SealedRecord } from "../record";
import type { SpooledRecord } from "../sink";
import { toAnyValue, toKeyValues, type ExportLogsRequestMessage, type LogRecordMessage } from "./otlp-proto";

export const OTLP_SERVICE_NAME = "ambient-agent";
export const OTLP_SCOPE_NAME = "ambient-agent.audit";
export const OTLP_SCOPE_VERSION = "1";

/** The attribute that carries the record's `id`, the key receivers de-duplicate on. */
export const RECORD_ID_ATTRIBUTE = "log.record.uid";
export const EVENT_NAME_ATTRIBUTE = "event.name";
export const SEQ_ATTRIBUTE = "audit.seq";

/** OTLP SeverityNumber values (opentelemetry.proto.logs.v1.SeverityNumber). */
export const SEVERITY = {
  INFO: 9,
  WARN: 13,
  ERROR: 17,
} as const;

export type SeverityText = keyof typeof SEVERITY;

const RFC3339 = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$/i;

/** Builds the Export request for a batch, the records in batch order. */
export function buildExportRequest(batch: readonly SpooledRecord[], node: string, now: Date = new Date()): ExportLogsRequestMessage {
  const observed = unixNanoOfMillis(now.getTime());
  return {
    resource_logs: [
      {
        resource: { attributes: toKeyValues({ "service.name": OTLP_SERVICE_NAME, "k8s.node.name": node }) },
        scope_logs: [
          {
            scope: { name: OTLP_SCOPE_NAME, version: OTLP_SCOPE_VERSION },
            log_records: batch.map((spooled) => buildLogRecord(spooled, observed)),
          },
        ],
      },
    ],
  };
}

/**
 * Builds the log record of one audit record. The body is the whole record in its key order, chain
 * fields included, so JSON.stringify of the decoded body gives back the spooled line and a receiver
 * can check `hash` without the spool.
 */
export function buildLogRecord(spooled: SpooledRecord, observedUnixNano: string): LogRecordMessage {
  const { record } = spooled;
  const severity = severityOf(record);
  return {
    time_unix_nano: unixNanoOfTime(record.time),
    observed_time_unix_nano: observedUnixNano,
    severity_number: SEVERITY[severity],
    severity_text: severity,
    body: toAnyValue(record),
    attributes: toKeyValues({
      [RECORD_ID_ATTRIBUTE]: spooled.id,
      [EVENT_NAME_ATTRIBUTE]: record.type,
      [SEQ_ATTRIBUTE]: spooled.seq,
    }),
    event_name: record.type,
  };
}

/**
 * Returns ERROR for audit.gap (records were lost), WARN for a denied or refused connection or a
 * record with an `error`, and INFO for everything else: allowed connections and control records.
 */
export function severityOf(record: SealedRecord): SeverityText {
  if (record.type === "audit.gap") return "ERROR";
  if (record.type === "connection.refused") return "WARN";
  const fields = record as { decision?: unknown; error?: unknown };
  if (fields.decision === "deny" || fields.error !== undefined) return "WARN";
  return "INFO";
}

/**
 * Converts an RFC 3339 time to nanoseconds since the Unix epoch as a decimal string, keeping up to
 * nine fraction digits. Returns "0", which OTLP reads as unknown, when the time does not parse.
 */
export function unixNanoOfTime(time: string): string {
  const parts = splitUnixTime(time);
  if (parts === undefined) return "0";
  return (BigInt(parts.seconds) * 1_000_000_000n + BigInt(parts.nanos)).toString();
}

/**
 * Splits an RFC 3339 time into whole seconds since the Unix epoch and the nanoseconds of its
 * fraction (up to nine digits). Returns undefined when the time does not parse or lies before 1970.
 */
export function splitUnixTime(time: string): { seconds: number; nanos: number } | undefined {
  const match = RFC3339.exec(time);
  if (match === null) return undefined;
  // Parsed without the fraction, so the milliseconds are whole seconds and the fraction adds the rest.
  const millis = Date.parse(`${match[1]}${match[3].toUpperCase()}`);
  if (Number.isNaN(millis) || millis < 0) return undefined;
  const nanos = match[2] === undefined ? 0 : Number(match[2].padEnd(9, "0"));
  return { seconds: millis / 1000, nanos };
}

function unixNanoOfMillis(millis: number): string {
  return (BigInt(millis) * 1_000_000n).toString();
}
