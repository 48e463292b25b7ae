// Source-address transparency for the inbound proxies: the connection to the application is made
// from the client's IP, so the application sees the real client as its peer and not the pod's
// own address. The pod network binds a transparent socket to that IP, and this file decides when
// it can.

import net from "node:net";
import type { Logger } from "../log";
import type { ApplicationSource, PodNetwork } from "./pod-network";
import { normalizeIp } from "./tcp";

/**
 * Returns why a connection from `clientIp` cannot reach the application of the pod at `podIp`
 * from that address, or undefined when it can. Pure, so it is tested by table.
 */
export function transparencyProblem(clientIp: string, podIp: string): string | undefined {
  const ip = normalizeIp(clientIp);
  if (!net.isIPv4(ip)) return `client address ${clientIp} is not IPv4`;
  if (ip === normalizeIp(podIp)) return "the client is the pod itself";
  if (ip.startsWith("127.")) return "the client address is loopback";
  if (ip === "0.0.0.0") return "the client address is unspecified";
  return undefined;
}

/**
 * Chooses the source of the proxy's connection to the application: the client's address when
 * the pod network can connect from it, or undefined for the pod's own address. With
 * transparency off it logs nothing. A client whose address cannot be kept, or a pod whose
 * routing set-up failed, is logged at debug level.
 */
export function applicationSourceFor(
  network: PodNetwork,
  client: { ip: string; port: number },
  podIp: string,
  logger: Logger,
  avoidClientPort: boolean,
): ApplicationSource | undefined {
  const state = network.transparentSource ?? "off";
  if (state === "off") return undefined;
  const problem = state === "unavailable" ? "the transparent-source routing is not installed in this pod" : transparencyProblem(client.ip, podIp);
  if (problem !== undefined) {
    logger.debug({ "src.ip": client.ip, reason: problem }, "connecting to the application from the pod's own address");
    return undefined;
  }
  return { ip: normalizeIp(client.ip), avoidPort: avoidClientPort ? client.port : undefined };
}
