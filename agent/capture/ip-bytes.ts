// IP addresses as the eBPF programs read them: raw bytes in network byte order.
import net from "node:net";

/** Returns the 4 bytes of an IPv4 address or the 16 bytes of an IPv6 address; throws on anything else. */
export function ipBytes(ip: string): Buffer {
  if (net.isIPv4(ip)) return Buffer.from(ip.split(".").map(Number));
  if (net.isIPv6(ip)) return Buffer.from(ipv6Groups(ip).flatMap((group) => [group >> 8, group & 0xff]));
  throw new TypeError(`invalid IP address ${JSON.stringify(ip)}: expected an IPv4 or IPv6 address`);
}

/** Returns the 16 bytes of an IPv6 address, and of an IPv4 address in its IPv4-mapped form ::ffff:a.b.c.d. */
export function ipv6OrMappedBytes(ip: string): Buffer {
  const bytes = ipBytes(ip);
  if (bytes.length === 16) return bytes;
  return Buffer.concat([Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]), bytes]);
}

/** Formats 4 or 16 address bytes; an IPv4-mapped IPv6 address comes out as ::ffff:a.b.c.d. Throws TypeError on any other length. */
export function formatIpBytes(bytes: Buffer): string {
  if (bytes.length === 4) return [...bytes].join(".");
  if (bytes.length !== 16) {
    throw new TypeError(`invalid IP address bytes ${bytes.toString("hex")}: expected 4 (IPv4) or 16 (IPv6) bytes, found ${bytes.length}`);
  }
  const isMapped = bytes.subarray(0, 10).every((byte) => byte === 0) && bytes[10] === 0xff && bytes[11] === 0xff;
  if (isMapped) return `::ffff:${[...bytes.subarray(12)].join(".")}`;
  const groups: string[] = [];
  for (let offset = 0; offset < 16; offset += 2) groups.push(bytes.readUInt16BE(offset).toString(16));
  // SocketAddress returns the compressed form ("::1").
  return new net.SocketAddress({ address: groups.join(":"), family: "ipv6" }).address;
}

/** Expands an IPv6 address that net.isIPv6 accepted (with "::" or a dotted IPv4 tail) to 8 groups. */
function ipv6Groups(ip: string): number[] {
  let text = ip.replace(/%.*$/, "");
  const dotted = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted.slice(1).map(Number);
    text = `${text.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const halves = text.split("::");
  const head = halves[0] === "" ? [] : halves[0].split(":");
  const tail = halves.length < 2 || halves[1] === "" ? [] : halves[1].split(":");
  const zeros = halves.length < 2 ? [] : new Array<string>(8 - head.length - tail.length).fill("0");
  return [...head, ...zeros, ...tail].map((group) => parseInt(group, 16));
}
