// The text format of the agent's log (--log-format text): one line per record,
//
//   TIME LEVEL component message key=value key=value ...
//
// for people who read the log in a terminal or with kubectl logs. pino writes JSON, so a
// destination parses each record pino produced and writes it again as text.

import type pino from "pino";

/** The formats of --log-format: JSON lines (the default), or text lines. */
export const LOG_FORMATS = ["json", "text"] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** pino's level numbers and their names. */
const LEVEL_NAMES: ReadonlyMap<number, string> = new Map([
  [10, "trace"],
  [20, "debug"],
  [30, "info"],
  [40, "warn"],
  [50, "error"],
  [60, "fatal"],
]);

/**
 * Fields left out of the key=value part: the ones the start of the line shows, and the process's
 * pid and node, which are the same on every line.
 */
const PREFIX_FIELDS: ReadonlySet<string> = new Set(["time", "level", "msg", "component", "pid", "node"]);

/** The component of lines without one: the process logger's. */
const ROOT_COMPONENT = "agent";

/** A string that needs no quotes after `=`: no space, quote, `=`, backslash or control character. */
const BARE_VALUE = /^[^\s"=\\\u0000-\u001f\u007f]+$/;
const CONTROL_CHARACTERS = /[\u0000-\u001f\u007f]/;

/** Checks a --log-format value and returns it. Throws an Error that names the value and the choices. */
export function parseLogFormat(text: string): LogFormat {
  if ((LOG_FORMATS as readonly string[]).includes(text)) return text as LogFormat;
  throw new Error(`unknown log format "${text}"; valid formats: ${LOG_FORMATS.join(", ")}`);
}

/**
 * Formats one JSON record that pino wrote (with or without its newline) as a text line ending in
 * a newline. A string value with a space, quote, `=`, backslash or control character is written
 * as a JSON string, and an object or array as compact JSON, so each record stays on one line. A
 * line that is not a JSON object is passed on as it is.
 */
export function formatTextLine(jsonLine: string): string {
  let record: Record<string, unknown>;
  try {
    record = JSON.parse(jsonLine) as Record<string, unknown>;
  } catch {
    return endLine(jsonLine);
  }
  if (record === null || typeof record !== "object" || Array.isArray(record)) return endLine(jsonLine);

  const time = typeof record.time === "number" ? new Date(record.time).toISOString() : String(record.time ?? "-");
  const level = typeof record.level === "number" ? (LEVEL_NAMES.get(record.level) ?? String(record.level)) : String(record.level ?? "-");
  const component = typeof record.component === "string" ? record.component : ROOT_COMPONENT;
  const message = typeof record.msg === "string" ? record.msg : "";
  let line = `${time} ${level} ${component} ${CONTROL_CHARACTERS.test(message) ? JSON.stringify(message).slice(1, -1) : message}`;
  for (const key of Object.keys(record)) {
    if (PREFIX_FIELDS.has(key)) continue;
    line += ` ${key}=${formatValue(record[key])}`;
  }
  return `${line}\n`;
}

function endLine(text: string): string {
  return text.endsWith("\n") ? text : `${text}\n`;
}

function formatValue(value: unknown): string {
  if (typeof value === "string") return BARE_VALUE.test(value) ? value : JSON.stringify(value);
  if (value === null || typeof value !== "object") return String(value);
  return JSON.stringify(value);
}

/** The part of a destination that pino calls: write, and the flushes on fatal() and at exit. */
export interface LineDestination extends pino.DestinationStream {
  flushSync?(): void;
  flush?(callback?: (error?: Error) => void): void;
}

/**
 * A pino destination that writes each record to `target` as a text line (formatTextLine). The
 * flushes pass through, so batching and the flush at exit work as they do for JSON. Parsing the
 * record again costs CPU: the diagnostics benchmark (test/bench/diagnostics.ts) measures an access
 * line at about 3.7 times its JSON cost, and docs/benchmarks.md records the figures.
 */
export class TextDestination implements LineDestination {
  constructor(private readonly target: LineDestination) {}

  write(line: string): void {
    this.target.write(formatTextLine(line));
  }

  flushSync(): void {
    this.target.flushSync?.();
  }

  flush(callback?: (error?: Error) => void): void {
    if (this.target.flush) this.target.flush(callback);
    else callback?.();
  }
}
