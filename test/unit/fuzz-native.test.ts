// Each libFuzzer harness of the CNI plugin for a few seconds: its corpus, then mutations. The
// harnesses are built by `make fuzz-native`, which `make test` and `make test-unit` run first.

import test from "ava";
import { spawnSync } from "node:child_process";
import path from "node:path";

const RUN_SCRIPT = path.resolve(__dirname, "../../../test/fuzz/native/run.sh");
const SECONDS_PER_HARNESS = 4;

for (const harness of ["json-scan", "cni-reply"]) {
  test(`libFuzzer ${harness}`, (t) => {
    const result = spawnSync(RUN_SCRIPT, [harness, String(SECONDS_PER_HARNESS)], { encoding: "utf8", timeout: 60_000 });
    t.log(result.stdout.trim());
    t.is(result.status, 0, `${RUN_SCRIPT} ${harness} failed:\n${result.stderr}${result.error ? String(result.error) : ""}`);
  });
}
