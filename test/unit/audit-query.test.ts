import test from "ava";
import path from "node:path";
import { parseAuditQuery, queryAuditFiles, matchesQuery, typeIsKnown, type AuditQueryOptions, type StoredRecord } from "../../agent/audit/query";
import type { AuditEvent } from "../../agent/audit/record";
import { AuditTable } from "../../agent/cli/audit-commands";
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

test("query streams matches across files", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(buildChain(sampleEvents()));
  const first = writeLines(path.join(dir, "audit-20260301T100000Z.log"), lines.slice(0, 3));
  const second = writeLines(path.join(dir, "audit.log"), [...lines.slice(3), "torn {\"time\""], false);
  const matched: string[] = [];
  const summary = await queryAuditFiles([first, second], parseAuditQuery({ namespace: "shop" }), (match) => {
    matched.push(match.line);
  });
  t.deepEqual(matched, [lines[0], lines[1], lines[3], lines[4]]);
  t.is(summary.records, 7);
  t.is(summary.matched, 4);
  t.is(summary.skipped, 1);
  t.is(summary.firstSkipped, `${second}:5`);
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
