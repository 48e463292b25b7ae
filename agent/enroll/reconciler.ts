// Keeps the node's enrolled workloads in step with the mesh state. For each enrolled workload it
// finds the pod's network namespace and starts the in-pod listeners (15001 outbound, 15008 inbound
// HBONE, 15006 inbound plaintext, which also links sk_lookup). Only then does it put the
// namespace's cookie in the capture map, so that no captured connection meets a missing listener.
//
// Capture fails closed. A workload whose listeners cannot start is isolated and retried: its cookie
// is in the capture maps with no listener, so its connections are refused and inbound ones dropped.
// Entries that an earlier run left are removed only for pods that are no longer wanted.

import type { EnrollmentCapture } from "../capture/backend";
import { netnsCookie, netnsIpv4Addresses, netnsIpv6Addresses } from "../capture/native";
import { NetnsPodNetwork } from "../capture/netns-network";
import { formatSpiffeId, identityOf } from "../identity/spiffe";
import type { Logger } from "../log";
import { EMPTY_DRAIN, sumDrains, type DrainSummary } from "../proxy/drain";
import { canonicalIp, workloadIpOfFamily } from "../state/ip";
import type { Identity, Workload } from "../state/types";
import { AmbiguousPodIps } from "./ambiguous-ip";
import { capturePodIp, isIpv6Only, podIpv6ToCapture } from "./dual-stack";
import { ExcludedPortsWriter } from "./excluded-ports";
import { scanNetns, type NetnsScan } from "./netns";
import { disableTransparentSource, enableTransparentSource } from "./transparent-source";

/** The proxies of one enrolled workload. */
export interface WorkloadProxies {
  start(): Promise<void>;
  /**
   * Closes the listeners at once and lets open connections finish for up to `graceMs` (0: reset
   * them now). A second call may shorten the deadline.
   */
  stop(graceMs?: number): Promise<DrainSummary>;
  /** Counts the connections and HBONE streams open now. */
  openConnections(): number;
  /**
   * Authorizes the open inbound connections and HBONE streams again with the current
   * configuration, closes the ones it now denies, and returns how many it closed.
   */
  recheck(): number;
}

export interface EnrolledWorkload {
  workload: Workload;
  identity: Identity;
  netnsPath: string;
  cookie: bigint;
  proxies: WorkloadProxies;
  /** The pod network the proxies use. It is closed after they stop, which releases its spare sockets. */
  network: NetnsPodNetwork;
}

/** A wanted workload whose namespace is known but whose listeners could not start. */
interface IsolatedWorkload {
  workload: Workload;
  netnsPath: string;
  cookie: bigint;
}

export interface ReconcilerOptions {
  trustDomain: string;
  capture: EnrollmentCapture;
  /** Builds the outbound and inbound proxies of one workload inside its namespace. */
  createProxies(workload: Workload, identity: Identity, network: NetnsPodNetwork, cookie: bigint): WorkloadProxies;
  logger: Logger;
  /** Whether the inbound proxies connect to applications from the client's address (default false). */
  transparentSource?: boolean;
  /**
   * The network namespace that the CNI plugin named for a workload, when it did. The workload is
   * enrolled there when the namespace has its IP, and nowhere else. Without a hint, the namespace
   * is found by IP.
   */
  netnsHint?: (workload: Workload) => string | undefined;
  /** Called after each enrollment and unenrollment, for the audit log. An error it throws is logged. */
  onEnrollment?: (event: EnrollmentEvent) => void;
}

/** A workload that the reconciler enrolled or unenrolled, and why. */
export interface EnrollmentEvent {
  action: "enrolled" | "unenrolled";
  workload: Workload;
  identity: Identity;
  reason: string;
}

/** Reasons used when update() was given none for a workload. */
export const DEFAULT_ENROLL_REASON = "pod selected for ambient mode on this node";
export const DEFAULT_UNENROLL_REASON = "pod no longer selected for ambient mode on this node";

/**
 * Workloads enrolled at once. Their native calls run one after another on the event loop, but
 * certificate issuance and listener start-up wait on other threads, so a few in flight overlap
 * those waits. With 100 new pods on 2 cores (test/bench/enrollment.ts), one at a time took
 * about 2.4 s, and 8 at once about 0.9 to 1.8 s.
 */
const ENROLL_CONCURRENCY = 8;

/** Runs `work` on every item with at most `limit` in flight and returns the results in item order. */
async function runConcurrently<T, R>(items: T[], limit: number, work: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const index = next++;
      results[index] = await work(items[index]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

/** How long to wait before trying again to enroll a workload that failed. */
const RETRY_DELAY_MS = 1_000;

export class EnrollmentReconciler {
  private readonly enrolled = new Map<string, EnrolledWorkload>();
  private readonly isolated = new Map<string, IsolatedWorkload>();
  /** Namespaces whose workload is being enrolled now, by cookie, so that two enrolments at once cannot share one. */
  private readonly claims = new Map<bigint, string>();
  /** Namespaces isolated because several held a wanted workload's IP at once. */
  private readonly ambiguous: AmbiguousPodIps;
  /** The last problem logged per workload, so a retry that fails the same way logs at debug level. */
  private readonly lastProblem = new Map<string, string>();
  private desired: Workload[] = [];
  /** Reasons given to update() for workloads not yet enrolled or unenrolled, by uid. */
  private readonly reasons = new Map<string, string>();
  private running: Promise<void> = Promise.resolve();
  private retryTimer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** Set while the node is being handed to a replacement, which then writes capture alone. */
  private frozen = false;
  private stopping: Promise<DrainSummary> | undefined;
  /** The workloads whose proxies uninstall() drains, which it no longer lists as enrolled. */
  private draining: EnrolledWorkload[] | undefined;

  /** Writes the ports that each workload's annotations exclude from capture. */
  private readonly excludedPorts: ExcludedPortsWriter;

  constructor(private readonly options: ReconcilerOptions) {
    this.excludedPorts = new ExcludedPortsWriter(options.capture.exemptions, options.logger);
    this.ambiguous = new AmbiguousPodIps(options.capture, (cookie, workload) => this.detachInbound(cookie, workload), options.logger);
  }

  /** Lists the workloads enrolled right now, for diagnostics. */
  list(): EnrolledWorkload[] {
    return [...this.enrolled.values()];
  }

  /** Returns the workloads that the last update() asked to enrol, served or not yet. */
  desiredWorkloads(): readonly Workload[] {
    return this.desired;
  }

  /**
   * Lists the namespaces isolated because several held one wanted workload's IP, for diagnostics:
   * the workload stays unenrolled until one namespace alone has the IP.
   */
  listAmbiguous(): { workload: string; ip: string; netns: string; cookie: bigint }[] {
    return this.ambiguous.list();
  }

  /** Lists the workloads that are isolated because their listeners could not start. */
  listIsolated(): { workload: string; netns: string; cookie: bigint }[] {
    return [...this.isolated.values()].map((entry) => ({ workload: entry.workload.uid, netns: entry.netnsPath, cookie: entry.cookie }));
  }

  /**
   * Sets the workloads that should be enrolled and reconciles; calls are serialized. `reasons`
   * explains, by workload uid, why workloads entered or left the set; an enrollment that waits
   * for a retry keeps its reason until it succeeds.
   */
  update(desired: Workload[], reasons?: ReadonlyMap<string, string>): Promise<void> {
    this.desired = desired;
    for (const [uid, reason] of reasons ?? []) this.reasons.set(uid, reason);
    this.running = this.running.then(() => this.reconcile());
    return this.running;
  }

  /**
   * Unenrolls a workload now, even when it is still wanted, for a pod whose sandbox is being
   * replaced: its namespace is going away. The next update() enrolls it again wherever it is then.
   */
  evict(uid: string, reason: string): Promise<void> {
    this.running = this.running.then(async () => {
      const entry = this.enrolled.get(uid);
      if (entry !== undefined && !this.stopped && !this.frozen) await this.unenroll(entry, reason);
    });
    return this.running;
  }

  /** Counts the connections and HBONE streams open now across every enrolled workload. */
  openConnections(): number {
    let open = 0;
    for (const entry of this.draining ?? this.enrolled.values()) open += entry.proxies.openConnections();
    return open;
  }

  /**
   * Authorizes the open inbound connections of the enrolled workloads in `stillEnrolled` again with the
   * current configuration and closes the ones now denied. Returns how many it closed. Workloads
   * outside `stillEnrolled` are left to the next update(), which stops their proxies.
   */
  recheck(stillEnrolled: ReadonlySet<string>): number {
    let closed = 0;
    for (const entry of this.enrolled.values()) {
      if (stillEnrolled.has(entry.workload.uid)) closed += entry.proxies.recheck();
    }
    return closed;
  }

  /**
   * Stops every proxy this process started: listeners close at once, and open connections may
   * finish for up to `graceMs` before they are reset. Capture entries stay, so the pods stay closed.
   * A second call may shorten the deadline (0 resets what is left now) and resolves with the same summary.
   */
  stop(graceMs = 0): Promise<DrainSummary> {
    if (this.stopping) {
      for (const entry of this.draining ?? this.enrolled.values()) void this.stopProxies(entry, graceMs);
      return this.stopping;
    }
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.stopping = this.stopAll(graceMs);
    return this.stopping;
  }

  private async stopAll(graceMs: number): Promise<DrainSummary> {
    await this.running;
    const entries = [...this.enrolled.values()];
    return sumDrains(await Promise.all(entries.map((entry) => this.stopProxies(entry, graceMs))));
  }

  /**
   * Unenrolls every workload for good, for an agent being uninstalled. The capture entries go
   * first, so new connections reach the pods directly, and the isolated and ambiguous namespaces
   * are released. Open connections then drain as in stop(), whose second call shortens the
   * deadline here too. Last, each pod's transparent-source routing goes and each workload gets
   * an unenrolled event with `reason`.
   */
  uninstall(reason: string, graceMs = 0): Promise<DrainSummary> {
    if (this.stopping) return this.stopping;
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.stopping = this.uninstallAll(reason, graceMs);
    return this.stopping;
  }

  private async uninstallAll(reason: string, graceMs: number): Promise<DrainSummary> {
    await this.running;
    const entries = [...this.enrolled.values()];
    this.draining = entries;
    for (const entry of entries) this.releaseLogged(entry.workload.uid, () => this.releaseCapture(entry));
    for (const entry of [...this.isolated.values()]) this.releaseLogged(entry.workload.uid, () => this.release(entry));
    this.ambiguous.releaseUnwanted(new Map(), new Set());
    const drained = sumDrains(await Promise.all(entries.map((entry) => this.stopProxies(entry, graceMs))));
    for (const entry of entries) this.finishUnenroll(entry, reason, reason);
    return drained;
  }

  /**
   * Removes capture entries of network namespaces that no wanted workload has: pods that left
   * while no agent ran. Entries of wanted pods stay even when they failed to enroll, so they stay
   * closed. Returns the cookies whose entries were removed.
   */
  removeStaleCookies(): bigint[] {
    const wantedCookies = new Set([...this.servedCookies(), ...this.ambiguous.cookies()]);
    const capture = this.options.capture;
    const removed = new Set<bigint>();
    for (const cookie of capture.enrolledCookies()) {
      if (wantedCookies.has(cookie)) continue;
      capture.unenroll(cookie);
      removed.add(cookie);
      this.options.logger.info({ cookie: cookie.toString() }, "removed stale outbound capture entry");
    }
    for (const pod of capture.inboundPods()) {
      if (wantedCookies.has(pod.cookie)) continue;
      capture.detachInbound(pod.cookie, pod.podIp);
      removed.add(pod.cookie);
      this.options.logger.info({ cookie: pod.cookie.toString(), ip: pod.podIp }, "removed stale inbound capture entry");
    }
    // A link can outlive its pod entry when another pod took the IP while no agent ran.
    for (const cookie of capture.inboundLinkCookies()) {
      if (wantedCookies.has(cookie)) continue;
      capture.unlinkInbound(cookie);
      this.options.logger.info({ cookie: cookie.toString() }, "removed stale inbound capture link");
    }
    this.excludedPorts.removeStale();
    return [...removed];
  }

  /**
   * Stops reconciling and retrying, for an agent that is handing its node over: the replacement
   * now writes capture, and a late retry here would guard an isolated pod again over the
   * replacement's listener. Changes that arrive meanwhile are kept for thaw().
   */
  freeze(): void {
    this.frozen = true;
    clearTimeout(this.retryTimer);
  }

  /** Reconciles again after freeze(), with the latest wanted workloads: the hand-over was aborted. */
  thaw(): Promise<void> {
    this.frozen = false;
    return this.update(this.desired);
  }

  private async reconcile(): Promise<void> {
    if (this.stopped || this.frozen) return;
    const wanted = new Map(this.desired.map((workload) => [workload.uid, workload]));
    this.ambiguous.setWanted(this.desired);
    // One listing of the node's namespaces serves every pod of this pass.
    const scan = scanNetns();
    let waiting = 0;
    for (const entry of [...this.enrolled.values()]) {
      const next = wanted.get(entry.workload.uid);
      if (!next) await this.unenroll(entry, "no longer enrolled", this.reasons.get(entry.workload.uid) ?? DEFAULT_UNENROLL_REASON);
      else if (next.ip !== entry.workload.ip || next.serviceAccount !== entry.workload.serviceAccount || addressesChanged(entry.workload, next)) {
        if (!(await this.replace(entry, next, scan))) waiting++;
      }
      else {
        entry.workload = next;
        // The annotations may have changed. Nothing is written when they did not.
        this.excludedPorts.apply(next);
      }
    }
    for (const entry of [...this.isolated.values()]) {
      if (wanted.get(entry.workload.uid)?.ip === entry.workload.ip) continue;
      this.release(entry);
    }
    this.ambiguous.releaseUnwanted(wanted, this.servedCookies());
    for (const uid of this.lastProblem.keys()) if (!wanted.has(uid)) this.lastProblem.delete(uid);
    for (const uid of this.reasons.keys()) if (!wanted.has(uid)) this.reasons.delete(uid);

    const pending = [...wanted.values()].filter((workload) => !this.enrolled.has(workload.uid));
    const outcomes = await runConcurrently(pending, ENROLL_CONCURRENCY, (workload) => this.enroll(workload, scan));
    this.scheduleRetry(outcomes.filter((enrolled) => !enrolled).length + waiting);
  }

  private scheduleRetry(failed: number): void {
    clearTimeout(this.retryTimer);
    if (failed === 0 || this.stopped) return;
    this.retryTimer = setTimeout(() => void this.update(this.desired), RETRY_DELAY_MS);
    this.retryTimer.unref();
  }

  /** Logs a failure at warn level the first time, and at debug level while it repeats unchanged. */
  private report(workload: Workload, problem: string, fields: Record<string, unknown> = {}): void {
    const repeated = this.lastProblem.get(workload.uid) === problem;
    this.lastProblem.set(workload.uid, problem);
    const log = this.options.logger.child({ workload: workload.uid, ip: workload.ip });
    if (repeated) log.debug(fields, problem);
    else log.warn(fields, `${problem}; retrying every ${RETRY_DELAY_MS / 1000} s`);
  }

  /** Finds the workload's namespace; reports why when there is not exactly one. */
  private findNetns(workload: Workload, scan: NetnsScan): string | undefined {
    if (isIpv6Only(workload) && this.options.capture.linkInbound === undefined) {
      this.report(workload, "this capture mode cannot capture IPv6-only pods: the pod is not enrolled");
      return undefined;
    }
    // A pod that the CNI plugin announced is enrolled in the namespace it named, or not at all.
    const hinted = this.options.netnsHint?.(workload);
    if (hinted !== undefined) {
      if (this.netnsAddresses(hinted, capturePodIp(workload))?.includes(capturePodIp(workload))) return hinted;
      this.report(workload, `the network namespace ${hinted} that the CNI plugin named does not have the pod IP ${capturePodIp(workload)}`);
      return undefined;
    }
    const candidates = scan(capturePodIp(workload));
    if (candidates.length === 1) return candidates[0].path;
    if (candidates.length === 0) {
      this.report(workload, "no network namespace on this node has the pod IP yet");
      return undefined;
    }
    const choice = this.ambiguous.choose(workload, candidates.map((ref) => ref.path));
    if ("netnsPath" in choice) return choice.netnsPath;
    this.report(workload, choice.problem, choice.fields);
    return undefined;
  }

  /** Returns the uid of the workload that is enrolled, isolated or being enrolled in the namespace of `cookie`. */
  private holderOf(cookie: bigint): string | undefined {
    for (const entry of [...this.enrolled.values(), ...this.isolated.values()]) if (entry.cookie === cookie) return entry.workload.uid;
    return this.claims.get(cookie);
  }

  /** Collects the cookies of the namespaces this agent serves or isolates a workload in. */
  private servedCookies(): Set<bigint> {
    return new Set([...this.enrolled.values(), ...this.isolated.values()].map((entry) => entry.cookie));
  }

  private async enroll(workload: Workload, scan: NetnsScan): Promise<boolean> {
    const isolatedEntry = this.isolated.get(workload.uid);
    const netnsPath = isolatedEntry?.netnsPath ?? this.findNetns(workload, scan);
    if (!netnsPath) return false;
    let cookie: bigint;
    try {
      cookie = isolatedEntry?.cookie ?? netnsCookie(netnsPath);
    } catch (error) {
      this.report(workload, `failed to read the cookie of network namespace ${netnsPath}`, { err: error });
      return false;
    }
    // One namespace serves one workload: two Pod objects with one IP (a pod being deleted and the
    // pod that got its address) must not share, or take over, the capture of that namespace.
    const holder = this.holderOf(cookie);
    if (holder !== undefined && holder !== workload.uid) {
      this.report(workload, `network namespace ${netnsPath} already serves pod ${holder}, which has the same IP; not enrolling a second pod there`);
      return false;
    }
    this.claims.set(cookie, workload.uid);
    let entry: EnrolledWorkload | undefined;
    try {
      entry = await this.startProxies(workload, netnsPath, cookie);
    } finally {
      this.claims.delete(cookie);
    }
    if (!entry) return false;
    this.notify("enrolled", entry, this.reasons.get(workload.uid) ?? DEFAULT_ENROLL_REASON);
    this.reasons.delete(workload.uid);
    this.ambiguous.release(workload.uid, this.servedCookies(), cookie);
    this.isolated.delete(workload.uid);
    this.lastProblem.delete(workload.uid);
    return true;
  }

  /**
   * Starts the workload's proxies and enrolls its cookie. On failure the workload is isolated:
   * enrolled with no listener, so it cannot talk around the mesh while the agent retries.
   */
  private async startProxies(workload: Workload, netnsPath: string, cookie: bigint): Promise<EnrolledWorkload | undefined> {
    const identity = identityOf(workload, this.options.trustDomain);
    const podIp6 = podIpv6ToCapture(this.options.capture, netnsPath, workload, this.options.logger);
    if (isIpv6Only(workload) && !this.linkIpv6Only(workload, netnsPath, cookie, podIp6)) return undefined;
    const network = new NetnsPodNetwork(netnsPath, workloadIpOfFamily(workload, 4), podIp6);
    if (this.options.transparentSource) enableTransparentSource(network, workload, this.options.logger);
    const proxies = this.options.createProxies(workload, identity, network, cookie);
    try {
      await proxies.start();
    } catch (error) {
      await proxies.stop().catch(() => undefined);
      network.close();
      this.isolate({ workload, netnsPath, cookie });
      this.report(workload, `failed to start the workload's listeners in ${netnsPath}: ${(error as Error).message}`, { err: error });
      return undefined;
    }
    this.excludedPorts.apply(workload);
    this.options.capture.enroll(cookie, capturePodIp(workload));
    this.options.capture.enrollIpv6?.(cookie, network.podIp6);
    const entry = { workload, identity, netnsPath, cookie, proxies, network };
    this.enrolled.set(workload.uid, entry);
    this.options.logger.info(
      { workload: workload.uid, ip: workload.ip, netns: netnsPath, cookie: cookie.toString(), identity: formatSpiffeId(identity) },
      "workload enrolled",
    );
    return entry;
  }

  /**
   * Links sk_lookup to the namespace of an IPv6-only pod before its listeners start: it has no
   * IPv4 15006 listener whose attachInbound would link it, and attachInbound6 needs the link. On
   * failure, or when the namespace lacks the pod's IPv6 address, the pod is isolated.
   */
  private linkIpv6Only(workload: Workload, netnsPath: string, cookie: bigint, podIp6: string | undefined): boolean {
    if (podIp6 === undefined) {
      this.isolate({ workload, netnsPath, cookie });
      this.report(workload, `the IPv6-only pod's address ${workload.ip} cannot be captured in ${netnsPath}; the pod is isolated`);
      return false;
    }
    try {
      // Only the link: entries that a running agent's listener has stay during a hand-over.
      this.options.capture.linkInbound?.(netnsPath, cookie);
      return true;
    } catch (error) {
      this.isolate({ workload, netnsPath, cookie });
      this.report(workload, `failed to link inbound capture to ${netnsPath}: ${(error as Error).message}`, { err: error });
      return false;
    }
  }

  /** Stops inbound capture of the workload. An IPv6-only pod's link goes too, because it has no IPv4 entry that would take it. */
  private detachInbound(cookie: bigint, workload: Workload): void {
    this.options.capture.detachInbound(cookie, capturePodIp(workload));
    if (isIpv6Only(workload)) this.options.capture.unlinkInbound(cookie);
  }

  private isolate(entry: IsolatedWorkload): void {
    try {
      this.options.capture.enroll(entry.cookie, capturePodIp(entry.workload));
      this.options.capture.guardInbound(entry.netnsPath, entry.cookie, capturePodIp(entry.workload));
      this.excludedPorts.apply(entry.workload);
      if (!this.isolated.has(entry.workload.uid)) {
        this.options.logger.warn({ workload: entry.workload.uid, cookie: entry.cookie.toString() }, "workload isolated until its listeners start");
      }
      this.isolated.set(entry.workload.uid, entry);
    } catch (error) {
      this.options.logger.error({ err: error, workload: entry.workload.uid }, "failed to isolate workload");
    }
  }

  /** Removes the capture entries of an isolated workload that is no longer wanted at that address. */
  private release(entry: IsolatedWorkload): void {
    this.isolated.delete(entry.workload.uid);
    // Capture entries that another workload uses stay.
    if (this.holderOf(entry.cookie) !== undefined) {
      this.excludedPorts.remove(entry.workload.uid);
      return;
    }
    this.options.capture.unenroll(entry.cookie);
    this.detachInbound(entry.cookie, entry.workload);
    this.excludedPorts.remove(entry.workload.uid);
    this.options.logger.info({ workload: entry.workload.uid }, "isolated workload released");
  }

  /**
   * Restarts the proxies of a workload whose address or service account changed. Capture stays in
   * place throughout: while no listener runs, the pod's connections are refused, never let through.
   */
  private async replace(entry: EnrolledWorkload, next: Workload, scan: NetnsScan): Promise<boolean> {
    const oldIp = capturePodIp(entry.workload);
    const newIp = capturePodIp(next);
    if (newIp !== oldIp) {
      const addresses = this.netnsAddresses(entry.netnsPath, newIp);
      if (addresses !== undefined && !addresses.includes(newIp) && scan(newIp).length === 0) {
        // The manifest is ahead of the namespace. The pod keeps its capture and listeners at the
        // old address until the new one appears somewhere, rather than being released meanwhile.
        this.report(next, `waiting for the new IP ${newIp} to appear in ${entry.netnsPath} or another namespace; the pod stays captured at ${oldIp}`);
        return false;
      }
      if (addresses === undefined || !addresses.includes(newIp)) {
        await this.move(entry, next);
        return true;
      }
    }
    this.enrolled.delete(entry.workload.uid);
    await this.stopProxies(entry);
    const reason = changeReason(entry.workload, next);
    this.notify("unenrolled", entry, reason);
    const started = await this.startProxies(next, entry.netnsPath, entry.cookie);
    if (started) this.notify("enrolled", started, reason);
    else this.reasons.set(next.uid, reason);
    // The namespace keeps its sk_lookup link, which now guards the new IP.
    if (newIp !== oldIp) this.options.capture.forgetInboundIp(entry.cookie, oldIp);
    const oldIp6 = entry.network.podIp6;
    if (oldIp6 !== undefined && oldIp6 !== started?.network.podIp6) this.options.capture.detachInbound(entry.cookie, oldIp6);
    if (started) this.options.logger.info({ workload: next.uid, ip: next.ip, serviceAccount: next.serviceAccount }, "workload re-enrolled");
    return true;
  }

  /**
   * Follows a workload whose new IP is not in its current network namespace: the pod was
   * recreated in another namespace (the old one is gone or another namespace has the new IP). The
   * old namespace's capture entries and link go now, and reconcile() then enrolls the workload
   * wherever its new IP is.
   */
  private async move(entry: EnrolledWorkload, next: Workload): Promise<void> {
    const reason = changeReason(entry.workload, next);
    await this.unenroll(entry, `its IP changed from ${entry.workload.ip} to ${next.ip}, which is not in ${entry.netnsPath}`, reason);
    this.reasons.set(next.uid, reason);
  }

  /**
   * Lists the addresses of the network namespace at `netnsPath` of the family of `ip`, or
   * undefined when it is gone. It reads them now, because the scan's cache may still hold the
   * addresses from before a move.
   */
  private netnsAddresses(netnsPath: string, ip: string): string[] | undefined {
    try {
      return ip.includes(":") ? netnsIpv6Addresses(netnsPath).map(canonicalIp) : netnsIpv4Addresses(netnsPath);
    } catch {
      return undefined;
    }
  }

  /** Unenrolls the workload; `reason` goes to the log, and `eventReason` to the onEnrollment listener. */
  private async unenroll(entry: EnrolledWorkload, reason: string, eventReason = reason): Promise<void> {
    // Capture stops first, so that no new connection is steered to listeners that are closing.
    this.releaseCapture(entry);
    await this.stopProxies(entry);
    this.finishUnenroll(entry, reason, eventReason);
  }

  /**
   * Runs one release of an uninstall and logs a failure. With eBPF capture the entry left behind
   * goes with the pinned capture that the agent removes next. With nftables capture the pod keeps
   * its table and stays closed.
   */
  private releaseLogged(uid: string, release: () => void): void {
    try {
      release();
    } catch (error) {
      this.options.logger.error({ err: error, workload: uid }, "failed to remove the capture entries of a workload");
    }
  }

  /** Removes the workload's capture entries and excluded ports. */
  private releaseCapture(entry: EnrolledWorkload): void {
    this.enrolled.delete(entry.workload.uid);
    this.options.capture.unenroll(entry.cookie);
    this.detachInbound(entry.cookie, entry.workload);
    this.excludedPorts.remove(entry.workload.uid);
  }

  /** Removes the pod's transparent-source routing once its proxies stopped, then logs and reports the unenrollment. */
  private finishUnenroll(entry: EnrolledWorkload, reason: string, eventReason: string): void {
    disableTransparentSource(entry.network, entry.workload, this.options.logger);
    this.options.logger.info({ workload: entry.workload.uid, reason }, "workload unenrolled");
    this.reasons.delete(entry.workload.uid);
    this.notify("unenrolled", entry, eventReason);
  }

  private notify(action: EnrollmentEvent["action"], entry: EnrolledWorkload, reason: string): void {
    try {
      this.options.onEnrollment?.({ action, workload: entry.workload, identity: entry.identity, reason });
    } catch (error) {
      this.options.logger.error({ err: error, workload: entry.workload.uid, action }, "enrollment listener failed");
    }
  }

  private async stopProxies(entry: EnrolledWorkload, graceMs = 0): Promise<DrainSummary> {
    try {
      return await entry.proxies.stop(graceMs);
    } catch (error) {
      this.options.logger.error({ err: error, workload: entry.workload.uid }, "failed to stop workload proxies");
      return EMPTY_DRAIN;
    } finally {
      entry.network.close();
    }
  }
}

/** Describes what changed in a workload that was enrolled again: its IP, its service account, or both. */
function changeReason(before: Workload, after: Workload): string {
  const changes: string[] = [];
  if (before.ip !== after.ip || addressesChanged(before, after)) {
    // The addresses are in the records' ip fields, where redaction rules can reach them.
    changes.push("pod IP changed");
  }
  if (before.serviceAccount !== after.serviceAccount) changes.push(`service account changed from ${before.serviceAccount} to ${after.serviceAccount}`);
  return changes.join(", ");
}

/**
 * Tells whether a workload's IPv4 or IPv6 address changed, which needs new listeners. status.podIP
 * alone misses the IPv4 address of a pod whose status.podIP is IPv6.
 */
function addressesChanged(before: Workload, after: Workload): boolean {
  return workloadIpOfFamily(before, 4) !== workloadIpOfFamily(after, 4) || workloadIpOfFamily(before, 6) !== workloadIpOfFamily(after, 6);
}
