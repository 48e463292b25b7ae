// The Linux capabilities the agent runs with, read from /proc/self/status, and the ones it
// cannot start without.
import fs from "node:fs";

/** Capability numbers from linux/capability.h, for the capabilities the agent uses or reports. */
export const CAPABILITY_NUMBERS = {
  CAP_DAC_OVERRIDE: 1,
  CAP_NET_ADMIN: 12,
  CAP_NET_RAW: 13,
  CAP_SYS_PTRACE: 19,
  CAP_SYS_ADMIN: 21,
  CAP_BPF: 39,
} as const;

export type CapabilityName = keyof typeof CAPABILITY_NUMBERS;

/** The effective capability set. `has` returns whether it contains one capability. */
export interface EffectiveCapabilities {
  has(name: CapabilityName): boolean;
}

/** Parses the CapEff line of a /proc/PID/status text; undefined when the line is missing. */
export function parseEffectiveCapabilities(statusText: string): EffectiveCapabilities | undefined {
  const match = /^CapEff:\s*([0-9a-f]+)$/m.exec(statusText);
  if (match === null) return undefined;
  const effective = BigInt(`0x${match[1]}`);
  return { has: (name) => (effective & (1n << BigInt(CAPABILITY_NUMBERS[name]))) !== 0n };
}

/** Reads the effective capabilities of this process; undefined off Linux. */
export function readEffectiveCapabilities(): EffectiveCapabilities | undefined {
  try {
    return parseEffectiveCapabilities(fs.readFileSync("/proc/self/status", "utf8"));
  } catch {
    return undefined;
  }
}

/**
 * Lists the capabilities that the agent cannot serve a pod without and `capabilities` lacks:
 * CAP_SYS_ADMIN enters pods' network namespaces (setns) and loads eBPF programs; CAP_NET_ADMIN
 * attaches them and sets SO_MARK, IP_TRANSPARENT, routes and nftables in pods' namespaces.
 * CAP_BPF alone would load programs, but setns still needs CAP_SYS_ADMIN.
 */
export function missingRequiredCapabilities(capabilities: EffectiveCapabilities): CapabilityName[] {
  return (["CAP_SYS_ADMIN", "CAP_NET_ADMIN"] as const).filter((name) => !capabilities.has(name));
}
