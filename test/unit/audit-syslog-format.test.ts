import test from "ava";

import { sealLine } from "../../agent/audit/chain";
import type { AuditEvent, SealedRecord } from "../../agent/audit/record";
import {
  checkSyslogHeader,
  escapeParamValue,
  formatStructuredData,
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
