// Readers for the core Kubernetes kinds the mesh uses: v1 Namespace, Pod and Service. Each
// reads only the fields the agent uses and checks them as the Kubernetes API server would.

import net from "node:net";
import { canonicalIp } from "../state/ip";
import type { Namespace, ObjectSource, Service, ServicePort, Workload } from "../state/types";
import { objectKey, type ObjectKind } from "./manifest-problem";
import { describeValue, type ObjectReader } from "./manifest-reader";

/** DNS-1123 subdomain: the syntax of most object names. */
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

/** DNS-1123 label: the syntax of namespace names. */
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** IANA service name: the syntax of named container and Service ports. */
const PORT_NAME = /^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

export interface Metadata {
  name: string;
  /** Undefined for cluster-scoped kinds. */
  namespace?: string;
  labels: Record<string, string>;
  annotations: Record<string, string>;
  /** metadata.uid, which the API server sets; manifests usually have none. */
  uid?: string;
}

/** Reads metadata.name, metadata.namespace (default "default" for namespaced kinds), labels and annotations. */
/** The fields of a Kubernetes ObjectMeta; any other field under metadata is a mistake, such as "namespce". */
const METADATA_FIELDS = [
  "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
  "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers", "managedFields",
];

export function readMetadata(reader: ObjectReader, kind: ObjectKind, namespaced: boolean): Metadata | undefined {
  reader.knownFields(["metadata"], METADATA_FIELDS);
  const name = reader.requiredString(["metadata", "name"]);
  if (name === undefined) return undefined;
  let namespace: string | undefined;
  if (namespaced) {
    namespace = reader.string(["metadata", "namespace"]) ?? "default";
    if (namespace === "") namespace = "default";
  }
  reader.label = objectKey(kind, namespace, name);

  if (name.length > 253 || !DNS_SUBDOMAIN.test(name)) {
    reader.reject(["metadata", "name"], `invalid name ${describeValue(name)}; use lowercase letters, digits, '-' and '.'`);
  }
  if (namespace !== undefined && (namespace.length > 63 || !DNS_LABEL.test(namespace))) {
    reader.reject(["metadata", "namespace"], `invalid namespace ${describeValue(namespace)}; use lowercase letters, digits and '-'`);
  }

  const labels = reader.stringMap(["metadata", "labels"]);
  const annotations = reader.stringMap(["metadata", "annotations"]);
  const uid = reader.string(["metadata", "uid"]);
  return { name, namespace, labels, annotations, ...(uid !== undefined && uid !== "" && { uid }) };
}

export function readNamespace(reader: ObjectReader, source: ObjectSource): Namespace | undefined {
  const metadata = readMetadata(reader, "Namespace", false);
  if (metadata === undefined) return undefined;
  if (metadata.name.length > 63 || !DNS_LABEL.test(metadata.name)) {
    reader.reject(["metadata", "name"], `invalid namespace name ${describeValue(metadata.name)}; use lowercase letters, digits and '-'`);
  }
  return { name: metadata.name, labels: metadata.labels, source };
}

export function readPod(reader: ObjectReader, source: ObjectSource): Workload | undefined {
  const metadata = readMetadata(reader, "Pod", true);
  if (metadata === undefined || metadata.namespace === undefined) return undefined;

  const serviceAccount =
    nonEmpty(reader.string(["spec", "serviceAccountName"])) ?? nonEmpty(reader.string(["spec", "serviceAccount"])) ?? "default";
  const nodeName = reader.string(["spec", "nodeName"]) ?? "";
  const hostNetwork = reader.boolean(["spec", "hostNetwork"], false);

  const podIp = reader.string(["status", "podIP"]) ?? "";
  if (podIp !== "" && net.isIP(podIp) === 0) {
    reader.reject(["status", "podIP"], `invalid IPv4 or IPv6 address ${describeValue(podIp)}; fix the value or remove the field`);
  }
  let ips = readPodIps(reader, podIp);
  let ip = podIp !== "" ? podIp : (ips[0] ?? "");
  // A pod that has finished (Succeeded or Failed) keeps status.podIP, but the network plugin has
  // released the address, which a new pod may have now: the finished pod owns no address.
  const phase = reader.value(["status", "phase"]);
  if (phase === "Succeeded" || phase === "Failed") {
    ip = "";
    ips = [];
  }

  return {
    uid: `${metadata.namespace}/${metadata.name}`,
    ...(metadata.uid !== undefined && { podUid: metadata.uid }),
    ...(isDeleting(reader) && { deleting: true }),
    name: metadata.name,
    namespace: metadata.namespace,
    serviceAccount,
    nodeName,
    ip,
    ips,
    labels: metadata.labels,
    annotations: metadata.annotations,
    namedPorts: readNamedPorts(reader),
    hostNetwork,
    ready: readReadiness(reader),
    ...workloadNameOf(reader, metadata.name, metadata.labels),
    source,
  };
}

/** A Job name that a CronJob made: the CronJob's name, '-', and the scheduled time in minutes (8 to 10 digits). */
const CRONJOB_JOB_NAME = /^(.+)-\d{8,10}$/;

/**
 * Returns the name of the pod's controller as Istio's telemetry names workloads, when it differs
 * from the pod name. A pod with metadata.generateName takes its controller reference's name. A
 * ReplicaSet's pod-template-hash suffix is removed (the Deployment's name), and so is a CronJob's
 * Job suffix (the CronJob's name).
 */
function workloadNameOf(reader: ObjectReader, podName: string, labels: Readonly<Record<string, string>>): { workloadName?: string } {
  if (nonEmpty(reader.string(["metadata", "generateName"])) === undefined) return {};
  const references = reader.list(["metadata", "ownerReferences"]) ?? [];
  const index = references.findIndex((_, position) => reader.value(["metadata", "ownerReferences", position, "controller"]) === true);
  if (index === -1) return {};
  const kind = reader.string(["metadata", "ownerReferences", index, "kind"]);
  let name = nonEmpty(reader.string(["metadata", "ownerReferences", index, "name"]));
  if (name === undefined) return {};
  const hash = labels["pod-template-hash"];
  if (kind === "ReplicaSet" && hash !== undefined && name.endsWith(`-${hash}`)) name = name.slice(0, -hash.length - 1);
  else if (kind === "Job") name = CRONJOB_JOB_NAME.exec(name)?.[1] ?? name;
  return name === podName ? {} : { workloadName: name };
}

/**
 * Reads status.podIPs ([{ip}], at most one address per family) and returns every pod IP in
 * canonical form, status.podIP first. Kubernetes writes status.podIP as the first entry of
 * status.podIPs; a podIP that the list lacks is kept in front of it.
 */
function readPodIps(reader: ObjectReader, podIp: string): string[] {
  const ips: string[] = net.isIP(podIp) !== 0 ? [canonicalIp(podIp)] : [];
  const families = new Set(ips.map((ip) => net.isIP(ip)));
  const entries = reader.list(["status", "podIPs"]) ?? [];
  entries.forEach((_, index) => {
    const path = ["status", "podIPs", index, "ip"];
    if (reader.mapping(["status", "podIPs", index]) === undefined) return;
    const text = reader.string(path);
    if (text === undefined || text === "") return;
    if (net.isIP(text) === 0) {
      reader.reject(path, `invalid IPv4 or IPv6 address ${describeValue(text)}; fix the value or remove the entry`);
      return;
    }
    const ip = canonicalIp(text);
    if (ips.includes(ip)) return;
    if (families.has(net.isIP(ip))) {
      reader.reject(path, `second IPv${net.isIP(ip)} address ${describeValue(text)}; a pod has at most one IPv4 and one IPv6 address`);
      return;
    }
    families.add(net.isIP(ip));
    ips.push(ip);
  });
  return ips;
}

/** Pod phases as the Kubernetes API defines them. */
const POD_PHASES = ["Pending", "Running", "Succeeded", "Failed", "Unknown"];

/**
 * Tells whether a pod may serve Service traffic, as the Kubernetes endpoints controller decides: it
 * is not being deleted, its phase is Running, and its Ready condition is "True" ("False" and
 * "Unknown" are not ready). Manifests often carry no status, so an absent phase or Ready condition
 * counts as ready.
 */
/** Tells whether metadata.deletionTimestamp is set; any value marks the pod as terminating, whatever its format. */
function isDeleting(reader: ObjectReader): boolean {
  const deletionTimestamp = reader.value(["metadata", "deletionTimestamp"]);
  return deletionTimestamp !== undefined && deletionTimestamp !== null && deletionTimestamp !== "";
}

function readReadiness(reader: ObjectReader): boolean {
  const deleting = isDeleting(reader);
  const phase = reader.string(["status", "phase"]);
  if (phase !== undefined && !POD_PHASES.includes(phase)) {
    reader.reject(["status", "phase"], `invalid phase ${describeValue(phase)}; use one of ${POD_PHASES.join(", ")}`);
  }
  const readyCondition = readReadyCondition(reader);
  return !deleting && (phase === undefined || phase === "Running") && (readyCondition === undefined || readyCondition === "True");
}

/** Returns the status of the pod's Ready condition (status.conditions[type=Ready].status), undefined when absent. */
function readReadyCondition(reader: ObjectReader): string | undefined {
  const conditions = reader.list(["status", "conditions"]) ?? [];
  let status: string | undefined;
  conditions.forEach((_, index) => {
    const path = ["status", "conditions", index];
    if (reader.mapping(path) === undefined) return;
    if (reader.string([...path, "type"]) !== "Ready") return;
    const value = reader.string([...path, "status"]);
    if (value !== undefined && value !== "True" && value !== "False" && value !== "Unknown") {
      reader.reject([...path, "status"], `invalid condition status ${describeValue(value)}; use "True", "False" or "Unknown"`);
      return;
    }
    status = value;
  });
  return status;
}

/** Reads containers[].ports[] and returns the named ones; checks every port. */
function readNamedPorts(reader: ObjectReader): Record<string, number> {
  const namedPorts: Record<string, number> = {};
  const containers = reader.list(["spec", "containers"]) ?? [];
  containers.forEach((_, containerIndex) => {
    const portsPath = ["spec", "containers", containerIndex, "ports"];
    const ports = reader.list(portsPath) ?? [];
    ports.forEach((_, portIndex) => {
      const path = [...portsPath, portIndex];
      if (reader.mapping(path) === undefined) return;
      const containerPort = reader.port([...path, "containerPort"]);
      const name = reader.string([...path, "name"]);
      if (name === undefined || name === "") return;
      if (name.length > 15 || !PORT_NAME.test(name)) {
        reader.reject([...path, "name"], `invalid port name ${describeValue(name)}; use at most 15 lowercase letters, digits and '-'`);
        return;
      }
      if (containerPort !== undefined) namedPorts[name] = containerPort;
    });
  });
  return namedPorts;
}

export function readService(reader: ObjectReader, source: ObjectSource): Service | undefined {
  const metadata = readMetadata(reader, "Service", true);
  if (metadata === undefined || metadata.namespace === undefined) return undefined;
  return {
    uid: `${metadata.namespace}/${metadata.name}`,
    name: metadata.name,
    namespace: metadata.namespace,
    vips: readClusterIps(reader),
    selector: reader.stringMap(["spec", "selector"]),
    ports: readServicePorts(reader),
    source,
  };
}

/** Reads spec.clusterIPs, or spec.clusterIP when the list is absent; "None" (headless) gives no VIP. */
function readClusterIps(reader: ObjectReader): string[] {
  const list = reader.stringList(["spec", "clusterIPs"]);
  const single = reader.string(["spec", "clusterIP"]);
  const entries: [string, (string | number)[]][] =
    list !== undefined && list.length > 0
      ? list.map((ip, index) => [ip, ["spec", "clusterIPs", index]])
      : single !== undefined
        ? [[single, ["spec", "clusterIP"]]]
        : [];
  const vips: string[] = [];
  for (const [ip, path] of entries) {
    if (ip === "None" || ip === "") continue;
    if (net.isIP(ip) === 0) {
      reader.reject(path, `invalid IPv4 or IPv6 address ${describeValue(ip)}; use an address or "None" for a headless Service`);
      continue;
    }
    vips.push(ip);
  }
  return vips;
}

function readServicePorts(reader: ObjectReader): ServicePort[] {
  const ports: ServicePort[] = [];
  const items = reader.list(["spec", "ports"]) ?? [];
  items.forEach((_, index) => {
    const path = ["spec", "ports", index];
    if (reader.mapping(path) === undefined) return;
    const port = reader.port([...path, "port"]);
    const name = reader.string([...path, "name"]) ?? "";
    const protocol = readProtocol(reader, [...path, "protocol"]);
    const targetPort = readTargetPort(reader, [...path, "targetPort"]);
    if (port === undefined || protocol === undefined || targetPort === null) return;
    ports.push({ name, port, targetPort: targetPort ?? port, protocol });
  });
  return ports;
}

function readProtocol(reader: ObjectReader, path: (string | number)[]): ServicePort["protocol"] | undefined {
  const protocol = reader.string(path) ?? "TCP";
  if (protocol === "TCP" || protocol === "UDP" || protocol === "SCTP") return protocol;
  reader.reject(path, `invalid protocol ${describeValue(protocol)}; use TCP, UDP or SCTP`);
  return undefined;
}

/** Returns the target port (number or container port name), undefined when absent, null when invalid. */
function readTargetPort(reader: ObjectReader, path: (string | number)[]): number | string | undefined | null {
  const value = reader.value(path);
  if (value === undefined || value === null) return undefined;
  if (typeof value === "number") return reader.port(path) ?? null;
  if (typeof value === "string") {
    if (/^[0-9]+$/.test(value)) {
      const port = Number(value);
      if (port >= 1 && port <= 65535) return port;
    } else if (value.length <= 15 && PORT_NAME.test(value)) {
      return value;
    }
  }
  reader.reject(path, `invalid targetPort ${describeValue(value)}; use a port number 1-65535 or a container port name`);
  return null;
}

function nonEmpty(value: string | undefined): string | undefined {
  return value === "" ? undefined : value;
}
