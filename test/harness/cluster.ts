// A whole test cluster on one machine: the namespace topology, an embedded CA, manifest files and
// one real agent process per node. Used by the end-to-end tests and by the demo.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { LOCK_DIRECTORY, lockFileHolder, lockFileOf } from "../../agent/capture/pin-lock";
import { AGENTCTL_BIN, AgentProcess } from "./agent-process";
import { endLeftoverProcesses, ownedByLiveRun, registerPid } from "./pid-registry";
import { namespaceYaml, podsYaml, writeManifest, type NamespaceSpec } from "./manifests";
import { removeNftState } from "./nft-state";
import { listNetns, run, Topology, type NodeSpec } from "./topology";
import { parseAllDocuments } from "yaml";
import { FakeKubeApi, type KubeObject } from "./fake-kube-api";

export const PIN_PARENT = "/sys/fs/bpf/ambient-agent";

export interface ClusterOptions {
  /** Prefix of every namespace, pin folder and file of this cluster, unique per run. */
  prefix: string;
  nodes: NodeSpec[];
  namespaces: NamespaceSpec[];
  /** Extra manifest files (name → YAML), such as policies. */
  extraManifests?: Record<string, string>;
  /** Folder for the CA, manifests, audit files and logs; a new temporary folder by default. */
  workDir?: string;
  /** More `ambient-agent run` options for every agent, such as ["--drain-timeout", "2"]. */
  agentArgs?: string[];
  /** Log level of every agent; "debug" when absent. */
  agentLogLevel?: string;
  /** Gives pods, bridges and the node link IPv6 addresses as well (see TopologyOptions). */
  dualStack?: boolean;
}

/** Port of the fake API server inside each node's namespace, on its loopback address. */
export const KUBE_API_PORT = 6443;

/** Checks what the end-to-end harness needs and throws one message naming everything that is missing. */
export function assertHostCapable(): void {
  const problems: string[] = [];
  if (process.getuid?.() !== 0) problems.push("not running as root: run the tests as root (sudo make test)");
  const mounts = fs.readFileSync("/proc/mounts", "utf8");
  if (!/ \/sys\/fs\/bpf bpf /.test(mounts)) problems.push("bpffs is not mounted at /sys/fs/bpf: run `make host` or `mount -t bpf bpf /sys/fs/bpf`");
  if (!/ cgroup2 /.test(mounts)) problems.push("no cgroup v2 hierarchy is mounted: mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)");
  for (const tool of ["ip", "nsenter", "curl", "python3", "tcpdump", "tshark"]) {
    try {
      execFileSync("sh", ["-c", `command -v ${tool}`], { stdio: "ignore" });
    } catch {
      problems.push(`${tool} is not installed: run \`make setup\``);
    }
  }
  if (problems.length > 0) throw new Error("the end-to-end harness cannot run here:\n  - " + problems.join("\n  - "));
}

/**
 * Removes what a crashed run with the same prefix family left: processes, namespaces and pinned
 * capture. What belongs to a run whose test process still runs is left alone.
 */
export function removeLeftovers(prefixFamily: string): void {
  endLeftoverProcesses(prefixFamily);
  for (const name of listNetns()) {
    if (name.startsWith(prefixFamily) && !ownedByLiveRun(name, prefixFamily)) run("ip", ["netns", "del", name], { allowFail: true });
  }
  removeStaleLocks(prefixFamily);
  if (!fs.existsSync(PIN_PARENT)) return;
  for (const name of fs.readdirSync(PIN_PARENT)) {
    if (name.startsWith(prefixFamily) && !ownedByLiveRun(name, prefixFamily)) fs.rmSync(path.join(PIN_PARENT, name), { recursive: true, force: true });
  }
}

/**
 * Deletes the pin-root lock files of a crashed run's agents. The kernel released their flock locks
 * when the agents died, and an agent reuses such a file anyway. Deleting them keeps
 * /run/ambient-agent from filling up.
 */
function removeStaleLocks(prefixFamily: string): void {
  if (!fs.existsSync(LOCK_DIRECTORY)) return;
  const marker = lockFileOf(path.join(PIN_PARENT, prefixFamily)).slice(LOCK_DIRECTORY.length + 1, -".pid".length);
  for (const name of fs.readdirSync(LOCK_DIRECTORY)) {
    if (!name.startsWith(marker)) continue;
    const file = path.join(LOCK_DIRECTORY, name);
    if (lockFileHolder(file) === undefined) fs.rmSync(file, { force: true });
  }
}

export class Cluster {
  readonly agents = new Map<string, AgentProcess>();
  /** Called with the PID of every agent started after this is set, for cleanup checks. */
  onAgentSpawned: ((pid: number) => void) | undefined;
  readonly manifestsDir: string;
  readonly caDir: string;
  /**
   * The fake Kubernetes API server of a cluster made with createWithApi(); its agents read the
   * configuration from it instead of the manifest folder.
   */
  kube: FakeKubeApi | undefined;

  private constructor(
    readonly options: ClusterOptions,
    readonly topology: Topology,
    readonly workDir: string,
  ) {
    this.manifestsDir = path.join(workDir, "manifests");
    this.caDir = path.join(workDir, "ca");
  }

  /** Builds the topology, the CA and the manifests; agents start with startAgents(). */
  static create(options: ClusterOptions): Cluster {
    const workDir = options.workDir ?? fs.mkdtempSync(path.join(os.tmpdir(), `${options.prefix}-`));
    fs.mkdirSync(workDir, { recursive: true });
    const topology = Topology.create(options.prefix, options.nodes, { dualStack: options.dualStack });
    const cluster = new Cluster(options, topology, workDir);
    try {
      fs.mkdirSync(cluster.manifestsDir, { recursive: true });
      execFileSync(process.execPath, [AGENTCTL_BIN, "ca", "init", "--dir", cluster.caDir, "--force"], { stdio: "pipe" });
      writeManifest(cluster.manifestsDir, "namespaces.yaml", options.namespaces.map(namespaceYaml).join("---\n"));
      writeManifest(cluster.manifestsDir, "pods.yaml", podsYaml(topology));
      for (const [name, content] of Object.entries(options.extraManifests ?? {})) {
        writeManifest(cluster.manifestsDir, name, content);
      }
    } catch (error) {
      topology.destroy();
      throw error;
    }
    return cluster;
  }

  /**
   * Builds the cluster as create() does, then starts a fake Kubernetes API server (HTTPS with a
   * token) that listens on 127.0.0.1:6443 inside every node's namespace and serves the cluster's
   * namespaces, pods and extra manifests. Agents then run with --kubeconfig.
   */
  static async createWithApi(options: ClusterOptions): Promise<Cluster> {
    const cluster = Cluster.create(options);
    try {
      const api = await FakeKubeApi.start({ tls: true, token: `token-${options.prefix}`, bookmarkIntervalMs: 5_000 });
      cluster.kube = api;
      for (const node of cluster.topology.nodes.keys()) {
        const url = await api.listenInNetns(`/var/run/netns/${cluster.topology.node(node).netns}`, "127.0.0.1", KUBE_API_PORT);
        api.writeKubeconfig(cluster.kubeconfig(node), url);
      }
      for (const file of fs.readdirSync(cluster.manifestsDir).sort()) {
        for (const object of manifestObjects(fs.readFileSync(path.join(cluster.manifestsDir, file), "utf8"))) api.put(object);
      }
    } catch (error) {
      await cluster.destroy();
      throw error;
    }
    return cluster;
  }

  /** Kubeconfig of a node's agent in a cluster made with createWithApi(). */
  kubeconfig(node: string): string {
    return path.join(this.workDir, `kubeconfig-${node}`);
  }

  pinRoot(node: string): string {
    return path.join(PIN_PARENT, `${this.options.prefix}-${node}`);
  }

  auditFile(node: string): string {
    return path.join(this.workDir, `audit-${node}.jsonl`);
  }

  spoolDir(node: string): string {
    return path.join(this.workDir, `spool-${node}`);
  }

  logFile(node: string): string {
    return path.join(this.workDir, `agent-${node}.log`);
  }

  /**
   * Starts one agent per node and waits until each is ready and has enrolled its ambient pods.
   * `onSpawned` receives the agents' PIDs before the wait, so a caller can record them for a later cleanup.
   */
  async startAgents(expectedEnrolled: string[] = [], onSpawned?: (pids: number[]) => void): Promise<void> {
    for (const node of this.topology.nodes.keys()) this.spawnAgent(node);
    onSpawned?.([...this.agents.values()].flatMap((agent) => (agent.pid ? [agent.pid] : [])));
    await Promise.all([...this.agents.values()].map((agent) => agent.waitReady()));
    await this.waitEnrolled(expectedEnrolled);
  }

  /**
   * Starts a new agent for `node` in place of the one before (which must have exited). `agentArgs`,
   * when given, replaces the cluster's agentArgs for this agent only.
   */
  async restartAgent(node: string, expectedEnrolled: string[] = [], agentArgs?: string[]): Promise<AgentProcess> {
    if (this.agents.get(node)?.running) throw new Error(`the agent of ${node} is still running`);
    const agent = this.spawnAgent(node, agentArgs ?? this.options.agentArgs);
    await agent.waitReady();
    await this.waitEnrolled(expectedEnrolled);
    return agent;
  }

  /** Waits until the agent of each pod's node has enrolled it. */
  async waitEnrolled(pods: string[], fromLine?: (node: string) => number): Promise<void> {
    for (const podName of pods) {
      const pod = this.topology.pod(podName);
      await this.agent(pod.node).waitEnrolled(`${pod.namespace}/${pod.name}`, 15_000, fromLine?.(pod.node));
    }
  }

  private spawnAgent(node: string, agentArgs = this.options.agentArgs): AgentProcess {
    const agent = new AgentProcess({
      node,
      nodeNetns: this.topology.node(node).netns,
      manifestsDir: this.manifestsDir,
      kubeconfig: this.kube ? this.kubeconfig(node) : undefined,
      caDir: this.caDir,
      auditFile: this.auditFile(node),
      spoolDir: this.spoolDir(node),
      pinRoot: this.pinRoot(node),
      logFile: this.logFile(node),
      extraArgs: agentArgs,
      logLevel: this.options.agentLogLevel,
    });
    this.agents.set(node, agent);
    registerPid(this.options.prefix, agent.pid);
    if (agent.pid) this.onAgentSpawned?.(agent.pid);
    return agent;
  }

  agent(node: string): AgentProcess {
    const agent = this.agents.get(node);
    if (!agent) throw new Error(`no agent for node ${node}`);
    return agent;
  }

  /**
   * Reads the audit records of one type that a node's agent has written so far: by default the
   * completion record of each connection, "*" for every record.
   */
  auditRecords(node: string, type = "connection.completed"): Record<string, any>[] {
    const file = this.auditFile(node);
    if (!fs.existsSync(file)) return [];
    return fs
      .readFileSync(file, "utf8")
      .split("\n")
      .filter((line) => line.trim() !== "")
      .map((line) => JSON.parse(line))
      .filter((record) => type === "*" || record.type === type);
  }

  /** Waits until `predicate` holds for some audit record of `node` of the given type ("*" for any). */
  async waitForAudit(
    node: string,
    predicate: (record: Record<string, any>) => boolean,
    timeoutMs = 10_000,
    type = "connection.completed",
  ): Promise<Record<string, any>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.auditRecords(node, type).find(predicate);
      if (found) return found;
      if (Date.now() > deadline) {
        throw new Error(`no matching audit record on ${node} within ${timeoutMs} ms; records:\n${JSON.stringify(this.auditRecords(node, type), null, 1)}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  /** Returns the lock files of this cluster's agents, which a killed agent leaves behind. */
  lockFiles(): string[] {
    return [...this.topology.nodes.keys()].flatMap((node) => [
      lockFileOf(this.pinRoot(node)),
      path.join(LOCK_DIRECTORY, `node-${node}.pid`),
      lockFileOf(this.spoolDir(node)),
      lockFileOf(this.auditFile(node)),
    ]);
  }

  /** Removes lock files that no process holds; a live holder keeps its lock. */
  private removeStaleLocks(): void {
    for (const file of this.lockFiles()) {
      if (lockFileHolder(file) === undefined) fs.rmSync(file, { force: true });
    }
  }

  /** Stops the agents, removes their pinned capture, and removes every namespace; keeps the work folder. */
  async destroy(options: { removeWorkDir?: boolean } = {}): Promise<void> {
    await Promise.all([...this.agents.values()].map((agent) => agent.stop().catch(() => agent.kill())));
    for (const node of this.topology.nodes.keys()) {
      try {
        execFileSync(process.execPath, [AGENTCTL_BIN, "capture", "remove", "--pin-root", this.pinRoot(node)], { stdio: "pipe" });
      } catch {
        fs.rmSync(this.pinRoot(node), { recursive: true, force: true });
      }
    }
    await this.kube?.stop();
    // The agents' list of enrolled pods, which lives next to their locks.
    for (const node of this.topology.nodes.keys()) fs.rmSync(path.join(LOCK_DIRECTORY, `enrolled-${node}.json`), { force: true });
    this.topology.destroy();
    // nftables capture keeps a state folder per node; its tables went with the namespaces.
    removeNftState(this.topology.nodes.keys());
    this.removeStaleLocks();
    if (options.removeWorkDir) fs.rmSync(this.workDir, { recursive: true, force: true });
  }
}

/** Reads the objects of a YAML manifest, unpacking a `kind: List`. */
function manifestObjects(text: string): KubeObject[] {
  const objects: KubeObject[] = [];
  for (const document of parseAllDocuments(text)) {
    const value = document.toJS() as KubeObject | null;
    if (value === null || value === undefined) continue;
    if ((value as { kind?: unknown }).kind === "List") objects.push(...((value as { items?: KubeObject[] }).items ?? []));
    else objects.push(value);
  }
  return objects;
}
