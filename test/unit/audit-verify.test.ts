import test from "ava";
import path from "node:path";
import { GENESIS_HASH } from "../../agent/audit/chain";
import { verifyAuditFiles, type VerifyReport } from "../../agent/audit/verify";
import { buildChain, connectionChain, connectionEvent, linesOf, resealFrom, sealEvent, tempAuditDir, writeLines } from "../harness/audit-chain";

/** Writes `lines` to one file in a fresh folder and verifies it. */
async function verifyLines(t: { teardown(fn: () => void): void }, lines: string[], trailingNewline = true): Promise<{ report: VerifyReport; file: string }> {
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), lines, trailingNewline);
  return { report: await verifyAuditFiles([file]), file };
}

/** Replaces one field of a sealed line without re-sealing it. */
function editLine(line: string, from: string, to: string): string {
  if (!line.includes(from)) throw new Error(`test fixture: ${from} not in ${line}`);
  return line.replace(from, to);
}

test("intact chain verifies", async (t) => {
  const chain = connectionChain(50);
  const { report } = await verifyLines(t, linesOf(chain));
  t.true(report.intact);
  t.is(report.problemCount, 0);
  t.is(report.records, 50);
  t.is(report.firstSeq, 1);
  t.is(report.lastSeq, 50);
  t.is(report.lastHash, chain[49].hash);
  t.deepEqual(report.notes, []);
});

test("empty file verifies with no records", async (t) => {
  const { report } = await verifyLines(t, []);
  t.true(report.intact);
  t.is(report.records, 0);
  t.is(report.lastSeq, undefined);
});

test("edited field is hash_mismatch at its line", async (t) => {
  const lines = linesOf(connectionChain(10));
  lines[3] = editLine(lines[3], '"decision":"allow"', '"decision":"deny"');
  const { report, file } = await verifyLines(t, lines);
  t.false(report.intact);
  t.is(report.problemCount, 1);
  const [problem] = report.problems;
  t.is(problem.kind, "hash_mismatch");
  t.is(problem.file, file);
  t.is(problem.line, 4);
  t.is(problem.seq, 4);
  t.regex(problem.message, /audit\.log:4 \(seq 4\) was changed after it was written/);
});

test("deleted line is gap with count", async (t) => {
  const lines = linesOf(connectionChain(10));
  lines.splice(4, 2);
  const { report } = await verifyLines(t, lines);
  t.is(report.problemCount, 1);
  const [problem] = report.problems;
  t.is(problem.kind, "gap");
  t.is(problem.line, 5);
  t.is(problem.seq, 7);
  t.is(problem.missing, 2);
  t.regex(problem.message, /2 records \(seq 5 to 6\) are missing/);
});

test("swapped lines are reorder", async (t) => {
  const lines = linesOf(connectionChain(10));
  [lines[4], lines[5]] = [lines[5], lines[4]];
  const { report } = await verifyLines(t, lines);
  t.is(report.problemCount, 1);
  const [problem] = report.problems;
  t.is(problem.kind, "reorder");
  t.is(problem.line, 5);
  t.is(problem.seq, 6);
  t.regex(problem.message, /out of order/);
  t.deepEqual(report.problemsByKind, { reorder: 1 });
});

test("line moved to the end is one reorder", async (t) => {
  const lines = linesOf(connectionChain(10));
  const [moved] = lines.splice(2, 1);
  lines.push(moved);
  const { report } = await verifyLines(t, lines);
  t.deepEqual(report.problemsByKind, { reorder: 1 });
  t.is(report.problems[0].line, 3);
});

test("seq going back is reorder", async (t) => {
  const chain = connectionChain(6);
  const forged = sealEvent(connectionEvent(99), 3, chain[5].hash);
  const { report } = await verifyLines(t, [...linesOf(chain), forged.line]);
  t.is(report.problemCount, 1);
  t.is(report.problems[0].kind, "reorder");
  t.is(report.problems[0].line, 7);
  t.regex(report.problems[0].message, /already has with a different hash/);
});

test("repeated line is duplicate", async (t) => {
  const lines = linesOf(connectionChain(10));
  lines.splice(6, 0, lines[5]);
  const { report } = await verifyLines(t, lines);
  t.is(report.problemCount, 1);
  const [problem] = report.problems;
  t.is(problem.kind, "duplicate");
  t.is(problem.line, 7);
  t.is(problem.seq, 6);
  t.regex(problem.message, /repeats the record of .*audit\.log:6/);
});

test("torn last line is malformed", async (t) => {
  const lines = linesOf(connectionChain(5));
  lines[4] = lines[4].slice(0, 120);
  const { report } = await verifyLines(t, lines, false);
  t.is(report.problemCount, 1);
  const [problem] = report.problems;
  t.is(problem.kind, "malformed");
  t.is(problem.line, 5);
  t.is(problem.seq, 5);
  t.regex(problem.message, /does not end with a newline/);
});

test("line that is not JSON is malformed and the chain goes on", async (t) => {
  const lines = linesOf(connectionChain(6));
  lines.splice(2, 1, "garbage written by hand");
  const { report } = await verifyLines(t, lines);
  t.is(report.problemCount, 1, JSON.stringify(report.problems));
  t.is(report.problems[0].kind, "malformed");
  t.is(report.problems[0].line, 3);
  t.is(report.lastSeq, 6);
});

test("replaced line with valid hash is broken_link", async (t) => {
  const chain = connectionChain(8);
  const forged = sealEvent(connectionEvent(4, { decision: "deny" }), 4, "f".repeat(64));
  const lines = linesOf(chain);
  lines[3] = forged.line;
  const { report } = await verifyLines(t, lines);
  const kinds = report.problems.map((problem) => `${problem.kind}@${problem.line}`);
  t.deepEqual(kinds, ["broken_link@4", "broken_link@5"]);
  t.is(report.problems[0].expected, chain[2].hash);
  t.is(report.problems[0].found, "f".repeat(64));
});

test("edit re-hashed in place is broken_link after it", async (t) => {
  const lines = linesOf(connectionChain(10));
  lines[4] = editLine(lines[4], '"bytes_sent":5', '"bytes_sent":500');
  const resealed = resealFrom(lines, 4).slice(0, 5);
  const { report } = await verifyLines(t, [...resealed, ...lines.slice(5)]);
  t.is(report.problemCount, 1);
  const [problem] = report.problems;
  t.is(problem.kind, "broken_link");
  t.is(problem.line, 6);
  t.regex(problem.message, /re-hashed from .*audit\.log:5 on/);
});

test("tail re-hashed in one file breaks at the next file", async (t) => {
  const dir = tempAuditDir(t);
  const chain = connectionChain(20);
  const lines = linesOf(chain);
  lines[12] = editLine(lines[12], '"decision":"allow"', '"decision":"deny"');
  const first = writeLines(path.join(dir, "audit-20260301T100000Z.log"), resealFrom(lines, 12).slice(0, 15));
  const second = writeLines(path.join(dir, "audit.log"), lines.slice(15));
  const report = await verifyAuditFiles([first, second]);
  t.is(report.problemCount, 1);
  const [problem] = report.problems;
  t.is(problem.kind, "broken_link");
  t.is(problem.file, second);
  t.is(problem.line, 1);
  t.is(problem.seq, 16);
});

test("fully re-hashed tail is detected only by its last hash", async (t) => {
  const chain = connectionChain(10);
  const lines = linesOf(chain);
  lines[7] = editLine(lines[7], '"decision":"allow"', '"decision":"deny"');
  const { report } = await verifyLines(t, resealFrom(lines, 7));
  t.true(report.intact);
  t.not(report.lastHash, chain[9].hash);
});

test("new chain after records is chain_restart", async (t) => {
  const lines = [...linesOf(connectionChain(5)), ...linesOf(connectionChain(3))];
  const { report } = await verifyLines(t, lines);
  t.is(report.problemCount, 1);
  t.is(report.problems[0].kind, "chain_restart");
  t.is(report.problems[0].line, 6);
  t.is(report.lastSeq, 3);
});

test("chain starting past seq 1 is a note", async (t) => {
  const previous = sealEvent(connectionEvent(0), 40, GENESIS_HASH);
  const { report } = await verifyLines(t, linesOf(connectionChain(5, 41, previous.hash)));
  t.true(report.intact);
  t.is(report.firstSeq, 41);
  t.is(report.notes.length, 1);
  t.regex(report.notes[0], /starts at seq 41/);
});

test("seq 1 without genesis prev_hash is broken_link", async (t) => {
  const { report } = await verifyLines(t, linesOf(buildChain([connectionEvent(1), connectionEvent(2)], 1, "a".repeat(64))));
  t.is(report.problemCount, 1);
  t.is(report.problems[0].kind, "broken_link");
  t.is(report.problems[0].line, 1);
});

test("chain across rotated files verifies", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(connectionChain(30));
  const files = [
    writeLines(path.join(dir, "audit-20260301T100000Z.log"), lines.slice(0, 10)),
    writeLines(path.join(dir, "audit-20260301T110000Z.log"), lines.slice(10, 25)),
    writeLines(path.join(dir, "audit.log"), lines.slice(25)),
  ];
  const report = await verifyAuditFiles(files);
  t.true(report.intact);
  t.is(report.records, 30);
  t.is(report.lastSeq, 30);
});

test("rotated files in the wrong order are reorder", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(connectionChain(20));
  const older = writeLines(path.join(dir, "audit-20260301T100000Z.log"), lines.slice(0, 10));
  const newer = writeLines(path.join(dir, "audit.log"), lines.slice(10));
  const report = await verifyAuditFiles([newer, older]);
  t.false(report.intact);
  t.is(report.problemCount, 1);
  t.is(report.problems[0].kind, "reorder");
  t.is(report.problems[0].file, older);
  t.is(report.problems[0].line, 1);
  t.regex(report.problems[0].message, /the files are out of order/);
  t.deepEqual(report.problemsByKind, { reorder: 1 });
});

test("counting goes on after the first problem", async (t) => {
  const lines = linesOf(connectionChain(30));
  lines[2] = editLine(lines[2], '"decision":"allow"', '"decision":"deny"');
  lines.splice(20, 1);
  const { report } = await verifyLines(t, lines);
  t.is(report.records, 29);
  t.deepEqual(report.problemsByKind, { hash_mismatch: 1, gap: 1 });
  t.deepEqual(
    report.problems.map((problem) => problem.line),
    [3, 21],
  );
});

test("missing file rejects", async (t) => {
  await t.throwsAsync(verifyAuditFiles(["/nonexistent/audit.log"]), { code: "ENOENT" });
});
