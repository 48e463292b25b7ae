// A watchdog thread for inputs that never return. A catastrophic regular expression blocks the
// event loop, so no timer of the fuzzing thread can fire: a worker thread watches a counter in
// shared memory instead. When one input runs longer than the hang limit, the worker writes that
// input as a finding, prints its path, and kills the process, since nothing can interrupt a
// running regular expression.

import { Worker } from "node:worker_threads";

/** What the fuzzing thread writes before and after each input. */
export interface Watchdog {
  /** Copies the input into shared memory and marks it as running. */
  started(input: Buffer): void;
  /** Marks the input as done. */
  finished(): void;
  /** Ends the worker thread. */
  stop(): Promise<void>;
}

// Slots of the Int32Array: a counter bumped at each start, 1 while an input runs, the input's length.
const SEQUENCE = 0;
const RUNNING = 1;
const LENGTH = 2;

const WORKER_SOURCE = `
const { workerData } = require("node:worker_threads");
const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const { shared, data, corpusDir, hangMs, target } = workerData;
const state = new Int32Array(shared);
for (;;) {
  const sequence = Atomics.load(state, 0);
  const outcome = Atomics.wait(state, 0, sequence, hangMs);
  if (outcome !== "timed-out" || Atomics.load(state, 1) !== 1 || Atomics.load(state, 0) !== sequence) continue;
  const input = Buffer.from(new Uint8Array(data, 0, Atomics.load(state, 2)));
  const file = path.join(corpusDir, "finding-" + crypto.createHash("sha256").update(input).digest("hex").slice(0, 16));
  fs.mkdirSync(corpusDir, { recursive: true });
  fs.writeFileSync(file, input);
  // fs.writeSync: a worker's process.stderr goes through the blocked main thread and would never print.
  fs.writeSync(2, "fuzz " + target + ": FINDING: an input did not return within " + hangMs + " ms; it is written to " + file + "\\n");
  process.kill(process.pid, "SIGKILL");
}
`;

/** Starts a watchdog for inputs of at most `maxBytes` bytes of the target whose corpus is `corpusDir`. */
export function startWatchdog(target: string, corpusDir: string, maxBytes: number, hangMs: number): Watchdog {
  const shared = new SharedArrayBuffer(3 * Int32Array.BYTES_PER_ELEMENT);
  const data = new SharedArrayBuffer(maxBytes);
  const state = new Int32Array(shared);
  const bytes = new Uint8Array(data);
  const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { shared, data, corpusDir, hangMs, target } });
  worker.unref();
  return {
    started(input) {
      const length = Math.min(input.length, maxBytes);
      bytes.set(input.subarray(0, length));
      Atomics.store(state, LENGTH, length);
      Atomics.store(state, RUNNING, 1);
      Atomics.add(state, SEQUENCE, 1);
      Atomics.notify(state, SEQUENCE);
    },
    finished() {
      Atomics.store(state, RUNNING, 0);
    },
    async stop() {
      await worker.terminate();
    },
  };
}
