// Finds the network namespace of a pod from its IP address. Container runtimes pin pod
// namespaces under /var/run/netns (containerd, CRI-O); /proc/<pid>/ns/net covers the rest. The
// /proc of an agent in a container lists only the container's processes, so the host's procfs is
// mounted elsewhere (--host-proc, for example /host/proc) and every host process is looked up there.
import fs from "node:fs";
import path from "node:path";

import net from "node:net";

import { netnsIpv4Addresses, netnsIpv6Addresses, setProcRoot } from "../capture/native";
import { AgentError } from "../errors";
import { createLogger, type Logger } from "../log";
import { canonicalIp } from "../state/ip";

export interface NetnsRef {
  /** A path that opens the namespace: /var/run/netns/<name> when one exists, else HOST_PROC/<pid>/ns/net. */
  path: string;
  /** Inode number of the namespace in nsfs; equal inodes mean the same namespace. */
  inode: number;
}

const PINNED_NETNS_DIRECTORY = "/var/run/netns";
/** The default procfs mount, which is also the prefix of the paths that runtimes use to name host processes. */
export const DEFAULT_HOST_PROC = "/proc";
/** The host's procfs as mounted where the agent runs; useHostProc() sets it. */
let hostProc = DEFAULT_HOST_PROC;
/** How long the addresses read from a namespace are reused; a new pod may get its IP just after its namespace appears. */
export const ADDRESS_CACHE_TTL_MS = 2000;

interface CachedAddresses {
  addresses: string[];
  expiresAt: number;
}

/** Addresses read from each namespace, by inode and then by family. */
const addressCache = new Map<number, Map<4 | 6, CachedAddresses>>();
let defaultLogger: Logger | undefined;

/**
 * Makes every lookup of the host's processes, and every per-namespace sysctl that the native
 * library writes, go through the host's procfs mounted at `dir`. Call it once at start, before
 * any namespace work.
 */
export function useHostProc(dir: string): void {
  setProcRoot(dir);
  hostProc = dir;
}

/** The namespace paths under /proc/ that hostProcPath translates: a process's or a thread's ns/net. */
const PROC_NETNS_PATH = /^\/proc\/[1-9][0-9]*\/(task\/[1-9][0-9]*\/)?ns\/net$/;

/**
 * Translates a path under /proc/ that a container runtime passed (a CNI_NETNS such as
 * /proc/1234/ns/net, numbered in the host's PID namespace) into the host's procfs mount. Only
 * /proc/PID/ns/net and /proc/PID/task/TID/ns/net are accepted under /proc/, because any other
 * path there, such as /proc/../../var/run/netns/x or /proc/self/ns/net, would open something
 * other than a host process's namespace. Paths outside /proc/ are returned as they are. Throws
 * AgentError INVALID_CNI_REQUEST for another path under /proc/, with the default /proc as well.
 */
export function hostProcPath(netnsPath: string, procDir: string = hostProc): string {
  const prefix = `${DEFAULT_HOST_PROC}/`;
  if (!netnsPath.startsWith(prefix)) return netnsPath;
  if (!PROC_NETNS_PATH.test(netnsPath)) {
    throw new AgentError(
      "INVALID_CNI_REQUEST",
      `invalid network namespace path ${JSON.stringify(netnsPath.slice(0, 200))}: under /proc/ the agent opens only /proc/PID/ns/net or /proc/PID/task/TID/ns/net; check the container runtime's CNI_NETNS`,
    );
  }
  if (procDir === DEFAULT_HOST_PROC) return netnsPath;
  return path.join(procDir, netnsPath.slice(prefix.length));
}

/**
 * Returns every network namespace, other than the host's and the agent's own, that has `ip` on an interface.
 * NOTE: this trusts the node. A process with CAP_NET_ADMIN in another namespace can add the IP of a pod whose
 * namespace does not exist yet and be found in its place.
 */
export function findNetnsCandidates(ip: string): NetnsRef[] {
  return scanNetns()(ip);
}

/** Lookup that returns the namespaces, other than the host's and the agent's own, that have an IP (see findNetnsCandidates). */
export type NetnsScan = (ip: string) => NetnsRef[];

/**
 * Lists the node's network namespaces once and returns a lookup by IP over that listing, for
 * finding many pods' namespaces without listing /proc again for each. A namespace made after
 * the scan is not found by it.
 */
export function scanNetns(): NetnsScan {
  const namespaces = listNetns();
  pruneAddressCache(namespaces);
  return (ip) => {
    const family = net.isIPv6(ip) ? 6 : 4;
    const wanted = family === 6 ? canonicalIp(ip) : ip;
    return namespaces.filter((ref) => addressesOf(ref, family).includes(wanted));
  };
}

/**
 * Returns the network namespace that has `ip` on one of its interfaces, other than the host's
 * and the agent's own. Returns undefined, with a warning, when several namespaces have it.
 */
export function findNetnsByIp(ip: string, logger?: Logger): NetnsRef | undefined {
  const matches = findNetnsCandidates(ip);
  if (matches.length > 1) {
    const log = logger ?? (defaultLogger ??= createLogger({ component: "netns" }));
    log.warn({ ip, netns: matches.map((ref) => ref.path) }, "several network namespaces have the pod IP; not enrolling it");
    return undefined;
  }
  return matches[0];
}

/**
 * Lists every namespace once, by inode, skipping the host's (PID 1 of the host's procfs) and the
 * agent's own (which differs from the host's when the agent runs in a pod network).
 */
export function listNetns(): NetnsRef[] {
  const excluded = new Set<number>();
  for (const own of [path.join(hostProc, "1", "ns", "net"), "/proc/self/ns/net"]) {
    const inode = inodeOf(own);
    if (inode !== undefined) excluded.add(inode);
  }

  const byInode = new Map<number, NetnsRef>();
  const candidates = [...pinnedNetnsPaths(), ...processNetnsPaths()];
  for (const candidate of candidates) {
    const inode = inodeOf(candidate);
    if (inode === undefined || excluded.has(inode) || byInode.has(inode)) continue;
    byInode.set(inode, { path: candidate, inode });
  }
  return [...byInode.values()];
}

function pinnedNetnsPaths(): string[] {
  return readDirectory(PINNED_NETNS_DIRECTORY).map((name) => path.join(PINNED_NETNS_DIRECTORY, name));
}

function processNetnsPaths(): string[] {
  return readDirectory(hostProc)
    .filter((name) => /^\d+$/.test(name))
    .map((pid) => path.join(hostProc, pid, "ns", "net"));
}

function readDirectory(directory: string): string[] {
  try {
    return fs.readdirSync(directory);
  } catch {
    return [];
  }
}

/** Inode of the namespace a path refers to; undefined when it vanished or is not readable. */
function inodeOf(netnsPath: string): number | undefined {
  try {
    return fs.statSync(netnsPath).ino;
  } catch {
    return undefined;
  }
}

/** Returns the namespace's addresses of one family, with IPv6 addresses in canonical form. */
function addressesOf(ref: NetnsRef, family: 4 | 6): string[] {
  const now = Date.now();
  const byFamily = addressCache.get(ref.inode) ?? new Map<4 | 6, CachedAddresses>();
  const cached = byFamily.get(family);
  if (cached && cached.expiresAt > now) return cached.addresses;

  let addresses: string[];
  try {
    addresses = family === 6 ? netnsIpv6Addresses(ref.path).map(canonicalIp) : netnsIpv4Addresses(ref.path);
  } catch {
    // The namespace (or its process) went away between the scan and this read.
    addresses = [];
  }
  byFamily.set(family, { addresses, expiresAt: now + ADDRESS_CACHE_TTL_MS });
  addressCache.set(ref.inode, byFamily);
  return addresses;
}

/**
 * Forgets namespaces that are gone. NOTE: a namespace that dies and whose inode number is
 * reused between two scans keeps the old addresses until the cache entry expires.
 */
function pruneAddressCache(current: NetnsRef[]): void {
  const live = new Set(current.map((ref) => ref.inode));
  for (const inode of addressCache.keys()) {
    if (!live.has(inode)) addressCache.delete(inode);
  }
}
