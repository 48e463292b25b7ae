// Source-address transparency for the inbound proxies: the connection to the application is made
// from the client's IP, so the application's peer address is the real client and not the pod's
// own address. The pod network binds a transparent socket to that IP, and this file decides when
// it can. IPv4 and IPv6 clients are handled alike, each with its own routing in the pod.

import net from "node:net";
import type { Logger } from "../log";
import type { ApplicationSource, PodNetwork, TransparentSourceState } from "./pod-network";
import { normalizeIp } from "./tcp";

/**
 * Returns why a connection from `clientIp` cannot reach the application of the pod at `podIp`
 * from that address, or undefined when it can. Both addresses must be of one family, because a
 * socket connects within its own family. Pure, so it is tested by table.
 */
export function transparencyProblem(clientIp: string, podIp: string): string | undefined {
  const ip = normalizeIp(clientIp);
  const family = net.isIP(ip);
  if (family === 0) return `client address ${clientIp || "(empty)"} is not an IP address`;
  const pod = normalizeIp(podIp);
  if (net.isIP(pod) !== family) return `client address ${ip} is IPv${family} but the pod address ${podIp} is not`;
  if (ip === pod) return "the client is the pod itself";
  return family === 4 ? ipv4Problem(ip) : ipv6Problem(ip);
}

function ipv4Problem(ip: string): string | undefined {
  if (ip.startsWith("127.")) return "the client address is loopback";
  if (ip === "0.0.0.0") return "the client address is unspecified";
  return undefined;
}

/** Returns why an IPv6 client address cannot be kept. `ip` must be in the canonical text of normalizeIp. */
function ipv6Problem(ip: string): string | undefined {
  if (ip === "::1") return "the client address is loopback";
  if (ip === "::") return "the client address is unspecified";
  // fe80::/10: a link-local address needs the scope of an interface that a bind cannot name here,
  // and sk_lookup drops inbound link-local connections anyway.
  const firstGroup = parseInt(ip.split(":")[0] || "0", 16);
  if ((firstGroup & 0xffc0) === 0xfe80) return "the client address is link-local";
  return undefined;
}

/** Returns the pod network's transparency state for clients of the family of `clientIp`. */
function stateFor(network: PodNetwork, clientIp: string): { family: "IPv4" | "IPv6"; state: TransparentSourceState } {
  if (net.isIPv6(normalizeIp(clientIp))) return { family: "IPv6", state: network.transparentSourceIpv6 ?? "off" };
  return { family: "IPv4", state: network.transparentSource ?? "off" };
}

/**
 * Chooses the source of the proxy's connection to the application: the client's address when
 * the pod network can connect from it, or undefined for the pod's own address. With
 * transparency off for the client's address family it logs nothing. A client whose address
 * cannot be kept, or a pod whose routing set-up for that family failed, is logged at debug level.
 */
export function applicationSourceFor(
  network: PodNetwork,
  client: { ip: string; port: number },
  podIp: string,
  logger: Logger,
  avoidClientPort: boolean,
): ApplicationSource | undefined {
  const { family, state } = stateFor(network, client.ip);
  if (state === "off") return undefined;
  const problem = state === "unavailable" ? `the ${family} transparent-source routing is not installed in this pod` : transparencyProblem(client.ip, podIp);
  if (problem !== undefined) {
    logger.debug({ "src.ip": client.ip, reason: problem }, "connecting to the application from the pod's own address");
    return undefined;
  }
  return { ip: normalizeIp(client.ip), avoidPort: avoidClientPort ? client.port : undefined };
}
