// Reads a V8 heap snapshot that the memory hook wrote, and sums the shallow sizes of its objects in
// total and by constructor, as the Summary view of Chrome DevTools groups them.

import fs from "node:fs";
import path from "node:path";
import { round } from "./stats";

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits until the heap snapshot in `dir` is complete (its size stable for 1 s), for up to 120 s; returns its path. */
async function waitForSnapshot(dir: string): Promise<string> {
  const deadline = Date.now() + 120_000;
  let lastSize = -1;
  while (Date.now() < deadline) {
    await sleep(1000);
    const file = fs.readdirSync(dir).find((name) => name.endsWith(".heapsnapshot"));
    if (!file) continue;
    const size = fs.statSync(path.join(dir, file)).size;
    if (size > 0 && size === lastSize) return path.join(dir, file);
    lastSize = size;
  }
  throw new Error(`no complete heap snapshot appeared in ${dir} within 120 s`);
}

interface HeapSnapshotFile {
  snapshot: { meta: { node_fields: string[]; node_types: [string[]] } };
  nodes: number[];
  strings: string[];
}

/** Sums the shallow sizes of a V8 heap snapshot, in total and by constructor (type and name, as DevTools' Summary groups them). */
function summarizeSnapshot(file: string): { usedMb: number; top: { name: string; count: number; mb: number }[] } {
  const snapshot = JSON.parse(fs.readFileSync(file, "utf8")) as HeapSnapshotFile;
  const fields = snapshot.snapshot.meta.node_fields;
  const types = snapshot.snapshot.meta.node_types[0];
  const [typeAt, nameAt, sizeAt] = [fields.indexOf("type"), fields.indexOf("name"), fields.indexOf("self_size")];
  const groups = new Map<string, { count: number; bytes: number }>();
  let total = 0;
  for (let offset = 0; offset < snapshot.nodes.length; offset += fields.length) {
    const type = types[snapshot.nodes[offset + typeAt]];
    const bytes = snapshot.nodes[offset + sizeAt];
    // Objects group by constructor name; strings, code and arrays by their type.
    const name = type === "object" || type === "closure" ? `${type} ${snapshot.strings[snapshot.nodes[offset + nameAt]]}` : `(${type})`;
    const group = groups.get(name) ?? { count: 0, bytes: 0 };
    group.count++;
    group.bytes += bytes;
    groups.set(name, group);
    total += bytes;
  }
  const top = [...groups.entries()]
    .sort(([, a], [, b]) => b.bytes - a.bytes)
    .slice(0, 12)
    .map(([name, group]) => ({ name, count: group.count, mb: round(group.bytes / 1024 / 1024, 1) }));
  return { usedMb: round(total / 1024 / 1024, 1), top };
}

/** Summarizes the heap snapshot that the memory hook wrote into `dir`. */
export async function snapshotHeap(dir: string, step: (message: string) => void): Promise<ReturnType<typeof summarizeSnapshot>> {
  const file = await waitForSnapshot(dir);
  const summary = summarizeSnapshot(file);
  step(`kubernetes: memory: heap snapshot ${file}: ${summary.usedMb} MiB of objects; largest: ${summary.top.slice(0, 6).map((entry) => `${entry.name} ${entry.mb} MiB`).join(", ")}`);
  return summary;
}
