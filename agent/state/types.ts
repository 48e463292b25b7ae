// The mesh vocabulary shared by every component: what discovery produces, what enrollment,
// the proxy, authorization and audit consume. Plain data only, so that any source (manifest
// files today, the Kubernetes API or istiod later) can fill it.

/** A SPIFFE identity: spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>. */
export interface Identity {
  trustDomain: string;
  namespace: string;
  serviceAccount: string;
}

export type Labels = Readonly<Record<string, string>>;

/** The origin of a Kubernetes object, for error messages and diagnostics. */
export interface ObjectSource {
  /** Manifest file path, or another source name such as "kubernetes". */
  file: string;
  /** Zero-based index of the YAML document inside the file. */
  document: number;
}

export interface Namespace {
  name: string;
  labels: Labels;
  source: ObjectSource;
}

/** A pod, in the mesh's terms. */
export interface Workload {
  /** "namespace/name", unique in the cluster. */
  uid: string;
  /** metadata.uid of the Pod, which differs between two pods of the same name; absent in most manifests. */
  podUid?: string;
  /** Whether the pod is being deleted (metadata.deletionTimestamp is set). */
  deleting?: boolean;
  name: string;
  namespace: string;
  serviceAccount: string;
  nodeName: string;
  /** status.podIP; empty when the pod has no address yet. */
  ip: string;
  /**
   * Every pod IP: status.podIPs (a dual-stack pod has one IPv4 and one IPv6 address), with
   * status.podIP first, in canonical text form (see canonicalIp). Absent means [ip], as for
   * workloads built by sources that read status.podIP only. Use workloadIps() to read it.
   */
  ips?: readonly string[];
  labels: Labels;
  /**
   * metadata.annotations. Enrollment reads the traffic.sidecar.istio.io/exclude*Ports ones.
   * Absent means none, as for workloads built by sources that do not read annotations.
   */
  annotations?: Readonly<Record<string, string>>;
  /** Named container ports (containers[].ports[].name → containerPort), for Services with named target ports. */
  namedPorts: Readonly<Record<string, number>>;
  hostNetwork: boolean;
  /**
   * Whether the pod may serve Service traffic: status.phase is Running, its Ready condition is
   * "True" (either may be absent), and it is not being deleted (no metadata.deletionTimestamp).
   */
  ready: boolean;
  /**
   * The name of the pod's controller, as Istio's metrics name workloads: the Deployment of a
   * ReplicaSet's pod, the CronJob of a Job's pod, or the controller itself. Absent: the pod name.
   */
  workloadName?: string;
  source: ObjectSource;
}

export interface ServicePort {
  name: string;
  port: number;
  /** A number, or the name of a container port resolved per workload. */
  targetPort: number | string;
  protocol: "TCP" | "UDP" | "SCTP";
}

export interface Service {
  /** "namespace/name". */
  uid: string;
  name: string;
  namespace: string;
  /** spec.clusterIP(s); empty for headless Services. */
  vips: string[];
  selector: Labels;
  ports: ServicePort[];
  source: ObjectSource;
}

export type PolicyAction = "ALLOW" | "DENY" | "AUDIT" | "CUSTOM";

/** Source fields of an AuthorizationPolicy rule's `from` entry; each list ORed, fields ANDed. */
export interface PolicySource {
  principals?: string[];
  notPrincipals?: string[];
  namespaces?: string[];
  notNamespaces?: string[];
  serviceAccounts?: string[];
  notServiceAccounts?: string[];
  ipBlocks?: string[];
  notIpBlocks?: string[];
  remoteIpBlocks?: string[];
  notRemoteIpBlocks?: string[];
  requestPrincipals?: string[];
  notRequestPrincipals?: string[];
  /** Trust domains of the peer's SPIFFE id (security.istio.io, Istio 1.29 and later). */
  trustDomains?: string[];
  notTrustDomains?: string[];
}

/** Operation fields of a rule's `to` entry. Only ports matter at L4; the HTTP fields are kept to warn about. */
export interface PolicyOperation {
  ports?: string[];
  notPorts?: string[];
  hosts?: string[];
  notHosts?: string[];
  methods?: string[];
  notMethods?: string[];
  paths?: string[];
  notPaths?: string[];
}

export interface PolicyCondition {
  key: string;
  values?: string[];
  notValues?: string[];
}

export interface PolicyRule {
  from?: { source: PolicySource }[];
  to?: { operation: PolicyOperation }[];
  when?: PolicyCondition[];
}

/** A security.istio.io AuthorizationPolicy. */
export interface AuthorizationPolicy {
  /** "namespace/name". */
  uid: string;
  name: string;
  namespace: string;
  /** spec.selector.matchLabels; undefined means every workload of the namespace. */
  selector?: Labels;
  action: PolicyAction;
  /** undefined: no `rules` field. An empty array: `rules: []`. Istio treats the two differently. */
  rules?: PolicyRule[];
  dryRun: boolean;
  source: ObjectSource;
}

export type MtlsMode = "UNSET" | "DISABLE" | "PERMISSIVE" | "STRICT";

/** A security.istio.io PeerAuthentication. */
export interface PeerAuthentication {
  uid: string;
  name: string;
  namespace: string;
  selector?: Labels;
  mode: MtlsMode;
  portLevelMtls: Readonly<Record<number, MtlsMode>>;
  source: ObjectSource;
}

/** The address family of an EndpointSlice; FQDN slices are read but give no Service endpoint. */
export type EndpointSliceAddressType = "IPv4" | "IPv6" | "FQDN";

/** A reference from an EndpointSlice endpoint to the object behind it, usually a Pod. */
export interface EndpointTargetRef {
  kind: string;
  namespace: string;
  name: string;
}

/** One endpoint of an EndpointSlice: the addresses of one pod or other backend, and its conditions. */
export interface EndpointSliceEndpoint {
  /** One address for IPv4 and IPv6 slices (canonical text form), one name for FQDN slices. */
  addresses: string[];
  /** conditions.ready; absent means true, as in Kubernetes. */
  ready: boolean;
  /** conditions.serving; absent means true, as in Kubernetes. */
  serving: boolean;
  /** conditions.terminating; absent means false. */
  terminating: boolean;
  nodeName?: string;
  targetRef?: EndpointTargetRef;
}

export interface EndpointSlicePort {
  /** "" for a slice port without a name, which matches a Service port without a name. */
  name: string;
  /** Undefined when the slice sets none, which the API defines as "all ports". The agent routes nothing to such a port, since it has no number to dial. */
  port?: number;
  protocol: "TCP" | "UDP" | "SCTP";
}

/** A discovery.k8s.io/v1 EndpointSlice: part of the endpoints of one Service. */
export interface EndpointSlice {
  /** "namespace/name". */
  uid: string;
  name: string;
  namespace: string;
  /** The Service's name, from the label kubernetes.io/service-name; "" when the label is missing. */
  service: string;
  addressType: EndpointSliceAddressType;
  endpoints: EndpointSliceEndpoint[];
  ports: EndpointSlicePort[];
  source: ObjectSource;
}

/** The whole mesh configuration at one moment. Immutable: a change builds a new snapshot. */
export interface ClusterSnapshot {
  namespaces: ReadonlyMap<string, Namespace>;
  workloads: ReadonlyMap<string, Workload>;
  services: ReadonlyMap<string, Service>;
  authorizationPolicies: ReadonlyMap<string, AuthorizationPolicy>;
  peerAuthentications: ReadonlyMap<string, PeerAuthentication>;
  /**
   * EndpointSlices by uid. Optional because manifest folders and older snapshot builders have
   * none: absent and empty both mean that every Service finds its endpoints by selector.
   */
  endpointSlices?: ReadonlyMap<string, EndpointSlice>;
}

export type Direction = "inbound" | "outbound";

/** The decision on one connection. */
export type Decision = "allow" | "deny";
