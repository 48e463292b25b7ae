// Keeps the node's enrolled workloads in step with the mesh state. For each enrolled workload it
// finds the pod's network namespace and starts the in-pod listeners (15001 outbound, 15008 inbound
// HBONE, 15006 inbound plaintext, which also links sk_lookup). Only then does it put the namespace's cookie in the capture map, so that no captured
// connection meets a missing listener. Unenrolling runs the same steps backwards.

import type { Capture } from "../capture/bpf";
import { netnsCookie } from "../capture/native";
import { NetnsPodNetwork } from "../capture/netns-network";
import { identityOf, formatSpiffeId } from "../identity/spiffe";
import type { Logger } from "../log";
import type { Identity, Workload } from "../state/types";
import { findNetnsByIp } from "./netns";

/** The proxies of one enrolled workload. */
export interface WorkloadProxies {
  start(): Promise<void>;
  stop(): Promise<void>;
}

export interface EnrolledWorkload {
  workload: Workload;
  identity: Identity;
  netnsPath: string;
  cookie: bigint;
  proxies: WorkloadProxies;
}

export interface ReconcilerOptions {
  trustDomain: string;
  capture: Capture;
  /** Builds the outbound and inbound proxies of one workload inside its namespace. */
  createProxies(workload: Workload, identity: Identity, network: NetnsPodNetwork, cookie: bigint): WorkloadProxies;
  logger: Logger;
}

/** How long to wait before looking again for a namespace that is not there yet. */
const RETRY_DELAY_MS = 1_000;

export class EnrollmentReconciler {
  private readonly enrolled = new Map<string, EnrolledWorkload>();
  private desired: Workload[] = [];
  private running: Promise<void> = Promise.resolve();
  private retryTimer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(private readonly options: ReconcilerOptions) {}

  /** Lists the workloads enrolled right now, for diagnostics. */
  list(): EnrolledWorkload[] {
    return [...this.enrolled.values()];
  }

  /** Sets the workloads that should be enrolled and reconciles; calls are serialized. */
  update(desired: Workload[]): Promise<void> {
    this.desired = desired;
    this.running = this.running.then(() => this.reconcile());
    return this.running;
  }

  /** Unenrolls everything this process enrolled and stops the proxies. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    await this.running;
    for (const entry of [...this.enrolled.values()]) await this.unenroll(entry, "agent stopping");
  }

  /** Removes capture entries for namespaces this process does not serve (left by an earlier run). */
  removeStaleCookies(): void {
    const known = new Set([...this.enrolled.values()].map((entry) => entry.cookie));
    const capture = this.options.capture;
    for (const cookie of capture.enrolledCookies()) {
      if (known.has(cookie)) continue;
      capture.unenroll(cookie);
      this.options.logger.info({ cookie: cookie.toString() }, "removed stale outbound capture entry");
    }
    for (const pod of capture.inboundPods()) {
      if (known.has(pod.cookie)) continue;
      capture.detachInbound(pod.cookie, pod.podIp);
      this.options.logger.info({ cookie: pod.cookie.toString(), ip: pod.podIp }, "removed stale inbound capture entry");
    }
  }

  private async reconcile(): Promise<void> {
    if (this.stopped) return;
    const wanted = new Map(this.desired.map((workload) => [workload.uid, workload]));
    for (const entry of [...this.enrolled.values()]) {
      const next = wanted.get(entry.workload.uid);
      if (!next) await this.unenroll(entry, "no longer enrolled");
      else if (next.ip !== entry.workload.ip || next.serviceAccount !== entry.workload.serviceAccount) {
        await this.unenroll(entry, "address or service account changed");
      } else {
        entry.workload = next;
      }
    }
    let missing = 0;
    for (const workload of wanted.values()) {
      if (this.enrolled.has(workload.uid)) continue;
      if (!(await this.enroll(workload))) missing++;
    }
    this.scheduleRetry(missing);
  }

  private scheduleRetry(missing: number): void {
    clearTimeout(this.retryTimer);
    if (missing === 0 || this.stopped) return;
    this.retryTimer = setTimeout(() => void this.update(this.desired), RETRY_DELAY_MS);
    this.retryTimer.unref();
  }

  private async enroll(workload: Workload): Promise<boolean> {
    const log = this.options.logger.child({ workload: workload.uid, ip: workload.ip });
    const netns = findNetnsByIp(workload.ip);
    if (!netns) {
      log.warn("network namespace not found for the pod IP; will retry");
      return false;
    }
    const identity = identityOf(workload, this.options.trustDomain);
    let proxies: WorkloadProxies | undefined;
    let cookie: bigint | undefined;
    try {
      cookie = netnsCookie(netns.path);
      proxies = this.options.createProxies(workload, identity, new NetnsPodNetwork(netns.path, workload.ip), cookie);
      await proxies.start();
      this.options.capture.enroll(cookie, workload.ip);
      this.enrolled.set(workload.uid, { workload, identity, netnsPath: netns.path, cookie, proxies });
      log.info({ netns: netns.path, cookie: cookie.toString(), identity: formatSpiffeId(identity) }, "workload enrolled");
      return true;
    } catch (error) {
      log.error({ err: error, netns: netns.path }, "failed to enroll workload; will retry");
      await proxies?.stop().catch(() => undefined);
      if (cookie !== undefined) this.options.capture.detachInbound(cookie, workload.ip);
      return false;
    }
  }

  private async unenroll(entry: EnrolledWorkload, reason: string): Promise<void> {
    this.enrolled.delete(entry.workload.uid);
    // Capture stops first, so that no new connection is steered to listeners that are closing.
    this.options.capture.unenroll(entry.cookie);
    this.options.capture.detachInbound(entry.cookie, entry.workload.ip);
    try {
      await entry.proxies.stop();
    } catch (error) {
      this.options.logger.error({ err: error, workload: entry.workload.uid }, "failed to stop workload proxies");
    }
    this.options.logger.info({ workload: entry.workload.uid, reason }, "workload unenrolled");
  }
}
