// Synthetic cluster contents for the Kubernetes benchmark: pods of other nodes, Services and their
// EndpointSlices, shaped as a real API server returns them (labels, annotations, ownerReferences,
// managedFields, container specs and status), so that the agent parses and keeps objects of a
// realistic size. Each Service selects one Deployment; each pod of it runs on one of the remote nodes.

import { createHash } from "node:crypto";
import type { KubeObject } from "../harness/fake-kube-api";

/** The shape of the synthetic cluster. */
export interface ClusterShape {
  pods: number;
  services: number;
  namespaces: number;
  /** Nodes that the pods are spread over; none of them is the measured agent's node. */
  remoteNodes: number;
}

const CREATED = "2026-11-02T08:14:03Z";
const STARTED = "2026-11-02T08:14:09Z";

/** Returns a deterministic UID, so that two runs have the same objects. */
function uidOf(text: string): string {
  const hex = createHash("sha256").update(text).digest("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

function suffixOf(text: string, length: number): string {
  // Kubernetes generated names use consonants and digits only.
  const alphabet = "bcdfghjklmnpqrstvwxz2456789";
  const digest = createHash("sha256").update(text).digest();
  return Array.from({ length }, (_, index) => alphabet[digest[index] % alphabet.length]).join("");
}

/** Pod IPs of the remote nodes, in 100.64.0.0/10 (shared address space), apart from every harness address. */
function remotePodIp(index: number): string {
  return `100.64.${Math.floor(index / 250)}.${(index % 250) + 1}`;
}

/** Cluster IPs of the Services, in 10.96.0.0/16 as kubeadm assigns them. */
function clusterIp(index: number): string {
  return `10.96.${Math.floor(index / 250)}.${(index % 250) + 1}`;
}

export function namespaceName(index: number): string {
  return `team-${index}`;
}

function appName(serviceIndex: number): string {
  return `svc-${serviceIndex}`;
}

/** Places pod `podIndex`: its Service (and Deployment), namespace, replica number and node. */
function placement(shape: ClusterShape, podIndex: number): { service: number; namespace: string; node: string } {
  const service = podIndex % shape.services;
  return { service, namespace: namespaceName(service % shape.namespaces), node: `remote-${podIndex % shape.remoteNodes}` };
}

function podName(shape: ClusterShape, podIndex: number): string {
  const { service } = placement(shape, podIndex);
  return `${appName(service)}-${suffixOf(`rs-${service}`, 10)}-${suffixOf(`pod-${podIndex}`, 5)}`;
}

function podManagedFields(): unknown[] {
  return [
    {
      manager: "kube-controller-manager",
      operation: "Update",
      apiVersion: "v1",
      time: CREATED,
      fieldsType: "FieldsV1",
      fieldsV1: {
        "f:metadata": { "f:generateName": {}, "f:labels": { ".": {}, "f:app": {}, "f:pod-template-hash": {}, "f:version": {} }, "f:ownerReferences": { ".": {}, 'k:{"uid":"rs"}': {} } },
        "f:spec": { 'f:containers': { 'k:{"name":"app"}': { ".": {}, "f:image": {}, "f:name": {}, "f:ports": {}, "f:resources": {} } }, "f:serviceAccountName": {} },
      },
    },
    {
      manager: "kubelet",
      operation: "Update",
      apiVersion: "v1",
      time: STARTED,
      fieldsType: "FieldsV1",
      subresource: "status",
      fieldsV1: {
        "f:status": { "f:conditions": { 'k:{"type":"Ready"}': {} }, "f:containerStatuses": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {} },
      },
    },
  ];
}

function podCondition(type: string): Record<string, unknown> {
  return { type, status: "True", lastProbeTime: null, lastTransitionTime: STARTED };
}

/** A running pod of another node as the API server returns it, about 3 KB of JSON. */
export function remotePod(shape: ClusterShape, podIndex: number): KubeObject {
  const { service, namespace, node } = placement(shape, podIndex);
  const app = appName(service);
  const replicaSet = `${app}-${suffixOf(`rs-${service}`, 10)}`;
  const name = podName(shape, podIndex);
  const ip = remotePodIp(podIndex);
  return {
    apiVersion: "v1",
    kind: "Pod",
    metadata: {
      name,
      generateName: `${replicaSet}-`,
      namespace,
      uid: uidOf(`pod/${namespace}/${name}`),
      creationTimestamp: CREATED,
      labels: { app, version: "v1", "pod-template-hash": suffixOf(`rs-${service}`, 10), "app.kubernetes.io/part-of": namespace },
      annotations: { "kubectl.kubernetes.io/restartedAt": CREATED, "prometheus.io/scrape": "true", "prometheus.io/port": "9090" },
      ownerReferences: [{ apiVersion: "apps/v1", kind: "ReplicaSet", name: replicaSet, uid: uidOf(`rs/${namespace}/${replicaSet}`), controller: true, blockOwnerDeletion: true }],
      managedFields: podManagedFields(),
    },
    spec: {
      nodeName: node,
      serviceAccountName: app,
      serviceAccount: app,
      containers: [
        {
          name: "app",
          image: `registry.example.invalid/${namespace}/${app}:1.4.2`,
          imagePullPolicy: "IfNotPresent",
          ports: [{ name: "http", containerPort: 8080, protocol: "TCP" }, { name: "metrics", containerPort: 9090, protocol: "TCP" }],
          resources: { requests: { cpu: "100m", memory: "128Mi" }, limits: { memory: "256Mi" } },
          terminationMessagePath: "/dev/termination-log",
          terminationMessagePolicy: "File",
        },
      ],
      restartPolicy: "Always",
      terminationGracePeriodSeconds: 30,
      dnsPolicy: "ClusterFirst",
      schedulerName: "default-scheduler",
      securityContext: {},
      priority: 0,
      enableServiceLinks: true,
      preemptionPolicy: "PreemptLowerPriority",
    },
    status: {
      phase: "Running",
      conditions: ["Initialized", "Ready", "ContainersReady", "PodScheduled"].map(podCondition),
      hostIP: `10.0.${Math.floor(podIndex % shape.remoteNodes / 250)}.${(podIndex % shape.remoteNodes) % 250 + 1}`,
      podIP: ip,
      podIPs: [{ ip }],
      startTime: STARTED,
      containerStatuses: [
        {
          name: "app",
          state: { running: { startedAt: STARTED } },
          ready: true,
          restartCount: 0,
          image: `registry.example.invalid/${namespace}/${app}:1.4.2`,
          imageID: `registry.example.invalid/${namespace}/${app}@sha256:${createHash("sha256").update(app).digest("hex")}`,
          containerID: `containerd://${createHash("sha256").update(name).digest("hex")}`,
          started: true,
        },
      ],
      qosClass: "Burstable",
    },
  };
}

export function service(shape: ClusterShape, serviceIndex: number): KubeObject {
  const app = appName(serviceIndex);
  const namespace = namespaceName(serviceIndex % shape.namespaces);
  const ip = clusterIp(serviceIndex);
  return {
    apiVersion: "v1",
    kind: "Service",
    metadata: {
      name: app,
      namespace,
      uid: uidOf(`svc/${namespace}/${app}`),
      creationTimestamp: CREATED,
      labels: { app },
      managedFields: [{ manager: "kubectl-client-side-apply", operation: "Update", apiVersion: "v1", time: CREATED, fieldsType: "FieldsV1", fieldsV1: { "f:spec": { "f:ports": {}, "f:selector": {}, "f:type": {} } } }],
    },
    spec: {
      clusterIP: ip,
      clusterIPs: [ip],
      ipFamilies: ["IPv4"],
      ipFamilyPolicy: "SingleStack",
      internalTrafficPolicy: "Cluster",
      selector: { app },
      ports: [{ name: "http", port: 80, targetPort: "http", protocol: "TCP" }, { name: "metrics", port: 9090, targetPort: 9090, protocol: "TCP" }],
      sessionAffinity: "None",
      type: "ClusterIP",
    },
    status: { loadBalancer: {} },
  };
}

/** Builds the EndpointSlice of a Service, with one endpoint per pod of its Deployment. */
export function endpointSlice(shape: ClusterShape, serviceIndex: number): KubeObject {
  const app = appName(serviceIndex);
  const namespace = namespaceName(serviceIndex % shape.namespaces);
  const name = `${app}-${suffixOf(`eps-${serviceIndex}`, 5)}`;
  const endpoints: unknown[] = [];
  for (let podIndex = serviceIndex; podIndex < shape.pods; podIndex += shape.services) {
    const pod = podName(shape, podIndex);
    endpoints.push({
      addresses: [remotePodIp(podIndex)],
      conditions: { ready: true, serving: true, terminating: false },
      nodeName: placement(shape, podIndex).node,
      targetRef: { kind: "Pod", namespace, name: pod, uid: uidOf(`pod/${namespace}/${pod}`) },
      zone: `zone-${podIndex % 3}`,
    });
  }
  return {
    apiVersion: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    metadata: {
      name,
      generateName: `${app}-`,
      namespace,
      uid: uidOf(`eps/${namespace}/${name}`),
      creationTimestamp: CREATED,
      labels: { "kubernetes.io/service-name": app, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io", app },
      ownerReferences: [{ apiVersion: "v1", kind: "Service", name: app, uid: uidOf(`svc/${namespace}/${app}`), controller: true, blockOwnerDeletion: true }],
    },
    addressType: "IPv4",
    endpoints,
    ports: [{ name: "http", port: 8080, protocol: "TCP" }, { name: "metrics", port: 9090, protocol: "TCP" }],
  };
}

/** Yields every object of the synthetic cluster: namespaces, pods, Services and EndpointSlices. */
export function* clusterObjects(shape: ClusterShape): Generator<KubeObject> {
  for (let index = 0; index < shape.namespaces; index++) {
    yield { apiVersion: "v1", kind: "Namespace", metadata: { name: namespaceName(index), uid: uidOf(`ns/${index}`), labels: { "kubernetes.io/metadata.name": namespaceName(index) } } };
  }
  for (let index = 0; index < shape.pods; index++) yield remotePod(shape, index);
  for (let index = 0; index < shape.services; index++) {
    yield service(shape, index);
    yield endpointSlice(shape, index);
  }
}
