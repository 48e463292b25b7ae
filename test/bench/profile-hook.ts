// Preloaded into an agent with `node --require` (through NODE_OPTIONS, which rejects --cpu-prof on
// Node 20): starts the V8 CPU profiler in the process and writes the profile into
// $AMBIENT_BENCH_PROFILE_DIR/agent-<pid>.cpuprofile when the process exits.

import fs from "node:fs";
import inspector from "node:inspector";
import path from "node:path";

const directory = process.env.AMBIENT_BENCH_PROFILE_DIR;
if (directory) {
  const session = new inspector.Session();
  session.connect();
  session.post("Profiler.enable");
  session.post("Profiler.start");
  // An in-process session runs its callbacks synchronously, so the profile is written before the exit.
  process.on("exit", () => {
    session.post("Profiler.stop", (error, result) => {
      if (error) {
        process.stderr.write(`CPU profile of process ${process.pid} failed: ${error.message}\n`);
        return;
      }
      fs.writeFileSync(path.join(directory, `agent-${process.pid}.cpuprofile`), JSON.stringify(result.profile));
    });
  });
}
