// Turns a record into its sealed line: the chain fields, the cleaning of its text, the size limit
// and the hash.

import crypto from "node:crypto";
import { sealLine } from "./chain";
import { AUDIT_SCHEMA_VERSION, type AuditEvent, type SealedRecord } from "./record";
import { shrinkRecord } from "./record-limit";
import { scrubRecord } from "./redact";
import type { SpooledRecord } from "./sink";

/** A sealed record, and the size of the original when the limit cut it. */
export interface SealResult {
  spooled: SpooledRecord;
  hash: string;
  originalBytes?: number;
}

/**
 * Seals `event` as record `seq` of the chain whose last hash is `prevHash`. `time` and `type` come
 * first so that lines sort by time and read well, and the chain fields close the line.
 */
export function sealRecord(event: AuditEvent, seq: number, prevHash: string): SealResult {
  const id = crypto.randomUUID();
  let record = withChainFields(event as unknown as Record<string, unknown>, seq, id, prevHash);
  let body = JSON.stringify(record);
  const scrubbed = scrubRecord(record, body);
  if (scrubbed !== record) {
    record = scrubbed;
    body = JSON.stringify(record);
  }
  const shrunk = shrinkRecord(record, body);
  if (shrunk !== undefined) {
    // The chain fields come back after the cut, which may have dropped them with the payload.
    delete shrunk.prev_hash;
    record = withChainFields(shrunk, seq, id, prevHash);
    body = JSON.stringify(record);
  }
  const { line, hash } = sealLine(body);
  const sealed = record as unknown as SealedRecord;
  sealed.hash = hash;
  return { spooled: { seq, id, line, record: sealed }, hash, originalBytes: shrunk?.original_bytes as number | undefined };
}

/** Copies the fields of `fields` between the leading time, type, v, seq and id and the closing prev_hash; assign() keeps each key's first place. */
function withChainFields(fields: Record<string, unknown>, seq: number, id: string, prevHash: string): Record<string, unknown> {
  return Object.assign({ time: fields.time, type: fields.type, v: AUDIT_SCHEMA_VERSION, seq, id }, fields, { prev_hash: prevHash });
}
