// Builds and runs tcp-bench.c, the benchmark's TCP application: the echo server in the server pod and
// the latency, connection-rate, paced connection-setup and idle-connection clients in the client pod.

import { execFileSync, type ChildProcess } from "node:child_process";
import path from "node:path";
import type { Topology } from "../harness/topology";
import { runInPod, waitListening } from "./pod-process";
import { summarizeLatency, type LatencySummary } from "./stats";

/** The C source sits next to the TypeScript sources; tsc does not copy it to dist/. */
const SOURCE = path.resolve(__dirname, "..", "..", "..", "test", "bench", "tcp-bench.c");

export interface RateResult {
  completed: number;
  errors: number;
  elapsed_s: number;
  /** Failed connections by errno name (ECONNREFUSED, ETIMEDOUT, ...). */
  error_codes: Record<string, number>;
}

export interface ConnectResult {
  /** Time from connect() to the 1-byte echo of each completed connection, µs, in schedule order. */
  samples_us: number[];
  errors: number;
  /** Connections that started more than 1 ms after their scheduled time (every thread was busy or woke late), and the largest delay, µs. */
  late: number;
  max_late_us: number;
  elapsed_s: number;
  /** Failed connections by errno name. */
  error_codes: Record<string, number>;
}

export interface IdleOpened {
  opened: number;
  failed: number;
}

/** Runs the compiled tcp-bench program in pods; `binary` is the program compiled by build(). */
export class TcpBench {
  private constructor(
    private readonly topology: Topology,
    private readonly binary: string,
  ) {}

  /**
   * CPU that the echo server and the latency client run on (taskset), undefined for no pinning.
   * Unpinned, direct round trips between the pods were bimodal on a 2-core VM: about 20 µs or about
   * 70 µs from run to run, as the scheduler placed the two processes. Pinned, they stayed at 20 µs.
   */
  latencyCpu: number | undefined = 0;

  /** Returns the command and arguments that run the program, under taskset when pinned. */
  private command(args: string[], pinned: boolean): [string, string[]] {
    if (pinned && this.latencyCpu !== undefined) return ["taskset", ["-c", String(this.latencyCpu), this.binary, ...args]];
    return [this.binary, args];
  }

  /** Compiles tcp-bench.c with gcc into `workDir`. */
  static build(topology: Topology, workDir: string): TcpBench {
    const binary = path.join(workDir, "tcp-bench");
    try {
      execFileSync("gcc", ["-O2", "-Wall", "-pthread", "-o", binary, SOURCE], { stdio: "pipe" });
    } catch (error) {
      const stderr = String((error as { stderr?: Buffer }).stderr ?? "");
      throw new Error(`gcc failed to build ${SOURCE}: ${stderr.trim() || String(error)}; run \`make setup\` to install gcc`);
    }
    return new TcpBench(topology, binary);
  }

  /** Starts the echo server in `pod` and waits until it listens on `port`. */
  async startEchoServer(pod: string, port: number): Promise<ChildProcess> {
    const [command, args] = this.command(["server", String(port), this.topology.prefix], true);
    const server = this.topology.spawn(this.topology.pod(pod).netns, command, args, { stdio: ["ignore", "ignore", "ignore"] });
    await waitListening(this.topology, pod, port, server, "tcp-bench echo server");
    return server;
  }

  /** Runs `count` sequential round trips of `size` bytes each way on one connection, after `warmup` unrecorded ones. */
  async latency(pod: string, host: string, port: number, size: number, warmup: number, count: number): Promise<LatencySummary> {
    const output = await this.run(pod, ["latency", host, String(port), String(size), String(warmup), String(count)], 120_000, true);
    return summarizeLatency((JSON.parse(output) as { samples_us: number[] }).samples_us);
  }

  /** Opens, exchanges 1 byte on, and closes connections from `threads` threads for `seconds` or `maxCount` connections. */
  async rate(pod: string, host: string, port: number, threads: number, seconds: number, maxCount: number): Promise<RateResult> {
    const output = await this.run(pod, ["rate", host, String(port), String(threads), String(seconds), String(maxCount)], (seconds + 30) * 1000);
    return JSON.parse(output) as RateResult;
  }

  /**
   * Opens `count` connections at a fixed pace, one every `intervalUs`, each with a 1-byte echo, and
   * returns the time of each. Open loop: `threads` threads take the connections in order, so a slow
   * connection delays the next only when every thread is busy. Runs on the latency CPU, like latency().
   */
  async connect(pod: string, host: string, port: number, intervalUs: number, count: number, threads: number): Promise<ConnectResult> {
    const timeoutMs = (count * intervalUs) / 1000 + 60_000;
    const output = await this.run(pod, ["connect", host, String(port), String(intervalUs), String(count), String(threads)], timeoutMs, true);
    return JSON.parse(output) as ConnectResult;
  }

  /**
   * Starts a client in `pod` that opens `count` connections and keeps them open. It prints an IdleOpened
   * line when they are open, and closes them when a line is written to its stdin.
   */
  spawnIdle(pod: string, host: string, port: number, count: number): ChildProcess {
    return this.topology.spawn(this.topology.pod(pod).netns, this.binary, ["idle", host, String(port), String(count), this.topology.prefix], { stdio: ["pipe", "pipe", "pipe"] });
  }

  private run(pod: string, args: string[], timeoutMs: number, pinned = false): Promise<string> {
    const [command, fullArgs] = this.command([...args, this.topology.prefix], pinned);
    return runInPod(this.topology, pod, command, fullArgs, timeoutMs);
  }
}
