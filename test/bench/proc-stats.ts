// CPU time and resident memory of a process, read from /proc.

import { execFileSync } from "node:child_process";
import fs from "node:fs";

let clockTicksPerSecond: number | undefined;

/** Returns the kernel's clock ticks per second (`getconf CLK_TCK`), the unit of utime and stime. */
function clockTicks(): number {
  if (clockTicksPerSecond === undefined) {
    const value = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim());
    if (!(value > 0)) throw new Error(`getconf CLK_TCK returned ${value}: cannot convert CPU ticks to seconds`);
    clockTicksPerSecond = value;
  }
  return clockTicksPerSecond;
}

/** Returns the user plus system CPU seconds that process `pid` (all its threads) has used so far. */
export function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  // The command name (field 2) may contain spaces and parentheses: the fields after it start past the last ")".
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // fields[0] is field 3 (state), so utime (field 14) and stime (field 15) are at 11 and 12.
  const ticks = Number(fields[11]) + Number(fields[12]);
  return ticks / clockTicks();
}

/** Returns the resident set size of process `pid` in KiB (VmRSS). */
export function rssKib(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  const match = /^VmRSS:\s+(\d+) kB$/m.exec(status);
  if (!match) throw new Error(`/proc/${pid}/status has no VmRSS line: is process ${pid} still running?`);
  return Number(match[1]);
}

/** Checks that `pid` runs `marker` (a path on its command line), so the figures belong to the right process. */
export function assertProcessRuns(pid: number, marker: string): void {
  const commandLine = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ");
  if (!commandLine.includes(marker)) {
    throw new Error(`process ${pid} runs "${commandLine.trim()}", not ${marker}: the harness no longer execs the agent in place of nsenter`);
  }
}
