// Runs the TypeScript fuzz targets: `node dist/test/fuzz/fuzz.js [--seconds N] [--seed N] [TARGET...]`.
// Each target replays its corpus, then fuzzes for N seconds (60 by default). Exits 1 after the
// first target with a finding, whose input is written to test/fuzz/corpus/<target>/finding-*.

import { parseArgs } from "node:util";
import { formatResult, fuzzTarget } from "./runner";
import { FUZZ_TARGETS } from "./targets";

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    options: { seconds: { type: "string", default: "60" }, seed: { type: "string" } },
    allowPositionals: true,
  });
  const seconds = Number(values.seconds);
  if (!(seconds > 0)) throw new Error(`invalid --seconds ${JSON.stringify(values.seconds)}: expected a number of seconds above 0, for example 60`);
  const seed = values.seed === undefined ? undefined : Number(values.seed);
  if (seed !== undefined && !Number.isSafeInteger(seed)) throw new Error(`invalid --seed ${JSON.stringify(values.seed)}: expected an integer`);
  const unknown = positionals.filter((name) => !FUZZ_TARGETS.some((target) => target.name === name));
  if (unknown.length > 0) throw new Error(`unknown fuzz target ${unknown.join(", ")}: the targets are ${FUZZ_TARGETS.map((target) => target.name).join(", ")}`);

  const targets = positionals.length === 0 ? FUZZ_TARGETS : FUZZ_TARGETS.filter((target) => positionals.includes(target.name));
  for (const target of targets) {
    const result = await fuzzTarget(target, { seconds, ...(seed !== undefined && { seed }) });
    console.log(formatResult(result));
    if (result.finding !== undefined) return 1;
  }
  return 0;
}

main().then(
  (status) => process.exit(status),
  (error: Error) => {
    console.error(`fuzz: ${error.message}`);
    process.exit(2);
  },
);
