// The audit figures of `make bench`, measured in a child process that runs with the agent's Node
// flags (AGENT_NODE_FLAGS), so that the heap left by the other measurements does not count:
//
//   burst    an AuditPipeline with the file sink (and remote sinks, for the remote scenarios) gets
//            completed-connection records as fast as it takes them. The benchmark writes 500 records
//            per event-loop turn while fewer than 20,000 wait in the queue. Records per second from
//            the first write until flush() resolves
//   steady   the same pipeline gets a fixed rate for a fixed time in 1 ms ticks: each tick writes
//            the records due since the start. The queue and the sinks' lag are sampled every
//            100 ms, and the CPU time of the main thread and of the whole process is taken from the
//            first write until flush() resolves, minus what building the records costs alone
//
// Records are built by ConnectionRecord, as the proxies build them, with the peers of a mesh
// connection filled in. The spool and the file sit in a temporary folder on the disk of the
// temporary directory, which is removed at the end. The OTLP receiver and rsyslogd are separate
// processes on 127.0.0.1, started by the parent (audit-mesh.ts has the mesh comparison).

import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { AuditPipeline } from "../../agent/audit/pipeline";
import type { AuditRecorder } from "../../agent/audit/record";
import type { AuditSink } from "../../agent/audit/sink";
import { FileSink } from "../../agent/audit/sinks/file";
import { OtlpLogsSink } from "../../agent/audit/sinks/otlp";
import { SyslogSink } from "../../agent/audit/sinks/syslog";
import type { FsyncPolicy } from "../../agent/audit/spool";
import { AGENT_NODE_FLAGS } from "../../agent/cli/node-flags";
import { silentLogger } from "../../agent/log";
import { ConnectionRecord } from "../../agent/proxy/connection-record";
import { forgetRun, registerPid } from "../harness/pid-registry";
import { pickPort } from "../harness/otlp-receiver-process";
import { RsyslogServer } from "../harness/rsyslog";
import { countFileSetLines, measureMeshAudit, type MeshAuditConfig, type MeshAuditFigures, type MeshAuditSettings, type MeshRound } from "./audit-mesh";
import { cpuSeconds } from "./proc-stats";
import { round } from "./stats";

/** Where the pipeline sends its records besides the file, with the remote receivers' addresses. */
export interface PipelineScenario {
  name: string;
  fsync: "interval" | "always";
  otlpEndpoint?: string;
  syslogPort?: number;
  /** Records per burst, and bursts; the figure is their median. */
  burstRecords: number;
  burstRounds: number;
  /** Records per second and seconds of the steady run. */
  steadyRate: number;
  steadySeconds: number;
}

export interface BurstFigures {
  /** Records per second of each burst, first write until flush() resolved. */
  records_per_s: number[];
  dropped: number;
}

export interface SteadyFigures {
  offered_per_s: number;
  seconds: number;
  records: number;
  /** Records the queue dropped; 0 when the pipeline kept up. */
  dropped: number;
  /** Records every sink accepted, checked against `records`. */
  delivered_by_all_sinks: number;
  /** Lines in the audit file and its rotated files at the end, checked against `records`. */
  file_lines: number;
  max_queue_records: number;
  /** Largest lag of any sink, in records, sampled every 100 ms. */
  max_sink_lag_records: number;
  /** Time from the last write until every sink had every record. */
  drain_ms: number;
  /** Event-loop delay while records were offered: p99 and max, ms. */
  event_loop_delay_p99_ms: number;
  event_loop_delay_max_ms: number;
  /** CPU per record of the pipeline and its sinks, with the cost of building the record removed. */
  main_thread_cpu_us_per_record: number;
  process_cpu_us_per_record: number;
}

export interface PipelineFigures {
  scenario: string;
  /** Length of one sealed line, bytes. */
  line_bytes: number;
  /** CPU to build one record with ConnectionRecord (main thread), subtracted from the figures. */
  build_cpu_us_per_record: number;
  burst: BurstFigures;
  steady: SteadyFigures;
}

const NODE = "bench-n2";
/** Records waiting in the queue above which the burst stops writing for a turn. */
const BURST_QUEUE_LIMIT = 20_000;
const BURST_CHUNK = 500;
const SAMPLE_INTERVAL_MS = 100;
const FLUSH_TIMEOUT_MS = 60_000;

/** Takes the opened record that ConnectionRecord.opened() writes, so that the completion record has `established: true`. */
const DISCARD: AuditRecorder = { write: () => undefined };

/** Builds the completion record of one allowed inbound HBONE connection, as the inbound proxy does. */
export function buildConnectionRecord(index: number): ReturnType<ConnectionRecord["toAuditRecord"]> {
  const connection = new ConnectionRecord({
    node: NODE,
    direction: "inbound",
    transport: "hbone",
    src: {
      addr: `10.244.1.240:${20_000 + (index % 45_000)}`,
      workload: "client",
      namespace: "bench-client",
      identity: "spiffe://cluster.local/ns/bench-client/sa/client",
    },
    dst: {
      addr: "10.244.2.241:7000",
      workload: "server",
      namespace: "bench-server",
      identity: "spiffe://cluster.local/ns/bench-server/sa/server",
      hbone_addr: "10.244.2.241:15008",
    },
  });
  connection.authorized({ decision: "allow", reason: "allowed_by_policy", policy: "bench-server/server-allow-client", policyKind: "AuthorizationPolicy", rule: 0, dryRun: [] });
  connection.opened(DISCARD);
  connection.bytesSent = 1 + (index % 4096);
  connection.bytesRecv = 1 + (index % 4096);
  return connection.toAuditRecord();
}

let clockTicksPerSecond: number | undefined;

/** Returns the user plus system CPU seconds of this process's main thread, from /proc/self/task/<pid>/stat. */
function mainThreadCpuSeconds(): number {
  clockTicksPerSecond ??= Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim());
  const stat = fs.readFileSync(`/proc/self/task/${process.pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond;
}

function processCpuSeconds(): number {
  const usage = process.cpuUsage();
  return (usage.user + usage.system) / 1e6;
}

/** Measures the CPU of building records alone, µs per record, on the main thread. */
function measureBuildCost(): number {
  const count = 50_000;
  const start = process.cpuUsage();
  let bytes = 0;
  for (let index = 0; index < count; index += 1) bytes += buildConnectionRecord(index).src.addr.length;
  const used = process.cpuUsage(start);
  if (bytes === 0) throw new Error("no record was built");
  return (used.user + used.system) / count;
}

function createSinks(scenario: PipelineScenario, dir: string): AuditSink[] {
  const logger = silentLogger();
  const sinks: AuditSink[] = [new FileSink({ path: path.join(dir, "audit.log"), fsync: scenario.fsync === "always" }, logger)];
  if (scenario.otlpEndpoint) sinks.push(new OtlpLogsSink({ endpoint: scenario.otlpEndpoint, node: NODE }, logger));
  if (scenario.syslogPort) sinks.push(new SyslogSink({ host: "127.0.0.1", port: scenario.syslogPort, node: NODE }, logger));
  return sinks;
}

async function startPipeline(scenario: PipelineScenario, dir: string): Promise<AuditPipeline> {
  const fsync: FsyncPolicy = scenario.fsync === "always" ? { mode: "always" } : { mode: "interval", intervalMs: 1_000 };
  const pipeline = new AuditPipeline({ node: NODE, spoolDir: path.join(dir, "spool"), sinks: createSinks(scenario, dir), fsync }, silentLogger());
  await pipeline.start();
  return pipeline;
}

const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves when every written record reached every sink; rejects after FLUSH_TIMEOUT_MS. */
async function flushOrFail(pipeline: AuditPipeline, what: string): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: the sinks did not catch up within ${FLUSH_TIMEOUT_MS} ms: ${JSON.stringify(pipeline.status().sinks)}`)), FLUSH_TIMEOUT_MS);
  });
  try {
    await Promise.race([pipeline.flush(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Writes `count` records as fast as the queue drains and returns records per second until flush. */
async function runBurst(scenario: PipelineScenario, dir: string, count: number): Promise<{ perSecond: number; dropped: number }> {
  const pipeline = await startPipeline(scenario, dir);
  try {
    const start = process.hrtime.bigint();
    for (let written = 0; written < count; ) {
      if (pipeline.status().queue.records < BURST_QUEUE_LIMIT) {
        const end = Math.min(count, written + BURST_CHUNK);
        for (; written < end; written += 1) pipeline.write(buildConnectionRecord(written));
      }
      await nextTurn();
    }
    await flushOrFail(pipeline, `${scenario.name} burst`);
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    return { perSecond: count / seconds, dropped: pipeline.status().dropped.queue_full };
  } finally {
    await pipeline.close();
  }
}

/** Offers `rate` records per second for `seconds` in 1 ms ticks and returns what the pipeline did with them. */
async function runSteady(scenario: PipelineScenario, dir: string, buildUs: number): Promise<SteadyFigures> {
  const pipeline = await startPipeline(scenario, dir);
  const total = scenario.steadyRate * scenario.steadySeconds;
  let maxQueue = 0;
  let maxLag = 0;
  const sample = (): void => {
    const status = pipeline.status();
    maxQueue = Math.max(maxQueue, status.queue.records);
    for (const sink of status.sinks) maxLag = Math.max(maxLag, sink.lag);
  };
  const sampler = setInterval(sample, SAMPLE_INTERVAL_MS);
  const loopDelay = monitorEventLoopDelay({ resolution: 1 });
  try {
    const mainBefore = mainThreadCpuSeconds();
    const processBefore = processCpuSeconds();
    loopDelay.enable();
    const start = process.hrtime.bigint();
    let written = 0;
    while (written < total) {
      const elapsedMs = Number(process.hrtime.bigint() - start) / 1e6;
      const due = Math.min(total, Math.floor((elapsedMs * scenario.steadyRate) / 1000));
      for (; written < due; written += 1) pipeline.write(buildConnectionRecord(written));
      await sleep(1);
    }
    loopDelay.disable();
    const offeredEnd = process.hrtime.bigint();
    await flushOrFail(pipeline, `${scenario.name} steady`);
    const drainMs = Number(process.hrtime.bigint() - offeredEnd) / 1e6;
    const mainUs = (mainThreadCpuSeconds() - mainBefore) * 1e6;
    const processUs = (processCpuSeconds() - processBefore) * 1e6;
    sample();
    const status = pipeline.status();
    const deliveredByAll = Math.min(...status.sinks.map((sink) => sink.delivered));
    return {
      offered_per_s: scenario.steadyRate,
      seconds: scenario.steadySeconds,
      records: total,
      dropped: status.dropped.queue_full,
      delivered_by_all_sinks: deliveredByAll,
      file_lines: countFileSetLines(path.join(dir, "audit.log")),
      max_queue_records: maxQueue,
      max_sink_lag_records: maxLag,
      drain_ms: round(drainMs, 1),
      event_loop_delay_p99_ms: round(loopDelay.percentile(99) / 1e6, 2),
      event_loop_delay_max_ms: round(loopDelay.max / 1e6, 2),
      main_thread_cpu_us_per_record: round(mainUs / total - buildUs, 2),
      process_cpu_us_per_record: round(processUs / total - buildUs, 2),
    };
  } finally {
    clearInterval(sampler);
    await pipeline.close();
  }
}

/** Runs one scenario in this process: build cost, the bursts, then the steady run, each in a fresh folder. */
export async function measureScenario(scenario: PipelineScenario): Promise<PipelineFigures> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), `aabaud${process.pid}-pipeline-`));
  const fresh = (name: string): string => {
    const dir = path.join(root, name);
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir);
    return dir;
  };
  try {
    const buildUs = measureBuildCost();
    const burstRates: number[] = [];
    let dropped = 0;
    for (let index = 0; index < scenario.burstRounds; index += 1) {
      const burst = await runBurst(scenario, fresh(`burst-${index}`), scenario.burstRecords);
      burstRates.push(round(burst.perSecond, 0));
      dropped += burst.dropped;
      fs.rmSync(path.join(root, `burst-${index}`), { recursive: true, force: true });
    }
    const steadyDir = fresh("steady");
    const steady = await runSteady(scenario, steadyDir, buildUs);
    const firstLine = fs.readFileSync(path.join(steadyDir, "audit.log"), "utf8").slice(0, 4096).split("\n")[0];
    return {
      scenario: scenario.name,
      line_bytes: Buffer.byteLength(firstLine),
      build_cpu_us_per_record: round(buildUs, 2),
      burst: { records_per_s: burstRates, dropped },
      steady,
    };
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}

/** Runs measureScenario in a child process started with the agent's Node flags, and returns its figures. */
export function measureScenarioInChild(scenario: PipelineScenario): PipelineFigures {
  const output = execFileSync(process.execPath, [...AGENT_NODE_FLAGS, __filename, JSON.stringify(scenario)], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    timeout: 300_000,
  });
  return JSON.parse(output) as PipelineFigures;
}

// ---------------------------------------------------------------------------------------------
// The whole audit part: the in-process scenarios, the remote receivers, the mesh comparison

/** Target of the file sink alone: records per second the pipeline sustains. */
export const FILE_TARGET_PER_S = 20_000;
/** Target with remote sinks. */
export const REMOTE_TARGET_PER_S = 5_000;
/** Most that connection setup latency through the mesh (p50 and p99) may grow when the agents ship to remote sinks. */
export const MESH_SLOWDOWN_LIMIT = 0.05;

export interface AuditFigures {
  pipeline: PipelineFigures[];
  /** CPU of the receiver processes per record they received, µs (OTLP receiver, rsyslogd). */
  receiver_cpu_us_per_record: Record<string, number>;
  mesh: MeshAuditFigures;
  /** Pipeline CPU (main thread, file sink; file, OTLP and syslog) for the two records of a connection, as a share of an agent's CPU per new connection at saturation. */
  pipeline_share_of_connection_cpu: { file: number; file_otlp_syslog: number };
}

interface AuditSettings {
  fileBurstRecords: number;
  remoteBurstRecords: number;
  burstRounds: number;
  steadySeconds: number;
  mesh: MeshAuditSettings;
}

const FULL: AuditSettings = {
  fileBurstRecords: 100_000,
  remoteBurstRecords: 50_000,
  burstRounds: 3,
  steadySeconds: 10,
  mesh: { rounds: 3, setupRate: 200, setupSeconds: 15, setupWarmupSeconds: 1, rateSeconds: 4, rateThreads: 16, rateMaxCount: 200_000 },
};
const QUICK: AuditSettings = {
  fileBurstRecords: 20_000,
  remoteBurstRecords: 10_000,
  burstRounds: 1,
  steadySeconds: 3,
  mesh: { rounds: 1, setupRate: 400, setupSeconds: 3, setupWarmupSeconds: 0.5, rateSeconds: 2, rateThreads: 16, rateMaxCount: 100_000 },
};

/** A receiver process and how to read its CPU time. */
interface Receiver {
  name: string;
  pid: number;
  stop(): Promise<void>;
}

/** Starts the OTLP receiver as a plain child process on 127.0.0.1 of this namespace. */
async function startOtlpReceiver(dir: string): Promise<Receiver & { endpoint: string }> {
  const port = await pickPort();
  const script = path.join(__dirname, "..", "harness", "otlp-receiver-process.js");
  const child = spawn(process.execPath, [script, String(port), path.join(dir, "otlp.jsonl")], { stdio: ["ignore", "ignore", "inherit"] });
  registerPid(`aabaud${process.pid}-receivers`, child.pid);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const deadline = Date.now() + 10_000;
  while (!(await canConnect(port))) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`the OTLP receiver ${script} did not listen on 127.0.0.1:${port} within 10 s (exit code ${String(child.exitCode)})`);
    }
    await sleep(50);
  }
  return {
    name: "otlp receiver",
    pid: child.pid!,
    endpoint: `127.0.0.1:${port}`,
    stop: async () => {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** Runs a scenario in a child process and adds the receivers' CPU per record to `receiverCpu`. */
function runScenario(scenario: PipelineScenario, receivers: Receiver[], receiverCpu: Record<string, number>, step: (message: string) => void): PipelineFigures {
  step(`audit pipeline: ${scenario.name}, ${scenario.burstRounds} bursts of ${scenario.burstRecords} records, then ${scenario.steadyRate} records/s for ${scenario.steadySeconds} s`);
  const before = receivers.map((receiver) => cpuSeconds(receiver.pid));
  const figures = measureScenarioInChild(scenario);
  const records = scenario.burstRounds * scenario.burstRecords + scenario.steadyRate * scenario.steadySeconds;
  receivers.forEach((receiver, index) => {
    receiverCpu[`${receiver.name} (${scenario.name})`] = round(((cpuSeconds(receiver.pid) - before[index]) / records) * 1e6, 2);
  });
  step(`audit pipeline: ${scenario.name}: ${JSON.stringify(figures)}`);
  return figures;
}

/** Measures the pipeline in process for each scenario, then connection setup through the mesh. */
export async function measureAudit(quick: boolean, step: (message: string) => void): Promise<AuditFigures> {
  const settings = quick ? QUICK : FULL;
  const file = (name: string, fsync: PipelineScenario["fsync"]): PipelineScenario => ({
    name, fsync, burstRecords: settings.fileBurstRecords, burstRounds: settings.burstRounds, steadyRate: FILE_TARGET_PER_S, steadySeconds: settings.steadySeconds,
  });
  const pipeline = [runScenario(file("file", "interval"), [], {}, step), runScenario(file("file, fsync always", "always"), [], {}, step)];

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `aabaud${process.pid}-receivers-`));
  const receiverCpu: Record<string, number> = {};
  let otlp: (Receiver & { endpoint: string }) | undefined;
  let rsyslog: RsyslogServer | undefined;
  try {
    otlp = await startOtlpReceiver(dir);
    rsyslog = await RsyslogServer.start({ prefix: `aabaud${process.pid}-rsyslog` });
    const rsyslogReceiver: Receiver = { name: "rsyslogd", pid: rsyslogPid(rsyslog), stop: () => rsyslog!.stop() };
    const remote = (name: string, sinks: Partial<PipelineScenario>): PipelineScenario => ({
      name, fsync: "interval", burstRecords: settings.remoteBurstRecords, burstRounds: settings.burstRounds, steadyRate: REMOTE_TARGET_PER_S, steadySeconds: settings.steadySeconds, ...sinks,
    });
    pipeline.push(runScenario(remote("file + otlp", { otlpEndpoint: otlp.endpoint }), [otlp], receiverCpu, step));
    pipeline.push(runScenario(remote("file + syslog", { syslogPort: rsyslog.tcpPort }), [rsyslogReceiver], receiverCpu, step));
    pipeline.push(runScenario(remote("file + otlp + syslog", { otlpEndpoint: otlp.endpoint, syslogPort: rsyslog.tcpPort }), [otlp, rsyslogReceiver], receiverCpu, step));
  } finally {
    await otlp?.stop().catch(() => undefined);
    await rsyslog?.cleanup().catch(() => undefined);
    forgetRun(`aabaud${process.pid}-receivers`);
    fs.rmSync(dir, { recursive: true, force: true });
  }

  const mesh = await measureMeshAudit(settings.mesh, step);
  const share = (scenario: string, config: MeshAuditConfig): number => {
    const perRecord = pipeline.find((figures) => figures.scenario === scenario)!.steady.main_thread_cpu_us_per_record;
    return round((2 * perRecord) / mesh.median_agent_cpu_us_per_connection[config], 3);
  };
  return {
    pipeline,
    receiver_cpu_us_per_record: receiverCpu,
    mesh,
    pipeline_share_of_connection_cpu: { file: share("file", "file"), file_otlp_syslog: share("file + otlp + syslog", "file_otlp_syslog") },
  };
}

// ---------------------------------------------------------------------------------------------
// The table

/** Tells whether a scenario sustained `target` records per second: bursts at or above it, and a steady run with every record delivered. */
export function sustained(figures: PipelineFigures, target: number): boolean {
  const { steady } = figures;
  const everyRecord = steady.dropped === 0 && steady.delivered_by_all_sinks === steady.records && steady.file_lines === steady.records;
  // Bounded: the queue never held more than one second of records.
  const bounded = steady.max_queue_records < steady.offered_per_s && steady.max_sink_lag_records < steady.offered_per_s;
  return median(figures.burst.records_per_s) >= target && steady.offered_per_s >= target && everyRecord && bounded;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length % 2 === 1 ? sorted[(sorted.length - 1) / 2] : (sorted[sorted.length / 2 - 1] + sorted[sorted.length / 2]) / 2;
}

function range(values: number[]): string {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length > 1 ? ` (${sorted[0]}-${sorted[sorted.length - 1]})` : "";
}

/** Returns the rows of the audit table: figure, value, target, met. */
export function auditRows(figures: AuditFigures): string[][] {
  const rows: string[][] = [];
  for (const scenario of figures.pipeline) {
    const target = scenario.scenario.startsWith("file +") ? REMOTE_TARGET_PER_S : FILE_TARGET_PER_S;
    const { steady } = scenario;
    const met = sustained(scenario, target) ? "yes" : "no";
    rows.push([`${scenario.scenario}: burst, records/s (median of ${scenario.burst.records_per_s.length})`, `${median(scenario.burst.records_per_s)}${range(scenario.burst.records_per_s)}`, `>= ${target}`, met]);
    rows.push([
      `${scenario.scenario}: ${steady.offered_per_s}/s for ${steady.seconds} s: dropped, max queue, max lag, drain ms`,
      `${steady.dropped}, ${steady.max_queue_records}, ${steady.max_sink_lag_records}, ${steady.drain_ms}`,
      "0 dropped, bounded",
      met,
    ]);
    rows.push([`${scenario.scenario}: CPU µs per record, main thread / process`, `${steady.main_thread_cpu_us_per_record} / ${steady.process_cpu_us_per_record}`, "", ""]);
    rows.push([`${scenario.scenario}: event-loop delay ms, p99 / max`, `${steady.event_loop_delay_p99_ms} / ${steady.event_loop_delay_max_ms}`, "", ""]);
  }
  for (const [name, value] of Object.entries(figures.receiver_cpu_us_per_record)) rows.push([`receiver CPU µs per record, ${name}`, String(value), "", ""]);
  rows.push(...meshRows(figures.mesh));
  const share = figures.pipeline_share_of_connection_cpu;
  rows.push(["pipeline share of saturated agent CPU per connection, file / remote", `${round(share.file * 100, 1)}% / ${round(share.file_otlp_syslog * 100, 1)}%`, "", ""]);
  return rows;
}

/** Returns the mesh rows: setup latency at a fixed rate (the target), then the saturated rate (context). */
function meshRows(mesh: MeshAuditFigures): string[][] {
  const rows: string[][] = [];
  const rounds = mesh.rounds.length / 2;
  const rate = mesh.rounds[0]?.setup.connections_per_s ?? 0;
  const of = (config: MeshAuditConfig): MeshRound[] => mesh.rounds.filter((entry) => entry.config === config);
  const setup = (config: MeshAuditConfig): string => {
    const { p50, p90, p99 } = mesh.median_setup_us[config];
    return `${p50} / ${p90} / ${p99}`;
  };
  const limit = 1 + MESH_SLOWDOWN_LIMIT;
  const met = (ratio: number): string => (ratio <= limit ? "yes" : "no");
  rows.push([`mesh connection setup µs at ${rate}/s, file only: p50 / p90 / p99 (median of ${rounds})`, setup("file"), "", ""]);
  rows.push([`mesh connection setup µs at ${rate}/s, file + otlp + syslog: p50 / p90 / p99 (median of ${rounds})`, setup("file_otlp_syslog"), "", ""]);
  rows.push(["mesh connection setup p50, remote over file", String(mesh.setup_ratio.p50), `<= ${limit}`, met(mesh.setup_ratio.p50)]);
  rows.push(["mesh connection setup p99, remote over file", String(mesh.setup_ratio.p99), `<= ${limit}`, met(mesh.setup_ratio.p99)]);
  const cpu = mesh.median_setup_agent_cpu_us_per_connection;
  rows.push([`mesh agent CPU µs per connection at ${rate}/s, file / remote`, `${round(cpu.file, 0)} / ${round(cpu.file_otlp_syslog, 0)}`, "", ""]);
  const remote = of("file_otlp_syslog").flatMap((entry) => entry.delivered);
  const sum = (values: (number | undefined)[]): number => values.reduce<number>((total, value) => total + (value ?? 0), 0);
  rows.push([
    "mesh setup test records, remote rounds: file / OTLP receiver / rsyslogd",
    `${sum(remote.map((entry) => entry.file))} / ${sum(remote.map((entry) => entry.otlp))} / ${sum(remote.map((entry) => entry.syslog))}`,
    "all delivered",
    remote.every((entry) => (entry.otlp ?? 0) >= entry.file && (entry.syslog ?? 0) >= entry.file) ? "yes" : "no",
  ]);
  const connections = (config: MeshAuditConfig): string => `${mesh.median_connections_per_s[config]}${range(of(config).map((entry) => entry.saturated.connections_per_s))}`;
  rows.push([`mesh saturated new connections/s, file only (median of ${rounds})`, connections("file"), "", ""]);
  rows.push([`mesh saturated new connections/s, file + otlp + syslog (median of ${rounds})`, connections("file_otlp_syslog"), "", ""]);
  rows.push(["mesh saturated new connections/s, remote over file", String(mesh.rate_ratio), "", ""]);
  rows.push(["mesh saturated agent CPU µs per connection, file / remote", `${round(mesh.median_agent_cpu_us_per_connection.file, 0)} / ${round(mesh.median_agent_cpu_us_per_connection.file_otlp_syslog, 0)}`, "", ""]);
  rows.push(["mesh saturated audit records/s per agent, file / remote", `${mesh.median_records_per_s.file} / ${mesh.median_records_per_s.file_otlp_syslog}`, "", ""]);
  return rows;
}

/** Renders the audit figures as a plain-text table with their targets. */
export function formatAuditTable(figures: AuditFigures, machine: { cores: number; model: string }, time: string): string {
  const header = ["figure", "value", "target", "met"];
  const rows = auditRows(figures);
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((cells) => cells[column].length)));
  const line = (cells: string[]): string => cells.map((cell, column) => cell.padEnd(widths[column])).join("  ").trimEnd();
  return [line(header), line(widths.map((width) => "-".repeat(width))), ...rows.map(line), "", `machine: ${machine.model}, ${machine.cores} cores, ${time}`].join("\n");
}

/** Returns rsyslogd's PID from the pid file it writes into its folder. */
function rsyslogPid(server: RsyslogServer): number {
  const pidFile = path.join(path.dirname(server.outputFile), "rsyslogd.pid");
  return Number(fs.readFileSync(pidFile, "utf8").trim());
}

if (require.main === module) {
  measureScenario(JSON.parse(process.argv[2]) as PipelineScenario)
    .then((figures) => {
      process.stdout.write(JSON.stringify(figures) + "\n");
      process.exit(0);
    })
    .catch((error: Error) => {
      process.stderr.write(`audit pipeline measurement failed: ${error.stack ?? error.message}\n`);
      process.exit(1);
    });
}
