// `agentctl audit verify` and `agentctl audit query`: tamper evidence and search over the audit
// files on this node. Both read the files directly, so they work while the agent is down.

import fs from "node:fs";
import { parseArgs } from "node:util";
import { AgentError } from "../errors";
import { auditFileSet } from "../audit/files";
import { parseAuditQuery, queryAuditFiles, typeIsKnown, KNOWN_RECORD_TYPES, type QueryMatch, type StoredRecord } from "../audit/query";
import { verifyAuditFiles, type VerifyReport } from "../audit/verify";

/** The audit file that the agent writes by default. */
export const DEFAULT_AUDIT_FILE = "/var/log/ambient-agent/audit.log";

export const AUDIT_USAGE = `  audit verify FILE... [--all] [-o json]
                     check the hash chain of audit files, given oldest first: each line's hash, its
                     prev_hash link to the record before, and seq numbers that grow by one. --all adds
                     the rotated siblings of each FILE (NAME-<UTC time>.EXT), oldest first.
                     Exits 0 when intact, 1 when a line was changed, removed, moved, repeated or torn,
                     or the chain restarted, 2 when a FILE cannot be read
  audit query [--file PATH]... [--all] [FILTERS] [-o table|json]
                     print the records that match every filter, in file order. Without --file it reads
                     ${DEFAULT_AUDIT_FILE} and its rotated siblings; --all adds the rotated
                     siblings of each --file. -o json prints each matching line unchanged.
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

/** How many problems `audit verify` lists as text; -o json lists every recorded one. */
const MAX_PRINTED_PROBLEMS = 50;

/** Exit status of a command that ran, or of bad usage. */
const EXIT_OK = 0;
const EXIT_PROBLEM = 1;
const EXIT_USAGE = 2;

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
    if (error instanceof AuditUsageError || (error instanceof AgentError && error.code === "INVALID_QUERY")) {
      process.stderr.write(`agentctl: ${error.message}\n\nusage:\n${AUDIT_USAGE}`);
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
  const { values, positionals } = parseOptions(() =>
    parseArgs({ args: argv, allowPositionals: true, options: { all: { type: "boolean" }, output: { type: "string", short: "o" } } }),
  );
  if (values.output !== undefined && values.output !== "json") throw new AuditUsageError(`invalid -o ${JSON.stringify(values.output)}: use json, or leave -o out for text`);
  if (positionals.length === 0) throw new AuditUsageError("missing FILE: name the audit files to verify, oldest first, or the active file with --all");
  const files = auditFiles(positionals, values.all === true);
  const report = await readFiles(() => verifyAuditFiles(files));
  await writeOut(values.output === "json" ? JSON.stringify(report, null, 2) + "\n" : formatVerifyReport(report));
  return report.intact ? EXIT_OK : EXIT_PROBLEM;
}

/** Formats a verification report for a terminal: a summary line, the problems, notes and the last hash. */
export function formatVerifyReport(report: VerifyReport): string {
  const lines: string[] = [];
  const range = report.lastSeq === undefined ? "no records" : `${countOf(report.records, "record")}, seq ${report.firstSeq} to ${report.lastSeq}`;
  const fileCount = countOf(report.files.length, "file");
  if (report.intact) lines.push(`audit chain intact: ${range}, in ${fileCount}`);
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
    lines.push("  (a chain re-hashed to its end verifies: compare this hash with a copy held elsewhere, such as a remote sink)");
  }
  return lines.join("\n") + "\n";
}

async function auditQuery(argv: string[]): Promise<number> {
  const { values, positionals } = parseOptions(() =>
    parseArgs({
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
    }),
  );
  if (positionals.length > 0) throw new AuditUsageError(`unexpected argument ${JSON.stringify(positionals[0])}: name files with --file PATH`);
  const format = values.output ?? "table";
  if (format !== "table" && format !== "json") throw new AuditUsageError(`invalid -o ${JSON.stringify(format)}: use table or json`);
  const query = parseAuditQuery(values);
  if (query.type !== undefined && !typeIsKnown(query.type)) {
    process.stderr.write(`agentctl: note: --type ${query.type.value} matches no record type of schema version 1 (${KNOWN_RECORD_TYPES.join(", ")})\n`);
  }
  const files = values.file === undefined ? defaultAuditFiles() : auditFiles(values.file, values.all === true);

  const table = format === "table" ? new AuditTable(terminalWidth()) : undefined;
  const print = format === "json" ? (match: QueryMatch) => writeOut(`${match.line}\n`) : (match: QueryMatch) => table!.add(match.record, writeOut);
  const summary = await readFiles(() => queryAuditFiles(files, query, print));
  if (table !== undefined) await table.flush(writeOut);
  if (summary.skipped > 0) {
    process.stderr.write(`agentctl: skipped ${countOf(summary.skipped, "line")} that are not JSON records, the first at ${summary.firstSkipped}; agentctl audit verify tells why\n`);
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

/** Runs an option parser; an unknown option or a missing value becomes a usage error. */
function parseOptions<T>(parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    throw new AuditUsageError((error as Error).message);
  }
}

/** Writes to stdout and waits when its buffer is full, so a large query does not pile up in memory. */
function writeOut(text: string): Promise<void> | void {
  if (process.stdout.write(text)) return;
  return new Promise((resolve) => process.stdout.once("drain", resolve));
}

/** Columns of the terminal, or COLUMNS, or undefined (no limit) when stdout is a pipe or a file. */
function terminalWidth(): number | undefined {
  if (process.stdout.isTTY && process.stdout.columns > 0) return process.stdout.columns;
  const columns = Number(process.env.COLUMNS);
  return Number.isInteger(columns) && columns > 0 ? columns : undefined;
}

function countOf(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

/** Rows laid out per chunk; the first chunk sets the column widths, so output streams. */
const TABLE_CHUNK_ROWS = 200;
const TABLE_HEADER = ["TIME", "TYPE", "DIR", "DECISION", "SOURCE", "DESTINATION", "POLICY", "REASON"];
/** SOURCE, DESTINATION, POLICY and REASON share the width the other columns leave. */
const FIRST_FLEXIBLE_COLUMN = 4;
const TIME_COLUMN = 0;
const TYPE_COLUMN = 1;
const SOURCE_COLUMN = 4;
const DESTINATION_COLUMN = 5;
const MIN_FLEXIBLE_WIDTH = 6;
const MIN_TYPE_WIDTH = 9;
/** 2026-03-01T10:15:02: whole seconds. */
const MIN_TIME_WIDTH = 19;
const COLUMN_GAP = "  ";

/**
 * The table output of `audit query`: one row per record, fitted to `width` columns when it is
 * known. Long identities and addresses lose their middle, other cells their end, marked with "…".
 * TYPE shows connection records as opened and completed, without "connection.", and DIR shows in
 * and out.
 */
export class AuditTable {
  private rows: string[][] = [];
  private widths: number[] | undefined;

  constructor(private readonly width: number | undefined) {}

  add(record: StoredRecord, write: (text: string) => Promise<void> | void): Promise<void> | void {
    this.rows.push(tableRow(record));
    if (this.rows.length >= TABLE_CHUNK_ROWS) return this.flush(write);
  }

  async flush(write: (text: string) => Promise<void> | void): Promise<void> {
    if (this.widths === undefined) {
      if (this.rows.length === 0) return;
      this.widths = fitWidths([TABLE_HEADER, ...this.rows], this.width);
      await write(this.layout(TABLE_HEADER));
    }
    const text = this.rows.map((row) => this.layout(row)).join("");
    this.rows = [];
    if (text !== "") await write(text);
  }

  private layout(row: string[]): string {
    const cells = row.map((cell, column) => {
      const width = this.widths![column];
      const fitted = this.width === undefined ? cell : shortenCell(cell, width, column);
      return column === row.length - 1 ? fitted : fitted.padEnd(width);
    });
    return cells.join(COLUMN_GAP).trimEnd() + "\n";
  }
}

/**
 * Natural column widths, shrunk to fit a terminal `width`: SOURCE, DESTINATION, POLICY and REASON
 * shrink first (widest first, down to MIN_FLEXIBLE_WIDTH). When that is not enough, TIME drops its
 * milliseconds and TYPE shrinks down to 9. A terminal narrower than that gets lines that wrap.
 */
function fitWidths(rows: string[][], width: number | undefined): number[] {
  const widths = TABLE_HEADER.map((_, column) => Math.max(...rows.map((row) => row[column].length)));
  if (width === undefined) return widths;
  const gaps = COLUMN_GAP.length * (TABLE_HEADER.length - 1);
  const flexibleMinimum = widths.slice(FIRST_FLEXIBLE_COLUMN).reduce((sum, value) => sum + Math.min(value, MIN_FLEXIBLE_WIDTH), 0);
  let deficit = sum(widths.slice(0, FIRST_FLEXIBLE_COLUMN)) + gaps + flexibleMinimum - width;
  if (deficit > 0 && widths[TIME_COLUMN] > MIN_TIME_WIDTH) {
    deficit -= widths[TIME_COLUMN] - MIN_TIME_WIDTH;
    widths[TIME_COLUMN] = MIN_TIME_WIDTH;
  }
  if (deficit > 0) widths[TYPE_COLUMN] = Math.max(MIN_TYPE_WIDTH, widths[TYPE_COLUMN] - deficit);

  let available = width - sum(widths.slice(0, FIRST_FLEXIBLE_COLUMN)) - gaps;
  const flexible = widths.map((value, column) => ({ column, value })).slice(FIRST_FLEXIBLE_COLUMN);
  flexible.sort((a, b) => a.value - b.value);
  flexible.forEach((entry, index) => {
    const share = Math.floor(available / (flexible.length - index));
    widths[entry.column] = Math.max(Math.min(entry.value, MIN_FLEXIBLE_WIDTH), Math.min(entry.value, share));
    available -= widths[entry.column];
  });
  return widths;
}

function sum(values: number[]): number {
  return values.reduce((total, value) => total + value, 0);
}

/** TIME loses its end (milliseconds, then Z), SOURCE and DESTINATION their middle, other cells their end. */
function shortenCell(cell: string, width: number, column: number): string {
  if (column === TIME_COLUMN) return cell.slice(0, width);
  return shorten(cell, width, column === SOURCE_COLUMN || column === DESTINATION_COLUMN);
}

function shorten(cell: string, width: number, keepEnds: boolean): string {
  if (cell.length <= width) return cell;
  if (!keepEnds) return `${cell.slice(0, width - 1)}…`;
  const head = Math.ceil((width - 1) / 2);
  return `${cell.slice(0, head)}…${cell.slice(cell.length - (width - 1 - head))}`;
}

interface PeerFields {
  addr?: string;
  workload?: string;
  namespace?: string;
  identity?: string;
}

function tableRow(record: StoredRecord): string[] {
  const type = text(record.type);
  const time = text(record.time);
  if (type.startsWith("connection.")) {
    const error = record.error as { code?: string } | undefined;
    const reason = error?.code === undefined ? text(record.reason) : `${text(record.reason)} (${error.code})`;
    return [time, type.slice("connection.".length), directionLabel(record.direction), text(record.decision), peerLabel(record.src), peerLabel(record.dst), text(record.policy), reason];
  }
  const [subject, policy, detail] = controlCells(type, record);
  return [time, type, "-", "-", "-", subject, policy, detail];
}

function directionLabel(direction: unknown): string {
  if (direction === "inbound") return "in";
  if (direction === "outbound") return "out";
  return text(direction);
}

/** Labels a peer by its identity without spiffe://TRUST_DOMAIN/ns/, else by NAMESPACE/POD, else by its address. */
function peerLabel(value: unknown): string {
  if (typeof value !== "object" || value === null) return "-";
  const peer = value as PeerFields;
  if (peer.identity !== undefined) return shortIdentity(peer.identity);
  if (peer.workload !== undefined) return `${peer.namespace ?? "?"}/${peer.workload}`;
  return peer.addr ?? "-";
}

function shortIdentity(identity: string): string {
  const match = /^spiffe:\/\/[^/]+\/ns\/(.+)$/.exec(identity);
  return match ? match[1] : identity;
}

/** DESTINATION, POLICY and REASON cells of a control record: what it is about and what happened. */
function controlCells(type: string, record: StoredRecord): [string, string, string] {
  const field = (name: string): string => text(record[name]);
  if (type.startsWith("workload.")) return [`${field("namespace")}/${field("workload")}`, "-", field("reason")];
  if (type.startsWith("certificate.")) return [shortIdentity(field("identity")), "-", `serial ${field("serial")}, valid until ${field("not_after")}`];
  if (type.startsWith("policy.")) {
    const policy = (record.policy ?? {}) as { kind?: string; namespace?: string; name?: string };
    const name = policy.namespace === undefined ? text(policy.name) : `${policy.namespace}/${text(policy.name)}`;
    const changes = Array.isArray(record.changes) ? `${record.changes.length} changed fields, ` : "";
    const file = record.file === undefined ? "" : ` in ${field("file")}`;
    const detail = type === "policy.rejected" ? field("message") : `${changes}${text(policy.kind)}${file}`;
    return ["-", name, detail];
  }
  if (type === "agent.started") return ["-", "-", `version ${field("version")}, pid ${field("pid")}${record.previous_stop === undefined ? "" : `, previous stop ${field("previous_stop")}`}`];
  if (type === "agent.stopped") return ["-", "-", `${field("reason")}, ${field("open_connections")} connections open`];
  if (type === "capture.mode") return ["-", "-", `mode ${field("mode")} (requested ${field("requested")}): ${field("reason")}`];
  if (type === "audit.gap") {
    const seqs = record.first_seq === undefined ? "" : `, seq ${field("first_seq")} to ${field("last_seq")}`;
    return ["-", "-", `${field("lost")} records lost (${field("reason")})${seqs}${record.sink === undefined ? "" : ` at sink ${field("sink")}`}`];
  }
  return ["-", "-", "-"];
}

function text(value: unknown): string {
  if (value === undefined || value === null || value === "") return "-";
  return typeof value === "string" ? value : JSON.stringify(value);
}
