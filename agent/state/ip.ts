// IP address helpers shared by the state indexes and authorization: one canonical text form per
// address (so "::FFFF:10.0.0.1", "::ffff:a00:1" and "10.0.0.1" are the same key) and CIDR matching.

import net from "node:net";

export interface Cidr {
  /** The address as written, before masking. */
  address: string;
  prefix: number;
  family: 4 | 6;
}

const MAPPED_DOTTED = /^::ffff:(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})$/;
const MAPPED_HEX = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/;

/**
 * Returns the canonical text of an address: IPv4 dotted quad for IPv4 and IPv4-mapped IPv6,
 * RFC 5952 lowercase compressed form for other IPv6. Returns the input unchanged when it is not an IP.
 */
export function canonicalIp(ip: string): string {
  const family = net.isIP(ip);
  if (family !== 6) return ip;
  let text = ip.toLowerCase();
  const dotted = MAPPED_DOTTED.exec(text);
  if (dotted && net.isIPv4(dotted[1])) return dotted[1];
  try {
    text = new URL(`http://[${text}]/`).hostname.slice(1, -1);
  } catch {
    return ip;
  }
  const hex = MAPPED_HEX.exec(text);
  if (hex) {
    const high = parseInt(hex[1], 16);
    const low = parseInt(hex[2], 16);
    return `${high >> 8}.${high & 0xff}.${low >> 8}.${low & 0xff}`;
  }
  return text;
}

/**
 * Parses "10.0.0.0/8", "fd00::/8" or a single address; undefined when invalid. An IPv6 zone id
 * ("fe80::1%eth0") is invalid: it names an interface of one host, not addresses of the mesh.
 */
export function parseCidr(text: string): Cidr | undefined {
  const slash = text.indexOf("/");
  const address = slash === -1 ? text : text.slice(0, slash);
  const family = net.isIP(address) as 0 | 4 | 6;
  if (family === 0 || address.includes("%")) return undefined;
  const maxPrefix = family === 4 ? 32 : 128;
  if (slash === -1) return { address, prefix: maxPrefix, family };
  const prefixText = text.slice(slash + 1);
  if (!/^\d{1,3}$/.test(prefixText)) return undefined;
  const prefix = Number(prefixText);
  if (prefix > maxPrefix) return undefined;
  return { address, prefix, family };
}

/** Tells whether `ip` lies inside `cidr`; IPv4-mapped IPv6 addresses count as IPv4. */
export function cidrContains(cidr: Cidr, ip: string): boolean {
  const canonical = canonicalIp(ip);
  const family = net.isIP(canonical);
  const base = canonicalIp(cidr.address);
  const baseFamily = net.isIP(base);
  if (family === 0 || family !== baseFamily) return false;
  // A mapped IPv6 block such as ::ffff:10.0.0.0/104 becomes its IPv4 equivalent.
  const prefix = baseFamily === 4 && cidr.family === 6 ? Math.max(0, cidr.prefix - 96) : cidr.prefix;
  const bits = family === 4 ? 32 : 128;
  const shift = BigInt(bits - prefix);
  return ipToBigInt(canonical, family) >> shift === ipToBigInt(base, baseFamily) >> shift;
}

function ipToBigInt(ip: string, family: number): bigint {
  if (family === 4) {
    return ip.split(".").reduce((value, octet) => (value << 8n) | BigInt(Number(octet)), 0n);
  }
  const [head, tail] = ip.includes("::") ? ip.split("::") : [ip, undefined];
  const headGroups = head === "" ? [] : head.split(":");
  const tailGroups = tail === undefined || tail === "" ? [] : tail.split(":");
  const groups = tail === undefined ? headGroups : [...headGroups, ...Array(8 - headGroups.length - tailGroups.length).fill("0"), ...tailGroups];
  return groups.reduce((value, group) => (value << 16n) | BigInt(parseInt(group, 16)), 0n);
}

/** Returns every IP of a workload (Workload.ips, or [ip] when absent), canonical, primary first; [] without an address. */
export function workloadIps(workload: { ip: string; ips?: readonly string[] }): string[] {
  const ips = workload.ips ?? (workload.ip === "" ? [] : [workload.ip]);
  return [...new Set(ips.map(canonicalIp))];
}

/** Returns the workload's first IP of the family (4 or 6), canonical; undefined when it has none. */
export function workloadIpOfFamily(workload: { ip: string; ips?: readonly string[] }, family: 4 | 6): string | undefined {
  return workloadIps(workload).find((ip) => net.isIP(ip) === family);
}

/** Tells whether `ip`, in any text form, is one of the workload's IPs. */
export function hasWorkloadIp(workload: { ip: string; ips?: readonly string[] }, ip: string): boolean {
  return workloadIps(workload).includes(canonicalIp(ip));
}
