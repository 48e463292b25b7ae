// The diagnostics figures of `make bench`: what the connection tracker, the live byte counters and
// the Istio TCP metrics cost, and how long /metrics and the admin API take to respond.
//
//   per record     CPU time of a connection record's life with and without the tracker and the
//                  metrics, in the benchmark process
//   log line       CPU time of one access log line as JSON and as text (--log-format), in the
//                  benchmark process
//   proxy limits   CPU per MiB of the proxies' copy with and without the idle timer and the
//                  buffered-bytes count, and one per-pod slot acquire (limits-cost.ts), in the
//                  benchmark process
//   data path      mesh throughput (iperf3) and connection rate (tcp-bench) between the bench pods,
//                  in alternating rounds with the tracker on and off. Off means each agent started
//                  with AMBIENT_BENCH_NO_CONNECTION_TRACKER=1, so its proxies get no tracker and the
//                  metrics see no connection. Each round starts both agents afresh. The byte counters
//                  of copy.ts run in both variants, because the copy counted bytes per chunk before
//                  them too.
//   scrape         GET /metrics timed in-process on a TrafficMetrics fed synthetic connection
//                  records, with 0, 1,000 and 5,000 label sets (source × destination pairs), and on a
//                  live agent with no connection and with 1,000 open ones
//   admin API      GET /status, /workloads and /config_dump of an agent that reads 10,000 pods and
//                  1,000 Services from the fake API server, and the wall time of `agentctl status`
//
// Every HTTP request is timed by curl (`-w %{time_total}`) inside the node's network namespace.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Registry } from "prom-client";
import { TrafficMetrics } from "../../agent/admin/metrics-traffic";
import { createLevelledLogger, LogLevels, parseLogLevels, silentLogger } from "../../agent/log";
import { TextDestination } from "../../agent/log-format";
import { ConnectionRecord } from "../../agent/proxy/connection-record";
import { ConnectionTracker } from "../../agent/proxy/connection-tracker";
import type { Workload } from "../../agent/state/types";
import { AGENT_BIN, AGENTCTL_BIN } from "../harness/agent-process";
import { Cluster, removeLeftovers } from "../harness/cluster";
import { IPERF_PORT, runIperfClient, startIperfServer } from "./iperf";
import { clusterObjects, type ClusterShape } from "./kubernetes-objects";
import { measureLimitsCost, type LimitsCostFigures } from "./limits-cost";
import { ALLOW_CLIENT_POLICY, BENCH_NAMESPACES, CLIENT, SERVER, benchNodes } from "./mesh-pods";
import { moveToBenchAddresses } from "./pod-ips";
import { assertProcessRuns, cpuSeconds } from "./proc-stats";
import { round } from "./stats";
import { TcpBench, type IdleOpened } from "./tcp-bench";

const PREFIX_FAMILY = "aadbench";
const ECHO_PORT = 7000;
const METRICS_URL = "http://127.0.0.1:15020/metrics";
const ADMIN_URL = "http://127.0.0.1:15000";
const TRACKER_SWITCH = "AMBIENT_BENCH_NO_CONNECTION_TRACKER";
const GIB = 1024 ** 3;
const PROFILE_HOOK = path.join(__dirname, "profile-hook.js");
const ADMIN_NODE = "dbench-adm";
const ADMIN_NAMESPACE = "bench-local";

export interface DiagnosticsSettings {
  /** Rounds per variant. The variants alternate, and each round starts both agents afresh. */
  rounds: number;
  iperfSeconds: number;
  rateSeconds: number;
  rateThreads: number;
  rateMaxCount: number;
  /** Requests per timed figure, whose median is the figure. */
  requests: number;
  /** Batches of 20,000 connection records per variant for the in-process cost per connection. */
  recordBatches: number;
  labelSets: number[];
  /** Folder for CPU profiles of the agents of every data-path round (`--cpu-prof`), one subfolder per round. */
  profileDir?: string;
  /** Idle connections open through the mesh while /metrics is scraped. */
  openConnections: number;
  shape: ClusterShape;
}

export const DIAGNOSTICS_FULL: DiagnosticsSettings = {
  rounds: 5,
  iperfSeconds: 4,
  rateSeconds: 4,
  rateThreads: 16,
  rateMaxCount: 200_000,
  requests: 20,
  recordBatches: 15,
  labelSets: [0, 1000, 5000],
  openConnections: 1000,
  shape: { pods: 10_000, services: 1000, namespaces: 50, remoteNodes: 200 },
};

export const DIAGNOSTICS_QUICK: DiagnosticsSettings = { ...DIAGNOSTICS_FULL, rounds: 1, iperfSeconds: 2, rateSeconds: 2, requests: 5 };

/** One round of one variant. */
export interface DataPathRound {
  tracker: boolean;
  gbps: number;
  connections_per_s: number;
  /** Both agents' CPU seconds during iperf3, per GiB and per agent. */
  cpu_s_per_gib_per_hop: number;
  /** Both agents' CPU during the rate test, per connection and per agent, in µs. */
  cpu_us_per_connection: number;
}

export interface DataPathFigures {
  rounds: DataPathRound[];
  /** The 1-minute load average before the first round and after the last, to judge how busy the machine was. */
  load_average: [number, number];
  /** Medians over the rounds of each variant. */
  tracker_on: { gbps: number; connections_per_s: number; cpu_s_per_gib_per_hop: number; cpu_us_per_connection: number };
  tracker_off: { gbps: number; connections_per_s: number; cpu_s_per_gib_per_hop: number; cpu_us_per_connection: number };
  /** Median of the per-pair ratios on / off (pair i is the i-th round of each variant). */
  ratio_gbps: number;
  ratio_connections_per_s: number;
  ratio_cpu_s_per_gib_per_hop: number;
  ratio_cpu_us_per_connection: number;
}

/** A timed request: median and range in ms over the requests, and the response size in bytes. */
export interface RequestFigure {
  name: string;
  median_ms: number;
  min_ms: number;
  max_ms: number;
  bytes: number;
}

/** ns per connection record with and without the tracker and TrafficMetrics; see measureRecordCost. */
export interface RecordCostFigures {
  records: number;
  tracker_on_ns: number;
  tracker_off_ns: number;
  added_ns: number;
}

/** CPU ns per access log line in each --log-format, in the benchmark process. */
export interface LogFormatFigures {
  lines: number;
  json_ns: number;
  text_ns: number;
  /** Median of the per-pair ratios text / json. */
  ratio: number;
}

export interface DiagnosticsFigures {
  record_cost: RecordCostFigures;
  log_format: LogFormatFigures;
  limits: LimitsCostFigures;
  data_path: DataPathFigures;
  scrape_label_sets: RequestFigure[];
  scrape_agent: RequestFigure[];
  admin: RequestFigure[];
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function summarize(name: string, timesMs: number[], bytes: number): RequestFigure {
  return { name, median_ms: round(median(timesMs), 2), min_ms: round(Math.min(...timesMs), 2), max_ms: round(Math.max(...timesMs), 2), bytes };
}

/** Runs one GET with curl in `netns` and returns curl's total time in ms and the body size. Throws unless the status is 200. */
function curlGet(netns: string, url: string): { ms: number; bytes: number } {
  const output = execFileSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", "curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}", url], {
    encoding: "utf8",
    timeout: 40_000,
  });
  const [status, seconds, bytes] = output.trim().split(" ");
  if (status !== "200") throw new Error(`GET ${url} returned HTTP ${status}, expected 200`);
  return { ms: Number(seconds) * 1000, bytes: Number(bytes) };
}

function timeRequests(netns: string, name: string, url: string, count: number): RequestFigure {
  const times: number[] = [];
  let bytes = 0;
  for (let index = 0; index < count; index++) {
    const response = curlGet(netns, url);
    times.push(response.ms);
    bytes = response.bytes;
  }
  return summarize(name, times, bytes);
}

function bodyOf(netns: string, url: string): string {
  return execFileSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", "curl", "-sS", "--fail", "--max-time", "30", url], { encoding: "utf8", timeout: 40_000, maxBuffer: 256 * 1024 ** 2 });
}

// ---------------------------------------------------------------------------------------------
// Scrape cost with many label sets, in process

function syntheticWorkload(index: number, side: string): Workload {
  const name = `${side}-${index}`;
  const namespace = `team-${index % 50}`;
  return {
    uid: `${namespace}/${name}`,
    name,
    namespace,
    serviceAccount: name,
    nodeName: "remote-0",
    ip: `100.64.${Math.floor(index / 250)}.${(index % 250) + 1}`,
    labels: { app: `app-${index}`, version: "v1" },
    namedPorts: {},
    hostNetwork: false,
    ready: true,
    source: { file: "diagnostics benchmark", document: index },
  };
}

/**
 * Times prom-client's Registry.metrics() with TrafficMetrics holding `labelSets` label sets, one
 * closed connection each between source i and destination i, and returns the median of `count`
 * calls. With `open` > 0, the first label set also has that many connections still open, whose
 * live bytes each scrape adds.
 */
async function measureLabelSets(labelSets: number, count: number, open = 0): Promise<RequestFigure> {
  const workloads = new Map<string, Workload>();
  const registry = new Registry();
  const traffic = new TrafficMetrics({ workload: (uid) => workloads.get(uid), trustDomain: () => "cluster.local" });
  traffic.register(registry);
  for (let index = 0; index < labelSets; index++) {
    const source = syntheticWorkload(index, "client");
    const destination = syntheticWorkload(index, "server");
    workloads.set(source.uid, source);
    workloads.set(destination.uid, destination);
    const record = new ConnectionRecord({
      node: "bench",
      direction: "outbound",
      transport: "hbone",
      src: { addr: `${source.ip}:40000`, workload: source.name, namespace: source.namespace, identity: `spiffe://cluster.local/ns/${source.namespace}/sa/${source.name}` },
      dst: { addr: `${destination.ip}:8080`, workload: destination.name, namespace: destination.namespace, service: `${destination.namespace}/svc-${index}` },
    });
    traffic.opened(record);
    record.bytesSent = 1000;
    record.bytesRecv = 2000;
    if (index > 0 || open === 0) {
      traffic.closed(record);
      continue;
    }
    for (let extra = 1; extra < open; extra++) traffic.opened(new ConnectionRecord({ node: "bench", direction: "outbound", transport: "hbone", src: record.src, dst: record.dst }));
  }
  const times: number[] = [];
  let bytes = 0;
  for (let index = 0; index < count + 1; index++) {
    const started = process.hrtime.bigint();
    const text = await registry.metrics();
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    // The first call compiles the code paths; it is not recorded.
    if (index > 0) times.push(ms);
    bytes = Buffer.byteLength(text);
  }
  return summarize(open > 0 ? `${labelSets} label set, ${open} open connections (TrafficMetrics alone)` : `${labelSets} label sets`, times, bytes);
}

// ---------------------------------------------------------------------------------------------
// Per-connection cost of the tracker and the metrics, in process

/**
 * Times the life of a connection record as the proxies drive it (construction, opened(), write()
 * to a sink that drops the record, a silent logger), with a tracker and TrafficMetrics observing it
 * and without. Batches of `batch` records alternate between the two; returns the median CPU ns per
 * record of each over `batches` batches. The difference is what the tracker and the metrics add to
 * each connection, free of the noise of a shared machine that the mesh figures carry.
 */
function measureRecordCost(batches: number, batch: number): RecordCostFigures {
  const source = syntheticWorkload(0, "client");
  const destination = syntheticWorkload(0, "server");
  const workloads = new Map([source, destination].map((workload) => [workload.uid, workload]));
  const tracker = new ConnectionTracker();
  tracker.observe(new TrafficMetrics({ workload: (uid) => workloads.get(uid), trustDomain: () => "cluster.local" }));
  const sink = { write: (): void => {} };
  const logger = silentLogger();
  // Both inits are built once: a spread per record with one more property costs about 2 µs on its own.
  const init = {
    node: "bench",
    direction: "outbound" as const,
    transport: "hbone" as const,
    src: { addr: `${source.ip}:40000`, workload: source.name, namespace: source.namespace, identity: `spiffe://cluster.local/ns/${source.namespace}/sa/${source.name}` },
    dst: { addr: `${destination.ip}:8080`, workload: destination.name, namespace: destination.namespace, service: `${destination.namespace}/svc-0` },
    workload: source.uid,
  };
  const initWithTracker = { ...init, tracker };
  // CPU time of the process, not wall time, so that other processes on a busy machine do not count.
  const runBatch = (withTracker: boolean): number => {
    const started = process.cpuUsage();
    for (let index = 0; index < batch; index++) {
      const record = new ConnectionRecord(withTracker ? initWithTracker : init);
      record.opened(sink);
      record.bytesSent = 1;
      record.bytesRecv = 1;
      record.write(sink, logger);
    }
    const used = process.cpuUsage(started);
    return ((used.user + used.system) * 1000) / batch;
  };
  // The first two batches compile the code paths; they are not recorded.
  runBatch(true);
  runBatch(false);
  const on: number[] = [];
  const off: number[] = [];
  for (let index = 0; index < batches; index++) {
    on.push(runBatch(true));
    off.push(runBatch(false));
  }
  if (tracker.counts().outbound !== 0) throw new Error(`the tracker still counts ${tracker.counts().outbound} connections after every record was written`);
  return { records: batches * batch, tracker_on_ns: Math.round(median(on)), tracker_off_ns: Math.round(median(off)), added_ns: Math.round(median(on) - median(off)) };
}

/**
 * Times one access line, as the proxies log a closed connection, through the logger of each
 * --log-format to a sink that drops the line: JSON, and text (TextDestination parses each JSON
 * line and writes it again). Batches of `batch` lines alternate between the formats; returns the
 * median CPU ns per line of each over `batches` batches.
 */
function measureLogFormatCost(batches: number, batch: number): LogFormatFigures {
  const levels = new LogLevels(parseLogLevels("info"));
  const sink = { write: (): void => {} };
  const loggers = {
    json: createLevelledLogger(levels, { node: "bench" }, sink).child({ component: "access" }),
    text: createLevelledLogger(levels, { node: "bench" }, new TextDestination(sink)).child({ component: "access" }),
  };
  const fields = {
    src: { addr: "10.1.0.5:40000", workload: "client", namespace: "shop", identity: "spiffe://cluster.local/ns/shop/sa/client" },
    dst: { addr: "10.1.1.7:8080", workload: "server", namespace: "backend", service: "backend/server" },
    direction: "outbound",
    transport: "hbone",
    bytes_sent: 1843,
    bytes_recv: 90211,
    duration_ms: 12,
    policy: "backend/allow-shop",
  };
  const runBatch = (format: "json" | "text"): number => {
    const logger = loggers[format];
    const started = process.cpuUsage();
    for (let index = 0; index < batch; index++) logger.info(fields, "connection complete");
    const used = process.cpuUsage(started);
    return ((used.user + used.system) * 1000) / batch;
  };
  runBatch("json");
  runBatch("text");
  const json: number[] = [];
  const text: number[] = [];
  for (let index = 0; index < batches; index++) {
    json.push(runBatch("json"));
    text.push(runBatch("text"));
  }
  const ratios = text.map((value, index) => value / json[index]);
  return { lines: batches * batch, json_ns: Math.round(median(json)), text_ns: Math.round(median(text)), ratio: round(median(ratios), 2) };
}

// ---------------------------------------------------------------------------------------------
// Data path: tracker on against tracker off

/**
 * Starts both mesh agents with the tracker, or without it through the benchmark switch, which each
 * agent reads once at start. With `profileDir`, the agents load profile-hook.js and write their CPU
 * profiles there on exit.
 */
async function startAgents(cluster: Cluster, tracker: boolean, first: boolean, profileDir?: string): Promise<number[]> {
  const previousOptions = process.env.NODE_OPTIONS;
  if (tracker) delete process.env[TRACKER_SWITCH];
  else process.env[TRACKER_SWITCH] = "1";
  if (profileDir !== undefined) {
    fs.mkdirSync(profileDir, { recursive: true });
    process.env.NODE_OPTIONS = `${previousOptions ?? ""} --require ${PROFILE_HOOK}`.trim();
    process.env.AMBIENT_BENCH_PROFILE_DIR = profileDir;
  }
  try {
    if (first) {
      await cluster.startAgents([CLIENT, SERVER]);
    } else {
      for (const node of cluster.agents.keys()) await cluster.restartAgent(node);
      await cluster.waitEnrolled([CLIENT, SERVER]);
    }
  } finally {
    delete process.env[TRACKER_SWITCH];
    delete process.env.AMBIENT_BENCH_PROFILE_DIR;
    if (previousOptions === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = previousOptions;
  }
  return [...cluster.agents.values()].map((agent) => {
    assertProcessRuns(agent.pid!, AGENT_BIN);
    return agent.pid!;
  });
}

/**
 * Checks on the client's node that the variant took effect. With the tracker, HBONE connections
 * appear in istio_tcp_connections_opened_total with mutual_tls. Without it, the metric has no sample.
 */
function checkVariant(cluster: Cluster, tracker: boolean): void {
  const text = bodyOf(cluster.topology.node(cluster.topology.pod(CLIENT).node).netns, METRICS_URL);
  const sample = text.split("\n").find((line) => line.startsWith("istio_tcp_connections_opened_total{"));
  if (tracker && !(sample && sample.includes('connection_security_policy="mutual_tls"'))) {
    throw new Error(`the agent with the tracker reports no HBONE connection in istio_tcp_connections_opened_total (first sample: ${sample ?? "none"}); check its log in the run's work folder`);
  }
  if (!tracker && sample !== undefined) throw new Error(`the agent started with ${TRACKER_SWITCH}=1 still counts connections (${sample}); check that daemon.ts passes no tracker to the proxies when the switch is set`);
}

/** Counts the TCP sockets in TIME_WAIT in a pod's network namespace. */
function timeWaitCount(cluster: Cluster, pod: string): number {
  return Number(cluster.topology.exec(cluster.topology.pod(pod).netns, "sh", ["-c", "ss -Htan state time-wait | wc -l"]).trim());
}

async function measureRound(cluster: Cluster, tcp: TcpBench, settings: DiagnosticsSettings, tracker: boolean, index: number, step: (message: string) => void): Promise<DataPathRound> {
  step(`diagnostics: TIME_WAIT sockets before the round: client pod ${timeWaitCount(cluster, CLIENT)}, server pod ${timeWaitCount(cluster, SERVER)}`);
  const profileDir = settings.profileDir && path.join(settings.profileDir, `round-${index + 1}-tracker-${tracker ? "on" : "off"}`);
  const pids = await startAgents(cluster, tracker, index === 0, profileDir);
  const server = cluster.topology.pod(SERVER).ip;
  // Warm-up, unrecorded: the first connections through fresh agents compile their code paths.
  await tcp.latency(CLIENT, server, ECHO_PORT, 1024, 100, 100);
  await runIperfClient(cluster.topology, CLIENT, server, IPERF_PORT, 1);
  await tcp.rate(CLIENT, server, ECHO_PORT, settings.rateThreads, 1, settings.rateMaxCount);

  let before = pids.map(cpuSeconds);
  const iperf = await runIperfClient(cluster.topology, CLIENT, server, IPERF_PORT, settings.iperfSeconds);
  const iperfCpu = pids.reduce((sum, pid, index) => sum + cpuSeconds(pid) - before[index], 0) / pids.length;

  before = pids.map(cpuSeconds);
  const rate = await tcp.rate(CLIENT, server, ECHO_PORT, settings.rateThreads, settings.rateSeconds, settings.rateMaxCount);
  const rateCpu = pids.reduce((sum, pid, index) => sum + cpuSeconds(pid) - before[index], 0) / pids.length;
  if (rate.completed === 0) throw new Error(`no connection completed in the rate test: ${JSON.stringify(rate.error_codes)}`);
  if (rate.errors > 0) step(`diagnostics: ${rate.errors} connections failed: ${JSON.stringify(rate.error_codes)}`);

  checkVariant(cluster, tracker);
  const figures: DataPathRound = {
    tracker,
    gbps: round(iperf.bitsPerSecond / 1e9, 3),
    connections_per_s: round(rate.completed / rate.elapsed_s, 0),
    cpu_s_per_gib_per_hop: round(iperfCpu / (iperf.bytes / GIB), 3),
    cpu_us_per_connection: round((rateCpu / rate.completed) * 1e6, 1),
  };
  step(`diagnostics: tracker ${tracker ? "on " : "off"}: ${figures.gbps} Gbit/s, ${figures.connections_per_s} connections/s, ${figures.cpu_s_per_gib_per_hop} CPU-s/GiB/hop, ${figures.cpu_us_per_connection} µs CPU/connection`);
  await Promise.all([...cluster.agents.values()].map((agent) => agent.stop()));
  return figures;
}

function variantMedians(rounds: DataPathRound[]): DataPathFigures["tracker_on"] {
  return {
    gbps: round(median(rounds.map((entry) => entry.gbps)), 3),
    connections_per_s: round(median(rounds.map((entry) => entry.connections_per_s)), 0),
    cpu_s_per_gib_per_hop: round(median(rounds.map((entry) => entry.cpu_s_per_gib_per_hop)), 3),
    cpu_us_per_connection: round(median(rounds.map((entry) => entry.cpu_us_per_connection)), 1),
  };
}

/** Opens idle connections through the mesh and scrapes the client node's /metrics while they are open. */
async function measureOpenConnections(cluster: Cluster, tcp: TcpBench, settings: DiagnosticsSettings, step: (message: string) => void): Promise<RequestFigure[]> {
  await startAgents(cluster, true, false);
  const netns = cluster.topology.node(cluster.topology.pod(CLIENT).node).netns;
  const figures = [timeRequests(netns, "live agent, no open connection", METRICS_URL, settings.requests)];
  step(`diagnostics: opening ${settings.openConnections} idle connections`);
  const client = tcp.spawnIdle(CLIENT, cluster.topology.pod(SERVER).ip, ECHO_PORT, settings.openConnections);
  client.stderr?.resume();
  try {
    const opened = await new Promise<IdleOpened>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("the idle-connection client did not report within 90 s")), 90_000);
      let buffered = "";
      client.stdout!.on("data", (chunk: Buffer) => {
        buffered += chunk.toString();
        const line = buffered.split("\n").find((text) => text.includes('"opened"'));
        if (line !== undefined) {
          clearTimeout(timer);
          resolve(JSON.parse(line) as IdleOpened);
        }
      });
      client.once("exit", (code) => reject(new Error(`the idle-connection client exited with code ${String(code)} before reporting`)));
    });
    if (opened.opened === 0) throw new Error(`no idle connection could be opened through the mesh (${opened.failed} failed)`);
    const connections = JSON.parse(bodyOf(netns, `${ADMIN_URL}/status`)) as { connections?: { outbound?: number } };
    step(`diagnostics: ${opened.opened} idle connections open, /status counts ${JSON.stringify(connections.connections)}`);
    figures.push(timeRequests(netns, `live agent, ${opened.opened} open connections`, METRICS_URL, settings.requests));
  } finally {
    if (client.exitCode === null) client.kill("SIGKILL");
  }
  await Promise.all([...cluster.agents.values()].map((agent) => agent.stop()));
  return figures;
}

async function measureDataPath(prefix: string, settings: DiagnosticsSettings, step: (message: string) => void): Promise<{ dataPath: DataPathFigures; scrape: RequestFigure[] }> {
  step("diagnostics: building the mesh cluster");
  const cluster = Cluster.create({ prefix, nodes: benchNodes("dbench"), namespaces: BENCH_NAMESPACES, extraManifests: { "policies.yaml": ALLOW_CLIENT_POLICY }, agentLogLevel: "info" });
  let succeeded = false;
  try {
    moveToBenchAddresses(cluster);
    for (const pod of [CLIENT, SERVER]) {
      // As in the main mesh figures: reuse TIME_WAIT ports and widen the ephemeral range for the rate
      // test. Unlike them, the rounds here follow each other within TIME_WAIT's 60 s. With 10,000 and
      // more sockets in TIME_WAIT left by earlier rounds, the agents' CPU per connection was about 2.5
      // times higher, and the rate fell from about 1,200 to about 420 per second in either variant.
      // A cap of 1,000 TIME_WAIT sockets per pod keeps every round in the same state.
      cluster.topology.exec(cluster.topology.pod(pod).netns, "sysctl", ["-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 64999", "net.ipv4.tcp_max_tw_buckets=1000"]);
    }
    const tcp = TcpBench.build(cluster.topology, cluster.workDir);
    await startIperfServer(cluster.topology, SERVER, cluster.workDir);
    await tcp.startEchoServer(SERVER, ECHO_PORT);

    // ABBA order per pair of rounds, so that a drift of the machine over the run falls on both variants.
    const loadBefore = os.loadavg()[0];
    const rounds: DataPathRound[] = [];
    for (let pair = 0; pair < settings.rounds; pair++) {
      const order = pair % 2 === 0 ? [true, false] : [false, true];
      for (const tracker of order) rounds.push(await measureRound(cluster, tcp, settings, tracker, rounds.length, step));
    }
    const on = rounds.filter((entry) => entry.tracker);
    const off = rounds.filter((entry) => !entry.tracker);
    const dataPath: DataPathFigures = {
      rounds,
      load_average: [round(loadBefore, 2), round(os.loadavg()[0], 2)],
      tracker_on: variantMedians(on),
      tracker_off: variantMedians(off),
      ratio_gbps: round(median(on.map((entry, index) => entry.gbps / off[index].gbps)), 3),
      ratio_connections_per_s: round(median(on.map((entry, index) => entry.connections_per_s / off[index].connections_per_s)), 3),
      ratio_cpu_s_per_gib_per_hop: round(median(on.map((entry, index) => entry.cpu_s_per_gib_per_hop / off[index].cpu_s_per_gib_per_hop)), 3),
      ratio_cpu_us_per_connection: round(median(on.map((entry, index) => entry.cpu_us_per_connection / off[index].cpu_us_per_connection)), 3),
    };
    const scrape = await measureOpenConnections(cluster, tcp, settings, step);
    succeeded = true;
    return { dataPath, scrape };
  } finally {
    if (!succeeded) step(`diagnostics: the data-path run failed: agent logs are kept in ${cluster.workDir}`);
    await cluster.destroy({ removeWorkDir: succeeded });
  }
}

// ---------------------------------------------------------------------------------------------
// Admin API with a large cluster

function timeAgentctlStatus(netns: string, count: number): RequestFigure {
  const times: number[] = [];
  let bytes = 0;
  for (let index = 0; index < count; index++) {
    const started = process.hrtime.bigint();
    const output = execFileSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", process.execPath, AGENTCTL_BIN, "status"], { encoding: "utf8", timeout: 30_000 });
    times.push(Number(process.hrtime.bigint() - started) / 1e6);
    bytes = Buffer.byteLength(output);
  }
  return summarize("agentctl status (wall time, output bytes)", times, bytes);
}

async function measureAdmin(prefix: string, settings: DiagnosticsSettings, step: (message: string) => void): Promise<RequestFigure[]> {
  step(`diagnostics: admin API with ${settings.shape.pods} pods and ${settings.shape.services} Services in the fake API server`);
  const cluster = await Cluster.createWithApi({
    prefix,
    nodes: [{ name: ADMIN_NODE, pods: [{ name: "local0", namespace: ADMIN_NAMESPACE, serviceAccount: "local0" }] }],
    namespaces: [{ name: ADMIN_NAMESPACE, ambient: true }],
    agentLogLevel: "info",
  });
  let succeeded = false;
  try {
    for (const object of clusterObjects(settings.shape)) cluster.kube!.put(object);
    try {
      await cluster.startAgents(["local0"]);
    } catch (error) {
      // The harness waits 20 s for readiness; the first list of a large cluster may take longer.
      if (!/timed out/.test((error as Error).message)) throw error;
      await cluster.agent(ADMIN_NODE).waitReady(120_000);
      await cluster.waitEnrolled(["local0"]);
    }
    const netns = cluster.topology.node(ADMIN_NODE).netns;
    const workloads = JSON.parse(bodyOf(netns, `${ADMIN_URL}/workloads`)) as unknown[];
    if (workloads.length < settings.shape.pods) throw new Error(`/workloads lists ${workloads.length} workloads, expected at least ${settings.shape.pods}`);
    const figures = ["/status", "/workloads", "/config_dump"].map((route) => timeRequests(netns, `GET ${route}`, `${ADMIN_URL}${route}`, settings.requests));
    figures.push(timeAgentctlStatus(netns, settings.requests));
    succeeded = true;
    return figures;
  } finally {
    if (!succeeded) step(`diagnostics: the admin run failed: agent logs are kept in ${cluster.workDir}`);
    await cluster.destroy({ removeWorkDir: succeeded });
  }
}

/**
 * Measures the diagnostics figures: the scrape cost with many label sets (no root needed), the data
 * path with the tracker on and off, the scrape with open connections, and the admin API on a large
 * cluster. Each cluster uses the prefix family aadbench and is removed at the end.
 */
export async function measureDiagnostics(settings: DiagnosticsSettings, step: (message: string) => void): Promise<DiagnosticsFigures> {
  const recordCost = measureRecordCost(settings.recordBatches, 20_000);
  step(`diagnostics: connection record life, ns: ${JSON.stringify(recordCost)}`);
  const logFormat = measureLogFormatCost(settings.recordBatches, 20_000);
  step(`diagnostics: access log line, ns: ${JSON.stringify(logFormat)}`);
  const limits = await measureLimitsCost(settings.recordBatches, 256);
  step(`diagnostics: proxy limits: ${JSON.stringify(limits)}`);
  const scrapeLabelSets: RequestFigure[] = [];
  for (const labelSets of settings.labelSets) {
    scrapeLabelSets.push(await measureLabelSets(labelSets, settings.requests));
    step(`diagnostics: /metrics with ${labelSets} label sets: ${JSON.stringify(scrapeLabelSets.at(-1))}`);
  }
  scrapeLabelSets.push(await measureLabelSets(1, settings.requests, settings.openConnections));
  removeLeftovers(PREFIX_FAMILY);
  const prefix = `${PREFIX_FAMILY}${process.pid}`;
  const { dataPath, scrape } = await measureDataPath(`${prefix}d`, settings, step);
  const admin = await measureAdmin(`${prefix}a`, settings, step);
  return { record_cost: recordCost, log_format: logFormat, limits, data_path: dataPath, scrape_label_sets: scrapeLabelSets, scrape_agent: scrape, admin };
}

function table(header: string[], rows: string[][]): string[] {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((cells) => cells[column].length)));
  const line = (cells: string[]): string => cells.map((cell, column) => cell.padEnd(widths[column])).join("  ").trimEnd();
  return [line(header), line(widths.map((width) => "-".repeat(width))), ...rows.map(line)];
}

/** Formats the diagnostics figures as tables. */
export function formatDiagnosticsTable(figures: DiagnosticsFigures, machine: { cores: number; model: string }, time: string): string {
  const { data_path: dataPath } = figures;
  const perRound = (key: keyof Omit<DataPathRound, "tracker">, tracker: boolean): string =>
    dataPath.rounds.filter((entry) => entry.tracker === tracker).map((entry) => String(entry[key])).join(", ");
  const dataRows = [
    ["throughput, Gbit/s", String(dataPath.tracker_on.gbps), String(dataPath.tracker_off.gbps), String(dataPath.ratio_gbps), `${perRound("gbps", true)} / ${perRound("gbps", false)}`],
    ["new connections per s", String(dataPath.tracker_on.connections_per_s), String(dataPath.tracker_off.connections_per_s), String(dataPath.ratio_connections_per_s), `${perRound("connections_per_s", true)} / ${perRound("connections_per_s", false)}`],
    ["agent CPU-s per GiB per hop", String(dataPath.tracker_on.cpu_s_per_gib_per_hop), String(dataPath.tracker_off.cpu_s_per_gib_per_hop), String(dataPath.ratio_cpu_s_per_gib_per_hop), `${perRound("cpu_s_per_gib_per_hop", true)} / ${perRound("cpu_s_per_gib_per_hop", false)}`],
    ["agent CPU µs per connection", String(dataPath.tracker_on.cpu_us_per_connection), String(dataPath.tracker_off.cpu_us_per_connection), String(dataPath.ratio_cpu_us_per_connection), `${perRound("cpu_us_per_connection", true)} / ${perRound("cpu_us_per_connection", false)}`],
  ];
  const requestRows = (entries: RequestFigure[]): string[][] =>
    entries.map((entry) => [entry.name, entry.median_ms.toFixed(2), `${entry.min_ms.toFixed(2)}-${entry.max_ms.toFixed(2)}`, String(entry.bytes)]);
  const cost = figures.record_cost;
  return [
    `connection record life (in process, ${cost.records} records per variant): ${cost.tracker_on_ns} ns with the tracker and metrics, ${cost.tracker_off_ns} ns without, ${cost.added_ns} ns added`,
    `access log line (in process, ${figures.log_format.lines} lines per format): ${figures.log_format.json_ns} ns as JSON, ${figures.log_format.text_ns} ns as text (ratio ${figures.log_format.ratio})`,
    `proxy limits (in process, ${figures.limits.rounds} rounds of ${figures.limits.mib_per_round} MiB per variant): ${figures.limits.plain_cpu_us_per_mib} µs of CPU per MiB copied without, ${figures.limits.limited_cpu_us_per_mib} µs with the idle timer and buffered-bytes count (ratio ${figures.limits.ratio_cpu}); ${figures.limits.tracker_acquire_ns} ns per slot acquire and release`,
    "",
    `1-minute load average before and after the rounds: ${dataPath.load_average.join(" and ")}`,
    ...table(["figure (median of rounds)", "tracker on", "tracker off", "ratio on/off (median of pairs)", "rounds on / off"], dataRows),
    "",
    ...table(["GET /metrics", "median ms", "range ms", "bytes"], [...requestRows(figures.scrape_label_sets), ...requestRows(figures.scrape_agent)]),
    "",
    ...table(["admin API, large cluster", "median ms", "range ms", "bytes"], requestRows(figures.admin)),
    "",
    `machine: ${machine.model}, ${machine.cores} cores, Node.js ${process.version}, ${time}`,
  ].join("\n");
}
