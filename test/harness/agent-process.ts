// Starts a real `ambient-agent run` process inside a node's network namespace and follows its log.

import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { AGENT_NODE_FLAGS } from "../../agent/cli/node-flags";

export const REPO_ROOT = path.resolve(__dirname, "..", "..", "..");
export const AGENT_BIN = path.join(REPO_ROOT, "dist", "agent", "cli", "ambient-agent.js");
export const AGENTCTL_BIN = path.join(REPO_ROOT, "dist", "agent", "cli", "agentctl.js");

/**
 * The capture mode every harness agent runs in, from AA_TEST_CAPTURE: "ebpf" (the default),
 * "nftables" or "auto". The default is not auto, so that a broken eBPF hook fails the tests
 * instead of falling back to nftables unnoticed.
 */
export const TEST_CAPTURE = testCaptureFromEnv(process.env.AA_TEST_CAPTURE);

function testCaptureFromEnv(value: string | undefined): "ebpf" | "nftables" | "auto" {
  if (value === undefined || value === "") return "ebpf";
  if (value === "ebpf" || value === "nftables" || value === "auto") return value;
  throw new Error(`AA_TEST_CAPTURE=${value} is not a capture mode: use ebpf, nftables or auto, or unset it`);
}

/** Whether the harness agents capture with nftables, so that tests can skip what only eBPF capture does. */
export const NFTABLES_CAPTURE = TEST_CAPTURE === "nftables";

/**
 * Returns the prefix family of a test file's namespaces, pins and processes. An nftables run gets
 * a family of its own, so that its clean-up never touches an eBPF run of the same file.
 */
export function testPrefixFamily(family: string): string {
  return NFTABLES_CAPTURE ? `nft${family}` : family;
}

export interface AgentProcessOptions {
  node: string;
  nodeNetns: string;
  manifestsDir: string;
  /** Kubeconfig of the fake API server; when set, the agent reads it instead of the manifest folder. */
  kubeconfig?: string;
  caDir: string;
  auditFile: string;
  /** Folder of the agent's audit spool. */
  spoolDir: string;
  pinRoot: string;
  /** Where the agent's log lines are copied, for debugging a failed run. */
  logFile: string;
  /** More `ambient-agent run` options, such as ["--drain-timeout", "2"]. */
  extraArgs?: string[];
  /** AMBIENT_AGENT_LOG_LEVEL of the agent; "debug" by default, so that tests can wait for debug lines. */
  logLevel?: string;
  /** More environment variables of the agent, added to the test process's own. */
  env?: Record<string, string>;
}

export interface LogLine {
  msg?: string;
  level?: number;
  [key: string]: unknown;
}

/** What names a followed agent in messages, and where its output is copied. */
export interface FollowedAgentOptions {
  node: string;
  /** Where the agent's log lines are copied, for debugging a failed run. Standard output goes to the same name with .stdout. */
  logFile: string;
}

/**
 * An agent process, however it was started, whose JSON log lines on standard error are collected
 * as they arrive. stop() and signal() send their signals to the process that `signalTarget`
 * returns, by default the started process. A launcher that does not pass signals on (a pod
 * sandbox) names the agent's PID there.
 */
export class FollowedAgent<Options extends FollowedAgentOptions = FollowedAgentOptions> {
  readonly lines: LogLine[] = [];
  private readonly waiters = new Set<() => void>();
  private exited = false;
  private exitStatus: { code: number | null; signal: NodeJS.Signals | null } | undefined;

  constructor(
    readonly options: Options,
    private readonly child: ChildProcess,
    private readonly signalTarget: () => number | undefined = () => child.pid,
  ) {
    const log = fs.createWriteStream(options.logFile, { flags: "a" });
    // Standard output goes to a file of its own: it carries the stdout audit sink's records, whose
    // lines must not interleave with the log lines of standard error.
    this.child.stdout!.pipe(fs.createWriteStream(`${options.logFile}.stdout`, { flags: "a" }));
    const reader = readline.createInterface({ input: this.child.stderr! });
    reader.on("line", (text) => {
      log.write(text + "\n");
      try {
        this.lines.push(JSON.parse(text) as LogLine);
      } catch {
        this.lines.push({ msg: text });
      }
      for (const wake of this.waiters) wake();
    });
    this.child.once("exit", (code, signal) => {
      this.exited = true;
      this.exitStatus = { code, signal };
      for (const wake of this.waiters) wake();
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return !this.exited;
  }

  /** The exit code and signal once the agent exited; undefined while it runs. */
  get exit(): { code: number | null; signal: NodeJS.Signals | null } | undefined {
    return this.exitStatus;
  }

  /** Resolves with the exit status once the agent exited; rejects after `timeoutMs`. */
  waitExit(timeoutMs: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.exitStatus) return Promise.resolve(this.exitStatus);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`agent ${this.options.node} did not exit within ${timeoutMs} ms\n${this.tail()}`)), timeoutMs);
      this.child.once("exit", (code, signal) => {
        clearTimeout(timer);
        resolve({ code, signal });
      });
    });
  }

  /**
   * Resolves with the first log line at index `fromLine` or later that satisfies `predicate`;
   * rejects on timeout or exit. Pass `agent.lines.length` to wait for a line not yet written.
   */
  waitForLog(predicate: (line: LogLine) => boolean, timeoutMs = 15_000, description = "log line", fromLine = 0): Promise<LogLine> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        const found = this.lines.slice(fromLine).find(predicate);
        if (found) {
          finish();
          resolve(found);
          return true;
        }
        if (this.exited) {
          finish();
          reject(new Error(`agent ${this.options.node} exited (code ${this.exitStatus?.code}, signal ${this.exitStatus?.signal}) before ${description}; log: ${this.options.logFile}\n${this.tail()}`));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${description} from agent ${this.options.node}\n${this.tail()}`));
      }, timeoutMs);
      const finish = (): void => {
        clearTimeout(timer);
        this.waiters.delete(wake);
      };
      const wake = (): void => void check();
      if (!check()) this.waiters.add(wake);
    });
  }

  /** Resolves once the agent logs that it is ready. */
  waitReady(timeoutMs = 20_000): Promise<LogLine> {
    return this.waitForLog((line) => line.msg === "agent ready", timeoutMs, "readiness");
  }

  /** Resolves once the agent has enrolled the pod `uid` ("namespace/name"), in a line at `fromLine` or later. */
  waitEnrolled(uid: string, timeoutMs = 15_000, fromLine = 0): Promise<LogLine> {
    return this.waitForLog((line) => line.msg === "workload enrolled" && line.workload === uid, timeoutMs, `enrollment of ${uid}`, fromLine);
  }

  /** Returns the last lines of the log, for error messages. */
  tail(count = 20): string {
    return this.lines.slice(-count).map((line) => JSON.stringify(line)).join("\n");
  }

  /**
   * Sends SIGTERM and waits for the exit; SIGKILL after `graceMs`, longer than the agent's own stop
   * deadline (its drain timeout, 5 s by default, plus 10 s).
   */
  async stop(graceMs = 20_000): Promise<void> {
    if (this.exited) return;
    const exited = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
    this.send("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    await exited;
    clearTimeout(timer);
  }

  /** Sends a signal without waiting, for signals that do not stop the agent (SIGHUP). */
  signal(name: NodeJS.Signals): void {
    this.send(name);
  }

  /** Sends `signal` to the signal target. A target that is gone already is no error. */
  private send(signal: NodeJS.Signals): void {
    const pid = this.signalTarget();
    if (pid === undefined || pid === this.child.pid) {
      this.child.kill(signal);
      return;
    }
    try {
      process.kill(pid, signal);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ESRCH") throw error;
    }
  }

  /** Kills the agent at once, as a crash would. */
  async kill(): Promise<void> {
    if (this.exited) return;
    const exited = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
    this.child.kill("SIGKILL");
    await exited;
  }
}

/** A real `ambient-agent run` process inside a node's network namespace. */
export class AgentProcess extends FollowedAgent<AgentProcessOptions> {
  constructor(options: AgentProcessOptions) {
    super(options, spawnAgent(options));
  }
}

function spawnAgent(options: AgentProcessOptions): ChildProcess {
  const args = [
    `--net=/var/run/netns/${options.nodeNetns}`,
    "--",
    process.execPath,
    ...AGENT_NODE_FLAGS,
    AGENT_BIN,
    "run",
    "--node", options.node,
    ...(options.kubeconfig ? ["--kubeconfig", options.kubeconfig] : ["--manifests", options.manifestsDir]),
    // An agent that requests certificates from Istio's CA has no embedded CA.
    ...((options.extraArgs ?? []).includes("--ca-address") ? [] : ["--ca-dir", options.caDir]),
    "--audit-file", options.auditFile,
    ...((options.extraArgs ?? []).includes("--audit-spool") ? [] : ["--audit-spool", options.spoolDir]),
    "--pin-root", options.pinRoot,
    ...((options.extraArgs ?? []).includes("--capture") ? [] : ["--capture", TEST_CAPTURE]),
    // The node's namespace is the host's for its agent, and this machine's own must stay untouched.
    ...((options.extraArgs ?? []).includes("--host-netns") ? [] : ["--host-netns", `/var/run/netns/${options.nodeNetns}`]),
    ...(options.extraArgs ?? []),
  ];
  return spawn("nsenter", args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...options.env, AMBIENT_AGENT_LOG_LEVEL: options.logLevel ?? "debug" } });
}
