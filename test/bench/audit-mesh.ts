// The audit part of the mesh measurements: agents whose audit records go to the file only, against
// agents that also ship them to an OTLP receiver and to rsyslogd running in each node's network
// namespace on 127.0.0.1. Two nodes, a client and a server pod, and the TCP echo server and clients
// of tcp-bench.c, as in bench.ts.
//
// Every round builds a new cluster (new network namespaces, agents with their default settings, a
// new audit file and spool) and removes it at the end. Reusing one cluster slowed connection setup
// from round to round: the inbound proxy binds its upstream socket to the client's address and
// port, and the TIME_WAIT sockets of earlier rounds made those binds slower. The two configurations
// alternate. Each round measures:
//
//   setup      connection setup latency at a fixed rate below saturation (tcp-bench connect, open
//              loop from 8 threads), after an unrecorded warm-up at the same rate. The
//              records flow to the sinks meanwhile. Afterwards every sink must catch up, and each
//              receiver must contain at least as many records as the node's audit file.
//   saturated  new connections per second from 16 threads (tcp-bench rate), with the agents' CPU
//              per connection. On a small machine the receivers then compete with the agents for
//              the cores, so this rate is context, not the target.

import fs from "node:fs";
import path from "node:path";
import { auditFileSet } from "../../agent/audit/files";
import { Cluster, removeLeftovers } from "../harness/cluster";
import { OtlpReceiverProcess, pickPort } from "../harness/otlp-receiver-process";
import { RsyslogServer } from "../harness/rsyslog";
import { moveToBenchAddresses } from "./pod-ips";
import { cpuSeconds } from "./proc-stats";
import { nearestRank, round } from "./stats";
import { TcpBench, type ConnectResult } from "./tcp-bench";
import { ALLOW_CLIENT_POLICY, BENCH_NAMESPACES, CLIENT, SERVER, benchNodes } from "./mesh-pods";

export type MeshAuditConfig = "file" | "file_otlp_syslog";

/** Connection setup latency at a fixed rate: time from connect() to the 1-byte echo, µs. */
export interface SetupFigures {
  connections_per_s: number;
  completed: number;
  errors: number;
  p50_us: number;
  p90_us: number;
  p99_us: number;
  max_us: number;
  /** Connections that started more than 1 ms after their scheduled time, and the largest delay, µs. */
  late: number;
  max_late_us: number;
  /** CPU of each agent per connection during the test, µs (client node, server node). */
  agent_cpu_us_per_connection: number[];
  /** Largest sink lag of either agent when the test ended, and the time until every sink had every record. */
  sink_lag_at_end: number;
  catch_up_ms: number;
}

/** Records each node's sinks contained after the setup test; otlp and syslog are absent for the file-only configuration. */
export interface DeliveredRecords {
  node: string;
  file: number;
  otlp?: number;
  syslog?: number;
}

/** New connections per second from many threads, as fast as the mesh takes them. */
export interface SaturatedFigures {
  connections_per_s: number;
  failed_connections: number;
  /** CPU of each agent per new connection, µs (client node, server node). */
  agent_cpu_us_per_connection: number[];
  /** Audit records each agent produced per second during the test (ambient_agent_audit_records_total). */
  records_per_s: number[];
  sink_lag_at_end: number;
  catch_up_ms: number;
}

export interface MeshRound {
  config: MeshAuditConfig;
  setup: SetupFigures;
  delivered: DeliveredRecords[];
  saturated: SaturatedFigures;
  /** Records dropped by either agent's queue or spool during the round. */
  dropped: number;
}

export interface LatencyPercentiles {
  p50: number;
  p90: number;
  p99: number;
}

export interface MeshAuditFigures {
  rounds: MeshRound[];
  /** Median over rounds of each configuration's setup latency percentiles, µs. */
  median_setup_us: Record<MeshAuditConfig, LatencyPercentiles>;
  /** Remote over file of the median setup latencies; 1.05 means 5% slower with the remote sinks. */
  setup_ratio: { p50: number; p99: number };
  median_setup_agent_cpu_us_per_connection: Record<MeshAuditConfig, number>;
  /** Median saturated rate of each configuration, and remote over file. */
  median_connections_per_s: Record<MeshAuditConfig, number>;
  rate_ratio: number;
  median_agent_cpu_us_per_connection: Record<MeshAuditConfig, number>;
  median_records_per_s: Record<MeshAuditConfig, number>;
}

export interface MeshAuditSettings {
  /** Rounds of each configuration. */
  rounds: number;
  /** Connections per second of the setup test, its length, and the length of its warm-up, s. */
  setupRate: number;
  setupSeconds: number;
  setupWarmupSeconds: number;
  rateSeconds: number;
  rateThreads: number;
  rateMaxCount: number;
}

const PREFIX_FAMILY = "aabaud";
const RUN_PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const ECHO_PORT = 7000;
/** Threads of the paced client: connections overlap only when one takes longer than the interval. */
const SETUP_THREADS = 8;
const CATCH_UP_TIMEOUT_MS = 60_000;
/** How long the receivers get to store what the agents saw accepted: the OTLP receiver writes its file every 50 ms. */
const RECEIVER_TIMEOUT_MS = 10_000;

const NODES = benchNodes("baud");
const NAMESPACES = BENCH_NAMESPACES;

interface Receivers {
  otlp: OtlpReceiverProcess;
  syslog: RsyslogServer;
}

/** One round's cluster, with its TCP application, receivers and the agents' PIDs (client node, server node). */
interface RoundCluster {
  config: MeshAuditConfig;
  cluster: Cluster;
  tcp: TcpBench;
  receivers: Map<string, Receivers>;
  nodes: string[];
  pids: number[];
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length % 2 === 1 ? sorted[(sorted.length - 1) / 2] : (sorted[sorted.length / 2 - 1] + sorted[sorted.length / 2]) / 2;
}

function mean(values: number[]): number {
  return values.reduce((sum, value) => sum + value, 0) / values.length;
}

/** Counts the lines of `file` by its newlines; 0 when it does not exist. */
export function countLines(file: string): number {
  if (!fs.existsSync(file)) return 0;
  const buffer = Buffer.alloc(1 << 20);
  const fd = fs.openSync(file, "r");
  let lines = 0;
  try {
    for (let read = fs.readSync(fd, buffer); read > 0; read = fs.readSync(fd, buffer)) {
      for (let index = buffer.indexOf(10, 0); index >= 0 && index < read; index = buffer.indexOf(10, index + 1)) lines += 1;
    }
  } finally {
    fs.closeSync(fd);
  }
  return lines;
}

/** Counts the lines of the audit file and its rotated files. */
export function countFileSetLines(activePath: string): number {
  return auditFileSet(activePath).reduce((sum, file) => sum + countLines(file), 0);
}

/** Returns the `ambient-agent run` options that add the remote sinks of `config`. */
function sinkArgs(config: MeshAuditConfig, otlpPort: number, syslogPort: number): string[] {
  if (config === "file") return [];
  return ["--audit-sink", `otlp://127.0.0.1:${otlpPort}`, "--audit-sink", `syslog+tcp://127.0.0.1:${syslogPort}`];
}

/** Builds a new cluster, the TCP application and the echo server, starts both receivers in each node's namespace, then the agents. */
async function buildRound(config: MeshAuditConfig, roundIndex: number): Promise<RoundCluster> {
  const otlpPort = await pickPort();
  const syslogPort = await pickPort();
  const cluster = Cluster.create({
    prefix: `${RUN_PREFIX}r${roundIndex}`,
    nodes: NODES,
    namespaces: NAMESPACES,
    extraManifests: { "policies.yaml": ALLOW_CLIENT_POLICY },
    agentArgs: sinkArgs(config, otlpPort, syslogPort),
    agentLogLevel: "info",
  });
  const nodes = [...cluster.topology.nodes.keys()];
  const mesh: RoundCluster = { config, cluster, tcp: undefined as unknown as TcpBench, receivers: new Map(), nodes, pids: [] };
  try {
    moveToBenchAddresses(cluster);
    for (const pod of [CLIENT, SERVER]) {
      cluster.topology.exec(cluster.topology.pod(pod).netns, "sysctl", ["-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 64999"]);
    }
    mesh.tcp = TcpBench.build(cluster.topology, cluster.workDir);
    await mesh.tcp.startEchoServer(SERVER, ECHO_PORT);
    for (const node of nodes) {
      const netns = cluster.topology.node(node).netns;
      const otlp = new OtlpReceiverProcess(cluster.topology, netns, otlpPort, path.join(cluster.workDir, `otlp-${node}.jsonl`));
      // The counting receiver decodes nothing, so the agents, not a test decoder, are what the rounds compare.
      await otlp.start("count");
      const syslog = await RsyslogServer.start({ prefix: `${cluster.topology.prefix}-${node}`, netns, tcpPort: syslogPort }).catch(async (error: unknown) => {
        await otlp.stop();
        throw error;
      });
      mesh.receivers.set(node, { otlp, syslog });
    }
    await cluster.startAgents([CLIENT, SERVER]);
    mesh.pids = nodes.map((node) => cluster.agent(node).pid!);
  } catch (error) {
    await removeRound(mesh, false);
    throw error;
  }
  return mesh;
}

/** Stops the receivers and removes the cluster; keeps its folder (agent logs, audit files) when `removeWorkDir` is false. */
async function removeRound(mesh: RoundCluster, removeWorkDir: boolean): Promise<void> {
  for (const { otlp, syslog } of mesh.receivers.values()) {
    await otlp.stop().catch(() => undefined);
    await syslog.cleanup().catch(() => undefined);
  }
  await mesh.cluster.destroy({ removeWorkDir });
}

/** Reads the agent's audit metrics from its admin port, inside its node's namespace. */
function auditMetrics(mesh: RoundCluster, node: string): { records: number; dropped: number; maxLag: number } {
  const text = mesh.cluster.topology.exec(mesh.cluster.topology.node(node).netns, "curl", ["-sS", "http://127.0.0.1:15000/metrics"]);
  const sum = (pattern: RegExp): number => [...text.matchAll(pattern)].reduce((total, match) => total + Number(match[1]), 0);
  const lags = [...text.matchAll(/^ambient_agent_audit_sink_lag_records\{[^}]*\} (\S+)$/gm)].map((match) => Number(match[1]));
  return {
    records: sum(/^ambient_agent_audit_records_total\{[^}]*\} (\S+)$/gm),
    dropped: sum(/^ambient_agent_audit_queue_dropped_records_total (\S+)$/gm) + sum(/^ambient_agent_audit_sink_dropped_records_total\{[^}]*\} (\S+)$/gm),
    maxLag: Math.max(0, ...lags),
  };
}

/** Polls both agents until no sink lags; returns the time it took. */
async function waitCaughtUp(mesh: RoundCluster, phase: string): Promise<number> {
  const start = Date.now();
  while (mesh.nodes.some((node) => auditMetrics(mesh, node).maxLag > 0)) {
    if (Date.now() - start > CATCH_UP_TIMEOUT_MS) throw new Error(`${mesh.config}: the audit sinks did not catch up within ${CATCH_UP_TIMEOUT_MS} ms after the ${phase}`);
    await sleep(100);
  }
  return Date.now() - start;
}

function percentiles(samples: number[]): LatencyPercentiles & { max: number } {
  const sorted = [...samples].sort((a, b) => a - b);
  return { p50: nearestRank(sorted, 0.5), p90: nearestRank(sorted, 0.9), p99: nearestRank(sorted, 0.99), max: sorted[sorted.length - 1] };
}

/** Runs the paced connection test from the client pod to the echo server. */
function connectPaced(mesh: RoundCluster, rate: number, seconds: number): Promise<ConnectResult> {
  const serverIp = mesh.cluster.topology.pod(SERVER).ip;
  return mesh.tcp.connect(CLIENT, serverIp, ECHO_PORT, Math.round(1e6 / rate), Math.max(1, Math.round(rate * seconds)), SETUP_THREADS);
}

/** Warms the agents up at the setup rate, then measures connection setup latency at that rate. */
async function measureSetup(mesh: RoundCluster, settings: MeshAuditSettings): Promise<SetupFigures> {
  const warmup = await connectPaced(mesh, settings.setupRate, settings.setupWarmupSeconds);
  if (warmup.samples_us.length === 0) throw new Error(`${mesh.config}: no connection completed in the warm-up: ${JSON.stringify(warmup.error_codes)}`);
  await waitCaughtUp(mesh, "warm-up");

  const cpuBefore = mesh.pids.map(cpuSeconds);
  const result = await connectPaced(mesh, settings.setupRate, settings.setupSeconds);
  const cpuUsed = mesh.pids.map((pid, index) => cpuSeconds(pid) - cpuBefore[index]);
  const lagAtEnd = Math.max(...mesh.nodes.map((node) => auditMetrics(mesh, node).maxLag));
  const catchUpMs = await waitCaughtUp(mesh, "setup test");

  const completed = result.samples_us.length;
  if (completed === 0) throw new Error(`${mesh.config}: no connection completed in the setup test: ${JSON.stringify(result.error_codes)}`);
  const latency = percentiles(result.samples_us);
  return {
    connections_per_s: settings.setupRate,
    completed,
    errors: result.errors,
    p50_us: round(latency.p50, 0),
    p90_us: round(latency.p90, 0),
    p99_us: round(latency.p99, 0),
    max_us: round(latency.max, 0),
    late: result.late,
    max_late_us: result.max_late_us,
    agent_cpu_us_per_connection: cpuUsed.map((seconds) => round((seconds / completed) * 1e6, 0)),
    sink_lag_at_end: lagAtEnd,
    catch_up_ms: catchUpMs,
  };
}

/**
 * Checks that every node's sinks hold the records of the round so far: the audit file at least as
 * many lines as records the agent produced, and each receiver at least as many as the file. Polls
 * the receivers, which write their files shortly after they accept a batch.
 */
async function checkDelivered(mesh: RoundCluster): Promise<DeliveredRecords[]> {
  const delivered: DeliveredRecords[] = [];
  for (const node of mesh.nodes) {
    const produced = auditMetrics(mesh, node).records;
    const file = countFileSetLines(mesh.cluster.auditFile(node));
    if (file < produced) throw new Error(`${mesh.config}, ${node}: the audit file has ${file} lines for ${produced} records produced, after every sink caught up`);
    if (mesh.config === "file") {
      delivered.push({ node, file });
      continue;
    }
    const { otlp, syslog } = mesh.receivers.get(node)!;
    const counts = (): { otlp: number; syslog: number } => ({ otlp: otlp.countedRecords(), syslog: syslog.readMessages().length });
    const deadline = Date.now() + RECEIVER_TIMEOUT_MS;
    let received = counts();
    while (received.otlp < file || received.syslog < file) {
      if (Date.now() > deadline) {
        throw new Error(`${mesh.config}, ${node}: after ${RECEIVER_TIMEOUT_MS} ms the OTLP receiver had stored ${received.otlp} records and rsyslogd ${received.syslog}, fewer than the ${file} in the audit file; the OTLP receiver's file is ${otlp.outputFile}`);
      }
      await sleep(100);
      received = counts();
    }
    delivered.push({ node, file, ...received });
  }
  return delivered;
}

/** Measures new connections per second from many threads, and the agents' CPU per connection. */
async function measureSaturated(mesh: RoundCluster, settings: MeshAuditSettings): Promise<SaturatedFigures> {
  const serverIp = mesh.cluster.topology.pod(SERVER).ip;
  const recordsBefore = mesh.nodes.map((node) => auditMetrics(mesh, node).records);
  const cpuBefore = mesh.pids.map(cpuSeconds);
  const result = await mesh.tcp.rate(CLIENT, serverIp, ECHO_PORT, settings.rateThreads, settings.rateSeconds, settings.rateMaxCount);
  const cpuUsed = mesh.pids.map((pid, index) => cpuSeconds(pid) - cpuBefore[index]);
  const after = mesh.nodes.map((node) => auditMetrics(mesh, node));
  const catchUpMs = await waitCaughtUp(mesh, "saturated rate test");
  if (result.completed === 0) throw new Error(`${mesh.config}: no connection completed in the rate test: ${JSON.stringify(result.error_codes)}`);
  return {
    connections_per_s: round(result.completed / result.elapsed_s, 0),
    failed_connections: result.errors,
    agent_cpu_us_per_connection: cpuUsed.map((seconds) => round((seconds / result.completed) * 1e6, 0)),
    records_per_s: after.map((metrics, index) => round((metrics.records - recordsBefore[index]) / result.elapsed_s, 0)),
    sink_lag_at_end: Math.max(...after.map((metrics) => metrics.maxLag)),
    catch_up_ms: catchUpMs,
  };
}

/** Measures one round: builds a new cluster, runs the setup test, the delivery check and the saturated test, and removes the cluster. */
async function measureRound(config: MeshAuditConfig, roundIndex: number, settings: MeshAuditSettings, step: (message: string) => void): Promise<MeshRound> {
  const started = Date.now();
  const mesh = await buildRound(config, roundIndex);
  let succeeded = false;
  try {
    const setup = await measureSetup(mesh, settings);
    const delivered = await checkDelivered(mesh);
    const saturated = await measureSaturated(mesh, settings);
    const dropped = mesh.nodes.map((node) => auditMetrics(mesh, node).dropped).reduce((sum, value) => sum + value, 0);
    succeeded = true;
    const figures: MeshRound = { config, setup, delivered, saturated, dropped };
    step(`audit mesh round ${roundIndex + 1} (${config}, ${Math.round((Date.now() - started) / 1000)} s): ${JSON.stringify(figures)}`);
    return figures;
  } finally {
    await removeRound(mesh, succeeded);
    if (!succeeded) step(`audit mesh round ${roundIndex + 1} (${config}) failed; agent logs are kept in ${mesh.cluster.workDir}`);
  }
}

/** Returns the medians over rounds of each configuration and the remote-over-file ratios. */
export function summarizeMeshRounds(rounds: MeshRound[]): MeshAuditFigures {
  const medianOf = (config: MeshAuditConfig, value: (entry: MeshRound) => number): number => median(rounds.filter((entry) => entry.config === config).map(value));
  const both = (value: (entry: MeshRound) => number): Record<MeshAuditConfig, number> => ({ file: medianOf("file", value), file_otlp_syslog: medianOf("file_otlp_syslog", value) });
  const p50 = both((entry) => entry.setup.p50_us);
  const p90 = both((entry) => entry.setup.p90_us);
  const p99 = both((entry) => entry.setup.p99_us);
  const connections = both((entry) => entry.saturated.connections_per_s);
  return {
    rounds,
    median_setup_us: {
      file: { p50: p50.file, p90: p90.file, p99: p99.file },
      file_otlp_syslog: { p50: p50.file_otlp_syslog, p90: p90.file_otlp_syslog, p99: p99.file_otlp_syslog },
    },
    setup_ratio: { p50: round(p50.file_otlp_syslog / p50.file, 3), p99: round(p99.file_otlp_syslog / p99.file, 3) },
    median_setup_agent_cpu_us_per_connection: both((entry) => mean(entry.setup.agent_cpu_us_per_connection)),
    median_connections_per_s: connections,
    rate_ratio: round(connections.file_otlp_syslog / connections.file, 3),
    median_agent_cpu_us_per_connection: both((entry) => mean(entry.saturated.agent_cpu_us_per_connection)),
    median_records_per_s: both((entry) => mean(entry.saturated.records_per_s)),
  };
}

/** Alternates the two configurations for `settings.rounds` rounds each, a new cluster per round, and returns the rounds and their medians. */
export async function measureMeshAudit(settings: MeshAuditSettings, step: (message: string) => void): Promise<MeshAuditFigures> {
  removeLeftovers(PREFIX_FAMILY);
  const rounds: MeshRound[] = [];
  for (let index = 0; index < 2 * settings.rounds; index += 1) {
    const config: MeshAuditConfig = index % 2 === 0 ? "file" : "file_otlp_syslog";
    step(`audit mesh round ${index + 1} (${config}): building the cluster, ${settings.setupRate} connections/s for ${settings.setupSeconds} s, then ${settings.rateThreads} threads for ${settings.rateSeconds} s`);
    rounds.push(await measureRound(config, index, settings, step));
  }
  return summarizeMeshRounds(rounds);
}
