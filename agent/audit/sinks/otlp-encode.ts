// Encodes OTLP's ExportLogsServiceRequest straight from spooled audit records into protobuf wire
// format, and decodes the ExportLogsServiceResponse. The bytes equal what @grpc/proto-loader
// produces from buildExportRequest() in otlp-mapping.ts, in the same field order, at a fraction of
// the CPU: no message objects per field, and strings are written once into one buffer.
//
// The writer fills its buffer from the end towards the start. A length-delimited field is written
// as its content first, then the content's length, then the tag, so every length is known when it
// is written and no size pass over the records is needed. Field numbers and types come from
// opentelemetry/proto/{collector/logs,logs,common,resource}/v1/*.proto in agent/audit/proto.

import type { SealedRecord } from "../record";
import type { SpooledRecord } from "../sink";
import {
  EVENT_NAME_ATTRIBUTE,
  OTLP_SCOPE_NAME,
  OTLP_SCOPE_VERSION,
  OTLP_SERVICE_NAME,
  RECORD_ID_ATTRIBUTE,
  SEQ_ATTRIBUTE,
  SEVERITY,
  severityOf,
  splitUnixTime,
} from "./otlp-mapping";
import type { ExportLogsResponseMessage } from "./otlp-proto";

/** Wire types of the protobuf encoding. */
const VARINT = 0;
const FIXED64 = 1;
const LENGTH_DELIMITED = 2;
const FIXED32 = 5;

/** A field's tag byte: (field number << 3) | wire type. Every field here has a number below 16, so its tag is one byte. */
const tag = (field: number, wireType: number): number => (field << 3) | wireType;

// ExportLogsServiceRequest, ResourceLogs, Resource, ScopeLogs and InstrumentationScope.
const REQUEST_RESOURCE_LOGS = tag(1, LENGTH_DELIMITED);
const RESOURCE_LOGS_RESOURCE = tag(1, LENGTH_DELIMITED);
const RESOURCE_LOGS_SCOPE_LOGS = tag(2, LENGTH_DELIMITED);
const RESOURCE_ATTRIBUTES = tag(1, LENGTH_DELIMITED);
const SCOPE_LOGS_SCOPE = tag(1, LENGTH_DELIMITED);
const SCOPE_LOGS_LOG_RECORDS = tag(2, LENGTH_DELIMITED);
const SCOPE_NAME = tag(1, LENGTH_DELIMITED);
const SCOPE_VERSION = tag(2, LENGTH_DELIMITED);

// LogRecord.
const LOG_TIME_UNIX_NANO = tag(1, FIXED64);
const LOG_SEVERITY_NUMBER = tag(2, VARINT);
const LOG_SEVERITY_TEXT = tag(3, LENGTH_DELIMITED);
const LOG_BODY = tag(5, LENGTH_DELIMITED);
const LOG_ATTRIBUTES = tag(6, LENGTH_DELIMITED);
const LOG_OBSERVED_TIME_UNIX_NANO = tag(11, FIXED64);
const LOG_EVENT_NAME = tag(12, LENGTH_DELIMITED);

// AnyValue, ArrayValue, KeyValueList and KeyValue.
const ANY_STRING = tag(1, LENGTH_DELIMITED);
const ANY_BOOL = tag(2, VARINT);
const ANY_INT = tag(3, VARINT);
const ANY_DOUBLE = tag(4, FIXED64);
const ANY_ARRAY = tag(5, LENGTH_DELIMITED);
const ANY_KVLIST = tag(6, LENGTH_DELIMITED);
const ARRAY_VALUES = tag(1, LENGTH_DELIMITED);
const KVLIST_VALUES = tag(1, LENGTH_DELIMITED);
const KEY_VALUE_KEY = tag(1, LENGTH_DELIMITED);
const KEY_VALUE_VALUE = tag(2, LENGTH_DELIMITED);

// ExportLogsServiceResponse and ExportLogsPartialSuccess.
const RESPONSE_PARTIAL_SUCCESS = 1;
const PARTIAL_REJECTED_LOG_RECORDS = 1;
const PARTIAL_ERROR_MESSAGE = 2;

const TWO_POW_32 = 2 ** 32;

/** Maximum length, in UTF-16 units, of an ASCII string that a loop copies. Longer strings and other strings go through Buffer#write. */
const MAX_LOOP_STRING_LENGTH = 64;

/**
 * A protobuf writer that fills a buffer from its end. Methods write one piece in front of what is
 * already written, so a message's fields are written last field first.
 */
class ReverseWriter {
  buffer: Buffer;
  /** Index of the first written byte. The output is buffer[position, buffer.length). */
  position: number;

  constructor(capacity: number) {
    this.buffer = Buffer.allocUnsafe(capacity);
    this.position = capacity;
  }

  /**
   * Returns how many bytes are written. A length-delimited field notes this count before its
   * content, because positions in the buffer change when reserve() moves to a larger buffer.
   */
  written(): number {
    return this.buffer.length - this.position;
  }

  /** Returns the written bytes, a view of the buffer. */
  finish(): Buffer {
    return this.buffer.subarray(this.position);
  }

  /** Makes room for `bytes` more bytes in front of the written ones, moving them to the end of a larger buffer. */
  reserve(bytes: number): void {
    if (this.position >= bytes) return;
    const written = this.buffer.length - this.position;
    const capacity = Math.max(this.buffer.length * 2, written + bytes + 1024);
    const larger = Buffer.allocUnsafe(capacity);
    this.buffer.copy(larger, capacity - written, this.position);
    this.buffer = larger;
    this.position = capacity - written;
  }

  byte(value: number): void {
    this.reserve(1);
    this.buffer[--this.position] = value;
  }

  /** Writes a non-negative integer up to Number.MAX_SAFE_INTEGER as a varint. */
  varint(value: number): void {
    if (value < 0x80) {
      this.byte(value);
      return;
    }
    let size = 1;
    for (let rest = value; rest >= 0x80; rest = Math.floor(rest / 0x80)) size += 1;
    this.reserve(size);
    this.position -= size;
    let index = this.position;
    while (value >= 0x80) {
      this.buffer[index++] = (value % 0x80) | 0x80;
      value = Math.floor(value / 0x80);
    }
    this.buffer[index] = value;
  }

  /** Writes the 64-bit integer hi * 2^32 + lo (both unsigned 32-bit) as a varint: 10 bytes when the top bit is set. */
  varint64(lo: number, hi: number): void {
    const bytes: number[] = [];
    while (hi !== 0 || lo >= 0x80) {
      bytes.push((lo & 0x7f) | 0x80);
      lo = ((lo >>> 7) | (hi << 25)) >>> 0;
      hi >>>= 7;
    }
    bytes.push(lo);
    this.reserve(bytes.length);
    this.position -= bytes.length;
    for (let index = 0; index < bytes.length; index += 1) this.buffer[this.position + index] = bytes[index];
  }

  /** Writes an integer that Number.isSafeInteger accepts as int64: negative ones in two's complement. */
  int64(value: number): void {
    if (value >= 0) {
      this.varint(value);
      return;
    }
    const magnitude = -value;
    let lo = magnitude % TWO_POW_32;
    let hi = Math.floor(magnitude / TWO_POW_32);
    lo = (~lo + 1) >>> 0;
    hi = (~hi + (lo === 0 ? 1 : 0)) >>> 0;
    this.varint64(lo, hi);
  }

  /** Writes hi * 2^32 + lo (both unsigned 32-bit) as fixed64, little-endian. */
  fixed64(lo: number, hi: number): void {
    this.reserve(8);
    this.position -= 8;
    this.buffer.writeUInt32LE(lo, this.position);
    this.buffer.writeUInt32LE(hi, this.position + 4);
  }

  double(value: number): void {
    this.reserve(8);
    this.position -= 8;
    this.buffer.writeDoubleLE(value, this.position);
  }

  /**
   * Writes a string as UTF-8 and returns its byte length. The caller writes the length and the tag.
   * A lone surrogate becomes U+FFFD, as Buffer#write makes it, so the output is always valid UTF-8.
   */
  stringBytes(value: string): number {
    const length = value.length;
    if (length <= MAX_LOOP_STRING_LENGTH && this.asciiBytes(value)) return length;
    const bytes = Buffer.byteLength(value);
    this.reserve(bytes);
    this.position -= bytes;
    this.buffer.write(value, this.position, bytes, "utf8");
    return bytes;
  }

  /** Copies an ASCII string. Returns false, having written nothing, when the string contains another character. */
  private asciiBytes(value: string): boolean {
    const length = value.length;
    this.reserve(length);
    const start = this.position - length;
    for (let index = 0; index < length; index += 1) {
      const code = value.charCodeAt(index);
      if (code >= 0x80) return false;
      this.buffer[start + index] = code;
    }
    this.position = start;
    return true;
  }

  /** Writes a string field: the bytes, their length and the tag. */
  stringField(fieldTag: number, value: string): void {
    this.varint(this.stringBytes(value));
    this.byte(fieldTag);
  }

  /** Writes the length and tag of a length-delimited field whose content was written since written() returned `writtenBefore`. */
  delimit(fieldTag: number, writtenBefore: number): void {
    this.varint(this.written() - writtenBefore);
    this.byte(fieldTag);
  }
}

/**
 * Encodes the ExportLogsServiceRequest of a batch, the same message as buildExportRequest(batch,
 * node, now) encoded by proto-loader: one ResourceLogs with the service.name and k8s.node.name
 * attributes, one ScopeLogs, and one LogRecord per record in batch order.
 */
export function encodeExportRequest(batch: readonly SpooledRecord[], node: string, now: Date = new Date()): Buffer {
  const writer = new ReverseWriter(estimateRequestBytes(batch, node));
  const [observedLo, observedHi] = splitUint64(BigInt(now.getTime()) * 1_000_000n);
  const mark = writer.written();

  writeScopeLogs(writer, batch, observedLo, observedHi);
  writeResource(writer, node);
  writer.delimit(REQUEST_RESOURCE_LOGS, mark);
  return writer.finish();
}

/** Estimates the request's size from the lines' lengths; the writer grows when the estimate is short. */
function estimateRequestBytes(batch: readonly SpooledRecord[], node: string): number {
  let bytes = 256 + node.length * 3;
  for (const spooled of batch) bytes += spooled.line.length + (spooled.line.length >> 1) + 128;
  return bytes;
}

function writeResource(writer: ReverseWriter, node: string): void {
  const mark = writer.written();
  writeKeyValue(writer, RESOURCE_ATTRIBUTES, "k8s.node.name", node);
  writeKeyValue(writer, RESOURCE_ATTRIBUTES, "service.name", OTLP_SERVICE_NAME);
  writer.delimit(RESOURCE_LOGS_RESOURCE, mark);
}

function writeScopeLogs(writer: ReverseWriter, batch: readonly SpooledRecord[], observedLo: number, observedHi: number): void {
  const mark = writer.written();
  for (let index = batch.length - 1; index >= 0; index -= 1) {
    const recordMark = writer.written();
    writeLogRecord(writer, batch[index], observedLo, observedHi);
    writer.delimit(SCOPE_LOGS_LOG_RECORDS, recordMark);
  }

  const scopeMark = writer.written();
  writer.stringField(SCOPE_VERSION, OTLP_SCOPE_VERSION);
  writer.stringField(SCOPE_NAME, OTLP_SCOPE_NAME);
  writer.delimit(SCOPE_LOGS_SCOPE, scopeMark);
  writer.delimit(RESOURCE_LOGS_SCOPE_LOGS, mark);
}

/** Writes the fields of one LogRecord, as buildLogRecord() in otlp-mapping.ts sets them, last field first. */
function writeLogRecord(writer: ReverseWriter, spooled: SpooledRecord, observedLo: number, observedHi: number): void {
  const record = spooled.record;
  const type: unknown = record.type;
  const severity = severityOf(record);

  if (type !== undefined) writer.stringField(LOG_EVENT_NAME, String(type));
  writer.fixed64(observedLo, observedHi);
  writer.byte(LOG_OBSERVED_TIME_UNIX_NANO);

  writeKeyValue(writer, LOG_ATTRIBUTES, SEQ_ATTRIBUTE, spooled.seq);
  if (type !== undefined) writeKeyValue(writer, LOG_ATTRIBUTES, EVENT_NAME_ATTRIBUTE, type);
  writeKeyValue(writer, LOG_ATTRIBUTES, RECORD_ID_ATTRIBUTE, spooled.id);

  const bodyMark = writer.written();
  writeAnyValue(writer, record);
  writer.delimit(LOG_BODY, bodyMark);

  writer.stringField(LOG_SEVERITY_TEXT, severity);
  writer.varint(SEVERITY[severity]);
  writer.byte(LOG_SEVERITY_NUMBER);

  writeTime(writer, record);
  writer.byte(LOG_TIME_UNIX_NANO);
}

/** Writes time_unix_nano's value: `time` in nanoseconds since the epoch, 0 when it does not parse. */
function writeTime(writer: ReverseWriter, record: SealedRecord): void {
  const parts = splitUnixTime(record.time);
  if (parts === undefined) {
    writer.fixed64(0, 0);
    return;
  }
  const { seconds, nanos } = parts;
  if (seconds >= TWO_POW_32) {
    const [lo, hi] = splitUint64(BigInt(seconds) * 1_000_000_000n + BigInt(nanos));
    writer.fixed64(lo, hi);
    return;
  }
  // seconds * 10^9 + nanos split at 2^16 of seconds, so every product stays below 2^53 and is exact.
  const high = Math.floor(seconds / 0x10000) * 1_000_000_000;
  const low = (seconds % 0x10000) * 1_000_000_000 + nanos;
  const lowSum = (high % 0x10000) * 0x10000 + low;
  const carry = Math.floor(lowSum / TWO_POW_32);
  writer.fixed64(lowSum % TWO_POW_32, Math.floor(high / 0x10000) + carry);
}

/** Writes a KeyValue field whose value is converted as toAnyValue() in otlp-proto.ts converts it. */
function writeKeyValue(writer: ReverseWriter, fieldTag: number, key: string, value: unknown): void {
  const mark = writer.written();
  writeAnyValue(writer, value);
  writer.delimit(KEY_VALUE_VALUE, mark);
  writer.stringField(KEY_VALUE_KEY, key);
  writer.delimit(fieldTag, mark);
}

/**
 * Writes the fields of the AnyValue of a JSON value: objects as kvlist_value (in key order, undefined
 * members left out), arrays as array_value, safe integers as int_value, other numbers as
 * double_value, and nothing for null.
 */
function writeAnyValue(writer: ReverseWriter, value: unknown): void {
  if (value === null || value === undefined) return;
  switch (typeof value) {
    case "string":
      writer.stringField(ANY_STRING, value);
      return;
    case "boolean":
      writer.byte(value ? 1 : 0);
      writer.byte(ANY_BOOL);
      return;
    case "number":
      writeNumber(writer, value);
      return;
    case "bigint": {
      const [lo, hi] = splitUint64(value);
      writer.varint64(lo, hi);
      writer.byte(ANY_INT);
      return;
    }
    case "object":
      if (Array.isArray(value)) writeArrayValue(writer, value);
      else writeKeyValueList(writer, value as Record<string, unknown>);
      return;
    default:
      // Functions and symbols do not occur in records parsed from JSON.
      writer.stringField(ANY_STRING, String(value));
  }
}

function writeNumber(writer: ReverseWriter, value: number): void {
  if (Number.isSafeInteger(value)) {
    writer.int64(value);
    writer.byte(ANY_INT);
  } else {
    writer.double(value);
    writer.byte(ANY_DOUBLE);
  }
}

function writeArrayValue(writer: ReverseWriter, values: readonly unknown[]): void {
  const mark = writer.written();
  for (let index = values.length - 1; index >= 0; index -= 1) {
    const valueMark = writer.written();
    writeAnyValue(writer, values[index]);
    writer.delimit(ARRAY_VALUES, valueMark);
  }
  writer.delimit(ANY_ARRAY, mark);
}

function writeKeyValueList(writer: ReverseWriter, object: Record<string, unknown>): void {
  const mark = writer.written();
  const keys = Object.keys(object);
  for (let index = keys.length - 1; index >= 0; index -= 1) {
    const member = object[keys[index]];
    if (member !== undefined) writeKeyValue(writer, KVLIST_VALUES, keys[index], member);
  }
  writer.delimit(ANY_KVLIST, mark);
}

/** Splits an integer into the low and high 32 bits of its 64-bit two's complement. */
function splitUint64(value: bigint): [number, number] {
  const unsigned = BigInt.asUintN(64, value);
  return [Number(unsigned & 0xffffffffn), Number(unsigned >> 32n)];
}

/**
 * Decodes an ExportLogsServiceResponse. rejected_log_records comes back as a decimal string, as
 * proto-loader returns int64 with longs: String. Unknown fields are skipped. Throws an Error on
 * truncated or malformed input, which grpc-js reports as an INTERNAL status.
 */
export function decodeExportResponse(bytes: Buffer): ExportLogsResponseMessage {
  const response: ExportLogsResponseMessage = {};
  const reader = new Reader(bytes, 0, bytes.length);
  while (reader.more()) {
    const key = reader.varint();
    if (key === tag(RESPONSE_PARTIAL_SUCCESS, LENGTH_DELIMITED)) response.partial_success = decodePartialSuccess(reader.delimited());
    else reader.skip(key & 7);
  }
  return response;
}

function decodePartialSuccess(reader: Reader): NonNullable<ExportLogsResponseMessage["partial_success"]> {
  const partial: NonNullable<ExportLogsResponseMessage["partial_success"]> = {};
  while (reader.more()) {
    const key = reader.varint();
    if (key === tag(PARTIAL_REJECTED_LOG_RECORDS, VARINT)) partial.rejected_log_records = BigInt.asIntN(64, reader.varintBig()).toString();
    else if (key === tag(PARTIAL_ERROR_MESSAGE, LENGTH_DELIMITED)) partial.error_message = reader.string();
    else reader.skip(key & 7);
  }
  return partial;
}

/** A forward protobuf reader over bytes[start, end). */
class Reader {
  constructor(
    private readonly bytes: Buffer,
    private position: number,
    private readonly end: number,
  ) {}

  more(): boolean {
    return this.position < this.end;
  }

  varintBig(): bigint {
    let value = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      if (this.position >= this.end) throw new Error("truncated varint in an OTLP ExportLogsServiceResponse");
      const byte = this.bytes[this.position++];
      value |= BigInt(byte & 0x7f) << shift;
      if (byte < 0x80) return value;
    }
    throw new Error("varint longer than 10 bytes in an OTLP ExportLogsServiceResponse");
  }

  /** Reads a varint that is expected to fit in a safe integer (keys and lengths). */
  varint(): number {
    const value = this.varintBig();
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`varint ${value} out of range in an OTLP ExportLogsServiceResponse`);
    return Number(value);
  }

  delimited(): Reader {
    const length = this.varint();
    const start = this.position;
    if (start + length > this.end) throw new Error(`field of ${length} bytes overruns an OTLP ExportLogsServiceResponse`);
    this.position = start + length;
    return new Reader(this.bytes, start, start + length);
  }

  string(): string {
    const field = this.delimited();
    return this.bytes.toString("utf8", field.position, field.end);
  }

  skip(wireType: number): void {
    if (wireType === VARINT) this.varintBig();
    else if (wireType === FIXED64) this.advance(8);
    else if (wireType === LENGTH_DELIMITED) this.delimited();
    else if (wireType === FIXED32) this.advance(4);
    else throw new Error(`unsupported wire type ${wireType} in an OTLP ExportLogsServiceResponse`);
  }

  private advance(bytes: number): void {
    if (this.position + bytes > this.end) throw new Error("truncated field in an OTLP ExportLogsServiceResponse");
    this.position += bytes;
  }
}
