// Bindings to native/libagent.so through ffi-rs: loading the library, and sockets, addresses and
// rules inside network namespaces. Every call is synchronous and short: the namespace work runs on
// a helper thread inside the library, never on Node's event loop. The eBPF calls (object, maps,
// links, probes) are in ebpf/native-bpf.ts.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { DataType, load, open } from "ffi-rs";

import { AgentError } from "../errors";
import {
  AGENT_MARK,
  COOKIE_SIZE,
  TRANSPARENT_MARK,
  TRANSPARENT_MARK_MASK,
  TRANSPARENT_ROUTE_TABLE,
  TRANSPARENT_RULE_PRIORITY,
  decodeCookie,
} from "./layout";

const LIBRARY_KEY = "ambient-agent-libagent";
const ERROR_BUFFER_SIZE = 2048;
const ADDRESS_BUFFER_SIZE = 16 * 1024;

let loadedPath: string | undefined;

/**
 * A failed native call. The message names the step, the value and what to check; `errno` is
 * the positive errno value the library returned.
 */
export class NativeError extends AgentError {
  readonly errno: number;

  constructor(message: string, errno: number) {
    // NOTE: the registry has no capture-specific code yet, so native failures use INTERNAL.
    super("INTERNAL", message);
    this.name = "NativeError";
    this.errno = errno;
  }
}

/** Path of native/libagent.so in the repository, from both agent/capture and dist/agent/capture. */
function defaultLibraryPath(): string {
  const candidates = [
    path.resolve(__dirname, "../../native/libagent.so"),
    path.resolve(__dirname, "../../../native/libagent.so"),
  ];
  return candidates.find((candidate) => fs.existsSync(candidate)) ?? candidates[1];
}

/** Opens the native library once; later calls with the same path do nothing. */
export function loadNative(libraryPath: string = defaultLibraryPath()): void {
  if (loadedPath === libraryPath) return;
  if (!fs.existsSync(libraryPath)) {
    throw new AgentError(
      "INTERNAL",
      `native library ${libraryPath} not found: build it with \`make build\` in the ambient-agent checkout`,
    );
  }
  open({ library: LIBRARY_KEY, path: libraryPath });
  loadedPath = libraryPath;
}

/**
 * Makes the native library open every per-namespace sysctl it writes under `dir`, the host's
 * procfs as mounted where the agent runs (default /proc), as DIR/sys/net/... . Call it before any
 * namespace work: helper threads read the setting without a lock.
 */
export function setProcRoot(dir: string): void {
  check(call("aa_set_proc_root", [DataType.String], [dir]), `setting the proc root to ${dir}`, "Pass the absolute path of a procfs mount, such as /proc or /host/proc.");
}

/** Calls a libagent function that returns an int (>= 0 on success, -errno on failure). */
export function call(funcName: string, paramsType: DataType[], paramsValue: unknown[]): number {
  loadNative(loadedPath);
  return load({ library: LIBRARY_KEY, funcName, retType: DataType.I32, paramsType, paramsValue }) as number;
}

function lastError(): string {
  const buffer = Buffer.alloc(ERROR_BUFFER_SIZE);
  const length = call("aa_last_error", [DataType.U8Array, DataType.I32], [buffer, buffer.length]);
  return buffer.toString("utf8", 0, Math.max(0, length));
}

function errnoName(errno: number): string {
  const entry = Object.entries(os.constants.errno).find(([, value]) => value === errno);
  return entry ? entry[0] : `errno ${errno}`;
}

/** Turns a negative return value into a NativeError: "<what> failed: <library detail> (ECODE). <fix>". */
export function check(result: number, what: string, fix: string): number {
  if (result >= 0) return result;
  const errno = -result;
  const detail = lastError() || errnoName(errno);
  throw new NativeError(`${what} failed: ${detail} (${errnoName(errno)}). ${fix}`, errno);
}

const NETNS_FIX = "Check that the network namespace exists and that the agent runs as root (CAP_SYS_ADMIN, CAP_NET_ADMIN).";

/**
 * Open file descriptors of the pinned aa_agent_socks map, one per attached Capture, newest last.
 * netnsSocket flags agent sockets in the newest one. Every Capture of one pin root opens the same
 * map, so a Capture closing while another stays attached leaves the flagging intact.
 */
const agentSocketMaps: number[] = [];
/** Counts changes to agentSocketMaps, so that a holder of spare sockets can tell its flags may be stale. */
let agentSocketMapChanges = 0;

/** Makes netnsSocket flag agent sockets in this open aa_agent_socks map; Capture.attach calls it. */
export function registerAgentSocketMap(mapFd: number): void {
  agentSocketMaps.push(mapFd);
  agentSocketMapChanges++;
}

/** Stops using a map registered with registerAgentSocketMap, before its fd is closed. */
export function unregisterAgentSocketMap(mapFd: number): void {
  const index = agentSocketMaps.lastIndexOf(mapFd);
  if (index >= 0) agentSocketMaps.splice(index, 1);
  agentSocketMapChanges++;
}

/**
 * Returns a number that changes whenever a Capture registers or unregisters its aa_agent_socks
 * map. Sockets made before a change may be flagged in a map that capture no longer reads.
 */
export function agentSocketMapVersion(): number {
  return agentSocketMapChanges;
}

/** Whether agent sockets are identified by their mark alone, as nftables capture does. */
let markOnlyAgentSockets = false;

/**
 * Makes netnsSocket and netnsSockets accept agent sockets with no aa_agent_socks map registered:
 * they are then only marked 0x539, which is all that nftables capture checks.
 */
export function useMarkOnlyAgentSockets(): void {
  markOnlyAgentSockets = true;
}

/**
 * Returns the newest registered aa_agent_socks map fd, or -1 in mark-only mode. Throws when no
 * Capture is attached in this process otherwise.
 */
function currentAgentSocketMap(netnsPath: string): number {
  const agentMapFd = agentSocketMaps.at(-1);
  if (agentMapFd === undefined && markOnlyAgentSockets) return -1;
  if (agentMapFd === undefined) {
    throw new AgentError(
      "INTERNAL",
      `creating an agent socket in network namespace ${netnsPath} failed: no capture is attached in this process, ` +
        "so the socket cannot be flagged in aa_agent_socks and capture would steer it. Attach capture (Capture.attach) first.",
    );
  }
  return agentMapFd;
}

export interface NetnsSocketOptions {
  /**
   * Whether the socket is the agent's own: it is then flagged in aa_agent_socks, which is the only
   * thing that makes capture let it through. Default true; needs an attached Capture in this
   * process. false makes a socket that capture steers like any application's.
   */
  agentSocket?: boolean;
  /** SO_MARK; default 0x539 for agent sockets and 0 otherwise. 0 leaves the socket unmarked. Capture ignores the mark. */
  mark?: number;
  /** Address to bind; default 0.0.0.0 when a port is given, no bind otherwise. */
  bindIp?: string;
  port?: number;
  /** Listen with this backlog when > 0. */
  backlog?: number;
  /** Set IP_TRANSPARENT, so the socket may bind a non-local address. */
  transparent?: boolean;
}

/**
 * Returns the aa_agent_socks map fd that netnsSocket and netnsSocket6 flag the socket in (-1 for
 * an application socket, or in mark-only mode) and the SO_MARK they set.
 */
function socketIdentity(netnsPath: string, opts: NetnsSocket6Options): { agentMapFd: number; mark: number } {
  const agentSocket = opts.agentSocket ?? true;
  const agentMapFd = agentSocket ? currentAgentSocketMap(netnsPath) : -1;
  const mark = opts.mark ?? (agentSocket ? AGENT_MARK : 0);
  return { agentMapFd, mark };
}

/**
 * Creates a TCP/IPv4 socket inside a network namespace and returns its file descriptor. An agent
 * socket (the default) is flagged in aa_agent_socks before it is returned, so that capture never
 * steers it. Throws when no Capture is attached in this process, because an unflagged agent
 * socket in an enrolled pod would be steered back to the pod's own proxy.
 */
export function netnsSocket(netnsPath: string, opts: NetnsSocketOptions): number {
  const { agentMapFd, mark } = socketIdentity(netnsPath, opts);
  const result = call(
    "aa_netns_socket",
    [DataType.String, DataType.I32, DataType.I32, DataType.String, DataType.I32, DataType.I32, DataType.I32],
    [netnsPath, agentMapFd, mark, opts.bindIp ?? "", opts.port ?? 0, opts.backlog ?? 0, opts.transparent ? 1 : 0],
  );
  const where = opts.port ? ` on ${opts.bindIp ?? "0.0.0.0"}:${opts.port}` : "";
  return check(result, `creating a TCP socket${where} in network namespace ${netnsPath}`, NETNS_FIX);
}

/** Flags of netnsListener, the AA_LISTENER_* values of native/libagent.h. */
const LISTENER_REUSEPORT = 0x1;
const LISTENER_MIGRATE_REQUESTS = 0x2;
const LISTENER_IPV6 = 0x4;

export interface NetnsListenerOptions {
  /** Address to bind. The default is 0.0.0.0, or :: for an IPv6 listener. */
  bindIp?: string;
  /** Make a TCP/IPv6 listener with IPV6_V6ONLY, as netnsSocket6 does, instead of a TCP/IPv4 one. */
  ipv6?: boolean;
  port: number;
  backlog: number;
  /** Set SO_REUSEPORT, so that a replacement agent's listener can join this port during a hand-over. */
  reusePort?: boolean;
}

/**
 * Creates a listening agent socket inside a network namespace, as netnsSocket does, and first
 * sets net.ipv4.tcp_migrate_req=1 in that namespace (Linux 5.14 or later), so that connections
 * queued on a closing listener move to another listener of its SO_REUSEPORT group.
 */
export function netnsListener(netnsPath: string, opts: NetnsListenerOptions): number {
  const bindIp = opts.bindIp ?? (opts.ipv6 ? "::" : "0.0.0.0");
  const flags = LISTENER_MIGRATE_REQUESTS | (opts.reusePort ? LISTENER_REUSEPORT : 0) | (opts.ipv6 ? LISTENER_IPV6 : 0);
  const result = call(
    "aa_netns_listener",
    [DataType.String, DataType.I32, DataType.I32, DataType.String, DataType.I32, DataType.I32, DataType.I32],
    [netnsPath, currentAgentSocketMap(netnsPath), AGENT_MARK, bindIp, opts.port, opts.backlog, flags],
  );
  const where = opts.ipv6 ? `[${bindIp}]:${opts.port}` : `${bindIp}:${opts.port}`;
  return check(result, `creating a TCP listener on ${where} in network namespace ${netnsPath}`, NETNS_FIX);
}

/** Sets or clears SO_REUSEPORT on an open socket of this process. */
export function setReusePort(fd: number, on: boolean): void {
  check(call("aa_socket_set_reuseport", [DataType.I32, DataType.I32], [fd, on ? 1 : 0]), `setting SO_REUSEPORT=${on ? 1 : 0} on fd ${fd}`, "Pass an open socket.");
}

/** Maximum number of sockets per netnsSockets call. The native library rejects larger batches. */
export const MAX_SOCKET_BATCH = 1024;

/**
 * Creates `count` unconnected agent sockets inside a network namespace in one native call and
 * returns their file descriptors. Each is what netnsSocket(netnsPath, {}) returns: TCP/IPv4,
 * close-on-exec, marked 0x539 and flagged in aa_agent_socks. Throws, with no socket left open,
 * when any of them fails or when no Capture is attached in this process.
 */
export function netnsSockets(netnsPath: string, count: number): number[] {
  return createSocketBatch("aa_netns_sockets", netnsPath, count, "TCP");
}

/**
 * Creates `count` unconnected TCP/IPv6 agent sockets inside a network namespace in one native
 * call, as netnsSockets does for IPv4. Each is what netnsSocket6(netnsPath, {}) returns: IPv6
 * only, close-on-exec, marked 0x539 and flagged in aa_agent_socks. Throws, with no socket left
 * open, when any of them fails or when no Capture is attached in this process.
 */
export function netnsSockets6(netnsPath: string, count: number): number[] {
  return createSocketBatch("aa_netns_sockets6", netnsPath, count, "TCP/IPv6");
}

/** Calls aa_netns_sockets or aa_netns_sockets6, which share one signature, and returns the fds it wrote. */
function createSocketBatch(funcName: string, netnsPath: string, count: number, protocol: string): number[] {
  if (!Number.isInteger(count) || count < 1 || count > MAX_SOCKET_BATCH) {
    throw new AgentError("INTERNAL", `socket batch size ${count} is invalid: use an integer from 1 to ${MAX_SOCKET_BATCH}`);
  }
  const agentMapFd = currentAgentSocketMap(netnsPath);
  const fdsOut = Buffer.alloc(count * 4);
  const result = call(
    funcName,
    [DataType.String, DataType.I32, DataType.I32, DataType.I32, DataType.U8Array],
    [netnsPath, agentMapFd, AGENT_MARK, count, fdsOut],
  );
  const created = check(result, `creating ${count} ${protocol} sockets in network namespace ${netnsPath}`, NETNS_FIX);
  const fds: number[] = [];
  for (let index = 0; index < created; index++) fds.push(fdsOut.readInt32LE(index * 4));
  return fds;
}

/** Options of netnsSocket6: netnsSocket's, without IP_TRANSPARENT. */
export type NetnsSocket6Options = Omit<NetnsSocketOptions, "transparent">;

/**
 * Creates a TCP/IPv6 socket inside a network namespace, as netnsSocket does for IPv4: flagged in
 * aa_agent_socks unless agentSocket is false, marked, bound when a port or bindIp is given (default
 * ::), listening when backlog > 0. IPV6_V6ONLY is set, so the socket shares its port with an IPv4
 * listener and never sees IPv4-mapped peers.
 */
export function netnsSocket6(netnsPath: string, opts: NetnsSocket6Options): number {
  const { agentMapFd, mark } = socketIdentity(netnsPath, opts);
  const result = call(
    "aa_netns_socket6",
    [DataType.String, DataType.I32, DataType.I32, DataType.String, DataType.I32, DataType.I32],
    [netnsPath, agentMapFd, mark, opts.bindIp ?? "", opts.port ?? 0, opts.backlog ?? 0],
  );
  const where = opts.port ? ` on [${opts.bindIp ?? "::"}]:${opts.port}` : "";
  return check(result, `creating a TCP/IPv6 socket${where} in network namespace ${netnsPath}`, NETNS_FIX);
}

/** Returns the IPv6 addresses of every interface in a network namespace (::1 and fe80:: included), compressed. */
export function netnsIpv6Addresses(netnsPath: string): string[] {
  return listNetnsAddresses("aa_netns_ipv6_addresses", netnsPath, 6);
}

/** Returns the cookie of a network namespace (SO_NETNS_COOKIE), the key of the enrolled map. */
export function netnsCookie(netnsPath: string): bigint {
  const buffer = Buffer.alloc(COOKIE_SIZE);
  const result = call("aa_netns_cookie", [DataType.String, DataType.U8Array], [netnsPath, buffer]);
  check(
    result,
    `reading the cookie of network namespace ${netnsPath}`,
    result === -os.constants.errno.ENOPROTOOPT ? "The kernel lacks SO_NETNS_COOKIE (Linux 5.14 or later has it)." : NETNS_FIX,
  );
  return decodeCookie(buffer);
}

/** Returns the IPv4 addresses of every interface in a network namespace, loopback included. */
export function netnsIpv4Addresses(netnsPath: string): string[] {
  return listNetnsAddresses("aa_netns_ipv4_addresses", netnsPath, 4);
}

/** Calls aa_netns_ipv4_addresses or aa_netns_ipv6_addresses, which write a comma-separated list. */
function listNetnsAddresses(funcName: string, netnsPath: string, family: 4 | 6): string[] {
  const buffer = Buffer.alloc(ADDRESS_BUFFER_SIZE);
  const result = call(funcName, [DataType.String, DataType.U8Array, DataType.I32], [netnsPath, buffer, buffer.length]);
  const length = check(result, `listing the IPv${family} addresses of network namespace ${netnsPath}`, NETNS_FIX);
  const text = buffer.toString("utf8", 0, length);
  return text === "" ? [] : text.split(",");
}

/**
 * Installs (install true) or removes the policy routing of source-address transparency for one
 * address family in a network namespace: the rule for TRANSPARENT_MARK and the local route of
 * its table (`local 0.0.0.0/0` or `local ::/0`), and on install net.ipv4.tcp_fwmark_accept=1,
 * which covers TCP over both families. Safe to repeat. Returns how many of the rule and route it
 * added or deleted (0 when everything was already in place, or already gone). Installing for
 * family 6 fails with errno EAFNOSUPPORT in a kernel without IPv6 and EACCES where IPv6 is
 * disabled on the namespace's lo.
 */
export function netnsTransparentRouting(netnsPath: string, install: boolean, family: 4 | 6 = 4): number {
  const result = call(
    family === 6 ? "aa_netns_transparent_routing6" : "aa_netns_transparent_routing",
    [DataType.String, DataType.I32, DataType.I32, DataType.I32, DataType.I32, DataType.I32],
    [netnsPath, TRANSPARENT_MARK, TRANSPARENT_MARK_MASK, TRANSPARENT_ROUTE_TABLE, TRANSPARENT_RULE_PRIORITY, install ? 1 : 0],
  );
  const what = `${install ? "installing" : "removing"} the IPv${family} transparent-source routing in network namespace ${netnsPath}`;
  const ipv6Missing = family === 6 && (result === -os.constants.errno.EACCES || result === -os.constants.errno.EAFNOSUPPORT);
  return check(result, what, ipv6Missing ? "Enable IPv6 in the namespace (net.ipv6.conf.lo.disable_ipv6=0), or ignore this for a pod without IPv6." : NETNS_FIX);
}

/**
 * Sets TRANSPARENT_MARK and IP_TRANSPARENT (IPV6_TRANSPARENT on an IPv6 socket) on an
 * unconnected agent socket and binds it to `ip`, an address of the socket's family, with a port
 * the kernel picks. Returns the port, or undefined when the kernel picked
 * `avoidPort` (the socket is then of no further use, so close it).
 */
export function bindTransparent(fd: number, ip: string, avoidPort = 0): number | undefined {
  const result = call("aa_socket_bind_transparent", [DataType.I32, DataType.I32, DataType.String, DataType.I32], [fd, TRANSPARENT_MARK, ip, avoidPort]);
  const port = check(result, `binding socket fd ${fd} to the client address ${ip}`, NETNS_FIX);
  return port === 0 ? undefined : port;
}

export function closeFd(fd: number): void {
  check(call("aa_close", [DataType.I32], [fd]), `closing fd ${fd}`, "This is a bug in the agent.");
}

/**
 * Places an exclusive or a shared flock(2) lock on the open file `fd` without waiting. Returns
 * false when another open file description holds a conflicting lock. The kernel releases the lock
 * when the last descriptor of this open file description closes or the process dies, whatever PID
 * namespace the holder runs in. `file` names the file in errors.
 */
export function tryFlock(fd: number, mode: "exclusive" | "shared", file: string): boolean {
  const result = call("aa_flock", [DataType.I32, DataType.I32, DataType.I32], [fd, mode === "exclusive" ? 1 : 0, 1]);
  if (result === -os.constants.errno.EWOULDBLOCK) return false;
  check(result, `taking a ${mode} flock on ${file}`, "Keep the lock folder on a local file system that supports flock(2), such as tmpfs under /run.");
  return true;
}

/** Buffer for an address from aa_original_dst: INET6_ADDRSTRLEN (46) and room to spare. */
const ORIGINAL_DESTINATION_BUFFER_SIZE = 64;

/**
 * Returns the destination a connection accepted on fd had before netfilter's REDIRECT rewrote it
 * (SO_ORIGINAL_DST), or undefined when conntrack has no entry for it.
 */
export function originalDestinationOfFd(fd: number): { ip: string; port: number } | undefined {
  const buffer = Buffer.alloc(ORIGINAL_DESTINATION_BUFFER_SIZE);
  const result = call("aa_original_dst", [DataType.I32, DataType.U8Array, DataType.I32], [fd, buffer, buffer.length]);
  if (result === -os.constants.errno.ENOENT) return undefined;
  const port = check(result, `reading the original destination of socket fd ${fd}`, "Check that the connection was redirected by the pod's nftables rules.");
  return { ip: buffer.toString("utf8", 0, buffer.indexOf(0)), port };
}

/** Returns whether libnftables can be loaded, so that nftables scripts can run without the nft tool. */
export function libnftablesAvailable(): boolean {
  return call("aa_nft_available", [], []) === 0;
}

/** Size of the buffer for what nftables prints: a pod's table lists in about 2 KiB. */
const NFTABLES_OUTPUT_SIZE = 64 * 1024;

/**
 * Runs an nftables script (`nft -f` syntax, one transaction) inside the network namespace at
 * netnsPath through libnftables, on a helper thread, and returns what nftables printed (the
 * listing, for a list command). Throws NativeError with nftables' message.
 */
export function runNftablesScript(netnsPath: string, script: string, what: string): string {
  const buffer = Buffer.alloc(NFTABLES_OUTPUT_SIZE);
  const result = call("aa_nft_run", [DataType.String, DataType.String, DataType.U8Array, DataType.I32], [netnsPath, script, buffer, buffer.length]);
  const length = check(result, what, "Check that the kernel has nf_tables with nat, reject and socket support.");
  return buffer.toString("utf8", 0, length);
}
