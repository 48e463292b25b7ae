// The -o option of agentctl: a table for terminals, or the data as pretty-printed JSON or as YAML.
// JSON and YAML print the admin API's body unchanged, so scripts see every field.

import { stringify as yamlStringify } from "yaml";
import { UsageError } from "./admin-client";

export type OutputFormat = "table" | "json" | "yaml";

export const OUTPUT_FORMATS: readonly OutputFormat[] = ["table", "json", "yaml"];

/**
 * Returns the format that -o names, or `fallback` when -o is absent. A value outside `allowed` is
 * a usage error naming the value.
 */
export function parseOutputFormat(
  value: string | undefined,
  allowed: readonly OutputFormat[] = OUTPUT_FORMATS,
  fallback: OutputFormat = allowed[0],
): OutputFormat {
  if (value === undefined) return fallback;
  if ((allowed as readonly string[]).includes(value)) return value as OutputFormat;
  throw new UsageError(`invalid -o ${JSON.stringify(value)}: use ${allowed.join(", ")}`);
}

/** Formats `data` as JSON or YAML, or calls `table` for the table format. */
export function render(format: OutputFormat, data: unknown, table: () => string): string {
  if (format === "json") return JSON.stringify(data, null, 2) + "\n";
  if (format === "yaml") return yamlStringify(data);
  return table();
}

/**
 * Lays out rows under a header in columns separated by two spaces. Every column but the last is
 * padded to its widest cell, so a long last column does not widen the others.
 */
export function formatTable(header: readonly string[], rows: readonly (readonly string[])[], indent = ""): string {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => (row[column] ?? "").length)));
  const line = (row: readonly string[]): string =>
    indent +
    row
      .map((cell, column) => (column === row.length - 1 ? cell : cell.padEnd(widths[column])))
      .join("  ")
      .trimEnd();
  return [header, ...rows].map(line).join("\n") + "\n";
}

/** Formats a duration in seconds as its two largest units: "45s", "5m 3s", "2h 15m", "89d 23h". */
export function formatDuration(seconds: number): string {
  const total = Math.floor(Math.abs(seconds));
  const units: [string, number][] = [
    ["d", 86_400],
    ["h", 3_600],
    ["m", 60],
    ["s", 1],
  ];
  const parts: string[] = [];
  let rest = total;
  for (const [unit, size] of units) {
    const count = Math.floor(rest / size);
    rest -= count * size;
    if (count > 0 || (parts.length > 0 && parts.length < 2)) parts.push(`${count}${unit}`);
    if (parts.length === 2) break;
  }
  if (parts.length === 0) return "0s";
  // A trailing zero unit ("2h 0m") carries no information.
  if (parts.length === 2 && parts[1].startsWith("0")) parts.pop();
  return parts.join(" ");
}

/** Formats a byte count in binary units: "512 B", "1.5 KiB", "20.0 MiB". */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** Returns "1 policy" or "2 policies": the count with the noun, plural unless the count is 1. */
export function countOf(count: number, noun: string, plural = `${noun}s`): string {
  return `${count} ${count === 1 ? noun : plural}`;
}

/** Returns "-" for an absent or empty value, so that every table cell has text. */
export function cell(value: string | number | undefined): string {
  if (value === undefined || value === "") return "-";
  return String(value);
}
