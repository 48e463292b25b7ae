// Each TypeScript fuzz target for a short time: its corpus (the regression seeds of earlier
// findings among them), then generated inputs. `make fuzz` runs the same targets longer.

import test from "ava";
import { formatResult, fuzzTarget } from "../fuzz/runner";
import { FUZZ_TARGETS } from "../fuzz/targets";

/** All targets together stay within about 35 s; they run one after another, because each needs the event loop for its budget. */
const SECONDS_PER_TARGET = 35 / FUZZ_TARGETS.length;

for (const target of FUZZ_TARGETS) {
  test.serial(`fuzz ${target.name}`, async (t) => {
    const result = await fuzzTarget(target, { seconds: SECONDS_PER_TARGET });
    t.log(formatResult(result));
    t.is(result.finding, undefined, formatResult(result));
    t.true(result.corpusEntries > 0, `test/fuzz/corpus/${target.name} has no seed`);
    t.true(result.generatedInputs > 0, "no input was generated");
  });
}
