import crypto from "node:crypto";
import test, { type ExecutionContext } from "ava";
import type { SealedRecord } from "../../agent/audit/record";
import type { SpooledRecord } from "../../agent/audit/sink";
import { decodeExportResponse, encodeExportRequest } from "../../agent/audit/sinks/otlp-encode";
import { buildExportRequest } from "../../agent/audit/sinks/otlp-mapping";
import { loadLogsService, type ExportLogsRequestMessage, type ExportLogsResponseMessage } from "../../agent/audit/sinks/otlp-proto";

const NODE = "node-a";
const NOW = new Date("2026-03-01T10:00:05.678Z");

const exportMethod = loadLogsService().service.Export;

/** Encodes a batch the proto-loader way: buildExportRequest(), serialized by the loaded LogsService definition. */
function encodeWithProtoLoader(batch: readonly SpooledRecord[], node = NODE, now = NOW): Buffer {
  return exportMethod.requestSerialize(buildExportRequest(batch, node, now));
}

function decodeWithProtoLoader(bytes: Buffer): ExportLogsRequestMessage {
  return exportMethod.requestDeserialize(bytes) as ExportLogsRequestMessage;
}

/** Checks that both encoders give the same bytes, and that proto-loader decodes both to the same object. */
function assertSameEncoding(t: ExecutionContext, batch: readonly SpooledRecord[], node = NODE, now = NOW): void {
  const direct = encodeExportRequest(batch, node, now);
  const reference = encodeWithProtoLoader(batch, node, now);
  t.deepEqual(decodeWithProtoLoader(direct), decodeWithProtoLoader(reference));
  t.is(direct.toString("hex"), reference.toString("hex"));
}

function spooled(record: Record<string, unknown>, seq = Number(record.seq ?? 1)): SpooledRecord {
  const id = typeof record.id === "string" ? record.id : crypto.randomUUID();
  const line = JSON.stringify(record, (_key, value: unknown) => (typeof value === "bigint" ? value.toString() : value));
  return { seq, id, line, record: record as unknown as SealedRecord };
}

function chained(seq: number, fields: Record<string, unknown>): Record<string, unknown> {
  return { ...fields, v: 1, seq, id: crypto.randomUUID(), prev_hash: crypto.randomBytes(32).toString("hex"), hash: crypto.randomBytes(32).toString("hex") };
}

/** Returns one record of each kind the agent writes, with the optional fields that change the encoding. */
function realRecords(): SpooledRecord[] {
  const peer = { addr: "10.0.0.1:40000", workload: "client-7d9f8c6b5-x2k4p", namespace: "demo", identity: "spiffe://cluster.local/ns/demo/sa/client" };
  const target = { addr: "10.0.0.2:8080", workload: "web", namespace: "demo", service: "web.demo.svc.cluster.local", hbone_addr: "10.0.0.2:15008" };
  const connection = { start: "2026-03-01T09:59:59.000Z", node: NODE, connection_id: "c1", direction: "inbound", src: peer, dst: target, transport: "hbone" };
  const records = [
    { time: "2026-03-01T10:00:00.000Z", type: "connection.opened", ...connection, decision: "allow", policy: "demo/allow", policy_kind: "AuthorizationPolicy", rule: 0, reason: "allowed_by_policy" },
    {
      time: "2026-03-01T10:00:00.250Z", type: "connection.completed", ...connection, decision: "allow", reason: "no_policy",
      dry_run: [{ policy: "demo/deny-all", rule: 2, decision: "deny" }], established: true, bytes_sent: 1834, bytes_recv: 73211, duration_ms: 1250,
    },
    {
      time: "2026-03-01T10:00:01Z", type: "connection.completed", ...connection, decision: "deny", policy: "demo/strict", policy_kind: "PeerAuthentication",
      reason: "denied_by_policy", established: false, flag: "CONNECT", error: { code: "POLICY_DENIED", message: "denied by demo/strict" },
    },
    { time: "2026-03-01T10:00:02Z", type: "audit.gap", node: NODE, reason: "queue_full", lost: 12, first_time: "2026-03-01T10:00:00Z", last_time: "2026-03-01T10:00:01Z", first_seq: 4, last_seq: 15 },
    { time: "2026-03-01T10:00:03Z", type: "agent.started", node: NODE, version: "0.1.0", pid: 4242, previous_stop: "unclean", settings: { capture: "ebpf", audit: { sinks: ["file", "otlp"], queue: 10_000 } } },
    {
      time: "2026-03-01T10:00:04+02:00", type: "policy.changed", node: NODE, policy: { kind: "AuthorizationPolicy", namespace: "demo", name: "allow" }, file: "/etc/policies/allow.yaml",
      changes: [{ path: "spec.rules[0].from", before: [{ principals: ["a"] }], after: null }, { path: "spec.action", before: "ALLOW", after: "DENY" }], changes_omitted: 0,
    },
  ];
  return records.map((record, index) => spooled(chained(index + 1, record)));
}

test("encoder matches proto-loader for real records", (t) => {
  assertSameEncoding(t, realRecords());
});

test("encoder matches proto-loader for empty batch", (t) => {
  assertSameEncoding(t, []);
});

test("encoder matches proto-loader for edge values", (t) => {
  const edges = chained(7, {
    time: "2026-03-01T10:00:00.123456789Z",
    type: "connection.completed",
    zero: 0,
    negative_zero: -0,
    minus_one: -1,
    min_safe: Number.MIN_SAFE_INTEGER,
    max_safe: Number.MAX_SAFE_INTEGER,
    above_safe: 2 ** 53,
    big_double: 2 ** 60,
    negative_double: -2.5,
    tiny: 5e-324,
    max_double: Number.MAX_VALUE,
    infinity: Infinity,
    not_a_number: NaN,
    int_32_edges: [2 ** 31 - 1, 2 ** 31, -(2 ** 31), 2 ** 32, -(2 ** 32) - 1, 127, 128, 16_383, 16_384],
    empty_string: "",
    empty_list: [],
    empty_object: {},
    nothing: null,
    nulls: [null, null],
    left_out: undefined,
    unicode: "é ✓ 日本語 😀 \u0000 \u007f \u0080",
    "ключ ✓": "non-ASCII key",
    long_ascii: "a".repeat(200),
    long_unicode: "✓".repeat(100),
    exactly_loop_limit: "b".repeat(64),
    above_loop_limit: "c".repeat(65),
    big_integer: 123n,
    negative_big_integer: -123n,
    "42": "integer-like key, which JavaScript orders first",
    nested: { a: { b: { c: [1, [2, [3, { d: true }]]] } } },
  });
  assertSameEncoding(t, [spooled(edges)]);
});

test("encoder matches proto-loader for times", (t) => {
  const times = [
    "1970-01-01T00:00:00Z",
    "1970-01-01T00:00:01.5Z",
    "1969-12-31T23:59:59Z",
    "2026-03-01T11:00:00.000001+01:00",
    "2026-03-01t10:00:00.9z",
    "2106-02-07T06:28:15.999999999Z",
    "2106-02-07T06:28:16Z",
    "2262-04-11T23:47:16.854775807Z",
    "9999-12-31T23:59:59.999999999Z",
    "2026-03-01 10:00:00Z",
    "2026-02-30T10:00:00Z",
    "not a time",
    "",
  ];
  const batch = times.map((time, index) => spooled(chained(index + 1, { time, type: "connection.completed" })));
  assertSameEncoding(t, batch);
  assertSameEncoding(t, batch, NODE, new Date(0));
  assertSameEncoding(t, batch, "nœud-✓", new Date(Date.UTC(2300, 0, 1)));
});

test("encoder matches proto-loader when size estimate is short", (t) => {
  // The writer sizes its buffer from the lines, so records larger than their lines make it grow.
  const large = chained(1, { time: "2026-03-01T10:00:00Z", type: "connection.completed", padding: "✓".repeat(50_000), list: Array.from({ length: 2_000 }, (_, index) => index * 1_000_003) });
  const batch = [spooled(large), spooled(chained(2, { time: "2026-03-01T10:00:00Z", type: "audit.gap" }))];
  for (const record of batch) record.line = "{}";
  assertSameEncoding(t, batch);
});

test("encoder matches proto-loader for random records", (t) => {
  for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
    const random = seededRandom(seed);
    const batch = Array.from({ length: 40 }, (_, index) => spooled(chained(index + 1, randomRecord(random))));
    const direct = encodeExportRequest(batch, NODE, NOW);
    const reference = encodeWithProtoLoader(batch);
    t.deepEqual(decodeWithProtoLoader(direct), decodeWithProtoLoader(reference), `seed ${seed}`);
    t.is(direct.toString("hex"), reference.toString("hex"), `seed ${seed}`);
  }
});

test("encoder writes negative int64 as ten bytes", (t) => {
  const batch = [spooled(chained(1, { time: "2026-03-01T10:00:00Z", type: "x", n: -1 }))];
  const bytes = encodeExportRequest(batch, NODE, NOW);
  // AnyValue.int_value (tag 0x18) of -1: 64 one-bits in ten varint bytes.
  t.true(bytes.includes(Buffer.from("18ffffffffffffffffff01", "hex")));
});

test("encoder replaces lone surrogates", (t) => {
  // JSON.parse accepts "\ud800" escapes, and UTF-8 cannot encode a lone surrogate.
  const record = chained(1, { time: "2026-03-01T10:00:00Z", type: "x", short: "a\ud800b", long: `${"c".repeat(70)}\udc00` });
  const decoded = decodeWithProtoLoader(encodeExportRequest([spooled(record)], NODE, NOW));
  const body = decoded.resource_logs![0].scope_logs![0].log_records![0].body!.kvlist_value!.values!;
  t.is(body.find((member) => member.key === "short")?.value?.string_value, "a\ufffdb");
  t.is(body.find((member) => member.key === "long")?.value?.string_value, `${"c".repeat(70)}\ufffd`);
});

test("response decoder reads partial success", (t) => {
  const serialize = (response: ExportLogsResponseMessage): Buffer => exportMethod.responseSerialize(response);

  t.deepEqual(decodeExportResponse(Buffer.alloc(0)), {});
  t.deepEqual(decodeExportResponse(serialize({ partial_success: { rejected_log_records: 5, error_message: "2 records ✓ too large" } })), {
    partial_success: { rejected_log_records: "5", error_message: "2 records ✓ too large" },
  });
  t.deepEqual(decodeExportResponse(serialize({ partial_success: { error_message: "warning only" } })), { partial_success: { error_message: "warning only" } });
  t.deepEqual(decodeExportResponse(serialize({ partial_success: { rejected_log_records: "9007199254740993" } })), {
    partial_success: { rejected_log_records: "9007199254740993" },
  });
  t.deepEqual(decodeExportResponse(serialize({ partial_success: { rejected_log_records: -2 } })), { partial_success: { rejected_log_records: "-2" } });
});

test("response decoder skips unknown fields", (t) => {
  // Field 3 varint, field 4 fixed64, field 5 fixed32 and field 6 bytes around partial_success { rejected_log_records: 3 }.
  const bytes = Buffer.from("1801" + "210102030405060708" + "2d01020304" + "32026869" + "0a020803", "hex");
  t.deepEqual(decodeExportResponse(bytes), { partial_success: { rejected_log_records: "3" } });
});

test("response decoder rejects malformed input", (t) => {
  t.throws(() => decodeExportResponse(Buffer.from("0a05", "hex")), { message: /overruns/ });
  t.throws(() => decodeExportResponse(Buffer.from("0a0188", "hex")), { message: /truncated varint/ });
  t.throws(() => decodeExportResponse(Buffer.from("0f", "hex")), { message: /wire type 7/ });
  t.throws(() => decodeExportResponse(Buffer.from("ffffffffffffffffffffff", "hex")), { message: /longer than 10 bytes/ });
});

/** Creates a deterministic random source in [0, 1), so a failing seed fails again. */
function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let mixed = Math.imul(state ^ (state >>> 15), state | 1);
    mixed ^= mixed + Math.imul(mixed ^ (mixed >>> 7), mixed | 61);
    return ((mixed ^ (mixed >>> 14)) >>> 0) / 2 ** 32;
  };
}

function randomRecord(random: () => number): Record<string, unknown> {
  const types = ["connection.opened", "connection.completed", "audit.gap", "agent.started", "policy.changed"];
  const record: Record<string, unknown> = { time: randomTime(random), type: types[Math.floor(random() * types.length)], node: NODE };
  if (random() < 0.3) record.decision = random() < 0.5 ? "deny" : "allow";
  if (random() < 0.2) record.error = { code: "UPSTREAM_CONNECT_FAILED", message: randomString(random) };
  Object.assign(record, randomObject(random, 0));
  return record;
}

function randomTime(random: () => number): string {
  if (random() < 0.05) return randomString(random);
  const millis = Math.floor(random() * Date.UTC(2200, 0, 1));
  const base = new Date(millis).toISOString().slice(0, 19);
  const fraction = random() < 0.5 ? "" : `.${String(Math.floor(random() * 1e9)).padStart(9, "0").slice(0, 1 + Math.floor(random() * 9))}`;
  const zone = random() < 0.7 ? "Z" : `${random() < 0.5 ? "+" : "-"}0${Math.floor(random() * 10)}:30`;
  return base + fraction + zone;
}

function randomValue(random: () => number, depth: number): unknown {
  const kind = Math.floor(random() * (depth >= 3 ? 6 : 8));
  switch (kind) {
    case 0:
      return randomString(random);
    case 1:
      return random() < 0.5;
    case 2:
      return Math.floor((random() - 0.5) * 2 ** Math.floor(random() * 54));
    case 3:
      return (random() - 0.5) * 10 ** Math.floor(random() * 40 - 20);
    case 4:
      return null;
    case 5:
      return random() < 0.5 ? Number.MAX_SAFE_INTEGER : -(2 ** 63);
    case 6:
      return Array.from({ length: Math.floor(random() * 5) }, () => randomValue(random, depth + 1));
    default:
      return randomObject(random, depth + 1);
  }
}

function randomObject(random: () => number, depth: number): Record<string, unknown> {
  const object: Record<string, unknown> = {};
  const members = Math.floor(random() * 8);
  for (let index = 0; index < members; index += 1) object[randomString(random) || `k${index}`] = randomValue(random, depth);
  return object;
}

/** Returns a string of ASCII, two-, three- and four-byte UTF-8 characters, of up to 300 UTF-16 units. */
function randomString(random: () => number): string {
  const alphabet = ["a", "Z", "0", "_", ".", "/", ":", "\"", "\\", "\n", "\u0000", "é", "ß", "✓", "日", "😀"];
  const length = random() < 0.9 ? Math.floor(random() * 40) : Math.floor(random() * 300);
  let text = "";
  while (text.length < length) text += alphabet[Math.floor(random() * alphabet.length)];
  return text;
}
