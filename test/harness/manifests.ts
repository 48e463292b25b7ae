// Writes the Kubernetes objects of a topology as manifest files, the way the agent reads them.

import fs from "node:fs";
import path from "node:path";
import type { PodHandle, Topology } from "./topology";

export interface NamespaceSpec {
  name: string;
  ambient: boolean;
}

/** Renders a Namespace manifest. */
export function namespaceYaml(spec: NamespaceSpec): string {
  const labels = spec.ambient ? "\n  labels:\n    istio.io/dataplane-mode: ambient" : "";
  return `apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ${spec.name}${labels}\n`;
}

/** Renders one Pod manifest per pod of the topology, with the node, service account and IP it really has. */
export function podsYaml(topology: Topology): string {
  return [...topology.pods.values()]
    .map((pod) => {
      const labels = Object.entries({ app: pod.name, ...pod.labels })
        .map(([key, value]) => `    ${key}: "${value}"`)
        .join("\n");
      return [
        "apiVersion: v1",
        "kind: Pod",
        "metadata:",
        `  name: ${pod.name}`,
        `  namespace: ${pod.namespace}`,
        "  labels:",
        labels,
        "spec:",
        `  nodeName: ${pod.node}`,
        `  serviceAccountName: ${pod.serviceAccount}`,
        "  containers:",
        "    - name: app",
        "      image: example.invalid/app",
        ...containerPortsYaml(pod.namedPorts ?? {}),
        "status:",
        `  podIP: ${podIpYaml(pod)}`,
        ...podIpsYaml(pod),
        "",
      ].join("\n");
    })
    .join("---\n");
}

/** Renders status.podIP: the IPv6 address of an IPv6-only or IPv6-first pod, else the IPv4 one. */
function podIpYaml(pod: PodHandle): string {
  return pod.ip6 !== undefined && (pod.ipv6Only || pod.ipv6First) ? `"${pod.ip6}"` : pod.ip;
}

/**
 * Renders status.podIPs: for a dual-stack pod IPv4 first like status.podIP (IPv6 first with
 * ipv6First), for an IPv6-only pod its IPv6 address alone, and nothing for an IPv4-only pod.
 */
function podIpsYaml(pod: PodHandle): string[] {
  if (pod.ip6 === undefined) return [];
  if (pod.ipv6Only) return ["  podIPs:", `    - ip: "${pod.ip6}"`];
  if (pod.ipv6First) return ["  podIPs:", `    - ip: "${pod.ip6}"`, `    - ip: ${pod.ip}`];
  return ["  podIPs:", `    - ip: ${pod.ip}`, `    - ip: "${pod.ip6}"`];
}

function containerPortsYaml(namedPorts: Record<string, number>): string[] {
  const entries = Object.entries(namedPorts);
  if (entries.length === 0) return [];
  return ["      ports:", ...entries.map(([name, port]) => `        - {name: ${name}, containerPort: ${port}}`)];
}

export interface ServiceSpec {
  name: string;
  namespace: string;
  /** The cluster IP, outside every pod and node range of the topology. */
  vip: string;
  selector: Record<string, string>;
  /** Service port → target port (a number or a container port name). */
  ports: { port: number; targetPort: number | string }[];
}

/** Renders a Service manifest with one cluster IP and TCP ports. */
export function serviceYaml(spec: ServiceSpec): string {
  const selector = Object.entries(spec.selector).map(([key, value]) => `    ${key}: "${value}"`);
  const ports = spec.ports.map(({ port, targetPort }) => `    - {port: ${port}, targetPort: ${targetPort}, protocol: TCP}`);
  return [
    "apiVersion: v1",
    "kind: Service",
    "metadata:",
    `  name: ${spec.name}`,
    `  namespace: ${spec.namespace}`,
    "spec:",
    `  clusterIP: ${spec.vip}`,
    ...(selector.length > 0 ? ["  selector:", ...selector] : []),
    "  ports:",
    ...ports,
    "",
  ].join("\n");
}

/** Writes `content` atomically (write then rename), so the agent never reads half a file. */
export function writeManifest(dir: string, name: string, content: string): void {
  const target = path.join(dir, name);
  const temporary = path.join(dir, `.${name}.tmp`);
  fs.writeFileSync(temporary, content);
  fs.renameSync(temporary, target);
}
