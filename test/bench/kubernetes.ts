// The Kubernetes figures of `make bench`, each on a cluster of its own (prefix family aakbench) that
// reads the fake API server of the harness (HTTPS with a token, inside the node's namespace):
//
//   label change  one node with 100 pods in an unlabelled namespace and the agent running. The
//                 namespace gets istio.io/dataplane-mode=ambient and the time runs from that write
//                 until the agent's last "workload enrolled" log line (its pino timestamp), and
//                 until the fake server contains all 100 ambient.istio.io/redirection annotations
//                 (polled every 10 ms). The label is then removed and the pods leave before the next
//                 round. The same change in manifest mode rewrites namespaces.yaml instead
//   memory        the agent of one node with a few local pods, first with an otherwise empty cluster
//                 and then with 10,000 pods of other nodes (about 3 KB of JSON each), 1,000 Services
//                 and their EndpointSlices in the server. RSS (VmRSS) is read once the agent is ready
//                 and has been idle for the settle time; the first sync runs from the agent's
//                 "reading the configuration" line to its "Kubernetes API source started" line
//   churn         with the large cluster loaded, 100 pod objects of other nodes change per second for
//                 10 s; the figures are the agent's CPU share over that time and how long after the
//                 last change its watch of those pods reached the server's resourceVersion, polled
//                 through the admin API every 50 ms (each poll takes some 20 ms)
//
// The label-change rounds run in one agent process per mode; each memory round starts a new agent
// process. Medians over the rounds are the figures, except the peak RSS, which is the maximum.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { AGENT_BIN } from "../harness/agent-process";
import type { AgentProcess, LogLine } from "../harness/agent-process";
import { Cluster, removeLeftovers } from "../harness/cluster";
import type { FakeKubeApi } from "../harness/fake-kube-api";
import { namespaceYaml, writeManifest } from "../harness/manifests";
import type { PodSpec } from "../harness/topology";
import { clusterObjects, remotePod, type ClusterShape } from "./kubernetes-objects";
import { snapshotHeap } from "./heap-snapshot";
import { MEMORY_READING_MESSAGE } from "./memory-hook";
import { assertProcessRuns, cpuSeconds, rssKib } from "./proc-stats";
import { round } from "./stats";

const PREFIX_FAMILY = "aakbench";
const DATAPLANE_LABEL = "istio.io/dataplane-mode";
const REDIRECTION_ANNOTATION = "ambient.istio.io/redirection";
const LABEL_NODE = "kb-label";
const LABEL_NAMESPACE = "bench-label";
const MEMORY_NODE = "kb-mem";
const LOCAL_NAMESPACE = "bench-local";
const ADMIN_URL = "http://127.0.0.1:15000/kubernetes";
const MEMORY_HOOK = path.join(__dirname, "memory-hook.js");

/** Target: every pod of a newly labelled namespace enrolled within this many ms. */
const LABEL_TARGET_MS = 2000;
/** Target: agent RSS with the large cluster loaded, in MB (MiB as VmRSS counts it). */
/** The memory target: 150 MB (10^6 bytes), which is 143.05 MiB; RSS figures are in MiB. */
const MEMORY_TARGET_MB = 150;
const MEMORY_TARGET_MIB = (MEMORY_TARGET_MB * 1e6) / 2 ** 20;

export interface KubernetesSettings {
  labelPods: number;
  labelRounds: number;
  shape: ClusterShape;
  localPods: number;
  memoryRounds: number;
  /** Idle time before each memory reading, so that work in flight finishes. */
  settleMs: number;
  churnPerSecond: number;
  churnSeconds: number;
  /** Write a heap snapshot of the loaded agent and list the largest constructors by shallow size. */
  heapSnapshot: boolean;
}

export const KUBERNETES_FULL: KubernetesSettings = {
  labelPods: 100,
  labelRounds: 3,
  shape: { pods: 10_000, services: 1000, namespaces: 50, remoteNodes: 200 },
  localPods: 3,
  memoryRounds: 3,
  settleMs: 5000,
  churnPerSecond: 100,
  churnSeconds: 10,
  heapSnapshot: false,
};

export const KUBERNETES_QUICK: KubernetesSettings = { ...KUBERNETES_FULL, labelRounds: 1, memoryRounds: 1, settleMs: 2000, churnSeconds: 3 };

export interface LabelChangeFigures {
  pods: number;
  /** Per round: ms from the label write until the last "workload enrolled" line. */
  enrolled_ms: number[];
  enrolled_median_ms: number;
  /** Kubernetes mode only: ms from the label write until every pod carries the redirection annotation. */
  annotated_ms?: number[];
  annotated_median_ms?: number;
}

/** process.memoryUsage() of an agent after the settle time, then after a forced full GC with VmRSS 1 s later, MiB. */
export interface HeapFigures {
  heap_used_mb: number;
  heap_total_mb: number;
  external_mb: number;
  heap_used_after_gc_mb: number;
  heap_total_after_gc_mb: number;
  rss_after_gc_mb: number;
}

export interface MemoryFigures {
  pods: number;
  services: number;
  endpoint_slices: number;
  local_pods: number;
  /** VmRSS per start with only the local pods in the cluster, MiB. */
  baseline_rss_mb: number[];
  baseline_rss_median_mb: number;
  /** RssAnon of the median-RSS start, empty and loaded, MiB: the heaps without the mapped Node.js binary. */
  baseline_rss_anonymous_mb: number;
  loaded_rss_anonymous_mb: number;
  /** VmRSS per start with the large cluster loaded, MiB, and the peak (VmHWM) of each start. */
  loaded_rss_mb: number[];
  loaded_rss_median_mb: number;
  loaded_peak_rss_mb: number[];
  /** ms from "reading the configuration" to "Kubernetes API source started", per loaded start, and to "agent ready". */
  first_sync_ms: number[];
  first_sync_median_ms: number;
  ready_ms: number[];
  /** Heap of the median-RSS start, empty and loaded. */
  baseline_heap: HeapFigures;
  loaded_heap: HeapFigures;
  /** Sum of shallow sizes in a heap snapshot of the last loaded start, MiB; absent without --heap-snapshot. */
  heap_used_mb?: number;
  /** Largest constructors of that snapshot by shallow size. */
  heap_top?: { name: string; count: number; mb: number }[];
}

export interface ChurnFigures {
  changes_per_s: number;
  seconds: number;
  changes: number;
  /** Agent CPU over the churn, as a share of one core, percent. */
  agent_cpu_percent: number;
  /** ms from the last change until the agent's watch had reached its resourceVersion. */
  catch_up_ms: number;
  rss_after_mb: number;
}

export interface KubernetesFigures {
  label_change: { kubernetes: LabelChangeFigures; manifests: LabelChangeFigures };
  memory: MemoryFigures;
  churn?: ChurnFigures;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function labelPods(count: number): PodSpec[] {
  return Array.from({ length: count }, (_, index) => ({ name: `p${index}`, namespace: LABEL_NAMESPACE, serviceAccount: `sa${index}` }));
}

/** Waits until the agent logged `message` for every pod at `fromLine` or later; returns the latest pino time. */
async function waitForEveryPod(agent: AgentProcess, message: string, pods: number, fromLine: number, timeoutMs: number): Promise<number> {
  const seen = new Map<string, number>();
  const count = (line: LogLine): boolean => {
    if (line.msg === message && typeof line.workload === "string" && String(line.workload).startsWith(`${LABEL_NAMESPACE}/`)) {
      seen.set(line.workload, Number(line.time));
    }
    return seen.size >= pods;
  };
  await agent.waitForLog(count, timeoutMs, `"${message}" for ${pods} pods`, fromLine);
  return Math.max(...seen.values());
}

/** Polls the fake server every 10 ms until every pod's annotation is `wanted` (undefined: absent); returns Date.now() then. */
async function waitForAnnotations(kube: FakeKubeApi, pods: number, wanted: string | undefined, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let matching = 0;
    for (let index = 0; index < pods; index++) {
      const annotations = (kube.get("pods", LABEL_NAMESPACE, `p${index}`)?.metadata?.annotations ?? {}) as Record<string, string>;
      if (annotations[REDIRECTION_ANNOTATION] === wanted) matching++;
    }
    if (matching === pods) return Date.now();
    if (Date.now() > deadline) throw new Error(`${matching} of ${pods} pods have ${REDIRECTION_ANNOTATION}=${String(wanted)} after ${timeoutMs} ms`);
    await sleep(10);
  }
}

/** Builds the label-change node in either mode and starts its agent with no pod enrolled. */
async function labelCluster(prefix: string, pods: number, kubernetes: boolean): Promise<Cluster> {
  const options = {
    prefix,
    nodes: [{ name: LABEL_NODE, pods: labelPods(pods) }],
    namespaces: [{ name: LABEL_NAMESPACE, ambient: false }],
    agentLogLevel: "info",
  };
  const cluster = kubernetes ? await Cluster.createWithApi(options) : Cluster.create(options);
  try {
    await cluster.startAgents([]);
  } catch (error) {
    await cluster.destroy({ removeWorkDir: false });
    throw error;
  }
  return cluster;
}

/** Sets or removes the ambient label of the namespace, through the API server or the manifest file. */
function setAmbient(cluster: Cluster, ambient: boolean): void {
  if (cluster.kube) cluster.kube.patchLabels("namespaces", undefined, LABEL_NAMESPACE, { [DATAPLANE_LABEL]: ambient ? "ambient" : null });
  else writeManifest(cluster.manifestsDir, "namespaces.yaml", namespaceYaml({ name: LABEL_NAMESPACE, ambient }));
}

/** Measures the label change `rounds` times in one mode: label, wait for enrolment (and annotations), unlabel, wait for the pods to leave. */
async function measureLabelMode(prefix: string, settings: KubernetesSettings, kubernetes: boolean, step: (message: string) => void): Promise<LabelChangeFigures> {
  const mode = kubernetes ? "kubernetes" : "manifests";
  const pods = settings.labelPods;
  step(`kubernetes: label change (${mode}): one node with ${pods} pods`);
  const cluster = await labelCluster(prefix, pods, kubernetes);
  let succeeded = false;
  try {
    const agent = cluster.agent(LABEL_NODE);
    const enrolled: number[] = [];
    const annotated: number[] = [];
    for (let index = 0; index < settings.labelRounds; index++) {
      const fromLine = agent.lines.length;
      const start = Date.now();
      setAmbient(cluster, true);
      const annotations = cluster.kube ? waitForAnnotations(cluster.kube, pods, "enabled", 30_000) : undefined;
      const lastEnrolled = await waitForEveryPod(agent, "workload enrolled", pods, fromLine, 30_000);
      enrolled.push(lastEnrolled - start);
      if (annotations) annotated.push((await annotations) - start);
      step(`kubernetes: label change (${mode}) round ${index + 1}: ${pods} pods enrolled after ${lastEnrolled - start} ms${annotations ? `, annotated after ${annotated[index]} ms` : ""}`);

      const leaveLine = agent.lines.length;
      setAmbient(cluster, false);
      await waitForEveryPod(agent, "workload unenrolled", pods, leaveLine, 30_000);
      if (cluster.kube) await waitForAnnotations(cluster.kube, pods, undefined, 30_000);
    }
    succeeded = true;
    return {
      pods,
      enrolled_ms: enrolled,
      enrolled_median_ms: median(enrolled),
      ...(kubernetes ? { annotated_ms: annotated, annotated_median_ms: median(annotated) } : {}),
    };
  } finally {
    if (!succeeded) step(`kubernetes: label change (${mode}) failed: agent logs are kept in ${cluster.workDir}`);
    await cluster.destroy({ removeWorkDir: succeeded });
  }
}

/** Returns VmRSS, its anonymous part (RssAnon: heaps and stacks, not the mapped binary) and VmHWM of `pid`, in KiB. */
function memoryKib(pid: number): { rss: number; anonymous: number; peak: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+) kB$`, "m").exec(status)?.[1] ?? Number.NaN);
  return { rss: rssKib(pid), anonymous: field("RssAnon"), peak: field("VmHWM") };
}

function timeOf(lines: LogLine[], message: string, fromLine: number): number {
  const line = lines.slice(fromLine).find((entry) => entry.msg === message);
  if (typeof line?.time !== "number") throw new Error(`the agent logged no "${message}" line`);
  return line.time;
}

interface StartReading {
  rssKib: number;
  anonymousKib: number;
  peakKib: number;
  firstSyncMs: number;
  readyMs: number;
  pid: number;
  /** process.memoryUsage() of the agent before and after a full GC, and VmRSS 1 s after it, in KiB. */
  heap: { before: HeapUsage; after: HeapUsage; rssAfterGcKib: number };
}

interface HeapUsage {
  heapUsed: number;
  heapTotal: number;
  external: number;
  arrayBuffers: number;
}

/**
 * Starts the memory node's agent (the first start through startAgents, later ones as restarts),
 * waits up to 120 s for it to be ready, then for the settle time, and reads its memory: VmRSS
 * first, then through memory-hook.js the heap before and after a full GC. With `heapDir` the hook
 * also writes a heap snapshot there.
 */
async function startAndRead(cluster: Cluster, first: boolean, localPods: string[], settleMs: number, heapDir?: string): Promise<StartReading> {
  const previous = process.env.NODE_OPTIONS;
  process.env.NODE_OPTIONS = `${previous ?? ""} --require ${MEMORY_HOOK}`.trim();
  if (heapDir !== undefined) process.env.AMBIENT_BENCH_HEAP_DIR = heapDir;
  try {
    if (first) await cluster.startAgents(localPods);
    else await cluster.restartAgent(MEMORY_NODE, localPods);
  } catch (error) {
    // The harness waits 20 s for readiness; a large first list may take longer, which is a figure too.
    if (!/timed out/.test((error as Error).message)) throw error;
    await cluster.agent(MEMORY_NODE).waitReady(120_000);
    await cluster.waitEnrolled(localPods);
  } finally {
    if (previous === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = previous;
    delete process.env.AMBIENT_BENCH_HEAP_DIR;
  }
  const agent = cluster.agent(MEMORY_NODE);
  const pid = agent.pid!;
  assertProcessRuns(pid, AGENT_BIN);
  // Each start is a new AgentProcess, whose lines are this agent's alone.
  const fromLine = 0;
  const reading = timeOf(agent.lines, "reading the configuration from the Kubernetes API server", fromLine);
  await sleep(settleMs);
  const memory = memoryKib(pid);
  const heap = await readHeap(agent, heapDir !== undefined);
  return {
    heap,
    rssKib: memory.rss,
    anonymousKib: memory.anonymous,
    peakKib: memory.peak,
    firstSyncMs: timeOf(agent.lines, "Kubernetes API source started", fromLine) - reading,
    readyMs: timeOf(agent.lines, "agent ready", fromLine) - reading,
    pid,
  };
}

/** The start whose RSS is the median. */
function medianReading(readings: StartReading[]): StartReading {
  return [...readings].sort((a, b) => a.rssKib - b.rssKib)[Math.floor(readings.length / 2)];
}

function describeHeap(reading: StartReading): string {
  const { before, after, rssAfterGcKib } = reading.heap;
  return `heap used ${mib(before.heapUsed)} of ${mib(before.heapTotal)} MiB and external ${mib(before.external)} MiB, after a full GC ${mib(after.heapUsed)} of ${mib(after.heapTotal)} MiB, external ${mib(after.external)} MiB and RSS ${mib(rssAfterGcKib)} MiB`;
}

/** The heap figures of the median-RSS start, MiB. */
function heapFigures(readings: StartReading[]): HeapFigures {
  const { before, after, rssAfterGcKib } = medianReading(readings).heap;
  return {
    heap_used_mb: mib(before.heapUsed),
    heap_total_mb: mib(before.heapTotal),
    external_mb: mib(before.external),
    heap_used_after_gc_mb: mib(after.heapUsed),
    heap_total_after_gc_mb: mib(after.heapTotal),
    rss_after_gc_mb: mib(rssAfterGcKib),
  };
}

function mib(kib: number): number {
  return round(kib / 1024, 1);
}

/** Puts every object of the large cluster into the fake server. */
function loadCluster(kube: FakeKubeApi, shape: ClusterShape): number {
  let count = 0;
  for (const object of clusterObjects(shape)) {
    kube.put(object);
    count++;
  }
  return count;
}

/** Makes the agent's memory hook log its heap, collect garbage and log it again; returns both and VmRSS 1 s later. */
async function readHeap(agent: AgentProcess, withSnapshot: boolean): Promise<StartReading["heap"]> {
  const fromLine = agent.lines.length;
  const logged = (phase: string): Promise<LogLine> =>
    agent.waitForLog((line) => line.msg === MEMORY_READING_MESSAGE && line.phase === phase, 120_000, `the memory hook's "${phase}" line`, fromLine);
  agent.signal("SIGUSR2");
  await logged("after gc");
  const reading = (phase: string): HeapUsage => {
    const line = agent.lines.slice(fromLine).find((entry) => entry.msg === MEMORY_READING_MESSAGE && entry.phase === phase) as unknown as HeapUsage;
    return { heapUsed: line.heapUsed / 1024, heapTotal: line.heapTotal / 1024, external: line.external / 1024, arrayBuffers: line.arrayBuffers / 1024 };
  };
  await sleep(1000);
  const rssAfterGcKib = rssKib(agent.pid!);
  // The hook starts the snapshot 2 s after the GC, so the RSS above is without it.
  if (withSnapshot) await logged("heap snapshot");
  return { before: reading("before gc"), after: reading("after gc"), rssAfterGcKib };
}

/** Returns the resourceVersion that the agent's watch of the other nodes' pods has reached, from its admin API. */
function agentResourceVersion(cluster: Cluster): number {
  const netns = `--net=/var/run/netns/${cluster.topology.node(MEMORY_NODE).netns}`;
  const output = execFileSync("nsenter", [netns, "--", "curl", "-s", "--max-time", "2", ADMIN_URL], { encoding: "utf8" });
  const health = JSON.parse(output) as { resources?: { resource?: string; resourceVersion?: string }[] };
  // Only the watch that receives the changes: the others reach the same version by bookmarks.
  const pods = (health.resources ?? []).find((resource) => resource.resource === "pods of other nodes");
  return Number(pods?.resourceVersion) || 0;
}

/**
 * Changes `churnPerSecond` pod objects of other nodes per second for `churnSeconds`, in 100 ms ticks
 * (an annotation with the change number), then waits up to 30 s for the agent's watch to catch up.
 */
async function measureChurn(cluster: Cluster, settings: KubernetesSettings, pid: number, step: (message: string) => void): Promise<ChurnFigures> {
  const kube = cluster.kube!;
  const perTick = Math.max(1, Math.round(settings.churnPerSecond / 10));
  const ticks = settings.churnSeconds * 10;
  step(`kubernetes: churn: ${perTick * 10} pod changes per second for ${settings.churnSeconds} s`);
  const pods = Array.from({ length: Math.min(settings.shape.pods, perTick * ticks) }, (_, index) => remotePod(settings.shape, index));
  const cpuBefore = cpuSeconds(pid);
  const started = Date.now();
  let changes = 0;
  let lastChange = started;
  for (let tick = 0; tick < ticks; tick++) {
    for (let index = 0; index < perTick; index++) {
      const pod = pods[changes % pods.length];
      const metadata = pod.metadata as { annotations: Record<string, string> };
      metadata.annotations = { ...metadata.annotations, "bench.example/change": String(changes) };
      kube.put(pod);
      changes++;
    }
    lastChange = Date.now();
    if (tick === ticks - 1) break;
    const due = started + (tick + 1) * 100;
    await sleep(Math.max(0, due - Date.now()));
  }
  const elapsedS = (Date.now() - started) / 1000;
  const cpuUsed = cpuSeconds(pid) - cpuBefore;
  const target = Number(kube.resourceVersion);
  const deadline = lastChange + 30_000;
  while (agentResourceVersion(cluster) < target) {
    if (Date.now() > deadline) throw new Error(`the agent's watches did not reach resourceVersion ${target} within 30 s of the last change`);
    await sleep(50);
  }
  const catchUpMs = Date.now() - lastChange;
  await sleep(settings.settleMs);
  const figures = {
    changes_per_s: round(changes / elapsedS, 0),
    seconds: round(elapsedS, 1),
    changes,
    agent_cpu_percent: round((cpuUsed / elapsedS) * 100, 1),
    catch_up_ms: catchUpMs,
    rss_after_mb: mib(rssKib(pid)),
  };
  step(`kubernetes: churn: ${changes} changes in ${figures.seconds} s, agent CPU ${figures.agent_cpu_percent} % of a core, caught up ${catchUpMs} ms after the last change`);
  return figures;
}

/** Measures the agent's memory with an empty and with a large cluster, then the churn figures on the large one. */
async function measureMemoryAndChurn(prefix: string, settings: KubernetesSettings, step: (message: string) => void): Promise<{ memory: MemoryFigures; churn: ChurnFigures }> {
  const localPods: PodSpec[] = Array.from({ length: settings.localPods }, (_, index) => ({ name: `local${index}`, namespace: LOCAL_NAMESPACE, serviceAccount: `local${index}` }));
  const localNames = localPods.map((pod) => pod.name);
  step(`kubernetes: memory: one node with ${settings.localPods} local pods`);
  const cluster = await Cluster.createWithApi({
    prefix,
    nodes: [{ name: MEMORY_NODE, pods: localPods }],
    namespaces: [{ name: LOCAL_NAMESPACE, ambient: true }],
    agentLogLevel: "info",
  });
  let succeeded = false;
  const snapshotDir = fs.mkdtempSync(path.join(os.tmpdir(), `${prefix}-heap-`));
  try {
    const baseline: StartReading[] = [];
    for (let index = 0; index < settings.memoryRounds; index++) {
      if (index > 0) await cluster.agent(MEMORY_NODE).stop();
      baseline.push(await startAndRead(cluster, index === 0, localNames, settings.settleMs));
      step(`kubernetes: memory: empty cluster, start ${index + 1}: RSS ${mib(baseline[index].rssKib)} MiB (anonymous ${mib(baseline[index].anonymousKib)} MiB), ${describeHeap(baseline[index])}, first sync ${baseline[index].firstSyncMs} ms`);
    }
    await cluster.agent(MEMORY_NODE).stop();

    const { shape } = settings;
    const loadStarted = Date.now();
    const objects = loadCluster(cluster.kube!, shape);
    step(`kubernetes: memory: ${objects} objects put into the fake API server in ${Date.now() - loadStarted} ms`);
    const loaded: StartReading[] = [];
    for (let index = 0; index < settings.memoryRounds; index++) {
      if (index > 0) await cluster.agent(MEMORY_NODE).stop();
      const last = index === settings.memoryRounds - 1;
      loaded.push(await startAndRead(cluster, false, localNames, settings.settleMs, last && settings.heapSnapshot ? snapshotDir : undefined));
      const reading = loaded[index];
      step(`kubernetes: memory: large cluster, start ${index + 1}: RSS ${mib(reading.rssKib)} MiB (anonymous ${mib(reading.anonymousKib)} MiB, peak ${mib(reading.peakKib)} MiB), ${describeHeap(reading)}, first sync ${reading.firstSyncMs} ms, ready ${reading.readyMs} ms`);
    }
    const heap = settings.heapSnapshot ? await snapshotHeap(snapshotDir, step) : undefined;
    // Writing the snapshot grows the agent's malloc heap, so the churn runs on a new agent.
    if (heap) {
      await cluster.agent(MEMORY_NODE).stop();
      await startAndRead(cluster, false, localNames, settings.settleMs);
    }
    const churn = await measureChurn(cluster, settings, cluster.agent(MEMORY_NODE).pid!, step);

    const memory: MemoryFigures = {
      pods: shape.pods,
      services: shape.services,
      endpoint_slices: shape.services,
      local_pods: settings.localPods,
      baseline_rss_mb: baseline.map((reading) => mib(reading.rssKib)),
      baseline_rss_median_mb: mib(median(baseline.map((reading) => reading.rssKib))),
      baseline_rss_anonymous_mb: mib(medianReading(baseline).anonymousKib),
      loaded_rss_anonymous_mb: mib(medianReading(loaded).anonymousKib),
      loaded_rss_mb: loaded.map((reading) => mib(reading.rssKib)),
      loaded_rss_median_mb: mib(median(loaded.map((reading) => reading.rssKib))),
      loaded_peak_rss_mb: loaded.map((reading) => mib(reading.peakKib)),
      first_sync_ms: loaded.map((reading) => reading.firstSyncMs),
      first_sync_median_ms: median(loaded.map((reading) => reading.firstSyncMs)),
      ready_ms: loaded.map((reading) => reading.readyMs),
      baseline_heap: heapFigures(baseline),
      loaded_heap: heapFigures(loaded),
      ...(heap ? { heap_used_mb: heap.usedMb, heap_top: heap.top } : {}),
    };
    succeeded = true;
    return { memory, churn };
  } finally {
    if (!succeeded) step(`kubernetes: memory failed: agent logs are kept in ${cluster.workDir}`);
    await cluster.destroy({ removeWorkDir: succeeded });
    fs.rmSync(snapshotDir, { recursive: true, force: true });
  }
}

/**
 * Measures the Kubernetes figures: the label change in both modes, then memory and churn. Each
 * part builds its own cluster and removes it. `step` receives progress lines.
 */
export async function measureKubernetes(settings: KubernetesSettings, step: (message: string) => void): Promise<KubernetesFigures> {
  removeLeftovers(PREFIX_FAMILY);
  const prefix = `${PREFIX_FAMILY}${process.pid}`;
  const kubernetes = await measureLabelMode(`${prefix}k`, settings, true, step);
  const manifests = await measureLabelMode(`${prefix}m`, settings, false, step);
  const { memory, churn } = await measureMemoryAndChurn(`${prefix}s`, settings, step);
  return { label_change: { kubernetes, manifests }, memory, churn };
}

function met(value: number, target: number): string {
  if (!Number.isFinite(value)) return "n/a";
  return value <= target ? "yes" : "no";
}

function kubernetesRows(figures: KubernetesFigures): string[][] {
  const { kubernetes, manifests } = figures.label_change;
  const { memory, churn } = figures;
  const pods = `${kubernetes.pods} pods`;
  const rows = [
    [`label change, ${pods} enrolled (kubernetes)`, `${kubernetes.enrolled_median_ms} ms`, `≤ ${LABEL_TARGET_MS} ms`, met(kubernetes.enrolled_median_ms, LABEL_TARGET_MS)],
    [`label change, ${pods} annotated (kubernetes)`, `${kubernetes.annotated_median_ms ?? Number.NaN} ms`, "", ""],
    [`label change, ${pods} enrolled (manifests)`, `${manifests.enrolled_median_ms} ms`, `≤ ${LABEL_TARGET_MS} ms`, met(manifests.enrolled_median_ms, LABEL_TARGET_MS)],
    [`agent RSS, ${memory.local_pods} local pods, empty cluster`, `${memory.baseline_rss_median_mb} MiB`, "", ""],
    [`agent RSS, ${memory.pods} pods, ${memory.services} services`, `${memory.loaded_rss_median_mb} MiB`, `≤ ${MEMORY_TARGET_MB} MB`, met(memory.loaded_rss_median_mb, MEMORY_TARGET_MIB)],
    [`  of which anonymous (heaps), empty / large`, `${memory.baseline_rss_anonymous_mb} / ${memory.loaded_rss_anonymous_mb} MiB`, "", ""],
    [`  heap used / total, empty cluster`, `${memory.baseline_heap.heap_used_mb} / ${memory.baseline_heap.heap_total_mb} MiB`, "", ""],
    [`  heap used / total, large cluster`, `${memory.loaded_heap.heap_used_mb} / ${memory.loaded_heap.heap_total_mb} MiB`, "", ""],
    [`  after a forced full GC: heap used, RSS`, `${memory.loaded_heap.heap_used_after_gc_mb}, ${memory.loaded_heap.rss_after_gc_mb} MiB`, "", ""],
    [`agent peak RSS, same cluster`, `${Math.max(...memory.loaded_peak_rss_mb)} MiB`, "", ""],
    [`first sync, same cluster`, `${memory.first_sync_median_ms} ms`, "", ""],
  ];
  if (memory.heap_used_mb !== undefined) rows.push([`heap objects, same cluster`, `${memory.heap_used_mb} MiB`, "", ""]);
  if (churn) {
    rows.push([`agent CPU, ${churn.changes_per_s} pod changes/s`, `${churn.agent_cpu_percent} % of a core`, "", ""]);
    rows.push([`watch caught up after the last change`, `${churn.catch_up_ms} ms`, "", ""]);
  }
  return rows;
}

/** Formats the Kubernetes figures as a table with their targets. */
export function formatKubernetesTable(figures: KubernetesFigures, machine: { cores: number; model: string }, time: string): string {
  const header = ["figure", "median", "target", "met"];
  const rows = kubernetesRows(figures);
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((cells) => cells[column].length)));
  const line = (cells: string[]): string => cells.map((cell, column) => cell.padEnd(widths[column])).join("  ").trimEnd();
  return [line(header), line(widths.map((width) => "-".repeat(width))), ...rows.map(line), "", `machine: ${machine.model}, ${machine.cores} cores, ${time}`].join("\n");
}
