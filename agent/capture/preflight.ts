// Host checks before capture starts. Each problem states what is wrong and how to fix it.
// Kernel features are probed by using them (a socket option, loading the object), not by
// comparing kernel versions, because distributions backport features.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

import { missingRequiredCapabilities, readEffectiveCapabilities } from "./capabilities";
import { libnftablesAvailable, loadNative, netnsCookie } from "./native";
import { captureProbe } from "./ebpf/native-bpf";
import { nftBinary } from "./nft/capture";

export interface HostProblem {
  what: string;
  fix: string;
}

/** The problems found before start, each with what is missing and how to fix it. */
export class HostNotReadyError extends Error {
  constructor(readonly problems: HostProblem[]) {
    super("this host cannot run the agent:\n" + problems.map((problem) => `  - ${problem.what}: ${problem.fix}`).join("\n"));
    this.name = "HostNotReadyError";
  }
}

export interface HostCheckOptions {
  pinRoot: string;
  cgroupPath: string;
  objectPath: string;
  /** The capture mode chosen; nftables needs neither bpffs, cgroup v2 nor the eBPF object, but the nft tool. Default ebpf. */
  capture?: "ebpf" | "nftables";
  /** The host's procfs as mounted where the agent runs (--host-proc); not checked when absent. */
  hostProc?: string;
}

/** statfs(2) f_type values, from linux/magic.h. */
const BPF_FS_MAGIC = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC = 0x63677270;
const PROC_SUPER_MAGIC = 0x9fa0;

/** Returns every problem found; an empty list means capture can start. */
export function checkHost(options: HostCheckOptions): HostProblem[] {
  const problems: HostProblem[] = [];
  const uid = process.getuid?.();
  if (uid !== 0) {
    problems.push({
      what: `the agent runs as uid ${uid ?? "unknown"}, not root`,
      fix: "run the agent as root (a privileged container) so that it can load eBPF programs and enter network namespaces",
    });
  }
  if (options.hostProc !== undefined && filesystemType(options.hostProc) !== PROC_SUPER_MAGIC) {
    problems.push({
      what: `${options.hostProc} is not a procfs mount`,
      fix: "set the host proc folder to a procfs mount: /proc, or in a pod the host's /proc mounted into the container as a hostPath volume (for example at /host/proc)",
    });
  }
  if (options.capture === "nftables") {
    problems.push(...checkNftables());
    return problems;
  }
  problems.push(...checkFilesystems(options));
  problems.push(...checkKernel(options, problems.length === 0));
  return problems;
}

/**
 * nftables capture writes each pod's table through libnftables (libnftables.so.1) from a thread
 * inside the pod's namespace, or, when that library is missing, runs `nsenter ... nft -f -`.
 */
/**
 * Lists the capabilities a root agent lacks, as host problems. Without CAP_SYS_ADMIN or CAP_NET_ADMIN it would start and
 * then fail every pod one by one (setns, SO_MARK, routes), so it rejects the start instead, before
 * the capture probe, whose errors would name only the first operation that failed. Empty for a
 * non-root process, which checkHost reports.
 */
export function capabilityProblems(): HostProblem[] {
  const capabilities = readEffectiveCapabilities();
  if (capabilities === undefined || process.getuid?.() !== 0) return [];
  return missingRequiredCapabilities(capabilities).map((name) => ({
    what: `the agent runs without ${name}`,
    fix: `grant ${name}: CAP_SYS_ADMIN enters pods' network namespaces and loads eBPF programs, CAP_NET_ADMIN attaches them and sets socket marks, routes and nftables in pods' namespaces (the Helm chart grants both; a container needs securityContext.capabilities.add)`,
  }));
}

function checkNftables(): HostProblem[] {
  const problems: HostProblem[] = [];
  try {
    loadNative();
    if (libnftablesAvailable()) return problems;
  } catch {
    // The library failing to load is reported by the tool checks below and at first use.
  }
  for (const tool of [nftBinary(), "nsenter"]) {
    const result = spawnSync(tool, ["--version"], { stdio: "ignore" });
    if (result.error) {
      problems.push({
        what: `${tool} is not installed or not on PATH (${result.error.message})`,
        fix: tool === "nsenter" ? "install util-linux, which provides nsenter" : "install the nftables package (libnftables1 or nft), or run with --capture ebpf",
      });
    }
  }
  return problems;
}

function checkFilesystems(options: HostCheckOptions): HostProblem[] {
  const problems: HostProblem[] = [];
  const pinMount = nearestExistingDirectory(options.pinRoot);
  if (filesystemType(pinMount) !== BPF_FS_MAGIC) {
    problems.push({
      what: `no bpffs at ${pinMount}, which would hold the pin root ${options.pinRoot}`,
      fix: "mount bpffs there (mount -t bpf bpf /sys/fs/bpf) or set the pin root to a directory under a bpffs mount",
    });
  }
  if (!isCgroup2Directory(options.cgroupPath)) {
    problems.push({
      what: `${options.cgroupPath} is not a cgroup v2 directory`,
      fix: "point --cgroup at the host's cgroup v2 mount, or at a folder whose unified subfolder is one, as on hybrid cgroup hosts (in the Helm chart, hostPaths.cgroup). On nodes with cgroup v1 only, run with --capture nftables (in the Helm chart, capture.mode: nftables)",
    });
  }
  if (!fs.existsSync(options.objectPath)) {
    problems.push({
      what: `eBPF object ${options.objectPath} not found`,
      fix: "build it with `make bpf` or point the object path at bpf/capture.bpf.o",
    });
  }
  return problems;
}

/** Probes the kernel through the native library; skipped when an earlier problem would make every probe fail. */
function checkKernel(options: HostCheckOptions, hostReady: boolean): HostProblem[] {
  try {
    loadNative();
  } catch (error) {
    return [{ what: (error as Error).message, fix: "build native/libagent.so (make native)" }];
  }
  if (!hostReady) return [];

  const problems: HostProblem[] = [];
  try {
    netnsCookie("/proc/self/ns/net");
  } catch (error) {
    problems.push({
      what: `SO_NETNS_COOKIE is unusable: ${(error as Error).message}`,
      fix: "run on a kernel with SO_NETNS_COOKIE (Linux 5.14 or later, or a backport)",
    });
  }
  try {
    captureProbe(options.objectPath);
  } catch (error) {
    problems.push({
      what: `the kernel rejected the capture programs: ${(error as Error).message}`,
      fix: "run on a kernel with cgroup sock_addr and sockops programs, socket storage and bpf_get_netns_cookie in both (Linux 5.15 or later)",
    });
  }
  return problems;
}

/** Tells whether `directory` is on a cgroup v2 filesystem. A folder that cannot be read is not. */
export function isCgroup2Directory(directory: string): boolean {
  return filesystemType(directory) === CGROUP2_SUPER_MAGIC;
}

function nearestExistingDirectory(directory: string): string {
  let current = path.resolve(directory);
  while (!fs.existsSync(current) && path.dirname(current) !== current) {
    current = path.dirname(current);
  }
  return current;
}

function filesystemType(target: string): number | undefined {
  try {
    return fs.statfsSync(target).type;
  } catch {
    return undefined;
  }
}
