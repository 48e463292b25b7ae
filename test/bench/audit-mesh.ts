// The audit part of the connection-rate test: new connections per second through the mesh with
// agents whose audit records go to the file only, against agents that also ship them to an OTLP
// receiver and to rsyslogd running in each node's network namespace on 127.0.0.1. Two nodes, a
// client and a server pod, the TCP echo server and the rate client of tcp-bench.c, as in bench.ts.
// The two configurations alternate, and both agents are restarted for every round, each time with a
// new audit file and spool, so that no sink starts with a backlog of an earlier round.

import fs from "node:fs";
import path from "node:path";
import { Cluster, removeLeftovers } from "../harness/cluster";
import type { NamespaceSpec } from "../harness/manifests";
import { OtlpReceiverProcess, pickPort } from "../harness/otlp-receiver-process";
import { RsyslogServer } from "../harness/rsyslog";
import type { NodeSpec } from "../harness/topology";
import { moveToBenchAddresses } from "./pod-ips";
import { cpuSeconds } from "./proc-stats";
import { round } from "./stats";
import { TcpBench } from "./tcp-bench";

export type MeshAuditConfig = "file" | "file_otlp_syslog";

export interface MeshRound {
  config: MeshAuditConfig;
  connections_per_s: number;
  failed_connections: number;
  /** CPU of each agent per new connection, µs (client node, server node). */
  agent_cpu_us_per_connection: number[];
  /** Audit records each agent produced per second during the rate test (ambient_agent_audit_records_total). */
  records_per_s: number[];
  /** Largest sink lag of either agent when the rate test ended, and the time until every sink had every record. */
  sink_lag_at_end: number;
  catch_up_ms: number;
  /** Records dropped by either agent's queue or spool during the round. */
  dropped: number;
}

export interface MeshAuditFigures {
  rounds: MeshRound[];
  /** Median connections per second of each configuration, and remote over file. */
  median_connections_per_s: Record<MeshAuditConfig, number>;
  ratio: number;
  median_agent_cpu_us_per_connection: Record<MeshAuditConfig, number>;
  median_records_per_s: Record<MeshAuditConfig, number>;
}

export interface MeshAuditSettings {
  rounds: number;
  rateSeconds: number;
  rateThreads: number;
  rateMaxCount: number;
}

const PREFIX_FAMILY = "aabaud";
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT = "client";
const SERVER = "server";
const ECHO_PORT = 7000;
const CATCH_UP_TIMEOUT_MS = 60_000;

const NODES: NodeSpec[] = [
  { name: "baud-n1", pods: [{ name: CLIENT, namespace: "bench-client", serviceAccount: "client" }] },
  { name: "baud-n2", pods: [{ name: SERVER, namespace: "bench-server", serviceAccount: "server" }] },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "bench-client", ambient: true },
  { name: "bench-server", ambient: true },
];
const ALLOW_CLIENT_POLICY = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-allow-client
  namespace: bench-server
spec:
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/bench-client/sa/client"]
`;

interface Receivers {
  otlp: OtlpReceiverProcess;
  syslog: RsyslogServer;
}

interface MeshRun {
  cluster: Cluster;
  tcp: TcpBench;
  otlpPort: number;
  syslogPort: number;
  receivers: Map<string, Receivers>;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length % 2 === 1 ? sorted[(sorted.length - 1) / 2] : (sorted[sorted.length / 2 - 1] + sorted[sorted.length / 2]) / 2;
}

/** Builds the cluster, the TCP application and the echo server, and starts both receivers in each node's namespace. */
async function prepare(): Promise<MeshRun> {
  const cluster = Cluster.create({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES, extraManifests: { "policies.yaml": ALLOW_CLIENT_POLICY }, agentLogLevel: "info" });
  const receivers = new Map<string, Receivers>();
  const run: MeshRun = { cluster, tcp: undefined as unknown as TcpBench, otlpPort: await pickPort(), syslogPort: await pickPort(), receivers };
  try {
    moveToBenchAddresses(cluster);
    for (const pod of [CLIENT, SERVER]) {
      cluster.topology.exec(cluster.topology.pod(pod).netns, "sysctl", ["-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 64999"]);
    }
    run.tcp = TcpBench.build(cluster.topology, cluster.workDir);
    await run.tcp.startEchoServer(SERVER, ECHO_PORT);
    for (const node of cluster.topology.nodes.keys()) {
      const netns = cluster.topology.node(node).netns;
      const otlp = new OtlpReceiverProcess(cluster.topology, netns, run.otlpPort, path.join(cluster.workDir, `otlp-${node}.jsonl`));
      await otlp.start();
      const syslog = await RsyslogServer.start({ prefix: `${PREFIX}-${node}`, netns, tcpPort: run.syslogPort });
      receivers.set(node, { otlp, syslog });
    }
  } catch (error) {
    await cleanUp(run, false);
    throw error;
  }
  return run;
}

async function cleanUp(run: MeshRun, removeWorkDir: boolean): Promise<void> {
  for (const { otlp, syslog } of run.receivers.values()) {
    await otlp.stop().catch(() => undefined);
    await syslog.cleanup().catch(() => undefined);
  }
  await run.cluster.destroy({ removeWorkDir });
}

/** Starts both agents with a new audit file and spool, and the remote sinks of `config`. */
async function startAgents(run: MeshRun, config: MeshAuditConfig, roundIndex: number): Promise<number[]> {
  const { cluster } = run;
  const pids: number[] = [];
  for (const node of cluster.topology.nodes.keys()) {
    const args = [
      "--audit-file", path.join(cluster.workDir, `audit-${node}-${roundIndex}.jsonl`),
      "--audit-spool", path.join(cluster.workDir, `spool-${node}-${roundIndex}`),
    ];
    if (config === "file_otlp_syslog") args.push("--audit-sink", `otlp://127.0.0.1:${run.otlpPort}`, "--audit-sink", `syslog+tcp://127.0.0.1:${run.syslogPort}`);
    const pods = [...cluster.topology.pods.values()].filter((pod) => pod.node === node).map((pod) => pod.name);
    const agent = await cluster.restartAgent(node, pods, args);
    pids.push(agent.pid!);
  }
  return pids;
}

async function stopAgents(run: MeshRun): Promise<void> {
  await Promise.all([...run.cluster.agents.values()].map((agent) => agent.stop()));
}

/** Reads the agent's audit metrics from its admin port, inside its node's namespace. */
function auditMetrics(run: MeshRun, node: string): { records: number; dropped: number; maxLag: number } {
  const text = run.cluster.topology.exec(run.cluster.topology.node(node).netns, "curl", ["-sS", "http://127.0.0.1:15000/metrics"]);
  const sum = (pattern: RegExp): number => [...text.matchAll(pattern)].reduce((total, match) => total + Number(match[1]), 0);
  const lags = [...text.matchAll(/^ambient_agent_audit_sink_lag_records\{[^}]*\} (\S+)$/gm)].map((match) => Number(match[1]));
  return {
    records: sum(/^ambient_agent_audit_records_total\{[^}]*\} (\S+)$/gm),
    dropped: sum(/^ambient_agent_audit_queue_dropped_records_total (\S+)$/gm) + sum(/^ambient_agent_audit_sink_dropped_records_total\{[^}]*\} (\S+)$/gm),
    maxLag: Math.max(0, ...lags),
  };
}

/** Polls both agents until no sink lags; returns the time it took. */
async function waitCaughtUp(run: MeshRun, nodes: string[]): Promise<number> {
  const start = Date.now();
  while (nodes.some((node) => auditMetrics(run, node).maxLag > 0)) {
    if (Date.now() - start > CATCH_UP_TIMEOUT_MS) throw new Error(`the audit sinks did not catch up within ${CATCH_UP_TIMEOUT_MS} ms after the rate test`);
    await sleep(100);
  }
  return Date.now() - start;
}

/** One round: start the agents, warm up, run the rate test, wait for the sinks, stop the agents. */
async function measureRound(run: MeshRun, config: MeshAuditConfig, roundIndex: number, settings: MeshAuditSettings, step: (message: string) => void): Promise<MeshRound> {
  const nodes = [...run.cluster.topology.nodes.keys()];
  const serverIp = run.cluster.topology.pod(SERVER).ip;
  const pids = await startAgents(run, config, roundIndex);
  try {
    await run.tcp.rate(CLIENT, serverIp, ECHO_PORT, settings.rateThreads, 1, settings.rateMaxCount);
    await waitCaughtUp(run, nodes);
    const recordsBefore = nodes.map((node) => auditMetrics(run, node).records);
    const cpuBefore = pids.map(cpuSeconds);
    const result = await run.tcp.rate(CLIENT, serverIp, ECHO_PORT, settings.rateThreads, settings.rateSeconds, settings.rateMaxCount);
    const cpuUsed = pids.map((pid, index) => cpuSeconds(pid) - cpuBefore[index]);
    const after = nodes.map((node) => auditMetrics(run, node));
    const catchUpMs = await waitCaughtUp(run, nodes);
    const dropped = nodes.map((node) => auditMetrics(run, node).dropped).reduce((sum, value) => sum + value, 0);
    if (result.completed === 0) throw new Error(`${config}: no connection completed in the rate test: ${JSON.stringify(result.error_codes)}`);
    const figures: MeshRound = {
      config,
      connections_per_s: round(result.completed / result.elapsed_s, 0),
      failed_connections: result.errors,
      agent_cpu_us_per_connection: cpuUsed.map((seconds) => round((seconds / result.completed) * 1e6, 0)),
      records_per_s: after.map((metrics, index) => round((metrics.records - recordsBefore[index]) / result.elapsed_s, 0)),
      sink_lag_at_end: Math.max(...after.map((metrics) => metrics.maxLag)),
      catch_up_ms: catchUpMs,
      dropped,
    };
    step(`audit mesh round ${roundIndex + 1} (${config}): ${JSON.stringify(figures)}`);
    return figures;
  } finally {
    await stopAgents(run);
  }
}

/** Checks that the receivers of each node hold records, so that the remote configuration really shipped them. */
function assertReceived(run: MeshRun): void {
  for (const [node, { otlp, syslog }] of run.receivers) {
    const otlpLines = fs.existsSync(otlp.outputFile) ? fs.readFileSync(otlp.outputFile, "utf8").split("\n").length - 1 : 0;
    const syslogLines = fs.existsSync(syslog.outputFile) ? fs.readFileSync(syslog.outputFile, "utf8").split("\n").length - 1 : 0;
    if (otlpLines === 0 || syslogLines === 0) throw new Error(`${node}: the OTLP receiver stored ${otlpLines} records and rsyslogd ${syslogLines}: the remote sinks shipped nothing`);
  }
}

/** Alternates the two configurations for `settings.rounds` rounds each and returns the rounds and their medians. */
export async function measureMeshAudit(settings: MeshAuditSettings, step: (message: string) => void): Promise<MeshAuditFigures> {
  removeLeftovers(PREFIX_FAMILY);
  step("audit mesh: building the cluster and starting the receivers");
  const run = await prepare();
  let succeeded = false;
  try {
    const rounds: MeshRound[] = [];
    for (let index = 0; index < 2 * settings.rounds; index += 1) {
      rounds.push(await measureRound(run, index % 2 === 0 ? "file" : "file_otlp_syslog", index, settings, step));
    }
    assertReceived(run);
    succeeded = true;
    const of = (config: MeshAuditConfig): MeshRound[] => rounds.filter((entry) => entry.config === config);
    const medianOf = (config: MeshAuditConfig, value: (entry: MeshRound) => number): number => median(of(config).map(value));
    const connections = {
      file: medianOf("file", (entry) => entry.connections_per_s),
      file_otlp_syslog: medianOf("file_otlp_syslog", (entry) => entry.connections_per_s),
    };
    const mean = (values: number[]): number => values.reduce((sum, value) => sum + value, 0) / values.length;
    return {
      rounds,
      median_connections_per_s: connections,
      ratio: round(connections.file_otlp_syslog / connections.file, 3),
      median_agent_cpu_us_per_connection: {
        file: medianOf("file", (entry) => mean(entry.agent_cpu_us_per_connection)),
        file_otlp_syslog: medianOf("file_otlp_syslog", (entry) => mean(entry.agent_cpu_us_per_connection)),
      },
      median_records_per_s: {
        file: medianOf("file", (entry) => mean(entry.records_per_s)),
        file_otlp_syslog: medianOf("file_otlp_syslog", (entry) => mean(entry.records_per_s)),
      },
    };
  } finally {
    await cleanUp(run, succeeded);
    if (!succeeded) step(`audit mesh: the run failed; agent logs are kept in ${run.cluster.workDir}`);
  }
}
