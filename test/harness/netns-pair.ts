// Two network namespaces joined by a veth pair, for the capture end-to-end test. Names carry
// the test's prefix and PID, so a re-run after a crash can find and delete its leftovers.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { Capture } from "../../agent/capture/ebpf/capture";
import { netnsCookie } from "../../agent/capture/native";
import { silentLogger } from "../../agent/log";

export interface NetnsEnd {
  name: string;
  path: string;
  ip: string;
  /** A unique local IPv6 address (fd00::/8), added with nodad so it is usable at once. */
  ip6: string;
  /** The end's veth interface. */
  device: string;
}

export interface NetnsPair {
  a: NetnsEnd;
  b: NetnsEnd;
  destroy(): void;
}

function ip(args: string[]): void {
  execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
}

/**
 * Creates <prefix>-<pid>-a and -b with 10.<subnet>.0.1/24 and .2/24, and fd00:aa:<subnet>::1/64
 * and ::2/64, on a veth between them. Each veth also gets an fe80::/64 link-local address, which
 * is usable only once duplicate address detection ends (see linkLocalAddress).
 */
export function createNetnsPair(prefix: string, subnet: number): NetnsPair {
  const base = `${prefix}-${process.pid}`;
  // Interface names are limited to 15 characters.
  const a: NetnsEnd = {
    name: `${base}-a`,
    path: `/var/run/netns/${base}-a`,
    ip: `10.${subnet}.0.1`,
    ip6: `fd00:aa:${subnet}::1`,
    device: "vcap-a",
  };
  const b: NetnsEnd = {
    name: `${base}-b`,
    path: `/var/run/netns/${base}-b`,
    ip: `10.${subnet}.0.2`,
    ip6: `fd00:aa:${subnet}::2`,
    device: "vcap-b",
  };
  const pair: NetnsPair = { a, b, destroy: () => deleteNetns([a.name, b.name]) };
  try {
    for (const end of [a, b]) {
      ip(["netns", "add", end.name]);
      ip(["-n", end.name, "link", "set", "lo", "up"]);
    }
    ip(["link", "add", a.device, "netns", a.name, "type", "veth", "peer", "name", b.device, "netns", b.name]);
    for (const end of [a, b]) {
      ip(["-n", end.name, "addr", "add", `${end.ip}/24`, "dev", end.device]);
      ip(["-n", end.name, "-6", "addr", "add", `${end.ip6}/64`, "dev", end.device, "nodad"]);
      ip(["-n", end.name, "link", "set", end.device, "up"]);
    }
  } catch (error) {
    pair.destroy();
    throw error;
  }
  return pair;
}

/**
 * Returns the fe80:: address of the end's veth once duplicate address detection has finished
 * with it (about 1-2 s after the link comes up). A client on the other end dials it as
 * <address>%<its own device>. Throws after timeoutMs.
 */
export async function linkLocalAddress(end: NetnsEnd, timeoutMs = 5000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const output = execFileSync("ip", ["-n", end.name, "-6", "-o", "addr", "show", "dev", end.device, "scope", "link"], {
      encoding: "utf8",
    });
    const match = /inet6 (fe80:[0-9a-f:]+)\/64 scope link(.*)$/m.exec(output);
    if (match && !/tentative|dadfailed/.test(match[2])) return match[1];
    if (Date.now() > deadline) {
      throw new Error(`no usable link-local address on ${end.device} in ${end.name} within ${timeoutMs} ms: ${output.trim()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
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

/** Where the capture tests find bpffs, the cgroup v2 root, their pin roots and the prebuilt object. */
export const BPFFS = "/sys/fs/bpf";
export const CGROUP_ROOT = "/sys/fs/cgroup/unified";
export const PIN_PARENT = path.join(BPFFS, "ambient-agent");
export const OBJECT_PATH = path.resolve(__dirname, "../../../bpf/capture.bpf.o");

/** Removes PIN_PARENT, the shared parent of the test pin roots, unless another run still has one in it. */
export function removePinParentIfEmpty(): void {
  try {
    fs.rmdirSync(PIN_PARENT);
  } catch {
    // Not empty (another run uses it), or already gone.
  }
}

/** Throws, naming what is missing, unless this process is root with bpffs and cgroup v2 mounted. */
export function assertCaptureHost(bpffs: string, cgroupRoot: string): void {
  if (process.getuid?.() !== 0) throw new Error("the capture tests must run as root");
  if (fs.statfsSync(bpffs).type !== 0xcafe4a11) throw new Error(`no bpffs mounted at ${bpffs}: mount -t bpf bpf ${bpffs}`);
  if (fs.statfsSync(cgroupRoot).type !== 0x63677270) throw new Error(`no cgroup v2 mounted at ${cgroupRoot}`);
}

/** Removes namespaces and pin roots (under pinParent) named `<prefix>-<pid>` whose process is gone. */
export function removeStaleCaptureState(prefix: string, pinParent: string): void {
  deleteStaleNetns(prefix);
  if (!fs.existsSync(pinParent)) return;
  for (const name of fs.readdirSync(pinParent)) {
    const match = new RegExp(`^${prefix}-(\\d+)$`).exec(name);
    if (match && !fs.existsSync(`/proc/${match[1]}`)) Capture.remove(path.join(pinParent, name));
  }
}

/** A namespace pair with capture attached and namespace A enrolled, plus what the test starts on it. */
export interface EnrolledPair<Extra> {
  pair: NetnsPair;
  capture: Capture;
  cookieA: bigint;
  extra: Extra;
}

/**
 * Creates the namespace pair <prefix>-<pid>-a/-b on 10.<subnet>.0.0/24, attaches capture pinned at
 * `pinRoot`, enrolls namespace A, then runs `start` (the test's servers). On any failure it removes
 * all of that again before rethrowing, so a failed set-up leaves nothing behind.
 */
export async function createEnrolledPair<Extra>(
  prefix: string,
  subnet: number,
  pinRoot: string,
  start: (pair: NetnsPair, capture: Capture, cookieA: bigint) => Promise<Extra>,
): Promise<EnrolledPair<Extra>> {
  assertCaptureHost(BPFFS, CGROUP_ROOT);
  removeStaleCaptureState(prefix, PIN_PARENT);
  const pair = createNetnsPair(prefix, subnet);
  let capture: Capture | undefined;
  try {
    capture = Capture.attach({ pinRoot, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger());
    const cookieA = netnsCookie(pair.a.path);
    capture.enroll(cookieA, pair.a.ip);
    return { pair, capture, cookieA, extra: await start(pair, capture, cookieA) };
  } catch (error) {
    capture?.close();
    Capture.remove(pinRoot);
    pair.destroy();
    throw error;
  }
}
