// Bindings to the eBPF half of native/libagent.so: loading and attaching the capture object,
// pinned maps, sk_lookup test runs and the kernel feature probe. Sockets and namespaces are in
// native.ts, which also loads the library.
import os from "node:os";

import { DataType } from "ffi-rs";

import { ipBytes } from "../ip-bytes";
import { call, check } from "../native";

/**
 * Loads the object with maps pinned under pinRoot and attaches or updates every program's pinned
 * link. Returns the program count.
 */
export function captureAttach(objectPath: string, pinRoot: string, cgroupPath: string): number {
  const result = call(
    "aa_capture_attach",
    [DataType.String, DataType.String, DataType.String],
    [objectPath, pinRoot, cgroupPath],
  );
  return check(
    result,
    `attaching eBPF capture ${objectPath} to cgroup ${cgroupPath} with pins under ${pinRoot}`,
    "Check that bpffs is mounted at the pin root, that the cgroup is a cgroup v2 directory, and that the agent runs as root. " +
      "If a map layout changed, remove the old pins (agentctl capture remove) and attach again.",
  );
}

/**
 * Links the sk_lookup program pinned at programPinPath to a network namespace and pins the
 * link at linkPinPath. Returns false when it created the link, true when a link was already
 * pinned there (it is left as it is).
 */
export function netnsLink(programPinPath: string, netnsPath: string, linkPinPath: string): boolean {
  const result = call(
    "aa_netns_link",
    [DataType.String, DataType.String, DataType.String],
    [programPinPath, netnsPath, linkPinPath],
  );
  check(
    result,
    `linking sk_lookup program ${programPinPath} to network namespace ${netnsPath}`,
    "Attach capture first, so that the program is pinned; then check that the network namespace exists " +
      "and that the agent runs as root.",
  );
  return result === 1;
}

/** Loads the object and unloads it again: throws when this kernel rejects a program. */
export function captureProbe(objectPath: string): void {
  const result = call("aa_capture_probe", [DataType.String], [objectPath]);
  check(
    result,
    `loading eBPF object ${objectPath}`,
    "If the object is missing or not an eBPF object, rebuild bpf/capture.bpf.o (make bpf); " +
      "otherwise the kernel lacks a program type or helper that capture needs.",
  );
}

export function mapOpen(pinPath: string): number {
  const result = call("aa_map_open", [DataType.String], [pinPath]);
  return check(result, `opening pinned map ${pinPath}`, "Attach capture first, so that the map is pinned.");
}

const MAP_FIX = "The map may be full or the key layout may not match the loaded object.";

/** Inserts or replaces a key. `what` and `fix` replace the generic wording of the error message. */
export function mapUpdate(mapFd: number, key: Buffer, value: Buffer, what = "map update", fix = MAP_FIX): void {
  check(call("aa_map_update", [DataType.I32, DataType.U8Array, DataType.U8Array], [mapFd, key, value]), what, fix);
}

/** Copies the value of a key into valueOut. Returns false when the key is not there. */
export function mapLookup(mapFd: number, key: Buffer, valueOut: Buffer): boolean {
  const result = call("aa_map_lookup", [DataType.I32, DataType.U8Array, DataType.U8Array], [mapFd, key, valueOut]);
  if (result === -os.constants.errno.ENOENT) return false;
  check(result, "map lookup", MAP_FIX);
  return true;
}

/** Deletes a key. Returns false when the key was not there. */
export function mapDelete(mapFd: number, key: Buffer): boolean {
  const result = call("aa_map_delete", [DataType.I32, DataType.U8Array], [mapFd, key]);
  if (result === -os.constants.errno.ENOENT) return false;
  check(result, "map delete", MAP_FIX);
  return true;
}

/** Looks a key up and deletes it in one step. Returns false when the key was not there. */
export function mapLookupAndDelete(mapFd: number, key: Buffer, valueOut: Buffer): boolean {
  const result = call(
    "aa_map_lookup_and_delete",
    [DataType.I32, DataType.U8Array, DataType.U8Array],
    [mapFd, key, valueOut],
  );
  if (result === -os.constants.errno.ENOENT) return false;
  check(result, "map lookup and delete", MAP_FIX);
  return true;
}

/**
 * Returns every key of a map, each as a buffer of keySize bytes. A key deleted during the walk
 * makes the kernel restart from the first key, so keys already seen are skipped and the walk
 * stops after maxKeys steps.
 */
export function mapKeys(mapFd: number, keySize: number, maxKeys: number): Buffer[] {
  const seen = new Map<string, Buffer>();
  let current = Buffer.alloc(keySize);
  let hasKey = 0;
  for (let step = 0; step < maxKeys; step++) {
    const next = Buffer.alloc(keySize);
    const result = call(
      "aa_map_next_key",
      [DataType.I32, DataType.U8Array, DataType.I32, DataType.U8Array],
      [mapFd, current, hasKey, next],
    );
    if (result === -os.constants.errno.ENOENT) break;
    check(result, "map iteration", MAP_FIX);
    seen.set(next.toString("hex"), next);
    current = next;
    hasKey = 1;
  }
  return [...seen.values()];
}

/**
 * Counts the keys of a map by walking them with two buffers, without keeping them. The walk
 * stops after maxSteps keys, so a map whose keys are deleted while it runs (the kernel then
 * restarts from the first key) is counted at most maxSteps. Throws for a map type without keys
 * to walk, such as socket storage.
 */
export function mapCountKeys(mapFd: number, keySize: number, maxSteps: number): number {
  let current = Buffer.alloc(keySize);
  let next = Buffer.alloc(keySize);
  let hasKey = 0;
  let count = 0;
  while (count < maxSteps) {
    const result = call("aa_map_next_key", [DataType.I32, DataType.U8Array, DataType.I32, DataType.U8Array], [mapFd, current, hasKey, next]);
    if (result === -os.constants.errno.ENOENT) break;
    check(result, "map iteration", MAP_FIX);
    count += 1;
    [current, next] = [next, current];
    hasKey = 1;
  }
  return count;
}

/** A connection for skLookupTestRun. Addresses are IPv4 for AF_INET and IPv6 for AF_INET6. */
export interface SkLookupTestInput {
  /** 2 (AF_INET) or 10 (AF_INET6). */
  family: number;
  /** 6 (TCP) or 17 (UDP). */
  protocol: number;
  remoteIp: string;
  remotePort: number;
  localIp: string;
  localPort: number;
}

export interface SkLookupTestResult {
  /** 1 (SK_PASS) or 0 (SK_DROP). */
  verdict: number;
  /** Cookie of the socket the program assigned, or 0n when it assigned none. */
  cookie: bigint;
}

/** Writes a test address in network byte order, checking that it belongs to the family. */
function encodeTestAddress(ip: string, family: number): Buffer {
  const bytes = ipBytes(ip);
  if ((family === 2 && bytes.length === 4) || (family === 10 && bytes.length === 16)) return Buffer.concat([bytes], 16);
  throw new RangeError(`invalid address ${JSON.stringify(ip)} for address family ${family}: use IPv4 for 2 (AF_INET) and IPv6 for 10 (AF_INET6)`);
}

/**
 * Runs the sk_lookup program pinned at programPinPath on a made-up lookup with BPF_PROG_TEST_RUN
 * (Linux 5.13 or later) and returns its verdict and the socket it assigned. Maps are read as
 * they are, so the caller fills them first. For tests: nothing in the agent calls it.
 */
export function skLookupTestRun(programPinPath: string, input: SkLookupTestInput): SkLookupTestResult {
  const result = Buffer.alloc(16);
  const code = call(
    "aa_sk_lookup_test_run",
    [DataType.String, DataType.I32, DataType.I32, DataType.U8Array, DataType.I32, DataType.U8Array, DataType.I32, DataType.U8Array],
    [
      programPinPath,
      input.family,
      input.protocol,
      encodeTestAddress(input.remoteIp, input.family),
      input.remotePort,
      encodeTestAddress(input.localIp, input.family),
      input.localPort,
      result,
    ],
  );
  check(
    code,
    `test run of sk_lookup program ${programPinPath} for ${input.remoteIp}:${input.remotePort} -> ${input.localIp}:${input.localPort}`,
    "Check that the program is pinned (Capture.attach) and that the kernel supports BPF_PROG_TEST_RUN for sk_lookup (Linux 5.13 or later).",
  );
  const littleEndian = os.endianness() === "LE";
  return {
    verdict: littleEndian ? result.readUInt32LE(0) : result.readUInt32BE(0),
    cookie: littleEndian ? result.readBigUInt64LE(8) : result.readBigUInt64BE(8),
  };
}

/** Size of the probe report buffer: a dozen lines of at most about 500 bytes each. */
const PROBE_REPORT_SIZE = 16 * 1024;

/** One line of the native feature probe: the feature's name, and errno 0 when it works. */
export interface NativeProbeLine {
  feature: string;
  errno: number;
  detail: string;
}

/**
 * Probes every map type, program and link eBPF capture needs, by creating, loading and linking
 * each one (links go to a throwaway cgroup under cgroupPath or a throwaway network namespace,
 * and are removed again). Returns one line per feature.
 */
export function captureProbeFeatures(objectPath: string, cgroupPath: string): NativeProbeLine[] {
  const buffer = Buffer.alloc(PROBE_REPORT_SIZE);
  const result = call(
    "aa_capture_probe_features",
    [DataType.String, DataType.String, DataType.U8Array, DataType.I32],
    [objectPath, cgroupPath, buffer, buffer.length],
  );
  const length = check(result, `probing the kernel for eBPF capture with ${objectPath}`, "This is a bug in the agent.");
  return buffer
    .toString("utf8", 0, length)
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => {
      const [feature, errno, ...detail] = line.split("\t");
      return { feature, errno: Number(errno), detail: detail.join(" ") };
    });
}
