// `agentctl doctor`: checks whether this host can run the agent, before or while it runs. The eBPF
// checks are the agent's own: probeCaptureFeatures (each map, program and link type, used for real
// on a throwaway cgroup and network namespace) and checkHost (the start-up check that loads the
// whole object). Both need root, like the agent.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { DataType, load, open } from "ffi-rs";
import si from "systeminformation";
import { missingRequiredCapabilities, readEffectiveCapabilities } from "../capture/capabilities";
import { canonicalPinRoot } from "../capture/pin-lock";
import { loadNative } from "../capture/native";
import { hasProbeSnatTable, hostNetnsPath } from "../capture/nft/probe-snat";
import { PROBE_SNAT_TABLE_FAMILY, PROBE_SNAT_TABLE_NAME } from "../capture/nft/probe-snat-ruleset";
import { checkHost, type HostProblem } from "../capture/preflight";
import { isHostSetupFeature, parseCaptureMode, probeCaptureFeatures, type FeatureProbe, type RequestedCaptureMode } from "../capture/probe";
import { DEFAULT_HOST_PROC } from "../enroll/netns";
import { adminRequest, asUsage, DEFAULT_ADMIN, validAdmin } from "./admin-client";
import { withConfigFile } from "./config-file";
import { formatTable, parseOutputFormat, render, type OutputFormat } from "./output";
import { pinRootOption } from "./pin-root-option";
import { parseOptions } from "./usage";

export const DOCTOR_USAGE = `  doctor [--config FILE] [--node NAME] [--pin-root DIR] [--cgroup PATH] [--bpf-object PATH]
         [--capture ebpf|nftables|auto] [--probe-snat] [--host-proc DIR] [--host-netns PATH]
         [--admin HOST:PORT] [-o table|json|yaml]
                     check whether this host can run the agent: kernel version, BTF, bpffs under the pin
                     root, cgroup v2, capabilities, the eBPF programs (loaded for real, as the agent
                     does at start), nftables for the fallback and for --probe-snat, the host network
                     namespace for --probe-snat, clock synchronisation, and whether an agent answers
                     on the admin API. Prints PASS, WARN or FAIL per check with what to do.
                     Run it as root, like the agent. Exits 1 when a check fails, 0 otherwise
                       --config FILE      the agent's --config file (in the Helm chart's pod,
                                          /etc/ambient-agent/config.yaml), read as \`ambient-agent run\`
                                          reads it, for node, pin-root, cgroup, bpf-object, capture,
                                          probe-snat, host-proc, host-netns and admin. The options
                                          below replace the file's values
                       --node NAME        the agent's node, which names its default pin root
                       --pin-root DIR     the agent's pin root (default /sys/fs/bpf/ambient-agent/NODE,
                                          with NODE from --node, else this host's name)
                       --cgroup PATH      cgroup v2 root (default /sys/fs/cgroup); when PATH is not
                                          cgroup v2 but PATH/unified is, doctor checks that, as the agent does
                       --bpf-object PATH  eBPF object (default bpf/capture.bpf.o of this installation)
                       --capture MODE     the capture mode the agent will run with (default auto):
                                          decides which failures are FAIL and which WARN
                       --probe-snat       the agent runs with --probe-snat: nftables is required
                                          whatever the capture mode, and the host network
                                          namespace must open
                       --host-proc DIR    the host's /proc as the agent sees it (default /proc)
                       --host-netns PATH  the host's network namespace, where --probe-snat writes its
                                          table (default DIR/1/ns/net of --host-proc)
                       --admin HOST:PORT  admin API to try (default ${DEFAULT_ADMIN}); no answer is a WARN
`;

export type CheckResult = "PASS" | "WARN" | "FAIL";

export interface DoctorCheck {
  name: string;
  result: CheckResult;
  message: string;
}

export interface DoctorOptions {
  pinRoot: string;
  cgroupPath: string;
  objectPath: string;
  capture: RequestedCaptureMode;
  /** Whether the agent runs with --probe-snat, which needs nftables and the host network namespace. */
  probeSnat: boolean;
  /** The host network namespace that --probe-snat writes its table in. */
  hostNetns: string;
  admin: string;
  /** Called with each check's name before it runs. */
  onCheck?: (name: string) => void;
}

/** The oldest kernel with every hook the capture programs use, from the start-up check's advice. */
const MIN_KERNEL: [number, number] = [5, 15];

/** Capability bit numbers, from linux/capability.h. */
/** adjtimex(2): the TIME_ERROR return value and the STA_UNSYNC status bit, from linux/timex.h. */
const TIME_ERROR = 5;
const STA_UNSYNC = 0x0040;
/** sizeof(struct timex) on 64-bit Linux, and the offsets of maxerror (long, µs) and status (int). */
const TIMEX_SIZE = 208;
const TIMEX_MAXERROR = 24;
const TIMEX_STATUS = 40;

/** The options of `agentctl doctor`. */
const DOCTOR_OPTIONS = {
  config: { type: "string" },
  node: { type: "string" },
  "pin-root": { type: "string" },
  cgroup: { type: "string" },
  "bpf-object": { type: "string" },
  capture: { type: "string" },
  "probe-snat": { type: "boolean" },
  "host-proc": { type: "string" },
  "host-netns": { type: "string" },
  admin: { type: "string" },
  output: { type: "string", short: "o" },
} as const;

/** The options of `ambient-agent run` that doctor takes from the agent's --config file. */
const AGENT_FILE_KEYS = ["node", "pin-root", "cgroup", "bpf-object", "capture", "probe-snat", "host-proc", "host-netns", "admin"] as const;

type AgentFileValues = Partial<Record<Exclude<(typeof AGENT_FILE_KEYS)[number], "probe-snat">, string>> & { "probe-snat"?: boolean };

export async function runDoctorCommand(argv: string[]): Promise<number> {
  const { format, options } = await parseDoctorOptions(argv);
  options.onCheck = process.stderr.isTTY ? showProgress : undefined;
  const checks = await runDoctorChecks(options);
  if (options.onCheck !== undefined) process.stderr.write("\r\x1b[K");
  process.stdout.write(render(format, { capture: options.capture, probeSnat: options.probeSnat, checks }, () => formatDoctor(checks)));
  return checks.some((check) => check.result === "FAIL") ? 1 : 0;
}

/**
 * Reads doctor's command line, and the agent's --config file when one is given: an option on the
 * command line replaces the file's value, as it does for the agent. Throws UsageError for an
 * invalid option or file.
 */
export async function parseDoctorOptions(argv: string[]): Promise<{ format: OutputFormat; options: DoctorOptions }> {
  const { values: given } = parseOptions({ args: argv, options: DOCTOR_OPTIONS });
  const fromFile = given.config === undefined ? {} : await readAgentFile(given.config);
  const values = { ...fromFile, ...definedValues(given) };
  const format = parseOutputFormat(given.output);
  const { cgroupV2Root, DEFAULT_CGROUP_PATH } = await import("./ambient-agent");
  const options: DoctorOptions = {
    pinRoot: pinRootOption(values) ?? canonicalPinRoot(`/sys/fs/bpf/ambient-agent/${os.hostname().toLowerCase()}`),
    cgroupPath: cgroupV2Root(values.cgroup ?? DEFAULT_CGROUP_PATH),
    objectPath: values["bpf-object"] ?? path.resolve(__dirname, "..", "..", "..", "bpf", "capture.bpf.o"),
    capture: asUsage(() => parseCaptureMode(values.capture)),
    probeSnat: values["probe-snat"] ?? false,
    hostNetns: path.resolve(hostNetnsPath(values["host-netns"], values["host-proc"] ?? DEFAULT_HOST_PROC)),
    admin: validAdmin(values.admin),
  };
  return { format, options };
}

/** Reads the agent's --config file through the agent's own option table and returns the options doctor shares with it. */
async function readAgentFile(file: string): Promise<AgentFileValues> {
  const { COMMA_LIST_OPTIONS, RUN_OPTIONS } = await import("./ambient-agent");
  const { values } = asUsage(() => parseArgs({ args: withConfigFile(["--config", file], RUN_OPTIONS, COMMA_LIST_OPTIONS), options: RUN_OPTIONS, strict: true }));
  return definedValues(Object.fromEntries(AGENT_FILE_KEYS.map((key) => [key, values[key]]))) as AgentFileValues;
}

/** Returns `values` without the keys whose value is undefined, so that spreading it replaces only what was given. */
function definedValues<T extends Record<string, unknown>>(values: T): Partial<T> {
  return Object.fromEntries(Object.entries(values).filter(([, value]) => value !== undefined)) as Partial<T>;
}

function showProgress(name: string): void {
  process.stderr.write(`\r\x1b[Kchecking ${name}... `);
}

/** Runs every check in order and returns their results. */
export async function runDoctorChecks(options: DoctorOptions): Promise<DoctorCheck[]> {
  const checks: DoctorCheck[] = [];
  const run = async (name: string, check: () => Omit<DoctorCheck, "name"> | Promise<Omit<DoctorCheck, "name">>): Promise<void> => {
    options.onCheck?.(name);
    checks.push({ name, ...(await check()) });
  };
  const needsEbpf = options.capture !== "nftables";
  await run("kernel", checkKernelVersion);
  await run("btf", checkBtf);
  options.onCheck?.("ebpf features");
  const features = probeCaptureFeatures(options);
  await run("bpffs", () => hostSetupCheck(features, "bpffs", needsEbpf, "mount bpffs there (mount -t bpf bpf /sys/fs/bpf), or pass a --pin-root under a bpffs mount", `the pin root ${options.pinRoot} is on bpffs`));
  await run("cgroup2", () => hostSetupCheck(features, "cgroup2", needsEbpf, "pass --cgroup with the cgroup v2 mount, such as /sys/fs/cgroup, or the agent's --config file; on nodes with cgroup v1 only, run the agent with --capture nftables", `${options.cgroupPath} is a cgroup v2 directory`));
  await run("capabilities", () => checkCapabilities(options));
  options.onCheck?.("nftables");
  const nftables = nftablesProblems(options);
  const ebpf = ebpfProblems(options, features);
  await run("ebpf programs", () => ebpfCheck(options.capture, ebpf, nftables.length === 0));
  await run("nftables", () => nftablesCheck(options.capture, nftables, ebpf.problems.length === 0 && ebpf.blocked === undefined, options.probeSnat));
  if (options.probeSnat) await run("host netns", () => hostNetnsCheck(options.hostNetns));
  await run("clock", checkClock);
  await run("admin api", () => checkAdmin(options.admin));
  return checks;
}

export function formatDoctor(checks: readonly DoctorCheck[]): string {
  const table = formatTable(["CHECK", "RESULT", "MESSAGE"], checks.map((check) => [check.name, check.result, check.message]));
  const failed = checks.filter((check) => check.result === "FAIL").length;
  const warned = checks.filter((check) => check.result === "WARN").length;
  return `${table}\n${failed} failed, ${warned} ${warned === 1 ? "warning" : "warnings"}, ${checks.length - failed - warned} passed\n`;
}

async function checkKernelVersion(): Promise<Omit<DoctorCheck, "name">> {
  const info = await si.osInfo();
  const release = info.kernel || os.release();
  const match = /^(\d+)\.(\d+)/.exec(release);
  const distribution = info.distro ? ` (${info.distro}${info.release ? ` ${info.release}` : ""})` : "";
  if (match === null) return { result: "WARN", message: `cannot read the kernel version from ${JSON.stringify(release)}; the ebpf programs check decides` };
  const [major, minor] = [Number(match[1]), Number(match[2])];
  if (major > MIN_KERNEL[0] || (major === MIN_KERNEL[0] && minor >= MIN_KERNEL[1])) return { result: "PASS", message: `Linux ${release}${distribution}` };
  return {
    result: "WARN",
    message: `Linux ${release}${distribution} is older than ${MIN_KERNEL.join(".")}, the first release with every hook eBPF capture uses; a distribution backport may still have them, so the ebpf programs check decides. Upgrade the kernel, or run with --capture nftables`,
  };
}

function checkBtf(): Omit<DoctorCheck, "name"> {
  if (fs.existsSync("/sys/kernel/btf/vmlinux")) return { result: "PASS", message: "/sys/kernel/btf/vmlinux present" };
  // The capture programs use no CO-RE relocation, so they load without kernel BTF.
  return { result: "WARN", message: "no /sys/kernel/btf/vmlinux: capture works without it, but bpftool cannot show the programs' kernel types; use a kernel built with CONFIG_DEBUG_INFO_BTF=y to get it" };
}

function hostSetupCheck(features: FeatureProbe[], feature: string, needed: boolean, fix: string, passed: string): Omit<DoctorCheck, "name"> {
  const probe = features.find((entry) => entry.feature === feature);
  if (probe?.ok) return { result: "PASS", message: passed };
  const error = probe?.error ?? `${feature} not probed`;
  if (!needed) return { result: "WARN", message: `${error}; nftables capture does not need it` };
  return { result: "FAIL", message: `${error}: ${fix}` };
}

/**
 * Checks the effective capabilities. Besides the ones missingRequiredCapabilities names, it warns
 * about two more. CAP_SYS_PTRACE opens /proc/PID/ns/net of other users' processes, the fallback
 * when a runtime keeps no /var/run/netns entry. CAP_DAC_OVERRIDE lets the eBPF probe make its test
 * cgroup under a cgroup v2 root of mode 0555, as systemd mounts it.
 */
function checkCapabilities(options: DoctorOptions): Omit<DoctorCheck, "name"> {
  const capabilities = readEffectiveCapabilities();
  if (capabilities === undefined) return { result: "FAIL", message: "no CapEff line in /proc/self/status: cannot tell the capabilities; run on Linux" };
  const uid = process.getuid?.();
  const missing = missingRequiredCapabilities(capabilities);
  if (uid !== 0 || missing.length > 0) {
    const notRoot = uid === 0 ? "" : `agentctl runs as uid ${uid ?? "unknown"} and the agent must run as root; `;
    const lacking = missing.length === 0 ? "" : `missing ${missing.join(", ")}; `;
    return { result: "FAIL", message: `${notRoot}${lacking}run the agent as root with CAP_SYS_ADMIN and CAP_NET_ADMIN (the Helm chart grants them)` };
  }
  const warnings: string[] = [];
  if (!capabilities.has("CAP_SYS_PTRACE")) {
    warnings.push("missing CAP_SYS_PTRACE: pods whose runtime keeps no /var/run/netns entry cannot be enrolled (their /proc/PID/ns/net cannot be opened); grant CAP_SYS_PTRACE");
  }
  if (!capabilities.has("CAP_DAC_OVERRIDE") && !ownerWritable(options.cgroupPath)) {
    warnings.push(`missing CAP_DAC_OVERRIDE and ${options.cgroupPath} is not writable by its owner: the eBPF probe cannot make its test cgroup, so auto capture falls back to nftables; grant CAP_DAC_OVERRIDE`);
  }
  if (warnings.length > 0) return { result: "WARN", message: warnings.join("; ") };
  const rawNote = capabilities.has("CAP_NET_RAW") ? "" : " (CAP_NET_RAW is absent, and the agent does not use it)";
  return { result: "PASS", message: `CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_DAC_OVERRIDE${rawNote}` };
}

/** Checks whether `directory`'s mode lets its owner write. Returns true when the mode cannot be read, so that only a known mode warns. */
function ownerWritable(directory: string): boolean {
  try {
    return (fs.statSync(directory).mode & 0o200) !== 0;
  } catch {
    return true;
  }
}

/**
 * Lists what keeps eBPF capture from starting: the object file, each kernel hook the probe found
 * missing, then the agent's own start-up check, which loads the whole object. The start-up check
 * runs only once the host set-up passes, so that its problems are the kernel's alone. `blocked`
 * names the failed check that kept the kernel from being probed.
 */
function ebpfProblems(options: DoctorOptions, features: FeatureProbe[]): { problems: string[]; blocked?: string } {
  const object = features.find((probe) => probe.feature === "object");
  if (object !== undefined && !object.ok) return { problems: [`${object.error}: build it with \`make bpf\`, or pass --bpf-object`] };
  const setup = features.find((probe) => isHostSetupFeature(probe.feature) && !probe.ok);
  if (setup !== undefined) return { problems: [], blocked: setup.feature };
  if (process.getuid?.() !== 0) return { problems: [], blocked: "capabilities" };
  const hooks = groupByError(features.filter((probe) => !probe.ok && !isHostSetupFeature(probe.feature)));
  if (hooks.length > 0) return { problems: hooks };
  return { problems: checkHost({ pinRoot: options.pinRoot, cgroupPath: options.cgroupPath, objectPath: options.objectPath, capture: "ebpf" }).map(describeProblem) };
}

/** Joins the features that failed with the same error: "cgroup/bind4, cgroup/bind6: EPERM". */
function groupByError(failed: FeatureProbe[]): string[] {
  const byError = new Map<string, string[]>();
  for (const probe of failed) {
    const error = probe.error ?? "failed";
    byError.set(error, [...(byError.get(error) ?? []), probe.feature]);
  }
  return [...byError].map(([error, names]) => `${names.join(", ")}: ${error}`);
}

function ebpfCheck(capture: RequestedCaptureMode, ebpf: { problems: string[]; blocked?: string }, nftablesWorks: boolean): Omit<DoctorCheck, "name"> {
  // The blocking check has failed already and names the fix.
  if (ebpf.blocked !== undefined) return { result: "WARN", message: `not probed until the ${ebpf.blocked} check passes` };
  if (ebpf.problems.length === 0) return { result: "PASS", message: "the kernel loads the capture programs and accepts every hook they use" };
  const list = ebpf.problems.join("; ");
  if (capture === "nftables") return { result: "WARN", message: `eBPF capture is unavailable (${list}); --capture nftables does not need it` };
  if (capture === "auto" && nftablesWorks) {
    return { result: "WARN", message: `${list}; --capture auto falls back to nftables capture, which lets a pod with CAP_NET_RAW bypass capture` };
  }
  return { result: "FAIL", message: list };
}

/** Returns the start-up check's nftables problems, without the uid problem that the capabilities check reports. */
function nftablesProblems(options: DoctorOptions): string[] {
  const problems = checkHost({ pinRoot: options.pinRoot, cgroupPath: options.cgroupPath, objectPath: options.objectPath, capture: "nftables" });
  return problems.slice(process.getuid?.() === 0 ? 0 : 1).map(describeProblem);
}

/**
 * Judges the nftables problems: fatal when the capture mode needs nftables, and with --probe-snat,
 * which writes its table with nftables whatever the capture mode.
 */
export function nftablesCheck(capture: RequestedCaptureMode, problems: string[], ebpfWorks: boolean, probeSnat: boolean): Omit<DoctorCheck, "name"> {
  if (problems.length === 0) {
    return { result: "PASS", message: `libnftables or the nft and nsenter tools are available for nftables capture${probeSnat ? " and for --probe-snat" : ""}` };
  }
  const list = problems.join("; ");
  if (probeSnat) return { result: "FAIL", message: `${list}; --probe-snat writes its table with nftables whatever the capture mode` };
  if (capture === "nftables" || (capture === "auto" && !ebpfWorks)) return { result: "FAIL", message: list };
  return { result: "WARN", message: `${list}; needed only for --capture nftables, or by auto when an eBPF hook is missing` };
}

/**
 * Opens the host network namespace that --probe-snat writes its table in, then lists its nftables
 * tables with `hasTable` (default hasProbeSnatTable), as the agent does before it removes the table.
 */
export function hostNetnsCheck(hostNetns: string, hasTable: (netnsPath: string) => boolean = readProbeSnatTable): Omit<DoctorCheck, "name"> {
  const fix = "run doctor as root in the agent's container, and pass --host-netns with the host's network namespace, or --host-proc with the host's /proc (in the Helm chart, hostPaths.proc)";
  try {
    fs.closeSync(fs.openSync(hostNetns, "r"));
  } catch (error) {
    return { result: "FAIL", message: `cannot open the host network namespace ${hostNetns}, where --probe-snat writes its table (${(error as Error).message}): ${fix}` };
  }
  let present: boolean;
  try {
    present = hasTable(hostNetns);
  } catch (error) {
    return { result: "FAIL", message: `${(error as Error).message.replace(/\.+$/, "")}; --probe-snat writes its table there: ${fix}` };
  }
  const table = `${PROBE_SNAT_TABLE_FAMILY} ${PROBE_SNAT_TABLE_NAME}`;
  return { result: "PASS", message: `nftables reads the host network namespace ${hostNetns}, which ${present ? "has" : "does not have"} the table ${table}` };
}

function readProbeSnatTable(hostNetns: string): boolean {
  loadNative();
  return hasProbeSnatTable(hostNetns);
}

function describeProblem(problem: HostProblem): string {
  return `${problem.what}: ${problem.fix}`;
}

/**
 * Reads the kernel's clock synchronisation state with adjtimex(2) in read-only mode (modes 0),
 * or, when libc cannot be called, from systemd-timesyncd's /run/systemd/timesync/synchronized.
 */
function checkClock(): Omit<DoctorCheck, "name"> {
  const time = si.time();
  const now = `${new Date(time.current).toISOString()} (time zone ${time.timezone || "unknown"})`;
  const fix = "certificates are checked against this clock, so run an NTP client such as chrony or systemd-timesyncd";
  let kernel: { synchronised: boolean; maxErrorSeconds: number } | undefined;
  try {
    kernel = readAdjtimex();
  } catch {
    kernel = undefined;
  }
  if (kernel !== undefined) {
    if (kernel.synchronised) return { result: "PASS", message: `${now}; the kernel clock is synchronised (maximum error ${kernel.maxErrorSeconds.toFixed(3)} s)` };
    return { result: "WARN", message: `${now}; the kernel clock is not synchronised (adjtimex reports TIME_ERROR); ${fix}` };
  }
  if (fs.existsSync("/run/systemd/timesync/synchronized")) return { result: "PASS", message: `${now}; systemd-timesyncd reports the clock synchronised` };
  return { result: "WARN", message: `${now}; cannot tell whether the clock is synchronised (adjtimex failed and /run/systemd/timesync/synchronized is absent); ${fix}` };
}

function readAdjtimex(): { synchronised: boolean; maxErrorSeconds: number } {
  open({ library: "agentctl-libc", path: "libc.so.6" });
  const timex = Buffer.alloc(TIMEX_SIZE);
  const state = load({ library: "agentctl-libc", funcName: "adjtimex", retType: DataType.I32, paramsType: [DataType.U8Array], paramsValue: [timex] }) as number;
  if (state < 0) throw new Error(`adjtimex returned ${state}`);
  const status = timex.readInt32LE(TIMEX_STATUS);
  return { synchronised: state !== TIME_ERROR && (status & STA_UNSYNC) === 0, maxErrorSeconds: Number(timex.readBigInt64LE(TIMEX_MAXERROR)) / 1e6 };
}

async function checkAdmin(address: string): Promise<Omit<DoctorCheck, "name">> {
  try {
    const { status } = await adminRequest(address, "GET", "/healthz/ready");
    if (status === 200) return { result: "PASS", message: `an agent at ${address} responds and is ready` };
    return { result: "WARN", message: `an agent at ${address} responds but is not ready (status ${status}); agentctl status --admin ${address} tells why` };
  } catch (error) {
    return { result: "WARN", message: `${(error as Error).message.replace(/; is the agent running.*$/, "")}; start the agent, or pass --admin with its address (this check is optional)` };
  }
}
