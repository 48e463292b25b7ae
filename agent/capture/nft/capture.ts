// nftables capture: the fallback for kernels that lack a hook eBPF capture needs. Each enrolled
// pod's network namespace gets a table of its own (ruleset.ts), which this file writes,
// keeps track of and removes. The proxies read the address the client dialled with
// SO_ORIGINAL_DST. conntrack reverses the REDIRECT on replies, so the application's
// getpeername() still shows the address it dialled.
//
// The table stays when the agent stops, so a pod whose agent is gone fails closed: redirected
// connections meet no listener and are reset. An agent that starts again keeps a pod's table as
// it is when the table still lists exactly as the earlier agent wrote it, so restarts rewrite
// nothing.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";

import type { MapUsageView, ProgramView } from "../../admin/views";
import { AgentError } from "../../errors";
import type { Logger } from "../../log";
import { NO_EXCLUDED_PORTS, type ExcludedPorts } from "../ebpf/exemptions";
import { INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT } from "../layout";
import { libnftablesAvailable, netnsCookie, originalDestinationOfFd, runNftablesScript } from "../native";
import {
  NFT_POD_IP6_SET,
  NFT_TABLE_FAMILY,
  NFT_TABLE_NAME,
  renderListing,
  renderPodIp6Change,
  renderPodRecreation,
  renderPodRuleset,
  renderPodTable,
  renderRemoval,
  type NftExemptions,
  type NftPodState,
} from "./ruleset";

export {
  AGENT_MARK_MASK,
  NFT_TABLE_FAMILY,
  NFT_TABLE_NAME,
  NO_EXEMPTIONS,
  renderPodRuleset,
  renderPodTable,
  renderRemoval,
  type NftExemptions,
  type NftPodState,
} from "./ruleset";

/** How long one `nft -f` may run before it is killed. */
const NFT_TIMEOUT_MS = 10_000;

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

let useLibnftables: boolean | undefined;

/**
 * Runs `script` as one nftables transaction inside the network namespace at netnsPath and returns
 * what nftables printed. Throws with nftables' message on failure. libnftables runs on a native
 * thread without starting nsenter and nft, so the nft tool is used only when libnftables is missing.
 */
export function runNft(netnsPath: string, script: string, what: string): string {
  useLibnftables ??= libnftablesAvailable();
  if (useLibnftables) return runNftablesScript(netnsPath, script, `${what} in network namespace ${netnsPath}`);
  return runNftTool(netnsPath, script, what);
}

/** Runs `nft -f -` with `script` inside the network namespace at netnsPath and returns its output. Throws with nft's message on failure. */
export function runNftTool(netnsPath: string, script: string, what: string): string {
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
  return result.stdout;
}

/** A pod that has our table, as stored in the state folder. */
interface NftPod {
  netnsPath: string;
  /** The address the pod is kept under: its IPv4 address, or its IPv6 address for an IPv6-only pod. */
  podIp: string;
  /** The pod's captured IPv6 address, in the table's pod_ip6 set. */
  podIp6?: string;
  state: NftPodState;
  /** The table definition last written (renderPodTable). */
  table?: string;
  /** The kernel's listing of the table right after it was written, to tell whether it changed since. */
  listing?: string;
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
 * netns cookie. The table of a pod is written when its inbound listener is attached (or the pod
 * is isolated), which always happens before enroll().
 */
export class NftCapture {
  /** Pods whose table this process wrote or kept. */
  private readonly pods = new Map<bigint, NftPod>();
  /** Pods whose table an earlier run wrote and this one has not rewritten yet. removeStale-style callers remove them. */
  private readonly leftovers = new Map<bigint, NftPod>();
  /**
   * An open file descriptor of each pod's namespace, by cookie. The table is removed through it
   * when the namespace's path is gone (its name deleted, or its process ended) but another
   * reference keeps the namespace alive.
   */
  private readonly namespaceFds = new Map<bigint, number>();
  /** Namespaces of IPv6-only pods that linkInbound named and whose table attachInbound6 writes, by cookie. */
  private readonly linkedNamespaces = new Map<bigint, string>();
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
   * Rewrites the pod's table when its IP changed. The table itself is written by attachInbound
   * (attachInbound6 for an IPv6-only pod) or guardInbound, which know the pod's namespace: the
   * reconciler calls one of them next to every enroll (attachInbound before it, guardInbound right
   * after it for an isolated pod).
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

  /**
   * Writes the pod's table with capture in both directions. REDIRECT finds the 15006 listener by
   * its port. The pod's captured IPv6 address, if the table has one, stays until enrollIpv6 or
   * detachInbound changes it, so that a restart of the pod's listeners rewrites nothing.
   */
  attachInbound(netnsPath: string, cookie: bigint, podIp: string): void {
    const podIp6 = (this.pods.get(cookie) ?? this.leftovers.get(cookie))?.podIp6;
    this.apply(cookie, { netnsPath, podIp, podIp6, state: "captured" });
  }

  /**
   * Captures the pod's IPv6 connections at podIp6, once its IPv6 15006 listener runs: call after
   * attachInbound. podIp4 undefined marks an IPv6-only pod, whose whole table this writes (after
   * linkInbound named its namespace), with podIp6 as the address the pod is kept under.
   */
  attachInbound6(cookie: bigint, podIp6: string, podIp4?: string): void {
    if (podIp4 !== undefined) {
      this.setPodIp6(cookie, podIp6);
      return;
    }
    const netnsPath = this.linkedNamespaces.get(cookie) ?? (this.pods.get(cookie) ?? this.leftovers.get(cookie))?.netnsPath;
    if (netnsPath === undefined) {
      throw new AgentError("INTERNAL", `capturing IPv6-only pod ${podIp6} is not possible: its network namespace is unknown, so call linkInbound first`);
    }
    this.apply(cookie, { netnsPath, podIp: podIp6, podIp6, state: "captured" });
    this.linkedNamespaces.delete(cookie);
  }

  /**
   * Records the namespace of an IPv6-only pod for attachInbound6 and writes nothing, so a table
   * that an earlier agent wrote stays as it is until then. The reconciler follows this call with
   * attachInbound6, or with guardInbound when the pod's listeners fail to start.
   */
  linkInbound(netnsPath: string, cookie: bigint): void {
    this.linkedNamespaces.set(cookie, netnsPath);
  }

  /** Sets the pod's captured IPv6 address; undefined makes its native IPv6 connections fail again. */
  enrollIpv6(cookie: bigint, podIp6: string | undefined): void {
    this.setPodIp6(cookie, podIp6);
  }

  /** Writes the pod's table in its isolated form: every inbound TCP connection from outside is reset, and IPv6 fails closed. */
  guardInbound(netnsPath: string, cookie: bigint, podIp: string): void {
    this.apply(cookie, { netnsPath, podIp, state: "isolated" });
    this.linkedNamespaces.delete(cookie);
  }

  /**
   * Removes the pod's table, unless the cookie's table now serves another IP (the pod's address
   * changed). For the pod's captured IPv6 address, stops capturing IPv6 only.
   */
  detachInbound(cookie: bigint, podIp: string): void {
    this.linkedNamespaces.delete(cookie);
    const pod = this.pods.get(cookie) ?? this.leftovers.get(cookie);
    if (pod === undefined) return;
    // An IPv6-only pod is kept under its IPv6 address, so that address removes its whole table.
    if (pod.podIp === podIp) this.remove(cookie, pod);
    else if (pod.podIp6 !== undefined && pod.podIp6 === podIp) this.setPodIp6(cookie, undefined);
  }

  inboundPods(): { podIp: string; cookie: bigint }[] {
    const all = new Map([...this.leftovers, ...this.pods]);
    return [...all.entries()].flatMap(([cookie, pod]) => [
      { podIp: pod.podIp, cookie },
      ...(pod.podIp6 === undefined || pod.podIp6 === pod.podIp ? [] : [{ podIp: pod.podIp6, cookie }]),
    ]);
  }

  /**
   * Lists the pods' tables (one per pod network namespace, written by this process or left by an
   * earlier one) and the entries of their pod_ip6 sets summed over the tables. nftables sets have
   * no fixed capacity, so maxEntries is 0. Reads only this process's records, not the kernel.
   */
  usage(): { programs: ProgramView[]; maps: MapUsageView[] } {
    const all = new Map([...this.leftovers, ...this.pods]);
    const programs = [...all.values()].map((pod) => ({ name: `${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME}`, type: `nftables table (${pod.state})`, attachedTo: pod.netnsPath }));
    const ip6Entries = [...all.values()].filter((pod) => pod.podIp6 !== undefined).length;
    return { programs, maps: [{ name: NFT_POD_IP6_SET, entries: ip6Entries, maxEntries: 0 }] };
  }

  /** Returns the address a redirected connection was dialled to, from conntrack, or undefined when it was not redirected. */
  takeOriginalDestination(socket: net.Socket): { ip: string; port: number } | undefined {
    const fd = socketFd(socket);
    if (fd === undefined) return undefined;
    return originalDestinationOfFd(fd);
  }

  /**
   * Lists the network namespaces whose table this process wrote or kept and whose state file is
   * gone: another agent removed the table, as its uninstall does, so the pod is no longer captured.
   */
  missingTables(): string[] {
    return [...this.pods.entries()].filter(([cookie]) => !fs.existsSync(this.stateFile(cookie))).map(([, pod]) => pod.netnsPath);
  }

  /** Releases the namespace descriptors. The tables stay, so the pods stay captured while no agent runs. */
  close(): void {
    for (const cookie of [...this.namespaceFds.keys()]) this.releaseNamespace(cookie);
  }

  /** Rewrites the tables of the pods at podIp (every pod when undefined) after their exemptions changed. */
  private reapply(podIp: string | undefined): void {
    for (const [cookie, pod] of this.pods) {
      if (podIp === undefined || pod.podIp === podIp) this.apply(cookie, pod);
    }
  }

  /**
   * Changes the pod's captured IPv6 address in place: adding a set element is cheap, and the
   * table's other rules stay. Does nothing for a pod without a table written by this process.
   */
  private setPodIp6(cookie: bigint, podIp6: string | undefined): void {
    const pod = this.pods.get(cookie);
    if (pod === undefined || pod.podIp6 === podIp6) return;
    if (pod.state === "isolated" && podIp6 !== undefined) {
      throw new AgentError("INTERNAL", `capturing IPv6 address ${podIp6} of isolated pod ${pod.podIp} is not possible: attach its inbound listener first`);
    }
    const startedAt = process.hrtime.bigint();
    const what = `changing the captured IPv6 address of pod ${pod.podIp} from ${pod.podIp6 ?? "none"} to ${podIp6 ?? "none"}`;
    runNft(pod.netnsPath, renderPodIp6Change(pod.podIp6, podIp6), what);
    const table = renderPodTable(podIpv4(pod), pod.state, this.exemptions.of(pod.podIp), podIp6);
    this.record(cookie, { ...pod, podIp6, table }, startedAt);
  }

  private apply(cookie: bigint, pod: NftPod): void {
    const startedAt = process.hrtime.bigint();
    const podIp4 = podIpv4(pod);
    const table = renderPodTable(podIp4, pod.state, this.exemptions.of(pod.podIp), pod.podIp6);
    if (this.keepLeftover(cookie, pod, table)) return;
    const what = `writing the nftables capture table of pod ${pod.podIp}`;
    try {
      runNft(pod.netnsPath, renderPodRuleset(podIp4, pod.state, this.exemptions.of(pod.podIp), pod.podIp6), what);
    } catch (error) {
      // A table an earlier agent version wrote may declare a chain with another hook or priority.
      this.logger.warn({ err: error, netnsPath: pod.netnsPath, podIp: pod.podIp }, "replacing the nftables capture table in place failed; recreating it");
      runNft(pod.netnsPath, renderPodRecreation(podIp4, pod.state, this.exemptions.of(pod.podIp), pod.podIp6), what);
    }
    this.record(cookie, { ...pod, table }, startedAt);
  }

  /**
   * Adopts the table an earlier run wrote for this pod when it would be written the same and
   * the kernel still lists it exactly as it did after that write. Rewriting it would cost an
   * RCU grace period per pod on every agent start.
   */
  private keepLeftover(cookie: bigint, pod: NftPod, table: string): boolean {
    const leftover = this.leftovers.get(cookie);
    if (leftover === undefined || leftover.table !== table || leftover.netnsPath !== pod.netnsPath || leftover.listing === undefined) return false;
    if (this.listTable(pod.netnsPath) !== leftover.listing) return false;
    this.pods.set(cookie, leftover);
    this.leftovers.delete(cookie);
    this.logger.debug({ netnsPath: pod.netnsPath, cookie: cookie.toString(), podIp: pod.podIp }, "nftables capture table kept as an earlier run wrote it");
    return true;
  }

  /** Stores the pod after a write, with the kernel's listing of its table. */
  private record(cookie: bigint, pod: NftPod, startedAt: bigint): void {
    this.holdNamespace(cookie, pod.netnsPath);
    const written = { ...pod, listing: this.listTable(pod.netnsPath) };
    this.pods.set(cookie, written);
    this.leftovers.delete(cookie);
    this.saveState(cookie, written);
    this.logger.debug(
      {
        netnsPath: pod.netnsPath,
        cookie: cookie.toString(),
        podIp: pod.podIp,
        podIp6: pod.podIp6,
        state: pod.state,
        durationMs: Number(process.hrtime.bigint() - startedAt) / 1e6,
      },
      "nftables capture table written",
    );
  }

  /** Returns the kernel's listing of the pod's table, or undefined when it cannot be listed. */
  private listTable(netnsPath: string): string | undefined {
    try {
      return runNft(netnsPath, renderListing(), "listing the nftables capture table");
    } catch (error) {
      this.logger.debug({ err: error, netnsPath }, "listing the nftables capture table failed");
      return undefined;
    }
  }

  private remove(cookie: bigint, pod: NftPod): void {
    const netnsPath = this.reachableNamespace(cookie, pod.netnsPath);
    if (netnsPath !== undefined) {
      runNft(netnsPath, renderRemoval(), `removing the nftables capture table of pod ${pod.podIp}`);
    }
    this.releaseNamespace(cookie);
    this.pods.delete(cookie);
    this.leftovers.delete(cookie);
    this.linkedNamespaces.delete(cookie);
    fs.rmSync(this.stateFile(cookie), { force: true });
    this.logger.info({ netnsPath: pod.netnsPath, cookie: cookie.toString(), podIp: pod.podIp }, "nftables capture table removed");
  }

  /** Opens the pod's namespace once, so that its table can be removed after its path is gone. */
  private holdNamespace(cookie: bigint, netnsPath: string): void {
    if (this.namespaceFds.has(cookie)) return;
    try {
      this.namespaceFds.set(cookie, fs.openSync(netnsPath, "r"));
    } catch (error) {
      this.logger.debug({ err: error, netnsPath }, "opening the pod's network namespace failed; its table is removed through its path only");
    }
  }

  private releaseNamespace(cookie: bigint): void {
    const fd = this.namespaceFds.get(cookie);
    if (fd === undefined) return;
    this.namespaceFds.delete(cookie);
    fs.closeSync(fd);
  }

  /**
   * Returns a path that opens the namespace with this cookie: the pod's own path, else the
   * descriptor held since its table was written. Undefined when the namespace is gone.
   */
  private reachableNamespace(cookie: bigint, netnsPath: string): string | undefined {
    if (this.sameNamespace(netnsPath, cookie)) return netnsPath;
    const fd = this.namespaceFds.get(cookie);
    const held = fd === undefined ? undefined : `/proc/${process.pid}/fd/${fd}`;
    return held !== undefined && this.sameNamespace(held, cookie) ? held : undefined;
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
        if (this.sameNamespace(pod.netnsPath, cookie)) {
          this.leftovers.set(cookie, pod);
          this.holdNamespace(cookie, pod.netnsPath);
        } else fs.rmSync(file, { force: true });
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

/** Returns the pod's IPv4 address, or undefined for an IPv6-only pod, which is kept under its IPv6 address. */
function podIpv4(pod: NftPod): string | undefined {
  return net.isIPv4(pod.podIp) ? pod.podIp : undefined;
}

/** Returns the file descriptor of a socket that Node accepted, or undefined when Node does not expose it. */
function socketFd(socket: net.Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : undefined;
}
