// Warnings about the configuration that the agent applies but that likely does not do what its
// author meant: policy problems, Service cluster IPs that cannot be routed, and namespaces
// labelled for ambient mode that the agent excludes. Each is logged once while it lasts, and again
// only after a configuration without it, so a fixed and then broken object is reported again.

import { excludedLabelledNamespaces, type EnrollmentSettings } from "./enroll/enrollment";
import type { Logger } from "./log";
import { policyMessages } from "./rbac/explain";
import type { MeshState } from "./state/mesh-state";

export class ConfigWarnings {
  private excluded = new Set<string>();
  private policies = new Set<string>();
  private vips = new Set<string>();

  constructor(
    private readonly logger: Logger,
    private readonly rootNamespace: string,
    private readonly settings: () => EnrollmentSettings,
  ) {}

  /** Logs the warnings of `state` that the previous state did not have. */
  check(state: MeshState): void {
    this.checkVipConflicts(state);
    this.checkPolicies(state);
    this.checkExcludedNamespaces(state);
  }

  private checkExcludedNamespaces(state: MeshState): void {
    const current = new Set<string>();
    for (const namespace of excludedLabelledNamespaces(state, this.settings())) {
      current.add(namespace);
      if (this.excluded.has(namespace)) continue;
      this.logger.warn(
        { namespace },
        `namespace ${namespace} is labelled istio.io/dataplane-mode=ambient but is excluded from ambient mode (--excluded-namespaces); its pods are not enrolled`,
      );
    }
    this.excluded = current;
  }

  private checkPolicies(state: MeshState): void {
    const current = new Set<string>();
    for (const { kind, policy, file, message } of policyMessages(state, this.rootNamespace)) {
      current.add(message);
      if (!this.policies.has(message)) this.logger.warn({ kind, policy, file }, message);
    }
    this.policies = current;
  }

  /** Warns about each Service cluster IP that is not routed to its Service, and why. */
  private checkVipConflicts(state: MeshState): void {
    const current = new Set<string>();
    for (const { service, vip, workload, other } of state.vipConflicts()) {
      const key = `${service.uid} ${vip} ${workload?.uid ?? ""} ${other?.uid ?? ""}`;
      current.add(key);
      if (this.vips.has(key)) continue;
      const fields = { service: service.uid, vip, workload: workload?.uid, other: other?.uid, file: service.source.file };
      if (workload) {
        this.logger.warn(
          fields,
          `Service ${service.uid} has cluster IP ${vip}, which is the IP of pod ${workload.uid}; the Service is not routed at that address. Give it a cluster IP from the Service range`,
        );
      } else if (other && state.serviceByVip(vip)?.uid === other.uid) {
        this.logger.warn(
          fields,
          `Service ${service.uid} has cluster IP ${vip}, which Service ${other.uid} already uses; ${other.uid} keeps it. Give ${service.uid} a cluster IP of its own`,
        );
      } else {
        this.logger.warn(
          fields,
          `Services ${service.uid} and ${other?.uid} both have cluster IP ${vip}; neither is routed at that address until one of them changes it`,
        );
      }
    }
    this.vips = current;
  }
}
