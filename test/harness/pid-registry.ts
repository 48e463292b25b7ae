// Records the PIDs of the processes a test run starts, in a file named after the run's prefix, so a
// later run can end what a crashed run (for example one killed by ava's timeout) left running.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const REGISTRY_DIRECTORY = path.join(os.tmpdir(), "ambient-agent-test-pids");

function registryFile(prefix: string): string {
  return path.join(REGISTRY_DIRECTORY, `${prefix}.pids`);
}

/** Records that the run with `prefix` started `pid`. */
export function registerPid(prefix: string, pid: number | undefined): void {
  if (!pid) return;
  fs.mkdirSync(REGISTRY_DIRECTORY, { recursive: true });
  fs.appendFileSync(registryFile(prefix), `${pid}\n`);
}

/** Forgets the run with `prefix`, once it ended its processes itself. */
export function forgetRun(prefix: string): void {
  fs.rmSync(registryFile(prefix), { force: true });
}

/**
 * Tells whether `name` (a run prefix, or a namespace or pin named after one) belongs to another
 * test process that still runs. A run's prefix is its family followed by the PID of its test
 * process, so two runs of one file at once leave each other alone.
 */
export function ownedByLiveRun(name: string, prefixFamily: string): boolean {
  const owner = Number(/^\d+/.exec(name.slice(prefixFamily.length))?.[0] ?? NaN);
  if (!Number.isInteger(owner) || owner <= 0 || owner === process.pid) return false;
  try {
    process.kill(owner, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Ends the processes recorded by earlier runs whose prefix starts with `prefixFamily`, unless their
 * test process still runs. A PID is ended
 * only while its command line still names the run's prefix, so a reused PID is left alone.
 */
export function endLeftoverProcesses(prefixFamily: string): void {
  if (!fs.existsSync(REGISTRY_DIRECTORY)) return;
  for (const name of fs.readdirSync(REGISTRY_DIRECTORY)) {
    if (!name.startsWith(prefixFamily) || !name.endsWith(".pids")) continue;
    const prefix = name.slice(0, -".pids".length);
    if (ownedByLiveRun(prefix, prefixFamily)) continue;
    for (const pid of fs.readFileSync(path.join(REGISTRY_DIRECTORY, name), "utf8").split(/\s+/).filter(Boolean).map(Number)) {
      try {
        if (fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(prefix)) process.kill(pid, "SIGKILL");
      } catch {
        // The process is gone already.
      }
    }
    forgetRun(prefix);
  }
}
