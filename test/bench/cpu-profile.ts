// Optional CPU profiles of the agents (`bench.js --cpu-prof`): profile-hook.js writes a .cpuprofile
// per agent when the agent exits, and this file sums the self time per function for the report.

import fs from "node:fs";
import path from "node:path";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

const HOOK = path.join(__dirname, "profile-hook.js");

function restoreEnv(name: string, value: string | undefined): void {
  if (value === undefined) delete process.env[name];
  else process.env[name] = value;
}

/**
 * Runs `spawn` with the environment set so that the node processes it starts load profile-hook.js
 * and write CPU profiles into `dir`, and restores the environment right after. `spawn` must start
 * its processes synchronously.
 */
export function withCpuProfiles<T>(dir: string, spawn: () => T): T {
  const previousOptions = process.env.NODE_OPTIONS;
  const previousDir = process.env.AMBIENT_BENCH_PROFILE_DIR;
  fs.mkdirSync(dir, { recursive: true });
  process.env.NODE_OPTIONS = `${previousOptions ?? ""} --require ${HOOK}`.trim();
  process.env.AMBIENT_BENCH_PROFILE_DIR = dir;
  try {
    return spawn();
  } finally {
    restoreEnv("NODE_OPTIONS", previousOptions);
    restoreEnv("AMBIENT_BENCH_PROFILE_DIR", previousDir);
  }
}

function frameName(node: ProfileNode): string {
  const { functionName, url, lineNumber } = node.callFrame;
  const name = functionName || "(anonymous)";
  if (!url) return name;
  const file = url.replace(/^file:\/\//, "");
  const shown = file.includes("node_modules") || file.startsWith("node:") ? file.replace(/^.*node_modules\//, "") : path.relative(process.cwd(), file);
  return `${name} ${shown}:${lineNumber + 1}`;
}

/** Returns the self time of each function in `file` in ms, largest first, and the busy total (idle time left out). */
export function selfTimes(file: string): { totalMs: number; functions: Array<{ name: string; ms: number }> } {
  const profile = JSON.parse(fs.readFileSync(file, "utf8")) as CpuProfile;
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const msByName = new Map<string, number>();
  let totalMs = 0;
  profile.samples.forEach((id, index) => {
    const ms = (profile.timeDeltas[index] ?? 0) / 1000;
    const node = byId.get(id);
    if (!node) return;
    const name = frameName(node);
    if (name === "(idle)") return;
    msByName.set(name, (msByName.get(name) ?? 0) + ms);
    totalMs += ms;
  });
  const functions = [...msByName].map(([name, ms]) => ({ name, ms })).sort((a, b) => b.ms - a.ms);
  return { totalMs, functions };
}

/** Formats the top `count` functions of every profile in `dir`. */
export function summarizeProfiles(dir: string, count = 15): string {
  const files = fs.existsSync(dir) ? fs.readdirSync(dir).filter((name) => name.endsWith(".cpuprofile")) : [];
  if (files.length === 0) return `no CPU profile was written to ${dir}`;
  return files
    .map((name) => {
      const { totalMs, functions } = selfTimes(path.join(dir, name));
      const lines = functions.slice(0, count).map(({ name: frame, ms }) => `  ${((100 * ms) / totalMs).toFixed(1).padStart(5)}%  ${frame}`);
      return [`${path.join(dir, name)} (${(totalMs / 1000).toFixed(1)} s busy, share of busy time by self time):`, ...lines].join("\n");
    })
    .join("\n\n");
}
