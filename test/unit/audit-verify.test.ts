import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { GENESIS_HASH } from "../../agent/audit/chain";
import { MAX_LINE_BYTES, readFileLines, type FileLine } from "../../agent/audit/line-reader";
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

test("empty file is not intact and says so", async (t) => {
  const { report } = await verifyLines(t, []);
  t.false(report.intact);
  t.is(report.problemCount, 0);
  t.is(report.records, 0);
  t.is(report.lastSeq, undefined);
  t.is(report.notes.length, 1);
  t.regex(report.notes[0], /the file holds no record \(0 lines read\), so there is nothing to check/);
  t.regex(report.notes[0], /last seq and hash held elsewhere/);
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
  lines.splice(2, 0, "garbage written by hand");
  const { report } = await verifyLines(t, lines);
  t.is(report.problemCount, 1, JSON.stringify(report.problems));
  t.is(report.problems[0].kind, "malformed");
  t.is(report.problems[0].line, 3);
  t.is(report.lastSeq, 6);
});

test("record replaced by a malformed line is also a gap", async (t) => {
  for (const replacement of ["", '{"seq":4}', "garbage written by hand", '{"seq":4,"prev_hash":"x","hash":"y"}']) {
    const lines = linesOf(connectionChain(6));
    lines[3] = replacement;
    const { report } = await verifyLines(t, lines);
    t.deepEqual(
      report.problems.map((problem) => `${problem.kind}@${problem.line}`),
      ["malformed@4", "gap@5"],
      JSON.stringify(replacement),
    );
    t.is(report.problems[1].missing, 1);
    t.regex(report.problems[1].message, /1 record \(seq 4\) is missing, so lines were removed or replaced: the malformed line .*audit\.log:4 may have held it/);
  }
});

test("invalid UTF-8 in place of U+FFFD is malformed", async (t) => {
  const chain = buildChain([connectionEvent(0), connectionEvent(1, { reason: "allowed_by_policy \ufffd" }), connectionEvent(2)]);
  const bytes = Buffer.from(linesOf(chain).join("\n") + "\n");
  const at = bytes.indexOf(Buffer.from([0xef, 0xbf, 0xbd]));
  const edited = Buffer.concat([bytes.subarray(0, at), Buffer.from([0xff]), bytes.subarray(at + 3)]);
  const file = path.join(tempAuditDir(t), "audit.log");
  fs.writeFileSync(file, edited);
  const report = await verifyAuditFiles([file]);
  t.false(report.intact);
  t.is(report.problems[0].kind, "malformed");
  t.is(report.problems[0].line, 2);
  t.is(report.problems[0].seq, 2);
  t.regex(report.problems[0].message, /not valid UTF-8/);
});

test("CRLF line endings are hash_mismatch", async (t) => {
  const lines = linesOf(connectionChain(3));
  const file = path.join(tempAuditDir(t), "audit.log");
  fs.writeFileSync(file, lines.map((line) => `${line}\r\n`).join(""));
  const report = await verifyAuditFiles([file]);
  t.false(report.intact);
  t.deepEqual(report.problemsByKind, { hash_mismatch: 3 });
  t.is(report.lastSeq, 3);
  t.regex(report.problems[0].message, /ends with a carriage return \(0x0D\)/);
});

test("carriage return inside a line is hash_mismatch", async (t) => {
  const lines = linesOf(connectionChain(3));
  lines[1] = editLine(lines[1], ',"node":', ',\r"node":');
  const { report } = await verifyLines(t, lines);
  t.is(report.problemCount, 1, JSON.stringify(report.problems));
  t.is(report.problems[0].kind, "hash_mismatch");
  t.is(report.problems[0].line, 2);
  t.is(report.records, 3);
});

test("line over 1 MiB is malformed and not read", async (t) => {
  const lines = linesOf(connectionChain(3));
  const long = `${lines[1].slice(0, -1)},"pad":"${"x".repeat(MAX_LINE_BYTES)}"}`;
  const { report } = await verifyLines(t, [lines[0], long, lines[2]]);
  t.deepEqual(
    report.problems.map((problem) => `${problem.kind}@${problem.line}`),
    ["malformed@2", "gap@3"],
  );
  t.regex(report.problems[0].message, new RegExp(`is ${Buffer.byteLength(long)} bytes long, more than the limit of ${MAX_LINE_BYTES} bytes`));
});

test("line reader drops bytes past the limit", async (t) => {
  const file = path.join(tempAuditDir(t), "lines");
  fs.writeFileSync(file, `short\n${"y".repeat(40)}\n\n${"z".repeat(17)}\nend\r\n${"w".repeat(30)}`);
  const read: FileLine[] = [];
  for await (const line of readFileLines(file, 16)) read.push({ ...line, bytes: Buffer.from(line.bytes) });
  t.deepEqual(
    read.map((line) => [line.number, line.bytes.toString(), line.length, line.tooLong, line.unterminated]),
    [
      [1, "short", 5, false, false],
      [2, "", 40, true, false],
      [3, "", 0, false, false],
      [4, "", 17, true, false],
      [5, "end\r", 4, false, false],
      [6, "", 30, true, true],
    ],
  );
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

test("rotated files in a shuffled order are reorder", async (t) => {
  const dir = tempAuditDir(t);
  const chain = connectionChain(12);
  const lines = linesOf(chain);
  const r1 = writeLines(path.join(dir, "audit-20260301T100000Z.log"), lines.slice(0, 5));
  const r2 = writeLines(path.join(dir, "audit-20260301T110000Z.log"), lines.slice(5, 9));
  const r3 = writeLines(path.join(dir, "audit.log"), lines.slice(9));
  for (const order of [
    [r2, r1, r3],
    [r1, r3, r2],
    [r3, r2, r1],
    [r2, r3, r1],
  ]) {
    const report = await verifyAuditFiles(order);
    const name = order.map((file) => path.basename(file)).join(" ");
    t.deepEqual(report.problemsByKind, { reorder: 1 }, name);
    t.is(report.problems.length, 1, name);
    t.regex(report.problems[0].message, /the files are out of order/, name);
    t.true(report.problems[0].message.includes(`${r1} (seq 1 to 5), ${r2} (seq 6 to 9), ${r3} (seq 10 to 12)`), name);
    t.is(report.firstSeq, 1, name);
    t.is(report.lastSeq, 12, name);
    t.is(report.lastHash, chain[11].hash, name);
    t.deepEqual(report.notes, [], name);
  }
  const shuffled = await verifyAuditFiles([r2, r1, r3]);
  t.like(shuffled.problems[0], { file: r1, line: 1, seq: 1 });
});

test("shuffled files with one removed are reorder and gap", async (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(connectionChain(12));
  const r1 = writeLines(path.join(dir, "audit-20260301T100000Z.log"), lines.slice(0, 5));
  const r3 = writeLines(path.join(dir, "audit.log"), lines.slice(9));
  const report = await verifyAuditFiles([r3, r1]);
  t.false(report.intact);
  t.deepEqual(report.files, [r3, r1]);
  t.deepEqual(
    report.problems.map((problem) => `${problem.kind}@${path.basename(problem.file)}:${problem.line}`),
    ["reorder@audit-20260301T100000Z.log:1", "gap@audit.log:1"],
  );
  t.is(report.problems[1].missing, 4);
});

test("restarted chain in a later file stays chain_restart", async (t) => {
  const dir = tempAuditDir(t);
  const r1 = writeLines(path.join(dir, "audit-20260301T100000Z.log"), linesOf(connectionChain(5)));
  const r2 = writeLines(path.join(dir, "audit.log"), linesOf(connectionChain(3)));
  const report = await verifyAuditFiles([r1, r2]);
  t.deepEqual(report.problemsByKind, { chain_restart: 1 });
  const reversed = await verifyAuditFiles([r2, r1]);
  t.deepEqual(reversed.problemsByKind, { chain_restart: 1 });
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
