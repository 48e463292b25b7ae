// Formats sealed audit records as RFC 5424 syslog messages, framed by octet counting for TCP
// (RFC 6587 section 3.4.1) and TLS (RFC 5425):
//
//   <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [audit@32473 id="…" seq="…" v="1"] MSG
//
// MSG is the record's spooled JSON line, byte for byte, so a receiver can check its hash.
// Everything here is pure: no I/O, no clock.

import { AgentError } from "../../errors";
import type { SealedRecord } from "../record";

/** Facility codes of RFC 5424 section 6.2.1, by the names of glibc's <syslog.h>. */
export const SYSLOG_FACILITIES: Readonly<Record<string, number>> = {
  kern: 0,
  user: 1,
  mail: 2,
  daemon: 3,
  auth: 4,
  syslog: 5,
  lpr: 6,
  news: 7,
  uucp: 8,
  cron: 9,
  authpriv: 10,
  ftp: 11,
  local0: 16,
  local1: 17,
  local2: 18,
  local3: 19,
  local4: 20,
  local5: 21,
  local6: 22,
  local7: 23,
};

/** authpriv: the facility for security and authorization messages. */
export const DEFAULT_SYSLOG_FACILITY = SYSLOG_FACILITIES.authpriv;

/** Severities of RFC 5424 section 6.2.1 that audit records use. */
export const SEVERITY_ERROR = 3;
export const SEVERITY_WARNING = 4;
export const SEVERITY_INFO = 6;

export const SYSLOG_APP_NAME = "ambient-agent";

/**
 * Default SD-ID of the structured-data element. 32473 is the private enterprise number that
 * RFC 5612 reserves for documentation. An operator with an enterprise number of their own sets it.
 */
export const DEFAULT_SD_ID = "audit@32473";

/** Maximum lengths of the header fields in RFC 5424 section 6. */
const MAX_HOSTNAME = 255;
const MAX_APP_NAME = 48;
const MAX_PROCID = 128;
const MAX_MSGID = 32;
const MAX_SD_NAME = 32;
const NILVALUE = "-";

/** RFC 5424's PRINTUSASCII: %d33-126, printable US-ASCII without the space. */
const PRINTUSASCII = /^[\x21-\x7e]+$/;

/** A name@enterprise-number SD-ID: SD-NAME characters (no `=`, space, `]` or `"`) before the `@`. */
const CUSTOM_SD_ID = /^[\x21-\x7e]+@[0-9]+(\.[0-9]+)*$/;

/**
 * RFC 5424 TIMESTAMP: an RFC 3339 full date-time with an uppercase T and Z and at most six
 * fractional digits.
 */
const TIMESTAMP = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

/** The fields of the header that are the same for every message of one sink. */
export interface SyslogHeaderOptions {
  /** Facility name from SYSLOG_FACILITIES or number from 0 to 23. */
  facility: string | number;
  /** HOSTNAME: the node name. */
  hostname: string;
  /** PROCID: the agent's process id. */
  procId: string;
  /** SD-ID of the element that carries id, seq and v. */
  sdId: string;
  /** APP-NAME. Default ambient-agent. */
  appName?: string;
}

/** A checked SyslogHeaderOptions, ready for formatSyslogMessage. */
export interface SyslogHeader {
  facility: number;
  hostname: string;
  appName: string;
  procId: string;
  sdId: string;
}

/** Returns the facility code of a name from SYSLOG_FACILITIES or of a number from 0 to 23. */
export function parseSyslogFacility(value: string | number): number {
  const code = typeof value === "number" ? value : (SYSLOG_FACILITIES[value.toLowerCase()] ?? (/^\d+$/.test(value) ? Number(value) : NaN));
  if (!Number.isInteger(code) || code < 0 || code > 23) {
    throw new AgentError(
      "INVALID_AUDIT_SINK",
      `syslog facility ${JSON.stringify(value)} is invalid: use a number from 0 to 23 or one of ${Object.keys(SYSLOG_FACILITIES).join(", ")}`,
    );
  }
  return code;
}

/** Checks every field against RFC 5424's character set and length limits. Throws INVALID_AUDIT_SINK naming the field. */
export function checkSyslogHeader(options: SyslogHeaderOptions): SyslogHeader {
  const appName = options.appName ?? SYSLOG_APP_NAME;
  checkHeaderField("HOSTNAME (the node name)", options.hostname, MAX_HOSTNAME);
  checkHeaderField("APP-NAME", appName, MAX_APP_NAME);
  checkHeaderField("PROCID", options.procId, MAX_PROCID);
  checkSdId(options.sdId);
  return { facility: parseSyslogFacility(options.facility), hostname: options.hostname, appName, procId: options.procId, sdId: options.sdId };
}

function checkHeaderField(field: string, value: string, maxLength: number): void {
  if (value.length > maxLength || !PRINTUSASCII.test(value)) {
    throw new AgentError(
      "INVALID_AUDIT_SINK",
      `syslog ${field} ${JSON.stringify(value)} is invalid: RFC 5424 allows 1 to ${maxLength} printable US-ASCII characters without spaces`,
    );
  }
}

function checkSdId(sdId: string): void {
  if (sdId.length > MAX_SD_NAME || !CUSTOM_SD_ID.test(sdId) || /[=\]"]/.test(sdId)) {
    throw new AgentError(
      "INVALID_AUDIT_SINK",
      `syslog SD-ID ${JSON.stringify(sdId)} is invalid: use name@enterprise-number, at most ${MAX_SD_NAME} printable US-ASCII ` +
        'characters without space, "=", "]" or \'"\', for example audit@32473',
    );
  }
}

/**
 * Returns the severity of a record: error for audit.gap (records were lost), warning for a
 * denied, refused or failed connection, and info for an allowed connection and the other control records.
 */
export function syslogSeverity(record: SealedRecord): number {
  if (record.type === "audit.gap") return SEVERITY_ERROR;
  if (record.type === "connection.refused") return SEVERITY_WARNING;
  if (record.type === "connection.opened" || record.type === "connection.completed") {
    const failed = record.type === "connection.completed" && record.error !== undefined;
    return record.decision === "deny" || failed ? SEVERITY_WARNING : SEVERITY_INFO;
  }
  return SEVERITY_INFO;
}

/**
 * Returns the record's time as an RFC 5424 TIMESTAMP, with the fraction cut to six digits, or
 * the NILVALUE when the time is not an RFC 3339 date-time. MSG still carries the original value.
 */
export function syslogTimestamp(time: string): string {
  const match = TIMESTAMP.exec(time);
  if (!match) return NILVALUE;
  const fraction = match[2] === undefined ? "" : match[2].slice(0, 7);
  return `${match[1]}${fraction}${match[3]}`;
}

/** Returns the record type as MSGID, or the NILVALUE when it breaks MSGID's limits (MSG still names the type). */
export function syslogMsgId(type: string): string {
  return type.length <= MAX_MSGID && PRINTUSASCII.test(type) ? type : NILVALUE;
}

/** Escapes a PARAM-VALUE: RFC 5424 section 6.3.3 requires a backslash before `"`, `\` and `]`. */
export function escapeParamValue(value: string): string {
  return value.replace(/["\\\]]/g, (character) => `\\${character}`);
}

/** Formats the structured-data element that carries the record's id, seq and schema version. */
export function formatStructuredData(sdId: string, record: SealedRecord): string {
  const params = [`id="${escapeParamValue(record.id)}"`, `seq="${escapeParamValue(String(record.seq))}"`, `v="${escapeParamValue(String(record.v))}"`];
  return `[${sdId} ${params.join(" ")}]`;
}

/**
 * Formats one record as an RFC 5424 message, with `line`, the record's spooled JSON line, as MSG.
 * MSG has no byte order mark, which RFC 5424 allows (MSG-ANY). A receiver keeps a BOM in the
 * stored message (rsyslog 8.2302 does), where it breaks JSON parsers and the hash check of the line.
 */
export function formatSyslogMessage(header: SyslogHeader, record: SealedRecord, line: string): string {
  const pri = header.facility * 8 + syslogSeverity(record);
  const fields = [
    `<${pri}>1`,
    syslogTimestamp(record.time),
    header.hostname,
    header.appName,
    header.procId,
    syslogMsgId(record.type),
    formatStructuredData(header.sdId, record),
  ];
  return `${fields.join(" ")} ${line}`;
}

/**
 * Default maximum bytes of one message (the frame without its octet count). In RFC 5425, receivers
 * SHOULD accept 8192 octets, and rsyslog 8.2302's default maxMessageSize is 8 KiB. rsyslog cuts a
 * longer octet-counted frame at its limit and parses the rest of the frame as further messages,
 * whose header fields then come from the record's content.
 */
export const DEFAULT_SYSLOG_MAX_MESSAGE_BYTES = 8192;

/**
 * Lowest accepted maxMessageBytes: in RFC 5425, receivers MUST accept 2048 octets. A stand-in fits
 * below it with the longest header fields that checkSyslogHeader allows, as long as the record's
 * id, time and type have the lengths that the recorder gives them.
 */
export const MIN_SYSLOG_MAX_MESSAGE_BYTES = 2048;

/** A message ready to write, framed by octet counting. */
export interface SyslogFrame {
  frame: Buffer;
  /** Bytes of the record's full line when the frame carries the stand-in, undefined otherwise. */
  standInForBytes?: number;
}

/** Throws INVALID_AUDIT_SINK unless `value` is an integer of at least MIN_SYSLOG_MAX_MESSAGE_BYTES. */
export function checkMaxMessageBytes(value: number): number {
  if (!Number.isSafeInteger(value) || value < MIN_SYSLOG_MAX_MESSAGE_BYTES) {
    throw new AgentError(
      "INVALID_AUDIT_SINK",
      `syslog maximum message size ${value} is invalid: use an integer of at least ${MIN_SYSLOG_MAX_MESSAGE_BYTES} bytes, ` +
        "and no more than the receiver accepts (rsyslog's maxMessageSize, default 8192)",
    );
  }
  return value;
}

/**
 * Returns the MSG that replaces a record too long for the receiver. It is a JSON object with the
 * record's envelope and chain position, "truncated": true, the byte length of the full line and
 * its hash. The full record can then be found by id in the audit file or another sink.
 */
export function formatStandInMsg(record: SealedRecord, line: string): string {
  return JSON.stringify({
    time: record.time,
    type: record.type,
    v: record.v,
    seq: record.seq,
    id: record.id,
    node: record.node,
    truncated: true,
    bytes: Buffer.byteLength(line, "utf8"),
    hash: record.hash,
  });
}

/** Returns the stand-in without time, type, v and node, for records whose full stand-in does not fit. */
function formatShortStandInMsg(record: SealedRecord, line: string): string {
  return JSON.stringify({ seq: record.seq, id: record.id, truncated: true, bytes: Buffer.byteLength(line, "utf8"), hash: record.hash });
}

/**
 * Formats and frames one record. When the message would exceed maxMessageBytes, the frame carries
 * the same header and structured data with the stand-in of formatStandInMsg as MSG instead.
 */
export function formatSyslogFrame(header: SyslogHeader, record: SealedRecord, line: string, maxMessageBytes: number): SyslogFrame {
  const message = formatSyslogMessage(header, record, line);
  if (Buffer.byteLength(message, "utf8") <= maxMessageBytes) return { frame: frameOctetCounted(message) };

  const standIn = formatSyslogMessage(header, record, formatStandInMsg(record, line));
  const standInForBytes = Buffer.byteLength(line, "utf8");
  if (Buffer.byteLength(standIn, "utf8") <= maxMessageBytes) return { frame: frameOctetCounted(standIn), standInForBytes };
  // NOTE: an id longer than about 600 bytes (an estimate from the header limits) makes even the
  // short stand-in exceed MIN_SYSLOG_MAX_MESSAGE_BYTES. The recorder's ids are 36-byte UUIDs.
  return { frame: frameOctetCounted(formatSyslogMessage(header, record, formatShortStandInMsg(record, line))), standInForBytes };
}

/** Frames a message by octet counting: its length in bytes of UTF-8, a space, then the message. */
export function frameOctetCounted(message: string): Buffer {
  const body = Buffer.from(message, "utf8");
  return Buffer.concat([Buffer.from(`${body.length} `, "ascii"), body]);
}
