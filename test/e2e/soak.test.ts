// End to end on the real kernel: a bounded soak of two agents for AA_SOAK_SECONDS (45 by default,
// at most 600). All at once they carry allowed transfers checked byte for byte by SHA-256, and
// connections that an AuthorizationPolicy DENY refuses. Meanwhile hostile pods send random bytes to
// 15008, trickle bytes through 15001, open more connections than the per-pod limit takes, and send
// HTTP/2 rapid reset (HEADERS then RST_STREAM, repeated) over mTLS. Every loop is bounded in
// iterations and by the deadline.
//
// Before the run, after a warm-up that takes every path once, each agent's open file descriptors
// (/proc/PID/fd), VmRSS (/proc/PID/status) and V8 heap (nodejs_heap_size_used_bytes from its
// metrics server) are the baseline. After the run the agents must return, within 60 s, to at most
// fdSlack() descriptors above the baseline, and stay within RSS_TOLERANCE and HEAP_TOLERANCE of it.
// Both agents must still run and be ready, every allowed transfer must have arrived byte-exact and
// every denied one must have been refused.

// The pod network of this file. The topology reads it when the harness loads, so it is set before the imports.
process.env.AA_TEST_POD_NET ??= "10.235";

import test, { type ExecutionContext } from "ava";
import fs from "node:fs";
import { loadNative } from "../../agent/capture/native";
import { SPARE_SOCKET_BATCH } from "../../agent/capture/spare-sockets";
import { EmbeddedCa } from "../../agent/identity/ca";
import { AbuseCluster, sleep, type ServedBlob } from "../harness/abuse";
import { testPrefixFamily } from "../harness/agent-process";
import { sha256 } from "../harness/clients";
import { connectHeaderBlock, H2Error, headersFrame, RawH2Connection, rstStreamFrame, type RawH2Target } from "../harness/h2-raw";
import { sumOf } from "../harness/prometheus-text";
import { startSlowClient } from "../harness/slow-client";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aasoak");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aasoak-n1";
const SERVER_NODE = "aasoak-n2";
const AGENT_NODES = [CLIENT_NODE, SERVER_NODE];
const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "web", namespace: "soak", serviceAccount: "web" },
      { name: "scraper", namespace: "soak", serviceAccount: "scraper" },
      { name: "slow", namespace: "soak", serviceAccount: "slow" },
      { name: "greedy", namespace: "soak", serviceAccount: "greedy" },
      { name: "intruder", namespace: "plain", serviceAccount: "default" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "api", namespace: "soak", serviceAccount: "api" },
      { name: "db", namespace: "soak", serviceAccount: "db" },
    ],
  },
];
const ENROLLED = ["web", "scraper", "slow", "greedy", "api", "db"];
const DENY_SCRAPER = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-scraper
  namespace: soak
spec:
  selector:
    matchLabels:
      app: api
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/soak/sa/scraper"]
`;

/** The run time in seconds, from AA_SOAK_SECONDS. */
const SOAK_SECONDS = soakSecondsFromEnv(process.env.AA_SOAK_SECONDS);
const MAX_SOAK_SECONDS = 600;
const IDLE_TIMEOUT_S = 3;
const HANDSHAKE_TIMEOUT_S = 2;
const PER_POD_LIMIT = 16;
const APP_PORT = 8080;
const DRAIN_PORT = 9001;
const NEVER_READ_PORT = 9002;
const BLOB_SIZE = 1024 * 1024;
/** Descriptors an agent may hold above its baseline for pooled HBONE connections and sockets in the middle of their close. */
const FD_SLACK_BASE = 8;
/** Growth of VmRSS and of the V8 heap in use that the agents may keep after the run: garbage not yet collected, not a leak. */
const RSS_TOLERANCE = 96 * 1024 * 1024;
const HEAP_TOLERANCE = 48 * 1024 * 1024;
/** How long the agents get to settle after the run, in ms. */
const SETTLE_MS = 60_000;
const RAPID_RESET_STREAMS = 600;
const ATTACKER_IDENTITY = { trustDomain: "cluster.local", namespace: "plain", serviceAccount: "mallory" };

function soakSecondsFromEnv(value: string | undefined): number {
  if (value === undefined || value === "") return 45;
  const seconds = Number(value);
  if (!Number.isInteger(seconds) || seconds < 1 || seconds > 600) {
    throw new Error(`AA_SOAK_SECONDS=${value} is not a whole number of seconds from 1 to 600; unset it for 45 s or use, for example, 600`);
  }
  return seconds;
}

/** One agent's resources at a point in time. */
interface AgentUsage {
  fds: number;
  rss: number;
  heapUsed: number;
}

/** What the traffic loops saw. */
interface SoakTally {
  allowed: number;
  /** Allowed transfers that failed or arrived altered, described. */
  allowedFailures: string[];
  denied: number;
  /** Denied requests that got a response. */
  deniedLeaks: string[];
  garbageConnections: number;
  slowConnections: number;
  greedyConnections: number;
  rapidResetConnections: number;
}

const abuse = new AbuseCluster();
let blob: ServedBlob;
let attackerTls: RawH2Target["tls"];

async function usageOf(node: string): Promise<AgentUsage> {
  const fds = fs.readdirSync(`/proc/${abuse.cluster.agent(node).pid}/fd`).length;
  const heapUsed = sumOf(await abuse.metricsOf(node), "nodejs_heap_size_used_bytes");
  return { fds, rss: abuse.agentRss(node), heapUsed };
}

/** Samples the agents' descriptors every second until three samples in a row agree, for at most 15 s; returns the last usage. */
async function settledUsage(): Promise<Record<string, AgentUsage>> {
  const samples = [await Promise.all(AGENT_NODES.map(usageOf))];
  const deadline = Date.now() + 15_000;
  for (;;) {
    await sleep(1_000);
    const current = await Promise.all(AGENT_NODES.map(usageOf));
    samples.push(current);
    const lastThree = samples.slice(-3);
    const stable = lastThree.length === 3 && lastThree.every((sample) => sample.every((usage, index) => usage.fds === current[index].fds));
    if (stable || Date.now() > deadline) return Object.fromEntries(AGENT_NODES.map((node, index) => [node, current[index]]));
  }
}

test.before(async () => {
  loadNative();
  const options = {
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "soak", ambient: true },
      { name: "plain", ambient: false },
    ],
    extraManifests: { "policies.yaml": DENY_SCRAPER },
    agentArgs: [
      "--idle-timeout", String(IDLE_TIMEOUT_S),
      "--handshake-timeout", String(HANDSHAKE_TIMEOUT_S),
      "--max-connections-per-pod", String(PER_POD_LIMIT),
    ],
    agentLogLevel: "info",
  };
  await abuse.start(PREFIX_FAMILY, options, async (cluster) => {
    blob = await abuse.serveBlob(["api"], APP_PORT, BLOB_SIZE);
    // The never-read sink closes its connections after 1 s.
    for (const pod of ["api", "db"]) abuse.startSinkServer(pod, { drainPort: DRAIN_PORT, neverReadPort: NEVER_READ_PORT, holdSeconds: 1 });
    await cluster.startAgents(ENROLLED);
    const issued = await (await EmbeddedCa.load(cluster.caDir)).issue(ATTACKER_IDENTITY);
    attackerTls = { certPem: issued.chainPem, keyPem: issued.keyPem, caPem: issued.caRootsPem };
  });
});

test.after.always(async () => {
  await abuse.destroy();
});

/** Fetches the blob from api as web and adds the outcome to the tally. */
async function allowedTransfer(tally: SoakTally): Promise<void> {
  const result = await abuse.fetchBlob("web", "api", blob);
  tally.allowed += 1;
  if (result.exitCode !== 0) tally.allowedFailures.push(`curl exit ${result.exitCode}: ${result.stderr}`);
  else if (result.body.length !== blob.size || sha256(result.body) !== blob.sha256) tally.allowedFailures.push(`altered: ${result.body.length} bytes, sha256 ${sha256(result.body)}`);
}

/** Requests the blob as scraper, whom the DENY policy refuses, and adds the outcome to the tally. */
async function deniedRequest(tally: SoakTally): Promise<void> {
  const result = await abuse.fetchBlob("scraper", "api", blob, 5);
  tally.denied += 1;
  if (result.exitCode === 0 || result.status !== 0) tally.deniedLeaks.push(`curl exit ${result.exitCode}, status ${result.status}, ${result.body.length} bytes`);
}

/** Sends random bytes to api's 15008 from a pod outside the mesh. */
async function garbageBurst(tally: SoakTally): Promise<void> {
  const summary = await startSlowClient(abuse.cluster.topology, abuse.netnsOf("intruder"), ["garbage", abuse.ipOf("api"), "15008", "10", "2048"]).done;
  tally.garbageConnections += summary.connections.length;
}

/** Trickles a few bytes through slow's 15001 to api, then lets the idle timeout close the connections. */
async function slowWriters(tally: SoakTally, deadline: number): Promise<void> {
  const durationMs = Math.max(1, Math.min(10_000, deadline - Date.now()));
  const summary = await startSlowClient(abuse.cluster.topology, abuse.netnsOf("slow"), ["hold", abuse.ipOf("api"), String(DRAIN_PORT), "2", "500", String(durationMs), "abcdef"]).done;
  tally.slowConnections += summary.connections.length;
}

/** Opens more connections from greedy than the per-pod limit takes, and keeps them open for 2 s. */
async function greedyBurst(tally: SoakTally): Promise<void> {
  const summary = await startSlowClient(abuse.cluster.topology, abuse.netnsOf("greedy"), ["hold", abuse.ipOf("db"), String(NEVER_READ_PORT), String(PER_POD_LIMIT + 4), "100", "2000"]).done;
  tally.greedyConnections += summary.connections.length;
}

/** Opens CONNECT streams and resets each at once, over mTLS with a mesh certificate, until the agent closes the connection or 5 s pass. */
async function rapidReset(tally: SoakTally): Promise<void> {
  const connection = await RawH2Connection.open({ host: abuse.ipOf("api"), port: 15008, netnsPath: `/var/run/netns/${abuse.netnsOf("intruder")}`, tls: attackerTls });
  try {
    connection.start();
    const block = connectHeaderBlock(`${abuse.ipOf("api")}:${APP_PORT}`);
    for (let index = 0; index < RAPID_RESET_STREAMS && !connection.isClosed; index += 1) {
      const stream = 1 + 2 * index;
      connection.write(headersFrame(stream, block), rstStreamFrame(stream, H2Error.CANCEL));
    }
    await Promise.race([connection.closed, sleep(5_000)]);
  } finally {
    connection.destroy();
    tally.rapidResetConnections += 1;
  }
}

/**
 * Runs `step` again and again until `deadline`, at most `maxRuns` times, waiting `pauseMs` between
 * runs. A step that throws ends the loop and fails the soak with its error.
 */
async function repeat(deadline: number, maxRuns: number, pauseMs: number, step: () => Promise<void>): Promise<void> {
  for (let run = 0; run < maxRuns && Date.now() < deadline; run += 1) {
    await step();
    await sleep(pauseMs);
  }
}

/** Takes every path of the soak once, so that what the agents load or allocate on first use is in the baseline. */
async function warmUp(tally: SoakTally): Promise<void> {
  await allowedTransfer(tally);
  await deniedRequest(tally);
  await garbageBurst(tally);
  await greedyBurst(tally);
  await rapidReset(tally);
  await slowWriters(tally, Date.now() + 2_000);
  // The slow writers' connections close IDLE_TIMEOUT_S after their last byte.
  await sleep(IDLE_TIMEOUT_S * 1000 + 1_000);
}

/**
 * Returns the descriptors an agent may hold above its baseline after the run. Besides
 * FD_SLACK_BASE, each enrolled pod keeps a reserve of unconnected sockets that it refills
 * SPARE_SOCKET_BATCH at a time when empty, so the count moves by up to a batch per pod.
 */
function fdSlack(node: string): number {
  const pods = ENROLLED.filter((pod) => abuse.cluster.topology.pod(pod).node === node).length;
  return FD_SLACK_BASE + SPARE_SOCKET_BATCH * pods;
}

function describe(usage: Record<string, AgentUsage>): string {
  return AGENT_NODES.map((node) => `${node}: ${usage[node].fds} fds, VmRSS ${(usage[node].rss / 2 ** 20).toFixed(1)} MiB, heap ${(usage[node].heapUsed / 2 ** 20).toFixed(1)} MiB`).join("; ");
}

/** Waits up to SETTLE_MS until every agent is back within the slack of its baseline; returns the last usage. */
async function waitSettled(baseline: Record<string, AgentUsage>): Promise<Record<string, AgentUsage>> {
  const deadline = Date.now() + SETTLE_MS;
  for (;;) {
    const usage = Object.fromEntries(await Promise.all(AGENT_NODES.map(async (node) => [node, await usageOf(node)] as const)));
    const settled = AGENT_NODES.every((node) => usage[node].fds <= baseline[node].fds + fdSlack(node) && usage[node].heapUsed <= baseline[node].heapUsed + HEAP_TOLERANCE);
    if (settled || Date.now() > deadline) return usage;
    await sleep(1_000);
  }
}

test.serial("mixed traffic leaves agents unchanged", async (t) => {
  t.timeout((SOAK_SECONDS + 180) * 1000);
  const c = abuse.cluster;
  const tally: SoakTally = { allowed: 0, allowedFailures: [], denied: 0, deniedLeaks: [], garbageConnections: 0, slowConnections: 0, greedyConnections: 0, rapidResetConnections: 0 };
  await warmUp(tally);
  const baseline = await settledUsage();
  t.log(`baseline after warm-up: ${describe(baseline)}`);
  const refusedBefore = await refusedCounts();

  const deadline = Date.now() + SOAK_SECONDS * 1000;
  // Each loop's bound on runs is above what its pause allows in the longest soak.
  const maxRuns = MAX_SOAK_SECONDS * 20;
  await Promise.all([
    repeat(deadline, maxRuns, 50, () => allowedTransfer(tally)),
    repeat(deadline, maxRuns, 200, () => deniedRequest(tally)),
    repeat(deadline, maxRuns, 300, () => garbageBurst(tally)),
    repeat(deadline, maxRuns, 0, () => slowWriters(tally, deadline)),
    repeat(deadline, maxRuns, 500, () => greedyBurst(tally)),
    repeat(deadline, maxRuns, 1_000, () => rapidReset(tally)),
  ]);
  t.log(`traffic in ${SOAK_SECONDS} s: ${JSON.stringify({ ...tally, allowedFailures: tally.allowedFailures.length, deniedLeaks: tally.deniedLeaks.length })}`);

  t.true(tally.allowed > 1, "no allowed transfer ran");
  t.deepEqual(tally.allowedFailures, [], "allowed transfers failed or arrived altered");
  t.true(tally.denied > 1, "no denied request ran");
  t.deepEqual(tally.deniedLeaks, [], "denied requests got a response");
  await abuse.assertAgentsServe(t, AGENT_NODES);
  const denials = c.auditRecords(SERVER_NODE).filter((record) => record.decision === "deny" && record.policy === "soak/deny-scraper");
  t.true(denials.length > 0, "the server node recorded no denial of scraper");
  assertRefusalsCounted(t, refusedBefore, await refusedCounts());

  const after = await waitSettled(baseline);
  t.log(`after the run: ${describe(after)}`);
  for (const node of AGENT_NODES) {
    t.true(after[node].fds <= baseline[node].fds + fdSlack(node), `${node}: ${after[node].fds} open descriptors after the run, ${baseline[node].fds} before, ${fdSlack(node)} allowed above`);
    t.true(after[node].rss <= baseline[node].rss + RSS_TOLERANCE, `${node}: VmRSS ${after[node].rss} after the run, ${baseline[node].rss} before`);
    t.true(after[node].heapUsed <= baseline[node].heapUsed + HEAP_TOLERANCE, `${node}: heap ${after[node].heapUsed} after the run, ${baseline[node].heapUsed} before`);
  }
});

/** The refusal counters each kind of abuse must raise: node, listener and reason. */
const EXPECTED_REFUSALS: ReadonlyArray<readonly [string, string, string]> = [
  [SERVER_NODE, "inbound", "tls_handshake"],
  [CLIENT_NODE, "outbound", "connections_per_pod"],
  [CLIENT_NODE, "outbound", "idle_timeout"],
  [SERVER_NODE, "inbound", "http2_flood"],
];

async function refusedCounts(): Promise<number[]> {
  return Promise.all(EXPECTED_REFUSALS.map(([node, listener, reason]) => abuse.refusedTotal(node, listener, reason)));
}

function assertRefusalsCounted(t: ExecutionContext, before: number[], after: number[]): void {
  EXPECTED_REFUSALS.forEach(([node, listener, reason], index) => {
    t.true(after[index] > before[index], `${node} counted no ${listener}/${reason} refusal during the run (${before[index]} before, ${after[index]} after)`);
  });
}
