// Dual-stack and IPv6-only enrollment: which addresses of a pod capture takes over. A pod with an
// IPv4 address is kept under it, whichever family status.podIP names first. An IPv6-only pod is
// kept under its IPv6 address and gets no IPv4 capture, so its IPv4 connections fail (EPERM).
// A pod's IPv6 address is captured only when all of these hold, and otherwise stays closed
// (native IPv6 connects fail with EPERM, inbound IPv6 is dropped) exactly as for a pod without IPv6:
//  - the workload has an IPv6 address (status.podIPs);
//  - the capture backend handles IPv6 (both eBPF and nftables do);
//  - the pod's network namespace has that address, so IPv6 is not disabled there.

import type { EnrollmentCapture } from "../capture/backend";
import { netnsIpv6Addresses } from "../capture/native";
import type { Logger } from "../log";
import { canonicalIp, workloadIpOfFamily } from "../state/ip";
import type { Workload } from "../state/types";

/**
 * Returns the address under which capture keeps the workload: its IPv4 address, whether
 * status.podIP lists it first or not, or its IPv6 address when it has no IPv4 one.
 */
export function capturePodIp(workload: Workload): string {
  return workloadIpOfFamily(workload, 4) ?? workloadIpOfFamily(workload, 6) ?? workload.ip;
}

/** Tells whether the workload has IPv6 addresses only (an IPv6-only pod). */
export function isIpv6Only(workload: Workload): boolean {
  return workloadIpOfFamily(workload, 4) === undefined && workloadIpOfFamily(workload, 6) !== undefined;
}

/** Returns the workload's IPv6 address to capture, or undefined; logs why a pod's IPv6 address is left closed. */
export function podIpv6ToCapture(capture: EnrollmentCapture, netnsPath: string, workload: Workload, logger: Logger): string | undefined {
  const ip6 = workloadIpOfFamily(workload, 6);
  if (ip6 === undefined) return undefined;
  const log = logger.child({ workload: workload.uid, ip6 });
  if (capture.enrollIpv6 === undefined || capture.attachInbound6 === undefined) {
    log.warn("this capture mode does not capture IPv6: the pod's IPv6 connections stay blocked");
    return undefined;
  }
  let addresses: string[];
  try {
    addresses = netnsIpv6Addresses(netnsPath).map(canonicalIp);
  } catch (error) {
    log.warn({ err: error, netns: netnsPath }, "reading the pod's IPv6 addresses failed: its IPv6 connections stay blocked");
    return undefined;
  }
  if (!addresses.includes(ip6)) {
    log.warn(
      { netns: netnsPath },
      "the pod's network namespace does not have its IPv6 address (IPv6 may be disabled there): its IPv6 connections stay blocked",
    );
    return undefined;
  }
  return ip6;
}
