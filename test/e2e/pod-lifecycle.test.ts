// The agent's life in a Kubernetes pod, end to end on the real kernel with the fake API server.
// The agents read their options from a --config file and see the host's processes through a
// procfs mounted elsewhere (--host-proc). They stay idle after a hand-over (--idle-after-handover)
// and watch their DaemonSet (--daemonset). A stop with the DaemonSet present or the API server
// unreachable keeps capture pinned, so the enrolled pod stays closed. A stop after the DaemonSet
// was deleted is an uninstall, after which plaintext reaches the pod again, also when the API
// server refuses the agent by then, as after `helm uninstall` deleted its RBAC objects. The same
// holds when the stop signal comes while the agent still waits for its first list. SIGHUP during
// an agent's start, or while it idles after a hand-over, is ignored.
//
// The first node runs a client in the mesh and a pod outside it, and the second runs the server and
// the CNI plugin.

import test, { type ExecutionContext } from "ava";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { netnsTransparentRouting, setProcRoot } from "../../agent/capture/native";
import { lockFileOf, LOCK_DIRECTORY } from "../../agent/capture/pin-lock";
import { PLUGIN_TYPE } from "../../agent/cni/chain";
import { AgentProcess, NFTABLES_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { curl, startHttpServer } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { annotationOf, waitForObject } from "../harness/kube-objects";
import type { NamespaceSpec } from "../harness/manifests";
import { nftCaptureTable } from "../harness/nft-state";
import { ownedByLiveRun, registerPid } from "../harness/pid-registry";
import { run, type NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aapod");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aapod-n1";
const SERVER_NODE = "aapod-n2";
const DAEMONSET = { namespace: "ambient-agent", name: "ambient-agent" };
const REDIRECTION = "ambient.istio.io/redirection";
const MARKER = "pod-lifecycle-marker-7f3a";
/** curl's limit for a plaintext request that capture may drop, in seconds. */
const DROPPED_TIMEOUT_S = 3;

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "client", namespace: "front", serviceAccount: "client" },
      { name: "legacy", namespace: "plain", serviceAccount: "default" },
    ],
  },
  { name: SERVER_NODE, pods: [{ name: "server", namespace: "back", serviceAccount: "server" }] },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "front", ambient: true },
  { name: "back", ambient: true },
  { name: "plain", ambient: false },
];

/** The network plugin's own configuration, into which the server node's agent chains its entry. */
const PRIMARY_CONFLIST = {
  cniVersion: "1.0.0",
  name: "aapod-pods",
  plugins: [{ type: "bridge", bridge: "cni0", ipam: { type: "host-local", ranges: [[{ subnet: "10.85.0.0/16" }]] } }],
};

let cluster: Cluster | undefined;
/** Agents that the cluster no longer lists, such as one replaced by --replace, which idles until it is stopped. */
const detachedAgents: AgentProcess[] = [];
/** A procfs mounted for this run, which the agents get as --host-proc, and a read-only one. */
const procDir = path.join(os.tmpdir(), `${PREFIX}-proc`);
const readOnlyProcDir = path.join(os.tmpdir(), `${PREFIX}-proc-ro`);

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created. Fix the first failure above and rerun.");
  return cluster;
}

function cniPaths(): { confDir: string; binDir: string; socketPath: string } {
  const base = path.join(theCluster().workDir, "cni");
  return { confDir: path.join(base, "net.d"), binDir: path.join(base, "bin"), socketPath: path.join(base, "run", "cni.sock") };
}

function conflistFile(): string {
  return path.join(cniPaths().confDir, "10-bridge.conflist");
}

/** Tells whether the server node's CNI configuration has the agent's plugin entry. */
function cniEntryPresent(): boolean {
  const conflist = JSON.parse(fs.readFileSync(conflistFile(), "utf8")) as { plugins: Array<{ type?: string }> };
  return conflist.plugins.some((plugin) => plugin.type === PLUGIN_TYPE);
}

/** Returns the options of the server node's agent beyond the --config file, which add its CNI plugin. */
function serverNodeArgs(): string[] {
  const paths = cniPaths();
  return [...theCluster().options.agentArgs!, "--cni-conf-dir", paths.confDir, "--cni-bin-dir", paths.binDir, "--cni-socket", paths.socketPath, "--cni-timeout", "3"];
}

/** Tells whether the server pod's capture is in place: its pins (eBPF) or its table (nftables). */
function serverCaptureInPlace(): boolean {
  if (NFTABLES_CAPTURE) return nftCaptureTable(`/var/run/netns/${theCluster().topology.pod("server").netns}`) !== undefined;
  return fs.existsSync(path.join(theCluster().pinRoot(SERVER_NODE), "links"));
}

/** Requests the marker page from the server pod in plaintext, from the pod outside the mesh. */
function plaintextToServer(): ReturnType<typeof curl> {
  const c = theCluster();
  return curl(c.topology, "legacy", `http://${c.topology.pod("server").ip}:8080/marker.html`, DROPPED_TIMEOUT_S);
}

/** Mounts a new procfs instance at `directory`. */
function mountProc(directory: string, readOnly: boolean): void {
  fs.mkdirSync(directory, { recursive: true });
  run("mount", ["-t", "proc", ...(readOnly ? ["-o", "ro"] : []), "proc", directory]);
}

/** Unmounts and removes the procfs folders of this run, or of crashed runs of this file. */
function removeProcMounts(owned: (name: string) => boolean): void {
  const tmp = os.tmpdir();
  const mounts = fs.readFileSync("/proc/mounts", "utf8").split("\n").map((line) => line.split(" ")[1] ?? "");
  for (const mountPoint of mounts) {
    const name = path.basename(mountPoint);
    if (path.dirname(mountPoint) !== tmp || !name.startsWith(PREFIX_FAMILY) || !/-proc(-ro)?$/.test(name) || !owned(name)) continue;
    run("umount", [mountPoint], { allowFail: true });
    if (fs.readFileSync("/proc/mounts", "utf8").includes(` ${mountPoint} `)) run("umount", ["-l", mountPoint], { allowFail: true });
  }
  for (const name of fs.readdirSync(tmp)) {
    if (name.startsWith(PREFIX_FAMILY) && /-proc(-ro)?$/.test(name) && owned(name)) fs.rmSync(path.join(tmp, name), { recursive: true, force: true });
  }
}

/** Returns the listening TCP and unix sockets of `pid` in a namespace, as `ss` lists them. */
function listenersOf(netns: string, pid: number): string[] {
  const output = execFileSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", "ss", "-Hlpn", "-A", "tcp,unix"], { encoding: "utf8" });
  return output.split("\n").filter((line) => line.includes(`pid=${pid},`));
}

/**
 * Lists the sockets among the open file descriptors of `pid` above 2, as "fd -> socket:[inode]".
 * Standard input, output and error are left out: the harness connects them through socket pairs.
 */
function socketsOf(pid: number): string[] {
  const directory = `/proc/${pid}/fd`;
  return fs.readdirSync(directory).filter((fd) => Number(fd) > 2).flatMap((fd) => {
    try {
      const target = fs.readlinkSync(path.join(directory, fd));
      return target.startsWith("socket:") ? [`${fd} -> ${target}`] : [];
    } catch {
      return [];
    }
  });
}

/** Stores the agent's DaemonSet in the fake API server, as `helm install` creates it. */
function putDaemonSet(): void {
  theCluster().kube!.put({ apiVersion: "apps/v1", kind: "DaemonSet", metadata: { ...DAEMONSET }, spec: {} });
}

/** Deletes the agent's DaemonSet and waits until the agent's watch has reported the deletion. */
async function deleteDaemonSet(agent: AgentProcess): Promise<void> {
  const from = agent.lines.length;
  theCluster().kube!.remove("daemonsets", DAEMONSET.namespace, DAEMONSET.name);
  const deleted = `DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name} was deleted (watch event at `;
  await agent.waitForLog((line) => String(line.msg).startsWith(deleted), 10_000, "the watch to report the DaemonSet's deletion", from);
}

/** Counts the server pod's workload.unenrolled records with the uninstall's reason. */
function uninstallRecordsOfServer(): number {
  const unenrolled = theCluster().auditRecords(SERVER_NODE, "workload.unenrolled");
  return unenrolled.filter((record) => record.namespace === "back" && record.workload === "server" && record.reason === "agent uninstalled").length;
}

/**
 * Checks what an uninstall leaves on the server node: no CNI entry, no capture, no enrolled pod in
 * the enrolled-pods file, plaintext reaching the pod. `signal` starts the agent.stopped record's reason.
 */
async function assertUninstalled(t: ExecutionContext, signal = "signal SIGTERM"): Promise<void> {
  const c = theCluster();
  t.false(cniEntryPresent(), "the CNI plugin entry is still there");
  t.is(JSON.parse(fs.readFileSync(conflistFile(), "utf8")).plugins.length, PRIMARY_CONFLIST.plugins.length, "the network plugin's own entries changed");
  t.false(serverCaptureInPlace(), "capture is still in place");
  if (!NFTABLES_CAPTURE) t.false(fs.existsSync(c.pinRoot(SERVER_NODE)), "the pin root is still there");
  t.deepEqual(JSON.parse(fs.readFileSync(path.join(LOCK_DIRECTORY, `enrolled-${SERVER_NODE}.json`), "utf8")), [], "the enrolled-pods file still lists pods");
  const stopped = c.auditRecords(SERVER_NODE, "agent.stopped").at(-1);
  t.true(String(stopped?.reason).startsWith(`${signal}: DaemonSet ambient-agent/ambient-agent was deleted (watch event at `), `agent.stopped reason: ${stopped?.reason}`);

  const direct = await plaintextToServer();
  t.is(direct.status, 200, `plaintext did not reach the formerly enrolled server: ${direct.stderr}`);
  t.true(direct.body.toString().includes(MARKER));
}

/** Sends SIGHUP to an agent that does not serve, and checks that it logged the signal as ignored and runs on. */
async function assertHangupIgnored(t: ExecutionContext, agent: AgentProcess): Promise<void> {
  const from = agent.lines.length;
  agent.signal("SIGHUP");
  await agent.waitForLog((line) => String(line.msg).startsWith("SIGHUP ignored"), 10_000, "the ignored SIGHUP", from);
  t.true(agent.running, `SIGHUP ended the agent:\n${agent.tail()}`);
}

/** Waits for the node's agent to stop and checks that it exited 0. */
async function stopAgent(t: ExecutionContext, node: string): Promise<AgentProcess> {
  const agent = theCluster().agent(node);
  await agent.stop();
  t.deepEqual(agent.exit, { code: 0, signal: null }, `the agent of ${node} did not exit cleanly:\n${agent.tail()}`);
  return agent;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  removeProcMounts((name) => !ownedByLiveRun(name, PREFIX_FAMILY));
  mountProc(procDir, false);
  mountProc(readOnlyProcDir, true);
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), `${PREFIX}-`));
  const configFile = path.join(workDir, "agent-config.yaml");
  const config = [`daemonset: ${DAEMONSET.namespace}/${DAEMONSET.name}`, "idle-after-handover: true", `host-proc: ${procDir}`, "drain-timeout: 1", "log-format: json"];
  fs.writeFileSync(configFile, config.join("\n") + "\n");
  cluster = await Cluster.createWithApi({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES, workDir, agentArgs: ["--config", configFile] });
  putDaemonSet();
  fs.mkdirSync(cniPaths().confDir, { recursive: true });
  fs.writeFileSync(conflistFile(), JSON.stringify(PRIMARY_CONFLIST, null, 2) + "\n");
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "marker.html"), `${MARKER}\n`);
  await startHttpServer(cluster.topology, "server", site, 8080);
  await cluster.restartAgent(CLIENT_NODE, ["client"]);
  await cluster.restartAgent(SERVER_NODE, ["server"], serverNodeArgs());
});

test.after.always(async () => {
  try {
    setProcRoot("/proc");
    await Promise.all(detachedAgents.map((agent) => agent.stop()));
  } finally {
    await cluster?.destroy({ removeWorkDir: true });
    removeProcMounts((name) => name === path.basename(procDir) || name === path.basename(readOnlyProcDir));
  }
});

test.serial("sysctls are written through the host proc folder", (t) => {
  const c = theCluster();
  const legacy = c.topology.pod("legacy");
  const netnsPath = `/var/run/netns/${legacy.netns}`;
  const podValue = (): string => c.topology.exec(legacy.netns, "cat", ["/proc/sys/net/ipv4/tcp_fwmark_accept"]).trim();
  const hostValue = fs.readFileSync("/proc/sys/net/ipv4/tcp_fwmark_accept", "utf8").trim();
  t.is(podValue(), "0", "the pod outside the mesh has tcp_fwmark_accept set already");
  try {
    setProcRoot(readOnlyProcDir);
    const error = t.throws(() => netnsTransparentRouting(netnsPath, true));
    t.true(error?.message.includes(`${readOnlyProcDir}/sys/net/ipv4/tcp_fwmark_accept`), `the error does not name the read-only folder: ${error?.message}`);
    t.is(podValue(), "0");
    setProcRoot(procDir);
    netnsTransparentRouting(netnsPath, true);
    t.is(podValue(), "1", "the write through the host proc folder did not reach the pod's namespace");
    t.is(fs.readFileSync("/proc/sys/net/ipv4/tcp_fwmark_accept", "utf8").trim(), hostValue, "the write changed the host's value");
  } finally {
    setProcRoot("/proc");
    netnsTransparentRouting(netnsPath, false);
  }
});

test.serial("agent stays idle after handing the node over", async (t) => {
  const c = theCluster();
  const old = c.agent(CLIENT_NODE);
  detachedAgents.push(old);
  const replacement = new AgentProcess({ ...old.options, extraArgs: [...(old.options.extraArgs ?? []), "--replace"] });
  registerPid(PREFIX, replacement.pid);
  c.agents.set(CLIENT_NODE, replacement);
  await replacement.waitReady(40_000);
  await old.waitForLog((line) => line.msg === "node handed over: idle until SIGTERM or SIGINT", 20_000, "the idle line");
  t.true(old.running, "the replaced agent exited");
  await assertHangupIgnored(t, old);
  const oldPid = old.pid!;
  const newPid = String(replacement.pid);

  for (const lock of [path.join(LOCK_DIRECTORY, `node-${CLIENT_NODE}.pid`), lockFileOf(c.pinRoot(CLIENT_NODE))]) {
    t.is(fs.readFileSync(lock, "utf8").trim(), newPid, `${lock} is not the replacement's`);
  }
  for (const netns of [c.topology.node(CLIENT_NODE).netns, c.topology.pod("client").netns]) {
    t.deepEqual(listenersOf(netns, oldPid), [], `the idle agent still listens in ${netns}`);
  }
  t.deepEqual(socketsOf(oldPid), [], "the idle agent still holds sockets");

  const before = await curl(c.topology, "client", `http://${c.topology.pod("server").ip}:8080/marker.html`);
  t.is(before.status, 200, `request through the replacement failed: ${before.stderr}`);

  await old.stop();
  t.deepEqual(old.exit, { code: 0, signal: null }, `the idle agent did not exit cleanly:\n${old.tail()}`);
  const afterIdle = old.lines.slice(old.lines.findIndex((line) => line.msg === "node handed over: idle until SIGTERM or SIGINT"));
  t.false(
    afterIdle.some((line) => /uninstall/.test(String(line.msg))),
    "the idle agent read the DaemonSet at SIGTERM, which only a serving agent may do",
  );
  const after = await curl(c.topology, "client", `http://${c.topology.pod("server").ip}:8080/marker.html`);
  t.is(after.status, 200, `the replacement stopped serving when the idle agent exited: ${after.stderr}`);
  t.true(replacement.running);
});

test.serial("stop with the DaemonSet present keeps capture", async (t) => {
  const c = theCluster();
  const through = await plaintextToServer();
  t.is(through.status, 200, `plaintext to the enrolled server failed while its agent ran: ${through.stderr}`);

  const agent = await stopAgent(t, SERVER_NODE);
  t.truthy(agent.lines.find((line) => line.msg === `not an uninstall: DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name} exists; stopping with capture pinned`), agent.tail());
  t.true(serverCaptureInPlace(), "capture was removed");
  t.true(cniEntryPresent(), "the CNI plugin entry was removed");
  t.is(annotationOf(c.kube!.get("pods", "back", "server"), REDIRECTION), "enabled");
  const dropped = await plaintextToServer();
  t.not(dropped.exitCode, 0, "plaintext reached the server while no agent served it");

  await c.restartAgent(SERVER_NODE, ["server"], serverNodeArgs());
});

test.serial("stop with the API server unreachable keeps capture", async (t) => {
  const c = theCluster();
  c.kube!.setOutage(true);
  try {
    const agent = await stopAgent(t, SERVER_NODE);
    t.truthy(agent.lines.find((line) => String(line.msg).startsWith(`not an uninstall: cannot read DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name}`)), agent.tail());
  } finally {
    c.kube!.setOutage(false);
  }
  t.true(serverCaptureInPlace(), "capture was removed");
  t.true(cniEntryPresent(), "the CNI plugin entry was removed");
  const dropped = await plaintextToServer();
  t.not(dropped.exitCode, 0, "plaintext reached the server while no agent served it");

  await c.restartAgent(SERVER_NODE, ["server"], serverNodeArgs());
});

test.serial("stop after the DaemonSet is deleted uninstalls the agent", async (t) => {
  const c = theCluster();
  await waitForObject(c.kube!, "pods", "back", "server", (pod) => annotationOf(pod, REDIRECTION) === "enabled", 10_000, "the redirection annotation");
  const recordsBefore = uninstallRecordsOfServer();
  await deleteDaemonSet(c.agent(SERVER_NODE));

  const agent = await stopAgent(t, SERVER_NODE);
  t.truthy(agent.lines.find((line) => String(line.msg).startsWith(`uninstall: DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name} was deleted (watch event at `)), agent.tail());
  t.is(annotationOf(c.kube!.get("pods", "back", "server"), REDIRECTION), undefined, "the redirection annotation is still there");
  t.true(uninstallRecordsOfServer() > recordsBefore, "no workload.unenrolled record with reason \"agent uninstalled\" for the server pod");
  await assertUninstalled(t);
});

test.serial("uninstall after the API server refuses the agent", async (t) => {
  const c = theCluster();
  // As `helm install` after the uninstall above.
  putDaemonSet();
  const agent = await c.restartAgent(SERVER_NODE, ["server"], serverNodeArgs());
  await agent.waitForLog((line) => String(line.msg).startsWith(`found DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name}`), 10_000, "the DaemonSet's first list");
  await waitForObject(c.kube!, "pods", "back", "server", (pod) => annotationOf(pod, REDIRECTION) === "enabled", 10_000, "the redirection annotation");
  t.true(cniEntryPresent(), "the new agent did not chain its CNI plugin entry");
  t.true(serverCaptureInPlace(), "the new agent did not capture the server pod");
  const recordsBefore = uninstallRecordsOfServer();

  // As `helm uninstall`: the DaemonSet goes, then its Role and ServiceAccount, before the kubelet
  // sends SIGTERM. From then on every request of the agent is refused, the read at the stop included.
  await deleteDaemonSet(agent);
  c.kube!.refuseRequests(403);
  try {
    await stopAgent(t, SERVER_NODE);
  } finally {
    c.kube!.refuseRequests(undefined);
  }
  t.truthy(agent.lines.find((line) => String(line.msg).startsWith(`uninstall: DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name} was deleted (watch event at `)), agent.tail());
  // The refused patch shows that the refusal held through the stop.
  t.is(annotationOf(c.kube!.get("pods", "back", "server"), REDIRECTION), "enabled", "the annotation was removed, so the API server did not refuse the agent");
  t.true(uninstallRecordsOfServer() > recordsBefore, "no workload.unenrolled record with reason \"agent uninstalled\" for the server pod");
  await assertUninstalled(t);
});

test.serial("stop during start after the DaemonSet is deleted uninstalls", async (t) => {
  const c = theCluster();
  putDaemonSet();
  const served = await c.restartAgent(SERVER_NODE, ["server"], serverNodeArgs());
  await served.waitForLog((line) => String(line.msg).startsWith(`found DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name}`), 10_000, "the DaemonSet's first list");
  // A restart: the next agent finds the pod captured, its CNI entry and the enrolled-pods file.
  await stopAgent(t, SERVER_NODE);
  t.true(serverCaptureInPlace(), "the restart removed capture");
  t.true(cniEntryPresent(), "the restart removed the CNI plugin entry");
  const recordsBefore = uninstallRecordsOfServer();

  // The next agent lists its DaemonSet, but every other list is refused, so it stays in its start.
  const daemonSets = `/apis/apps/v1/namespaces/${DAEMONSET.namespace}/daemonsets`;
  const forbidden = { code: 403, body: JSON.stringify({ kind: "Status", apiVersion: "v1", status: "Failure", reason: "Forbidden", message: "forbidden by the test", code: 403 }) };
  c.kube!.respondFirst((request) => (request.path === daemonSets ? undefined : forbidden));
  const starting = new AgentProcess({ ...served.options });
  registerPid(PREFIX, starting.pid);
  c.agents.set(SERVER_NODE, starting);
  try {
    await starting.waitForLog((line) => String(line.msg).startsWith(`found DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name}`), 20_000, "the DaemonSet's first list");
    await starting.waitForLog((line) => line.status === 403, 20_000, "a refused list");
    await assertHangupIgnored(t, starting);
    // As `helm uninstall`: the DaemonSet goes and then the agent's RBAC objects, before SIGTERM.
    await deleteDaemonSet(starting);
    c.kube!.refuseRequests(403);
    await stopAgent(t, SERVER_NODE);
  } finally {
    c.kube!.refuseRequests(undefined);
    c.kube!.respondFirst(undefined);
  }
  t.false(starting.lines.some((line) => line.msg === "agent ready"), "the agent finished its start, so this test checked nothing");
  t.truthy(starting.lines.find((line) => line.msg === "signal received while starting, stopping"), starting.tail());
  t.truthy(starting.lines.find((line) => String(line.msg).startsWith(`uninstall: DaemonSet ${DAEMONSET.namespace}/${DAEMONSET.name} was deleted (watch event at `)), starting.tail());
  t.true(uninstallRecordsOfServer() > recordsBefore, "no workload.unenrolled record with reason \"agent uninstalled\" for the server pod");
  await assertUninstalled(t, "signal SIGTERM during start");
});
