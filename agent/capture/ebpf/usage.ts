// The usage of eBPF capture: the programs attached under the pin root and the entries in use
// of each pinned map, for the status route and the capture map metrics.

import fs from "node:fs";
import path from "node:path";

import type { MapUsageView, ProgramView } from "../../admin/views";
import { INBOUND_PROGRAM_NAME, PROGRAM_NAMES, parseInboundLinkName } from "../layout";
import { closeFd } from "../native";
import { mapCountKeys, mapOpen } from "./native-bpf";

/** The attach type of each cgroup program, as bpftool names it. */
const CGROUP_ATTACH_TYPES: Record<(typeof PROGRAM_NAMES)[number], string> = {
  aa_connect4: "cgroup/connect4",
  aa_connect6: "cgroup/connect6",
  aa_sockops: "sockops",
  aa_getpeername4: "cgroup/getpeername4",
  aa_getpeername6: "cgroup/getpeername6",
  aa_bind4: "cgroup/bind4",
  aa_bind6: "cgroup/bind6",
};

/** BPF_MAP_TYPE_SK_STORAGE in include/uapi/linux/bpf.h: per-socket values with no keys to walk. */
const MAP_TYPE_SK_STORAGE = 24;

export interface CaptureUsage {
  programs: ProgramView[];
  maps: MapUsageView[];
}

/**
 * Lists the capture programs whose links are pinned under `pinRoot`, and the entries and
 * capacity of each pinned map. Socket storage maps are left out: their entries live on the
 * sockets and cannot be counted. Throws when a pinned map cannot be opened or read.
 */
export function readEbpfUsage(pinRoot: string, cgroupPath: string): CaptureUsage {
  const links = readdirOrEmpty(path.join(pinRoot, "links"));
  const programs: ProgramView[] = PROGRAM_NAMES.filter((name) => links.includes(name)).map((name) => ({
    name,
    type: CGROUP_ATTACH_TYPES[name],
    attachedTo: cgroupPath,
  }));
  const namespaces = links.filter((name) => parseInboundLinkName(name) !== undefined).length;
  if (fs.existsSync(path.join(pinRoot, "progs", INBOUND_PROGRAM_NAME))) {
    programs.push({ name: INBOUND_PROGRAM_NAME, type: "sk_lookup", attachedTo: `${namespaces} pod network namespaces` });
  }

  const maps: MapUsageView[] = [];
  for (const name of readdirOrEmpty(path.join(pinRoot, "maps")).sort()) {
    const usage = readMapUsage(path.join(pinRoot, "maps", name));
    if (usage !== undefined) maps.push({ name, ...usage });
  }
  return { programs, maps };
}

/** Returns a pinned map's entries and max_entries, or undefined for a socket storage map. */
function readMapUsage(pinPath: string): { entries: number; maxEntries: number } | undefined {
  const fd = mapOpen(pinPath);
  try {
    const info = parseMapFdinfo(fs.readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"));
    if (info.mapType === MAP_TYPE_SK_STORAGE) return undefined;
    // A walk longer than max_entries can only come from keys deleted and re-added during it.
    return { entries: mapCountKeys(fd, info.keySize, info.maxEntries), maxEntries: info.maxEntries };
  } finally {
    closeFd(fd);
  }
}

/** Reads map_type, key_size and max_entries from the kernel's fdinfo text of a BPF map descriptor. */
export function parseMapFdinfo(text: string): { mapType: number; keySize: number; maxEntries: number } {
  const field = (name: string): number => {
    const match = new RegExp(`^${name}:\\s*(\\d+)$`, "m").exec(text);
    if (match === null) throw new Error(`the fdinfo of a BPF map has no ${name} field; expected the format of Linux 4.10 or later`);
    return Number(match[1]);
  };
  return { mapType: field("map_type"), keySize: field("key_size"), maxEntries: field("max_entries") };
}

function readdirOrEmpty(folder: string): string[] {
  try {
    return fs.readdirSync(folder);
  } catch {
    return [];
  }
}
