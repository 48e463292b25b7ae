// A cluster without Kubernetes: each node and each pod is a network namespace. Pods hang off a
// bridge in their node's namespace, and the nodes are joined by one veth link, so traffic between
// pods on different nodes crosses that link where a capture can watch it.
//
//   pod netns (eth0 10.244.N.X/24) --veth-- node netns (bridge br0 10.244.N.1/24)
//   node1 netns (n-link 10.200.0.1/30) --veth-- node2 netns (n-link 10.200.0.2/30)
//
// A dual-stack topology (TopologyOptions.dualStack) adds IPv6 beside every IPv4 address. Pods get
// fd00:<P>:N::X/64, where P is the second octet of POD_NETWORK with its decimal digits used as a
// hex group. The bridge gets fd00:<P>:N::1, and the node link fd00:<P>:ff::1 and ::2/64. Addresses
// skip duplicate address detection (nodad), so they are usable as soon as they are added.
//
// Every name starts with a prefix unique to the run, so a cleanup never touches namespaces it did
// not make, and a run after a crash removes the leftovers of the same prefix family first.

import { execFileSync, spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import fs from "node:fs";
import { forgetRun, registerPid } from "./pid-registry";

/**
 * First two octets of every cluster's pod addresses (10.244.<node>.<host>). Agents refuse a pod
 * whose IP is on two namespaces, so two clusters that run at once on one machine need different
 * values: set AA_TEST_POD_NET, for example to 10.245.
 */
export const POD_NETWORK = podNetworkFromEnv(process.env.AA_TEST_POD_NET);

function podNetworkFromEnv(value: string | undefined): string {
  if (value === undefined || value === "") return "10.244";
  if (!/^10\.(?:[0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])$/.test(value)) {
    throw new Error(`AA_TEST_POD_NET=${value} is not of the form 10.N (N from 0 to 255); unset it or use, for example, 10.245`);
  }
  return value;
}

export interface PodSpec {
  name: string;
  namespace: string;
  serviceAccount: string;
  labels?: Record<string, string>;
  /** Named container ports (name → port) written into the Pod manifest, for Services with named target ports. */
  namedPorts?: Record<string, number>;
  /** In a dual-stack topology, false leaves this pod IPv4-only; ignored otherwise. */
  ipv6?: boolean;
  /**
   * In a dual-stack topology, true makes this pod IPv6-only: no IPv4 address but loopback, and
   * a manifest whose podIP and podIPs list its IPv6 address alone. Throws in an IPv4 topology.
   */
  ipv6Only?: boolean;
  /** In a dual-stack topology, true lists the IPv6 address first in the manifest (status.podIP and podIPs). */
  ipv6First?: boolean;
}

export interface NodeSpec {
  name: string;
  pods: PodSpec[];
}

export interface PodHandle extends PodSpec {
  node: string;
  netns: string;
  /** The pod's status.podIP: its IPv4 address, or its IPv6 address for an IPv6-only pod. */
  ip: string;
  /** The pod's IPv6 address in a dual-stack topology; undefined for IPv4-only pods. */
  ip6?: string;
}

export interface TopologyOptions {
  /** Gives every pod (except those with `ipv6: false`), bridge and node link an IPv6 address too. */
  dualStack?: boolean;
}

export interface NodeHandle {
  name: string;
  netns: string;
  /** Interface of the node-to-node link inside the node's namespace. */
  linkInterface: string;
  linkIp: string;
  podCidr: string;
  /** The node link's IPv6 address and the pods' IPv6 prefix, in a dual-stack topology. */
  linkIp6?: string;
  podCidr6?: string;
}

/**
 * Returns the fixed MAC address of a node's bridge: locally administered, with the node index in
 * the fifth byte. No two bridges share a layer-2 segment, so clusters may reuse the same values.
 */
function bridgeMac(nodeIndex: number): string {
  return `02:00:00:00:${nodeIndex.toString(16).padStart(2, "0")}:01`;
}

/** Returns the IPv6 prefix of a node's pods without its length, such as fd00:237:1:: . */
function podPrefix6(nodeIndex: number): string {
  return `fd00:${POD_NETWORK.split(".")[1]}:${nodeIndex}::`;
}

/** Runs a command and returns its stdout; throws with the command line and stderr on failure. */
export function run(command: string, args: string[], options: { input?: string; allowFail?: boolean } = {}): string {
  try {
    return execFileSync(command, args, { encoding: "utf8", input: options.input, stdio: ["pipe", "pipe", "pipe"] });
  } catch (error) {
    if (options.allowFail) return "";
    const stderr = (error as { stderr?: string }).stderr ?? "";
    throw new Error(`${command} ${args.join(" ")} failed: ${stderr.trim() || String(error)}`);
  }
}

export function listNetns(): string[] {
  const dir = "/var/run/netns";
  return fs.existsSync(dir) ? fs.readdirSync(dir) : [];
}

/** Deletes every network namespace whose name starts with `prefix` (leftovers of a crashed run). */
export function removeNetnsWithPrefix(prefix: string): string[] {
  const removed = listNetns().filter((name) => name.startsWith(prefix));
  for (const name of removed) run("ip", ["netns", "del", name], { allowFail: true });
  return removed;
}

export class Topology {
  readonly nodes = new Map<string, NodeHandle>();
  readonly pods = new Map<string, PodHandle>();
  private readonly children = new Set<ChildProcess>();
  /** The namespace each started process runs in, so that removePod() can end a pod's processes. */
  private readonly childNetns = new Map<ChildProcess, string>();
  /** The highest pod host byte ever given per node: addPodTo() never reuses the address of a removed pod. */
  private readonly lastHostByte = new Map<string, number>();

  private constructor(
    readonly prefix: string,
    readonly dualStack: boolean,
  ) {}

  /** Builds up to two nodes with their pods. Throws (after removing what it made) on any failure. */
  static create(prefix: string, nodes: NodeSpec[], options: TopologyOptions = {}): Topology {
    if (nodes.length < 1 || nodes.length > 2) throw new Error(`topology supports 1 or 2 nodes, got ${nodes.length}`);
    const topology = new Topology(prefix, options.dualStack ?? false);
    try {
      nodes.forEach((node, index) => topology.addNode(node, index + 1));
      if (nodes.length === 2) topology.linkNodes();
    } catch (error) {
      topology.destroy();
      throw error;
    }
    return topology;
  }

  pod(name: string): PodHandle {
    const pod = this.pods.get(name);
    if (!pod) throw new Error(`no pod named ${name} in the topology`);
    return pod;
  }

  node(name: string): NodeHandle {
    const node = this.nodes.get(name);
    if (!node) throw new Error(`no node named ${name} in the topology`);
    return node;
  }

  /**
   * Adds a pod to a running topology, as a container runtime would for a new pod: its namespace,
   * veth and addresses. Host bytes continue after the node's existing pods (at most 240 pods per node).
   */
  addPodTo(nodeName: string, spec: PodSpec): PodHandle {
    if (this.pods.has(spec.name)) throw new Error(`the topology already has a pod named ${spec.name}`);
    const node = this.node(nodeName);
    const nodeIndex = [...this.nodes.keys()].indexOf(nodeName) + 1;
    const used = [...this.pods.values()].filter((pod) => pod.node === nodeName).map((pod) => Number(pod.ip.split(".")[3] ?? 0));
    const hostByte = Math.max(9, this.lastHostByte.get(nodeName) ?? 0, ...used) + 1;
    if (hostByte > 250) throw new Error(`node ${nodeName} has no free pod address left`);
    this.addPod(nodeName, node.netns, nodeIndex, spec, hostByte);
    this.lastHostByte.set(nodeName, hostByte);
    return this.pod(spec.name);
  }

  /**
   * Removes a pod as a container runtime does when it is deleted. It ends the processes started in
   * its namespace, because the namespace lives on while one runs in it. Then it deletes the
   * namespace and its veth, and drops the node's neighbour entry for its IP.
   */
  removePod(name: string): void {
    const pod = this.pod(name);
    for (const [child, netns] of this.childNetns) {
      if (netns === pod.netns && child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    }
    run("ip", ["netns", "delete", pod.netns], { allowFail: true });
    this.exec(this.node(pod.node).netns, "ip", ["neigh", "flush", "to", pod.ip, "dev", "br0"], { allowFail: true });
    this.pods.delete(name);
  }

  /** Runs a command inside a namespace and waits for it. */
  exec(netns: string, command: string, args: string[], options: { input?: string; allowFail?: boolean } = {}): string {
    return run("ip", ["netns", "exec", netns, command, ...args], options);
  }

  /** Starts a long-running process inside a namespace; destroy() ends it if it is still running. */
  spawn(netns: string, command: string, args: string[], options: SpawnOptions = {}): ChildProcess {
    const child = spawn("nsenter", [`--net=/var/run/netns/${netns}`, "--", command, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      ...options,
    });
    // An unread pipe fills after 64 KiB and then blocks the child's writes (python's http.server
    // logs a line per request). Callers that read attach their listeners right after
    // this returns, before any data event is emitted.
    child.stdout?.resume();
    child.stderr?.resume();
    this.children.add(child);
    this.childNetns.set(child, netns);
    registerPid(this.prefix, child.pid);
    child.once("exit", () => {
      this.children.delete(child);
      this.childNetns.delete(child);
    });
    return child;
  }

  /** Ends the processes it started and removes every namespace (and so every veth and bridge) it made. */
  destroy(): void {
    for (const child of this.children) {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    }
    this.children.clear();
    this.childNetns.clear();
    removeNetnsWithPrefix(this.prefix);
    forgetRun(this.prefix);
  }

  private addNode(spec: NodeSpec, index: number): void {
    const netns = `${this.prefix}-${spec.name}`;
    const podCidr = `${POD_NETWORK}.${index}.0/24`;
    run("ip", ["netns", "add", netns]);
    this.exec(netns, "ip", ["link", "set", "lo", "up"]);
    this.exec(netns, "sysctl", ["-qw", "net.ipv4.ip_forward=1"]);
    // A bridge without an address of its own takes the lowest MAC among its ports, so adding or
    // deleting a pod can change the gateway's MAC. Once the port whose MAC the bridge had leaves,
    // frames that pods still send to that MAC are flooded to the other ports and never reach the
    // bridge. That lasts until the kernel probes the pods' neighbor entries again: with the default
    // timers (base_reachable_time 30 s) a reachable entry is used for 15 to 45 s before a probe.
    this.exec(netns, "ip", ["link", "add", "br0", "address", bridgeMac(index), "type", "bridge"]);
    this.exec(netns, "ip", ["addr", "add", `${POD_NETWORK}.${index}.1/24`, "dev", "br0"]);
    this.exec(netns, "ip", ["link", "set", "br0", "up"]);
    const linkIp = `10.200.0.${index}`;
    const node: NodeHandle = { name: spec.name, netns, linkInterface: "n-link", linkIp, podCidr };
    if (this.dualStack) {
      this.exec(netns, "sysctl", ["-qw", "net.ipv6.conf.all.forwarding=1"]);
      this.exec(netns, "ip", ["-6", "addr", "add", `${podPrefix6(index)}1/64`, "dev", "br0", "nodad"]);
      node.linkIp6 = `fd00:${POD_NETWORK.split(".")[1]}:ff::${index}`;
      node.podCidr6 = `${podPrefix6(index)}/64`;
    }
    this.nodes.set(spec.name, node);
    spec.pods.forEach((pod, podIndex) => this.addPod(spec.name, netns, index, pod, podIndex + 10));
  }

  private addPod(node: string, nodeNetns: string, nodeIndex: number, spec: PodSpec, hostByte: number): void {
    if (spec.ipv6Only && (!this.dualStack || spec.ipv6 === false)) {
      throw new Error(`pod ${spec.name} is IPv6-only, which needs a dual-stack topology and ipv6 not set to false`);
    }
    const netns = `${this.prefix}-${spec.name}`;
    const ip4 = `${POD_NETWORK}.${nodeIndex}.${hostByte}`;
    const hostSide = `v-${spec.name}`.slice(0, 15);
    run("ip", ["netns", "add", netns]);
    run("ip", ["link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", hostSide, "netns", nodeNetns]);
    this.exec(netns, "ip", ["link", "set", "lo", "up"]);
    if (!spec.ipv6Only) this.exec(netns, "ip", ["addr", "add", `${ip4}/24`, "dev", "eth0"]);
    this.exec(netns, "ip", ["link", "set", "eth0", "up"]);
    if (!spec.ipv6Only) this.exec(netns, "ip", ["route", "add", "default", "via", `${POD_NETWORK}.${nodeIndex}.1`]);
    this.exec(nodeNetns, "ip", ["link", "set", hostSide, "master", "br0"]);
    this.exec(nodeNetns, "ip", ["link", "set", hostSide, "up"]);
    const ip6 = this.dualStack && spec.ipv6 !== false ? `${podPrefix6(nodeIndex)}${hostByte}` : undefined;
    if (ip6 !== undefined) {
      this.exec(netns, "ip", ["-6", "addr", "add", `${ip6}/64`, "dev", "eth0", "nodad"]);
      this.exec(netns, "ip", ["-6", "route", "add", "default", "via", `${podPrefix6(nodeIndex)}1`]);
    }
    const ip = spec.ipv6Only && ip6 !== undefined ? ip6 : ip4;
    this.pods.set(spec.name, { ...spec, node, netns, ip, ip6 });
  }

  private linkNodes(): void {
    const [first, second] = [...this.nodes.values()];
    run("ip", ["link", "add", "n-link", "netns", first.netns, "type", "veth", "peer", "name", "n-link", "netns", second.netns]);
    for (const [self, other] of [[first, second], [second, first]] as const) {
      this.exec(self.netns, "ip", ["addr", "add", `${self.linkIp}/30`, "dev", "n-link"]);
      this.exec(self.netns, "ip", ["link", "set", "n-link", "up"]);
      this.exec(self.netns, "ip", ["route", "add", other.podCidr, "via", other.linkIp]);
      if (self.linkIp6 !== undefined && other.linkIp6 !== undefined && other.podCidr6 !== undefined) {
        this.exec(self.netns, "ip", ["-6", "addr", "add", `${self.linkIp6}/64`, "dev", "n-link", "nodad"]);
        this.exec(self.netns, "ip", ["-6", "route", "add", other.podCidr6, "via", other.linkIp6]);
      }
    }
  }
}
