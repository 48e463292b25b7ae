// The table output of `agentctl audit query`. Records come from files that anyone with write
// access may have edited, so every cell is built from fields of any JSON type, and control
// characters are escaped before they reach the terminal.

import type { StoredRecord } from "../audit/query";

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
 * Characters escaped in every cell: C0 controls, DEL and C1 controls (ESC and CSI start terminal
 * sequences, CR and LF split rows), the bidirectional formatting characters that reorder how text
 * is shown, and lone UTF-16 surrogates.
 */
const UNSAFE_CHARACTERS = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;
const PRINTABLE_ASCII = /^[\u0020-\u007e]*$/;
const ZERO_WIDTH = /^[\p{Mn}\p{Me}\p{Cf}]+$/u;
const EMOJI_PRESENTATION = /\p{Emoji_Presentation}|\ufe0f/u;
const graphemes = new Intl.Segmenter("en", { granularity: "grapheme" });

/**
 * East Asian Wide and Fullwidth blocks (Unicode UAX #11), as [first, last] code points.
 * NOTE: an approximation by block: a few characters inside these blocks are narrow, and terminals
 * differ for some symbols, so a row with them may be off by a column.
 */
const WIDE_RANGES: readonly (readonly [number, number])[] = [
  [0x1100, 0x115f],
  [0x2e80, 0x303e],
  [0x3041, 0x33ff],
  [0x3400, 0x4dbf],
  [0x4e00, 0x9fff],
  [0xa000, 0xa4cf],
  [0xa960, 0xa97f],
  [0xac00, 0xd7a3],
  [0xf900, 0xfaff],
  [0xfe10, 0xfe19],
  [0xfe30, 0xfe6f],
  [0xff00, 0xff60],
  [0xffe0, 0xffe6],
  [0x1b000, 0x1b2ff],
  [0x1f200, 0x1f2ff],
  [0x20000, 0x3fffd],
];

/**
 * The table output of `audit query`: one row per record, fitted to `width` columns when it is
 * known. Long identities and addresses lose their middle, other cells their end, marked with "…".
 * TYPE shows connection records as opened and completed, without "connection.", and DIR shows in
 * and out. Widths count terminal columns: wide characters take two, combining marks none.
 */
export class AuditTable {
  private rows: string[][] = [];
  private widths: number[] | undefined;

  constructor(private readonly width: number | undefined) {}

  add(record: StoredRecord, write: (text: string) => Promise<void> | void): Promise<void> | void {
    this.rows.push(tableRow(record).map(escapeControls));
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
      return column === row.length - 1 ? fitted : fitted + " ".repeat(Math.max(0, width - displayWidth(fitted)));
    });
    return cells.join(COLUMN_GAP).trimEnd() + "\n";
  }
}

/** Replaces each unsafe character with its JSON escape, such as \u001b for ESC. */
export function escapeControls(cell: string): string {
  return cell.replace(UNSAFE_CHARACTERS, (character) => `\\u${character.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

/** Returns the number of terminal columns that `text` takes, counted per grapheme cluster. */
export function displayWidth(text: string): number {
  if (PRINTABLE_ASCII.test(text)) return text.length;
  let width = 0;
  for (const { segment } of graphemes.segment(text)) width += graphemeWidth(segment);
  return width;
}

function graphemeWidth(grapheme: string): number {
  if (ZERO_WIDTH.test(grapheme)) return 0;
  const codePoint = grapheme.codePointAt(0)!;
  const wide = WIDE_RANGES.some(([first, last]) => codePoint >= first && codePoint <= last) || EMOJI_PRESENTATION.test(grapheme);
  return wide ? 2 : 1;
}

/** Returns the longest start of `text` that fits `width` columns, cut between grapheme clusters. */
function headOf(text: string, width: number): string {
  if (PRINTABLE_ASCII.test(text)) return text.slice(0, width);
  let used = 0;
  let head = "";
  for (const { segment } of graphemes.segment(text)) {
    used += graphemeWidth(segment);
    if (used > width) break;
    head += segment;
  }
  return head;
}

/** Returns the longest end of `text` that fits `width` columns, cut between grapheme clusters. */
function tailOf(text: string, width: number): string {
  if (width <= 0) return "";
  if (PRINTABLE_ASCII.test(text)) return text.slice(-width);
  const segments = Array.from(graphemes.segment(text), (entry) => entry.segment);
  let used = 0;
  let start = segments.length;
  while (start > 0 && used + graphemeWidth(segments[start - 1]) <= width) {
    start -= 1;
    used += graphemeWidth(segments[start]);
  }
  return segments.slice(start).join("");
}

/**
 * Natural column widths, shrunk to fit a terminal `width`: SOURCE, DESTINATION, POLICY and REASON
 * shrink first (widest first, down to MIN_FLEXIBLE_WIDTH). When that is not enough, TIME drops its
 * milliseconds and TYPE shrinks down to 9. A terminal narrower than that gets lines that wrap.
 */
function fitWidths(rows: string[][], width: number | undefined): number[] {
  const widths = TABLE_HEADER.map((_, column) => Math.max(...rows.map((row) => displayWidth(row[column]))));
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
  if (column === TIME_COLUMN) return headOf(cell, width);
  return shorten(cell, width, column === SOURCE_COLUMN || column === DESTINATION_COLUMN);
}

function shorten(cell: string, width: number, keepEnds: boolean): string {
  if (displayWidth(cell) <= width) return cell;
  if (!keepEnds) return `${headOf(cell, width - 1)}…`;
  const headWidth = Math.ceil((width - 1) / 2);
  return `${headOf(cell, headWidth)}…${tailOf(cell, width - 1 - headWidth)}`;
}

function tableRow(record: StoredRecord): string[] {
  const type = text(record.type);
  const time = text(record.time);
  if (type.startsWith("connection.")) {
    const code = fieldOf(record.error, "code");
    const reason = code === undefined ? text(record.reason) : `${text(record.reason)} (${text(code)})`;
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

/**
 * Labels a peer by its identity without spiffe://TRUST_DOMAIN/ns/, else by NAMESPACE/POD, else by
 * its address. A peer that is not a JSON object shows as "?".
 */
function peerLabel(value: unknown): string {
  if (value === undefined || value === null) return "-";
  if (typeof value !== "object" || Array.isArray(value)) return "?";
  const identity = fieldOf(value, "identity");
  if (identity !== undefined) return shortIdentity(text(identity));
  const workload = fieldOf(value, "workload");
  if (workload !== undefined) return `${fieldOf(value, "namespace") === undefined ? "?" : text(fieldOf(value, "namespace"))}/${text(workload)}`;
  return text(fieldOf(value, "addr"));
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
  if (type.startsWith("policy.")) return ["-", ...policyCells(type, record)];
  if (type === "agent.started") return ["-", "-", `version ${field("version")}, pid ${field("pid")}${record.previous_stop === undefined ? "" : `, previous stop ${field("previous_stop")}`}`];
  if (type === "agent.stopped") return ["-", "-", `${field("reason")}, ${field("open_connections")} connections open`];
  if (type === "capture.mode") return ["-", "-", `mode ${field("mode")} (requested ${field("requested")}): ${field("reason")}`];
  if (type === "audit.gap") {
    const seqs = record.first_seq === undefined ? "" : `, seq ${field("first_seq")} to ${field("last_seq")}`;
    return ["-", "-", `${field("lost")} records lost (${field("reason")})${seqs}${record.sink === undefined ? "" : ` at sink ${field("sink")}`}`];
  }
  return ["-", "-", "-"];
}

/** POLICY and REASON cells of a policy.* record. */
function policyCells(type: string, record: StoredRecord): [string, string] {
  const namespace = fieldOf(record.policy, "namespace");
  const name = namespace === undefined ? text(fieldOf(record.policy, "name")) : `${text(namespace)}/${text(fieldOf(record.policy, "name"))}`;
  if (type === "policy.rejected") return [name, text(record.message)];
  const changes = Array.isArray(record.changes) ? `${record.changes.length} changed fields, ` : "";
  const file = record.file === undefined ? "" : ` in ${text(record.file)}`;
  return [name, `${changes}${text(fieldOf(record.policy, "kind"))}${file}`];
}

/** Returns a member of a JSON object, or undefined when `value` is no object or lacks it (or it is null). */
function fieldOf(value: unknown, name: string): unknown {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return undefined;
  return (value as Record<string, unknown>)[name] ?? undefined;
}

/** Shows any JSON value as text: strings as they are, absent or empty ones as "-", others as JSON. */
function text(value: unknown): string {
  if (value === undefined || value === null || value === "") return "-";
  return typeof value === "string" ? value : JSON.stringify(value);
}
