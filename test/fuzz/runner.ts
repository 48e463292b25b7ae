// The fuzzing runner: replays a target's corpus, then runs generated inputs (mutations of the
// corpus entries and the target's own arbitraries) through fast-check for a bounded time or
// count. An input is a finding when the target throws an error it does not document, breaks an
// invariant, or takes longer than the per-input bound; the runner then writes it to the corpus
// folder as finding-<sha256 prefix> and reports that file.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { performance } from "node:perf_hooks";
import fc from "fast-check";
import { mutatedInputs } from "./mutate";
import { startWatchdog, type Watchdog } from "./watchdog";

/** A function under fuzzing, fed with bytes. */
export interface FuzzTarget {
  /** Name of the target and of its corpus folder test/fuzz/corpus/<name>. */
  name: string;
  /** Runs one input. Returns, throws an error that `expected` accepts, or throws InvariantError. */
  run(input: Buffer): void | Promise<void>;
  /** Tells whether an error that `run` threw is the documented rejection of a bad input. */
  expected(error: unknown): boolean;
  /** Byte strings that mutations insert whole: the delimiters, escapes and keywords of the format. */
  tokens?: readonly string[];
  /** Generators of inputs besides the mutations of corpus entries. */
  arbitraries?: readonly fc.Arbitrary<Buffer>[];
  /** Largest generated input in bytes; 16 KiB when absent. */
  maxBytes?: number;
  /** Per-input time bound in milliseconds, for a target slower than FuzzOptions.inputMs allows. */
  inputMs?: number;
}

/** A broken invariant: an accepted input whose result is wrong. Never an expected error. */
export class InvariantError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "InvariantError";
  }
}

/** Throws InvariantError with `message` unless `condition` holds. */
export function invariant(condition: boolean, message: () => string): asserts condition {
  if (!condition) throw new InvariantError(message());
}

/** Limits of one fuzzing run. */
export interface FuzzOptions {
  /** Time for generated inputs, after the corpus replay. */
  seconds: number;
  /** Maximum number of generated inputs; unbounded when absent. */
  maxRuns?: number;
  /** fast-check seed, to repeat a run. */
  seed?: number;
  /** Per-input time bound in milliseconds (100 when absent). */
  inputMs?: number;
  /** Time after which a running input counts as a hang and the process is killed (5,000 when absent). */
  hangMs?: number;
  /** Corpus root; test/fuzz/corpus of the checkout when absent. */
  corpusRoot?: string;
}

/** A failing input: its file in the corpus folder and what went wrong. */
export interface Finding {
  file: string;
  reason: string;
}

/** Outcome of one run. */
export interface FuzzResult {
  target: string;
  corpusEntries: number;
  generatedInputs: number;
  seed: number;
  finding?: Finding;
}

/** The corpus folder of the checkout, from dist/test/fuzz or test/fuzz. */
export const CORPUS_ROOT = path.resolve(__dirname, __dirname.includes(`${path.sep}dist${path.sep}`) ? "../../../test/fuzz/corpus" : "corpus");

const DEFAULT_MAX_BYTES = 16 << 10;
/** Runs of a slow input: it is a finding only when every run exceeds the bound, so that one GC pause is not. */
const SLOW_INPUT_RUNS = 3;

/** Replays the corpus of `target`, then fuzzes it; stops at the first finding. */
export async function fuzzTarget(target: FuzzTarget, options: FuzzOptions): Promise<FuzzResult> {
  const corpusDir = path.join(options.corpusRoot ?? CORPUS_ROOT, target.name);
  const maxBytes = target.maxBytes ?? DEFAULT_MAX_BYTES;
  const seed = options.seed ?? crypto.randomInt(2 ** 31);
  const entries = readCorpus(corpusDir);
  const watchdog = startWatchdog(target.name, corpusDir, Math.max(maxBytes, ...entries.map((entry) => entry.bytes.length)), options.hangMs ?? 5_000);
  const check = (input: Buffer): Promise<string | undefined> => checkInput(target, input, target.inputMs ?? options.inputMs ?? 100, watchdog);
  try {
    for (const entry of entries) {
      const reason = await check(entry.bytes);
      if (reason !== undefined) return { target: target.name, corpusEntries: entries.length, generatedInputs: 0, seed, finding: { file: entry.file, reason } };
    }

    const tokens = (target.tokens ?? []).map((token) => Buffer.from(token, "utf8"));
    const inputs = fc.oneof(mutatedInputs(entries.map((entry) => entry.bytes), tokens, maxBytes), fc.uint8Array({ maxLength: 256 }).map((bytes) => Buffer.from(bytes)), ...(target.arbitraries ?? []));
    let generated = 0;
    let lastReason: string | undefined;
    const property = fc.asyncProperty(inputs, async (input) => {
      generated += 1;
      const reason = await check(input);
      if (reason !== undefined) lastReason = reason;
      return reason === undefined;
    });
    const result = await fc.check(property, {
      seed,
      numRuns: options.maxRuns ?? Number.MAX_SAFE_INTEGER,
      interruptAfterTimeLimit: options.seconds * 1000,
      markInterruptAsFailure: false,
    });
    const finding = result.failed && result.counterexample ? await recordFinding(corpusDir, result.counterexample[0], check, lastReason) : undefined;
    return { target: target.name, corpusEntries: entries.length, generatedInputs: generated, seed, ...(finding && { finding }) };
  } finally {
    await watchdog.stop();
  }
}

/** Returns why the input is a finding, or undefined when the target handled it. */
async function checkInput(target: FuzzTarget, input: Buffer, inputMs: number, watchdog: Watchdog): Promise<string | undefined> {
  let fastest = Infinity;
  for (let run = 0; run < SLOW_INPUT_RUNS && fastest > inputMs; run += 1) {
    watchdog.started(input);
    const start = performance.now();
    try {
      await target.run(input);
    } catch (error) {
      if (!target.expected(error)) return `threw ${describeError(error)}`;
    } finally {
      watchdog.finished();
    }
    fastest = Math.min(fastest, performance.now() - start);
  }
  return fastest > inputMs ? `took ${fastest.toFixed(0)} ms in each of ${SLOW_INPUT_RUNS} runs, more than the ${inputMs} ms bound` : undefined;
}

function describeError(error: unknown): string {
  if (!(error instanceof Error)) return `a non-Error value ${String(error)}`;
  const frames = (error.stack ?? "").split("\n").filter((line) => line.trimStart().startsWith("at ")).slice(0, 3);
  return [`${error.name}: ${error.message}`, ...frames.map((frame) => `  ${frame.trim()}`)].join("\n");
}

async function recordFinding(corpusDir: string, input: Buffer, check: (input: Buffer) => Promise<string | undefined>, lastReason: string | undefined): Promise<Finding> {
  const reason = (await check(input)) ?? lastReason ?? "failed once and passed when run again";
  const file = path.join(corpusDir, `finding-${crypto.createHash("sha256").update(input).digest("hex").slice(0, 16)}`);
  fs.mkdirSync(corpusDir, { recursive: true });
  fs.writeFileSync(file, input);
  return { file, reason };
}

function readCorpus(corpusDir: string): { file: string; bytes: Buffer }[] {
  if (!fs.existsSync(corpusDir)) return [];
  return fs
    .readdirSync(corpusDir)
    .sort()
    .map((name) => path.join(corpusDir, name))
    .filter((file) => fs.statSync(file).isFile())
    .map((file) => ({ file, bytes: fs.readFileSync(file) }));
}

/** Formats a result as the lines that the command and the unit test print. */
export function formatResult(result: FuzzResult): string {
  const summary = `${result.target}: ${result.corpusEntries} corpus entries, ${result.generatedInputs} generated inputs (seed ${result.seed})`;
  if (result.finding === undefined) return `${summary}, no finding`;
  return `${summary}\nFINDING in ${result.finding.file}: the input ${result.finding.reason}`;
}
