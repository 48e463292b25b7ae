// Kubernetes objects for the fake API server, built from the harness's pods, as a kubelet and
// scheduler would leave them: a bound Pod with or without its IPs in status.

import type { FakeKubeApi, KubeObject } from "./fake-kube-api";
import type { Cluster } from "./cluster";
import type { PodHandle } from "./topology";

export interface PodObjectOptions {
  /** Leave status.podIP out, as before the kubelet reports the sandbox's address (default false). */
  withoutIp?: boolean;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  hostNetwork?: boolean;
}

/** Builds the Pod object of a topology pod, bound to its node. */
export function podObject(pod: PodHandle, options: PodObjectOptions = {}): KubeObject {
  const ips = [pod.ip, ...(pod.ip6 !== undefined && pod.ip6 !== pod.ip ? [pod.ip6] : [])];
  return {
    apiVersion: "v1",
    kind: "Pod",
    metadata: {
      name: pod.name,
      namespace: pod.namespace,
      labels: { app: pod.name, ...pod.labels, ...options.labels },
      annotations: { ...options.annotations },
    },
    spec: {
      nodeName: pod.node,
      serviceAccountName: pod.serviceAccount,
      hostNetwork: options.hostNetwork ?? false,
      containers: [{ name: "app", image: "example.invalid/app", ports: Object.entries(pod.namedPorts ?? {}).map(([name, containerPort]) => ({ name, containerPort })) }],
    },
    status: options.withoutIp
      ? { phase: "Pending" }
      : { phase: "Running", podIP: pod.ip, podIPs: ips.map((ip) => ({ ip })), conditions: [{ type: "Ready", status: "True" }] },
  };
}

export function namespaceObject(name: string, labels: Record<string, string> = {}): KubeObject {
  return { apiVersion: "v1", kind: "Namespace", metadata: { name, labels } };
}

export interface ServicePortSpec {
  name?: string;
  port: number;
  targetPort: number;
}

/** Builds a Service with one cluster IP and TCP ports. Without `selector`, only EndpointSlices give it endpoints. */
export function serviceObject(namespace: string, name: string, clusterIP: string, ports: ServicePortSpec[], selector?: Record<string, string>): KubeObject {
  return {
    apiVersion: "v1",
    kind: "Service",
    metadata: { name, namespace },
    spec: {
      clusterIP,
      clusterIPs: [clusterIP],
      ...(selector !== undefined && { selector }),
      ports: ports.map((port) => ({ ...(port.name !== undefined && { name: port.name }), port: port.port, targetPort: port.targetPort, protocol: "TCP" })),
    },
  };
}

/**
 * Builds an IPv4 EndpointSlice of Service `serviceName` that lists `pods` as ready endpoints, each
 * pointing back at its Pod, with the given slice ports (the pods' ports, one per Service port name).
 */
export function endpointSliceObject(serviceName: string, name: string, pods: PodHandle[], ports: { name?: string; port: number }[]): KubeObject {
  const namespace = pods[0]?.namespace ?? "default";
  return {
    apiVersion: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    metadata: { name, namespace, labels: { "kubernetes.io/service-name": serviceName } },
    addressType: "IPv4",
    endpoints: pods.map((pod) => ({
      addresses: [pod.ip],
      conditions: { ready: true },
      nodeName: pod.node,
      targetRef: { kind: "Pod", namespace: pod.namespace, name: pod.name },
    })),
    ports: ports.map((port) => ({ ...(port.name !== undefined && { name: port.name }), port: port.port, protocol: "TCP" })),
  };
}

/** Builds a security.istio.io/v1 AuthorizationPolicy with the given spec (action, selector, rules). */
export function authorizationPolicyObject(namespace: string, name: string, spec: Record<string, unknown>): KubeObject {
  return { apiVersion: "security.istio.io/v1", kind: "AuthorizationPolicy", metadata: { name, namespace }, spec };
}

/** Returns one annotation of an object, undefined when the object or the annotation is absent. */
export function annotationOf(object: KubeObject | undefined, key: string): string | undefined {
  const annotations = (object?.metadata as { annotations?: Record<string, string> } | undefined)?.annotations;
  return annotations?.[key];
}

/**
 * Polls the fake API server every 100 ms until `predicate` holds for the stored object, which is
 * undefined when it does not exist. Throws after `timeoutMs` with the object as last seen.
 */
export async function waitForObject(
  api: FakeKubeApi,
  resource: string,
  namespace: string | undefined,
  name: string,
  predicate: (object: KubeObject | undefined) => boolean,
  timeoutMs: number,
  description: string,
): Promise<KubeObject | undefined> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const object = api.get(resource, namespace, name);
    if (predicate(object)) return object;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${description} of ${resource} ${namespace ?? ""}/${name}; it is now:\n${JSON.stringify(object?.metadata ?? null)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Returns the highest chain position (`seq`) among a node's audit records so far, or 0 before any. Newer records have a higher one. */
export function auditMark(cluster: Cluster, node: string): number {
  return cluster.auditRecords(node, "*").reduce((highest, record) => Math.max(highest, Number(record.seq) || 0), 0);
}
