// Names of the audit files on disk. The active file is the configured path, such as
// /var/log/aa/audit.log. A rotated file keeps the folder and extension and adds the UTC time of
// the rotation in ISO 8601 basic format, and a counter when that name is already taken:
// audit-20261205T071500Z.log, then audit-20261205T071500Z-1.log.

import fs from "node:fs";
import path from "node:path";

/** Returns the name of the file that `activePath` is renamed to when it rotates at `at`. */
export function rotatedFileName(activePath: string, at: Date, counter?: number): string {
  const { dir, stem, ext } = splitActivePath(activePath);
  const suffix = counter !== undefined && counter > 0 ? `-${counter}` : "";
  return path.join(dir, `${stem}-${basicTimestamp(at)}${suffix}${ext}`);
}

/**
 * Returns the rotatedFileName() for `at` with a counter above every rotated file of the same second
 * (sync fs), so the new name sorts after them even when older ones of that second were deleted.
 */
export function freeRotatedFileName(activePath: string, at: Date): string {
  const timestamp = basicTimestamp(at);
  const sameSecond = parseRotatedNames(activePath, listFolder(activePath)).filter((file) => file.timestamp === timestamp);
  const counter = sameSecond.length === 0 ? 0 : Math.max(...sameSecond.map((file) => file.counter)) + 1;
  return rotatedFileName(activePath, at, counter);
}

/**
 * Lists the rotated siblings of `activePath`, oldest first, then `activePath` itself if it exists
 * (sync fs). Rotated files sort by the time in their name, then by counter. Returns an empty list
 * when the folder does not exist.
 */
export function auditFileSet(activePath: string): string[] {
  const { dir } = splitActivePath(activePath);
  const rotated = parseRotatedNames(activePath, listFolder(activePath));
  const files = rotated.map((file) => path.join(dir, file.name));
  if (fs.existsSync(activePath)) files.push(activePath);
  return files;
}

/** Lists the names in the folder of `activePath`, or none when the folder does not exist. */
function listFolder(activePath: string): string[] {
  try {
    return fs.readdirSync(splitActivePath(activePath).dir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw error;
  }
}

interface RotatedName {
  name: string;
  timestamp: string;
  counter: number;
}

/** Picks the names of rotated siblings of `activePath` out of a folder listing, oldest first. */
function parseRotatedNames(activePath: string, entries: readonly string[]): RotatedName[] {
  const { stem, ext } = splitActivePath(activePath);
  const pattern = new RegExp(`^${escapeRegExp(stem)}-(\\d{8}T\\d{6}Z)(?:-(\\d+))?${escapeRegExp(ext)}$`);
  const rotated: RotatedName[] = [];
  for (const name of entries) {
    const match = pattern.exec(name);
    if (match) rotated.push({ name, timestamp: match[1], counter: match[2] === undefined ? 0 : Number(match[2]) });
  }
  // The basic format has fixed width, so string order is time order.
  rotated.sort(compareRotatedNames);
  return rotated;
}

function compareRotatedNames(a: RotatedName, b: RotatedName): number {
  if (a.timestamp !== b.timestamp) return a.timestamp < b.timestamp ? -1 : 1;
  return a.counter - b.counter;
}

/** Splits /var/log/aa/audit.log into /var/log/aa, audit and .log. A name without a dot has an empty extension. */
function splitActivePath(activePath: string): { dir: string; stem: string; ext: string } {
  const parsed = path.parse(activePath);
  return { dir: parsed.dir, stem: parsed.name, ext: parsed.ext };
}

/** Formats `at` as 20261205T071500Z (UTC, whole seconds). */
function basicTimestamp(at: Date): string {
  return at.toISOString().replace(/\.\d{3}Z$/, "Z").replace(/[-:]/g, "");
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
