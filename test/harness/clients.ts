// Real clients and servers run inside pod namespaces: curl, python3's HTTP server, dumpcap.

import { spawn, type ChildProcess } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { Topology } from "./topology";

export interface CurlResult {
  /** curl's exit code: 0 on success, 7 refused, 28 timed out, 52 empty reply, 55 send failure, 56 receive failure (reset). */
  exitCode: number;
  /** The HTTP status, 0 when no response arrived. */
  status: number;
  body: Buffer;
  stderr: string;
}

/** Runs curl inside a pod's namespace and returns its outcome; never throws for a failed request. */
export function curl(topology: Topology, pod: string, url: string, timeoutSeconds = 10): Promise<CurlResult> {
  const netns = topology.pod(pod).netns;
  return new Promise((resolve, reject) => {
    const child = spawn("ip", ["netns", "exec", netns, "curl", "-sS", "--max-time", String(timeoutSeconds), "-o", "-", "-w", "\n%{http_code}", url]);
    const stdout: Buffer[] = [];
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.on("error", reject);
    child.on("close", (code) => {
      const output = Buffer.concat(stdout);
      const newline = output.lastIndexOf(0x0a);
      const status = Number(output.subarray(newline + 1).toString()) || 0;
      resolve({ exitCode: code ?? -1, status, body: output.subarray(0, Math.max(newline, 0)), stderr: stderr.trim() });
    });
  });
}

/**
 * True when curl saw its connection reset or refused: exit 7 when the reset came before the connect
 * completed, 56 after it, and 55 with ENOTCONN (errno 107) when it came between the connect and
 * curl's getpeername() call.
 * NOTE: curl 7.88 prints the same message for every exit 7, so an unreachable address passes too.
 * The callers also check the agent's audit record of the refusal.
 */
export function curlWasReset(result: Pick<CurlResult, "exitCode" | "stderr">): boolean {
  if (result.exitCode === 7 || result.exitCode === 56) return true;
  return result.exitCode === 55 && /getpeername\(\) failed with errno 107\b/.test(result.stderr);
}

/** Starts python3's HTTP server in a pod, serving `root` on `port`, and waits until it accepts connections. */
export async function startHttpServer(topology: Topology, pod: string, root: string, port: number): Promise<ChildProcess> {
  // Its request log goes nowhere: the tests read the agents' audit records instead.
  const server = topology.spawn(topology.pod(pod).netns, "python3", ["-m", "http.server", String(port), "--bind", "0.0.0.0", "--directory", root], {
    stdio: ["ignore", "ignore", "ignore"],
  });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const listening = topology.exec(topology.pod(pod).netns, "ss", ["-Hltn", `sport = :${port}`], { allowFail: true });
    if (listening.trim() !== "") return server;
    if (server.exitCode !== null) throw new Error(`HTTP server in ${pod} exited with code ${server.exitCode}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`HTTP server in ${pod} did not listen on ${port} within 10 s`);
}

/** Writes a file of `size` random bytes and returns its SHA-256 in hex. */
export function writeRandomFile(file: string, size: number): string {
  const data = crypto.randomBytes(size);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, data);
  return crypto.createHash("sha256").update(data).digest("hex");
}

export function sha256(data: Buffer): string {
  return crypto.createHash("sha256").update(data).digest("hex");
}

/** A packet capture running inside a namespace, written to a pcap file. */
export class PacketCapture {
  private constructor(
    private readonly child: ChildProcess,
    readonly file: string,
  ) {}

  /**
   * Starts tcpdump on `iface` in `netns` and waits until it is capturing. Immediate mode matters:
   * without it libpcap hands packets over in blocks, and a capture stopped within about a second
   * reports them "received by filter" but writes none.
   */
  static async start(topology: Topology, netns: string, iface: string, file: string): Promise<PacketCapture> {
    const logFile = `${file}.log`;
    const log = fs.openSync(logFile, "w");
    const args = ["-i", iface, "--immediate-mode", "-U", "-n", "-w", file, "tcp"];
    const child = topology.spawn(netns, "tcpdump", args, { stdio: ["ignore", log, log] });
    fs.closeSync(log);
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      const output = fs.readFileSync(logFile, "utf8");
      if (/listening on/.test(output)) return new PacketCapture(child, file);
      if (child.exitCode !== null) throw new Error(`tcpdump exited with code ${child.exitCode}: ${output.trim()}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    child.kill("SIGKILL");
    throw new Error(`tcpdump did not start capturing on ${iface} within 10 s: ${fs.readFileSync(logFile, "utf8").trim()}`);
  }

  /** Stops the capture and waits until the file is complete. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null) return;
    const exited = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
    this.child.kill("SIGINT");
    await exited;
  }
}
