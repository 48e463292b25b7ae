// Admin API bodies for the agentctl tests, typed by the views the agent serves.

import type { CertificateView, ConnectionView, LogLevelsView, ServiceView, StatusView, WorkloadView } from "../../agent/admin/views";

/** The time the fixtures' dates are relative to. */
export const NOW = new Date("2026-03-01T12:00:00Z");

export const WORKLOADS: WorkloadView[] = [
  {
    uid: "shop/web",
    namespace: "shop",
    name: "web",
    node: "node-a",
    ips: ["10.0.1.5", "fd00::1:5"],
    serviceAccount: "web",
    identity: "spiffe://cluster.local/ns/shop/sa/web",
    protocol: "HBONE",
    local: true,
    state: "Up",
  },
  {
    uid: "backend/api",
    namespace: "backend",
    name: "api",
    node: "node-b",
    ips: ["10.0.2.7"],
    serviceAccount: "api",
    identity: "spiffe://cluster.local/ns/backend/sa/api",
    protocol: "HBONE",
    local: false,
    state: "Remote",
  },
  {
    uid: "shop/legacy",
    namespace: "shop",
    name: "legacy",
    node: "node-a",
    ips: [],
    serviceAccount: "default",
    identity: "spiffe://cluster.local/ns/shop/sa/default",
    protocol: "TCP",
    local: true,
    state: "NotEnrolled",
    reason: "namespace shop/legacy has no istio.io/dataplane-mode=ambient label",
  },
];

export const SERVICES: ServiceView[] = [
  {
    namespace: "backend",
    name: "api",
    vips: ["10.96.0.10"],
    ports: [
      { name: "http", port: 80, targetPort: 8080, protocol: "TCP" },
      { name: "grpc", port: 9090, targetPort: 9090, protocol: "TCP" },
    ],
    endpoints: { total: 3, healthy: 2, addresses: ["10.0.2.7", "10.0.2.8", "10.0.2.9"] },
  },
];

export const CERTIFICATES: CertificateView[] = [
  {
    identity: "spiffe://cluster.local/ns/shop/sa/web",
    state: "valid",
    notBefore: "2026-03-01T00:00:00Z",
    notAfter: "2026-03-02T00:00:00Z",
    refreshAt: "2026-03-01T16:00:00Z",
    expiresInSeconds: 43_200,
    failures: 0,
    workloads: ["shop/web"],
    chain: [
      { type: "Leaf", subject: "", serialNumber: "0a1b", notBefore: "2026-03-01T00:00:00Z", notAfter: "2026-03-02T00:00:00Z" },
      { type: "Root", subject: "O=cluster.local", serialNumber: "01", notBefore: "2026-01-01T00:00:00Z", notAfter: "2026-02-01T00:00:00Z" },
    ],
  },
  {
    identity: "spiffe://cluster.local/ns/shop/sa/batch",
    state: "failing",
    failures: 3,
    nextRetryAt: "2026-03-01T12:00:30Z",
    lastError: "CA unreachable",
    workloads: ["shop/batch"],
    chain: [],
  },
];

export const CONNECTIONS: ConnectionView[] = [
  {
    id: "c1",
    workload: "shop/web",
    direction: "outbound",
    local: "10.0.1.5:40000",
    remote: "10.0.2.7:15008",
    remoteTarget: "10.0.2.7:8080",
    protocol: "HBONE",
    srcIdentity: "spiffe://cluster.local/ns/shop/sa/web",
    dstIdentity: "spiffe://cluster.local/ns/backend/sa/api",
    startedAt: "2026-03-01T11:55:00Z",
    durationMs: 300_000,
    bytesSent: 1536,
    bytesRecv: 20 * 1024 * 1024,
  },
  {
    id: "c2",
    workload: "shop/web",
    direction: "inbound",
    local: "10.0.1.5:8080",
    remote: "10.0.3.2:51000",
    protocol: "TCP",
    startedAt: "2026-03-01T11:59:58Z",
    durationMs: 2_000,
    bytesSent: 10,
    bytesRecv: 0,
  },
];

export const LOG_LEVELS: LogLevelsView = { default: "info", components: { proxy: "debug", capture: "info" } };

export const STATUS: StatusView = {
  version: "0.1.0",
  node: "node-a",
  pid: 4242,
  uptimeSeconds: 3 * 3600 + 120,
  ready: true,
  checks: { configuration: true, capture: true, certificates: true },
  capture: {
    mode: "ebpf",
    requested: "auto",
    reason: "all hooks present",
    programs: [{ name: "aa_connect4", type: "cgroup/connect4", attachedTo: "/sys/fs/cgroup" }],
    maps: [{ name: "aa_netns", entries: 25, maxEntries: 100 }],
  },
  configuration: { source: "manifests", workloads: 3, services: 1, policies: 2, rejected: 0 },
  enrolled: 1,
  pending: 0,
  isolated: 0,
  connections: { inbound: 1, outbound: 1 },
  certificates: { total: 2, valid: 1, refreshing: 0, pending: 0, failing: 1, expired: 0, nextExpiry: "2026-03-02T00:00:00Z" },
};

/** The /healthz/ready body of an agent reading manifest files. */
export const READINESS = { ready: true, checks: { configuration: true, capture: true, certificates: true }, enrolled: 1 };
