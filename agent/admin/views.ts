// The JSON shapes the admin API serves and agentctl reads. The server builds them from the agent's
// state; agentctl only formats them, so both sides compile against these types.

/** GET /workloads: one entry per workload in the agent's mesh state, on this node or another. */
export interface WorkloadView {
  uid: string;
  namespace: string;
  name: string;
  node: string;
  /** Every address of the pod, IPv4 first. */
  ips: string[];
  serviceAccount: string;
  /** The SPIFFE identity the pod's certificate carries. */
  identity: string;
  /** HBONE when the pod is enrolled (on any node), TCP otherwise. */
  protocol: "HBONE" | "TCP";
  /** True when the pod runs on this node. */
  local: boolean;
  /**
   * The pod's state on this node: Up (captured and served), Pending (enrolment in progress),
   * Isolated (shares its IP with another pod's namespace), NotEnrolled, or Remote (another node).
   */
  state: "Up" | "Pending" | "Isolated" | "NotEnrolled" | "Remote";
  /** The enrolment rules' reason for enrolling the pod or not. */
  reason?: string;
}

/** GET /services. */
export interface ServiceView {
  namespace: string;
  name: string;
  vips: string[];
  ports: { name: string; port: number; targetPort: number | string; protocol: string }[];
  /** Endpoints the agent routes to, and how many of them are ready. */
  endpoints: { total: number; healthy: number; addresses: string[] };
}

/** One certificate of a chain, without its key. */
export interface CertificateChainEntry {
  type: "Leaf" | "Intermediate" | "Root";
  subject: string;
  serialNumber: string;
  notBefore: string;
  notAfter: string;
}

/** GET /certificates: one entry per identity of this node's enrolled pods. Keys never leave the agent. */
export interface CertificateView {
  identity: string;
  state: "valid" | "refreshing" | "pending" | "failing" | "expired";
  notBefore?: string;
  notAfter?: string;
  refreshAt?: string;
  /** Seconds until notAfter, negative once expired. */
  expiresInSeconds?: number;
  failures: number;
  nextRetryAt?: string;
  lastError?: string;
  workloads: string[];
  chain: CertificateChainEntry[];
}

/** GET /connections?direction=inbound|outbound: the connections open now, oldest first. */
export interface ConnectionView {
  id: string;
  /** The uid (namespace/name) of the enrolled pod whose proxy serves the connection. */
  workload: string;
  direction: "inbound" | "outbound";
  /**
   * The enrolled pod's address and the peer's, "ip:port": outbound the pod is the source, inbound
   * the destination. With HBONE the destination's address is the tunnel's (ip:15008).
   */
  local: string;
  remote: string;
  /** For HBONE: the address inside the tunnel (the destination pod's ip:port). */
  remoteTarget?: string;
  protocol: "HBONE" | "TCP";
  srcIdentity?: string;
  dstIdentity?: string;
  policy?: string;
  startedAt: string;
  durationMs: number;
  /** Bytes from the connection's source to its destination so far, as in the audit record. */
  bytesSent: number;
  /** Bytes from the destination to the source so far. */
  bytesRecv: number;
}

/** A loaded eBPF program and where it is attached. */
export interface ProgramView {
  name: string;
  type: string;
  attachedTo: string;
}

/** Entries in use of one capture map (eBPF map or nftables set). */
export interface MapUsageView {
  name: string;
  entries: number;
  maxEntries: number;
}

/** GET /status: the node at a glance, for `agentctl status`. */
export interface StatusView {
  version: string;
  node: string;
  pid: number;
  uptimeSeconds: number;
  ready: boolean;
  checks: Record<string, boolean>;
  /** Present while the agent drains its connections before it exits; it is then not ready. */
  stopping?: boolean;
  capture?: {
    mode: string;
    requested: string;
    reason: string;
    programs: ProgramView[];
    maps: MapUsageView[];
  };
  configuration: { source: "kubernetes" | "manifests"; workloads: number; services: number; policies: number; rejected: number };
  enrolled: number;
  pending: number;
  isolated: number;
  connections: { inbound: number; outbound: number };
  /** Refused connections since start with a count above 0, by listener and reason. It is absent from agents without limits. */
  refusals?: RefusalView[];
  certificates: { total: number; valid: number; refreshing: number; pending: number; failing: number; expired: number; nextExpiry?: string };
}

/** Refusals of one listener for one reason since the agent started, as ambient_agent_refused_connections_total counts them. */
export interface RefusalView {
  listener: string;
  reason: string;
  count: number;
  /** The flag of the limit behind the reason. It is absent for reasons that no limit sets (tls_handshake, http2_flood). */
  flag?: string;
}

/** GET /logging, and the response to POST /logging: the level of each component. */
export interface LogLevelsView {
  /** The level components take unless set one by one. */
  default: string;
  components: Record<string, string>;
}
