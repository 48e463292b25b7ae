// Per-pod set-up of source-address transparency: the policy routing that lets the inbound
// proxies connect to the application from the client's address, for IPv4 in a pod with an IPv4
// address and for IPv6 in a pod with an IPv6 address. A failure here never blocks enrolment: the
// pod's proxies then connect from the pod's own address for that family, as without transparency.

import type { NetnsPodNetwork } from "../capture/netns-network";
import type { Logger } from "../log";
import type { Workload } from "../state/types";

/**
 * Installs the transparent-source routing in the pod, or keeps what an earlier run installed:
 * the IPv4 routing when the pod has an IPv4 address, and the IPv6 routing when it has an IPv6
 * one. Logs a warning and leaves transparency off for the family whose set-up failed.
 */
export function enableTransparentSource(network: NetnsPodNetwork, workload: Workload, logger: Logger): void {
  const log = logger.child({ workload: workload.uid, netns: network.netnsPath });
  // An IPv6-only pod has no IPv4 listener, so it needs no IPv4 routing.
  if (network.podIp !== undefined) {
    try {
      const added = network.enableTransparentSource();
      log.debug({ added }, added === 0 ? "transparent-source routing already in place" : "transparent-source routing installed");
    } catch (error) {
      log.warn({ err: error }, "installing the transparent-source routing failed; the application sees the pod's own address as the client of inbound connections");
    }
  }
  if (network.podIp6 === undefined) return;
  try {
    const added = network.enableTransparentSourceIpv6();
    log.debug({ added }, added === 0 ? "IPv6 transparent-source routing already in place" : "IPv6 transparent-source routing installed");
  } catch (error) {
    log.warn(
      { err: error, podIp6: network.podIp6 },
      "installing the IPv6 transparent-source routing failed; the application sees the pod's own IPv6 address as the client of inbound IPv6 connections",
    );
  }
}

/**
 * Removes the transparent-source routing of both families from a pod that left the mesh. Call it
 * after its proxies stopped. A namespace that is already gone needs no clean-up, so failures are
 * logged at debug level.
 */
export function disableTransparentSource(network: NetnsPodNetwork, workload: Workload, logger: Logger): void {
  const log = logger.child({ workload: workload.uid, netns: network.netnsPath });
  if (network.transparentSource !== "off") {
    try {
      const removed = network.disableTransparentSource();
      log.debug({ removed }, "transparent-source routing removed");
    } catch (error) {
      log.debug({ err: error }, "removing the transparent-source routing failed");
    }
  }
  if (network.transparentSourceIpv6 !== "off") {
    try {
      const removed = network.disableTransparentSourceIpv6();
      log.debug({ removed }, "IPv6 transparent-source routing removed");
    } catch (error) {
      log.debug({ err: error }, "removing the IPv6 transparent-source routing failed");
    }
  }
}
