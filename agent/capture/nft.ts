// nftables capture: the fallback for kernels that lack a hook eBPF capture needs. Each enrolled
// pod's network namespace gets a table of its own, `table inet ambient_agent`, which steers TCP
// as the eBPF programs do:
//   - outbound: TCP that the pod's applications open to anything but loopback and the pod's own
//     proxy ports is redirected (nat output REDIRECT) to the outbound proxy on 15001;
//   - inbound: TCP that reaches the pod from outside is redirected (nat prerouting REDIRECT) to
//     the inbound plaintext proxy on 15006, except HBONE on 15008 and 15006 itself. Port 15001 is
//     dropped when it does not come from the pod itself.
// The proxies read the address the client dialled with SO_ORIGINAL_DST. conntrack reverses the
// REDIRECT on replies, so the application's getpeername() still shows the address it dialled.
//
// The agent's own sockets carry SO_MARK 0x539 (mask 0xfff; the transparent inbound sockets use
// 0x1539), and the rules let marked traffic through. A process with CAP_NET_RAW can set the same
// mark and so escape capture: pods should run without CAP_NET_RAW.
//
// The table is replaced in one `nft -f` transaction and stays when the agent stops, so a pod
// whose agent is gone fails closed: redirected connections meet no listener and are reset.
//
// NOTE: IPv4 only. Rules match IPv4 addresses; IPv6 TCP is redirected as well, but the proxies
// listen on IPv4 only, so IPv6 connections of an enrolled pod are reset.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";

import { AgentError } from "../errors";
import type { Logger } from "../log";
import { NO_EXCLUDED_PORTS, type ExcludedPorts } from "./exemptions";
import { AGENT_MARK, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT } from "./layout";
import { netnsCookie, originalDestinationOfFd } from "./native";

export const NFT_TABLE_FAMILY = "inet";
export const NFT_TABLE_NAME = "ambient_agent";

/** Mask applied to a socket mark before it is compared with AGENT_MARK; 0x1539 passes too. */
export const AGENT_MARK_MASK = 0xfff;

/** How long one `nft -f` may run before it is killed. */
const NFT_TIMEOUT_MS = 10_000;

/** The ruleset variants: normal capture, or isolation of a pod whose listeners could not start. */
export type NftPodState = "captured" | "isolated";

/** What capture lets through for a pod: kubelet probe sources and the ports its annotations exclude. */
export interface NftExemptions {
  probeSources: readonly string[];
  excludedPorts: ExcludedPorts;
}

export const NO_EXEMPTIONS: NftExemptions = { probeSources: [], excludedPorts: NO_EXCLUDED_PORTS };

/** Renders an nft anonymous set, `{ a, b }`. */
function nftSet(values: readonly (string | number)[]): string {
  return `{ ${values.join(", ")} }`;
}

/**
 * Renders the nft script that replaces the pod's table in one transaction. "isolated" rejects
 * every inbound TCP connection from outside the pod, including HBONE, until the listeners start.
 * NOTE: IPv6 probe sources are left out, because the rules match IPv4 only.
 */
export function renderPodRuleset(podIp: string, state: NftPodState = "captured", exemptions: NftExemptions = NO_EXEMPTIONS): string {
  if (!net.isIPv4(podIp)) {
    throw new AgentError("INTERNAL", `invalid pod IP ${JSON.stringify(podIp)} for nftables capture: it handles IPv4 pods only`);
  }
  const mark = `meta mark & 0x${AGENT_MARK_MASK.toString(16)} == 0x${AGENT_MARK.toString(16)}`;
  const proxyPorts = nftSet([OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT]);
  const probeSources = exemptions.probeSources.filter((ip) => net.isIPv4(ip));
  const { inbound: inboundExcluded, outbound: outboundExcluded } = exemptions.excludedPorts;
  const inboundPass =
    state === "captured"
      ? [
          `    tcp dport { ${INBOUND_PLAINTEXT_PORT}, ${INBOUND_HBONE_PORT} } accept`,
          ...(probeSources.length > 0 ? [`    ip saddr ${nftSet(probeSources)} accept`] : []),
          ...(inboundExcluded.length > 0 ? [`    tcp dport ${nftSet(inboundExcluded)} accept`] : []),
        ]
      : [];
  const outboundPass = outboundExcluded.length > 0 ? [`    tcp dport ${nftSet(outboundExcluded)} accept`] : [];
  const isolation = state === "isolated" ? [`    iifname != "lo" ip saddr != ${podIp} meta l4proto tcp reject with tcp reset`] : [];
  return [
    // Declaring the table first makes the delete succeed when it does not exist yet.
    `table ${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME}`,
    `delete table ${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME}`,
    `table ${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME} {`,
    `  chain prerouting_guard {`,
    `    type filter hook prerouting priority mangle; policy accept;`,
    `    iifname "lo" accept`,
    `    ip saddr ${podIp} accept`,
    `    tcp dport ${OUTBOUND_PORT} drop`,
    `  }`,
    `  chain inbound {`,
    `    type nat hook prerouting priority -100; policy accept;`,
    `    meta l4proto != tcp accept`,
    `    iifname "lo" accept`,
    `    ip saddr ${podIp} accept`,
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
    `  chain outbound {`,
    `    type nat hook output priority -100; policy accept;`,
    `    meta l4proto != tcp accept`,
    `    ${mark} accept`,
    `    ip daddr 127.0.0.0/8 accept`,
    `    ip6 daddr ::1 accept`,
    `    ip daddr ${podIp} tcp dport ${proxyPorts} accept`,
    ...outboundPass,
    `    meta l4proto tcp redirect to :${OUTBOUND_PORT}`,
    `  }`,
    `}`,
    "",
  ].join("\n");
}

/** Renders the nft script that removes the pod's table, and succeeds when there is none. */
export function renderRemoval(): string {
  return [`table ${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME}`, `delete table ${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME}`, ""].join("\n");
}

/**
 * Folders searched for the nft tool before PATH. PATH alone is not enough: under npm scripts and
 * npx it starts with node_modules/.bin, where the @vercel/nft package installs an unrelated `nft`.
 */
const NFT_DIRECTORIES = ["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin", "/bin"];

let nftPath: string | undefined;

/** Returns the path of the nftables tool: the first of NFT_DIRECTORIES that has it, else "nft" from PATH. */
export function nftBinary(): string {
  nftPath ??= NFT_DIRECTORIES.map((directory) => path.join(directory, "nft")).find((candidate) => fs.existsSync(candidate)) ?? "nft";
  return nftPath;
}

/** Runs `nft -f -` with `script` inside the network namespace at netnsPath. Throws with nft's message on failure. */
export function runNft(netnsPath: string, script: string, what: string): void {
  const result = spawnSync("nsenter", [`--net=${netnsPath}`, "--", nftBinary(), "-f", "-"], {
    input: script,
    encoding: "utf8",
    timeout: NFT_TIMEOUT_MS,
  });
  if (result.error) {
    throw new AgentError("INTERNAL", `${what} in network namespace ${netnsPath} failed: ${result.error.message}. Check that nsenter and nft (the nftables package) are installed`, {
      cause: result.error,
    });
  }
  if (result.status !== 0) {
    throw new AgentError(
      "INTERNAL",
      `${what} in network namespace ${netnsPath} failed: nft exited with ${result.status ?? result.signal}: ${result.stderr.trim()}. ` +
        "Check that the kernel has nf_tables with nat, reject and socket support",
    );
  }
}

/** A pod that has our table, as stored in the state folder. */
interface NftPod {
  netnsPath: string;
  podIp: string;
  state: NftPodState;
}

export interface NftCaptureOptions {
  /**
   * Folder that lists the pods with a table, one file per netns cookie, so that an agent started
   * later can remove the tables of pods it no longer serves. Under /run, so it ends with the node's boot.
   */
  stateDirectory: string;
}

/**
 * nftables capture for the pods of one node. The methods mirror the eBPF Capture's, keyed by the
 * netns cookie; the table of a pod is written when its inbound listener is attached (or the pod
 * is isolated), which always happens before enroll().
 */
export class NftCapture {
  /** Pods whose table this process wrote. */
  private readonly pods = new Map<bigint, NftPod>();
  /** Pods whose table an earlier run wrote and this one has not rewritten yet; removeStale-style callers remove them. */
  private readonly leftovers = new Map<bigint, NftPod>();
  readonly exemptions: NftExemptionStore;

  constructor(
    private readonly options: NftCaptureOptions,
    private readonly logger: Logger,
  ) {
    fs.mkdirSync(options.stateDirectory, { recursive: true, mode: 0o700 });
    this.exemptions = new NftExemptionStore((podIp) => this.reapply(podIp));
    this.loadState();
  }

  /**
   * Rewrites the pod's table when its IP changed. The table itself is written by attachInbound or
   * guardInbound, which know the pod's namespace: the reconciler calls one of them next to every
   * enroll (attachInbound before it, guardInbound right after it for an isolated pod).
   */
  enroll(cookie: bigint, podIp: string): void {
    const pod = this.pods.get(cookie);
    if (pod !== undefined && pod.podIp !== podIp) this.apply(cookie, { ...pod, podIp });
  }

  /** Removes the pod's table: its new connections go straight out, and inbound ones reach the application. */
  unenroll(cookie: bigint): void {
    const pod = this.pods.get(cookie) ?? this.leftovers.get(cookie);
    if (pod === undefined) return;
    this.remove(cookie, pod);
  }

  /** Lists the pods with a table, including those an earlier run left. */
  enrolledCookies(): bigint[] {
    return [...new Set([...this.pods.keys(), ...this.leftovers.keys()])];
  }

  /** Writes the pod's table with capture in both directions. REDIRECT finds the 15006 listener by its port. */
  attachInbound(netnsPath: string, cookie: bigint, podIp: string): void {
    this.apply(cookie, { netnsPath, podIp, state: "captured" });
  }

  /** Writes the pod's table in its isolated form: every inbound TCP connection from outside is reset. */
  guardInbound(netnsPath: string, cookie: bigint, podIp: string): void {
    this.apply(cookie, { netnsPath, podIp, state: "isolated" });
  }

  /** Removes the pod's table, unless the cookie's table now serves another IP (the pod's address changed). */
  detachInbound(cookie: bigint, podIp: string): void {
    const pod = this.pods.get(cookie) ?? this.leftovers.get(cookie);
    if (pod === undefined || pod.podIp !== podIp) return;
    this.remove(cookie, pod);
  }

  inboundPods(): { podIp: string; cookie: bigint }[] {
    const all = new Map([...this.leftovers, ...this.pods]);
    return [...all.entries()].map(([cookie, pod]) => ({ podIp: pod.podIp, cookie }));
  }

  /** Returns the address a redirected connection was dialled to, from conntrack; undefined when it was not redirected. */
  takeOriginalDestination(socket: net.Socket): { ip: string; port: number } | undefined {
    const fd = socketFd(socket);
    if (fd === undefined) return undefined;
    return originalDestinationOfFd(fd);
  }

  /** Nothing to release: the tables stay, so the pods stay captured while no agent runs. */
  close(): void {}

  /** Rewrites the tables of the pods at podIp (every pod when undefined) after their exemptions changed. */
  private reapply(podIp: string | undefined): void {
    for (const [cookie, pod] of this.pods) {
      if (podIp === undefined || pod.podIp === podIp) this.apply(cookie, pod);
    }
  }

  private apply(cookie: bigint, pod: NftPod): void {
    const startedAt = process.hrtime.bigint();
    const script = renderPodRuleset(pod.podIp, pod.state, this.exemptions.of(pod.podIp));
    runNft(pod.netnsPath, script, `writing the nftables capture table of pod ${pod.podIp}`);
    this.pods.set(cookie, pod);
    this.leftovers.delete(cookie);
    this.saveState(cookie, pod);
    this.logger.debug(
      { netnsPath: pod.netnsPath, cookie: cookie.toString(), podIp: pod.podIp, state: pod.state, durationMs: Number(process.hrtime.bigint() - startedAt) / 1e6 },
      "nftables capture table written",
    );
  }

  private remove(cookie: bigint, pod: NftPod): void {
    if (this.sameNamespace(pod.netnsPath, cookie)) {
      runNft(pod.netnsPath, renderRemoval(), `removing the nftables capture table of pod ${pod.podIp}`);
    }
    this.pods.delete(cookie);
    this.leftovers.delete(cookie);
    fs.rmSync(this.stateFile(cookie), { force: true });
    this.logger.info({ netnsPath: pod.netnsPath, cookie: cookie.toString(), podIp: pod.podIp }, "nftables capture table removed");
  }

  /** Checks that netnsPath still opens the namespace with this cookie: a /proc/<pid>/ns/net path goes stale when its process ends. */
  private sameNamespace(netnsPath: string, cookie: bigint): boolean {
    try {
      return netnsCookie(netnsPath) === cookie;
    } catch {
      return false;
    }
  }

  private stateFile(cookie: bigint): string {
    return path.join(this.options.stateDirectory, `${cookie}.json`);
  }

  private saveState(cookie: bigint, pod: NftPod): void {
    const file = this.stateFile(cookie);
    fs.writeFileSync(`${file}.tmp`, JSON.stringify(pod));
    fs.renameSync(`${file}.tmp`, file);
  }

  /**
   * Reads the pods an earlier run left a table in, so that stale ones can be removed. A pod whose
   * namespace is gone took its table with it, so only its file is deleted.
   */
  private loadState(): void {
    for (const name of fs.readdirSync(this.options.stateDirectory)) {
      const match = /^(\d+)\.json$/.exec(name);
      if (!match) continue;
      const file = path.join(this.options.stateDirectory, name);
      try {
        const pod = JSON.parse(fs.readFileSync(file, "utf8")) as NftPod;
        const cookie = BigInt(match[1]);
        if (this.sameNamespace(pod.netnsPath, cookie)) this.leftovers.set(cookie, pod);
        else fs.rmSync(file, { force: true });
      } catch (error) {
        this.logger.warn({ err: error, file: name }, "ignoring an unreadable nftables capture state file");
      }
    }
  }
}

/**
 * Probe sources and excluded ports for nftables capture, kept in memory: a change rewrites the
 * tables of the pods it concerns. The methods mirror CaptureExemptions.
 */
export class NftExemptionStore {
  private probeSourceList: string[] = [];
  private readonly excluded = new Map<string, ExcludedPorts>();

  constructor(private readonly onChange: (podIp: string | undefined) => void) {}

  setProbeSources(addresses: readonly string[]): void {
    this.probeSourceList = [...addresses];
    this.onChange(undefined);
  }

  probeSources(): string[] {
    return [...this.probeSourceList];
  }

  setExcludedPorts(podIp: string, ports: ExcludedPorts): void {
    for (const port of [...ports.inbound, ...ports.outbound]) {
      if (port === OUTBOUND_PORT || port === INBOUND_PLAINTEXT_PORT || port === INBOUND_HBONE_PORT) {
        throw new AgentError("INTERNAL", `port ${port} of pod ${podIp} cannot be excluded from capture: it is a proxy port`);
      }
    }
    const empty = ports.inbound.length === 0 && ports.outbound.length === 0;
    const before = this.excluded.get(podIp);
    if (JSON.stringify(before ?? NO_EXCLUDED_PORTS) === JSON.stringify(ports)) return;
    if (empty) this.excluded.delete(podIp);
    else this.excluded.set(podIp, { inbound: [...ports.inbound], outbound: [...ports.outbound] });
    this.onChange(podIp);
  }

  clearExcludedPorts(podIp: string): void {
    this.setExcludedPorts(podIp, NO_EXCLUDED_PORTS);
  }

  excludedPorts(): Map<string, ExcludedPorts> {
    return new Map(this.excluded);
  }

  /** Returns the exemptions that the table of the pod at podIp carries. */
  of(podIp: string): NftExemptions {
    return { probeSources: this.probeSourceList, excludedPorts: this.excluded.get(podIp) ?? NO_EXCLUDED_PORTS };
  }
}

/** Returns the file descriptor of a socket that Node accepted, or undefined when Node does not expose it. */
function socketFd(socket: net.Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : undefined;
}
