// `agentctl audit verify` and `agentctl audit query` run as child processes on files that the test
// writes, checking exit status, stdout and stderr. No agent and no root are needed.

import test from "ava";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";
import { GENESIS_HASH } from "../../agent/audit/chain";
import { AGENTCTL_BIN } from "../harness/agent-process";
import { connectionChain, connectionEvent, buildChain, linesOf, sealEvent, tempAuditDir, writeLines } from "../harness/audit-chain";

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

function agentctl(args: string[], env: Record<string, string> = {}): Run {
  const result = spawnSync(process.execPath, [AGENTCTL_BIN, ...args], { encoding: "utf8", timeout: 30_000, env: { ...process.env, COLUMNS: "", ...env } });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** A rotated set of three files holding one chain of 30 records: returns the active file. */
function rotatedSet(dir: string, lines: string[]): string {
  writeLines(path.join(dir, "audit-20260301T100000Z.log"), lines.slice(0, 10));
  writeLines(path.join(dir, "audit-20260301T110000Z.log"), lines.slice(10, 20));
  return writeLines(path.join(dir, "audit.log"), lines.slice(20));
}

test("verify intact file exits 0", (t) => {
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), linesOf(connectionChain(12)));
  const run = agentctl(["audit", "verify", file]);
  t.is(run.status, 0, run.stderr);
  t.regex(run.stdout, /^audit chain intact: 12 records, seq 1 to 12, in 1 file$/m);
  t.regex(run.stdout, /last record: seq 12, hash [0-9a-f]{64}/);
});

test("verify edited file exits 1 naming the line", (t) => {
  const lines = linesOf(connectionChain(12));
  lines[6] = lines[6].replace('"decision":"allow"', '"decision":"deny"');
  lines.splice(9, 1);
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), lines);
  const run = agentctl(["audit", "verify", file]);
  t.is(run.status, 1, run.stderr);
  t.regex(run.stdout, /audit chain BROKEN: 2 problems \(hash_mismatch 1, gap 1\)/);
  t.true(run.stdout.includes(`hash_mismatch ${file}:7 (seq 7) was changed after it was written`));
  t.true(run.stdout.includes(`gap           ${file}:10 has seq 11 right after seq 9`));
});

test("verify --all reads rotated siblings", (t) => {
  const dir = tempAuditDir(t);
  const active = rotatedSet(dir, linesOf(connectionChain(30)));
  const alone = agentctl(["audit", "verify", active]);
  t.is(alone.status, 0, alone.stderr);
  t.regex(alone.stdout, /note: .*the chain starts at seq 21/);
  const all = agentctl(["audit", "verify", "--all", active]);
  t.is(all.status, 0, all.stderr);
  t.regex(all.stdout, /intact: 30 records, seq 1 to 30, in 3 files/);
});

test("verify --all finds a removed line in a rotated file", (t) => {
  const dir = tempAuditDir(t);
  const lines = linesOf(connectionChain(30));
  lines.splice(14, 1);
  const active = rotatedSet(dir, lines);
  const run = agentctl(["audit", "verify", "--all", active, "-o", "json"]);
  t.is(run.status, 1, run.stderr);
  const report = JSON.parse(run.stdout) as { problems: { kind: string; file: string; line: number; missing: number }[]; intact: boolean };
  t.false(report.intact);
  t.is(report.problems.length, 1);
  t.like(report.problems[0], { kind: "gap", file: path.join(dir, "audit-20260301T110000Z.log"), line: 5, missing: 1 });
});

test("verify file without records exits 3", (t) => {
  const dir = tempAuditDir(t);
  const empty = writeLines(path.join(dir, "audit.log"), []);
  const run = agentctl(["audit", "verify", empty]);
  t.is(run.status, 3, run.stderr);
  t.regex(run.stdout, /^audit chain not checked: no records in 1 file$/m);
  t.regex(run.stdout, /note: the file holds no record \(0 lines read\)/);
  t.regex(run.stdout, /only the last seq and hash held elsewhere/);
  const json = agentctl(["audit", "verify", empty, "-o", "json"]);
  t.is(json.status, 3);
  t.like(JSON.parse(json.stdout), { records: 0, problemCount: 0, intact: false });
});

test("verify CRLF file exits 1", (t) => {
  const file = path.join(tempAuditDir(t), "audit.log");
  fs.writeFileSync(file, linesOf(connectionChain(4)).join("\r\n") + "\r\n");
  const run = agentctl(["audit", "verify", file]);
  t.is(run.status, 1, run.stderr);
  t.regex(run.stdout, /audit chain BROKEN: 4 problems \(hash_mismatch 4\)/);
});

test("verify unreadable file exits 2", (t) => {
  const dir = tempAuditDir(t);
  const missing = agentctl(["audit", "verify", path.join(dir, "nope.log")]);
  t.is(missing.status, 2);
  t.regex(missing.stderr, /cannot read .*nope\.log: no such file/);
  const folder = agentctl(["audit", "verify", dir]);
  t.is(folder.status, 2);
  t.regex(folder.stderr, /it is not a regular file/);
});

test("verify without files is usage error", (t) => {
  const run = agentctl(["audit", "verify"]);
  t.is(run.status, 2);
  t.regex(run.stderr, /^agentctl audit verify: missing FILE/);
  t.regex(run.stderr, /^usage: agentctl audit verify FILE\.\.\. \[--all\]/m);
  t.regex(run.stderr, /\nrun agentctl --help for every command and option\n$/);
  t.notRegex(run.stderr, /audit query/, "only the synopsis of audit verify");
  t.notRegex(run.stderr, /[\u0000-\u0009\u000b-\u001f\u007f]/);
  const unknown = agentctl(["audit", "prune"]);
  t.is(unknown.status, 2);
  t.regex(unknown.stderr, /unknown audit command "prune": use verify or query/);
  t.regex(unknown.stderr, /^usage: agentctl audit verify/m);
  t.regex(unknown.stderr, /^usage: agentctl audit query/m);
});

test("query negative limit names the fix", (t) => {
  const run = agentctl(["audit", "query", "--limit", "-1"]);
  t.is(run.status, 2);
  t.regex(run.stderr, /^agentctl audit query: the value "-1" of --limit starts with "-" and reads as an option; write --limit=-1 to pass it as the value$/m);
  t.notRegex(run.stderr, /ambiguous/);
  const written = agentctl(["audit", "query", "--limit=-1"]);
  t.is(written.status, 2);
  t.regex(written.stderr, /--limit/);
});

test("query json prints matching lines unchanged", (t) => {
  const events = [connectionEvent(0), connectionEvent(1, { decision: "deny", reason: "no_allow_match", policy: undefined }), connectionEvent(2)];
  const lines = linesOf(buildChain(events));
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), lines);
  const run = agentctl(["audit", "query", "--file", file, "--decision", "deny", "-o", "json"]);
  t.is(run.status, 0, run.stderr);
  t.is(run.stdout, `${lines[1]}\n`);
  t.is(run.stderr, "");
});

test("query table across rotated files with limit", (t) => {
  const dir = tempAuditDir(t);
  const active = rotatedSet(dir, linesOf(connectionChain(30)));
  const run = agentctl(["audit", "query", "--file", active, "--all", "--since", "2026-03-01T10:00:05Z", "--limit", "2"]);
  t.is(run.status, 0, run.stderr);
  const rows = run.stdout.trimEnd().split("\n");
  t.is(rows.length, 3);
  t.regex(rows[0], /^TIME +TYPE +DIR +DECISION +SOURCE +DESTINATION +POLICY +REASON$/);
  t.regex(rows[1], /^2026-03-01T10:00:29\.000Z +completed +in +allow +demo\/sa\/client +shop\/sa\/web +shop\/allow-demo +allowed_by_policy$/);
  t.regex(rows[2], /^2026-03-01T10:00:30\.000Z /);
});

test("query table escapes control characters", (t) => {
  const rejected = sealEvent(
    {
      type: "policy.rejected",
      time: "2026-03-01T10:00:00.000Z",
      node: "node-a",
      policy: { kind: "AuthorizationPolicy", namespace: "shop", name: "bad" },
      file: "/etc/policies/shop.yaml",
      message: 'unknown key "\u001b]0;TITLE\u0007\nrow" in spec',
    },
    1,
    GENESIS_HASH,
  );
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), [rejected.line]);
  const table = agentctl(["audit", "query", "--file", file]);
  t.is(table.status, 0, table.stderr);
  t.is(table.stdout.split("\n").length, 3);
  t.notRegex(table.stdout, /[\u0000-\u0009\u000b-\u001f]/);
  t.true(table.stdout.includes('unknown key "\\u001b]0;TITLE\\u0007\\u000arow" in spec'), table.stdout);
  const json = agentctl(["audit", "query", "--file", file, "-o", "json"]);
  t.is(json.stdout, `${rejected.line}\n`);
});

test("query table shows fields of unexpected types", (t) => {
  const line = JSON.stringify({ ...JSON.parse(linesOf(connectionChain(1))[0]), src: { identity: 5 }, dst: { addr: 7 } });
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), [line]);
  for (const columns of ["", "80"]) {
    const run = agentctl(["audit", "query", "--file", file], { COLUMNS: columns });
    t.is(run.status, 0, run.stderr);
    t.regex(run.stdout.split("\n")[1], / 5 +7 /, `COLUMNS=${columns}`);
  }
});

test("query skips a line over 1 MiB", (t) => {
  const lines = linesOf(connectionChain(2));
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), [lines[0], `{"pad":"${"x".repeat(1 << 20)}"}`, lines[1]]);
  const run = agentctl(["audit", "query", "--file", file, "-o", "json"]);
  t.is(run.status, 0, run.stderr);
  t.is(run.stdout, `${lines[0]}\n${lines[1]}\n`);
  t.regex(run.stderr, /skipped 1 line that is not a JSON record or longer than 1 MiB, the first at .*audit\.log:2/);
});

test("query with no match notes it on stderr", (t) => {
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), linesOf(connectionChain(3)));
  const run = agentctl(["audit", "query", "--file", file, "--workload", "nobody"]);
  t.is(run.status, 0);
  t.is(run.stdout, "");
  t.regex(run.stderr, /no record matches \(3 records read from 1 file\)/);
});

test("query yaml prints one document per record", (t) => {
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), linesOf(connectionChain(3)));
  const run = agentctl(["audit", "query", "--file", file, "-o", "yaml"]);
  t.is(run.status, 0, run.stderr);
  const documents = YAML.parseAllDocuments(run.stdout).map((document) => document.toJS() as { seq: number });
  t.deepEqual(documents.map((record) => record.seq), [1, 2, 3]);
});

test("verify yaml prints the whole report", (t) => {
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), linesOf(connectionChain(4)));
  const run = agentctl(["audit", "verify", file, "-o", "yaml"]);
  t.is(run.status, 0, run.stderr);
  t.like(YAML.parse(run.stdout), { records: 4, intact: true, problemCount: 0 });
});

test("query bad filter exits 2 naming the value", (t) => {
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), linesOf(connectionChain(3)));
  const cases: [string[], RegExp][] = [
    [["--decision", "maybe"], /invalid --decision "maybe": use allow or deny/],
    [["--since", "last week"], /invalid --since "last week": write an RFC 3339 time/],
    [["--since", "2026-02-31T00:00:00Z"], /invalid --since "2026-02-31T00:00:00Z": write an RFC 3339 time/],
    [["-o", "xml"], /invalid -o "xml": use table, json, yaml/],
    [["--colour"], /^agentctl audit query: unknown option --colour; the options are --file, --all, -o, --identity/],
    [["extra"], /unexpected argument "extra"/],
  ];
  for (const [args, message] of cases) {
    const run = agentctl(["audit", "query", "--file", file, ...args]);
    t.is(run.status, 2, args.join(" "));
    t.regex(run.stderr, message);
  }
});

test("query unreadable file exits 2", (t) => {
  const run = agentctl(["audit", "query", "--file", path.join(tempAuditDir(t), "missing.log")]);
  t.is(run.status, 2);
  t.regex(run.stderr, /cannot read .*missing\.log: no such file/);
});

test("query into a closed pipe exits 0", (t) => {
  const file = writeLines(path.join(tempAuditDir(t), "audit.log"), linesOf(connectionChain(20_000)));
  const result = spawnSync("bash", ["-o", "pipefail", "-c", `"${process.execPath}" "${AGENTCTL_BIN}" audit query --file "${file}" -o json | head -n 1 >/dev/null`], {
    encoding: "utf8",
    timeout: 60_000,
  });
  t.is(result.status, 0, result.stderr);
});
