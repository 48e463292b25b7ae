import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { AGENT_NODE_FLAGS, runsWithAgentFlags } from "../../agent/cli/node-flags";

const SOURCE = path.resolve(__dirname, "..", "..", "..", "agent", "cli", "ambient-agent.ts");

test("the agent script's shebang passes every agent flag", (t) => {
  const shebang = fs.readFileSync(SOURCE, "utf8").split("\n")[0];
  t.is(shebang, `#!/usr/bin/env -S node ${AGENT_NODE_FLAGS.join(" ")}`);
});

test("flags are checked against the process arguments", (t) => {
  t.true(runsWithAgentFlags([...AGENT_NODE_FLAGS, "--inspect"]));
  t.false(runsWithAgentFlags(AGENT_NODE_FLAGS.slice(1)));
  t.false(runsWithAgentFlags([]));
});
