// Service routing: which workload serves a connection to a Service VIP. A pure function of the
// mesh state finds the Service port and its endpoints, and the EndpointPicker spreads connections
// over those endpoints in turn. The endpoints come from the Service's EndpointSlices when it has
// any, and from the pods its selector matches otherwise.

import net from "node:net";
import { canonicalIp, hasWorkloadIp, workloadIpOfFamily } from "./ip";
import type { MeshState } from "./mesh-state";
import type { EndpointSlice, EndpointSliceEndpoint, Labels, Service, ServicePort, Workload } from "./types";

/** An address that serves a Service port, with the port it listens on. */
export interface Endpoint {
  /**
   * The pod at `ip`. Undefined for an EndpointSlice address that no known Workload has, such as an
   * address outside the cluster behind a Service without selector: it is reached as plain TCP.
   */
  workload?: Workload;
  /** The address to connect to, of the VIP's family: an IPv6 cluster IP leads to the pod's IPv6 address when it has one. */
  ip: string;
  /** The Service port's targetPort, resolved for this endpoint (a named port looked up in the workload's namedPorts or the slice's ports). */
  targetPort: number;
}

/** The reason a connection to a Service VIP has nowhere to go, written as the audit record's `reason`. */
export type UnavailableReason = "no_service_port" | "no_healthy_endpoint";

/** The endpoints of one Service port, or why there are none. */
export type ServicePortEndpoints =
  | { kind: "endpoints"; service: Service; servicePort: ServicePort; endpoints: Endpoint[] }
  | { kind: "unavailable"; service: Service; reason: UnavailableReason; message: string };

/** The outcome of routing a connection to a Service VIP. */
export type EndpointChoice =
  | { kind: "endpoint"; service: Service; servicePort: ServicePort; endpoint: Endpoint }
  | { kind: "unavailable"; service: Service; reason: UnavailableReason; message: string };

/**
 * Finds the Service with VIP `vip`, its TCP port `port`, and the endpoints behind that port.
 * A Service with EndpointSlices takes the ready addresses of its slices of the VIP's family
 * (sliceEndpoints lists the rules). Any other Service takes the workloads it selects that are ready,
 * have an IP and define the target port, sorted by workload uid. Returns undefined when `vip` is
 * no Service's VIP.
 */
export function serviceEndpoints(state: MeshState, vip: string, port: number): ServicePortEndpoints | undefined {
  const service = state.serviceByVip(vip);
  if (service === undefined) return undefined;

  const servicePort = service.ports.find((candidate) => candidate.port === port && candidate.protocol === "TCP");
  if (servicePort === undefined) {
    return { kind: "unavailable", service, reason: "no_service_port", message: missingPortMessage(service, port) };
  }

  const family = net.isIP(canonicalIp(vip)) === 6 ? 6 : 4;
  const slices = state.endpointSlicesForService(service);
  if (slices.length > 0) return sliceEndpoints(state, service, servicePort, slices, family);

  const selected = state.workloadsForService(service).sort(byUid);
  const endpoints: Endpoint[] = [];
  for (const workload of selected) {
    if (!workload.ready || workload.ip === "") continue;
    const targetPort = resolveTargetPort(servicePort, workload);
    const ip = workloadIpOfFamily(workload, family) ?? workload.ip;
    if (targetPort !== undefined) endpoints.push({ workload, ip, targetPort });
  }
  if (endpoints.length === 0) {
    const message = noEndpointMessage(service, servicePort, selected);
    return { kind: "unavailable", service, reason: "no_healthy_endpoint", message };
  }
  return { kind: "endpoints", service, servicePort, endpoints };
}

/**
 * Returns the ready endpoints of a Service port from the Service's EndpointSlices:
 * - only slices of the VIP's address family count, so FQDN slices give no endpoint;
 * - a slice serves the port through its port of the same name and protocol. A slice port named ""
 *   matches a Service port without a name. A slice without that port, or whose port has no
 *   number, gives no endpoint;
 * - an endpoint serves when its ready condition is true, at its first address;
 * - an address listed by several slices is used once.
 * Endpoints are sorted by address, then target port.
 * NOTE: kube-proxy falls back to serving and terminating endpoints when a Service has no ready
 * one. This picker does not, so such a Service port is unavailable here.
 */
function sliceEndpoints(
  state: MeshState,
  service: Service,
  servicePort: ServicePort,
  slices: readonly EndpointSlice[],
  family: 4 | 6,
): ServicePortEndpoints {
  const addressType = family === 6 ? "IPv6" : "IPv4";
  const ofFamily = slices.filter((slice) => slice.addressType === addressType);
  const endpoints: Endpoint[] = [];
  const seen = new Set<string>();
  for (const slice of ofFamily) {
    const targetPort = slice.ports.find((port) => port.name === servicePort.name && port.protocol === servicePort.protocol)?.port;
    if (targetPort === undefined) continue;
    for (const endpoint of slice.endpoints) {
      const ip = endpoint.addresses[0];
      const key = `${ip}:${targetPort}`;
      if (!endpoint.ready || ip === undefined || seen.has(key)) continue;
      seen.add(key);
      const workload = sliceEndpointWorkload(state, endpoint, ip);
      endpoints.push(workload === undefined ? { ip, targetPort } : { workload, ip, targetPort });
    }
  }
  if (endpoints.length === 0) {
    const message = noSliceEndpointMessage(service, servicePort, ofFamily, addressType);
    return { kind: "unavailable", service, reason: "no_healthy_endpoint", message };
  }
  return { kind: "endpoints", service, servicePort, endpoints: endpoints.sort(byAddress) };
}

/**
 * Finds the Workload at a slice address: the Pod that targetRef names when that pod has the
 * address, or else the workload with that IP. The address must match because the pod's identity is
 * what the HBONE tunnel checks, and a slice can still name a pod whose IP has changed.
 */
function sliceEndpointWorkload(state: MeshState, endpoint: EndpointSliceEndpoint, ip: string): Workload | undefined {
  const ref = endpoint.targetRef;
  if (ref !== undefined && ref.kind === "Pod") {
    const workload = state.workload(`${ref.namespace}/${ref.name}`);
    if (workload !== undefined && hasWorkloadIp(workload, ip)) return workload;
  }
  return state.workloadByIp(ip);
}

/** Returns the port a workload serves a Service port on, or undefined when it lacks the named target port. */
export function resolveTargetPort(servicePort: ServicePort, workload: Workload): number | undefined {
  if (typeof servicePort.targetPort === "number") return servicePort.targetPort;
  return workload.namedPorts[servicePort.targetPort];
}

/**
 * Chooses endpoints in turn (round robin), one counter per Service port, each starting at a random
 * index so that agents on different nodes do not all begin with the same endpoint. The counters of
 * Service ports that a new MeshState no longer has are dropped, so the picker does not grow with
 * Services that came and went.
 */
export class EndpointPicker {
  readonly #next = new Map<string, number>();
  readonly #random: () => number;
  #lastState: MeshState | undefined;

  /** `random` returns a number in [0, 1) as Math.random does. Tests pass a fixed one. */
  constructor(random: () => number = Math.random) {
    this.#random = random;
  }

  /** Chooses the endpoint for a connection to `vip:port`. Returns undefined when `vip` is no Service's VIP. */
  pick(state: MeshState, vip: string, port: number): EndpointChoice | undefined {
    this.#forgetRemovedPorts(state);
    const found = serviceEndpoints(state, vip, port);
    if (found === undefined || found.kind === "unavailable") return found;

    const key = counterKey(found.service, found.servicePort);
    const count = found.endpoints.length;
    const index = this.#next.get(key) ?? Math.floor(this.#random() * count);
    this.#next.set(key, (index + 1) % count);
    const endpoint = found.endpoints[index % count];
    return { kind: "endpoint", service: found.service, servicePort: found.servicePort, endpoint };
  }

  #forgetRemovedPorts(state: MeshState): void {
    if (state === this.#lastState) return;
    this.#lastState = state;
    const current = new Set(state.services().flatMap((service) => service.ports.map((port) => counterKey(service, port))));
    for (const key of this.#next.keys()) {
      if (!current.has(key)) this.#next.delete(key);
    }
  }
}

/** Orders workloads by uid, the same order on every machine. */
function byUid(a: Workload, b: Workload): number {
  if (a.uid < b.uid) return -1;
  if (a.uid > b.uid) return 1;
  return 0;
}

/** Orders endpoints by address text, then target port, the same order on every machine. */
function byAddress(a: Endpoint, b: Endpoint): number {
  if (a.ip !== b.ip) return a.ip < b.ip ? -1 : 1;
  return a.targetPort - b.targetPort;
}

function counterKey(service: Service, servicePort: ServicePort): string {
  return `${service.uid}:${servicePort.port}`;
}

function missingPortMessage(service: Service, port: number): string {
  const exposed = service.ports.filter((candidate) => candidate.protocol === "TCP").map((candidate) => candidate.port);
  const list = exposed.length > 0 ? `it exposes TCP ${exposed.join(", ")}` : "it exposes no TCP port";
  return `Service ${service.uid} has no TCP port ${port}: ${list}; dial one of those or add the port to the Service`;
}

/** Explains why no selected workload can serve the port, naming the first cause that applies to all of them. */
function noEndpointMessage(service: Service, servicePort: ServicePort, selected: Workload[]): string {
  const prefix = `Service ${service.uid} port ${servicePort.port} has no ready endpoint`;
  if (Object.keys(service.selector).length === 0) {
    return `${prefix}: the Service has no selector; add spec.selector matching the pods that serve it`;
  }
  if (selected.length === 0) {
    return `${prefix}: no pod matches its selector ${formatSelector(service.selector)}; check the pods' labels and namespace`;
  }
  const usable = selected.filter((workload) => workload.ready && workload.ip !== "");
  if (usable.length === 0) {
    const names = selected.map((workload) => workload.name).join(", ");
    return `${prefix}: the matching pods (${names}) are not ready or have no IP; check their status`;
  }
  return `${prefix}: matching pods do not define the named port ${String(servicePort.targetPort)}; name a container port ${String(servicePort.targetPort)} in them or use a numeric targetPort`;
}

/** Explains why a Service's EndpointSlices give no endpoint for a port, naming the first cause that applies. */
function noSliceEndpointMessage(
  service: Service,
  servicePort: ServicePort,
  ofFamily: readonly EndpointSlice[],
  addressType: "IPv4" | "IPv6",
): string {
  const prefix = `Service ${service.uid} port ${servicePort.port} has no ready endpoint`;
  if (ofFamily.length === 0) {
    return `${prefix}: none of its EndpointSlices has addressType ${addressType}; check the Service's ipFamilies and its EndpointSlices`;
  }
  const portName = servicePort.name === "" ? "an unnamed port" : `port name ${JSON.stringify(servicePort.name)}`;
  const withPort = ofFamily.filter((slice) =>
    slice.ports.some((port) => port.name === servicePort.name && port.protocol === servicePort.protocol && port.port !== undefined),
  );
  if (withPort.length === 0) {
    return `${prefix}: its ${addressType} EndpointSlices list no ${servicePort.protocol} port with ${portName} and a number; the slice port names must match the Service port names`;
  }
  return `${prefix}: its ${addressType} EndpointSlices list no ready endpoint for ${portName}; check the readiness of the pods behind them`;
}

function formatSelector(selector: Labels): string {
  return Object.entries(selector)
    .map(([key, value]) => `${key}=${value}`)
    .join(",");
}
