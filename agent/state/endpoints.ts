// Service routing: which workload serves a connection to a Service VIP. A pure function of the
// mesh state finds the Service port and its endpoints, and the EndpointPicker spreads connections
// over those endpoints in turn.

import type { MeshState } from "./mesh-state";
import type { Labels, Service, ServicePort, Workload } from "./types";

/** A workload that serves a Service port, with the port it listens on. */
export interface Endpoint {
  workload: Workload;
  /** The Service port's targetPort, resolved for this workload (a named port looked up in its namedPorts). */
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
 * Finds the Service with VIP `vip`, its TCP port `port`, and the endpoints behind that port: the
 * workloads the Service selects that are ready, have an IP and define the target port. Returns
 * undefined when `vip` is no Service's VIP. Endpoints are sorted by workload uid.
 */
export function serviceEndpoints(state: MeshState, vip: string, port: number): ServicePortEndpoints | undefined {
  const service = state.serviceByVip(vip);
  if (service === undefined) return undefined;

  const servicePort = service.ports.find((candidate) => candidate.port === port && candidate.protocol === "TCP");
  if (servicePort === undefined) {
    return { kind: "unavailable", service, reason: "no_service_port", message: missingPortMessage(service, port) };
  }

  const selected = state.workloadsForService(service).sort(byUid);
  const endpoints: Endpoint[] = [];
  for (const workload of selected) {
    if (!workload.ready || workload.ip === "") continue;
    const targetPort = resolveTargetPort(servicePort, workload);
    if (targetPort !== undefined) endpoints.push({ workload, targetPort });
  }
  if (endpoints.length === 0) {
    const message = noEndpointMessage(service, servicePort, selected);
    return { kind: "unavailable", service, reason: "no_healthy_endpoint", message };
  }
  return { kind: "endpoints", service, servicePort, endpoints };
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

function formatSelector(selector: Labels): string {
  return Object.entries(selector)
    .map(([key, value]) => `${key}=${value}`)
    .join(",");
}
