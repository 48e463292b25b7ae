// Two network namespaces joined by a veth pair, for the capture end-to-end test. Names carry
// the test's prefix and PID, so a re-run after a crash can find and delete its leftovers.
import { execFileSync } from "node:child_process";
import fs from "node:fs";

export interface NetnsEnd {
  name: string;
  path: string;
  ip: string;
}

export interface NetnsPair {
  a: NetnsEnd;
  b: NetnsEnd;
  destroy(): void;
}

function ip(args: string[]): void {
  execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
}

/** Creates <prefix>-<pid>-a and -b with 10.<subnet>.0.1/24 and .2/24 on a veth between them. */
export function createNetnsPair(prefix: string, subnet: number): NetnsPair {
  const base = `${prefix}-${process.pid}`;
  const a: NetnsEnd = { name: `${base}-a`, path: `/var/run/netns/${base}-a`, ip: `10.${subnet}.0.1` };
  const b: NetnsEnd = { name: `${base}-b`, path: `/var/run/netns/${base}-b`, ip: `10.${subnet}.0.2` };
  const pair: NetnsPair = { a, b, destroy: () => deleteNetns([a.name, b.name]) };
  try {
    for (const end of [a, b]) {
      ip(["netns", "add", end.name]);
      ip(["-n", end.name, "link", "set", "lo", "up"]);
    }
    // Interface names are limited to 15 characters.
    ip(["link", "add", "vcap-a", "netns", a.name, "type", "veth", "peer", "name", "vcap-b", "netns", b.name]);
    for (const [end, device] of [[a, "vcap-a"], [b, "vcap-b"]] as const) {
      ip(["-n", end.name, "addr", "add", `${end.ip}/24`, "dev", device]);
      ip(["-n", end.name, "link", "set", device, "up"]);
    }
  } catch (error) {
    pair.destroy();
    throw error;
  }
  return pair;
}

/** Deletes the named namespaces; the veth pair goes with them. Missing ones are ignored. */
export function deleteNetns(names: string[]): void {
  for (const name of names) {
    if (!fs.existsSync(`/var/run/netns/${name}`)) continue;
    ip(["netns", "del", name]);
  }
}

/** Deletes namespaces named <prefix>-<pid>-* whose PID no longer runs: leftovers of a crashed run. */
export function deleteStaleNetns(prefix: string): void {
  const pattern = new RegExp(`^${prefix}-(\\d+)-`);
  let names: string[] = [];
  try {
    names = fs.readdirSync("/var/run/netns");
  } catch {
    return;
  }
  const stale = names.filter((name) => {
    const match = pattern.exec(name);
    return match !== null && !fs.existsSync(`/proc/${match[1]}`);
  });
  deleteNetns(stale);
}
