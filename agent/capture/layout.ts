// Names, constants and byte layouts shared with the eBPF programs in bpf/. The C side is
// bpf/lib/config.h, enrolled.h, orig_dst.h, inbound.h, own_conns.h and agent_socks.h; test/unit/capture-layout.test.ts
// checks this file against the BTF of the prebuilt object and against config.h.
import net from "node:net";
import os from "node:os";

/**
 * SO_MARK of every socket the agent opens inside a pod, for routing rules and operators. The
 * programs do not trust it (CAP_NET_RAW is enough to set it): they skip only the sockets flagged
 * in aa_agent_socks.
 */
export const AGENT_MARK = 0x539;

/**
 * SO_MARK of the inbound proxy's transparent sockets to the application, which carry the
 * client's IP as their source. Inside each enrolled pod, the rule `fwmark
 * TRANSPARENT_MARK/TRANSPARENT_MARK_MASK lookup TRANSPARENT_ROUTE_TABLE` at priority
 * TRANSPARENT_RULE_PRIORITY sends packets with this mark to a table whose one route makes every
 * address local, so the application's replies to the client stay in the pod.
 * AGENT_MARK does not match the mask, so the agent's other sockets route as usual.
 */
export const TRANSPARENT_MARK = 0x1539;
export const TRANSPARENT_MARK_MASK = 0xffff;
export const TRANSPARENT_ROUTE_TABLE = 100;
/** Before the main table's rule (32766), so the rule applies first. */
export const TRANSPARENT_RULE_PRIORITY = 32765;

/** Value of a socket's entry in aa_agent_socks: the socket is the agent's. */
export const AGENT_SOCKET_FLAG = 1;

/** Proxy ports inside every enrolled pod. */
export const OUTBOUND_PORT = 15001;
export const INBOUND_PLAINTEXT_PORT = 15006;
export const INBOUND_HBONE_PORT = 15008;

export const MAP_ENROLLED = "aa_enrolled";
export const MAP_ORIGINAL_DESTINATION = "aa_orig_dst";
export const MAP_SOCKET_ORIGINAL_DESTINATION = "aa_sk_orig";
export const MAP_INBOUND_PODS = "aa_inbound_pods";
export const MAP_INBOUND_LISTENERS = "aa_inbound";
export const MAP_OWN_CONNECTIONS = "aa_own_conns";
/** Socket storage that flags the agent's own sockets; written only from user space (netnsSocket). */
export const MAP_AGENT_SOCKETS = "aa_agent_socks";
/** Source addresses of kubelet health probes, which sk_lookup lets through to the application. */
export const MAP_PROBE_SOURCES = "aa_probe_sources";
/** Ports that pod annotations exclude from capture, per pod IPv4 address and direction. */
export const MAP_EXCLUDED_PORTS = "aa_excluded_ports";

/** Maximum entries of aa_probe_sources and aa_excluded_ports (AA_MAX_PROBE_SOURCES, AA_MAX_EXCLUDED_PORTS). */
export const MAX_PROBE_SOURCES = 16;
export const MAX_EXCLUDED_PORTS = 16384;

/** Direction byte of an aa_excluded_ports key (AA_DIRECTION_INBOUND, AA_DIRECTION_OUTBOUND). */
export const DIRECTION_CODES = { inbound: 1, outbound: 2 } as const;

/** Cgroup programs in bpf/capture.bpf.o; each one's link is pinned at <pinRoot>/links/<name>. */
export const PROGRAM_NAMES = [
  "aa_connect4",
  "aa_connect6",
  "aa_sockops",
  "aa_getpeername4",
  "aa_getpeername6",
  "aa_bind4",
  "aa_bind6",
] as const;

/**
 * The sk_lookup program, pinned at <pinRoot>/progs/<name> and linked to each pod's network
 * namespace with a link pinned at <pinRoot>/links/<inboundLinkName(cookie)>.
 */
export const INBOUND_PROGRAM_NAME = "aa_sk_lookup";

/** Byte offsets and sizes of the C structs, as `struct name { field }` in bpf/lib. */
export const STRUCT_LAYOUTS = {
  aa_pod_info: { size: 8, offsets: { pod_ip4: 0, flags: 4 } },
  aa_orig_dst_key: { size: 16, offsets: { netns_cookie: 0, local_ip4: 8, local_port: 12, pad: 14 } },
  aa_orig_dst: { size: 8, offsets: { ip4: 0, port: 4, pad: 6 } },
  aa_inbound_pod: { size: 8, offsets: { netns_cookie: 0 } },
  aa_inbound_key: { size: 8, offsets: { ip4: 0, port: 4, pad: 6 } },
  aa_conn_key: { size: 12, offsets: { src_ip4: 0, dst_ip4: 4, src_port: 8, dst_port: 10 } },
  aa_agent_sock: { size: 4, offsets: { flags: 0 } },
  // IPv6 capture (ebpf/layout-ip6.ts).
  aa_pod_info6: { size: 16, offsets: { pod_ip6: 0 } },
  aa_orig_dst6_key: { size: 32, offsets: { netns_cookie: 0, local_ip6: 8, local_port: 24, pad: 26, pad2: 28 } },
  aa_orig_dst6: { size: 20, offsets: { ip6: 0, port: 16, pad: 18 } },
  aa_ip6_key: { size: 16, offsets: { ip6: 0 } },
  aa_inbound_pod6: { size: 16, offsets: { netns_cookie: 0, pod_ip4: 8, pad: 12 } },
  aa_inbound6_key: { size: 20, offsets: { ip6: 0, port: 16, pad: 18 } },
  aa_conn6_key: { size: 36, offsets: { src_ip6: 0, dst_ip6: 16, src_port: 32, dst_port: 34 } },
  aa_probe_source_key: { size: 16, offsets: { ip6: 0 } },
  aa_excluded_port_key: { size: 8, offsets: { pod_ip4: 0, port: 4, direction: 6, pad: 7 } },
} as const;

/** Key size of aa_inbound_pods: an IPv4 address in network byte order. */
export const IPV4_KEY_SIZE = 4;
/** Value size of aa_inbound: a u64 file descriptor on update, the socket cookie on lookup. */
export const LISTENER_VALUE_SIZE = 8;

/** Key size of aa_enrolled: a u64 netns cookie. */
export const COOKIE_SIZE = 8;

const littleEndian = os.endianness() === "LE";

/** Encodes a netns cookie in the CPU's byte order, which is how the kernel reads a u64 map key. */
export function encodeCookie(cookie: bigint): Buffer {
  const buffer = Buffer.alloc(COOKIE_SIZE);
  if (littleEndian) buffer.writeBigUInt64LE(cookie);
  else buffer.writeBigUInt64BE(cookie);
  return buffer;
}

export function decodeCookie(buffer: Buffer): bigint {
  return littleEndian ? buffer.readBigUInt64LE(0) : buffer.readBigUInt64BE(0);
}

/** Writes a dotted IPv4 address in network byte order; throws on anything else. */
function writeIpv4(buffer: Buffer, offset: number, ip: string): void {
  if (!net.isIPv4(ip)) {
    throw new TypeError(`invalid IPv4 address ${JSON.stringify(ip)}: capture handles IPv4 pods only`);
  }
  ip.split(".").forEach((part, index) => buffer.writeUInt8(Number(part), offset + index));
}

function readIpv4(buffer: Buffer, offset: number): string {
  return [0, 1, 2, 3].map((index) => buffer.readUInt8(offset + index)).join(".");
}

function writeHostU16(buffer: Buffer, offset: number, value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 65535) {
    throw new RangeError(`invalid ${what} ${value}: expected an integer from 0 to 65535`);
  }
  if (littleEndian) buffer.writeUInt16LE(value, offset);
  else buffer.writeUInt16BE(value, offset);
}

function writeHostU64(buffer: Buffer, offset: number, value: bigint): void {
  if (littleEndian) buffer.writeBigUInt64LE(value, offset);
  else buffer.writeBigUInt64BE(value, offset);
}

function readHostU64(buffer: Buffer, offset: number): bigint {
  return littleEndian ? buffer.readBigUInt64LE(offset) : buffer.readBigUInt64BE(offset);
}

/** Value of aa_enrolled for a pod: its IPv4 address and no flags. */
export function encodePodInfo(podIp: string): Buffer {
  const layout = STRUCT_LAYOUTS.aa_pod_info;
  const buffer = Buffer.alloc(layout.size);
  writeIpv4(buffer, layout.offsets.pod_ip4, podIp);
  return buffer;
}

export function decodePodInfo(buffer: Buffer): { podIp: string; flags: number } {
  const layout = STRUCT_LAYOUTS.aa_pod_info;
  const flags = littleEndian ? buffer.readUInt32LE(layout.offsets.flags) : buffer.readUInt32BE(layout.offsets.flags);
  return { podIp: readIpv4(buffer, layout.offsets.pod_ip4), flags };
}

/**
 * Key of aa_orig_dst: the pod's netns cookie and the application socket's local address,
 * which is the peer address of the connection the outbound proxy accepted. sockops reads the
 * local port in host byte order, so the port is written in the CPU's byte order.
 */
export function encodeOriginalDestinationKey(cookie: bigint, sourceIp: string, sourcePort: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_orig_dst_key;
  const buffer = Buffer.alloc(layout.size);
  if (!Number.isInteger(sourcePort) || sourcePort < 0 || sourcePort > 65535) {
    throw new RangeError(`invalid source port ${sourcePort}: expected an integer from 0 to 65535`);
  }
  encodeCookie(cookie).copy(buffer, layout.offsets.netns_cookie);
  writeIpv4(buffer, layout.offsets.local_ip4, sourceIp);
  if (littleEndian) buffer.writeUInt16LE(sourcePort, layout.offsets.local_port);
  else buffer.writeUInt16BE(sourcePort, layout.offsets.local_port);
  return buffer;
}

/** Value of aa_orig_dst and aa_sk_orig: the address and port the application dialled, both in network byte order. */
export function decodeOriginalDestination(buffer: Buffer): { ip: string; port: number } {
  const layout = STRUCT_LAYOUTS.aa_orig_dst;
  return { ip: readIpv4(buffer, layout.offsets.ip4), port: buffer.readUInt16BE(layout.offsets.port) };
}

export function encodeOriginalDestination(ip: string, port: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_orig_dst;
  const buffer = Buffer.alloc(layout.size);
  writeIpv4(buffer, layout.offsets.ip4, ip);
  buffer.writeUInt16BE(port, layout.offsets.port);
  return buffer;
}

/** Key of aa_inbound_pods: the pod's IPv4 address in network byte order. */
export function encodeIpv4Key(ip: string): Buffer {
  const buffer = Buffer.alloc(IPV4_KEY_SIZE);
  writeIpv4(buffer, 0, ip);
  return buffer;
}

export function decodeIpv4Key(buffer: Buffer): string {
  return readIpv4(buffer, 0);
}

/** Value of aa_inbound_pods: the netns cookie of the pod that has the key's IP. */
export function encodeInboundPod(cookie: bigint): Buffer {
  const layout = STRUCT_LAYOUTS.aa_inbound_pod;
  const buffer = Buffer.alloc(layout.size);
  writeHostU64(buffer, layout.offsets.netns_cookie, cookie);
  return buffer;
}

export function decodeInboundPod(buffer: Buffer): { cookie: bigint } {
  return { cookie: readHostU64(buffer, STRUCT_LAYOUTS.aa_inbound_pod.offsets.netns_cookie) };
}

/** Key of aa_inbound: the pod's IPv4 address (network byte order) and the listener port (host byte order). */
export function encodeInboundKey(podIp: string, port: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_inbound_key;
  const buffer = Buffer.alloc(layout.size);
  writeIpv4(buffer, layout.offsets.ip4, podIp);
  writeHostU16(buffer, layout.offsets.port, port, "listener port");
  return buffer;
}

/** Value of an aa_inbound update: the listener's file descriptor as a u64 in the CPU's byte order. */
export function encodeListenerFd(fd: number): Buffer {
  if (!Number.isInteger(fd) || fd < 0) {
    throw new RangeError(`invalid file descriptor ${fd}: expected a non-negative integer`);
  }
  const buffer = Buffer.alloc(LISTENER_VALUE_SIZE);
  writeHostU64(buffer, 0, BigInt(fd));
  return buffer;
}

/**
 * Key of aa_own_conns, seen from the agent's connecting socket: its local address and the
 * pod address it connects to. Ports are in host byte order, as sk_lookup compares them.
 */
export function encodeOwnConnectionKey(sourceIp: string, sourcePort: number, podIp: string, podPort: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_conn_key;
  const buffer = Buffer.alloc(layout.size);
  writeIpv4(buffer, layout.offsets.src_ip4, sourceIp);
  writeIpv4(buffer, layout.offsets.dst_ip4, podIp);
  writeHostU16(buffer, layout.offsets.src_port, sourcePort, "source port");
  writeHostU16(buffer, layout.offsets.dst_port, podPort, "destination port");
  return buffer;
}

/** Name of the pinned sk_lookup link of the pod network namespace with this cookie. */
export function inboundLinkName(cookie: bigint): string {
  return `sk_lookup-${cookie}`;
}

/** Returns the cookie in a pinned sk_lookup link's name, or undefined for other names. */
export function parseInboundLinkName(name: string): bigint | undefined {
  const match = /^sk_lookup-(\d+)$/.exec(name);
  return match ? BigInt(match[1]) : undefined;
}
