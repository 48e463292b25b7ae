// The mesh state at one moment: a ClusterSnapshot plus the indexes that the data path queries
// per connection (workload by IP, Service by VIP, policies of a workload). It is immutable: a new
// snapshot builds a new MeshState, so each connection reads one consistent view.

import { canonicalIp, workloadIps } from "./ip";
import type {
  AuthorizationPolicy,
  ClusterSnapshot,
  EndpointSlice,
  Labels,
  Namespace,
  PeerAuthentication,
  Service,
  Workload,
} from "./types";

/** Istio's default root namespace: policies there apply mesh-wide. */
export const DEFAULT_ROOT_NAMESPACE = "istio-system";

/** The PeerAuthentications that apply to one workload, one per scope. */
export interface PeerAuthenticationScopes {
  /** Namespace-wide policy of the root namespace. */
  mesh?: PeerAuthentication;
  /** Namespace-wide policy of the workload's namespace. */
  namespace?: PeerAuthentication;
  /** Policy of the workload's namespace whose selector matches the workload. */
  workload?: PeerAuthentication;
}

export function emptySnapshot(): ClusterSnapshot {
  return {
    namespaces: new Map(),
    workloads: new Map(),
    services: new Map(),
    authorizationPolicies: new Map(),
    peerAuthentications: new Map(),
  };
}

/** Tells whether every matchLabels entry of `selector` is among `labels`; an empty selector matches all. */
export function selectorMatches(selector: Labels, labels: Labels): boolean {
  return Object.entries(selector).every(([key, value]) => labels[key] === value);
}

/**
 * A Service cluster IP that is not routed to the Service: it is also a pod's IP (`workload`), or
 * another Service's cluster IP (`other`). Of two Services, the one that held the address in the
 * previous state keeps it, and `other` names that holder. When neither held it, neither gets it.
 */
export interface VipConflict {
  service: Service;
  vip: string;
  workload?: Workload;
  other?: Service;
}

export class MeshState {
  private readonly byIp = new Map<string, Workload>();
  private readonly byVip = new Map<string, Service>();
  private readonly conflicts: VipConflict[] = [];
  /** Results of workloadsForService, by Service object of this snapshot. */
  private readonly selected = new WeakMap<Service, Workload[]>();
  private readonly byNode = new Map<string, Workload[]>();
  private readonly policiesByNamespace = new Map<string, AuthorizationPolicy[]>();
  private readonly peerAuthenticationsByNamespace = new Map<string, PeerAuthentication[]>();
  /** EndpointSlices by the uid of their Service ("namespace/name"), each list sorted by slice uid. */
  private readonly slicesByService = new Map<string, EndpointSlice[]>();

  /**
   * `previous` is the state this one replaces: a cluster IP that two Services claim stays with the
   * Service that had it there, so a new manifest cannot take an address that already serves.
   */
  constructor(
    readonly snapshot: ClusterSnapshot = emptySnapshot(),
    previous?: MeshState,
  ) {
    this.indexWorkloads();
    this.indexServices(previous);
    groupByNamespace(snapshot.authorizationPolicies.values(), this.policiesByNamespace);
    groupByNamespace(snapshot.peerAuthentications.values(), this.peerAuthenticationsByNamespace);
    this.indexEndpointSlices();
  }

  /** Returns the workload with this pod IP (any textual form of it, and any of a dual-stack pod's IPs). */
  workloadByIp(ip: string): Workload | undefined {
    return this.byIp.get(canonicalIp(ip));
  }

  /** Returns the workload with uid "namespace/name". */
  workload(uid: string): Workload | undefined {
    return this.snapshot.workloads.get(uid);
  }

  workloads(): Workload[] {
    return [...this.snapshot.workloads.values()];
  }

  namespace(name: string): Namespace | undefined {
    return this.snapshot.namespaces.get(name);
  }

  /** Returns the Service with this cluster IP. */
  serviceByVip(ip: string): Service | undefined {
    return this.byVip.get(canonicalIp(ip));
  }

  /** Returns the Service cluster IPs that are ignored because a pod has the same IP. */
  vipConflicts(): readonly VipConflict[] {
    return this.conflicts;
  }

  /** Returns the Service with uid "namespace/name". */
  service(uid: string): Service | undefined {
    return this.snapshot.services.get(uid);
  }

  services(): Service[] {
    return [...this.snapshot.services.values()];
  }

  /** Returns the workloads scheduled on `node` (spec.nodeName), sorted by uid. */
  workloadsOnNode(node: string): Workload[] {
    return [...(this.byNode.get(node) ?? [])];
  }

  /** Returns the Services of the workload's namespace whose non-empty selector matches its labels. */
  servicesForWorkload(workload: Workload): Service[] {
    return this.services().filter(
      (service) =>
        service.namespace === workload.namespace &&
        Object.keys(service.selector).length > 0 &&
        selectorMatches(service.selector, workload.labels),
    );
  }

  /**
   * Returns the workloads a Service selects (none for a Service without selector). The outbound
   * proxy calls this for every connection to a VIP and a state never changes, so results are cached.
   */
  workloadsForService(service: Service): Workload[] {
    const cached = this.selected.get(service);
    if (cached) return [...cached];
    const selected =
      Object.keys(service.selector).length === 0
        ? []
        : this.workloads().filter(
            (workload) => workload.namespace === service.namespace && selectorMatches(service.selector, workload.labels),
          );
    this.selected.set(service, selected);
    return [...selected];
  }

  /**
   * Returns the EndpointSlices of a Service (label kubernetes.io/service-name in its namespace),
   * sorted by uid. Empty when the snapshot has none, as for manifest folders.
   */
  endpointSlicesForService(service: Service): EndpointSlice[] {
    return [...(this.slicesByService.get(service.uid) ?? [])];
  }

  /**
   * Returns the AuthorizationPolicies that apply to a workload, sorted by uid:
   * 1. policies of its namespace without selector (namespace-wide);
   * 2. policies of its namespace whose selector matches its labels;
   * 3. policies of the root namespace without selector (mesh-wide);
   * 4. policies of the root namespace with a selector matching its labels: Istio applies a root
   *    namespace selector to workloads in every namespace.
   */
  policiesForWorkload(workload: Workload, rootNamespace = DEFAULT_ROOT_NAMESPACE): AuthorizationPolicy[] {
    const namespaces = new Set([workload.namespace, rootNamespace]);
    const policies: AuthorizationPolicy[] = [];
    for (const namespace of namespaces) {
      for (const policy of this.policiesByNamespace.get(namespace) ?? []) {
        if (policy.selector === undefined || selectorMatches(policy.selector, workload.labels)) policies.push(policy);
      }
    }
    return policies.sort((a, b) => compare(a.uid, b.uid));
  }

  /**
   * Returns the PeerAuthentications of each scope for a workload. Istio picks the oldest one when
   * several share a scope; manifests carry no creation time, so the first by name is used instead.
   */
  peerAuthenticationsFor(workload: Workload, rootNamespace = DEFAULT_ROOT_NAMESPACE): PeerAuthenticationScopes {
    const first = (candidates: PeerAuthentication[]) => candidates.sort((a, b) => compare(a.uid, b.uid))[0];
    const inNamespace = this.peerAuthenticationsByNamespace.get(workload.namespace) ?? [];
    const inRoot = this.peerAuthenticationsByNamespace.get(rootNamespace) ?? [];
    const scopes: PeerAuthenticationScopes = {};
    const mesh = first(inRoot.filter((policy) => isNamespaceWide(policy)));
    const isRoot = workload.namespace === rootNamespace;
    const namespace = isRoot ? undefined : first(inNamespace.filter((policy) => isNamespaceWide(policy)));
    // As in istiod, a policy with a selector in the root namespace selects no workload.
    const selected = isRoot
      ? undefined
      : first(inNamespace.filter((policy) => !isNamespaceWide(policy) && selectorMatches(policy.selector ?? {}, workload.labels)));
    if (mesh !== undefined) scopes.mesh = mesh;
    if (namespace !== undefined) scopes.namespace = namespace;
    if (selected !== undefined) scopes.workload = selected;
    return scopes;
  }

  /**
   * Indexes workloads by IP and node. When two workloads share an IP, a pod network workload wins
   * over a hostNetwork one (those carry the node's IP), then a pod that is not being deleted (the
   * address of a pod whose sandbox is gone may belong to a new pod already), then the first by uid.
   */
  private indexWorkloads(): void {
    const sorted = [...this.snapshot.workloads.values()].sort((a, b) => compare(a.uid, b.uid));
    for (const workload of sorted) {
      for (const key of workloadIps(workload)) {
        const existing = this.byIp.get(key);
        if (existing === undefined || ownsIpBefore(workload, existing)) this.byIp.set(key, workload);
      }
      if (workload.nodeName !== "") {
        const onNode = this.byNode.get(workload.nodeName) ?? [];
        onNode.push(workload);
        this.byNode.set(workload.nodeName, onNode);
      }
    }
  }

  private indexEndpointSlices(): void {
    const sorted = [...(this.snapshot.endpointSlices?.values() ?? [])].sort((a, b) => compare(a.uid, b.uid));
    for (const slice of sorted) {
      if (slice.service === "") continue;
      const key = `${slice.namespace}/${slice.service}`;
      const slices = this.slicesByService.get(key) ?? [];
      slices.push(slice);
      this.slicesByService.set(key, slices);
    }
  }

  private indexServices(previous: MeshState | undefined): void {
    const claims = new Map<string, { vip: string; services: Service[] }>();
    const sorted = [...this.snapshot.services.values()].sort((a, b) => compare(a.uid, b.uid));
    for (const service of sorted) {
      for (const vip of service.vips) {
        const key = canonicalIp(vip);
        // A pod's address is never a Service's: a manifest that claims so would let a Service of any
        // namespace take the pod's traffic, so the pod keeps the address.
        const workload = this.byIp.get(key);
        if (workload) {
          this.conflicts.push({ service, vip, workload });
          continue;
        }
        const claim = claims.get(key) ?? { vip, services: [] };
        claim.services.push(service);
        claims.set(key, claim);
      }
    }
    for (const [key, { vip, services }] of claims) {
      if (services.length === 1) {
        this.byVip.set(key, services[0]);
        continue;
      }
      const holderUid = previous?.byVip.get(key)?.uid;
      const holder = services.find((service) => service.uid === holderUid);
      if (holder) this.byVip.set(key, holder);
      // Without a holder, the first Service by uid stands for the others in the conflicts.
      const other = holder ?? services[0];
      for (const service of services) {
        if (service !== other) this.conflicts.push({ service, vip, other });
      }
    }
  }
}

function isNamespaceWide(policy: PeerAuthentication): boolean {
  return policy.selector === undefined || Object.keys(policy.selector).length === 0;
}

function groupByNamespace<T extends { namespace: string }>(items: Iterable<T>, into: Map<string, T[]>): void {
  for (const item of items) {
    const group = into.get(item.namespace) ?? [];
    group.push(item);
    into.set(item.namespace, group);
  }
}

/** Orders strings by UTF-16 code units, the same order on every machine. */
function compare(a: string, b: string): number {
  if (a < b) return -1;
  if (a > b) return 1;
  return 0;
}

/** Tells whether `candidate` owns a shared IP before `existing`, which comes first by uid. */
function ownsIpBefore(candidate: Workload, existing: Workload): boolean {
  if (existing.hostNetwork !== candidate.hostNetwork) return existing.hostNetwork;
  return existing.deleting === true && candidate.deleting !== true;
}
