// The nftables table of one enrolled pod, `table inet ambient_agent`, rendered as an `nft -f`
// script. It steers TCP as the eBPF programs do:
//   - outbound: TCP that the pod's applications open to anything but loopback and the pod's own
//     proxy ports is redirected (nat output REDIRECT) to the outbound proxy on 15001;
//   - inbound: TCP that reaches the pod from outside is redirected (nat prerouting REDIRECT) to
//     the inbound plaintext proxy on 15006, except HBONE on 15008 and 15006 itself. Port 15001 is
//     dropped when it does not come from the pod itself.
// IPv6 is captured only for the address in the set `pod_ip6`, which contains the pod's IPv6
// address once its IPv6 listeners run. Native IPv6 TCP of any other address fails closed: outbound
// connects fail with EACCES (an ICMPv6 administratively-prohibited error, where eBPF capture
// returns EPERM from connect()), and inbound packets are dropped. IPv4 stays captured either way.
// An IPv6-only pod's table has no IPv4 address, and its IPv4 TCP fails closed: outbound connects
// to anything but loopback fail with EHOSTUNREACH (an ICMP administratively-prohibited error, where
// eBPF capture returns EPERM), and inbound packets from outside are dropped.
//
// The agent's own sockets carry SO_MARK 0x539 (mask 0xfff; the transparent inbound sockets use
// 0x1539), and the rules let marked traffic through. A process with CAP_NET_RAW can set the same
// mark and so escape capture: pods should run without CAP_NET_RAW.
import net from "node:net";

import { AgentError } from "../../errors";
import { NO_EXCLUDED_PORTS, type ExcludedPorts } from "../ebpf/exemptions";
import { AGENT_MARK, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT } from "../layout";

export const NFT_TABLE_FAMILY = "inet";
export const NFT_TABLE_NAME = "ambient_agent";
/** The set of the pod's captured IPv6 address: empty while the pod's IPv6 is not captured. */
export const NFT_POD_IP6_SET = "pod_ip6";

/** Mask applied to a socket mark before it is compared with AGENT_MARK, so 0x1539 passes too. */
export const AGENT_MARK_MASK = 0xfff;

/** The ruleset variants: normal capture, or isolation of a pod whose listeners could not start. */
export type NftPodState = "captured" | "isolated";

/** Exemptions that capture lets through for a pod: kubelet probe sources and the ports its annotations exclude. */
export interface NftExemptions {
  probeSources: readonly string[];
  excludedPorts: ExcludedPorts;
}

export const NO_EXEMPTIONS: NftExemptions = { probeSources: [], excludedPorts: NO_EXCLUDED_PORTS };

const TABLE = `${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME}`;

/** Renders an nft anonymous set, `{ a, b }`. */
function nftSet(values: readonly (string | number)[]): string {
  return `{ ${values.join(", ")} }`;
}

function checkPodAddresses(podIp: string | undefined, podIp6: string | undefined): void {
  if (podIp !== undefined && !net.isIPv4(podIp)) {
    throw new AgentError("INTERNAL", `invalid pod IPv4 address ${JSON.stringify(podIp)} for nftables capture: pass undefined for an IPv6-only pod`);
  }
  if (podIp6 !== undefined && !net.isIPv6(podIp6)) {
    throw new AgentError("INTERNAL", `invalid pod IPv6 address ${JSON.stringify(podIp6)} for nftables capture`);
  }
}

/** The table's rules for IPv4, by the place they take in the chains. */
interface Ipv4Rules {
  /** Rule of prerouting_guard and inbound that accepts the pod's own IPv4 packets. */
  fromPod: string[];
  /** Rule of outbound that lets connections to the pod's own proxy ports through. */
  toPodProxyPorts: string[];
  /** Rule of prerouting_guard that drops IPv4 TCP from outside a pod without an IPv4 address. */
  inboundClosed: string[];
  /** Rule of outbound_guard that rejects IPv4 TCP, loopback excepted, of a pod without an IPv4 address. */
  outboundClosed: string[];
}

/** Renders the rules that name the pod's IPv4 address, or those that close IPv4 when podIp is undefined (an IPv6-only pod). */
function renderIpv4Rules(podIp: string | undefined, proxyPorts: string): Ipv4Rules {
  if (podIp === undefined) {
    return {
      fromPod: [],
      toPodProxyPorts: [],
      inboundClosed: [`    meta nfproto ipv4 meta l4proto tcp drop`],
      outboundClosed: [`    meta nfproto ipv4 meta l4proto tcp ip daddr != 127.0.0.0/8 reject with icmp admin-prohibited`],
    };
  }
  return {
    fromPod: [`    ip saddr ${podIp} accept`],
    toPodProxyPorts: [`    ip daddr ${podIp} tcp dport ${proxyPorts} accept`],
    inboundClosed: [],
    outboundClosed: [],
  };
}

/**
 * Renders the definition of the pod's table: `table inet ambient_agent { ... }`. "isolated"
 * rejects every inbound TCP connection from outside the pod, including HBONE, until the
 * listeners start. podIp is the pod's IPv4 address, undefined for an IPv6-only pod, whose IPv4
 * TCP then fails closed in both directions. podIp6 is the pod's captured IPv6 address, if any.
 */
export function renderPodTable(podIp: string | undefined, state: NftPodState = "captured", exemptions: NftExemptions = NO_EXEMPTIONS, podIp6?: string): string {
  checkPodAddresses(podIp, podIp6);
  const mark = `meta mark & 0x${AGENT_MARK_MASK.toString(16)} == 0x${AGENT_MARK.toString(16)}`;
  const proxyPorts = nftSet([OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT]);
  const probeSources4 = exemptions.probeSources.filter((ip) => net.isIPv4(ip));
  const probeSources6 = exemptions.probeSources.filter((ip) => net.isIPv6(ip));
  const { inbound: inboundExcluded, outbound: outboundExcluded } = exemptions.excludedPorts;
  const inboundPass =
    state === "captured"
      ? [
          `    tcp dport { ${INBOUND_PLAINTEXT_PORT}, ${INBOUND_HBONE_PORT} } accept`,
          ...(probeSources4.length > 0 ? [`    ip saddr ${nftSet(probeSources4)} accept`] : []),
          ...(probeSources6.length > 0 ? [`    ip6 saddr ${nftSet(probeSources6)} accept`] : []),
          ...(inboundExcluded.length > 0 ? [`    tcp dport ${nftSet(inboundExcluded)} accept`] : []),
        ]
      : [];
  const outboundPass = outboundExcluded.length > 0 ? [`    tcp dport ${nftSet(outboundExcluded)} accept`] : [];
  // Without an IPv4 address, prerouting_guard drops IPv4 from outside, and an isolated pod's
  // empty IPv6 set drops IPv6, so only a pod with an IPv4 address needs the isolation rule.
  const isolation = state === "isolated" && podIp !== undefined ? [`    iifname != "lo" ip saddr != ${podIp} meta l4proto tcp reject with tcp reset`] : [];
  const elements = podIp6 === undefined ? [] : [`    elements = { ${podIp6} }`];
  const ipv4 = renderIpv4Rules(podIp, proxyPorts);

  return [
    `table ${TABLE} {`,
    `  set ${NFT_POD_IP6_SET} {`,
    `    type ipv6_addr`,
    ...elements,
    `  }`,
    `  chain prerouting_guard {`,
    `    type filter hook prerouting priority mangle; policy accept;`,
    `    iifname "lo" accept`,
    ...ipv4.fromPod,
    `    ip6 saddr @${NFT_POD_IP6_SET} accept`,
    ...ipv4.inboundClosed,
    `    meta nfproto ipv6 meta l4proto tcp ip6 daddr != @${NFT_POD_IP6_SET} drop`,
    `    tcp dport ${OUTBOUND_PORT} drop`,
    `  }`,
    `  chain inbound {`,
    `    type nat hook prerouting priority -100; policy accept;`,
    `    meta l4proto != tcp accept`,
    `    iifname "lo" accept`,
    ...ipv4.fromPod,
    `    ip6 saddr @${NFT_POD_IP6_SET} accept`,
    `    ${mark} accept`,
    ...inboundPass,
    `    meta l4proto tcp redirect to :${INBOUND_PLAINTEXT_PORT}`,
    `  }`,
    `  chain input_guard {`,
    `    type filter hook input priority filter; policy accept;`,
    ...isolation,
    // A redirected connection must reach the agent's listener, which carries the agent's mark,
    // and never a process of the pod that took the port while the agent was down.
    `    ct status dnat tcp dport ${INBOUND_PLAINTEXT_PORT} ct state new socket mark & 0x${AGENT_MARK_MASK.toString(16)} != 0x${AGENT_MARK.toString(16)} reject with tcp reset`,
    `  }`,
    // Runs before the nat output chain, so that it matches the address the application dialled.
    `  chain outbound_guard {`,
    `    type filter hook output priority mangle; policy accept;`,
    `    ${mark} accept`,
    // Resets the kernel sends from a redirected connection's ::1 listener port must pass.
    `    ip6 saddr ::1 accept`,
    `    meta nfproto ipv6 meta l4proto tcp ip6 daddr != ::1 ip6 saddr != @${NFT_POD_IP6_SET} reject with icmpv6 admin-prohibited`,
    ...ipv4.outboundClosed,
    `  }`,
    `  chain outbound {`,
    `    type nat hook output priority -100; policy accept;`,
    `    meta l4proto != tcp accept`,
    `    ${mark} accept`,
    `    ip daddr 127.0.0.0/8 accept`,
    `    ip6 daddr ::1 accept`,
    ...ipv4.toPodProxyPorts,
    `    ip6 daddr @${NFT_POD_IP6_SET} tcp dport ${proxyPorts} accept`,
    ...outboundPass,
    `    meta l4proto tcp redirect to :${OUTBOUND_PORT}`,
    `  }`,
    `}`,
    "",
  ].join("\n");
}

/**
 * Renders the script that replaces the pod's table in one transaction. It flushes the rules and
 * set elements of an existing table and keeps its chains. Deleting a table waits for an RCU grace
 * period (about 12 ms on the test machine), and flushing a table that has no rules yet does not.
 */
export function renderPodRuleset(podIp: string | undefined, state: NftPodState = "captured", exemptions: NftExemptions = NO_EXEMPTIONS, podIp6?: string): string {
  const table = renderPodTable(podIp, state, exemptions, podIp6);
  // Declaring the table first makes the flush succeed when it does not exist yet.
  return [`table ${TABLE}`, `flush table ${TABLE}`, table].join("\n");
}

/**
 * Renders the script that deletes and recreates the pod's table in one transaction. It also
 * replaces chains whose hook or priority an earlier agent version declared differently, which
 * the flushing script cannot change.
 */
export function renderPodRecreation(podIp: string | undefined, state: NftPodState = "captured", exemptions: NftExemptions = NO_EXEMPTIONS, podIp6?: string): string {
  const table = renderPodTable(podIp, state, exemptions, podIp6);
  return [`table ${TABLE}`, `delete table ${TABLE}`, table].join("\n");
}

/** Renders the script that changes the pod's captured IPv6 address from `before` to `after` in place. */
export function renderPodIp6Change(before: string | undefined, after: string | undefined): string {
  for (const ip of [before, after]) {
    if (ip !== undefined && !net.isIPv6(ip)) throw new AgentError("INTERNAL", `invalid pod IPv6 address ${JSON.stringify(ip)} for nftables capture`);
  }
  const lines: string[] = [];
  if (before !== undefined) lines.push(`delete element ${TABLE} ${NFT_POD_IP6_SET} { ${before} }`);
  if (after !== undefined) lines.push(`add element ${TABLE} ${NFT_POD_IP6_SET} { ${after} }`);
  return lines.join("\n") + "\n";
}

/** Renders the nft script that removes the pod's table, and succeeds when there is none. */
export function renderRemoval(): string {
  return [`table ${TABLE}`, `delete table ${TABLE}`, ""].join("\n");
}

/** Renders the nft command that lists the pod's table. */
export function renderListing(): string {
  return `list table ${TABLE}\n`;
}
