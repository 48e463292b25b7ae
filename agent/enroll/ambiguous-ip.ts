// Pod IPs that several network namespaces have at once. The agent finds a pod's namespace by its
// IP, so a process with CAP_NET_ADMIN in another namespace can add a copy of the IP. The rules:
//  - a namespace that also has another wanted pod's own IP is that pod's, and is left alone.
//  - of the others, the one whose cookie the pinned capture maps contain for this IP (the namespace
//    an earlier run enrolled) is the pod's, so a copy made while no agent ran cannot strip the
//    pod's capture at the next start.
//  - otherwise every remaining candidate is isolated (captured with no listener, inbound dropped)
//    until one namespace alone has the IP. Neither the pod nor the copy runs outside the mesh.
//    Isolation records none of them as the namespace of the IP, so a later agent does not take
//    the last one isolated for the pod's.

import type { EnrollmentCapture } from "../capture/backend";
import { netnsCookie, netnsIpv4Addresses, netnsIpv6Addresses } from "../capture/native";
import type { Logger } from "../log";
import { canonicalIp, workloadIps } from "../state/ip";
import type { Workload } from "../state/types";
import { capturePodIp } from "./dual-stack";

/** A namespace that has a workload's IP. */
export interface NamespaceCandidate {
  workload: Workload;
  netnsPath: string;
  cookie: bigint;
}

/** The namespace to enroll, or why there is none (for the reconciler's retry log). */
export type NamespaceChoice = { netnsPath: string } | { problem: string; fields: Record<string, unknown> };

export class AmbiguousPodIps {
  /** Namespaces isolated for an ambiguous IP, by workload uid. */
  private readonly isolated = new Map<string, NamespaceCandidate[]>();
  /** Every IP of every wanted workload, to the workload's uid. */
  private wantedIps = new Map<string, string>();

  /**
   * `detachInbound` removes a namespace's inbound capture for a workload (the reconciler's, which
   * also unlinks the namespace of an IPv6-only pod).
   */
  constructor(
    private readonly capture: EnrollmentCapture,
    private readonly detachInbound: (cookie: bigint, workload: Workload) => void,
    private readonly logger: Logger,
  ) {}

  /** Records the wanted workloads of a reconcile pass, whose IPs tell namespaces apart. */
  setWanted(workloads: readonly Workload[]): void {
    this.wantedIps = new Map(workloads.flatMap((workload) => workloadIps(workload).map((ip) => [canonicalIp(ip), workload.uid] as const)));
  }

  /** Lists the namespaces isolated for ambiguous IPs, for diagnostics. */
  list(): { workload: string; ip: string; netns: string; cookie: bigint }[] {
    return [...this.isolated.values()].flat().map((entry) => ({ workload: entry.workload.uid, ip: capturePodIp(entry.workload), netns: entry.netnsPath, cookie: entry.cookie }));
  }

  /** Lists the cookies of the namespaces isolated for ambiguous IPs, which stale-entry removal keeps. */
  cookies(): bigint[] {
    return [...this.isolated.values()].flat().map((entry) => entry.cookie);
  }

  /** Chooses among the namespaces at `paths`, which all hold the workload's IP. */
  choose(workload: Workload, paths: string[]): NamespaceChoice {
    const all = paths.flatMap((netnsPath) => {
      try {
        return [{ workload, netnsPath, cookie: netnsCookie(netnsPath) }];
      } catch {
        return [];
      }
    });
    const candidates = all.filter((entry) => !this.holdsAnotherWorkload(entry.netnsPath, workload));
    if (candidates.length === 0) {
      return { problem: "every network namespace with the pod IP belongs to another pod: not enrolling it", fields: { netns: paths } };
    }
    if (candidates.length === 1) return this.chosen(workload, candidates[0], paths, "that holds no other pod's IP");

    const ip = capturePodIp(workload);
    const pinned = new Set(this.capture.inboundPods().filter((pod) => pod.podIp === ip).map((pod) => pod.cookie));
    const isolated = new Set((this.isolated.get(workload.uid) ?? []).map((entry) => entry.cookie));
    const earlier = candidates.filter((entry) => pinned.has(entry.cookie) && !isolated.has(entry.cookie));
    if (earlier.length === 1) return this.chosen(workload, earlier[0], paths, "an earlier run enrolled");

    for (const entry of candidates) this.isolate(entry, ip);
    this.isolated.set(workload.uid, [...(this.isolated.get(workload.uid) ?? []), ...candidates.filter((entry) => !isolated.has(entry.cookie))]);
    return {
      problem: "several network namespaces have the pod IP: all of them are isolated until one alone has it",
      fields: { netns: candidates.map((entry) => entry.netnsPath) },
    };
  }

  /**
   * Releases the namespaces isolated for the workload's ambiguous IP, except the one with
   * `keepCookie` (the namespace now enrolled, if any) and those in `served` (namespaces another
   * workload of this agent is served or isolated in).
   */
  release(uid: string, served: ReadonlySet<bigint>, keepCookie?: bigint): void {
    const entries = this.isolated.get(uid);
    if (!entries) return;
    this.isolated.delete(uid);
    for (const entry of entries) {
      if (entry.cookie === keepCookie || served.has(entry.cookie)) continue;
      try {
        this.capture.unenroll(entry.cookie);
        this.detachInbound(entry.cookie, entry.workload);
      } catch (error) {
        this.logger.error({ err: error, workload: uid, netns: entry.netnsPath }, "failed to release a namespace isolated for an ambiguous pod IP");
      }
      this.logger.info({ workload: uid, netns: entry.netnsPath, cookie: entry.cookie.toString() }, "namespace isolated for an ambiguous pod IP released");
    }
  }

  /** Releases the namespaces of workloads that are no longer wanted at the IP they were isolated for. */
  releaseUnwanted(wanted: ReadonlyMap<string, Workload>, served: ReadonlySet<bigint>): void {
    for (const [uid, entries] of [...this.isolated]) {
      if (wanted.get(uid)?.ip !== entries[0]?.workload.ip) this.release(uid, served);
    }
  }

  private chosen(workload: Workload, entry: NamespaceCandidate, paths: string[], which: string): NamespaceChoice {
    this.logger.warn(
      { workload: workload.uid, ip: workload.ip, chosen: entry.netnsPath, others: paths.filter((netnsPath) => netnsPath !== entry.netnsPath) },
      `several network namespaces have the pod IP: enrolling the one ${which}`,
    );
    return { netnsPath: entry.netnsPath };
  }

  private isolate(entry: NamespaceCandidate, ip: string): void {
    try {
      this.capture.isolateCandidate(entry.netnsPath, entry.cookie, ip);
    } catch (error) {
      this.logger.error({ err: error, workload: entry.workload.uid, netns: entry.netnsPath }, "failed to isolate a namespace that has the pod IP");
    }
  }

  /** Tells whether the namespace at `netnsPath` has the IP of a wanted workload other than `workload`. */
  private holdsAnotherWorkload(netnsPath: string, workload: Workload): boolean {
    let addresses: string[];
    try {
      addresses = [...netnsIpv4Addresses(netnsPath), ...netnsIpv6Addresses(netnsPath)];
    } catch {
      return false;
    }
    return addresses.some((address) => {
      const owner = this.wantedIps.get(canonicalIp(address));
      return owner !== undefined && owner !== workload.uid;
    });
  }
}
