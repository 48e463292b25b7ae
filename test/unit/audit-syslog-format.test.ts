import test from "ava";

import { sealLine } from "../../agent/audit/chain";
import type { AuditEvent, SealedRecord } from "../../agent/audit/record";
import {
  DEFAULT_SYSLOG_MAX_MESSAGE_BYTES,
  MIN_SYSLOG_MAX_MESSAGE_BYTES,
  checkMaxMessageBytes,
  checkSyslogHeader,
  escapeParamValue,
  formatStandInMsg,
  formatStructuredData,
  formatSyslogFrame,
  formatSyslogMessage,
  frameOctetCounted,
  parseSyslogFacility,
  syslogMsgId,
  syslogSeverity,
  syslogTimestamp,
  type SyslogHeader,
} from "../../agent/audit/sinks/syslog-format";
import { AgentError } from "../../agent/errors";

const ID = "0b6f3c2e-8a41-4d7e-9c55-2f1a7e9d3b10";

function completed(overrides: Partial<Extract<AuditEvent, { type: "connection.completed" }>> = {}): AuditEvent {
  return {
    time: "2026-03-01T10:15:02.481Z",
    type: "connection.completed",
    start: "2026-03-01T10:15:01.912Z",
    node: "node-a",
    connection_id: "c1",
    direction: "inbound",
    src: { addr: "10.0.0.1:40000" },
    dst: { addr: "10.0.0.2:8080" },
    transport: "hbone",
    decision: "allow",
    reason: "no_policy",
    established: true,
    bytes_sent: 1,
    bytes_recv: 2,
    duration_ms: 3,
    ...overrides,
  };
}

/** Seals an event as the spool does: chain fields after the event's fields, then the hash. */
function seal(event: AuditEvent, seq = 7, id = ID): { record: SealedRecord; line: string } {
  const body = JSON.stringify({ ...event, v: 1, seq, id, prev_hash: "0".repeat(64) });
  const { line } = sealLine(body);
  return { record: JSON.parse(line) as SealedRecord, line };
}

const HEADER: SyslogHeader = checkSyslogHeader({ facility: "authpriv", hostname: "node-a", procId: "4242", sdId: "audit@32473" });

test("message has RFC 5424 header and JSON MSG", (t) => {
  const { record, line } = seal(completed());
  const message = formatSyslogMessage(HEADER, record, line);
  t.is(message, `<86>1 2026-03-01T10:15:02.481Z node-a ambient-agent 4242 connection.completed [audit@32473 id="${ID}" seq="7" v="1"] ${line}`);
  t.false(message.includes("\ufeff"));
});

test("MSG parses back to the same record", (t) => {
  const { record, line } = seal(completed({ src: { addr: "10.0.0.1:1", workload: "wëb \"quoted\"] \\" } }));
  const message = formatSyslogMessage(HEADER, record, line);
  const msg = message.slice(message.indexOf("] ") + 2);
  t.is(msg, line);
  t.deepEqual(JSON.parse(msg), record);
});

test("PRI is facility times 8 plus severity", (t) => {
  const { record, line } = seal(completed());
  const local4 = checkSyslogHeader({ facility: "local4", hostname: "n", procId: "1", sdId: "audit@32473" });
  t.true(formatSyslogMessage(local4, record, line).startsWith("<166>1 "));
  const numeric = checkSyslogHeader({ facility: 0, hostname: "n", procId: "1", sdId: "audit@32473" });
  t.true(formatSyslogMessage(numeric, record, line).startsWith("<6>1 "));
  const gap = seal({ type: "audit.gap", time: "2026-03-01T10:15:02.481Z", node: "n", reason: "queue_full", lost: 3, first_time: "a", last_time: "b" });
  t.true(formatSyslogMessage(HEADER, gap.record, gap.line).startsWith("<83>1 "));
});

test("facility accepts names and numbers", (t) => {
  t.is(parseSyslogFacility("authpriv"), 10);
  t.is(parseSyslogFacility("AUTH"), 4);
  t.is(parseSyslogFacility("local7"), 23);
  t.is(parseSyslogFacility("13"), 13);
  t.is(parseSyslogFacility(23), 23);
  for (const invalid of ["nope", "24", -1, 24, 1.5, ""]) {
    const error = t.throws(() => parseSyslogFacility(invalid), { instanceOf: AgentError });
    t.is(error?.code, "INVALID_AUDIT_SINK");
  }
});

test("severity by record type and outcome", (t) => {
  const cases: [string, AuditEvent, number][] = [
    ["allowed completed", completed(), 6],
    ["denied completed", completed({ decision: "deny", reason: "denied_by_policy" }), 4],
    ["allowed but failed", completed({ error: { code: "UPSTREAM_CONNECT_FAILED", message: "refused" } }), 4],
    ["opened", { ...(completed() as object), type: "connection.opened" } as AuditEvent, 6],
    ["control", { type: "agent.stopped", time: "t", node: "n", reason: "signal", open_connections: 0 }, 6],
    ["gap", { type: "audit.gap", time: "t", node: "n", reason: "spool_full", lost: 1, first_time: "a", last_time: "b" }, 3],
    [
      "refused",
      { type: "connection.refused", time: "t", node: "n", listener: "metrics", port: 15020, src: { addr: "10.0.0.9:40000" }, reason: "request_timeout", message: "m", limit: 5, count: 1, first_time: "t" },
      4,
    ],
  ];
  for (const [name, event, severity] of cases) {
    t.is(syslogSeverity(seal(event).record), severity, name);
  }
});

test("PARAM-VALUE escapes quote, backslash and bracket", (t) => {
  t.is(escapeParamValue('a"b\\c]d'), 'a\\"b\\\\c\\]d');
  t.is(escapeParamValue("plain [x] ="), "plain [x\\] =");
  const { record } = seal(completed(), 3, 'x"]\\');
  t.is(formatStructuredData("audit@32473", record), '[audit@32473 id="x\\"\\]\\\\" seq="3" v="1"]');
});

test("header fields within RFC 5424 limits", (t) => {
  const valid = { facility: 10, hostname: "node-a", procId: "1", sdId: "audit@32473" };
  t.notThrows(() => checkSyslogHeader({ ...valid, hostname: "h".repeat(255) }));
  t.notThrows(() => checkSyslogHeader({ ...valid, appName: "a".repeat(48) }));
  t.notThrows(() => checkSyslogHeader({ ...valid, procId: "9".repeat(128) }));
  t.notThrows(() => checkSyslogHeader({ ...valid, sdId: `${"s".repeat(26)}@32473` }));
  t.notThrows(() => checkSyslogHeader({ ...valid, sdId: "audit@32473.1.2" }));
  const invalid: [string, object][] = [
    ["long hostname", { hostname: "h".repeat(256) }],
    ["hostname with space", { hostname: "node a" }],
    ["non-ASCII hostname", { hostname: "nöde" }],
    ["empty hostname", { hostname: "" }],
    ["long app name", { appName: "a".repeat(49) }],
    ["long procid", { procId: "9".repeat(129) }],
    ["long SD-ID", { sdId: `${"s".repeat(27)}@32473` }],
    ["SD-ID without enterprise number", { sdId: "audit" }],
    ["SD-ID with equals", { sdId: "au=dit@32473" }],
    ["SD-ID with quote", { sdId: 'au"dit@32473' }],
    ["SD-ID with bracket", { sdId: "au]dit@32473" }],
    ["SD-ID with space", { sdId: "au dit@32473" }],
  ];
  for (const [name, override] of invalid) {
    const error = t.throws(() => checkSyslogHeader({ ...valid, ...override }), { instanceOf: AgentError }, name);
    t.is(error?.code, "INVALID_AUDIT_SINK", name);
  }
});

test("MSGID falls back to NILVALUE beyond 32 characters", (t) => {
  t.is(syslogMsgId("connection.completed"), "connection.completed");
  t.is(syslogMsgId("x".repeat(32)), "x".repeat(32));
  t.is(syslogMsgId("x".repeat(33)), "-");
  t.is(syslogMsgId("with space"), "-");
});

test("timestamp keeps at most six fraction digits", (t) => {
  t.is(syslogTimestamp("2026-03-01T10:15:02.481Z"), "2026-03-01T10:15:02.481Z");
  t.is(syslogTimestamp("2026-03-01T10:15:02Z"), "2026-03-01T10:15:02Z");
  t.is(syslogTimestamp("2026-03-01T10:15:02.123456789+02:00"), "2026-03-01T10:15:02.123456+02:00");
  t.is(syslogTimestamp("2026-03-01 10:15:02Z"), "-");
  t.is(syslogTimestamp("2026-03-01t10:15:02z"), "-");
  t.is(syslogTimestamp(""), "-");
});

test("octet counting frames by UTF-8 byte length", (t) => {
  t.is(frameOctetCounted("abc").toString("utf8"), "3 abc");
  const frame = frameOctetCounted("é€");
  t.is(frame.toString("utf8"), "5 é€");
  t.is(frame.length, 7);
  const { record, line } = seal(completed({ src: { addr: "10.0.0.1:1", workload: "ünïcode" } }));
  const message = formatSyslogMessage(HEADER, record, line);
  const framed = frameOctetCounted(message);
  const space = framed.indexOf(0x20);
  t.is(Number(framed.subarray(0, space).toString("ascii")), framed.length - space - 1);
  t.is(framed.subarray(space + 1).toString("utf8"), message);
});

/** Splits an octet-counted frame into its count and its message. */
function unframe(frame: Buffer): { count: number; message: string } {
  const space = frame.indexOf(0x20);
  return { count: Number(frame.subarray(0, space).toString("ascii")), message: frame.subarray(space + 1).toString("utf8") };
}

test("frame within the limit carries the line", (t) => {
  const { record, line } = seal(completed());
  const { frame, standInForBytes } = formatSyslogFrame(HEADER, record, line, DEFAULT_SYSLOG_MAX_MESSAGE_BYTES);
  t.is(standInForBytes, undefined);
  t.is(unframe(frame).message, formatSyslogMessage(HEADER, record, line));
});

test("frame of exactly the limit carries the line", (t) => {
  const { record, line } = seal(completed());
  const bytes = Buffer.byteLength(formatSyslogMessage(HEADER, record, line), "utf8");
  t.is(formatSyslogFrame(HEADER, record, line, bytes).standInForBytes, undefined);
  t.not(formatSyslogFrame(HEADER, record, line, bytes - 1).standInForBytes, undefined);
});

test("oversized record becomes a stand-in", (t) => {
  const { record, line } = seal(completed({ src: { addr: "10.0.0.1:1", workload: "ü".repeat(10_000) } }));
  const lineBytes = Buffer.byteLength(line, "utf8");
  const { frame, standInForBytes } = formatSyslogFrame(HEADER, record, line, 8192);
  const { count, message } = unframe(frame);

  t.is(standInForBytes, lineBytes);
  t.true(count <= 8192, `the stand-in has ${count} bytes`);
  t.is(count, Buffer.byteLength(message, "utf8"));
  const standIn = formatStandInMsg(record, line);
  t.is(message, formatSyslogMessage(HEADER, record, standIn));
  t.deepEqual(JSON.parse(standIn), {
    time: record.time,
    type: "connection.completed",
    v: 1,
    seq: 7,
    id: ID,
    node: "node-a",
    truncated: true,
    bytes: lineBytes,
    hash: record.hash,
  });
});

test("stand-in fits the minimum with the longest header", (t) => {
  const header = checkSyslogHeader({ facility: 23, hostname: "h".repeat(255), procId: "9".repeat(128), sdId: `${"s".repeat(25)}@123456` });
  const { record, line } = seal(completed({ node: "h".repeat(255), src: { addr: "10.0.0.1:1", workload: "w".repeat(5_000) } }), Number.MAX_SAFE_INTEGER);
  const { frame, standInForBytes } = formatSyslogFrame(header, record, line, MIN_SYSLOG_MAX_MESSAGE_BYTES);
  const { count, message } = unframe(frame);
  t.not(standInForBytes, undefined);
  t.true(count <= MIN_SYSLOG_MAX_MESSAGE_BYTES, `the stand-in has ${count} bytes`);
  const standIn = JSON.parse(message.slice(message.indexOf("] ") + 2)) as { truncated: boolean; node: string };
  t.is(standIn.truncated, true);
  t.is(standIn.node, "h".repeat(255), "the full stand-in fits, not only the short one");
});

test("short stand-in when the full one is too long", (t) => {
  // A time too long for the stand-in: TIMESTAMP becomes the NILVALUE, but the stand-in's MSG carries it.
  const { record, line } = seal(completed({ time: "x".repeat(3_000) }));
  const { frame, standInForBytes } = formatSyslogFrame(HEADER, record, line, MIN_SYSLOG_MAX_MESSAGE_BYTES);
  const { count, message } = unframe(frame);
  t.is(standInForBytes, Buffer.byteLength(line, "utf8"));
  t.true(count <= MIN_SYSLOG_MAX_MESSAGE_BYTES, `the stand-in has ${count} bytes`);
  t.deepEqual(JSON.parse(message.slice(message.indexOf("] ") + 2)), { seq: 7, id: ID, truncated: true, bytes: standInForBytes, hash: record.hash });
});

test("maximum message size has a floor of 2048", (t) => {
  t.is(checkMaxMessageBytes(2048), 2048);
  t.is(checkMaxMessageBytes(65536), 65536);
  for (const value of [2047, 0, -1, 4096.5, Number.NaN]) {
    const error = t.throws(() => checkMaxMessageBytes(value), undefined, String(value));
    t.true(error instanceof AgentError && error.code === "INVALID_AUDIT_SINK", String(value));
  }
});
