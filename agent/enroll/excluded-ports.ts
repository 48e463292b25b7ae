// Ports that a pod excludes from capture with Istio's sidecar annotations. Each annotation is a
// comma-separated list of port numbers, and whitespace around them is allowed. Excluded inbound ports
// reach the application directly (no mTLS, no authorization, no audit record), and excluded
// outbound destination ports leave the pod directly. Every exclusion is a hole in the mesh, so the
// reconciler logs each one.

import net from "node:net";

import type { CaptureExemptionStore } from "../capture/backend";
import { NO_EXCLUDED_PORTS, PROXY_PORTS, type ExcludedPorts } from "../capture/ebpf/exemptions";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { Direction, Workload } from "../state/types";
import { capturePodIp } from "./dual-stack";

export const EXCLUDE_INBOUND_PORTS_ANNOTATION = "traffic.sidecar.istio.io/excludeInboundPorts";
export const EXCLUDE_OUTBOUND_PORTS_ANNOTATION = "traffic.sidecar.istio.io/excludeOutboundPorts";

const ANNOTATIONS: Record<Direction, string> = {
  inbound: EXCLUDE_INBOUND_PORTS_ANNOTATION,
  outbound: EXCLUDE_OUTBOUND_PORTS_ANNOTATION,
};

/**
 * Parses a comma-separated port list, for example "8080, 9090". An empty or blank value is an
 * empty list. Returns the ports sorted and without duplicates. Throws an Error that names what is
 * wrong with the value.
 */
export function parsePortList(value: string): number[] {
  if (value.trim() === "") return [];
  const ports = new Set<number>();
  for (const item of value.split(",")) {
    const text = item.trim();
    if (!/^[0-9]{1,5}$/.test(text)) {
      throw new Error(text === "" ? "it has an empty entry" : `"${text}" is not a port number`);
    }
    const port = Number(text);
    if (port < 1 || port > 65535) throw new Error(`port ${port} is outside 1-65535`);
    if (PROXY_PORTS.includes(port)) {
      throw new Error(`port ${port} is one of the agent's proxy ports (${PROXY_PORTS.join(", ")}), which are always captured`);
    }
    ports.add(port);
  }
  return [...ports].sort((a, b) => a - b);
}

/**
 * Returns the ports the workload's annotations exclude from capture. Throws an INVALID_ANNOTATION
 * AgentError naming the pod, the annotation and the value when either annotation is invalid.
 * The caller then enrolls the pod with no exclusions (fail closed).
 */
export function excludedPortsOf(workload: Workload): ExcludedPorts {
  const annotations = workload.annotations ?? {};
  const result: ExcludedPorts = { inbound: [], outbound: [] };
  for (const direction of ["inbound", "outbound"] as const) {
    const name = ANNOTATIONS[direction];
    const value = annotations[name];
    if (value === undefined) continue;
    try {
      result[direction] = parsePortList(value);
    } catch (error) {
      throw new AgentError(
        "INVALID_ANNOTATION",
        `pod ${workload.uid} has an invalid ${name} annotation ${JSON.stringify(value)}: ${(error as Error).message}. ` +
          "Use comma-separated port numbers from 1 to 65535, for example \"8080,9090\"; until it is fixed, no port of the pod is excluded from capture",
      );
    }
  }
  return result;
}

/** Tells whether two exclusion sets hold the same ports. */
export function sameExcludedPorts(a: ExcludedPorts, b: ExcludedPorts): boolean {
  return a.inbound.join(",") === b.inbound.join(",") && a.outbound.join(",") === b.outbound.join(",");
}

/** Exclusions that ExcludedPortsWriter last wrote for one workload. */
interface WrittenExclusions {
  podIp: string;
  ports: ExcludedPorts;
  /** The message of the invalid annotation, when one made the ports empty. */
  problem?: string;
}

/**
 * Keeps aa_excluded_ports in step with the enrolled workloads' annotations. It logs every change
 * at info level with the ports, and an invalid annotation at error level, once per value.
 */
export class ExcludedPortsWriter {
  private readonly written = new Map<string, WrittenExclusions>();

  constructor(
    private readonly exemptions: CaptureExemptionStore,
    private readonly logger: Logger,
  ) {}

  /**
   * Writes the workload's excluded ports at its current IP, and deletes those written at an
   * earlier IP. An invalid annotation, or a failed map write, leaves the pod with no exclusions.
   */
  apply(workload: Workload): void {
    const previous = this.written.get(workload.uid);
    const { ports, problem } = this.readPorts(workload);
    const podIp = capturePodIp(workload);
    if (previous && previous.podIp === podIp && previous.problem === problem && sameExcludedPorts(previous.ports, ports)) return;

    const log = this.logger.child({ workload: workload.uid, ip: podIp });
    if (problem !== undefined && problem !== previous?.problem) log.error(problem);
    try {
      if (previous && previous.podIp !== podIp && net.isIPv4(previous.podIp)) this.exemptions.clearExcludedPorts(previous.podIp);
      this.written.delete(workload.uid);
      this.write(workload, podIp, ports);
    } catch (error) {
      log.error({ err: error }, "failed to write the pod's excluded ports: none of its ports is excluded from capture");
      this.clearQuietly(podIp);
      this.written.set(workload.uid, { podIp, ports: NO_EXCLUDED_PORTS, problem });
      return;
    }
    this.written.set(workload.uid, { podIp, ports, problem });
    if (ports.inbound.length > 0 || ports.outbound.length > 0) {
      log.info({ excludedInboundPorts: ports.inbound, excludedOutboundPorts: ports.outbound }, "ports excluded from capture");
    } else if (previous && (previous.ports.inbound.length > 0 || previous.ports.outbound.length > 0)) {
      log.info("no ports excluded from capture any more");
    }
  }

  /** Deletes the workload's excluded ports, when any were written. */
  remove(uid: string): void {
    const previous = this.written.get(uid);
    if (!previous) return;
    this.written.delete(uid);
    this.clearQuietly(previous.podIp);
    if (previous.ports.inbound.length > 0 || previous.ports.outbound.length > 0) {
      this.logger.info({ workload: uid, ip: previous.podIp }, "excluded ports removed");
    }
  }

  /** Deletes excluded ports of pod IPs that no written workload has: pods that left while no agent ran. */
  removeStale(): void {
    const wantedIps = new Set([...this.written.values()].map((entry) => entry.podIp));
    let stale: string[];
    try {
      stale = [...this.exemptions.excludedPorts().keys()].filter((podIp) => !wantedIps.has(podIp));
    } catch (error) {
      this.logger.error({ err: error }, "failed to list the excluded ports");
      return;
    }
    for (const podIp of stale) {
      this.clearQuietly(podIp);
      this.logger.info({ ip: podIp }, "removed stale excluded ports");
    }
  }

  private readPorts(workload: Workload): { ports: ExcludedPorts; problem?: string } {
    try {
      return { ports: excludedPortsOf(workload) };
    } catch (error) {
      return { ports: NO_EXCLUDED_PORTS, problem: (error as Error).message };
    }
  }

  /** Writes the ports under podIp, the pod's IPv4 address (see capturePodIp). */
  private write(workload: Workload, podIp: string, ports: ExcludedPorts): void {
    const hasPorts = ports.inbound.length > 0 || ports.outbound.length > 0;
    if (!net.isIPv4(podIp)) {
      // NOTE: aa_excluded_ports is keyed by IPv4 address, so an IPv6-only pod gets no exclusions
      // and every port of it stays captured.
      if (hasPorts) {
        throw new AgentError("INVALID_ANNOTATION", `pod ${workload.uid} has no IPv4 address (IP ${podIp}): ports can be excluded only for pods with an IPv4 address`);
      }
      return;
    }
    this.exemptions.setExcludedPorts(podIp, ports);
  }

  private clearQuietly(podIp: string): void {
    if (!net.isIPv4(podIp)) return;
    try {
      this.exemptions.clearExcludedPorts(podIp);
    } catch (error) {
      this.logger.error({ err: error, ip: podIp }, "failed to delete the pod's excluded ports");
    }
  }
}
