// The agent's version, read from package.json. The compiled file runs from dist/agent, and the
// source, when run directly, from agent/, so package.json is looked for two and one folders up.

import fs from "node:fs";
import path from "node:path";

let cached: string | undefined;

/** Returns the "version" of the ambient-agent package.json, or "unknown" when none is found beside the code. */
export function agentVersion(): string {
  cached ??= readVersion();
  return cached;
}

function readVersion(): string {
  for (const candidate of [path.join(__dirname, "..", "..", "package.json"), path.join(__dirname, "..", "package.json")]) {
    try {
      const parsed = JSON.parse(fs.readFileSync(candidate, "utf8")) as { name?: unknown; version?: unknown };
      if (parsed.name === "ambient-agent" && typeof parsed.version === "string") return parsed.version;
    } catch {
      // Missing or unreadable: try the next folder.
    }
  }
  return "unknown";
}
