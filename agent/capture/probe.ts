// Kernel feature probing and the choice of capture mode. Every hook eBPF capture needs is probed by
// using it (creating the map, loading the program, linking it to a throwaway cgroup or network
// namespace), not by comparing kernel versions, because distributions backport features.
import fs from "node:fs";
import path from "node:path";

import { loadNative } from "./native";
import { captureProbeFeatures } from "./ebpf/native-bpf";

export type CaptureMode = "ebpf" | "nftables";
/** The value of --capture: a mode, or "auto" to take eBPF when every hook works and nftables otherwise. */
export type RequestedCaptureMode = CaptureMode | "auto";

export const CAPTURE_MODES: readonly RequestedCaptureMode[] = ["auto", "ebpf", "nftables"];

/** The outcome of probing one feature; `error` is the kernel's or the library's message when it failed. */
export interface FeatureProbe {
  feature: string;
  ok: boolean;
  error?: string;
}

export interface ProbeOptions {
  pinRoot: string;
  cgroupPath: string;
  objectPath: string;
}

/** The mode capture runs in, and why. */
export interface CaptureSelection {
  requested: RequestedCaptureMode;
  mode: CaptureMode;
  /** For auto: the first missing feature, or "all hooks present". For an explicit mode: that it was requested. */
  reason: string;
  /** The probed features; empty when --capture nftables skipped probing. */
  features: FeatureProbe[];
  /** The features eBPF capture needs that failed. */
  missing: FeatureProbe[];
}

/** Features the native probe reports, in its order; used to list them as not probed when a prerequisite is missing. */
export const NATIVE_FEATURES = [
  "map:lru_hash",
  "map:sk_storage",
  "map:sockhash",
  "cgroup/connect4",
  "cgroup/connect6",
  "cgroup/getpeername4",
  "cgroup/getpeername6",
  "sockops",
  "cgroup/bind4",
  "cgroup/bind6",
  "sk_lookup",
  "link:cgroup",
  "link:netns",
] as const;

/** Features that depend on how the host is set up rather than on the kernel. */
export const HOST_SETUP_FEATURES = ["bpffs", "cgroup2", "object"] as const;

/** Returns whether a probe names host set-up (a mount or a file) rather than a kernel hook. */
export function isHostSetupFeature(feature: string): boolean {
  return (HOST_SETUP_FEATURES as readonly string[]).includes(feature);
}

/** statfs(2) f_type values, from linux/magic.h. */
const BPF_FS_MAGIC = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC = 0x63677270;

/** Returns an error for an unknown --capture value, or the mode. */
export function parseCaptureMode(value: string | undefined): RequestedCaptureMode {
  if (value === undefined) return "auto";
  if ((CAPTURE_MODES as readonly string[]).includes(value)) return value as RequestedCaptureMode;
  throw new Error(`invalid --capture "${value}": use ${CAPTURE_MODES.join(", ")}`);
}

/**
 * Probes every feature eBPF capture needs on this host: bpffs for the pins, cgroup v2, the object
 * file, then through the native library each map type, program and link. Needs root; without it
 * every kernel probe fails with EPERM.
 */
export function probeCaptureFeatures(options: ProbeOptions): FeatureProbe[] {
  const host = [
    probeFilesystem("bpffs", nearestExistingDirectory(options.pinRoot), BPF_FS_MAGIC, `no bpffs at ${nearestExistingDirectory(options.pinRoot)}, which would contain ${options.pinRoot}`),
    probeFilesystem("cgroup2", options.cgroupPath, CGROUP2_SUPER_MAGIC, `${options.cgroupPath} is not a cgroup v2 directory`),
    fs.existsSync(options.objectPath) ? { feature: "object", ok: true } : { feature: "object", ok: false, error: `eBPF object ${options.objectPath} not found` },
  ];
  const blocker = host.find((probe) => !probe.ok);
  if (blocker) return [...host, ...NATIVE_FEATURES.map((feature) => ({ feature, ok: false, error: `not probed: ${blocker.error}` }))];

  try {
    loadNative();
    const lines = captureProbeFeatures(options.objectPath, options.cgroupPath);
    return [...host, ...lines.map((line) => (line.errno === 0 ? { feature: line.feature, ok: true } : { feature: line.feature, ok: false, error: line.detail }))];
  } catch (error) {
    return [...host, ...NATIVE_FEATURES.map((feature) => ({ feature, ok: false, error: `not probed: ${(error as Error).message}` }))];
  }
}

/**
 * Chooses the capture mode from the request and the probe. auto takes eBPF only when every probed
 * feature works. An explicit mode is always taken: the caller must refuse to start eBPF capture
 * while `missing` is not empty.
 */
export function selectCaptureMode(requested: RequestedCaptureMode, features: FeatureProbe[]): CaptureSelection {
  const missing = features.filter((probe) => !probe.ok);
  if (requested === "nftables") return { requested, mode: "nftables", reason: "requested with --capture nftables", features, missing };
  if (requested === "ebpf") return { requested, mode: "ebpf", reason: "requested with --capture ebpf", features, missing };
  if (features.length === 0) {
    return { requested, mode: "nftables", reason: "no eBPF feature was probed", features, missing };
  }
  // A missing bpffs mount, cgroup v2 path or object file is a set-up mistake, not a kernel limit:
  // auto stays with eBPF, and the host check names what to fix, rather than quietly choosing the
  // weaker mode.
  const setup = missing.find((probe) => isHostSetupFeature(probe.feature));
  if (setup) return { requested, mode: "ebpf", reason: `host set-up incomplete: ${setup.error ?? setup.feature}`, features, missing };
  if (missing.length === 0) return { requested, mode: "ebpf", reason: "all hooks present", features, missing };
  const first = missing[0];
  return { requested, mode: "nftables", reason: `${first.feature} unavailable: ${first.error ?? "unknown error"}`, features, missing };
}

function probeFilesystem(feature: string, target: string, magic: number, error: string): FeatureProbe {
  try {
    if (fs.statfsSync(target).type === magic) return { feature, ok: true };
  } catch {
    // Reported below: a path that cannot be read is not the filesystem either.
  }
  return { feature, ok: false, error };
}

function nearestExistingDirectory(directory: string): string {
  let current = path.resolve(directory);
  while (!fs.existsSync(current) && path.dirname(current) !== current) {
    current = path.dirname(current);
  }
  return current;
}
