// The host network namespace's table `inet ambient_agent_probes`, rendered as `nft -f` scripts.
// The kubelet probes pods from the host's network namespace, with the node's address as source,
// and inbound capture would treat those probes like any other plaintext client. The table rewrites
// the source of TCP connections that processes of the host namespace open to an enrolled pod to
// the probe source address, which inbound capture lets through to the application, as istio-cni's
// SNAT rule does. Its sets contain the enrolled pods' IPv4 and IPv6 addresses.
//
// The rule matches connections that processes of the host open as the host. `meta skuid >= 0`
// matches a packet only when it carries a full socket of this namespace that a process opened:
// forwarded and bridged packets carry none, and a packet that crossed a veth from another
// namespace has no socket of this one. So a pod that forges a SYN with the node's address as its
// source keeps that source and stays captured. CAP_NET_RAW is enough to forge one, and the
// martian check stops neither a routed IPv6 packet nor a bridged one that br_netfilter hands to
// these hooks. `fib saddr type local` stays as well, because a host socket with IP_TRANSPARENT can
// speak for another address, as a proxy in the host's namespace that keeps its clients' addresses
// does, and its connections are not the node's.
// Connections that a DNAT rule of the host (kube-proxy's Service rules) sent to the pod are left
// alone too, because kubelet probes dial the pod's own address. Checked on kernel 6.18 with
// nftables 1.0.6, by test/e2e/probe-snat.test.ts: both matches work in a postrouting chain. It
// runs at srcnat - 10, before the SNAT and masquerade rules of other tables (iptables' nat table
// runs at srcnat), because the first NAT binding of a connection wins.
import net from "node:net";

import { AgentError } from "../../errors";
import { canonicalIp } from "../../state/ip";

export const PROBE_SNAT_TABLE_FAMILY = "inet";
export const PROBE_SNAT_TABLE_NAME = "ambient_agent_probes";
/** The set of the enrolled pods' IPv4 addresses. */
export const PROBE_SNAT_SET4 = "pods_ip4";
/** The set of the enrolled pods' IPv6 addresses. */
export const PROBE_SNAT_SET6 = "pods_ip6";

const TABLE = `${PROBE_SNAT_TABLE_FAMILY} ${PROBE_SNAT_TABLE_NAME}`;

/** The addresses probes are rewritten to, one per family. A family without one is not rewritten. */
export interface ProbeSnatSources {
  ipv4?: string;
  ipv6?: string;
}

/** The enrolled pods' addresses by family, canonical, sorted and without duplicates. */
export interface ProbeSnatPods {
  ipv4: readonly string[];
  ipv6: readonly string[];
}

export const NO_PODS: ProbeSnatPods = { ipv4: [], ipv6: [] };

/**
 * Returns the first IPv4 and the first IPv6 address of --probe-source, the addresses the table
 * rewrites to. Throws when there is neither, because such a table would rewrite nothing.
 */
export function probeSnatSources(probeSources: readonly string[]): ProbeSnatSources {
  const sources = { ipv4: probeSources.find((ip) => net.isIPv4(ip)), ipv6: probeSources.find((ip) => net.isIPv6(ip)) };
  if (sources.ipv4 === undefined && sources.ipv6 === undefined) {
    throw new AgentError("INTERNAL", `no probe source address to rewrite kubelet probes to in ${JSON.stringify(probeSources)}: give --probe-source an IPv4 or IPv6 address`);
  }
  return sources;
}

/** Splits addresses by family into canonical, sorted lists without duplicates. Throws on a value that is no IP address. */
export function probeSnatPods(addresses: Iterable<string>): ProbeSnatPods {
  const ipv4 = new Set<string>();
  const ipv6 = new Set<string>();
  for (const address of addresses) {
    const family = net.isIP(address);
    if (family === 0) throw new AgentError("INTERNAL", `invalid pod address ${JSON.stringify(address)} for the probe SNAT table`);
    (family === 4 ? ipv4 : ipv6).add(canonicalIp(address));
  }
  return { ipv4: [...ipv4].sort(), ipv6: [...ipv6].sort() };
}

/** Tells whether two address lists contain the same addresses. */
export function samePods(a: ProbeSnatPods, b: ProbeSnatPods): boolean {
  return a.ipv4.join(",") === b.ipv4.join(",") && a.ipv6.join(",") === b.ipv6.join(",");
}

function setDefinition(name: string, type: string, elements: readonly string[]): string[] {
  return [`  set ${name} {`, `    type ${type}`, ...(elements.length > 0 ? [`    elements = { ${elements.join(", ")} }`] : []), `  }`];
}

/** Renders the definition of the table, `table inet ambient_agent_probes { ... }`, with `pods` in its sets. */
export function renderProbeSnatTable(sources: ProbeSnatSources, pods: ProbeSnatPods): string {
  if (sources.ipv4 !== undefined && !net.isIPv4(sources.ipv4)) throw new AgentError("INTERNAL", `invalid IPv4 probe source ${JSON.stringify(sources.ipv4)}`);
  if (sources.ipv6 !== undefined && !net.isIPv6(sources.ipv6)) throw new AgentError("INTERNAL", `invalid IPv6 probe source ${JSON.stringify(sources.ipv6)}`);
  // A NAT chain receives the first packet of each connection only, so the rules act on new connections.
  const match = "meta l4proto tcp ct status & dnat == 0 meta skuid >= 0 fib saddr type local";
  return [
    `table ${TABLE} {`,
    ...setDefinition(PROBE_SNAT_SET4, "ipv4_addr", pods.ipv4),
    ...setDefinition(PROBE_SNAT_SET6, "ipv6_addr", pods.ipv6),
    `  chain postrouting {`,
    `    type nat hook postrouting priority srcnat - 10; policy accept;`,
    ...(sources.ipv4 === undefined ? [] : [`    ${match} ip daddr @${PROBE_SNAT_SET4} snat ip to ${sources.ipv4}`]),
    ...(sources.ipv6 === undefined ? [] : [`    ${match} ip6 daddr @${PROBE_SNAT_SET6} snat ip6 to ${sources.ipv6}`]),
    `  }`,
    `}`,
    "",
  ].join("\n");
}

/**
 * Renders the script that replaces the table in one transaction, whatever an earlier run left:
 * deleting and recreating it also replaces a chain declared with another hook or priority. New
 * connections see the old table or the new one, never none.
 */
export function renderProbeSnatRuleset(sources: ProbeSnatSources, pods: ProbeSnatPods): string {
  // Declaring the table first makes the delete succeed when it does not exist yet.
  return [`table ${TABLE}`, `delete table ${TABLE}`, renderProbeSnatTable(sources, pods)].join("\n");
}

/** Renders the script that replaces the elements of both sets with `pods` in one transaction. */
export function renderProbeSnatElements(pods: ProbeSnatPods): string {
  const lines = [`flush set ${TABLE} ${PROBE_SNAT_SET4}`, `flush set ${TABLE} ${PROBE_SNAT_SET6}`];
  if (pods.ipv4.length > 0) lines.push(`add element ${TABLE} ${PROBE_SNAT_SET4} { ${pods.ipv4.join(", ")} }`);
  if (pods.ipv6.length > 0) lines.push(`add element ${TABLE} ${PROBE_SNAT_SET6} { ${pods.ipv6.join(", ")} }`);
  return lines.join("\n") + "\n";
}

/** Renders the script that removes the table, and succeeds when there is none. */
export function renderProbeSnatRemoval(): string {
  return [`table ${TABLE}`, `delete table ${TABLE}`, ""].join("\n");
}

/** Renders the nft command that lists the tables of the inet family, to tell whether the table exists without writing anything. */
export function renderInetTablesListing(): string {
  return `list tables ${PROBE_SNAT_TABLE_FAMILY}\n`;
}

/** Tells whether an `nft list tables` output names the table. */
export function listsProbeSnatTable(listing: string): boolean {
  return listing.split("\n").some((line) => line.trim() === `table ${TABLE}`);
}
