// Runs the container of a rendered DaemonSet the way a kubelet and a container runtime would. A
// test can then check that the pod spec of a chart is enough for the agent, and that none of it is
// spare. The pod's network namespace is a harness node's namespace, the stand-in for the agent
// pod's own. The rest follows the pod spec:
//   - a mount namespace and a PID namespace, whose /proc shows only the container's processes. The
//     mounts are slaves of this machine's, so new netns pins reach the netns volume
//     (HostToContainer propagation), and nothing propagates back;
//   - a root filesystem made of this machine's, under an overlay whose upper layer is a tmpfs, so
//     mount points are made without touching the machine. The agent's installation is at
//     /opt/ambient-agent with its commands on PATH, as the image has them. The root is read-only
//     when readOnlyRootFilesystem is set;
//   - every volume at its mountPath: hostPath volumes bound from the host, ConfigMap and Secret
//     files, projected tokens and the service account's files written to the sandbox's folder and
//     bound read-only, emptyDir as tmpfs. The runtime's hardening then makes /sys, /proc/sys and
//     its read-only siblings read-only;
//   - the capabilities, user and no_new_privs of the securityContext, through setpriv;
//   - the command, args and env with $(VAR) expanded as the kubelet does, the downward API fields,
//     and KUBERNETES_SERVICE_HOST/PORT of the API server.
// The harness nodes are separate hosts of the emulated cluster but share this machine. So the
// hostPath volumes of kernel filesystems (procfs, bpffs, cgroup2 and the netns pins) are this
// machine's own, and every other host path lives under the node's folder (nodeRoot). The sandbox
// never binds or creates anything in this machine's /run/ambient-agent, /var/log or /etc/cni.
// Not emulated: seccomp and AppArmor profiles, resource limits, the container's cgroup, masked
// paths, and probes run by a kubelet (probeReadiness() runs the readiness probe when called).

import { execFile, spawn, type ChildProcess } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import type { IDaemonSet } from "kubernetes-models/apps/v1/DaemonSet";
import type { IConfigMap } from "kubernetes-models/v1/ConfigMap";
import type { IContainer } from "kubernetes-models/v1/Container";
import type { IKeyToPath } from "kubernetes-models/v1/KeyToPath";
import type { IPodSpec } from "kubernetes-models/v1/PodSpec";
import type { IVolume } from "kubernetes-models/v1/Volume";
import type { IVolumeMount } from "kubernetes-models/v1/VolumeMount";
import { FollowedAgent, REPO_ROOT } from "./agent-process";
import { registerPid } from "./pid-registry";

const execFileAsync = promisify(execFile);

/** Where the image installs the agent, and the commands it links onto PATH (as charts/image/Containerfile does). */
const IMAGE_INSTALL_DIR = "/opt/ambient-agent";
const IMAGE_COMMANDS: Record<string, string> = {
  "/usr/local/bin/ambient-agent": `${IMAGE_INSTALL_DIR}/dist/agent/cli/ambient-agent.js`,
  "/usr/local/bin/agentctl": `${IMAGE_INSTALL_DIR}/dist/agent/cli/agentctl.js`,
};
/** The image's ENTRYPOINT and environment (node:20-bookworm-slim sets PATH; the home of root is /root). */
const IMAGE_ENTRYPOINT = ["ambient-agent"];
const IMAGE_ENV: Record<string, string> = { PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", HOME: "/root" };

/** Where the kubelet mounts the service account's token, CA certificate and namespace. */
const SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount";

/**
 * Host paths that are kernel interfaces, the same for every harness node of this machine, and so
 * bound from the machine itself: procfs, bpffs, cgroup2 and the network namespace pins.
 */
const MACHINE_HOST_PATHS = ["/proc", "/sys/fs/bpf", "/sys/fs/cgroup", "/run/netns", "/var/run/netns"];

/** The paths a container runtime makes read-only inside the container's procfs (containerd's defaults). */
const RUNTIME_READONLY_PROC_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/** Capability numbers from linux/capability.h, by the name Kubernetes uses (without CAP_). */
const CAPABILITY_NUMBERS: Record<string, number> = {
  CHOWN: 0, DAC_OVERRIDE: 1, DAC_READ_SEARCH: 2, FOWNER: 3, FSETID: 4, KILL: 5, SETGID: 6, SETUID: 7, SETPCAP: 8,
  LINUX_IMMUTABLE: 9, NET_BIND_SERVICE: 10, NET_BROADCAST: 11, NET_ADMIN: 12, NET_RAW: 13, IPC_LOCK: 14, IPC_OWNER: 15,
  SYS_MODULE: 16, SYS_RAWIO: 17, SYS_CHROOT: 18, SYS_PTRACE: 19, SYS_PACCT: 20, SYS_ADMIN: 21, SYS_BOOT: 22, SYS_NICE: 23,
  SYS_RESOURCE: 24, SYS_TIME: 25, SYS_TTY_CONFIG: 26, MKNOD: 27, LEASE: 28, AUDIT_WRITE: 29, AUDIT_CONTROL: 30,
  SETFCAP: 31, MAC_OVERRIDE: 32, MAC_ADMIN: 33, SYSLOG: 34, WAKE_ALARM: 35, BLOCK_SUSPEND: 36, AUDIT_READ: 37,
  PERFMON: 38, BPF: 39, CHECKPOINT_RESTORE: 40,
};

/** The capabilities containerd and CRI-O give a container that drops none. */
const RUNTIME_DEFAULT_CAPABILITIES = [
  "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
];

/** A rendered Kubernetes object, as the Helm runner parses it. */
type RenderedObject = { kind?: string; metadata?: { name?: string } };

/** The API server that the pod's service account reaches, from inside the node's network namespace. */
export interface SandboxApiServer {
  host: string;
  port: number;
  /** The bearer token the server accepts, written as the service account's token. */
  token: string;
  /** PEM of the CA of the server's certificate, written as the service account's ca.crt. */
  caPem: string;
}

export interface PodSandboxOptions {
  /** The rendered DaemonSet whose pod template runs. */
  daemonSet: RenderedObject;
  /** The release's other rendered objects, which ConfigMap volumes are read from. */
  objects: readonly RenderedObject[];
  /** The harness node: its name is the pod's spec.nodeName, its namespace the pod's network namespace. */
  node: { name: string; netns: string };
  /**
   * The node's own filesystem: host paths other than kernel filesystems are bound from under it.
   * The sandboxes of one node share it, as the pods of one host share its disk.
   */
  nodeRoot: string;
  /** The files of each Secret volume, by Secret name: a folder whose file names are the Secret's keys. */
  secrets: Readonly<Record<string, string>>;
  apiServer: SandboxApiServer;
  /** Where the container's standard error is copied. Standard output goes to the same name with .stdout. */
  logFile: string;
  /** Prefix of the test run: names the sandbox's folder, and registers its launcher for the clean-up of a crashed run. */
  runPrefix: string;
}

/** One mount of the container, made inside its root after the pivot. */
type MountStep =
  | { kind: "bind"; source: string; target: string; file: boolean; readOnly: boolean; propagation: "rslave" | "rprivate" }
  | { kind: "tmpfs"; target: string; options: string };

/** A container of a DaemonSet's pod, running in its sandbox. */
export class PodSandbox {
  /** The container's process with its log lines. Its stop() and signal() reach the container's PID 1. */
  readonly agent: FollowedAgent;

  private constructor(
    readonly podName: string,
    private readonly container: IContainer,
    private readonly options: PodSandboxOptions,
    private readonly dir: string,
    private readonly launcher: ChildProcess,
    private readonly gracePeriodMs: number,
  ) {
    this.agent = new FollowedAgent({ node: options.node.name, logFile: options.logFile }, launcher, () => this.containerPid());
  }

  /**
   * Writes the pod's volumes and starts its container. Throws, naming the field, for a pod spec that
   * the sandbox cannot run as a runtime would: a privileged container, a volume type or env source
   * it does not emulate, or a hostPath that fails its type check.
   */
  static start(options: PodSandboxOptions): PodSandbox {
    const daemonSet = options.daemonSet as IDaemonSet;
    const podSpec = daemonSet.spec?.template.spec;
    if (podSpec === undefined) throw new Error(`DaemonSet ${daemonSet.metadata?.name} has no spec.template.spec`);
    const container = onlyContainer(daemonSet.metadata?.name ?? "", podSpec);
    const podName = `${daemonSet.metadata?.name}-${crypto.randomBytes(3).toString("hex").slice(0, 5)}`;
    const pod: PodIdentity = { name: podName, namespace: daemonSet.metadata?.namespace ?? "default", nodeName: options.node.name, serviceAccount: podSpec.serviceAccountName ?? "default" };
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `${options.runPrefix}-pod-`));
    try {
      for (const name of ["rootfs", "layer", "volumes"]) fs.mkdirSync(path.join(dir, name));
      const mounts = volumeMounts(podSpec, container, pod, options, path.join(dir, "volumes"));
      const env = kubeletEnv(container, pod, options.apiServer);
      const command = [...(container.command ?? IMAGE_ENTRYPOINT), ...(container.args ?? [])].map((word) => expandVariables(word, env));
      const script = sandboxScript(dir, mounts, container, podSpec);
      const launcher = spawn(
        "nsenter",
        [`--net=/var/run/netns/${options.node.netns}`, "--", "unshare", "--mount", "--propagation", "slave", "--pid", "--fork", "--kill-child", "--", "sh", "-c", script, "pod-sandbox", ...command],
        { stdio: ["ignore", "pipe", "pipe"], env: { ...IMAGE_ENV, HOSTNAME: podName, ...env } },
      );
      registerPid(options.runPrefix, launcher.pid);
      return new PodSandbox(podName, container, options, dir, launcher, (podSpec.terminationGracePeriodSeconds ?? 30) * 1000);
    } catch (error) {
      fs.rmSync(dir, { recursive: true, force: true });
      throw error;
    }
  }

  /**
   * Returns the host PID of the container's PID 1, the launcher's only child, or undefined before
   * the launcher forked. After the script's exec it is the agent.
   */
  containerPid(): number | undefined {
    const launcher = this.launcher.pid;
    if (launcher === undefined) return undefined;
    try {
      const children = fs.readFileSync(`/proc/${launcher}/task/${launcher}/children`, "utf8").trim();
      return children === "" ? undefined : Number(children.split(/\s+/)[0]);
    } catch {
      return undefined;
    }
  }

  /** Reads the effective capabilities of the container's PID 1 and returns them by Kubernetes name, sorted. */
  effectiveCapabilities(): string[] {
    return capabilityNames(BigInt(`0x${this.statusField("CapEff")}`));
  }

  /** Tells whether the container's PID 1 runs with no_new_privs, which allowPrivilegeEscalation: false requests. */
  noNewPrivileges(): boolean {
    return this.statusField("NoNewPrivs") === "1";
  }

  /** Returns a field of /proc/PID/status of the container's PID 1. */
  private statusField(name: string): string {
    const pid = this.containerPid();
    if (pid === undefined) throw new Error(`the container of pod ${this.podName} is not running`);
    const match = new RegExp(`^${name}:\\s*(\\S+)$`, "m").exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
    if (match === null) throw new Error(`no ${name} line in /proc/${pid}/status`);
    return match[1];
  }

  /**
   * Runs the container's readiness probe (an httpGet, its port resolved by name) from the pod's
   * network namespace, against 127.0.0.1, and returns the HTTP status, 0 when no response came.
   */
  async probeReadiness(): Promise<number> {
    const container = this.container;
    const probe = container.readinessProbe?.httpGet;
    if (probe === undefined) throw new Error(`the container of pod ${this.podName} has no readinessProbe.httpGet`);
    const port = typeof probe.port === "number" ? probe.port : container.ports?.find((entry) => entry.name === probe.port)?.containerPort;
    if (port === undefined) throw new Error(`readinessProbe.httpGet.port "${probe.port}" names no port of the container`);
    const url = `http://127.0.0.1:${port}${probe.path ?? "/"}`;
    const { stdout } = await execFileAsync("nsenter", [`--net=/var/run/netns/${this.options.node.netns}`, "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url]).catch(
      (error: { stdout?: string }) => ({ stdout: error.stdout ?? "0" }),
    );
    return Number(stdout.trim()) || 0;
  }

  /**
   * Stops the container with SIGTERM and waits, SIGKILL after `graceMs` (by default the pod's
   * terminationGracePeriodSeconds). The mount namespace and its mounts end with its last process,
   * and the sandbox's folder is removed.
   */
  async stop(graceMs = this.gracePeriodMs): Promise<void> {
    try {
      await this.agent.stop(graceMs);
    } finally {
      this.removeFolder();
    }
  }

  /** Kills the container at once and removes the sandbox's folder. */
  async kill(): Promise<void> {
    const pid = this.containerPid();
    try {
      await this.agent.kill();
    } finally {
      // The launcher's --kill-child ends the container too. This covers a container that lost that signal.
      if (pid !== undefined) killQuietly(pid);
      this.removeFolder();
    }
  }

  private removeFolder(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The pod's identity fields, for the downward API and the service account's namespace file. */
interface PodIdentity {
  name: string;
  namespace: string;
  nodeName: string;
  serviceAccount: string;
}

function onlyContainer(daemonSetName: string, podSpec: IPodSpec): IContainer {
  if ((podSpec.initContainers ?? []).length > 0) throw new Error(`DaemonSet ${daemonSetName} has init containers, which the pod sandbox does not run`);
  if (podSpec.containers.length !== 1) throw new Error(`DaemonSet ${daemonSetName} has ${podSpec.containers.length} containers, but the pod sandbox runs exactly one`);
  return podSpec.containers[0];
}

/**
 * Returns the capabilities the runtime gives the container: its defaults, or none after
 * drop [ALL], less `drop`, plus `add`. Names are as Kubernetes writes them, without CAP_.
 */
export function containerCapabilities(container: IContainer): string[] {
  const capabilities = container.securityContext?.capabilities;
  const drop = (capabilities?.drop ?? []).map(capabilityName);
  let result = drop.includes("ALL") ? [] : RUNTIME_DEFAULT_CAPABILITIES.filter((name) => !drop.includes(name));
  result = [...new Set([...result, ...(capabilities?.add ?? []).map(capabilityName)])];
  for (const name of result) {
    if (CAPABILITY_NUMBERS[name] === undefined) throw new Error(`unknown capability "${name}" in the securityContext: use a name from capabilities(7) without CAP_`);
  }
  return result.sort();
}

function capabilityName(name: string): string {
  return name.toUpperCase().replace(/^CAP_/, "");
}

function capabilityNames(mask: bigint): string[] {
  return Object.entries(CAPABILITY_NUMBERS)
    .filter(([, bit]) => (mask & (1n << BigInt(bit))) !== 0n)
    .map(([name]) => name)
    .sort();
}

/**
 * Returns the setpriv arguments that give a process run as root what the runtime gives the
 * container: exactly `capabilities` as bounding set (and so as permitted and effective set after
 * exec), no inheritable or ambient capabilities, and no_new_privs when `noNewPrivileges`.
 */
export function setprivArguments(capabilities: readonly string[], noNewPrivileges: boolean): string[] {
  const bounding = ["-all", ...capabilities.map((name) => `+${name.toLowerCase()}`)].join(",");
  return [...(noNewPrivileges ? ["--no-new-privs"] : []), "--inh-caps=-all", "--ambient-caps=-all", `--bounding-set=${bounding}`];
}

/**
 * Returns the variables the kubelet sets, which $(VAR) references may name: the API server's
 * service variables, then the container's env in order. The image's own variables come before them.
 */
function kubeletEnv(container: IContainer, pod: PodIdentity, api: SandboxApiServer): Record<string, string> {
  const env: Record<string, string> = {
    KUBERNETES_SERVICE_HOST: api.host,
    KUBERNETES_SERVICE_PORT: String(api.port),
  };
  if ((container.envFrom ?? []).length > 0) throw new Error(`container ${container.name} uses envFrom, which the pod sandbox does not support`);
  for (const entry of container.env ?? []) {
    if (entry.valueFrom === undefined) {
      env[entry.name] = expandVariables(entry.value ?? "", env);
      continue;
    }
    const fieldPath = entry.valueFrom.fieldRef?.fieldPath;
    if (fieldPath === undefined) throw new Error(`env ${entry.name} of container ${container.name}: only valueFrom.fieldRef is supported by the pod sandbox`);
    env[entry.name] = downwardField(fieldPath, pod);
  }
  return env;
}

function downwardField(fieldPath: string, pod: PodIdentity): string {
  const fields: Record<string, string> = {
    "metadata.name": pod.name,
    "metadata.namespace": pod.namespace,
    "spec.nodeName": pod.nodeName,
    "spec.serviceAccountName": pod.serviceAccount,
  };
  const value = fields[fieldPath];
  if (value === undefined) throw new Error(`fieldRef ${fieldPath} is not supported by the pod sandbox: use one of ${Object.keys(fields).join(", ")}`);
  return value;
}

/**
 * Expands $(VAR) references as the kubelet does in command, args and env values: a defined VAR
 * is replaced, $$ gives a literal $, and any other reference stays as written.
 */
function expandVariables(text: string, env: Readonly<Record<string, string>>): string {
  return text.replace(/\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)/g, (match, name: string | undefined) => {
    if (name === undefined) return "$";
    return env[name] ?? match;
  });
}

/**
 * Prepares every volume mount of the container, and the service account's files when the pod
 * mounts them, sorted by depth so that a mount never hides a deeper one (as containerd sorts them).
 */
function volumeMounts(podSpec: IPodSpec, container: IContainer, pod: PodIdentity, options: PodSandboxOptions, volumesDir: string): MountStep[] {
  const mounts: MountStep[] = [];
  for (const mount of container.volumeMounts ?? []) {
    const volume = (podSpec.volumes ?? []).find((entry) => entry.name === mount.name);
    if (volume === undefined) throw new Error(`volumeMount ${mount.name} of container ${container.name} names no volume of the pod`);
    mounts.push(volumeMount(volume, mount, options, path.join(volumesDir, volume.name)));
  }
  if (podSpec.automountServiceAccountToken !== false && !mounts.some((mount) => mount.target === SERVICE_ACCOUNT_DIR)) {
    const dir = path.join(volumesDir, "kube-api-access");
    writeFiles(dir, { token: options.apiServer.token, "ca.crt": options.apiServer.caPem, namespace: pod.namespace });
    mounts.push({ kind: "bind", source: dir, target: SERVICE_ACCOUNT_DIR, file: false, readOnly: true, propagation: "rprivate" });
  }
  const depth = (target: string): number => target.split("/").filter(Boolean).length;
  return mounts.sort((a, b) => depth(a.target) - depth(b.target));
}

function volumeMount(volume: IVolume, mount: IVolumeMount, options: PodSandboxOptions, dir: string): MountStep {
  if (!path.isAbsolute(mount.mountPath)) throw new Error(`volumeMount ${mount.name}: mountPath "${mount.mountPath}" is not absolute`);
  if (mount.mountPropagation === "Bidirectional") throw new Error(`volumeMount ${mount.name}: Bidirectional propagation needs a privileged container`);
  const propagation = mount.mountPropagation === "HostToContainer" ? "rslave" : "rprivate";
  if (volume.emptyDir !== undefined) return { kind: "tmpfs", target: mount.mountPath, options: "nosuid,nodev,mode=777" };
  let source: string;
  let readOnly = true;
  if (volume.hostPath !== undefined) {
    source = hostPathSource(volume.name, volume.hostPath.path, volume.hostPath.type ?? "", options.nodeRoot);
    readOnly = mount.readOnly ?? false;
  } else if (volume.configMap !== undefined) {
    writeFiles(dir, keyFiles(configMapData(volume.configMap.name ?? "", options.objects), volume.configMap.items, `ConfigMap ${volume.configMap.name}`));
    source = dir;
  } else if (volume.secret !== undefined) {
    writeFiles(dir, keyFiles(secretData(volume.secret.secretName ?? "", options.secrets), volume.secret.items, `Secret ${volume.secret.secretName}`));
    source = dir;
  } else if (volume.projected !== undefined) {
    writeFiles(dir, projectedFiles(volume, options));
    source = dir;
  } else {
    throw new Error(`volume ${volume.name} is of a type the pod sandbox does not support: use hostPath, configMap, secret, projected or emptyDir`);
  }
  if (mount.subPath) source = path.join(source, mount.subPath);
  if (!fs.existsSync(source)) throw new Error(`volumeMount ${mount.name}: ${source} does not exist (subPath "${mount.subPath ?? ""}")`);
  return { kind: "bind", source: fs.realpathSync(source), target: mount.mountPath, file: !fs.statSync(source).isDirectory(), readOnly, propagation };
}

/**
 * Returns the folder on this machine that a hostPath volume binds: the machine's own for kernel
 * filesystems, else the path under the node's folder. Checks `type` as the kubelet does and makes
 * a DirectoryOrCreate folder.
 */
function hostPathSource(volume: string, hostPath: string, type: string, nodeRoot: string): string {
  if (!path.isAbsolute(hostPath)) throw new Error(`hostPath volume ${volume}: path "${hostPath}" is not absolute`);
  const onMachine = MACHINE_HOST_PATHS.some((prefix) => hostPath === prefix || hostPath.startsWith(`${prefix}/`));
  const source = onMachine ? hostPath : path.join(nodeRoot, hostPath);
  if (type === "DirectoryOrCreate" && !onMachine) fs.mkdirSync(source, { recursive: true });
  const stat = fs.statSync(source, { throwIfNoEntry: false });
  if (onMachine && stat === undefined) throw new Error(`hostPath volume ${volume}: this machine has no ${source}, and the sandbox binds kernel filesystems as they are, never creating them`);
  if (type.startsWith("Directory") && !stat?.isDirectory()) throw new Error(`hostPath volume ${volume}: ${source} is not a directory (type ${type})`);
  if (type === "File" && !stat?.isFile()) throw new Error(`hostPath volume ${volume}: ${source} is not a file (type File)`);
  if (stat === undefined) throw new Error(`hostPath volume ${volume}: ${source} does not exist: give the volume type DirectoryOrCreate or make it first`);
  return source;
}

function configMapData(name: string, objects: readonly RenderedObject[]): Record<string, string | Buffer> {
  const configMap = objects.find((object) => object.kind === "ConfigMap" && object.metadata?.name === name) as IConfigMap | undefined;
  if (configMap === undefined) throw new Error(`ConfigMap ${name} is not among the rendered objects`);
  const binary = Object.fromEntries(Object.entries(configMap.binaryData ?? {}).map(([key, value]) => [key, Buffer.from(value, "base64")]));
  return { ...configMap.data, ...binary };
}

function secretData(name: string, secrets: Readonly<Record<string, string>>): Record<string, Buffer> {
  const folder = secrets[name];
  if (folder === undefined) throw new Error(`Secret ${name} has no folder among the sandbox's secrets (${Object.keys(secrets).join(", ") || "none"})`);
  const entries = fs.readdirSync(folder, { withFileTypes: true }).filter((entry) => entry.isFile());
  return Object.fromEntries(entries.map((entry) => [entry.name, fs.readFileSync(path.join(folder, entry.name))]));
}

/** Maps a ConfigMap's or Secret's keys to file names: every key, or only `items` with their paths. */
function keyFiles(data: Record<string, string | Buffer>, items: IKeyToPath[] | undefined, what: string): Record<string, string | Buffer> {
  if (items === undefined) return data;
  const files: Record<string, string | Buffer> = {};
  for (const item of items) {
    if (data[item.key] === undefined) throw new Error(`${what} has no key ${item.key}`);
    files[item.path] = data[item.key];
  }
  return files;
}

/** Returns the files of a projected volume. Of its sources, the sandbox writes service account tokens and ConfigMaps. */
function projectedFiles(volume: IVolume, options: PodSandboxOptions): Record<string, string | Buffer> {
  const files: Record<string, string | Buffer> = {};
  for (const source of volume.projected?.sources ?? []) {
    if (source.serviceAccountToken !== undefined) files[source.serviceAccountToken.path] = options.apiServer.token;
    else if (source.configMap !== undefined) Object.assign(files, keyFiles(configMapData(source.configMap.name ?? "", options.objects), source.configMap.items, `ConfigMap ${source.configMap.name}`));
    else throw new Error(`projected volume ${volume.name} has a source the pod sandbox does not support: use serviceAccountToken or configMap`);
  }
  return files;
}

function writeFiles(dir: string, files: Record<string, string | Buffer>): void {
  for (const [name, content] of Object.entries(files)) {
    const file = path.join(dir, name);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, content, { mode: 0o644 });
  }
}

/**
 * Writes the shell script that the launcher runs as the container's PID 1 before it becomes the
 * container's command. The script builds the root filesystem and pivots into it. The machine's
 * root stays reachable under /.host until the mounts are made, so every target resolves inside the
 * new root and every source outside it. Then it mounts what the pod spec lists, hardens /proc and
 * /sys, and execs setpriv with the container's capabilities.
 */
function sandboxScript(dir: string, mounts: readonly MountStep[], container: IContainer, podSpec: IPodSpec): string {
  const security = container.securityContext ?? {};
  if (security.privileged) throw new Error(`container ${container.name} is privileged, but the pod sandbox emulates unprivileged containers only`);
  const user = security.runAsUser ?? podSpec.securityContext?.runAsUser ?? 0;
  const group = security.runAsGroup ?? podSpec.securityContext?.runAsGroup ?? 0;
  const layer = path.join(dir, "layer");
  const rootfs = path.join(dir, "rootfs");
  const lines = [
    "set -eu",
    `mount -t tmpfs -o mode=755 pod-sandbox ${quote(layer)}`,
    `mkdir ${quote(`${layer}/upper`)} ${quote(`${layer}/work`)}`,
    `mount -t overlay -o ${quote(`lowerdir=/,upperdir=${layer}/upper,workdir=${layer}/work`)} pod-sandbox ${quote(rootfs)}`,
    `mkdir ${quote(`${rootfs}/.host`)}`,
    `cd ${quote(rootfs)}`,
    "pivot_root . .host",
    "cd /",
    ...imageLines(),
    ...runtimeLines(),
    ...mounts.flatMap(mountLines),
    ...RUNTIME_READONLY_PROC_PATHS.map((target) => `if [ -e ${target} ]; then mount --bind ${target} ${target}; mount -o remount,bind,ro ${target}; fi`),
    "umount -l /.host",
    "rmdir /.host",
    ...(security.readOnlyRootFilesystem ? ["mount -o remount,bind,ro /"] : []),
    `cd ${quote(container.workingDir ?? "/")}`,
    [
      "exec setpriv",
      ...setprivArguments(containerCapabilities(container), security.allowPrivilegeEscalation === false),
      `--reuid=${user}`,
      `--regid=${group}`,
      "--clear-groups",
      '-- "$@"',
    ].join(" "),
  ];
  return lines.join("\n");
}

/** Installs the agent as the image does: this checkout, read-only, at /opt/ambient-agent, with its commands on PATH. */
function imageLines(): string[] {
  return [
    `mkdir -p ${IMAGE_INSTALL_DIR}`,
    `mount --rbind ${quote(`/.host${fs.realpathSync(REPO_ROOT)}`)} ${IMAGE_INSTALL_DIR}`,
    `mount -o remount,bind,ro ${IMAGE_INSTALL_DIR}`,
    ...Object.entries(IMAGE_COMMANDS).map(([link, target]) => `ln -sf ${quote(target)} ${quote(link)}`),
  ];
}

/**
 * Returns the lines of the mounts every container gets before its volumes: its own procfs (the new
 * PID namespace's), a tmpfs /dev with the usual devices, /dev/shm, and a read-only sysfs (of the
 * pod's network namespace).
 */
function runtimeLines(): string[] {
  return [
    "mount -t proc -o nosuid,nodev,noexec proc /proc",
    "mount -t tmpfs -o nosuid,mode=755,size=65536k tmpfs /dev",
    "for device in null zero full random urandom tty; do touch /dev/$device; mount --bind /.host/dev/$device /dev/$device; done",
    "ln -s /proc/self/fd /dev/fd",
    "mkdir /dev/shm",
    "mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=65536k shm /dev/shm",
    "mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys",
  ];
}

/** Returns the shell lines of one mount. Bind sources are the machine's paths, reached under /.host. */
function mountLines(mount: MountStep): string[] {
  const target = quote(mount.target);
  if (mount.kind === "tmpfs") return [`mkdir -p ${target}`, `mount -t tmpfs -o ${mount.options} tmpfs ${target}`];
  const lines = mount.file ? [`mkdir -p ${quote(path.dirname(mount.target))}`, `touch ${target}`] : [`mkdir -p ${target}`];
  lines.push(`mount --rbind ${quote(`/.host${mount.source}`)} ${target}`, `mount --make-${mount.propagation} ${target}`);
  if (mount.readOnly) lines.push(`mount -o remount,bind,ro ${target}`);
  return lines;
}

function quote(word: string): string {
  return `'${word.replaceAll("'", `'\\''`)}'`;
}

function killQuietly(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // The process is gone already.
  }
}
