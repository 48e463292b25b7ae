// Pods that the CNI plugin announced and that are not gone yet. The plugin runs before the kubelet
// reports the pod's IP to the API server, so for a while the plugin's result is the only source of
// the pod's addresses and network namespace.

import { canonicalIp } from "../state/ip";
import type { Workload } from "../state/types";

/** One pod sandbox as the CNI plugin reports it. */
export interface CniPodSandbox {
  containerId: string;
  netns: string;
  /** The pod's addresses from the previous plugin's result, without prefix lengths. */
  ips: readonly string[];
}

export class CniPods {
  private readonly byUid = new Map<string, CniPodSandbox>();

  add(uid: string, sandbox: CniPodSandbox): void {
    this.byUid.set(uid, { containerId: sandbox.containerId, netns: sandbox.netns, ips: sandbox.ips.map(canonicalIp) });
  }

  /** Forgets the sandbox that `sandbox` names by container id. Returns whether one was known. */
  remove(sandbox: { containerId: string }): boolean {
    for (const [uid, known] of this.byUid) {
      if (known.containerId === sandbox.containerId) {
        this.byUid.delete(uid);
        return true;
      }
    }
    return false;
  }

  /** Returns the sandbox announced for a pod, when there is one. */
  sandboxOf(uid: string): CniPodSandbox | undefined {
    return this.byUid.get(uid);
  }

  /** Forgets the pods for which `keep` is false: pods deleted without a DEL, such as while no agent ran. */
  retain(keep: (uid: string) => boolean): void {
    for (const uid of [...this.byUid.keys()]) if (!keep(uid)) this.byUid.delete(uid);
  }

  /** Returns the namespace path the plugin gave for the pod's current sandbox. */
  netnsOf(workload: Workload): string | undefined {
    return this.byUid.get(workload.uid)?.netns;
  }

  /**
   * Returns the workload with the addresses of its current sandbox. The plugin's are newer than the
   * API server's: a replaced sandbox has new addresses before the kubelet reports them. `sandbox`
   * overrides the known one, for a pod being announced now.
   */
  complete(workload: Workload, sandbox?: CniPodSandbox): Workload {
    const known = sandbox ?? this.byUid.get(workload.uid);
    if (known === undefined || known.ips.length === 0) return workload;
    const ips = known.ips.map(canonicalIp);
    if (workload.ip !== "" && canonicalIp(workload.ip) === ips[0] && ips.length === (workload.ips?.length ?? 1)) return workload;
    return { ...workload, ip: ips[0], ips };
  }
}
