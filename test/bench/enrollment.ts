// Enrolment time on one node with many pods. The namespaces and veth links are made before the agent
// starts and are not timed. A start is timed from the agent's "reading the manifests" line to its
// "agent ready" line, which it logs once every pod's listeners are up and its capture entries are
// written. The run checks that against the capture state (the pinned maps under eBPF, each pod's
// nftables table under nftables) and the pods' listeners before it reports.

import { execFileSync } from "node:child_process";
import { readCaptureEntries } from "../../agent/capture/ebpf/inspect";
import { NFT_TABLE_FAMILY, NFT_TABLE_NAME, nftBinary } from "../../agent/capture/nft/capture";
import type { CaptureMode } from "../../agent/capture/probe";
import type { LogLine } from "../harness/agent-process";
import { Cluster } from "../harness/cluster";
import type { PodSpec } from "../harness/topology";
import { round } from "./stats";

const NODE = "bench-enr";
const NAMESPACE = "bench-enroll";
const AGENT_PORTS = [15001, 15006, 15008];

export interface EnrollmentFigures {
  pods: number;
  /** The capture mode the agent ran in; absent from runs before nftables was measured, which used eBPF. */
  capture?: CaptureMode;
  /** Each start's time from "reading the manifests" to "agent ready", in ms; the first start is cold. */
  starts_ms: number[];
  /** The median of starts_ms. */
  median_ms: number;
  /** Where the first start's time went, in ms: manifests read, capture attached, pods enrolled. */
  first_start_phases_ms: { manifests: number; capture: number; pods: number };
}

/** Returns the time of the first line whose message is one of `messages`; throws when there is none. */
function timeOf(lines: LogLine[], messages: string[]): number {
  const line = lines.find((entry) => messages.includes(String(entry.msg)));
  if (typeof line?.time !== "number") throw new Error(`the agent logged no "${messages.join('" or "')}" line`);
  return line.time;
}

/** Throws unless every pod has its three listeners and its capture state: pinned map entries, or its nftables table. */
function assertEveryPodServed(cluster: Cluster, pods: number, capture: CaptureMode): void {
  if (capture === "ebpf") assertPinnedEntries(cluster, pods);
  for (const pod of cluster.topology.pods.values()) {
    const netns = `--net=/var/run/netns/${pod.netns}`;
    const output = execFileSync("nsenter", [netns, "--", "ss", "-Hltn"], { encoding: "utf8" });
    const missing = AGENT_PORTS.filter((port) => !output.includes(`:${port} `));
    if (missing.length > 0) throw new Error(`pod ${pod.name} has no listener on ${missing.join(", ")} after "agent ready"`);
    if (capture === "nftables") {
      // Throws when the table is missing.
      execFileSync("nsenter", [netns, "--", nftBinary(), "list", "table", NFT_TABLE_FAMILY, NFT_TABLE_NAME], { stdio: "pipe" });
    }
  }
}

function assertPinnedEntries(cluster: Cluster, pods: number): void {
  const entries = readCaptureEntries(cluster.pinRoot(NODE));
  const counts = [entries.enrolled.length, entries.inboundPods.length, entries.inboundListeners.length, entries.inboundLinks.length];
  if (counts.some((count) => count !== pods)) {
    throw new Error(`expected ${pods} entries in each capture map and link folder, found ${counts.join(", ")} (enrolled, inbound pods, listeners, links)`);
  }
}

/**
 * Returns the time capture was ready. eBPF logs when its programs are attached; nftables has
 * nothing to attach before the pods, so its capture phase ends when the manifests are read.
 */
function captureReadyTime(lines: LogLine[], capture: CaptureMode): number {
  if (capture === "nftables") return timeOf(lines, ["manifest source started"]);
  return timeOf(lines, ["capture programs attached", "capture programs updated in place"]);
}

/** Starts the node's agent (a new process each time) and returns its log lines once it serves every pod. */
async function startOnce(cluster: Cluster, podNames: string[], first: boolean): Promise<LogLine[]> {
  if (first) await cluster.startAgents(podNames);
  else await cluster.restartAgent(NODE, podNames);
  return cluster.agent(NODE).lines;
}

/**
 * Measures `starts` agent starts for one node with `podCount` pods, each with its own service
 * account (so one certificate per pod), with the agent in the `capture` mode. The first start is
 * cold; later ones reuse the pins or tables, as after an agent restart. `step` receives progress lines.
 */
export async function measureEnrollment(
  prefix: string,
  podCount: number,
  starts: number,
  step: (message: string) => void,
  capture: CaptureMode = "ebpf",
): Promise<EnrollmentFigures> {
  const pods: PodSpec[] = Array.from({ length: podCount }, (_, index) => ({ name: `p${index}`, namespace: NAMESPACE, serviceAccount: `sa${index}` }));
  step(`enrolment (${capture}): building one node with ${podCount} pods`);
  const cluster = Cluster.create({
    prefix,
    nodes: [{ name: NODE, pods }],
    namespaces: [{ name: NAMESPACE, ambient: true }],
    agentLogLevel: "info",
    agentArgs: ["--capture", capture],
  });
  try {
    const podNames = pods.map((pod) => pod.name);
    const startsMs: number[] = [];
    let phases = { manifests: Number.NaN, capture: Number.NaN, pods: Number.NaN };
    for (let index = 0; index < starts; index++) {
      if (index > 0) await cluster.agent(NODE).stop();
      const lines = await startOnce(cluster, podNames, index === 0);
      const reading = timeOf(lines, ["reading the manifests"]);
      const ready = timeOf(lines, ["agent ready"]);
      assertEveryPodServed(cluster, podCount, capture);
      startsMs.push(ready - reading);
      if (index === 0) {
        const read = timeOf(lines, ["manifest source started"]);
        const attached = captureReadyTime(lines, capture);
        phases = { manifests: read - reading, capture: attached - read, pods: ready - attached };
        step(`enrolment (${capture}): first start in ms: manifests read ${phases.manifests}, capture attached ${phases.capture}, pods enrolled ${phases.pods}`);
      }
      step(`enrolment (${capture}): start ${index + 1}: ${ready - reading} ms from reading the manifests to serving ${podCount} pods`);
    }
    const sorted = [...startsMs].sort((a, b) => a - b);
    return { pods: podCount, capture, starts_ms: startsMs, median_ms: round(sorted[Math.floor(sorted.length / 2)], 0), first_start_phases_ms: phases };
  } finally {
    await cluster.destroy({ removeWorkDir: true });
  }
}
