// Preloaded into an agent with `node --require` (through NODE_OPTIONS, which rejects --expose-gc on
// Node 20) for the Kubernetes memory figures. On SIGUSR2 it logs process.memoryUsage() as a JSON
// line on standard error, runs a full garbage collection and logs it again. With
// AMBIENT_BENCH_HEAP_DIR set it writes a heap snapshot into that folder 2 s later and logs its path.

import path from "node:path";
import v8 from "node:v8";
import vm from "node:vm";

/** The message of the hook's log lines, which the benchmark waits for. */
export const MEMORY_READING_MESSAGE = "bench memory reading";

v8.setFlagsFromString("--expose-gc");
// The flag exposes gc() to contexts made after it is set.
const collectGarbage = vm.runInNewContext("gc") as () => void;

function log(fields: Record<string, unknown>): void {
  process.stderr.write(JSON.stringify({ msg: MEMORY_READING_MESSAGE, time: Date.now(), ...fields }) + "\n");
}

process.on("SIGUSR2", () => {
  log({ phase: "before gc", ...process.memoryUsage() });
  collectGarbage();
  log({ phase: "after gc", ...process.memoryUsage() });
  const directory = process.env.AMBIENT_BENCH_HEAP_DIR;
  if (!directory) return;
  // Writing the snapshot grows the malloc heap; the delay lets the benchmark read VmRSS before that.
  setTimeout(() => log({ phase: "heap snapshot", file: v8.writeHeapSnapshot(path.join(directory, `agent-${process.pid}.heapsnapshot`)) }), 2000);
});
