// End to end on the real kernel with the fake API server: the hand-over (--replace) as a rolling
// update runs it, where the old agent idles after the hand-over (--idle-after-handover). A
// replacement that cannot list yet must not freeze the running agent, because it requests the
// hand-over only when it can enrol at once. A running agent stopped (SIGTERM) before or during the
// hand-over leaves the node to the replacement, which then serves it. And a running agent that a stalled
// replacement left prepared resumes on its own after a deadline. Through all of it, plaintext
// never reaches the server pod, whose namespace requires mutual TLS. Last, the agents' DaemonSet
// (--daemonset) is deleted during a hand-over: the running agent ends the hand-over before it
// uninstalls, and the replacement stops without serving on the removed capture.
//
// The first node runs a client in the mesh and a pod outside it, and the second runs the server pods.

import test, { type ExecutionContext } from "ava";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { LOCK_DIRECTORY } from "../../agent/capture/pin-lock";
import { formatHandoverMessage, handoverSocketPath, LineSplitter, parseHandoverMessage, type HandoverMessage } from "../../agent/handover/protocol";
import { PREPARED_TIMEOUT_VARIABLE } from "../../agent/handover/server";
import { AgentProcess, NFTABLES_CAPTURE, testPrefixFamily, type AgentProcessOptions, type LogLine } from "../harness/agent-process";
import { curl, startHttpServer } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { podObject } from "../harness/kube-objects";
import type { NamespaceSpec } from "../harness/manifests";
import { nftCaptureTable } from "../harness/nft-state";
import { registerPid } from "../harness/pid-registry";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aahand");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aahand-n1";
const SERVER_NODE = "aahand-n2";
const MARKER = "handover-rollout-marker-3c9e";
/** curl's limit for a plaintext request that capture drops, in seconds. */
const REFUSED_TIMEOUT_S = 3;
/** The running agent's prepared deadline in the deadline test, in milliseconds. */
const PREPARED_TIMEOUT_MS = 3_000;
const PREPARED_LINE = "a replacement agent is starting its listeners next to this agent's";
const UNLABELLED = { "istio.io/dataplane-mode": null };
const DAEMONSET = { namespace: "ambient-agent", name: "ambient-agent" };
const LABELLED_OUT = { "istio.io/dataplane-mode": "none" };

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "client", namespace: "front", serviceAccount: "client" },
      { name: "legacy", namespace: "plain", serviceAccount: "default" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "server", namespace: "back", serviceAccount: "server" },
      { name: "leaver", namespace: "back", serviceAccount: "server" },
    ],
  },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "front", ambient: true },
  { name: "back", ambient: true },
  { name: "plain", ambient: false },
];
const STRICT_MTLS = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: back-strict, namespace: back}
spec:
  mtls: {mode: STRICT}
`;

let cluster: Cluster | undefined;
/** Agents that the cluster no longer lists: replaced ones, which idle until they are stopped. */
const detachedAgents: AgentProcess[] = [];

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created. Fix the first failure above and rerun.");
  return cluster;
}

/** Starts a replacement (--replace) of the server node's agent with `changes` to its options; the running agent stays the cluster's. */
function spawnReplacement(changes: Partial<AgentProcessOptions> = {}): AgentProcess {
  const running = theCluster().agent(SERVER_NODE);
  const extraArgs = running.options.extraArgs ?? [];
  const replacement = new AgentProcess({ ...running.options, extraArgs: extraArgs.includes("--replace") ? extraArgs : [...extraArgs, "--replace"], ...changes });
  registerPid(PREFIX, replacement.pid);
  return replacement;
}

/** Makes `replacement` the server node's agent once it is ready, and keeps the one it replaced for the clean-up. */
function adoptReplacement(replacement: AgentProcess): void {
  const c = theCluster();
  detachedAgents.push(c.agent(SERVER_NODE));
  c.agents.set(SERVER_NODE, replacement);
}

/** Returns the PID in the node's lock file, which the agent that serves the node holds. */
function nodeLockHolder(node: string): number | undefined {
  return Number(fs.readFileSync(path.join(LOCK_DIRECTORY, `node-${node}.pid`), "utf8").trim());
}

/** Returns the index of the first log line at `from` or later that satisfies `predicate`, -1 when none does. */
function lineIndex(agent: AgentProcess, predicate: (line: LogLine) => boolean, from = 0): number {
  const index = agent.lines.slice(from).findIndex(predicate);
  return index === -1 ? -1 : from + index;
}

function unenrolled(uid: string): (line: LogLine) => boolean {
  return (line) => line.msg === "workload unenrolled" && line.workload === uid;
}

/** Checks that the client reaches `pod` through the mesh, and that plaintext from the pod outside the mesh does not. */
async function assertServed(t: ExecutionContext, pod: string, context: string): Promise<void> {
  const c = theCluster();
  const url = `http://${c.topology.pod(pod).ip}:8080/marker.html`;
  const mesh = await curl(c.topology, "client", url);
  t.is(mesh.status, 200, `${context}: the mesh request to ${pod} failed: ${mesh.stderr}`);
  t.true(mesh.body.toString().includes(MARKER), `${context}: the mesh request to ${pod} returned another page`);
  const plaintext = await curl(c.topology, "legacy", url, REFUSED_TIMEOUT_S);
  t.not(plaintext.exitCode, 0, `${context}: plaintext reached ${pod}, whose namespace requires mutual TLS`);
  t.is(plaintext.status, 0, `${context}: plaintext to ${pod} got an HTTP response`);
}

/**
 * Puts a relay in front of the node's hand-over socket, for the next replacement. It passes every
 * message on, but holds back the replacement's handover request and calls `onHandover` instead,
 * so the running agent replies to it only if `onHandover` calls `forward`, which passes it on. The
 * relay stops listening then, before the replacement creates its own socket at the same path.
 * Returns a function that removes what is left.
 */
async function relayHoldingHandover(node: string, onHandover: (forward: () => void) => void): Promise<() => void> {
  const socketPath = handoverSocketPath(node);
  const agentSocket = `${socketPath}.agent`;
  fs.renameSync(socketPath, agentSocket);
  const connections: net.Socket[] = [];
  const relay = net.createServer((replacement) => {
    const agent = net.createConnection(agentSocket);
    connections.push(replacement, agent);
    const splitter = new LineSplitter();
    replacement.on("data", (chunk: Buffer) => {
      for (const line of splitter.push(chunk)) {
        if (parseHandoverMessage(line).type !== "handover") {
          agent.write(`${line}\n`);
          continue;
        }
        relay.close();
        onHandover(() => agent.write(`${line}\n`));
      }
    });
    agent.on("data", (chunk: Buffer) => replacement.write(chunk));
    // The running agent's end closes when it exits, and the replacement reads that end of file as it would without the relay.
    agent.on("close", () => replacement.destroy());
    replacement.on("close", () => agent.destroy());
    for (const socket of [replacement, agent]) socket.on("error", () => undefined);
  });
  await new Promise<void>((resolve) => relay.listen(socketPath, resolve));
  return () => {
    relay.close();
    for (const connection of connections) connection.destroy();
    fs.rmSync(agentSocket, { force: true });
  };
}

/** Sends `prepare` to the node's hand-over socket as a replacement would, and returns the connection and the messages it receives. */
async function prepareAsReplacement(node: string): Promise<{ connection: net.Socket; messages: HandoverMessage[]; closed: Promise<void> }> {
  const connection = net.createConnection(handoverSocketPath(node));
  const messages: HandoverMessage[] = [];
  const splitter = new LineSplitter();
  connection.on("data", (chunk: Buffer) => messages.push(...splitter.push(chunk).map(parseHandoverMessage)));
  connection.on("error", () => undefined);
  const closed = new Promise<void>((resolve) => connection.once("close", () => resolve()));
  await new Promise<void>((resolve, reject) => {
    connection.once("connect", resolve);
    connection.once("error", reject);
  });
  connection.write(formatHandoverMessage({ type: "prepare", pid: process.pid }));
  return { connection, messages, closed };
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = await Cluster.createWithApi({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: NAMESPACES,
    extraManifests: { "strict.yaml": STRICT_MTLS },
    agentArgs: ["--drain-timeout", "1", "--idle-after-handover", "--daemonset", `${DAEMONSET.namespace}/${DAEMONSET.name}`],
  });
  cluster.kube!.put({ apiVersion: "apps/v1", kind: "DaemonSet", metadata: { ...DAEMONSET }, spec: {} });
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "marker.html"), `${MARKER}\n`);
  await startHttpServer(cluster.topology, "server", site, 8080);
  await cluster.startAgents(["client", "server", "leaver"]);
});

test.after.always(async () => {
  try {
    await Promise.all(detachedAgents.map((agent) => agent.stop()));
  } finally {
    await cluster?.destroy({ removeWorkDir: true });
  }
});

test.serial("listing replacement freezes nothing", async (t) => {
  const c = theCluster();
  const running = c.agent(SERVER_NODE);
  // The API server rejects the replacement's token, so its first list waits.
  const kubeconfig = path.join(c.workDir, "kubeconfig-revoked");
  fs.writeFileSync(kubeconfig, fs.readFileSync(c.kubeconfig(SERVER_NODE), "utf8").replace(`token-${PREFIX}`, "token-revoked"), { mode: 0o600 });
  const replacement = spawnReplacement({ kubeconfig });
  try {
    await replacement.waitForLog((line) => String(line.msg).startsWith("an agent serves the node"), 20_000, "the probe of the running agent");
    await replacement.waitForLog((line) => line.status === 401, 20_000, "the rejected list");

    const mark = running.lines.length;
    c.kube!.patchLabels("pods", "back", "leaver", LABELLED_OUT);
    await running.waitForLog(unenrolled("back/leaver"), 10_000, "unenrollment of the pod labelled out", mark);
    const newcomer = c.topology.addPodTo(SERVER_NODE, { name: "newcomer", namespace: "back", serviceAccount: "server" });
    const site = path.join(c.workDir, "site");
    await startHttpServer(c.topology, "newcomer", site, 8080);
    c.kube!.put(podObject(newcomer));
    await running.waitEnrolled("back/newcomer", 10_000, mark);
    await assertServed(t, "newcomer", "while the replacement lists");

    t.is(lineIndex(running, (line) => line.msg === PREPARED_LINE), -1, "the replacement requested the hand-over before its first list");
    t.true(replacement.running, `the replacement exited:\n${replacement.tail()}`);
    t.is(nodeLockHolder(SERVER_NODE), running.pid, "the replacement took the node lock before the hand-over");
  } finally {
    await replacement.stop();
  }
  t.deepEqual(replacement.exit, { code: 0, signal: null }, `the replacement stopped during its start did not exit cleanly:\n${replacement.tail()}`);
  t.true(running.running, "the running agent stopped");
  await assertServed(t, "server", "after the replacement stopped");
});

test.serial("agent stopped before prepare leaves the node", async (t) => {
  const c = theCluster();
  const running = c.agent(SERVER_NODE);
  // Lists fail until the running agent has stopped. Its own watches are open already and pass.
  const unavailable = { code: 503, body: JSON.stringify({ kind: "Status", apiVersion: "v1", status: "Failure", reason: "ServiceUnavailable", code: 503 }) };
  c.kube!.respondFirst((request) => (request.method === "GET" && request.query.watch === undefined ? unavailable : undefined));
  let replacement: AgentProcess | undefined;
  try {
    replacement = spawnReplacement();
    await replacement.waitForLog((line) => String(line.msg).startsWith("an agent serves the node"), 20_000, "the probe of the running agent");
    await replacement.waitForLog((line) => line.status === 503, 20_000, "the failed list");
    await running.stop();
  } finally {
    c.kube!.respondFirst(undefined);
  }
  adoptReplacement(replacement);
  await replacement.waitReady(40_000);
  t.deepEqual(running.exit, { code: 0, signal: null }, `the stopped agent did not exit cleanly:\n${running.tail()}`);
  t.is(lineIndex(running, (line) => line.msg === PREPARED_LINE), -1, "the replacement requested the hand-over before its first list");
  t.true(
    replacement.lines.some((line) => line.msg === "the running agent stopped before the hand-over: starting normally once its locks are free"),
    `the replacement did not log how it took the node:\n${replacement.tail()}`,
  );
  t.is(nodeLockHolder(SERVER_NODE), replacement.pid, "the replacement does not hold the node lock");
  await assertServed(t, "server", "after the running agent stopped");
});

test.serial("running agent stopped mid-way leaves the node", async (t) => {
  const c = theCluster();
  const running = c.agent(SERVER_NODE);
  let handoverHeld = false;
  const removeRelay = await relayHoldingHandover(SERVER_NODE, () => {
    handoverHeld = true;
    running.signal("SIGTERM");
  });
  const replacement = spawnReplacement();
  try {
    await replacement.waitReady(40_000);
    adoptReplacement(replacement);
  } finally {
    removeRelay();
    if (c.agent(SERVER_NODE) !== replacement) await replacement.stop();
  }
  t.true(handoverHeld, "the replacement sent no handover request, so this test checked nothing");
  await running.waitExit(10_000);
  t.deepEqual(running.exit, { code: 0, signal: null }, `the stopped agent did not exit cleanly:\n${running.tail()}`);
  t.is(lineIndex(running, (line) => line.msg === "handing the node over: closing the listeners and draining"), -1, "the stopped agent received the handover request");
  t.true(
    replacement.lines.some((line) => String(line.msg).startsWith("the running agent closed the hand-over connection before it handed the node over")),
    `the replacement did not log how it took the node:\n${replacement.tail()}`,
  );
  t.is(nodeLockHolder(SERVER_NODE), replacement.pid, "the replacement does not hold the node lock");
  await assertServed(t, "server", "after the stopped agent left");
  await assertServed(t, "newcomer", "after the stopped agent left");
});

test.serial("prepared agent resumes after the deadline", async (t) => {
  const c = theCluster();
  const replacement = spawnReplacement({ env: { [PREPARED_TIMEOUT_VARIABLE]: String(PREPARED_TIMEOUT_MS) } });
  await replacement.waitReady(40_000);
  adoptReplacement(replacement);
  const running = replacement;

  // This test is a replacement that sends prepare and then nothing.
  const mark = running.lines.length;
  const stalled = await prepareAsReplacement(SERVER_NODE);
  try {
    await running.waitForLog((line) => line.msg === PREPARED_LINE, 10_000, "the prepare", mark);
    // A change while prepared waits: the running agent enrols and unenrols nothing then.
    c.kube!.patchLabels("pods", "back", "server", LABELLED_OUT);
    const expired = await running.waitForLog((line) => String(line.msg).startsWith("the replacement agent sent neither handover nor abort"), 20_000, "the deadline", mark);
    await running.waitForLog(unenrolled("back/server"), 10_000, "unenrollment of the pod labelled out", mark);
    await stalled.closed;

    const prepared = lineIndex(running, (line) => line.msg === PREPARED_LINE, mark);
    const configured = lineIndex(running, (line) => line.msg === "configuration updated", prepared);
    t.true(configured !== -1 && configured < running.lines.indexOf(expired), `the label change did not arrive while the agent was prepared, so this test checked nothing:\n${running.tail(40)}`);
    t.true(lineIndex(running, unenrolled("back/server"), mark) > running.lines.indexOf(expired), "the running agent unenrolled the pod while it was prepared");
    t.deepEqual(
      stalled.messages.map((message) => message.type),
      ["prepared", "error"],
      `the stalled replacement received ${JSON.stringify(stalled.messages)}`,
    );
    const error = stalled.messages[1];
    t.regex(error?.type === "error" ? error.message : "", new RegExp(`^the hand-over timed out: no handover or abort request within ${PREPARED_TIMEOUT_MS / 1000} s of prepare`));
  } finally {
    stalled.connection.destroy();
    c.kube!.patchLabels("pods", "back", "server", UNLABELLED);
  }
  await running.waitEnrolled("back/server", 10_000, mark);
  t.true(running.running);
  t.is(nodeLockHolder(SERVER_NODE), running.pid);
  await assertServed(t, "server", "after the deadline");
});

/** Tells whether the server pod is captured: its agent's pins (eBPF) or its table (nftables). */
function serverCaptureInPlace(): boolean {
  const c = theCluster();
  if (NFTABLES_CAPTURE) return nftCaptureTable(`/var/run/netns/${c.topology.pod("server").netns}`) !== undefined;
  return fs.existsSync(path.join(c.pinRoot(SERVER_NODE), "links"));
}

/**
 * Deletes the DaemonSet while the replacement `spawnReplacement` starts is prepared, and sends the
 * running agent SIGTERM, as `helm uninstall` during a rollout does. Once the running agent decided
 * to uninstall, the replacement's handover request reaches it. `alsoStop` sends the replacement
 * SIGTERM too, as the kubelet does to every pod of the deleted DaemonSet. Returns both agents once
 * they exited.
 */
async function uninstallDuringHandover(t: ExecutionContext, alsoStop: boolean): Promise<{ running: AgentProcess; replacement: AgentProcess }> {
  const c = theCluster();
  const running = c.agent(SERVER_NODE);
  let handoverHeld = false;
  let replacement: AgentProcess | undefined;
  const removeRelay = await relayHoldingHandover(SERVER_NODE, (forward) => {
    handoverHeld = true;
    const mark = running.lines.length;
    c.kube!.remove("daemonsets", DAEMONSET.namespace, DAEMONSET.name);
    running.signal("SIGTERM");
    if (alsoStop) replacement?.signal("SIGTERM");
    const decided = (line: LogLine): boolean => String(line.msg).startsWith(`uninstall: DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name}`);
    void running.waitForLog(decided, 20_000, "the uninstall decision", mark).then(forward, () => undefined);
  });
  try {
    replacement = spawnReplacement();
    detachedAgents.push(replacement);
    await running.waitExit(30_000);
    await replacement.waitExit(30_000);
  } finally {
    removeRelay();
  }
  t.true(handoverHeld, "the replacement sent no handover request, so this test checked nothing");
  t.deepEqual(running.exit, { code: 0, signal: null }, `the running agent did not exit cleanly:\n${running.tail()}`);
  t.not(lineIndex(running, (line) => String(line.msg).startsWith(`uninstall: DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name}`)), -1, running.tail());
  t.is(lineIndex(running, (line) => line.msg === "handing the node over: closing the listeners and draining"), -1, "the uninstalling agent handed the node over");
  t.not(
    lineIndex(replacement, (line) => String(line.msg).startsWith("the running agent closed the hand-over connection before it handed the node over")),
    -1,
    `the replacement was not told that the running agent stopped:\n${replacement.tail()}`,
  );
  t.is(lineIndex(replacement, (line) => line.msg === "agent ready"), -1, "the replacement served the node after the uninstall");
  return { running, replacement };
}

/** Checks that the node's whole capture is gone, and that plaintext reaches the server pod again. */
async function assertUninstalled(t: ExecutionContext): Promise<void> {
  const c = theCluster();
  t.false(serverCaptureInPlace(), "capture is still in place");
  if (!NFTABLES_CAPTURE) t.false(fs.existsSync(c.pinRoot(SERVER_NODE)), "a part of the pin root is still there");
  const direct = await curl(c.topology, "legacy", `http://${c.topology.pod("server").ip}:8080/marker.html`, REFUSED_TIMEOUT_S);
  t.is(direct.status, 200, `plaintext did not reach the server after the uninstall: ${direct.stderr}`);
  t.true(direct.body.toString().includes(MARKER));
}

test.serial("uninstall during a hand-over ends it first", async (t) => {
  // A running agent with the default prepared deadline, which the relay must not reach.
  const fresh = spawnReplacement({ env: {} });
  await fresh.waitReady(40_000);
  adoptReplacement(fresh);
  t.true(serverCaptureInPlace());

  const { replacement } = await uninstallDuringHandover(t, true);
  t.deepEqual(replacement.exit, { code: 0, signal: null }, `the replacement did not exit cleanly:\n${replacement.tail()}`);
  // The replacement decides on an uninstall too. It leaves the removal to the agent that holds the
  // node, or, when that agent has finished and released the locks, takes them and finds little left.
  const refused = lineIndex(replacement, (line) => String(line.msg).startsWith("uninstall skipped: another agent has this node's locks"));
  const tookOver = lineIndex(replacement, (line) => String(line.msg).startsWith("removed the pinned capture") || String(line.msg).startsWith("nothing was pinned"));
  t.true(refused !== -1 || tookOver !== -1, replacement.tail());
  await assertUninstalled(t);
});

test.serial("replacement stops on capture removed under it", async (t) => {
  const c = theCluster();
  // As `helm install` after the uninstall above.
  c.kube!.put({ apiVersion: "apps/v1", kind: "DaemonSet", metadata: { ...DAEMONSET }, spec: {} });
  await c.restartAgent(SERVER_NODE, ["server", "newcomer"]);
  t.true(serverCaptureInPlace());

  // Only the running agent is stopped, so the replacement takes its locks once it exited.
  const { replacement } = await uninstallDuringHandover(t, false);
  t.deepEqual(replacement.exit, { code: 1, signal: null }, `the replacement did not fail its start:\n${replacement.tail()}`);
  t.not(lineIndex(replacement, (line) => /removed this node's capture as it stopped, as an uninstall does/.test(String(line.msg))), -1, replacement.tail());
  await assertUninstalled(t);
});
