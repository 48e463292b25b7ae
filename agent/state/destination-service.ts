// The Service of an inbound connection, guessed on the destination's side as ztunnel does
// (guess_inbound_service in src/proxy.rs), for the destination_service labels of Istio's metrics
// and the audit record's dst.service. The destination's agent receives only the pod's address and
// port. It takes the Service that the client's agent names in the CONNECT request only when the pod
// serves that Service, and otherwise picks a Service of the pod by target port.

import type { MeshState } from "./mesh-state";
import type { Service, Workload } from "./types";

/** The Kubernetes cluster domain that Service hostnames end with, as in Istio's default. */
export const CLUSTER_DOMAIN = "cluster.local";

/** Returns the hostname of the Service with uid "namespace/name": name.namespace.svc.cluster.local; undefined for another form. */
export function serviceHostname(uid: string): string | undefined {
  const slash = uid.indexOf("/");
  if (slash <= 0 || slash === uid.length - 1) return undefined;
  return `${uid.slice(slash + 1)}.${uid.slice(0, slash)}.svc.${CLUSTER_DOMAIN}`;
}

/**
 * Returns the Service that a connection to `workload` on `port` is for, or undefined:
 * 1. the Service whose hostname is `requestedHost` (the `host` of the CONNECT request's Forwarded
 *    header), when it is one of `services`, so a client cannot name a Service the pod does not serve;
 * 2. else the first of `services` with a TCP port whose targetPort is `port`, a named targetPort
 *    counting when the workload's container port of that name is `port`.
 * `services` are the Services that select the workload.
 */
export function guessInboundService(services: readonly Service[], workload: Workload, port: number, requestedHost: string | undefined): Service | undefined {
  if (requestedHost !== undefined) {
    const requested = services.find((service) => serviceHostname(service.uid) === requestedHost);
    if (requested !== undefined) return requested;
  }
  return services.find((service) =>
    service.ports.some((servicePort) => {
      if (servicePort.protocol !== "TCP") return false;
      const target = typeof servicePort.targetPort === "number" ? servicePort.targetPort : workload.namedPorts[servicePort.targetPort];
      return target === port;
    }),
  );
}

/** The Services selecting each workload, by uid, per mesh state. A state never changes, and every inbound connection reads this. */
const servicesByState = new WeakMap<MeshState, Map<string, Service[]>>();

/**
 * Returns the uid of the Service that a connection to the workload `workloadUid` on `port` is for,
 * by guessInboundService over the Services that select the workload, sorted by uid. Undefined when
 * the state lacks the workload or no Service matches.
 * NOTE: a Service without selector whose EndpointSlices list the pod is not among the candidates.
 */
export function inboundServiceOf(state: MeshState, workloadUid: string, port: number, requestedHost: string | undefined): string | undefined {
  const workload = state.workload(workloadUid);
  if (workload === undefined) return undefined;
  let byWorkload = servicesByState.get(state);
  if (byWorkload === undefined) {
    byWorkload = new Map();
    servicesByState.set(state, byWorkload);
  }
  let services = byWorkload.get(workloadUid);
  if (services === undefined) {
    services = state.servicesForWorkload(workload).sort(byUid);
    byWorkload.set(workloadUid, services);
  }
  return guessInboundService(services, workload, port, requestedHost)?.uid;
}

function byUid(a: Service, b: Service): number {
  if (a.uid === b.uid) return 0;
  return a.uid < b.uid ? -1 : 1;
}
