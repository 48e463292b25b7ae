// The agent's own metrics (ambient_agent_*) and istio_build. Like the audit metrics, each value
// is read from its source when Prometheus scrapes.

import type { Registry } from "prom-client";
import type { CertificateStatus } from "../identity/cert-manager";
import { collectedCounter, collectedGauge, type MetricSamples } from "./metrics";
import type { MapUsageView } from "./views";

/** The values behind the agent metrics. Each returns undefined (or nothing) while its source does not exist yet. */
export interface AgentMetricsSources {
  version: string;
  capture(): { mode: string; requested: string } | undefined;
  captureMaps(): readonly MapUsageView[];
  workloads(): { enrolled: number; pending: number; isolated: number };
  certificates(): readonly CertificateStatus[];
  /** policy.rejected records written since the agent started. */
  policyRejections(): number;
  /** Policies rejected now: in the configuration but not enforced. */
  rejectedPolicies(): number;
  connections(): { inbound: number; outbound: number };
  /** Refused connections and connections closed by a limit, per listener and reason, since the agent started; none when absent. */
  refusals?(): ReadonlyArray<{ listener: string; reason: string; count: number }>;
}

const CERTIFICATE_STATES: readonly CertificateStatus["state"][] = ["valid", "refreshing", "pending", "failing", "expired"];

/** Registers istio_build and the ambient_agent_* metrics other than the audit ones. */
export function registerAgentMetrics(registry: Registry, sources: AgentMetricsSources): void {
  const gauge = (name: string, help: string, labelNames: string[], samples: MetricSamples): void => collectedGauge(registry, name, help, labelNames, samples);

  gauge("istio_build", "Istio component build information: 1 for each component this agent stands in for.", ["component", "tag"], () => [
    [{ component: "ztunnel", tag: sources.version }, 1],
    [{ component: "ambient-agent", tag: sources.version }, 1],
  ]);
  gauge("ambient_agent_capture_mode", "1 for the capture mode in use (ebpf or nftables) and the mode requested with --capture.", ["mode", "requested"], () => {
    const capture = sources.capture();
    return capture === undefined ? [] : [[{ mode: capture.mode, requested: capture.requested }, 1]];
  });
  gauge("ambient_agent_enrolled_pods", "Pods of this node whose traffic the agent captures and serves.", [], () => [[{}, sources.workloads().enrolled]]);
  gauge("ambient_agent_pending_pods", "Pods of this node to enrol that are not served yet; readiness waits for them.", [], () => [[{}, sources.workloads().pending]]);
  gauge("ambient_agent_isolated_pods", "Pod network namespaces isolated because they share an IP with another pod's.", [], () => [[{}, sources.workloads().isolated]]);
  gauge("ambient_agent_capture_map_entries", "Entries in use of each capture map: eBPF maps, or nftables sets summed over the pods' tables.", ["map"], () =>
    sources.captureMaps().map((map) => [{ map: map.name }, map.entries]),
  );
  gauge("ambient_agent_capture_map_max_entries", "Capacity of each capture map in entries; 0 means unbounded (nftables sets).", ["map"], () =>
    sources.captureMaps().map((map) => [{ map: map.name }, map.maxEntries]),
  );
  gauge("ambient_agent_certificate_expiry_timestamp_seconds", "Expiry (notAfter) of the current certificate of each identity, in seconds since the epoch.", ["identity"], () =>
    sources.certificates().flatMap((certificate): [Record<string, string>, number][] =>
      certificate.notAfter === undefined ? [] : [[{ identity: certificate.identity }, Date.parse(certificate.notAfter) / 1000]],
    ),
  );
  gauge("ambient_agent_certificates", "Certificates of the enrolled pods' identities, by state.", ["state"], () => {
    const certificates = sources.certificates();
    return CERTIFICATE_STATES.map((state) => [{ state }, certificates.filter((certificate) => certificate.state === state).length]);
  });
  gauge("ambient_agent_rejected_policies", "Policies in the configuration that the agent rejected and does not enforce now.", [], () => [[{}, sources.rejectedPolicies()]]);
  gauge("ambient_agent_connections_open", "Connections open now in the proxies of this node's enrolled pods, by direction.", ["direction"], () => {
    const counts = sources.connections();
    return [
      [{ direction: "inbound" }, counts.inbound],
      [{ direction: "outbound" }, counts.outbound],
    ];
  });
  collectedCounter(
    registry,
    "ambient_agent_policy_rejections_total",
    "policy.rejected audit records written: each time a policy was rejected as invalid or not enforceable.",
    [],
    () => [[{}, sources.policyRejections()]],
  );
  collectedCounter(
    registry,
    "ambient_agent_refused_connections_total",
    "Connections refused by a listener, or closed by a limit such as the idle timeout, by listener and reason (connection.refused records count each refusal once, folded or not).",
    ["listener", "reason"],
    () => (sources.refusals?.() ?? []).map((total) => [{ listener: total.listener, reason: total.reason }, total.count]),
  );
}
