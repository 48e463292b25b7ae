// Enrolment driven by the CNI plugin: an ADD for a new pod sandbox returns only once the pod's
// capture is in place in the namespace the runtime named, and a DEL releases the sandbox. A
// rejected ADD fails the sandbox, which the kubelet then creates again, so no pod starts uncaptured.

import fs from "node:fs";
import type { CniPodEvent } from "../cni/setup";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { MeshState } from "../state/mesh-state";
import type { Workload } from "../state/types";
import { CniPods } from "./cni-pods";
import { isAmbient, type EnrollmentSettings } from "./enrollment";
import { hostProcPath } from "./netns";
import type { EnrolledWorkload } from "./reconciler";

/** The audit reason of an enrolment that a CNI ADD asked for. */
export const CNI_ENROLL_REASON = "pod sandbox created (CNI ADD)";
/** The audit reason of an unenrolment because the pod's sandbox went away. */
const CNI_DELETE_REASON = "pod sandbox deleted (CNI DEL)";
/** How long an ADD waits for its pod to appear in the mesh state, which the API server's watch fills. */
const POD_WAIT_MS = 10_000;
const POD_POLL_MS = 50;

/** The agent's side of the CNI handlers. */
export interface CniEnrolmentHost {
  node: string;
  state(): MeshState | undefined;
  settings(): EnrollmentSettings;
  stopping(): boolean;
  /** Reconciles enrolment with the node's wanted workloads; `reasons` explains new ones by uid. */
  reconcile(reasons?: ReadonlyMap<string, string>): Promise<void>;
  enrolled(uid: string): EnrolledWorkload | undefined;
  /** Unenrolls a pod now; the next reconcile enrolls it again where it is then. */
  evict(uid: string, reason: string): Promise<void>;
  /** Called once an ADD enrolled a pod. */
  enrolledByCni(uid: string): void;
  logger: Logger;
}

export class CniEnrolment {
  /** Pod sandboxes announced by the plugin, with their namespace and addresses. */
  readonly pods = new CniPods();
  /** The ADD running per pod: two ADDs of one pod run one after the other, so the later sandbox wins cleanly. */
  private readonly adding = new Map<string, Promise<void>>();

  constructor(private readonly host: CniEnrolmentHost) {}

  /**
   * Handles an ADD: resolves once the pod's capture is in place, or at once for a pod outside
   * ambient mode. Throws AgentError CNI_ERROR when the pod is unknown or its capture failed.
   */
  async add(request: CniPodEvent): Promise<void> {
    const event = onHostProc(request);
    if (!event.podNamespace || !event.podName) return this.addOne(event);
    const uid = `${event.podNamespace}/${event.podName}`;
    const previous = this.adding.get(uid) ?? Promise.resolve();
    const current = previous.catch(() => undefined).then(() => this.addOne(event));
    this.adding.set(uid, current);
    try {
      await current;
    } finally {
      if (this.adding.get(uid) === current) this.adding.delete(uid);
    }
  }

  private async addOne(event: CniPodEvent): Promise<void> {
    const log = this.host.logger;
    if (!event.podNamespace || !event.podName) {
      log.info({ netns: event.netns, container: event.containerId }, "CNI ADD without a Kubernetes pod name: not a pod, nothing to capture");
      return;
    }
    const uid = `${event.podNamespace}/${event.podName}`;
    const workload = await this.waitForPod(uid, event.podUid);
    if (workload === undefined) {
      const which = event.podUid ? ` with uid ${event.podUid}` : "";
      throw new AgentError("CNI_ERROR", `pod ${uid}${which}, or its namespace, is not in the agent's view of the cluster after ${POD_WAIT_MS / 1000} s; the kubelet will try again`);
    }

    const state = this.host.state()!;
    // Kept for every pod: one whose namespace turns ambient later is enrolled in this sandbox.
    if (event.ips.length > 0) this.pods.add(uid, event);
    if (!isAmbient(state, this.pods.complete(workload, event), this.host.settings())) {
      log.debug({ pod: uid }, "CNI ADD for a pod outside ambient mode");
      return;
    }
    if (event.ips.length === 0 && workload.ip === "") {
      throw new AgentError("CNI_ERROR", `the CNI result for pod ${uid} has no IP address; chain the agent's plugin after the plugin that assigns pod addresses`);
    }

    // A pod enrolled in another namespace has a new sandbox; with the same IP the reconciler would keep the old one.
    const previous = this.host.enrolled(uid);
    if (previous !== undefined && !sameNamespace(previous.netnsPath, event.netns)) {
      await this.host.evict(uid, `pod sandbox replaced: ${previous.netnsPath} by ${event.netns}`);
    }
    await this.host.reconcile(new Map([[uid, CNI_ENROLL_REASON]]));

    const entry = this.host.enrolled(uid);
    if (entry === undefined || !sameNamespace(entry.netnsPath, event.netns)) {
      throw new AgentError("CNI_ERROR", `capture of pod ${uid} in ${event.netns} is not in place yet (see the agent log); the kubelet will try again`);
    }
    this.host.enrolledByCni(uid);
    log.info({ pod: uid, netns: event.netns, ip: entry.workload.ip }, "CNI ADD: capture in place before the pod starts");
  }

  /** Handles a DEL: drops the sandbox, and unenrolls its pod when the pod was enrolled in it. */
  async del(request: CniPodEvent): Promise<void> {
    const event = onHostProc(request);
    const known = this.pods.remove(event);
    const uid = event.podNamespace && event.podName ? `${event.podNamespace}/${event.podName}` : undefined;
    const entry = uid === undefined ? undefined : this.host.enrolled(uid);
    if (this.host.stopping()) return;
    if (uid !== undefined && entry !== undefined && event.netns !== "" && sameNamespace(entry.netnsPath, event.netns)) {
      await this.host.evict(uid, CNI_DELETE_REASON);
      await this.host.reconcile();
    } else if (known) {
      await this.host.reconcile();
    }
  }

  /**
   * Waits, for at most POD_WAIT_MS, until the mesh state has the pod on this node and its
   * namespace, whose labels decide enrolment. With `podUid` (K8S_POD_UID), an older pod of the
   * same name does not count: it may have been deleted and recreated while a watch lagged.
   */
  private async waitForPod(uid: string, podUid: string | undefined): Promise<Workload | undefined> {
    const deadline = Date.now() + POD_WAIT_MS;
    for (;;) {
      const state = this.host.state();
      const workload = state?.workload(uid);
      const current = workload !== undefined && (podUid === undefined || workload.podUid === undefined || workload.podUid === podUid);
      if (workload && current && workload.nodeName === this.host.node && state?.namespace(workload.namespace) !== undefined) return workload;
      if (Date.now() >= deadline || this.host.stopping()) return undefined;
      await new Promise((resolve) => setTimeout(resolve, POD_POLL_MS));
    }
  }
}

/** Returns the event with a CNI_NETNS under /proc/ moved into the host's procfs mount, where the agent can open it. */
function onHostProc(event: CniPodEvent): CniPodEvent {
  const netns = hostProcPath(event.netns);
  return netns === event.netns ? event : { ...event, netns };
}

/** Tells whether two paths open the same network namespace; paths that cannot be read compare as text. */
function sameNamespace(first: string, second: string): boolean {
  if (first === second) return true;
  try {
    const a = fs.statSync(first);
    const b = fs.statSync(second);
    return a.dev === b.dev && a.ino === b.ino;
  } catch {
    return false;
  }
}
