// Single-stream throughput with iperf3: a server in the server pod and one client run per path.

import type { ChildProcess } from "node:child_process";
import path from "node:path";
import type { Topology } from "../harness/topology";
import { runInPod, waitListening } from "./pod-process";

export const IPERF_PORT = 5201;

export interface IperfResult {
  /** Bits per second that reached the server, averaged over the run. */
  bitsPerSecond: number;
  /** Bytes that reached the server. */
  bytes: number;
  seconds: number;
}

/**
 * Starts `iperf3 -s` in `pod`. Its log and PID files live in `workDir`, whose name carries the run's
 * prefix, so a later run can recognise and end a server that a crashed run left behind.
 */
export async function startIperfServer(topology: Topology, pod: string, workDir: string): Promise<ChildProcess> {
  const args = ["-s", "-p", String(IPERF_PORT), "--logfile", path.join(workDir, "iperf3-server.log"), "--pidfile", path.join(workDir, "iperf3-server.pid")];
  const server = topology.spawn(topology.pod(pod).netns, "iperf3", args, { stdio: ["ignore", "ignore", "ignore"] });
  await waitListening(topology, pod, IPERF_PORT, server, "iperf3 server");
  return server;
}

/** Runs one iperf3 client stream from `pod` to host:port for `seconds` and returns what the server received. */
export async function runIperfClient(topology: Topology, pod: string, host: string, port: number, seconds: number): Promise<IperfResult> {
  const args = ["-c", host, "-p", String(port), "-t", String(seconds), "-P", "1", "-J"];
  const output = await runInPod(topology, pod, "iperf3", args, (seconds + 20) * 1000);
  return parseIperfJson(output);
}

/** Reads the received totals from iperf3's JSON report (`iperf3 -J`). */
export function parseIperfJson(output: string): IperfResult {
  const report = JSON.parse(output) as { error?: string; end?: { sum_received?: { bits_per_second: number; bytes: number; seconds: number } } };
  if (report.error) throw new Error(`iperf3 failed: ${report.error}`);
  const received = report.end?.sum_received;
  if (!received || !(received.bytes > 0)) throw new Error(`iperf3 reported no received bytes: ${output.slice(0, 500)}`);
  return { bitsPerSecond: received.bits_per_second, bytes: received.bytes, seconds: received.seconds };
}
