// Runs the benchmark's tools inside pod namespaces through the harness's Topology, so that the
// topology's clean-up ends whatever is still running.

import type { ChildProcess } from "node:child_process";
import type { Topology } from "../harness/topology";

export interface PodRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Collects a child's output and resolves when it exits; kills it with SIGKILL after `timeoutMs`. */
export function waitForExit(child: ChildProcess, timeoutMs: number, description: string): Promise<PodRun> {
  return new Promise((resolve, reject) => {
    let stdout = "";
    let stderr = "";
    child.stdout?.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${description} did not finish within ${timeoutMs} ms; stderr: ${stderr.trim()}`));
    }, timeoutMs);
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(new Error(`${description} could not start: ${error.message}`));
    });
    child.once("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs a command inside a pod and resolves with its output; rejects on a non-zero exit or after `timeoutMs`. */
export async function runInPod(topology: Topology, pod: string, command: string, args: string[], timeoutMs: number): Promise<string> {
  const description = `${command} in pod ${pod}`;
  const child = topology.spawn(topology.pod(pod).netns, command, args);
  const result = await waitForExit(child, timeoutMs, description);
  if (result.code !== 0) {
    throw new Error(`${description} exited with code ${String(result.code)}: ${result.stderr.trim() || result.stdout.trim()}`);
  }
  return result.stdout;
}

/** Waits until something in `pod` listens on TCP `port`; rejects if `child` exits first or after 10 s. */
export async function waitListening(topology: Topology, pod: string, port: number, child: ChildProcess, what: string): Promise<void> {
  const netns = topology.pod(pod).netns;
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const listening = topology.exec(netns, "ss", ["-Hltn", `sport = :${port}`], { allowFail: true });
    if (listening.trim() !== "") return;
    if (child.exitCode !== null) throw new Error(`${what} in pod ${pod} exited with code ${child.exitCode} before listening on port ${port}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`${what} in pod ${pod} did not listen on port ${port} within 10 s`);
}
