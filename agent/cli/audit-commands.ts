// `agentctl audit verify` and `agentctl audit query`: tamper evidence and search over the audit
// files on this node. Both read the files directly, so they work while the agent is down.

import fs from "node:fs";
import { AgentError } from "../errors";
import { auditFileSet } from "../audit/files";
import { parseAuditQuery, queryAuditFiles, typeIsKnown, KNOWN_RECORD_TYPES, type QueryMatch } from "../audit/query";
import { verifyAuditFiles, type VerifyReport } from "../audit/verify";
import { UsageError } from "./admin-client";
import { AuditTable } from "./audit-table";
import { countOf, formatBytes, formatDuration, parseOutputFormat, render } from "./output";
import { parseOptions, usageErrorText } from "./usage";
import { stringify as yamlStringify } from "yaml";

/** The audit file that the agent writes by default. */
export const DEFAULT_AUDIT_FILE = "/var/log/ambient-agent/audit.log";

/** How many problems `audit verify` lists as text; -o json lists every recorded one. */
const MAX_PRINTED_PROBLEMS = 50;

export const AUDIT_USAGE = `  audit verify FILE... [--all] [-o table|json|yaml]
                     check the hash chain of audit files, given oldest first: each line's hash, its
                     prev_hash link to the record before, and seq numbers that grow by one. --all adds
                     the rotated siblings of each FILE (NAME-<UTC time>.EXT), oldest first.
                     A line longer than 1 MiB is reported as malformed without being read. -o table
                     (the default) prints a summary and the first ${MAX_PRINTED_PROBLEMS} problems; json and yaml print
                     the whole report. On a terminal, files over 64 MiB in all show the time spent on stderr.
                     Exits 0 when intact, 1 when a line was changed, removed, moved, repeated, torn or
                     malformed, or the chain restarted, 2 when a FILE cannot be read, 3 when the files
                     hold no record
  audit query [--file PATH]... [--all] [FILTERS] [-o table|json|yaml]
                     print the records that match every filter, in file order. Without --file it reads
                     ${DEFAULT_AUDIT_FILE} and its rotated siblings; --all adds the rotated
                     siblings of each --file. -o json prints each matching line unchanged, -o yaml each
                     record as a YAML document; -o table (the default) shows control characters
                     escaped, such as \\u001b for ESC. Lines that are not JSON objects, or longer
                     than 1 MiB, are skipped and counted on stderr.
                       --identity ID          source or destination SPIFFE id (spiffe:// optional);
                                              a trailing * matches a prefix
                       --workload [NS/]NAME   source or destination pod
                       --namespace NS         source or destination namespace
                       --decision allow|deny  decision of the connection
                       --policy NS/NAME       deciding policy, or a dry-run policy of the record
                       --type TYPE            record type, or a prefix ending with a dot (policy.)
                       --since T, --until T   RFC 3339 time, or a duration before now: 30s, 15m, 2h, 7d
                       --limit N              print only the last N matches (at most 100000)
                     Control records match --type, --since and --until, and these where they apply:
                     --identity (workload.*, certificate.*), --workload (workload.*), --namespace
                     (workload.*, policy.*), --policy (policy.*); --decision excludes them
`;

/** Exit status of a command that ran, or of bad usage. */
const EXIT_OK = 0;
const EXIT_PROBLEM = 1;
const EXIT_USAGE = 2;
const EXIT_NO_RECORDS = 3;

/** A missing or malformed option: exit status 2 and the usage text. */
class AuditUsageError extends Error {}

/** A file that cannot be read: exit status 2. */
class AuditFileError extends Error {}

/** Runs `agentctl audit ACTION ...` and returns the exit status. */
export async function runAuditCommand(action: string | undefined, argv: string[]): Promise<number> {
  try {
    if (action === "verify") return await auditVerify(argv);
    if (action === "query") return await auditQuery(argv);
    throw new AuditUsageError(action === undefined ? "missing audit command: use verify or query" : `unknown audit command "${action}": use verify or query`);
  } catch (error) {
    if (error instanceof AuditUsageError || error instanceof UsageError || (error instanceof AgentError && error.code === "INVALID_QUERY")) {
      const words = action === "verify" || action === "query" ? ["audit", action] : ["audit"];
      process.stderr.write(usageErrorText(AUDIT_USAGE, words, error.message));
      return EXIT_USAGE;
    }
    if (error instanceof AuditFileError) {
      process.stderr.write(`agentctl: ${error.message}\n`);
      return EXIT_USAGE;
    }
    throw error;
  }
}

async function auditVerify(argv: string[]): Promise<number> {
  const { values, positionals } = parseOptions({ args: argv, allowPositionals: true, options: { all: { type: "boolean" }, output: { type: "string", short: "o" } } });
  const format = parseOutputFormat(values.output);
  if (positionals.length === 0) throw new AuditUsageError("missing FILE: name the audit files to verify, oldest first, or the active file with --all");
  const files = auditFiles(positionals, values.all === true);
  const stopProgress = startVerifyProgress(files);
  let report: VerifyReport;
  try {
    report = await readFiles(() => verifyAuditFiles(files));
  } finally {
    stopProgress();
  }
  await writeOut(render(format, report, () => formatVerifyReport(report)));
  if (report.problemCount > 0) return EXIT_PROBLEM;
  return report.records === 0 ? EXIT_NO_RECORDS : EXIT_OK;
}

/** Formats a verification report for a terminal: a summary line, the problems, notes and the last hash. */
export function formatVerifyReport(report: VerifyReport): string {
  const lines: string[] = [];
  const range = report.lastSeq === undefined ? "no records" : `${countOf(report.records, "record")}, seq ${report.firstSeq} to ${report.lastSeq}`;
  const fileCount = countOf(report.files.length, "file");
  if (report.intact) lines.push(`audit chain intact: ${range}, in ${fileCount}`);
  else if (report.problemCount === 0) lines.push(`audit chain not checked: no records in ${fileCount}`);
  else {
    const kinds = Object.entries(report.problemsByKind).map(([kind, count]) => `${kind} ${count}`).join(", ");
    lines.push(`audit chain BROKEN: ${countOf(report.problemCount, "problem")} (${kinds}) in ${range}, in ${fileCount}`);
    for (const problem of report.problems.slice(0, MAX_PRINTED_PROBLEMS)) lines.push(`  ${problem.kind.padEnd(13)} ${problem.message}`);
    const unlisted = report.problemCount - Math.min(report.problems.length, MAX_PRINTED_PROBLEMS);
    if (unlisted > 0) lines.push(`  ... ${countOf(unlisted, "more problem")}; -o json lists up to ${report.problems.length}`);
  }
  for (const note of report.notes) lines.push(`note: ${note}`);
  if (report.lastHash !== undefined) {
    lines.push(`last record: seq ${report.lastSeq}, hash ${report.lastHash}`);
    lines.push("  (records removed from the end, or a chain re-hashed to its end, still verify: compare this seq and hash with a copy held elsewhere, such as a remote sink)");
  }
  return lines.join("\n") + "\n";
}

async function auditQuery(argv: string[]): Promise<number> {
  const { values, positionals } = parseOptions({
    args: argv,
    allowPositionals: true,
    options: {
      file: { type: "string", multiple: true },
      all: { type: "boolean" },
      output: { type: "string", short: "o" },
      identity: { type: "string" },
      workload: { type: "string" },
      namespace: { type: "string" },
      decision: { type: "string" },
      policy: { type: "string" },
      type: { type: "string" },
      since: { type: "string" },
      until: { type: "string" },
      limit: { type: "string" },
    },
  });
  if (positionals.length > 0) throw new AuditUsageError(`unexpected argument ${JSON.stringify(positionals[0])}: name files with --file PATH`);
  const format = parseOutputFormat(values.output);
  const query = parseAuditQuery(values);
  if (query.type !== undefined && !typeIsKnown(query.type)) {
    process.stderr.write(`agentctl: note: --type ${query.type.value} matches no record type of schema version 1 (${KNOWN_RECORD_TYPES.join(", ")})\n`);
  }
  const files = values.file === undefined ? defaultAuditFiles() : auditFiles(values.file, values.all === true);

  const table = format === "table" ? new AuditTable(terminalWidth()) : undefined;
  const printers = {
    json: (match: QueryMatch) => writeOut(Buffer.concat([match.bytes, NEWLINE])),
    yaml: (match: QueryMatch) => writeOut(`---\n${yamlStringify(match.record)}`),
    table: (match: QueryMatch) => table!.add(match.record, writeOut),
  };
  const print = printers[format];
  const summary = await readFiles(() => queryAuditFiles(files, query, print));
  if (table !== undefined) await table.flush(writeOut);
  if (summary.skipped > 0) {
    process.stderr.write(`agentctl: skipped ${countOf(summary.skipped, "line")} that ${summary.skipped === 1 ? "is" : "are"} not a JSON record or longer than 1 MiB, the first at ${summary.firstSkipped}; agentctl audit verify tells why\n`);
  }
  if (summary.matched === 0) process.stderr.write(`agentctl: no record matches (${countOf(summary.records, "record")} read from ${countOf(files.length, "file")})\n`);
  return EXIT_OK;
}

/** Lists the agent's default audit file and its rotated siblings. */
function defaultAuditFiles(): string[] {
  const files = auditFileSet(DEFAULT_AUDIT_FILE);
  if (files.length === 0) throw new AuditFileError(`no audit file at ${DEFAULT_AUDIT_FILE}: name the agent's audit file with --file PATH`);
  return files;
}

/** Expands each path to its rotated siblings when `withRotated`, and checks that every file can be read. */
function auditFiles(paths: readonly string[], withRotated: boolean): string[] {
  const files: string[] = [];
  for (const file of paths) {
    const set = withRotated ? auditFileSet(file) : [file];
    if (set.length === 0) throw new AuditFileError(`cannot read ${file}: no such file, and no rotated file next to it`);
    files.push(...set);
  }
  for (const file of files) checkReadable(file);
  return files;
}

function checkReadable(file: string): void {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(file);
    fs.accessSync(file, fs.constants.R_OK);
  } catch (error) {
    throw new AuditFileError(`cannot read ${file}: ${describeFsError(error)}`);
  }
  if (!stat.isFile()) throw new AuditFileError(`cannot read ${file}: it is not a regular file`);
}

/** Runs a reader; a file that cannot be read (removed, or no permission, meanwhile) is exit status 2. */
async function readFiles<T>(read: () => Promise<T>): Promise<T> {
  try {
    return await read();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== undefined && (error as NodeJS.ErrnoException).path !== undefined) {
      throw new AuditFileError(`cannot read ${(error as NodeJS.ErrnoException).path}: ${describeFsError(error)}`);
    }
    throw error;
  }
}

function describeFsError(error: unknown): string {
  const { code, message } = error as NodeJS.ErrnoException;
  if (code === "ENOENT") return "no such file";
  if (code === "EACCES") return "permission denied (run as a user that may read the audit folder, such as root)";
  if (code === "EISDIR") return "it is a folder; name the audit file inside it";
  return message;
}

const NEWLINE = Buffer.from("\n");

/** Audit files smaller than this in all verify in a few seconds, without a progress line. */
const PROGRESS_MIN_BYTES = 64 * 1024 * 1024;

/**
 * Shows on stderr, when it is a terminal and the files are large, how long verification has run,
 * once a second. Returns the function that removes the line.
 */
function startVerifyProgress(files: readonly string[]): () => void {
  const total = files.reduce((sum, file) => sum + fs.statSync(file).size, 0);
  if (!process.stderr.isTTY || total < PROGRESS_MIN_BYTES) return () => undefined;
  const started = Date.now();
  const show = (): void => {
    process.stderr.write(`\r\x1b[Kverifying ${countOf(files.length, "file")} (${formatBytes(total)})... ${formatDuration((Date.now() - started) / 1000)}`);
  };
  show();
  const timer = setInterval(show, 1_000);
  return () => {
    clearInterval(timer);
    process.stderr.write("\r\x1b[K");
  };
}

/** Writes to stdout and waits when its buffer is full, so a large query does not pile up in memory. */
function writeOut(text: string | Uint8Array): Promise<void> | void {
  if (process.stdout.write(text)) return;
  return new Promise((resolve) => process.stdout.once("drain", resolve));
}

/** Columns of the terminal, or COLUMNS, or undefined (no limit) when stdout is a pipe or a file. */
function terminalWidth(): number | undefined {
  if (process.stdout.isTTY && process.stdout.columns > 0) return process.stdout.columns;
  const columns = Number(process.env.COLUMNS);
  return Number.isInteger(columns) && columns > 0 ? columns : undefined;
}
