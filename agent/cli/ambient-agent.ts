#!/usr/bin/env -S node --single-threaded-gc --max-semi-space-size=2
// ambient-agent: the node agent. `ambient-agent run --node NAME --manifests DIR --ca-dir DIR [--audit-file PATH]`.

import path from "node:path";
import { parseArgs } from "node:util";
import { parseAddress } from "../admin/server";
import { canonicalPinRoot } from "../capture/pin-lock";
import { isCgroup2Directory } from "../capture/preflight";
import { parseCaptureMode } from "../capture/probe";
import { Agent, HostNotReadyError, type AgentOptions } from "../daemon";
import { DEFAULT_HOST_PROC } from "../enroll/netns";
import { createLogger, parseLogLevels, type Logger } from "../log";
import { parseLogFormat, type LogFormat } from "../log-format";
import { parseDaemonSetRef } from "../uninstall";
import { handleHangups, idleUntilSignal, stopAgent, type StopCause } from "./agent-stop";
import { withConfigFile } from "./config-file";
import { AGENT_NODE_FLAGS, runsWithAgentFlags } from "./node-flags";
import { IDENTITY_FLAGS, IDENTITY_USAGE, parseIdentityFlags } from "./identity-flags";
import { AUDIT_FLAGS, AUDIT_USAGE, parseAuditFlags, type AuditFlagValues } from "./audit-flags";
import { LIMIT_FLAGS, LIMIT_USAGE } from "./limit-flags";
import { parseLimitFlags } from "../proxy/limits";
import { parseProbeSources } from "./probe-sources";
import type { CniSettings } from "../cni/setup";
import type { KubeCredentials } from "../discovery/kube-credentials";

const USAGE = `usage: ambient-agent run --node NAME (--manifests DIR | --kubernetes [--kubeconfig FILE])
                         (--ca-dir DIR | --ca-address HOST:PORT --ca-root-cert FILE) [options]

  --config FILE        YAML file of options, read once at start: a mapping from long option names
                       without the dashes to values, for example "kubernetes: true",
                       "excluded-namespaces: [kube-system, ambient-agent]" or "cni-timeout: 30".
                       Switches take true or false. False gives the no- form of a switch that
                       has one ("transparent-source: false" is --no-transparent-source) and, for
                       other switches, counts as not given. Repeatable and comma-separated options
                       take a list. An option on the command line replaces the file's value
  --node NAME          this node's name; pods whose spec.nodeName equals it are served
  --manifests DIR      folder of Kubernetes YAML (Namespace, Pod, Service, EndpointSlice,
                       AuthorizationPolicy, PeerAuthentication), re-read when it changes
  --kubernetes         read the same kinds from the Kubernetes API server (list and watch), with the
                       pod's service account (in-cluster) unless --kubeconfig is given
  --kubeconfig FILE    kubeconfig file for the API server; implies --kubernetes
  --daemonset NAMESPACE/NAME
                       the DaemonSet that runs this agent (needs --kubernetes), watched from
                       start. At SIGTERM or SIGINT the agent reads it (2 s timeout). Being deleted,
                       or the API server's NotFound for a DaemonSet the watch saw before, means an
                       uninstall: the agent removes its CNI plugin entry, every pod's enrolment and
                       its pinned capture. Found without deletionTimestamp means a restart. When
                       the read fails (401, 403, 5xx, another 404, no answer), a DELETED event or
                       deletionTimestamp that the watch saw for the same uid means an uninstall;
                       without one, capture stays pinned
  --excluded-namespaces NS[,NS...]
                       namespaces whose pods are never enrolled, even when labelled
                       istio.io/dataplane-mode=ambient (default kube-system; "none" for no exclusion)
  --cni-conf-dir DIR   chain the agent's CNI plugin into the node's CNI configuration in DIR (for
                       example /etc/cni/net.d), so that a new pod waits until its capture is in
                       place; off when absent
  --cni-bin-dir DIR    folder the container runtime runs CNI plugins from (default /opt/cni/bin)
  --cni-socket PATH    unix socket the plugin reaches the agent on (default /var/run/ambient-agent/cni.sock)
  --cni-timeout SECONDS
                       how long the plugin waits for the agent before it fails the pod's sandbox,
                       which the kubelet then retries (default 30)
${IDENTITY_USAGE}${AUDIT_USAGE}${LIMIT_USAGE}  --pin-root DIR       bpffs folder for this node's maps and links (default /sys/fs/bpf/ambient-agent/NODE)
  --cgroup PATH        cgroup v2 root to attach to (default /sys/fs/cgroup). When PATH is not cgroup v2 but
                       PATH/unified is, as on hybrid cgroup hosts, the agent attaches there and logs it
  --host-proc DIR      the host's /proc as mounted where the agent runs (default /proc; in a pod, for
                       example /host/proc): the host's processes, their network namespaces, a
                       CNI_NETNS under /proc/, and every per-pod sysctl the agent writes
  --host-netns PATH    the host's network namespace, where --probe-snat writes its nftables table
                       (default DIR/1/ns/net of --host-proc)
  --bpf-object PATH    prebuilt eBPF object (default bpf/capture.bpf.o of this installation)
  --admin HOST:PORT    admin API address (default 127.0.0.1:15000). Keep it on loopback: the admin
                       API lists every connection and changes log levels; another address logs a warning
  --metrics HOST:PORT  address of the Prometheus metrics server, which serves /metrics and
                       /stats/prometheus (default [::]:15020, every IPv4 and IPv6 address;
                       port 0 picks a free port)
  --readiness HOST:PORT
                       address of the readiness server, which serves /healthz/ready: 200 once the
                       configuration is read, capture is attached and certificates are issued, else
                       503 (default [::]:15021, every IPv4 and IPv6 address; port 0 picks a
                       free port)
  --root-namespace NS  namespace whose policies apply mesh-wide (default istio-system)
  --capture MODE       how pods' traffic is steered to the agent: ebpf, nftables, or auto (default),
                       which probes the kernel and takes ebpf when every hook works, else nftables
  --probe-source ADDRESS[,ADDRESS...]
                       source address of kubelet health probes, which inbound capture lets through
                       to the application; repeatable (default 169.254.7.127 and
                       fd16:9254:7127:1337:ffff:ffff:ffff:ffff, "none" for no exemption). The
                       node must SNAT kubelet's probes to it, as --probe-snat does
  --probe-snat         keep an nftables table (inet ambient_agent_probes) in the host's network
                       namespace that rewrites the source of TCP connections opened by the host's
                       own processes, the kubelet's probes among them, to enrolled pods: to the first
                       IPv4 and the first IPv6 --probe-source. Every such connection then reaches
                       the application uncaptured. The table stays when the agent stops; an agent
                       started without --probe-snat, or uninstalled, removes it. Needs a
                       --probe-source address
  --drain-timeout SECONDS
                       on SIGTERM or SIGINT, how long open connections may finish before they are
                       reset (default 5; 0 resets them at once). A second signal resets them at once.
  --idle-after-handover
                       after handing the node over to a replacement (--replace), close everything
                       and wait for SIGTERM or SIGINT instead of exiting, so that a container
                       runtime does not restart this agent, which would take the node back
  --replace            take the node over from the agent that serves it now, with no failed
                       connection: start listeners next to its own, then let it drain and exit
                       (it waits --drain-timeout of that agent). Fails, leaving that agent
                       serving, when it does not reply within 5 s. With no agent running, a
                       normal start
  --log-level LEVEL[,COMPONENT=LEVEL...]
                       log level of every component, then of single components, for example
                       info,cni=debug,access=warn. Levels: fatal, error, warn, info, debug, trace,
                       silent. Components: the "component" field of the log lines, "agent" for
                       lines without one, and "access" for the connection lines. Overrides
                       AMBIENT_AGENT_LOG_LEVEL (same syntax; default info). POST /logging on the
                       admin API changes levels while the agent runs
  --log-format FORMAT  json (default): one JSON object per line; or text: one line per record,
                       "TIME LEVEL component message key=value..."
  --no-transparent-source
                       inbound proxies connect to applications from the pod's own address, so
                       applications see that address as every client's (default: the client's
                       address, with a policy routing rule installed in each enrolled pod)
`;

/** Default of --cgroup, which cgroupV2Root resolves on hybrid hosts. */
export const DEFAULT_CGROUP_PATH = "/sys/fs/cgroup";

/**
 * Returns the cgroup v2 folder for --cgroup `folder`: the folder itself when it is cgroup v2, else
 * its `unified` subfolder when that is, as on hybrid hosts that mount cgroup v1 at /sys/fs/cgroup
 * and cgroup v2 at /sys/fs/cgroup/unified. Otherwise `folder`, which the host check then reports.
 */
export function cgroupV2Root(folder: string, isCgroup2: (directory: string) => boolean = isCgroup2Directory): string {
  if (isCgroup2(folder)) return folder;
  const unified = path.join(folder, "unified");
  return isCgroup2(unified) ? unified : folder;
}

/** The options of `ambient-agent run`: the agent's own, and how the process logs and stops it. */
interface RunOptions {
  agent: AgentOptions;
  drainTimeoutMs: number;
  /** The start-up log levels from --log-level or AMBIENT_AGENT_LOG_LEVEL, already checked by parseLogLevels. */
  logLevel: string;
  logFormat: LogFormat;
  /** Whether the process stays until SIGTERM or SIGINT after a hand-over, instead of exiting. */
  idleAfterHandover: boolean;
}

/**
 * Default drain deadline in seconds. Kubernetes sends SIGKILL terminationGracePeriodSeconds (30 by
 * default) after SIGTERM, so 5 s leaves room for the audit flush and the rest of the stop within it.
 */
const DEFAULT_DRAIN_TIMEOUT_S = 5;

/** Parses --drain-timeout: a number of seconds, 0 or more, fractions allowed. */
function parseDrainTimeout(value: string | undefined): number {
  if (value === undefined) return DEFAULT_DRAIN_TIMEOUT_S * 1000;
  const seconds = Number(value);
  if (value.trim() === "" || !Number.isFinite(seconds) || seconds < 0) {
    throw new UsageError(`invalid --drain-timeout "${value}": give the number of seconds, 0 or more (for example 5 or 0.5)`);
  }
  return Math.round(seconds * 1000);
}

/** The options of `ambient-agent run`, for node:util parseArgs and for the --config file's keys. */
export const RUN_OPTIONS = {
  config: { type: "string" },
  node: { type: "string" },
  manifests: { type: "string" },
  kubernetes: { type: "boolean" },
  kubeconfig: { type: "string" },
  daemonset: { type: "string" },
  "excluded-namespaces": { type: "string", multiple: true },
  "cni-conf-dir": { type: "string" },
  "cni-bin-dir": { type: "string" },
  "cni-socket": { type: "string" },
  "cni-timeout": { type: "string" },
  ...IDENTITY_FLAGS,
  ...AUDIT_FLAGS,
  ...LIMIT_FLAGS,
  "pin-root": { type: "string" },
  cgroup: { type: "string" },
  "host-proc": { type: "string" },
  "bpf-object": { type: "string" },
  admin: { type: "string" },
  metrics: { type: "string" },
  readiness: { type: "string" },
  "root-namespace": { type: "string" },
  capture: { type: "string" },
  "drain-timeout": { type: "string" },
  replace: { type: "boolean" },
  "idle-after-handover": { type: "boolean" },
  "probe-source": { type: "string", multiple: true },
  "probe-snat": { type: "boolean" },
  "host-netns": { type: "string" },
  "transparent-source": { type: "boolean" },
  "no-transparent-source": { type: "boolean" },
  "log-level": { type: "string" },
  "log-format": { type: "string" },
} as const;

/** Options that are given once with a comma-separated value, which a --config file may write as a list. */
export const COMMA_LIST_OPTIONS: ReadonlySet<string> = new Set(["log-level"]);

function parseRunOptions(argv: string[]): RunOptions {
  const { values } = parseArgs({ args: withConfigFile(argv, RUN_OPTIONS, COMMA_LIST_OPTIONS), options: RUN_OPTIONS, strict: true });
  const missing = ["node"].filter((name) => !values[name as keyof typeof values]).map((name) => `--${name}`);
  const kubernetes = values.kubernetes === true || values.kubeconfig !== undefined;
  if (kubernetes && values.manifests !== undefined) {
    throw new UsageError("--manifests and --kubernetes (or --kubeconfig) both name where the configuration comes from: give one of them");
  }
  if (!kubernetes && values.manifests === undefined) missing.push("--manifests or --kubernetes");
  if (!values["ca-dir"] && !values["ca-address"]) missing.push("--ca-dir or --ca-address");
  if (values.daemonset !== undefined && !kubernetes) {
    throw new UsageError("--daemonset needs --kubernetes (or --kubeconfig): the agent reads its DaemonSet from the API server");
  }
  if (missing.length > 0) throw new UsageError(`missing required option${missing.length > 1 ? "s" : ""}: ${missing.join(", ")}`);
  const node = values.node!;
  if (!/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/.test(node)) {
    throw new UsageError(`invalid --node "${node}": use a Kubernetes node name (lowercase letters, digits, '-' and '.')`);
  }
  const agent: AgentOptions = {
    node,
    manifestsDir: values.manifests === undefined ? undefined : path.resolve(values.manifests),
    kubernetes: kubernetes ? kubeCredentials(values.kubeconfig) : undefined,
    excludedNamespaces: parseExcludedNamespaces(values["excluded-namespaces"]),
    cni: parseCniFlags(values),
    identity: parseWith(parseIdentityFlags, values),
    audit: parseWith((flags: AuditFlagValues) => parseAuditFlags(flags, node), values),
    pinRoot: canonicalPinRoot(values["pin-root"] ?? `/sys/fs/bpf/ambient-agent/${node}`),
    cgroupPath: values.cgroup ?? DEFAULT_CGROUP_PATH,
    objectPath: values["bpf-object"] ?? path.resolve(__dirname, "..", "..", "..", "bpf", "capture.bpf.o"),
    adminAddress: values.admin ?? "127.0.0.1:15000",
    metricsAddress: parseListenFlag("metrics", values.metrics ?? "[::]:15020"),
    readinessAddress: parseListenFlag("readiness", values.readiness ?? "[::]:15021"),
    rootNamespace: values["root-namespace"] ?? "istio-system",
    capture: parseWith(parseCaptureMode, values.capture),
    probeSources: parseProbeSources(values["probe-source"]),
    probeSnat: values["probe-snat"] ?? false,
    transparentSource: parseTransparentSource(values["transparent-source"], values["no-transparent-source"]),
    hostProc: path.resolve(values["host-proc"] ?? DEFAULT_HOST_PROC),
    hostNetns: values["host-netns"] === undefined ? undefined : path.resolve(values["host-netns"]),
    daemonset: values.daemonset === undefined ? undefined : parseWith(parseDaemonSetRef, values.daemonset),
    limits: parseWith(parseLimitFlags, values),
  };
  if (agent.probeSnat && agent.probeSources!.length === 0) {
    throw new UsageError(`--probe-snat needs a probe source address to rewrite kubelet probes to, but --probe-source is "none": give --probe-source an address or leave out --probe-snat`);
  }
  const drainTimeoutMs = parseDrainTimeout(values["drain-timeout"]);
  const logLevel = parseLogLevelFlag(values["log-level"]);
  const logFormat = values["log-format"] === undefined ? "json" : parseWith(parseLogFormat, values["log-format"], "--log-format");
  return {
    agent: { ...agent, replace: values.replace ?? false, drainTimeoutMs },
    drainTimeoutMs,
    logLevel,
    logFormat,
    idleAfterHandover: values["idle-after-handover"] ?? false,
  };
}

/** Returns `options` with cgroupPath resolved by cgroupV2Root, and logs a change. */
function withCgroupV2Root(options: AgentOptions, logger: Logger): AgentOptions {
  const cgroupPath = cgroupV2Root(options.cgroupPath);
  if (cgroupPath === options.cgroupPath) return options;
  logger.info({ cgroup: options.cgroupPath, attachTo: cgroupPath }, `${options.cgroupPath} is not cgroup v2 but ${cgroupPath} is, as on a hybrid cgroup host: using ${cgroupPath} as the cgroup v2 root`);
  return { ...options, cgroupPath };
}

/** Runs an option parser and turns its error into a UsageError, prefixed with `flag` when given. */
function parseWith<I, T>(parse: (input: I) => T, input: I, flag?: string): T {
  try {
    return parse(input);
  } catch (error) {
    throw new UsageError(flag === undefined ? (error as Error).message : `invalid ${flag}: ${(error as Error).message}`);
  }
}

/** Reads --log-level, or else AMBIENT_AGENT_LOG_LEVEL, or else "info", and checks it. */
function parseLogLevelFlag(flag: string | undefined): string {
  const text = flag ?? process.env.AMBIENT_AGENT_LOG_LEVEL ?? "info";
  try {
    parseLogLevels(text);
  } catch (error) {
    const source = flag === undefined ? "AMBIENT_AGENT_LOG_LEVEL" : "--log-level";
    throw new UsageError(`invalid ${source}: ${(error as Error).message}`);
  }
  return text;
}

/** Reads --transparent-source and --no-transparent-source; on unless the second is given. */
function parseTransparentSource(on: boolean | undefined, off: boolean | undefined): boolean {
  if (on && off) throw new UsageError("--transparent-source and --no-transparent-source contradict each other: give one of them");
  return !off;
}

/** Checks the HOST:PORT of a listening flag such as --metrics and returns it. */
function parseListenFlag(flag: string, address: string): string {
  try {
    parseAddress(address);
  } catch {
    throw new UsageError(`invalid --${flag} "${address}": expected HOST:PORT with a port from 0 to 65535, for example 127.0.0.1:0`);
  }
  return address;
}

class UsageError extends Error {}

/** Returns the API server credentials: the kubeconfig file when given, else the pod's service account. */
function kubeCredentials(kubeconfig: string | undefined): KubeCredentials {
  if (kubeconfig !== undefined) return { kind: "kubeconfig", path: path.resolve(kubeconfig) };
  return { kind: "in-cluster" };
}

const NAMESPACE_NAME = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
/** The most excluded namespaces: the CNI plugin rejects a longer list, which would fail every new pod. */
const MAX_EXCLUDED_NAMESPACES = 256;

/** Parses --excluded-namespaces: comma-separated namespace names, repeatable; "none" excludes nothing. */
function parseExcludedNamespaces(values: string[] | undefined): string[] {
  if (values === undefined) return ["kube-system"];
  const names = values.flatMap((value) => value.split(",")).map((name) => name.trim());
  if (names.length === 1 && names[0] === "none") return [];
  for (const name of names) {
    if (name === "") {
      throw new UsageError(`empty namespace name in --excluded-namespaces ${JSON.stringify(values.join(","))}: list namespace names separated by commas, or give "none" alone to exclude nothing`);
    }
    if (name === "none") throw new UsageError(`"none" in --excluded-namespaces must stand alone; it excludes nothing`);
    if (name.length > 63 || !NAMESPACE_NAME.test(name)) {
      throw new UsageError(`invalid namespace "${name}" in --excluded-namespaces: use Kubernetes namespace names (lowercase letters, digits and '-'), comma-separated`);
    }
  }
  const unique = [...new Set(names)];
  if (unique.length > MAX_EXCLUDED_NAMESPACES) {
    throw new UsageError(`--excluded-namespaces lists ${unique.length} namespaces; at most ${MAX_EXCLUDED_NAMESPACES} are allowed (the CNI plugin's limit)`);
  }
  return unique;
}

/** Default of --cni-timeout, in seconds: how long a pod's sandbox waits for the agent. */
const DEFAULT_CNI_TIMEOUT_S = 30;

/** Reads the --cni-* flags; undefined when --cni-conf-dir is absent (no CNI plugin). */
function parseCniFlags(values: { "cni-conf-dir"?: string; "cni-bin-dir"?: string; "cni-socket"?: string; "cni-timeout"?: string; "excluded-namespaces"?: string[] }): CniSettings | undefined {
  const others = (["cni-bin-dir", "cni-socket", "cni-timeout"] as const).filter((name) => values[name] !== undefined);
  if (values["cni-conf-dir"] === undefined) {
    if (others.length > 0) throw new UsageError(`--${others[0]} needs --cni-conf-dir, the folder of the node's CNI configuration`);
    return undefined;
  }
  let timeoutSeconds = DEFAULT_CNI_TIMEOUT_S;
  if (values["cni-timeout"] !== undefined) {
    timeoutSeconds = Number(values["cni-timeout"]);
    if (!Number.isInteger(timeoutSeconds) || timeoutSeconds < 1 || timeoutSeconds > 600) {
      throw new UsageError(`invalid --cni-timeout "${values["cni-timeout"]}": give whole seconds from 1 to 600`);
    }
  }
  return {
    confDir: path.resolve(values["cni-conf-dir"]),
    binDir: path.resolve(values["cni-bin-dir"] ?? "/opt/cni/bin"),
    socketPath: path.resolve(values["cni-socket"] ?? "/var/run/ambient-agent/cni.sock"),
    pluginBinary: path.resolve(__dirname, "..", "..", "..", "native", "cni", "ambient-agent-cni"),
    excludeNamespaces: parseExcludedNamespaces(values["excluded-namespaces"]),
    timeoutSeconds,
  };
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === "--help" || command === "-h" || command === "help") {
    process.stdout.write(USAGE);
    return command === undefined ? 2 : 0;
  }
  if (rest.includes("--help") || rest.includes("-h")) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (command !== "run") {
    process.stderr.write(`ambient-agent: unknown command "${command}"\n\n${USAGE}`);
    return 2;
  }

  let options: RunOptions;
  try {
    options = parseRunOptions(rest);
  } catch (error) {
    process.stderr.write(`ambient-agent: ${(error as Error).message}\n\n${USAGE}`);
    return 2;
  }

  const logger = createLogger({ node: options.agent.node }, options.logLevel, options.logFormat);
  if (!runsWithAgentFlags()) {
    logger.warn(
      { expected: AGENT_NODE_FLAGS, got: process.execArgv },
      `Node.js runs without ${AGENT_NODE_FLAGS.join(" ")}: the data path will use more CPU; start the agent as \`node ${AGENT_NODE_FLAGS.join(" ")} ambient-agent.js\` or through the ambient-agent script`,
    );
  }
  const agent = new Agent(withCgroupV2Root(options.agent, logger), logger);
  let serving = false;
  handleHangups(agent, logger, () => serving);
  // Start may wait long for the API server's first list: a signal meanwhile makes start() end at
  // its next step, and the agent then stops cleanly.
  let signalDuringStart: string | undefined;
  const stopDuringStart = (signal: string): void => {
    if (signalDuringStart) return;
    signalDuringStart = signal;
    logger.info({ signal }, "signal received while starting, stopping");
    agent.abortStart();
  };
  process.on("SIGTERM", stopDuringStart);
  process.on("SIGINT", stopDuringStart);
  let failure: { error: unknown } | undefined;
  try {
    await agent.start();
  } catch (error) {
    failure = { error };
  } finally {
    process.off("SIGTERM", stopDuringStart);
    process.off("SIGINT", stopDuringStart);
  }
  // Also when start() finished its last step as the signal came. A start that failed for another
  // reason meanwhile is still logged.
  if (signalDuringStart && failure && !agent.startAborted(failure.error)) logger.warn({ err: failure.error }, "start ended with an error after the stop signal");
  if (signalDuringStart) return (await stopAgent(agent, logger, options.drainTimeoutMs, { kind: "signal during start", signal: signalDuringStart })).code;
  if (failure) {
    const message = failure.error instanceof HostNotReadyError ? failure.error.message : `failed to start: ${(failure.error as Error).message}`;
    logger.fatal({ err: failure.error }, message);
    process.stderr.write(`ambient-agent: ${message}\n`);
    return (await stopAgent(agent, logger, options.drainTimeoutMs, { kind: "start failed", message })).code;
  }

  serving = true;
  // A replacement agent ends this one through the hand-over socket, as a signal would.
  const signal = await new Promise<string>((resolve) => {
    process.once("SIGTERM", () => resolve("SIGTERM"));
    process.once("SIGINT", () => resolve("SIGINT"));
    void agent.replaced.then(() => resolve("hand-over"));
  });
  serving = false;
  const cause: StopCause = signal === "hand-over" ? { kind: "hand-over" } : { kind: "signal", signal };
  const { code, signalled } = await stopAgent(agent, logger, options.drainTimeoutMs, cause);
  // A signal during the stop after a hand-over is the one the idle agent would wait for.
  if (signal === "hand-over" && options.idleAfterHandover && !signalled) return idleUntilSignal(logger, code);
  return code;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error) => {
      process.stderr.write(`ambient-agent: ${(error as Error).stack ?? error}\n`);
      process.exit(1);
    },
  );
}
