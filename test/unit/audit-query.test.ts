import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { MAX_LINE_BYTES } from "../../agent/audit/line-reader";
import { parseAuditQuery, queryAuditFiles, matchesQuery, typeIsKnown, type AuditQueryOptions, type StoredRecord } from "../../agent/audit/query";
import type { AuditEvent } from "../../agent/audit/record";
import { AuditTable, displayWidth } from "../../agent/cli/audit-table";
import { buildChain, connectionEvent, linesOf, tempAuditDir, writeLines } from "../harness/audit-chain";

const NOW = Date.parse("2026-03-01T12:00:00.000Z");

/** Builds connection and control records, one second apart from 10:00:00. */
function sampleEvents(): AuditEvent[] {
  return [
    connectionEvent(0),
    connectionEvent(1, {
      decision: "deny",
      reason: "denied_by_policy",
      policy: "shop/deny-legacy",
      src: { addr: "10.0.3.9:41000", workload: "legacy", namespace: "old", identity: "spiffe://cluster.local/ns/old/sa/legacy" },
    }),
    connectionEvent(2, {
      direction: "outbound",
      policy: undefined,
      policy_kind: undefined,
      rule: undefined,
      reason: "allowed",
      dst: { addr: "10.0.9.9:443" },
      dry_run: [{ policy: "shop/dry-deny", decision: "deny" }],
    }),
    { type: "workload.enrolled", time: "2026-03-01T10:00:03.000Z", node: "node-a", workload: "web", namespace: "shop", identity: "spiffe://cluster.local/ns/shop/sa/web", reason: "namespace label" },
    { type: "policy.added", time: "2026-03-01T10:00:04.000Z", node: "node-a", policy: { kind: "AuthorizationPolicy", namespace: "shop", name: "allow-demo" }, file: "/etc/policies/shop.yaml" },
    { type: "certificate.issued", time: "2026-03-01T10:00:05.000Z", node: "node-a", identity: "spiffe://cluster.local/ns/demo/sa/client", serial: "0a1b", not_before: "2026-03-01T09:00:00Z", not_after: "2026-03-02T09:00:00Z", fingerprint_sha256: "ab" },
    { type: "agent.started", time: "2026-03-01T10:00:06.000Z", node: "node-a", version: "0.1.0", pid: 42, settings: {} },
  ];
}

function sampleRecords(): StoredRecord[] {
  return linesOf(buildChain(sampleEvents())).map((line) => JSON.parse(line) as StoredRecord);
}

/** Returns the seq of every sample record that the options select. */
function select(options: AuditQueryOptions): number[] {
  const query = parseAuditQuery(options, NOW);
  return sampleRecords()
    .filter((record) => matchesQuery(record, query))
    .map((record) => record.seq as number);
}

test("no filter selects every record", (t) => {
  t.deepEqual(select({}), [1, 2, 3, 4, 5, 6, 7]);
});

test("identity filter exact and prefix", (t) => {
  t.deepEqual(select({ identity: "spiffe://cluster.local/ns/old/sa/legacy" }), [2]);
  t.deepEqual(select({ identity: "cluster.local/ns/old/sa/legacy" }), [2]);
  t.deepEqual(select({ identity: "spiffe://cluster.local/ns/shop/*" }), [1, 2, 4]);
  t.deepEqual(select({ identity: "spiffe://cluster.local/ns/demo/sa/client" }), [1, 3, 6]);
});

test("workload filter with and without namespace", (t) => {
  t.deepEqual(select({ workload: "shop/web" }), [1, 2, 4]);
  t.deepEqual(select({ workload: "web" }), [1, 2, 4]);
  t.deepEqual(select({ workload: "other/web" }), []);
  t.deepEqual(select({ workload: "legacy" }), [2]);
});

test("namespace filter on peers, workloads and policies", (t) => {
  t.deepEqual(select({ namespace: "old" }), [2]);
  t.deepEqual(select({ namespace: "shop" }), [1, 2, 4, 5]);
});

test("decision filter excludes control records", (t) => {
  t.deepEqual(select({ decision: "deny" }), [2]);
  t.deepEqual(select({ decision: "allow" }), [1, 3]);
});

test("policy filter on decision, dry run and policy records", (t) => {
  t.deepEqual(select({ policy: "shop/deny-legacy" }), [2]);
  t.deepEqual(select({ policy: "shop/dry-deny" }), [3]);
  t.deepEqual(select({ policy: "shop/allow-demo" }), [1, 5]);
});

test("type filter exact and prefix", (t) => {
  t.deepEqual(select({ type: "connection.completed" }), [1, 2, 3]);
  t.deepEqual(select({ type: "policy." }), [5]);
  t.deepEqual(select({ type: "workload." }), [4]);
  t.true(typeIsKnown(parseAuditQuery({ type: "certificate." }).type!));
  t.false(typeIsKnown(parseAuditQuery({ type: "connection.closed" }).type!));
});

test("time range with RFC 3339 bounds", (t) => {
  t.deepEqual(select({ since: "2026-03-01T10:00:02Z", until: "2026-03-01T10:00:04Z" }), [3, 4, 5]);
  t.deepEqual(select({ since: "2026-03-01T11:00:02+01:00" }), [3, 4, 5, 6, 7]);
  t.deepEqual(select({ until: "2026-03-01T10:00:00.500Z" }), [1]);
});

test("time range with durations before now", (t) => {
  t.deepEqual(select({ since: "2h" }), [1, 2, 3, 4, 5, 6, 7]);
  t.deepEqual(select({ since: "119m" }), []);
  t.deepEqual(select({ until: "7199s" }), [1, 2]);
  t.deepEqual(select({ since: "1d", until: "2h" }), [1]);
});

test("filters combine", (t) => {
  t.deepEqual(select({ namespace: "shop", type: "connection.", decision: "allow" }), [1]);
});

test("invalid filter values name value and form", (t) => {
  const cases: [AuditQueryOptions, RegExp][] = [
    [{ identity: "demo/client" }, /invalid --identity "demo\/client": write spiffe:\/\//],
    [{ identity: "spiffe://a/*/b*" }, /invalid --identity/],
    [{ workload: "a/b/c" }, /invalid --workload "a\/b\/c": write NAMESPACE\/NAME or NAME/],
    [{ workload: "Web" }, /invalid --workload "Web"/],
    [{ namespace: "shop/web" }, /invalid --namespace "shop\/web"/],
    [{ decision: "denied" }, /invalid --decision "denied": use allow or deny/],
    [{ policy: "allow-all" }, /invalid --policy "allow-all": write NAMESPACE\/NAME/],
    [{ type: "connection" }, /invalid --type "connection": .*prefix ending with a dot/],
    [{ since: "yesterday" }, /invalid --since "yesterday": write an RFC 3339 time/],
    [{ until: "5w" }, /invalid --until "5w"/],
    [{ since: "2026-03-01 10:00" }, /invalid --since/],
    [{ since: "1h", until: "2h" }, /--since 1h is after --until 2h/],
    [{ limit: "0" }, /invalid --limit "0": write a whole number of records from 1 to 100000/],
    [{ limit: "ten" }, /invalid --limit "ten"/],
  ];
  for (const [options, message] of cases) {
    const error = t.throws(() => parseAuditQuery(options, NOW), undefined, JSON.stringify(options));
    t.is((error as { code?: string }).code, "INVALID_QUERY");
    t.regex(error!.message, message);
  }
});

test("times that do not exist are invalid", (t) => {
  for (const since of ["2026-02-31T00:00:00Z", "2026-02-29T00:00:00Z", "2026-13-01T00:00:00Z", "2026-00-10T00:00:00Z", "2026-03-01T24:00:00Z", "2026-03-01T10:60:00Z", "2026-03-01T10:00:60Z", "2026-03-01T10:00:00+24:00", "2026-03-01T10:00:00+01:60"]) {
    const error = t.throws(() => parseAuditQuery({ since }, NOW), undefined, since);
    t.regex(error!.message, /invalid --since .*write an RFC 3339 time/, since);
  }
});

test("valid times parse to the same instant as Date", (t) => {
  for (const since of ["2024-02-29T23:59:59Z", "2026-03-01T11:00:02+01:00", "2026-03-01T10:00:00.5z", "2026-03-01 10:00:00.123456-02:30", "0099-01-01T00:00:00Z"]) {
    t.is(parseAuditQuery({ since }, NOW).since, Date.parse(since.replace(" ", "T").replace("z", "Z")), since);
  }
});

test("query streams matches across files", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(buildChain(sampleEvents()));
  const first = writeLines(path.join(dir, "audit-20260301T100000Z.log"), lines.slice(0, 3));
  const second = writeLines(path.join(dir, "audit.log"), [...lines.slice(3), "torn {\"time\""], false);
  const matched: string[] = [];
  const summary = await queryAuditFiles([first, second], parseAuditQuery({ namespace: "shop" }), (match) => {
    matched.push(match.bytes.toString("utf8"));
  });
  t.deepEqual(matched, [lines[0], lines[1], lines[3], lines[4]]);
  t.is(summary.records, 7);
  t.is(summary.matched, 4);
  t.is(summary.skipped, 1);
  t.is(summary.firstSkipped, `${second}:5`);
});

test("query keeps line bytes unchanged", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(buildChain([connectionEvent(0), connectionEvent(1)]));
  const file = path.join(dir, "audit.log");
  fs.writeFileSync(file, Buffer.concat([Buffer.from(`${lines[0]}\r\n`), Buffer.from(`${lines[1].replace("node-a", "node-\u00ff")}\n`, "latin1")]));
  const matched: Buffer[] = [];
  await queryAuditFiles([file], parseAuditQuery({}), (match) => {
    matched.push(Buffer.from(match.bytes));
  });
  t.is(matched.length, 2);
  t.deepEqual(matched[0], Buffer.from(`${lines[0]}\r`));
  t.is(matched[1][matched[1].indexOf("node-") + 5], 0xff);
});

test("query skips a line over 1 MiB", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(buildChain([connectionEvent(0), connectionEvent(1)]));
  const long = `{"type":"connection.completed","pad":"${"x".repeat(MAX_LINE_BYTES)}"}`;
  const file = writeLines(path.join(dir, "audit.log"), [lines[0], long, lines[1]]);
  const seqs: number[] = [];
  const summary = await queryAuditFiles([file], parseAuditQuery({}), (match) => {
    seqs.push(match.record.seq as number);
  });
  t.deepEqual(seqs, [1, 2]);
  t.is(summary.skipped, 1);
  t.is(summary.firstSkipped, `${file}:2`);
});

test("limit keeps the last matches in order", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(buildChain(Array.from({ length: 25 }, (_, index) => connectionEvent(index))));
  const file = writeLines(path.join(dir, "audit.log"), lines);
  for (const limit of [1, 3, 25, 40]) {
    const seqs: number[] = [];
    await queryAuditFiles([file], parseAuditQuery({ limit: String(limit) }), (match) => {
      seqs.push(match.record.seq as number);
    });
    const expected = Array.from({ length: Math.min(limit, 25) }, (_, index) => 25 - Math.min(limit, 25) + 1 + index);
    t.deepEqual(seqs, expected, `limit ${limit}`);
  }
});

/** Renders records with an AuditTable of `width` columns. */
async function renderTable(records: StoredRecord[], width: number | undefined): Promise<string[]> {
  let output = "";
  const write = (text: string): void => {
    output += text;
  };
  const table = new AuditTable(width);
  for (const record of records) await table.add(record, write);
  await table.flush(write);
  return output.trimEnd().split("\n");
}

test("table shows connection and control rows", async (t) => {
  const lines = await renderTable(sampleRecords(), undefined);
  t.regex(lines[0], /^TIME +TYPE +DIR +DECISION +SOURCE +DESTINATION +POLICY +REASON$/);
  t.is(lines.length, 8);
  t.regex(lines[2], /^2026-03-01T10:00:01.000Z +completed +in +deny +old\/sa\/legacy +shop\/sa\/web +shop\/deny-legacy +denied_by_policy$/);
  t.regex(lines[3], /out +allow +demo\/sa\/client +10\.0\.9\.9:443 +- +allowed$/);
  t.regex(lines[4], /workload\.enrolled +- +- +- +shop\/web +- +namespace label$/);
  t.regex(lines[5], /policy\.added +- +- +- +- +shop\/allow-demo +AuthorizationPolicy in \/etc\/policies\/shop\.yaml$/);
  t.regex(lines[6], /certificate\.issued .* demo\/sa\/client .* serial 0a1b, valid until 2026-03-02T09:00:00Z$/);
  t.regex(lines[7], /agent\.started .* version 0\.1\.0, pid 42$/);
});

test("table fits the terminal width", async (t) => {
  for (const width of [80, 100, 140]) {
    const lines = await renderTable(sampleRecords(), width);
    for (const line of lines) t.true(line.length <= width, `width ${width}: ${line.length} columns: ${line}`);
    t.true(lines.some((line) => line.includes("…")), `width ${width} shortens a cell`);
  }
});

test("table columns line up across chunks", async (t) => {
  const records = Array.from({ length: 450 }, (_, index) => JSON.parse(linesOf(buildChain([connectionEvent(index)]))[0]) as StoredRecord);
  const lines = await renderTable(records, undefined);
  t.is(lines.length, 451);
  const reasonColumn = lines[0].indexOf("REASON");
  t.true(lines.every((line, index) => index === 0 || line.indexOf("allowed_by_policy") === reasonColumn));
});

/** Builds a connection record with `fields` replaced. */
function recordWith(fields: Record<string, unknown>): StoredRecord {
  return { ...(JSON.parse(linesOf(buildChain([connectionEvent(0)]))[0]) as StoredRecord), ...fields };
}

test("table escapes control characters", async (t) => {
  const rejected: StoredRecord = {
    type: "policy.rejected",
    time: "2026-03-01T10:00:00.000Z",
    policy: { kind: "AuthorizationPolicy", namespace: "shop", name: "bad" },
    file: "/etc/policies/shop.yaml",
    message: 'unknown key "\u001b]0;TITLE\u0007\nx" in spec\u009b2J \u202eevil\u007f',
  };
  const lines = await renderTable([rejected, recordWith({ reason: "a\rb" })], 200);
  t.is(lines.length, 3);
  t.true(lines[1].endsWith('unknown key "\\u001b]0;TITLE\\u0007\\u000ax" in spec\\u009b2J \\u202eevil\\u007f'), lines[1]);
  t.regex(lines[2], /a\\u000db$/);
  for (const line of lines) t.notRegex(line, /[\u0000-\u001f\u007f-\u009f\u202e]/);
});

test("table shows fields of unexpected types", async (t) => {
  const records = [
    recordWith({ src: { identity: 5, addr: "10.0.0.1:1" }, dst: { addr: 7 } }),
    recordWith({ src: 5, dst: [1], error: "x", reason: { code: 1 }, decision: true, direction: 3, type: "connection.opened", time: 12 }),
    recordWith({ src: { workload: ["a"], namespace: 9 }, dst: null, error: { code: { nested: 1 } } }),
    { type: "policy.added", time: "2026-03-01T10:00:00Z", policy: "shop/allow", changes: "many", file: 4 },
    { type: "policy.changed", time: "2026-03-01T10:00:00Z", policy: { namespace: 3, name: null, kind: [] } },
    { type: "workload.enrolled", time: "2026-03-01T10:00:00Z", namespace: {}, workload: 1 },
    { type: 42, time: null },
  ];
  for (const width of [undefined, 60, 120]) {
    const lines = await renderTable(records, width);
    t.is(lines.length, records.length + 1, `width ${width}`);
  }
  const lines = await renderTable(records, undefined);
  t.regex(lines[1], / 5 +7 +/);
  t.regex(lines[2], /^12 +opened +3 +true +\? +\? +\S+ +\{"code":1\}$/);
  t.regex(lines[3], / 9\/\["a"\] +- +.* \(\{"nested":1\}\)$/);
  t.regex(lines[4], / - +AuthorizationPolicy|policy\.added +- +- +- +- +- +- in 4$/);
  t.regex(lines[5], /policy\.changed +- +- +- +- +3\/- +\[\]$/);
  t.regex(lines[6], /workload\.enrolled +- +- +- +\{\}\/1 /);
  t.regex(lines[7], /^- +42 /);
});

test("table aligns wide characters", async (t) => {
  const records = [
    recordWith({}),
    recordWith({ src: { identity: "spiffe://cluster.local/ns/店/sa/客户端" } }),
    recordWith({ src: { identity: "spiffe://cluster.local/ns/e\u0301/sa/🚀🚀" } }),
  ];
  const lines = await renderTable(records, undefined);
  const destination = lines.map((line) => displayWidth(line.slice(0, line.indexOf("shop/sa/web"))));
  t.deepEqual(destination.slice(2), [destination[1], destination[1]]);
  t.is(displayWidth("店"), 2);
  t.is(displayWidth("e\u0301"), 1);
  t.is(displayWidth("🚀"), 2);
});

const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

test("table cuts between code points", async (t) => {
  const astral = "𝒜".repeat(60);
  const records = [recordWith({ reason: astral, policy: `p${astral}`, src: { identity: `spiffe://cluster.local/ns/${astral}` } })];
  for (const width of [80, 101, 130]) {
    const lines = await renderTable(records, width);
    for (const line of lines) {
      t.notRegex(line, LONE_SURROGATE, `width ${width}: ${line}`);
      t.true(displayWidth(line) <= width, `width ${width}: ${displayWidth(line)} columns`);
    }
    t.true(lines[1].includes("𝒜…𝒜"), `width ${width}: ${lines[1]}`);
  }
});
