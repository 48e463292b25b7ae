// Reads what the pinned capture maps and links hold, without attaching anything, so that an
// operator can see the capture entries of a node also while its agent is down.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import {
  COOKIE_SIZE,
  IPV4_KEY_SIZE,
  MAP_ENROLLED,
  MAP_INBOUND_LISTENERS,
  MAP_INBOUND_PODS,
  STRUCT_LAYOUTS,
  decodeCookie,
  decodeInboundPod,
  decodeIpv4Key,
  decodePodInfo,
  parseInboundLinkName,
} from "../layout";
import { closeFd, loadNative } from "../native";
import { mapKeys, mapLookup, mapOpen } from "./native-bpf";

/** Upper bound of a map walk; each map has at most 4096 entries (AA_MAX_ENROLLED in bpf/lib/config.h). */
const MAX_KEYS = 8192;

/** The capture entries under one pin root. Cookies are decimal strings, so the result is plain JSON. */
export interface CaptureEntries {
  /** aa_enrolled: the netns cookies whose outbound connections are steered, with the pod IP of each. */
  enrolled: { cookie: string; podIp: string }[];
  /** aa_inbound_pods: the pod IPs that sk_lookup guards, with the netns cookie of each. */
  inboundPods: { podIp: string; cookie: string }[];
  /** aa_inbound: "podIp:port" of every listener that sk_lookup assigns connections to. */
  inboundListeners: string[];
  /** The netns cookies that have a pinned sk_lookup link under links/. */
  inboundLinks: string[];
}

/** Reads the capture entries pinned under `pinRoot`. Throws when the maps are not pinned there. */
export function readCaptureEntries(pinRoot: string): CaptureEntries {
  loadNative();
  return {
    enrolled: withMap(pinRoot, MAP_ENROLLED, readEnrolled),
    inboundPods: withMap(pinRoot, MAP_INBOUND_PODS, readInboundPods),
    inboundListeners: withMap(pinRoot, MAP_INBOUND_LISTENERS, readInboundListeners),
    inboundLinks: readInboundLinks(pinRoot),
  };
}

function withMap<T>(pinRoot: string, mapName: string, read: (mapFd: number) => T): T {
  const mapFd = mapOpen(path.join(pinRoot, "maps", mapName));
  try {
    return read(mapFd);
  } finally {
    closeFd(mapFd);
  }
}

function readEnrolled(mapFd: number): CaptureEntries["enrolled"] {
  const value = Buffer.alloc(STRUCT_LAYOUTS.aa_pod_info.size);
  const entries: CaptureEntries["enrolled"] = [];
  for (const key of mapKeys(mapFd, COOKIE_SIZE, MAX_KEYS)) {
    if (!mapLookup(mapFd, key, value)) continue;
    entries.push({ cookie: decodeCookie(key).toString(), podIp: decodePodInfo(value).podIp });
  }
  return entries;
}

function readInboundPods(mapFd: number): CaptureEntries["inboundPods"] {
  const value = Buffer.alloc(STRUCT_LAYOUTS.aa_inbound_pod.size);
  const entries: CaptureEntries["inboundPods"] = [];
  for (const key of mapKeys(mapFd, IPV4_KEY_SIZE, MAX_KEYS)) {
    if (!mapLookup(mapFd, key, value)) continue;
    entries.push({ podIp: decodeIpv4Key(key), cookie: decodeInboundPod(value).cookie.toString() });
  }
  return entries;
}

/** Lists the keys of the listener sockhash; its values are sockets, so only the keys are read. */
function readInboundListeners(mapFd: number): string[] {
  const layout = STRUCT_LAYOUTS.aa_inbound_key;
  return mapKeys(mapFd, layout.size, MAX_KEYS).map((key) => {
    // The port is in host byte order (see encodeInboundKey).
    const port = os.endianness() === "LE" ? key.readUInt16LE(layout.offsets.port) : key.readUInt16BE(layout.offsets.port);
    return `${decodeIpv4Key(key.subarray(layout.offsets.ip4, layout.offsets.ip4 + 4))}:${port}`;
  });
}

function readInboundLinks(pinRoot: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(path.join(pinRoot, "links"));
  } catch {
    return [];
  }
  return names.flatMap((name) => {
    const cookie = parseInboundLinkName(name);
    return cookie === undefined ? [] : [cookie.toString()];
  });
}
