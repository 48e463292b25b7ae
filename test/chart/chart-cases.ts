// The value sets that the chart tests lint and render: the defaults and one set per feature switch.

import type { ChartValues, RenderOptions } from "../harness/helm";

/** One way to install the chart: values, and the release, namespace or Kubernetes version when not the defaults. */
export interface ChartCase {
  name: string;
  values: ChartValues;
  options?: RenderOptions;
}

/** A digest in the form Kubernetes accepts in an image reference. */
export const TEST_DIGEST = `sha256:${"0123456789abcdef".repeat(4)}`;

export const CHART_CASES: ChartCase[] = [
  { name: "default values", values: {} },
  { name: "embedded CA", values: { ca: { address: "", secretName: "ambient-agent-ca" } } },
  { name: "CNI disabled", values: { cni: { enabled: false } } },
  { name: "nftables capture", values: { capture: { mode: "nftables", transparentSource: false }, probeSource: ["none"] } },
  {
    name: "audit sinks without file",
    values: { audit: { file: { enabled: false }, sinks: ["stdout", "otlp://otel-collector.observability.svc:4317"], fsync: "always", redact: ["src.addr:hash", "dst.addr"] } },
  },
  { name: "text logs at debug", values: { logging: { level: "debug,access=warn", format: "text" } } },
  { name: "extra capabilities", values: { securityContext: { extraCapabilities: ["NET_RAW"], seLinuxOptions: { type: "spc_t" } } } },
  { name: "image digest", values: { image: { repository: "registry.example.com/mesh/ambient-agent", digest: TEST_DIGEST, pullPolicy: "Always" } } },
  {
    name: "custom namespace",
    values: { excludedNamespaces: ["kube-system", "monitoring"], trustDomain: "mesh.example.com", trustDomainAliases: ["cluster.local"], rootNamespace: "mesh-root" },
    options: { release: "mesh", namespace: "mesh-system" },
  },
  { name: "Kubernetes 1.29", values: {}, options: { kubeVersion: "1.29.0" } },
  { name: "OnDelete updates", values: { updateStrategy: { type: "OnDelete" } } },
  { name: "large limits", values: { limits: { maxConnectionsPerPod: 1_000_000, maxBufferedBytes: 4 * 1024 ** 3, idleTimeoutSeconds: 0, handshakeTimeoutSeconds: 2.5 } } },
  {
    name: "limits at the schema's maxima",
    values: {
      limits: {
        maxConnectionsPerPod: Number.MAX_SAFE_INTEGER,
        maxStreamsPerConnection: 2 ** 32 - 1,
        maxHeaderListSize: 2 ** 32 - 1,
        maxBufferedBytes: Number.MAX_SAFE_INTEGER,
        handshakeTimeoutSeconds: 2147483.647,
        idleTimeoutSeconds: 1500000.5,
      },
    },
  },
  { name: "limits with maximal units", values: { limits: { maxHeaderListSize: "4194303KiB", maxBufferedBytes: "8388607GiB", idleTimeoutSeconds: 0.001, handshakeTimeoutSeconds: 0.001 } } },
  { name: "header list size in GiB", values: { limits: { maxHeaderListSize: "3GiB", maxBufferedBytes: "9007199254740991" } } },
];
