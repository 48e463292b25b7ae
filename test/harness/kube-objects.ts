// Kubernetes objects for the fake API server, built from the harness's pods, as a kubelet and
// scheduler would leave them: a bound Pod with or without its IPs in status.

import type { KubeObject } from "./fake-kube-api";
import type { PodHandle } from "./topology";

export interface PodObjectOptions {
  /** Leave status.podIP out, as before the kubelet reports the sandbox's address (default false). */
  withoutIp?: boolean;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  hostNetwork?: boolean;
}

/** The Pod object of a topology pod, bound to its node. */
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
