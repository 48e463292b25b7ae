// Files for the targets that read from a path: one temporary folder per process, removed at exit.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";

let folder: string | undefined;

/** Writes `bytes` to `name` in this process's temporary folder and returns the file's path. */
export function writeTempFile(name: string, bytes: Buffer): string {
  if (folder === undefined) {
    const created = fs.mkdtempSync(path.join(os.tmpdir(), "aafuzz-"));
    process.on("exit", () => fs.rmSync(created, { recursive: true, force: true }));
    folder = created;
  }
  const file = path.join(folder, name);
  fs.writeFileSync(file, bytes);
  return file;
}
