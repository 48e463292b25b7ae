// Per-pod set-up of source-address transparency: the policy routing that lets the inbound
// proxies connect to the application from the client's address. A failure here never blocks
// enrolment: the pod's proxies then connect from the pod's own address, as without transparency.

import type { NetnsPodNetwork } from "../capture/netns-network";
import type { Logger } from "../log";
import type { Workload } from "../state/types";

/**
 * Installs the transparent-source routing in the pod, or keeps what an earlier run installed.
 * Logs a warning and leaves transparency off for this pod when the set-up fails.
 */
export function enableTransparentSource(network: NetnsPodNetwork, workload: Workload, logger: Logger): void {
  const log = logger.child({ workload: workload.uid, netns: network.netnsPath });
  try {
    const added = network.enableTransparentSource();
    log.debug({ added }, added === 0 ? "transparent-source routing already in place" : "transparent-source routing installed");
  } catch (error) {
    log.warn({ err: error }, "installing the transparent-source routing failed; the application sees the pod's own address as the client of inbound connections");
  }
}

/**
 * Removes the transparent-source routing from a pod that left the mesh; call it after its
 * proxies stopped. A namespace that is already gone needs no clean-up, so failures are logged at debug level.
 */
export function disableTransparentSource(network: NetnsPodNetwork, workload: Workload, logger: Logger): void {
  if (network.transparentSource === "off") return;
  const log = logger.child({ workload: workload.uid, netns: network.netnsPath });
  try {
    const removed = network.disableTransparentSource();
    log.debug({ removed }, "transparent-source routing removed");
  } catch (error) {
    log.debug({ err: error }, "removing the transparent-source routing failed");
  }
}
