// Cost of the original-destination lookup that the outbound proxy makes for each new connection:
// Capture.takeOriginalDestination (key encoding, one ffi-rs call into libagent's
// bpf_map_lookup_and_delete_elem, value decoding), timed call by call against the real pinned
// aa_orig_dst map, on hits and on misses. For comparison, the same lookup through a small Node-API
// addon (napi-lookup.c) compiled with gcc against Node's headers, when gcc and the headers are there.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { Capture } from "../../agent/capture/ebpf/capture";
import {
  MAP_ORIGINAL_DESTINATION,
  STRUCT_LAYOUTS,
  decodeOriginalDestination,
  encodeOriginalDestination,
  encodeOriginalDestinationKey,
} from "../../agent/capture/layout";
import { closeFd } from "../../agent/capture/native";
import { mapOpen, mapUpdate } from "../../agent/capture/ebpf/native-bpf";
import { silentLogger } from "../../agent/log";
import { CGROUP_ROOT, OBJECT_PATH, PIN_PARENT } from "../harness/netns-pair";
import { nearestRank, round } from "./stats";

/** The C source sits next to the TypeScript sources; tsc does not copy it to dist/. */
const ADDON_SOURCE = path.resolve(__dirname, "..", "..", "..", "test", "bench", "napi-lookup.c");
const NODE_HEADERS = "/usr/include/node";
/** A netns cookie no namespace has: the kernel hands cookies out from 1 upwards. */
const BENCH_COOKIE = 1n << 62n;
const SOURCE_IP = "10.255.0.1";
/** Entries per round: inserted untimed, then taken one timed call each. */
const ROUND_SIZE = 1000;

export interface LookupFigures {
  /** Timed calls per case. */
  samples: number;
  /** Median µs per Capture.takeOriginalDestination call (ffi-rs), when the entry is there and when it is not. */
  ffi_hit_us: number;
  ffi_miss_us: number;
  /** The same through the Node-API addon, or undefined when the addon could not be built. */
  napi_hit_us?: number;
  napi_miss_us?: number;
}

type Take = (port: number) => { ip: string; port: number } | undefined;

interface NapiLookup {
  lookupAndDelete(mapFd: number, key: Buffer, value: Buffer): boolean;
}

/** Compiles and loads the addon, or returns undefined and reports the reason on `step` when that fails. */
function buildAddon(workDir: string, step: (message: string) => void): NapiLookup | undefined {
  if (!fs.existsSync(path.join(NODE_HEADERS, "node_api.h"))) {
    step(`lookup: no Node-API headers in ${NODE_HEADERS}; skipping the addon comparison`);
    return undefined;
  }
  const addon = path.join(workDir, "napi-lookup.node");
  try {
    execFileSync("gcc", ["-O2", "-Wall", "-shared", "-fPIC", `-I${NODE_HEADERS}`, "-o", addon, ADDON_SOURCE], { stdio: "pipe" });
  } catch (error) {
    step(`lookup: building the Node-API addon failed, skipping it: ${String((error as { stderr?: Buffer }).stderr ?? error)}`);
    return undefined;
  }
  return require(addon) as NapiLookup;
}

/** Times `take` once per port and returns the samples in µs. `expectHit` is the expected outcome of each call. */
function timeTakes(take: Take, ports: number[], expectHit: boolean): number[] {
  const samples: number[] = [];
  for (const port of ports) {
    const start = process.hrtime.bigint();
    const found = take(port);
    const elapsed = process.hrtime.bigint() - start;
    if ((found !== undefined) !== expectHit) throw new Error(`lookup of port ${port}: expected a ${expectHit ? "hit" : "miss"}`);
    samples.push(Number(elapsed) / 1000);
  }
  return samples;
}

/** Runs `rounds` rounds of ROUND_SIZE inserts (untimed) and timed takes, then as many timed misses, and returns the medians. */
function measureTake(take: Take, insert: (port: number) => void, rounds: number): { hit: number; miss: number } {
  const ports = Array.from({ length: ROUND_SIZE }, (_, index) => 1024 + index);
  const hits: number[] = [];
  const misses: number[] = [];
  // The first round warms the JIT and is not recorded.
  for (let round = 0; round <= rounds; round++) {
    for (const port of ports) insert(port);
    const roundHits = timeTakes(take, ports, true);
    const roundMisses = timeTakes(take, ports, false);
    if (round > 0) {
      hits.push(...roundHits);
      misses.push(...roundMisses);
    }
  }
  const median = (samples: number[]): number => nearestRank([...samples].sort((a, b) => a - b), 0.5);
  return { hit: median(hits), miss: median(misses) };
}

/**
 * Attaches capture on its own pin root `${prefix}-lookup` under PIN_PARENT, measures, and removes
 * the pins again. No pod is enrolled, so no connection on the machine is steered.
 */
export function measureLookup(prefix: string, workDir: string, rounds: number, step: (message: string) => void): LookupFigures {
  const pinRoot = path.join(PIN_PARENT, `${prefix}-lookup`);
  const capture = Capture.attach({ pinRoot, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger());
  let mapFd = -1;
  try {
    mapFd = mapOpen(path.join(pinRoot, "maps", MAP_ORIGINAL_DESTINATION));
    const fd = mapFd;
    const value = encodeOriginalDestination("10.96.0.1", 80);
    const insert = (port: number): void => mapUpdate(fd, encodeOriginalDestinationKey(BENCH_COOKIE, SOURCE_IP, port), value);

    step(`lookup: ${rounds} x ${ROUND_SIZE} takeOriginalDestination calls through ffi-rs, hits and misses`);
    const ffi = measureTake((port) => capture.takeOriginalDestination(BENCH_COOKIE, SOURCE_IP, port), insert, rounds);
    const figures: LookupFigures = { samples: rounds * ROUND_SIZE, ffi_hit_us: round(ffi.hit, 2), ffi_miss_us: round(ffi.miss, 2) };

    const addon = buildAddon(workDir, step);
    if (addon) {
      step(`lookup: the same through the Node-API addon`);
      // The same steps as Capture.takeOriginalDestination, with the addon in place of ffi-rs.
      const napiTake: Take = (port) => {
        const found = Buffer.alloc(STRUCT_LAYOUTS.aa_orig_dst.size);
        const key = encodeOriginalDestinationKey(BENCH_COOKIE, SOURCE_IP, port);
        return addon.lookupAndDelete(fd, key, found) ? decodeOriginalDestination(found) : undefined;
      };
      const napi = measureTake(napiTake, insert, rounds);
      figures.napi_hit_us = round(napi.hit, 2);
      figures.napi_miss_us = round(napi.miss, 2);
    }
    step(`lookup: median µs per call: ${JSON.stringify(figures)}`);
    return figures;
  } finally {
    if (mapFd >= 0) closeFd(mapFd);
    capture.close();
    Capture.remove(pinRoot);
  }
}
