// Names and byte layouts of the IPv6 capture maps, shared with bpf/lib/enrolled6.h,
// orig_dst6.h, inbound6.h and own_conns6.h. STRUCT_LAYOUTS in layout.ts lists the structs, so
// that test/unit/capture-layout.test.ts checks them against the prebuilt object's BTF.
import net from "node:net";
import os from "node:os";

import { canonicalIp } from "../../state/ip";
import { encodeCookie, STRUCT_LAYOUTS } from "../layout";

export const MAP_ENROLLED6 = "aa_enrolled6";
export const MAP_ORIGINAL_DESTINATION6 = "aa_orig_dst6";
export const MAP_SOCKET_ORIGINAL_DESTINATION6 = "aa_sk_orig6";
export const MAP_INBOUND_PODS6 = "aa_inbound_pods6";
export const MAP_INBOUND_LISTENERS6 = "aa_inbound6";
export const MAP_OWN_CONNECTIONS6 = "aa_own_conns6";

/** Size of an IPv6 address in a map: 16 bytes in network byte order. */
export const IPV6_SIZE = 16;

const littleEndian = os.endianness() === "LE";

/**
 * Tells whether `ip` is a native IPv6 address: IPv6 text that is not IPv4-mapped
 * (::ffff:a.b.c.d), because capture treats a mapped address as the IPv4 one.
 */
export function isNativeIpv6(ip: string): boolean {
  return net.isIPv6(ip) && net.isIPv6(canonicalIp(ip));
}

/** Writes a native IPv6 address in network byte order. Throws on any other input. */
export function writeIpv6(buffer: Buffer, offset: number, ip: string): void {
  if (!isNativeIpv6(ip)) {
    throw new TypeError(`invalid IPv6 address ${JSON.stringify(ip)}: expected a native IPv6 address, not IPv4 or IPv4-mapped`);
  }
  const text = canonicalIp(ip);
  const [head, tail] = text.includes("::") ? text.split("::") : [text, undefined];
  const headGroups = head === "" ? [] : head.split(":");
  const tailGroups = tail === undefined || tail === "" ? [] : tail.split(":");
  const zeros = tail === undefined ? [] : new Array<string>(8 - headGroups.length - tailGroups.length).fill("0");
  [...headGroups, ...zeros, ...tailGroups].forEach((group, index) => buffer.writeUInt16BE(parseInt(group, 16), offset + index * 2));
}

/** Reads an IPv6 address in network byte order and returns its canonical (compressed) text. */
export function readIpv6(buffer: Buffer, offset: number): string {
  const groups: string[] = [];
  for (let index = 0; index < 8; index++) groups.push(buffer.readUInt16BE(offset + index * 2).toString(16));
  return canonicalIp(groups.join(":"));
}

function writeHostU16(buffer: Buffer, offset: number, value: number, fieldName: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 65535) {
    throw new RangeError(`invalid ${fieldName} ${value}: expected an integer from 0 to 65535`);
  }
  if (littleEndian) buffer.writeUInt16LE(value, offset);
  else buffer.writeUInt16BE(value, offset);
}

function readHostU64(buffer: Buffer, offset: number): bigint {
  return littleEndian ? buffer.readBigUInt64LE(offset) : buffer.readBigUInt64BE(offset);
}

/** Value of aa_enrolled6: the pod's IPv6 address. */
export function encodePodInfo6(podIp6: string): Buffer {
  const layout = STRUCT_LAYOUTS.aa_pod_info6;
  const buffer = Buffer.alloc(layout.size);
  writeIpv6(buffer, layout.offsets.pod_ip6, podIp6);
  return buffer;
}

export function decodePodInfo6(buffer: Buffer): { podIp6: string } {
  return { podIp6: readIpv6(buffer, STRUCT_LAYOUTS.aa_pod_info6.offsets.pod_ip6) };
}

/**
 * Key of aa_orig_dst6: the pod's netns cookie and the application socket's local address, which
 * is the peer address of the connection the outbound proxy accepted on [podIPv6]:15001. The
 * port is in the CPU's byte order, as sockops reads it.
 */
export function encodeOriginalDestination6Key(cookie: bigint, sourceIp: string, sourcePort: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_orig_dst6_key;
  const buffer = Buffer.alloc(layout.size);
  encodeCookie(cookie).copy(buffer, layout.offsets.netns_cookie);
  writeIpv6(buffer, layout.offsets.local_ip6, sourceIp);
  writeHostU16(buffer, layout.offsets.local_port, sourcePort, "source port");
  return buffer;
}

/** Value of aa_orig_dst6 and aa_sk_orig6: the IPv6 address and port the application dialled. */
export function decodeOriginalDestination6(buffer: Buffer): { ip: string; port: number } {
  const layout = STRUCT_LAYOUTS.aa_orig_dst6;
  return { ip: readIpv6(buffer, layout.offsets.ip6), port: buffer.readUInt16BE(layout.offsets.port) };
}

export function encodeOriginalDestination6(ip: string, port: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_orig_dst6;
  const buffer = Buffer.alloc(layout.size);
  writeIpv6(buffer, layout.offsets.ip6, ip);
  buffer.writeUInt16BE(port, layout.offsets.port);
  return buffer;
}

/** Key of aa_inbound_pods6: the pod's IPv6 address. */
export function encodeIpv6Key(ip: string): Buffer {
  const buffer = Buffer.alloc(STRUCT_LAYOUTS.aa_ip6_key.size);
  writeIpv6(buffer, STRUCT_LAYOUTS.aa_ip6_key.offsets.ip6, ip);
  return buffer;
}

export function decodeIpv6Key(buffer: Buffer): string {
  return readIpv6(buffer, STRUCT_LAYOUTS.aa_ip6_key.offsets.ip6);
}

/**
 * Value of aa_inbound_pods6: the pod's netns cookie, and its IPv4 address, under which
 * aa_excluded_ports keeps the pod's excluded ports ("0.0.0.0" for none).
 */
export function encodeInboundPod6(cookie: bigint, podIp4: string): Buffer {
  const layout = STRUCT_LAYOUTS.aa_inbound_pod6;
  const buffer = Buffer.alloc(layout.size);
  encodeCookie(cookie).copy(buffer, layout.offsets.netns_cookie);
  if (!net.isIPv4(podIp4)) throw new TypeError(`invalid IPv4 address ${JSON.stringify(podIp4)}: expected the pod's IPv4 address`);
  podIp4.split(".").forEach((part, index) => buffer.writeUInt8(Number(part), layout.offsets.pod_ip4 + index));
  return buffer;
}

export function decodeInboundPod6(buffer: Buffer): { cookie: bigint; podIp4: string } {
  const layout = STRUCT_LAYOUTS.aa_inbound_pod6;
  const ip4 = [0, 1, 2, 3].map((index) => buffer.readUInt8(layout.offsets.pod_ip4 + index)).join(".");
  return { cookie: readHostU64(buffer, layout.offsets.netns_cookie), podIp4: ip4 };
}

/** Key of aa_inbound6: the pod's IPv6 address and the listener port (host byte order). */
export function encodeInbound6Key(podIp6: string, port: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_inbound6_key;
  const buffer = Buffer.alloc(layout.size);
  writeIpv6(buffer, layout.offsets.ip6, podIp6);
  writeHostU16(buffer, layout.offsets.port, port, "listener port");
  return buffer;
}

/** Key of aa_own_conns6, seen from the agent's connecting socket, with ports in host byte order. */
export function encodeOwnConnection6Key(sourceIp: string, sourcePort: number, podIp6: string, podPort: number): Buffer {
  const layout = STRUCT_LAYOUTS.aa_conn6_key;
  const buffer = Buffer.alloc(layout.size);
  writeIpv6(buffer, layout.offsets.src_ip6, sourceIp);
  writeIpv6(buffer, layout.offsets.dst_ip6, podIp6);
  writeHostU16(buffer, layout.offsets.src_port, sourcePort, "source port");
  writeHostU16(buffer, layout.offsets.dst_port, podPort, "destination port");
  return buffer;
}
