// Small files the pipeline keeps next to the spool's segments: the sinks' cursors and the key of
// the redaction hashes.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { Logger } from "../log";

const CURSOR_FILE = "cursors.json";
const REDACTION_KEY_FILE = "redaction.key";

/** Saves each sink's cursor (the seq of the last record it accepted) atomically: write, then rename. */
export async function saveCursors(spoolDir: string, cursors: Record<string, number>): Promise<void> {
  const file = path.join(spoolDir, CURSOR_FILE);
  await fs.promises.writeFile(`${file}.tmp`, JSON.stringify({ version: 1, sinks: cursors }), { mode: 0o600 });
  await fs.promises.rename(`${file}.tmp`, file);
}

/**
 * Loads the saved cursors by sink name. A missing file is an empty map; an unreadable one is logged
 * and read as empty, so the sinks start at the spool's head or where they say they are.
 */
export async function loadCursors(spoolDir: string, logger: Logger): Promise<Record<string, number>> {
  try {
    const parsed = JSON.parse(await fs.promises.readFile(path.join(spoolDir, CURSOR_FILE), "utf8")) as { sinks?: Record<string, number> };
    return parsed.sinks ?? {};
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") {
      logger.warn({ err: error, spool: spoolDir }, "the audit sink cursor file is unreadable; sinks start at the spool's head or at what they hold");
    }
    return {};
  }
}

/** Reads the spool's redaction key, creating 32 random bytes (mode 0600) on first use. */
export async function spoolRedactionKey(spoolDir: string): Promise<Buffer> {
  const file = path.join(spoolDir, REDACTION_KEY_FILE);
  try {
    return await fs.promises.readFile(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
  const key = crypto.randomBytes(32);
  await fs.promises.writeFile(file, key, { mode: 0o600, flag: "wx" });
  return key;
}
