// Capture exemptions: connections that the eBPF programs let through uncaptured. Two pinned maps
// (bpf/lib/exempt.h):
//   maps/aa_probe_sources   kubelet probe source addresses; sk_lookup passes inbound connections
//                           from them to the application
//   maps/aa_excluded_ports  {pod IPv4, port, direction}: ports a pod's annotations exclude;
//                           connect4/connect6 pass outbound connections to them, sk_lookup inbound ones
// The proxy ports 15001, 15006 and 15008 are never exempt: this file rejects them, and the
// programs ignore them in aa_excluded_ports.
import os from "node:os";
import path from "node:path";

import { AgentError } from "../../errors";
import type { Direction } from "../../state/types";
import { formatIpBytes, ipBytes, ipv6OrMappedBytes } from "../ip-bytes";
import {
  DIRECTION_CODES,
  INBOUND_HBONE_PORT,
  INBOUND_PLAINTEXT_PORT,
  MAP_EXCLUDED_PORTS,
  MAP_PROBE_SOURCES,
  MAX_EXCLUDED_PORTS,
  MAX_PROBE_SOURCES,
  OUTBOUND_PORT,
  STRUCT_LAYOUTS,
} from "../layout";
import { closeFd } from "../native";
import { mapDelete, mapKeys, mapOpen, mapUpdate } from "./native-bpf";

/**
 * The addresses that istio-cni SNATs kubelet health probes to, IPv4 and IPv6. The node must make
 * kubelet's probes come from one of them: the agent installs no SNAT rule itself.
 */
export const DEFAULT_PROBE_SOURCES = ["169.254.7.127", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"] as const;

/** The agent's proxy ports, which no annotation can exclude from capture. */
export const PROXY_PORTS: readonly number[] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT];

/** Ports excluded from capture for one pod, each list sorted and without duplicates. */
export interface ExcludedPorts {
  inbound: number[];
  outbound: number[];
}

export const NO_EXCLUDED_PORTS: ExcludedPorts = { inbound: [], outbound: [] };

const littleEndian = os.endianness() === "LE";

/** Map values are reserved and zero. */
const ZERO_VALUE = Buffer.alloc(4);

/** Key of aa_probe_sources: the address as 16 bytes, an IPv4 address in its IPv4-mapped form. */
export function encodeProbeSourceKey(ip: string): Buffer {
  return ipv6OrMappedBytes(ip);
}

export function decodeProbeSourceKey(key: Buffer): string {
  const text = formatIpBytes(key);
  return text.startsWith("::ffff:") && text.includes(".") ? text.slice("::ffff:".length) : text;
}

/** Key of aa_excluded_ports: pod IPv4 (network byte order), port (host byte order), direction byte. */
export function encodeExcludedPortKey(podIp: string, port: number, direction: Direction): Buffer {
  const layout = STRUCT_LAYOUTS.aa_excluded_port_key;
  const address = ipBytes(podIp);
  if (address.length !== 4) {
    throw new TypeError(`invalid pod IPv4 address ${JSON.stringify(podIp)}: port exclusions are kept for IPv4 pods only`);
  }
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new RangeError(`invalid port ${port}: expected an integer from 1 to 65535`);
  }
  const buffer = Buffer.alloc(layout.size);
  address.copy(buffer, layout.offsets.pod_ip4);
  if (littleEndian) buffer.writeUInt16LE(port, layout.offsets.port);
  else buffer.writeUInt16BE(port, layout.offsets.port);
  buffer.writeUInt8(DIRECTION_CODES[direction], layout.offsets.direction);
  return buffer;
}

export function decodeExcludedPortKey(key: Buffer): { podIp: string; port: number; direction: Direction } {
  const offsets = STRUCT_LAYOUTS.aa_excluded_port_key.offsets;
  const port = littleEndian ? key.readUInt16LE(offsets.port) : key.readUInt16BE(offsets.port);
  const code = key.readUInt8(offsets.direction);
  return {
    podIp: formatIpBytes(key.subarray(offsets.pod_ip4, offsets.pod_ip4 + 4)),
    port,
    direction: code === DIRECTION_CODES.inbound ? "inbound" : "outbound",
  };
}

export class CaptureExemptions {
  private probeSourcesFd: number;
  private excludedPortsFd: number;

  private constructor(probeSourcesFd: number, excludedPortsFd: number) {
    this.probeSourcesFd = probeSourcesFd;
    this.excludedPortsFd = excludedPortsFd;
  }

  /** Opens the pinned exemption maps, which Capture.attach must have pinned. */
  static open(pinRoot: string): CaptureExemptions {
    const probeSourcesFd = mapOpen(path.join(pinRoot, "maps", MAP_PROBE_SOURCES));
    try {
      return new CaptureExemptions(probeSourcesFd, mapOpen(path.join(pinRoot, "maps", MAP_EXCLUDED_PORTS)));
    } catch (error) {
      closeFd(probeSourcesFd);
      throw error;
    }
  }

  /**
   * Makes aa_probe_sources contain exactly these addresses: adds the missing ones, then deletes
   * those an earlier run left that are not in the list. Throws on an invalid address or on more
   * than MAX_PROBE_SOURCES addresses, before changing anything.
   */
  setProbeSources(addresses: readonly string[]): void {
    const wanted = new Map(addresses.map((ip) => [encodeProbeSourceKey(ip).toString("hex"), ip]));
    if (wanted.size > MAX_PROBE_SOURCES) {
      throw new AgentError("INTERNAL", `${wanted.size} probe source addresses given: at most ${MAX_PROBE_SOURCES} fit in ${MAP_PROBE_SOURCES}`);
    }
    for (const hex of wanted.keys()) {
      mapUpdate(this.probeSourcesFd, Buffer.from(hex, "hex"), ZERO_VALUE, `adding probe source ${wanted.get(hex)} to ${MAP_PROBE_SOURCES}`);
    }
    for (const key of this.probeSourceKeys()) {
      if (!wanted.has(key.toString("hex"))) mapDelete(this.probeSourcesFd, key);
    }
  }

  /** Lists the probe source addresses in aa_probe_sources. */
  probeSources(): string[] {
    return this.probeSourceKeys().map(decodeProbeSourceKey);
  }

  /**
   * Makes aa_excluded_ports hold exactly `ports` for the pod at podIp: adds the new entries first,
   * then deletes the pod's entries that are no longer wanted. Throws on a proxy port.
   */
  setExcludedPorts(podIp: string, ports: ExcludedPorts): void {
    const wanted = new Set<string>();
    for (const direction of ["inbound", "outbound"] as const) {
      for (const port of ports[direction]) {
        if (PROXY_PORTS.includes(port)) {
          throw new AgentError("INTERNAL", `port ${port} of pod ${podIp} cannot be excluded from capture: it is a proxy port`);
        }
        wanted.add(encodeExcludedPortKey(podIp, port, direction).toString("hex"));
      }
    }
    for (const hex of wanted) {
      mapUpdate(
        this.excludedPortsFd,
        Buffer.from(hex, "hex"),
        ZERO_VALUE,
        `adding an excluded port of pod ${podIp} to ${MAP_EXCLUDED_PORTS}`,
        `The map holds at most ${MAX_EXCLUDED_PORTS} ports for all pods together; exclude fewer ports.`,
      );
    }
    for (const key of this.excludedPortKeys()) {
      if (decodeExcludedPortKey(key).podIp === podIp && !wanted.has(key.toString("hex"))) mapDelete(this.excludedPortsFd, key);
    }
  }

  /** Deletes every excluded port of the pod at podIp. */
  clearExcludedPorts(podIp: string): void {
    this.setExcludedPorts(podIp, NO_EXCLUDED_PORTS);
  }

  /** Lists the excluded ports in aa_excluded_ports by pod IP, each list sorted. */
  excludedPorts(): Map<string, ExcludedPorts> {
    const byPod = new Map<string, ExcludedPorts>();
    for (const key of this.excludedPortKeys()) {
      const entry = decodeExcludedPortKey(key);
      const ports = byPod.get(entry.podIp) ?? { inbound: [], outbound: [] };
      ports[entry.direction].push(entry.port);
      byPod.set(entry.podIp, ports);
    }
    for (const ports of byPod.values()) {
      ports.inbound.sort((a, b) => a - b);
      ports.outbound.sort((a, b) => a - b);
    }
    return byPod;
  }

  /** Closes this process's map file descriptors. The pins and entries stay. */
  close(): void {
    for (const fd of [this.probeSourcesFd, this.excludedPortsFd]) {
      if (fd >= 0) closeFd(fd);
    }
    this.probeSourcesFd = -1;
    this.excludedPortsFd = -1;
  }

  private probeSourceKeys(): Buffer[] {
    return mapKeys(this.probeSourcesFd, STRUCT_LAYOUTS.aa_probe_source_key.size, 2 * MAX_PROBE_SOURCES);
  }

  private excludedPortKeys(): Buffer[] {
    return mapKeys(this.excludedPortsFd, STRUCT_LAYOUTS.aa_excluded_port_key.size, 2 * MAX_EXCLUDED_PORTS);
  }
}
