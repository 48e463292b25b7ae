// `make bench`: throughput, CPU, latency, connection rate and memory of the mesh, measured on the
// namespace harness (real namespaces, veth, agents and eBPF) for one client pod on node bench-n1
// and one server pod on node bench-n2. The same two pods carry three paths:
//
//   direct      plain TCP between the pods, before the agents start (nothing is captured yet)
//   native_tls  a socat mutual-TLS tunnel pair between the pods, also before the agents start
//   mesh        HBONE through both agents, after they start and enroll the pods
//
// Before those, it measures the capture layer on its own: how long one agent takes to serve 100 pods
// that exist when it starts (enrollment.ts), and the cost of the original-destination lookup per
// new connection (lookup.ts).
//
// Prints a table and writes bench-results.json at the project root. Pass --quick for a shorter run
// (for checking the harness, not for figures), --markdown to print the table as Markdown too,
// --cpu-prof to profile both agents and print where their CPU time went, and --capture-only to
// measure the capture layer alone (its table is printed, no results file is written). The identity
// figures (identity.ts: issuing a certificate, 1,000 identities re-issued under load) come first;
// --identity-only measures them alone. The authorization figures (authz.ts: decisions with 10,000
// policies loaded, loading and changing them) come before those; --authz-only measures them alone.
// The audit figures (audit.ts: records per second through the audit pipeline, and connection setup
// with remote audit sinks against the file alone) come after the authorization figures;
// --audit-only measures them alone. The Kubernetes figures (kubernetes.ts: enrolment after a
// namespace label change, agent memory with 10,000 pods and 1,000 services in the API server, and
// pod churn) come after the audit figures; --kubernetes-only measures them alone, and
// --heap-snapshot adds a heap snapshot of the loaded agent and its largest constructors. The
// diagnostics figures (diagnostics.ts: mesh throughput and connection rate with the connection
// tracker and Istio TCP metrics on and off, /metrics scrape cost, admin API latency with 10,000
// workloads) come after the Kubernetes figures; --diagnostics-only measures them alone.

import { execFileSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { AGENT_BIN, REPO_ROOT } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { IPERF_PORT, runIperfClient, startIperfServer, type IperfResult } from "./iperf";
import { summarizeProfiles, withCpuProfiles } from "./cpu-profile";
import { measureEnrollment } from "./enrollment";
import { measureLookup } from "./lookup";
import { makeCertificates, NATIVE_CLIENT_PORT, startNativeTunnel, stopNativeTunnel, tunnelCiphers } from "./native-tls";
import { moveToBenchAddresses } from "./pod-ips";
import { TcpBench, type IdleOpened } from "./tcp-bench";
import { assertProcessRuns, cpuSeconds, rssKib } from "./proc-stats";
import { measureIdentity } from "./identity";
import { formatAuthzTable, measureAuthz } from "./authz";
import { formatAuditTable, measureAudit } from "./audit";
import { formatKubernetesTable, KUBERNETES_FULL, KUBERNETES_QUICK, measureKubernetes } from "./kubernetes";
import { DIAGNOSTICS_FULL, DIAGNOSTICS_QUICK, formatDiagnosticsTable, measureDiagnostics } from "./diagnostics";
import { describeMachine, formatCaptureTable, formatIdentityTable, formatMarkdown, formatTable, writeResults, type BenchResults, type CaptureFigures } from "./report";
import { round, type LatencySummary } from "./stats";
import { ALLOW_CLIENT_POLICY, BENCH_NAMESPACES, CLIENT, SERVER, benchNodes } from "./mesh-pods";

const PREFIX_FAMILY = "aabench";
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const ECHO_PORT = 7000;
const RESULTS_FILE = path.join(REPO_ROOT, "bench-results.json");
const GIB = 1024 ** 3;

const NODES = benchNodes("bench");
const NAMESPACES = BENCH_NAMESPACES;

interface Settings {
  /** Folder for the agents' CPU profiles, or undefined for a run without profiling. */
  profileDir?: string;
  iperfSeconds: number;
  /** iperf3 runs per path; the throughput is their median. */
  iperfRounds: number;
  latencyCount: number;
  latencyWarmup: number;
  rateSeconds: number;
  rateThreads: number;
  rateMaxCount: number;
  idleCount: number;
  /** Pause before each memory reading, so that work in flight finishes. */
  settleMs: number;
  /** Pods of the enrolment node, and agent starts with them (the first cold, the rest restarts). */
  enrollPods: number;
  enrollStarts: number;
  /** Rounds of 1,000 original-destination lookups per case. */
  lookupRounds: number;
}

const FULL: Settings = { iperfSeconds: 4, iperfRounds: 3, latencyCount: 10_000, latencyWarmup: 1000, rateSeconds: 4, rateThreads: 16, rateMaxCount: 200_000, idleCount: 1000, settleMs: 2000, enrollPods: 100, enrollStarts: 3, lookupRounds: 20 };
const QUICK: Settings = { iperfSeconds: 2, iperfRounds: 1, latencyCount: 2000, latencyWarmup: 200, rateSeconds: 2, rateThreads: 16, rateMaxCount: 100_000, idleCount: 1000, settleMs: 1000, enrollPods: 100, enrollStarts: 1, lookupRounds: 5 };

interface PathFigures {
  iperf: IperfResult;
  latency: LatencySummary;
  /** Mesh only: the round trips with the agents free to run on any CPU. */
  latencyAgentsUnpinned?: LatencySummary;
  connectionsPerSecond: number;
}

/** The cluster and the compiled TCP application of one run. */
interface Run {
  cluster: Cluster;
  tcp: TcpBench;
  settings: Settings;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function step(message: string): void {
  process.stderr.write(`bench: ${message}\n`);
}

/** Tunes the pods' TCP, builds the TCP application and starts the servers, before any agent starts. */
async function prepareRun(cluster: Cluster, settings: Settings): Promise<Run> {
  moveToBenchAddresses(cluster);
  for (const pod of [CLIENT, SERVER]) {
    // The rate test closes tens of thousands of connections from the client side: reuse TIME_WAIT
    // ports after 1 s and widen the ephemeral range, so the test never runs out of source ports.
    const netns = cluster.topology.pod(pod).netns;
    cluster.topology.exec(netns, "sysctl", ["-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 64999"]);
  }
  const tcp = TcpBench.build(cluster.topology, cluster.workDir);
  await startIperfServer(cluster.topology, SERVER, cluster.workDir);
  await tcp.startEchoServer(SERVER, ECHO_PORT);
  return { cluster, tcp, settings };
}

function serverIp(run: Run): string {
  return run.cluster.topology.pod(SERVER).ip;
}

async function measureRate(run: Run, name: string, agentPids: number[] = []): Promise<number> {
  const { settings } = run;
  const cpuBefore = agentPids.map(cpuSeconds);
  const result = await run.tcp.rate(CLIENT, serverIp(run), ECHO_PORT, settings.rateThreads, settings.rateSeconds, settings.rateMaxCount);
  if (agentPids.length > 0 && result.completed > 0) {
    const perConnectionUs = agentPids.map((pid, index) => ((cpuSeconds(pid) - cpuBefore[index]) / result.completed) * 1e6);
    step(`${name}: agent CPU per new connection: ${perConnectionUs.map((value) => value.toFixed(0)).join(" and ")} µs`);
  }
  if (result.errors > 0) step(`${name}: ${result.errors} connections failed: ${JSON.stringify(result.error_codes)}`);
  if (result.completed === 0) throw new Error(`${name}: no connection completed in the rate test: ${JSON.stringify(result.error_codes)}`);
  return result.completed / result.elapsed_s;
}

/**
 * Measures one path: throughput, round-trip latency and connection rate, in that order. For the
 * mesh, `agentPids` are the agents: the round trips run twice, with the agents free to run on any
 * CPU and then on the client's CPU, as the client and echo server of the direct path are.
 */
async function measurePath(
  run: Run,
  name: string,
  wrapIperf?: (iperf: () => Promise<IperfResult>) => Promise<IperfResult>,
  agentPids?: number[],
): Promise<PathFigures> {
  const { settings } = run;
  step(`${name}: iperf3, one stream for ${settings.iperfSeconds} s, ${settings.iperfRounds} times`);
  const runIperf = (): Promise<IperfResult> =>
    iperfRounds(run, name, () => runIperfClient(run.cluster.topology, CLIENT, serverIp(run), IPERF_PORT, settings.iperfSeconds));
  const iperf = wrapIperf ? await wrapIperf(runIperf) : await runIperf();
  const roundTrips = (): Promise<LatencySummary> =>
    run.tcp.latency(CLIENT, serverIp(run), ECHO_PORT, 1024, settings.latencyWarmup, settings.latencyCount);
  let latencyAgentsUnpinned: LatencySummary | undefined;
  let latency: LatencySummary;
  if (agentPids && run.tcp.latencyCpu !== undefined) {
    step(`${name}: ${settings.latencyCount} round trips of 1 KiB, agents on any CPU`);
    latencyAgentsUnpinned = await roundTrips();
    step(`${name}: ${settings.latencyCount} round trips of 1 KiB, agents on CPU ${run.tcp.latencyCpu}`);
    latency = await withAffinity(agentPids, String(run.tcp.latencyCpu), roundTrips);
  } else {
    step(`${name}: ${settings.latencyCount} round trips of 1 KiB`);
    latency = await roundTrips();
  }
  step(`${name}: new connections for ${settings.rateSeconds} s from ${settings.rateThreads} threads`);
  const connectionsPerSecond = await measureRate(run, name, agentPids);
  return { iperf, latency, latencyAgentsUnpinned, connectionsPerSecond };
}

/** Runs `work` with every thread of each process in `pids` on `cpus` (a taskset CPU list), then restores their affinity. */
async function withAffinity<T>(pids: number[], cpus: string, work: () => Promise<T>): Promise<T> {
  const previous = pids.map((pid) => /: (\S+)\s*$/.exec(execFileSync("taskset", ["-c", "-p", String(pid)], { encoding: "utf8" }))?.[1] ?? "");
  for (const pid of pids) execFileSync("taskset", ["-a", "-c", "-p", cpus, String(pid)], { stdio: "ignore" });
  try {
    return await work();
  } finally {
    pids.forEach((pid, index) => {
      if (previous[index]) execFileSync("taskset", ["-a", "-c", "-p", previous[index], String(pid)], { stdio: "ignore" });
    });
  }
}

/**
 * Runs iperf3 `iperfRounds` times and returns the median rate, because one run on a shared VM can be
 * off by a fifth. Bytes and seconds are the totals of the rounds, for CPU per GiB.
 */
async function iperfRounds(run: Run, name: string, once: () => Promise<IperfResult>): Promise<IperfResult> {
  const rounds: IperfResult[] = [];
  for (let index = 0; index < run.settings.iperfRounds; index += 1) rounds.push(await once());
  const rates = rounds.map((round) => round.bitsPerSecond).sort((a, b) => a - b);
  step(`${name}: iperf3 rounds in Gbit/s: ${rounds.map((round) => (round.bitsPerSecond / 1e9).toFixed(2)).join(", ")}`);
  return {
    bitsPerSecond: rates[Math.floor(rates.length / 2)],
    bytes: rounds.reduce((sum, round) => sum + round.bytes, 0),
    seconds: rounds.reduce((sum, round) => sum + round.seconds, 0),
  };
}

/** Runs iperf3 through a socat mutual-TLS tunnel pair between the pods. */
async function measureNativeTls(run: Run): Promise<IperfResult> {
  const { cluster, settings } = run;
  step(`native_tls: iperf3 through a socat tunnel pair, one stream for ${settings.iperfSeconds} s, ${settings.iperfRounds} times`);
  const certDir = path.join(cluster.workDir, "native-tls");
  makeCertificates(certDir);
  const tunnel = await startNativeTunnel(cluster.topology, CLIENT, SERVER, certDir);
  try {
    const result = await iperfRounds(run, "native_tls", () =>
      runIperfClient(cluster.topology, CLIENT, "127.0.0.1", NATIVE_CLIENT_PORT, settings.iperfSeconds),
    );
    step(`native_tls: TLS ciphers used: ${tunnelCiphers(tunnel).join(", ") || "none logged"}`);
    return result;
  } finally {
    await stopNativeTunnel(tunnel);
  }
}

/** Returns the PIDs of both agents, checked to be the agent processes themselves. */
function agentPids(cluster: Cluster): number[] {
  return [...cluster.agents.values()].map((agent) => {
    if (!agent.pid || !agent.running) throw new Error(`the agent of ${agent.options.node} is not running; log: ${agent.options.logFile}`);
    assertProcessRuns(agent.pid, AGENT_BIN);
    return agent.pid;
  });
}

/** Starts both agents, waits for enrollment, and checks that a client connection really goes through HBONE. */
async function startMesh(run: Run): Promise<number[]> {
  const { cluster } = run;
  step("mesh: starting the agents");
  const { profileDir } = run.settings;
  const start = (): Promise<void> => cluster.startAgents([CLIENT, SERVER]);
  await (profileDir ? withCpuProfiles(profileDir, start) : start());
  await run.tcp.latency(CLIENT, serverIp(run), ECHO_PORT, 1024, 1, 10);
  await cluster.waitForAudit("bench-n1", (record) => record.direction === "outbound" && record.transport === "hbone" && record.src?.workload === CLIENT);
  await cluster.waitForAudit("bench-n2", (record) => record.direction === "inbound" && record.transport === "hbone" && record.decision === "allow");
  return agentPids(cluster);
}

/** Runs iperf3 and returns its result with the agents' CPU seconds per GiB per hop during the run. */
async function withAgentCpu(pids: number[], iperf: () => Promise<IperfResult>): Promise<{ iperf: IperfResult; cpuPerGibPerHop: number }> {
  const before = pids.map(cpuSeconds);
  const result = await iperf();
  const used = pids.map((pid, index) => cpuSeconds(pid) - before[index]);
  const gib = result.bytes / GIB;
  step(`mesh: agent CPU seconds during iperf3: ${used.map((value) => value.toFixed(2)).join(" and ")} for ${gib.toFixed(2)} GiB`);
  return { iperf: result, cpuPerGibPerHop: used.reduce((sum, value) => sum + value, 0) / pids.length / gib };
}

/** Reads JSON lines from a child's stdout until one satisfies `predicate`; rejects on exit or after `timeoutMs`. */
function waitForJsonLine<T>(child: ChildProcess, predicate: (value: T) => boolean, timeoutMs: number, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const reader = readline.createInterface({ input: child.stdout! });
    const timer = setTimeout(() => finish(new Error(`${what} timed out after ${timeoutMs} ms`)), timeoutMs);
    const onExit = (code: number | null): void => finish(new Error(`${what} exited with code ${String(code)} before reporting`));
    const finish = (error: Error | undefined, value?: T): void => {
      clearTimeout(timer);
      child.off("exit", onExit);
      reader.close();
      if (error) reject(error);
      else resolve(value as T);
    };
    reader.on("line", (line) => {
      const value = JSON.parse(line) as T;
      if (predicate(value)) finish(undefined, value);
    });
    child.once("exit", onExit);
  });
}

/** Opens idle connections through the mesh and returns the agents' RSS growth per connection, in KiB. */
async function measureIdleConnections(run: Run, pids: number[]): Promise<number> {
  const { settings } = run;
  await sleep(settings.settleMs);
  const rssBeforeKib = pids.map(rssKib);
  step(`mesh: opening ${settings.idleCount} idle connections`);
  const client = run.tcp.spawnIdle(CLIENT, serverIp(run), ECHO_PORT, settings.idleCount);
  client.stderr?.resume();
  try {
    const opened = await waitForJsonLine<IdleOpened>(client, (value) => "opened" in value, 90_000, "the idle-connection client");
    if (opened.opened === 0) throw new Error(`no idle connection could be opened through the mesh (${opened.failed} failed)`);
    if (opened.failed > 0) step(`mesh: ${opened.failed} of ${settings.idleCount} idle connections failed to open`);
    await sleep(settings.settleMs);
    const rssAfterKib = pids.map(rssKib);
    const growthKib = rssAfterKib.reduce((sum, value, index) => sum + value - rssBeforeKib[index], 0);
    step(`mesh: agent RSS ${rssBeforeKib.join(" and ")} KiB before, ${rssAfterKib.join(" and ")} KiB with ${opened.opened} idle connections`);
    const closed = waitForJsonLine<{ closed: number }>(client, (value) => "closed" in value, 30_000, "closing the idle connections");
    client.stdin?.write("close\n");
    await closed;
    return growthKib / opened.opened;
  } finally {
    if (client.exitCode === null) client.kill("SIGKILL");
  }
}

/** Returns the agents' mean RSS in MiB once they have been idle for the settle time. */
async function measureSteadyRss(run: Run, pids: number[]): Promise<number> {
  await sleep(run.settings.settleMs);
  const rssKibs = pids.map(rssKib);
  step(`mesh: agent RSS at rest after the load: ${rssKibs.join(" and ")} KiB`);
  return rssKibs.reduce((sum, value) => sum + value, 0) / rssKibs.length / 1024;
}

function latencyFigures(name: string, summary: LatencySummary): { p50: number; p99: number } {
  step(`${name}: round trips in µs: ${JSON.stringify(summary)}`);
  return { p50: round(summary.p50, 1), p99: round(summary.p99, 1) };
}

async function runBenchmark(run: Run): Promise<BenchResults> {
  const direct = await measurePath(run, "direct");
  const nativeTls = await measureNativeTls(run);

  const pids = await startMesh(run);
  // Idle connections first: after the load tests the agents' heaps have free space that absorbs new
  // connections without any growth of RSS, which would hide their cost.
  const idleConnectionKib = await measureIdleConnections(run, pids);
  let cpuPerGibPerHop = Number.NaN;
  const mesh = await measurePath(
    run,
    "mesh",
    async (iperf) => {
      const measured = await withAgentCpu(pids, iperf);
      cpuPerGibPerHop = measured.cpuPerGibPerHop;
      return measured.iperf;
    },
    pids,
  );
  const agentRssMb = await measureSteadyRss(run, pids);

  return {
    time: new Date().toISOString(),
    machine: describeMachine(),
    throughput_gbps: {
      direct: round(direct.iperf.bitsPerSecond / 1e9, 3),
      mesh: round(mesh.iperf.bitsPerSecond / 1e9, 3),
      native_tls: round(nativeTls.bitsPerSecond / 1e9, 3),
    },
    cpu_s_per_gib_per_hop: round(cpuPerGibPerHop, 3),
    latency_us: {
      direct: latencyFigures("direct", direct.latency),
      mesh: latencyFigures("mesh", mesh.latency),
      ...(mesh.latencyAgentsUnpinned ? { mesh_agents_unpinned: latencyFigures("mesh, agents unpinned", mesh.latencyAgentsUnpinned) } : {}),
    },
    new_connections_per_s: { direct: round(direct.connectionsPerSecond, 0), mesh: round(mesh.connectionsPerSecond, 0) },
    idle_connection_kib: round(idleConnectionKib, 1),
    agent_rss_mb: round(agentRssMb, 1),
  };
}

/** Measures enrolment time and the original-destination lookup, each on capture of its own. */
async function measureCapture(settings: Settings): Promise<CaptureFigures> {
  const enrollment = await measureEnrollment(`${PREFIX}e`, settings.enrollPods, settings.enrollStarts, step);
  const enrollmentNftables = await measureEnrollment(`${PREFIX}f`, settings.enrollPods, settings.enrollStarts, step, "nftables");
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), `${PREFIX}-lookup-`));
  try {
    return { enrollment, enrollment_nftables: enrollmentNftables, original_destination_lookup: measureLookup(PREFIX, workDir, settings.lookupRounds, step) };
  } finally {
    fs.rmSync(workDir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const settings = { ...(process.argv.includes("--quick") ? QUICK : FULL) };
  if (process.argv.includes("--cpu-prof")) settings.profileDir = path.join(os.tmpdir(), `${PREFIX}-profiles`);
  // The authorization figures need no namespaces, so they come before the host check.
  const authz = process.argv.includes("--capture-only") || process.argv.includes("--identity-only") || process.argv.includes("--audit-only") || process.argv.includes("--kubernetes-only") || process.argv.includes("--diagnostics-only")
    ? undefined
    : await measureAuthz(process.argv.includes("--quick"), step);
  if (authz) process.stdout.write(formatAuthzTable(authz, describeMachine(), new Date().toISOString()) + "\n\n");
  if (process.argv.includes("--authz-only")) return;
  assertHostCapable();
  // The audit figures build a cluster of their own (prefix family aabaud) and remove it before the rest.
  const audit = process.argv.includes("--capture-only") || process.argv.includes("--identity-only") || process.argv.includes("--kubernetes-only") || process.argv.includes("--diagnostics-only")
    ? undefined
    : await measureAudit(process.argv.includes("--quick"), step);
  if (audit) process.stdout.write(formatAuditTable(audit, describeMachine(), new Date().toISOString()) + "\n\n");
  if (process.argv.includes("--audit-only")) return;
  // The Kubernetes figures build clusters of their own (prefix family aakbench) and remove them before the rest.
  const kubernetes = process.argv.includes("--capture-only") || process.argv.includes("--identity-only") || process.argv.includes("--diagnostics-only")
    ? undefined
    : await measureKubernetes({ ...(process.argv.includes("--quick") ? KUBERNETES_QUICK : KUBERNETES_FULL), heapSnapshot: process.argv.includes("--heap-snapshot") }, step);
  if (kubernetes) process.stdout.write(formatKubernetesTable(kubernetes, describeMachine(), new Date().toISOString()) + "\n\n");
  if (process.argv.includes("--kubernetes-only")) return;
  // The diagnostics figures build clusters of their own (prefix family aadbench) and remove them before the rest.
  const diagnostics = process.argv.includes("--capture-only") || process.argv.includes("--identity-only")
    ? undefined
    : await measureDiagnostics({ ...(process.argv.includes("--quick") ? DIAGNOSTICS_QUICK : DIAGNOSTICS_FULL), profileDir: settings.profileDir && path.join(settings.profileDir, "diagnostics") }, step);
  if (diagnostics) process.stdout.write(formatDiagnosticsTable(diagnostics, describeMachine(), new Date().toISOString()) + "\n\n");
  if (process.argv.includes("--diagnostics-only")) return;
  removeLeftovers(PREFIX_FAMILY);

  let cluster: Cluster | undefined;
  let succeeded = false;
  // A signal can arrive while a measurement is still failing on its own, so both paths await the
  // same clean-up and the process exits only after it finished.
  let cleanUpDone: Promise<void> | undefined;
  const cleanUp = (): Promise<void> =>
    (cleanUpDone ??= (async () => {
      await cluster?.destroy({ removeWorkDir: succeeded });
      if (cluster && !succeeded) step(`the run failed: agent logs and tool output are kept in ${cluster.workDir}`);
    })());
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    // Repeated signals wait for the same clean-up, which ends on its own: the agents get SIGKILL after a grace period.
    process.on(signal, () => void cleanUp().finally(() => process.exit(130)));
  }

  try {
    const identity = process.argv.includes("--capture-only") ? undefined : await measureIdentity(process.argv.includes("--quick"), step);
    if (identity && process.argv.includes("--identity-only")) {
      process.stdout.write(formatIdentityTable(identity, describeMachine(), new Date().toISOString()) + "\n");
      return;
    }
    const capture = await measureCapture(settings);
    if (process.argv.includes("--capture-only")) {
      process.stdout.write(formatCaptureTable(capture, describeMachine(), new Date().toISOString()) + "\n");
      return;
    }
    step("building the cluster");
    // Agents log at info, as in production: debug adds a line per connection.
    cluster = Cluster.create({
      prefix: PREFIX,
      nodes: NODES,
      namespaces: NAMESPACES,
      extraManifests: { "policies.yaml": ALLOW_CLIENT_POLICY },
      agentLogLevel: "info",
    });
    const results = { ...(await runBenchmark(await prepareRun(cluster, settings))), capture, identity, authz, audit, kubernetes, diagnostics };
    succeeded = true;
    writeResults(RESULTS_FILE, results);
    process.stdout.write(formatTable(results) + "\n");
    if (process.argv.includes("--markdown")) process.stdout.write("\n" + formatMarkdown(results) + "\n");
    process.stdout.write(`results written to ${RESULTS_FILE}\n`);
  } finally {
    await cleanUp();
  }

  // The agents write their profiles when they exit, so the profiles are complete only after the clean-up.
  if (settings.profileDir) process.stdout.write("\n" + summarizeProfiles(settings.profileDir) + "\n");
}

main().catch((error: Error) => {
  process.stderr.write(`bench failed: ${error.stack ?? error.message}\n`);
  process.exit(1);
});
