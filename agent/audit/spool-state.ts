// Small files the pipeline keeps next to the spool's segments: the sinks' cursors and the key of
// the redaction hashes.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { Logger } from "../log";

const CURSOR_FILE = "cursors.json";
const REDACTION_KEY_FILE = "redaction.key";

/** Losses a sink has not received a gap record about: the first and last lost seq and the count. */
export interface UnreportedLoss {
  firstSeq: number;
  lastSeq: number;
  lost: number;
}

/** The cursor file's contents per sink: the seq of the last record it accepted, and its unreported losses. */
export interface SavedCursors {
  sinks: Record<string, number>;
  unreported: Record<string, UnreportedLoss>;
}

/** Saves the sinks' cursors and unreported losses atomically: write, then rename. */
export async function saveCursors(spoolDir: string, saved: SavedCursors): Promise<void> {
  const file = path.join(spoolDir, CURSOR_FILE);
  await fs.promises.writeFile(`${file}.tmp`, JSON.stringify({ version: 1, ...saved }), { mode: 0o600 });
  await fs.promises.rename(`${file}.tmp`, file);
}

/**
 * Loads the saved cursors by sink name. A missing file is an empty map. An unreadable one is logged
 * and read as empty, so the sinks receive the records still in the spool again.
 */
export async function loadCursors(spoolDir: string, logger: Logger): Promise<SavedCursors> {
  try {
    const parsed = JSON.parse(await fs.promises.readFile(path.join(spoolDir, CURSOR_FILE), "utf8")) as Partial<SavedCursors>;
    return { sinks: parsed.sinks ?? {}, unreported: parsed.unreported ?? {} };
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") {
      logger.warn({ err: error, spool: spoolDir }, "the audit sink cursor file is unreadable; sinks receive the records still in the spool again");
    }
    return { sinks: {}, unreported: {} };
  }
}

/** Bytes of a key the spool creates; a key file shorter than MIN_KEY_BYTES is replaced. */
const KEY_BYTES = 32;
const MIN_KEY_BYTES = 16;

/**
 * Reads the spool's redaction key, creating KEY_BYTES random bytes (mode 0600) on first use. A key
 * file that is shorter than MIN_KEY_BYTES (an interrupted first write, an edit) would make the hashes
 * easy to reverse, so it is replaced and the replacement logged: hashes then change once.
 */
export async function spoolRedactionKey(spoolDir: string, logger: Logger): Promise<Buffer> {
  const file = path.join(spoolDir, REDACTION_KEY_FILE);
  try {
    const key = await fs.promises.readFile(file);
    if (key.length >= MIN_KEY_BYTES) return key;
    logger.error(
      { file, bytes: key.length },
      `the audit redaction key file holds ${key.length} bytes, fewer than ${MIN_KEY_BYTES}; replacing it with a new key, so hashed values of earlier records no longer match new ones`,
    );
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
  const key = crypto.randomBytes(KEY_BYTES);
  await writeAtomically(file, key);
  return key;
}

/** Writes the redaction key into the spool folder, creating the folder when it was removed. */
export async function writeRedactionKey(spoolDir: string, key: Buffer): Promise<void> {
  await fs.promises.mkdir(spoolDir, { recursive: true, mode: 0o700 });
  await writeAtomically(path.join(spoolDir, REDACTION_KEY_FILE), key);
}

/** Copies the redaction key of a spool folder into a new one, so hashes stay the same after a damaged spool was moved aside. */
export async function copyRedactionKey(fromDir: string, toDir: string): Promise<void> {
  const key = await fs.promises.readFile(path.join(fromDir, REDACTION_KEY_FILE)).catch(() => undefined);
  if (key === undefined || key.length < MIN_KEY_BYTES) return;
  await fs.promises.mkdir(toDir, { recursive: true, mode: 0o700 });
  await writeAtomically(path.join(toDir, REDACTION_KEY_FILE), key);
}

/** Writes a file with mode 0600 through a synced temporary file and a rename, so a crash leaves the old file or the whole new one. */
async function writeAtomically(file: string, data: Buffer): Promise<void> {
  const temporary = `${file}.tmp`;
  const handle = await fs.promises.open(temporary, "w", 0o600);
  try {
    await handle.writeFile(data);
    await handle.datasync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(temporary, file);
}
