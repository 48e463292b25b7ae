// The chained CNI plugin with real agents that read the cluster from the fake API server. The test
// acts as the container runtime of a new pod. It makes the pod's namespace and address, and stores
// the pod bound to its node without status.podIP, as the scheduler leaves it. Then it runs the
// plugin binary that the agent installed, with the agent's entry from the node's conflist and a
// prevResult on stdin. Once ADD exits, the pod's first connection must already be captured.
//
// Both nodes run the CNI, each with its own configuration folder, bin folder and socket. New pods
// start on the first node and connect to servers on the second.

import test, { type ExecutionContext } from "ava";
import { execFile, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { PLUGIN_TYPE } from "../../agent/cni/chain";
import { AGENTCTL_BIN, REPO_ROOT, testPrefixFamily, type LogLine } from "../harness/agent-process";
import { curl, curlWasReset, startHttpServer } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { podObject } from "../harness/kube-objects";
import { registerPid } from "../harness/pid-registry";
import type { NamespaceSpec } from "../harness/manifests";
import { run, type NodeSpec, type PodHandle, type PodSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aakcni");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CNI_NODE = "kcni-n1";
const SERVER_NODE = "kcni-n2";
const PLUGIN_SOURCE = path.join(REPO_ROOT, "native", "cni", "ambient-agent-cni");
/** --cni-timeout of every agent: seconds the plugin waits for the socket, and again for the reply. */
const CNI_TIMEOUT_SECONDS = 3;
/** Bounds a plugin run, so that a plugin that hangs fails its test instead of ava's timeout. */
const PLUGIN_KILL_MS = 20_000;
const FRESH_PRINCIPAL = "cluster.local/ns/shop/sa/fresh";

const NODES: NodeSpec[] = [
  { name: CNI_NODE, pods: [{ name: "early", namespace: "shop", serviceAccount: "early" }] },
  {
    name: SERVER_NODE,
    pods: [
      { name: "api", namespace: "shop", serviceAccount: "api" },
      { name: "ledger", namespace: "shop", serviceAccount: "ledger" },
    ],
  },
];

const NAMESPACES: NamespaceSpec[] = [
  { name: "shop", ambient: true },
  { name: "plain", ambient: false },
  // Labelled for ambient mode, but excluded by the agents' default --excluded-namespaces.
  { name: "kube-system", ambient: true },
];

const DENY_FRESH_POLICY = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-fresh
  namespace: shop
spec:
  selector:
    matchLabels:
      app: ledger
  action: DENY
  rules:
    - from:
        - source:
            principals: ["${FRESH_PRINCIPAL}"]
`;

/** The network plugin's own configuration, as a cluster's network add-on writes it. The test never runs these plugins. */
const PRIMARY_CONFLIST = {
  cniVersion: "1.0.0",
  name: "kcni-pods",
  plugins: [
    {
      type: "bridge",
      bridge: "cni0",
      isGateway: true,
      ipMasq: true,
      ipam: { type: "host-local", ranges: [[{ subnet: "10.85.0.0/16" }]], routes: [{ dst: "0.0.0.0/0" }] },
    },
    { type: "portmap", capabilities: { portMappings: true }, snat: true },
  ],
};

interface CniPaths {
  confDir: string;
  binDir: string;
  socketPath: string;
}

interface PluginRun {
  status: number | null;
  stdout: string;
  stderr: string;
  elapsedMs: number;
  exitedAt: number;
}

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

/** Returns the CNI folders and socket of a node's agent, all under the cluster's work folder. */
function cniPaths(node: string): CniPaths {
  const base = path.join(theCluster().workDir, `cni-${node}`);
  // The agent makes the socket's folder with mode 0700, and rejects one that group or others may write.
  return { confDir: path.join(base, "net.d"), binDir: path.join(base, "bin"), socketPath: path.join(base, "run", "cni.sock") };
}

function cniArgs(node: string): string[] {
  const paths = cniPaths(node);
  return ["--cni-conf-dir", paths.confDir, "--cni-bin-dir", paths.binDir, "--cni-socket", paths.socketPath, "--cni-timeout", String(CNI_TIMEOUT_SECONDS)];
}

function conflistFile(node: string): string {
  return path.join(cniPaths(node).confDir, "10-bridge.conflist");
}

function readConflist(node: string): { cniVersion: string; name: string; plugins: Array<Record<string, unknown>> } {
  return JSON.parse(fs.readFileSync(conflistFile(node), "utf8"));
}

test.before(async () => {
  assertHostCapable();
  if (!fs.existsSync(PLUGIN_SOURCE)) throw new Error(`the CNI plugin binary ${PLUGIN_SOURCE} is missing: run make build`);
  removeLeftovers(PREFIX_FAMILY);
  cluster = await Cluster.createWithApi({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES, extraManifests: { "policies.yaml": DENY_FRESH_POLICY } });
  for (const node of NODES) {
    fs.mkdirSync(cniPaths(node.name).confDir, { recursive: true });
    fs.writeFileSync(conflistFile(node.name), JSON.stringify(PRIMARY_CONFLIST, null, 2) + "\n");
  }
  for (const pod of ["api", "ledger"]) {
    const site = path.join(cluster.workDir, `site-${pod}`);
    fs.mkdirSync(site, { recursive: true });
    fs.writeFileSync(path.join(site, "index.html"), `${pod}\n`);
    await startHttpServer(cluster.topology, pod, site, 8080);
  }
  // Each agent gets the CNI flags of its own node, so each starts alone.
  await cluster.restartAgent(SERVER_NODE, ["api", "ledger"], cniArgs(SERVER_NODE));
  await cluster.restartAgent(CNI_NODE, ["early"], cniArgs(CNI_NODE));
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

/** Adds a pod's namespace and address, and stores the pod bound to the CNI node without an IP, as the scheduler leaves it. */
function schedulePod(spec: PodSpec): PodHandle {
  const c = theCluster();
  const pod = c.topology.addPodTo(CNI_NODE, spec);
  c.kube!.put(podObject(pod, { withoutIp: true }));
  return pod;
}

/** Stores the pod with its IP in status, as the kubelet reports it once the sandbox runs. */
function reportPodIp(pod: PodHandle): void {
  theCluster().kube!.put(podObject(pod));
}

/** Returns the stored pod's status.podIP, undefined before the kubelet reports it. */
function podIpOf(name: string): string | undefined {
  const status = theCluster().kube!.get("pods", "shop", name)?.status as { podIP?: string } | undefined;
  return status?.podIP;
}

/** Returns the stored pod's ambient.istio.io/redirection annotation, which the agent writes once capture is in place. */
function redirectionOf(name: string): string | undefined {
  const annotations = theCluster().kube!.get("pods", "shop", name)?.metadata?.annotations as Record<string, string> | undefined;
  return annotations?.["ambient.istio.io/redirection"];
}

function prevResultOf(pod: PodHandle): Record<string, unknown> {
  const gateway = pod.ip.replace(/\.\d+$/, ".1");
  return {
    cniVersion: "1.0.0",
    interfaces: [{ name: "eth0", sandbox: `/var/run/netns/${pod.netns}` }],
    ips: [{ address: `${pod.ip}/24`, interface: 0, gateway }],
  };
}

/** Builds the plugin's network configuration as libcni does for a chained plugin: its entry, the list's name and version, and the previous result. */
function networkConfig(pod: PodHandle, overrides: Record<string, unknown> = {}): string {
  const conflist = readConflist(CNI_NODE);
  const entry = conflist.plugins.find((plugin) => plugin.type === PLUGIN_TYPE);
  if (!entry) throw new Error(`the ${PLUGIN_TYPE} entry is missing from ${conflistFile(CNI_NODE)}`);
  return JSON.stringify({ cniVersion: conflist.cniVersion, name: conflist.name, ...entry, ...overrides, prevResult: prevResultOf(pod) });
}

function podEnv(command: string, pod: PodHandle): Record<string, string> {
  return {
    CNI_COMMAND: command,
    CNI_CONTAINERID: `sandbox-${pod.name}`,
    CNI_NETNS: `/var/run/netns/${pod.netns}`,
    CNI_IFNAME: "eth0",
    CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=${pod.namespace};K8S_POD_NAME=${pod.name};K8S_POD_INFRA_CONTAINER_ID=sandbox-${pod.name}`,
    CNI_PATH: cniPaths(CNI_NODE).binDir,
  };
}

/** Runs the plugin binary that the agent installed on the CNI node, with env and stdin, as a container runtime does. */
function runPlugin(command: string, pod: PodHandle, overrides: Record<string, unknown> = {}, env: Record<string, string> = {}): Promise<PluginRun> {
  const binary = path.join(cniPaths(CNI_NODE).binDir, PLUGIN_TYPE);
  const started = Date.now();
  const child = spawn(binary, [], { env: { ...podEnv(command, pod), ...env }, stdio: ["pipe", "pipe", "pipe"] });
  registerPid(PREFIX, child.pid);
  const killer = setTimeout(() => child.kill("SIGKILL"), PLUGIN_KILL_MS);
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  child.stdin.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code !== "EPIPE") throw error;
  });
  child.stdin.end(networkConfig(pod, overrides));
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (status) => {
      clearTimeout(killer);
      const exitedAt = Date.now();
      resolve({ status, stdout, stderr, elapsedMs: exitedAt - started, exitedAt });
    });
  });
}

/** Runs agentctl on this machine and returns its exit code and output. */
function agentctl(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [AGENTCTL_BIN, ...args], { timeout: 15_000 }, (error, stdout, stderr) => {
      let code = 0;
      if (error) code = typeof error.code === "number" ? error.code : -1;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Waits for the server node's inbound record, at index `mark` or later, of a connection from `pod`'s address to `server`. */
async function inboundRecord(mark: number, pod: PodHandle, server: string): Promise<Record<string, any>> {
  const c = theCluster();
  const destination = `${c.topology.pod(server).ip}:8080`;
  const deadline = Date.now() + 10_000;
  for (;;) {
    const found = c
      .auditRecords(SERVER_NODE)
      .slice(mark)
      .find((record) => record.direction === "inbound" && String(record.src.addr).startsWith(`${pod.ip}:`) && record.dst.addr === destination);
    if (found) return found;
    if (Date.now() > deadline) {
      throw new Error(`no inbound record on ${SERVER_NODE} for ${pod.name} -> ${destination} within 10 s; new records:\n${JSON.stringify(c.auditRecords(SERVER_NODE).slice(mark), null, 1)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function enrolledLine(uid: string): (line: LogLine) => boolean {
  return (line) => line.msg === "workload enrolled" && line.workload === uid;
}

function cniLine(uid: string): (line: LogLine) => boolean {
  return (line) => line.msg === "CNI ADD: capture in place before the pod starts" && line.pod === uid;
}

function assertPrevResult(t: ExecutionContext, run: PluginRun, pod: PodHandle): void {
  t.is(run.status, 0, `plugin exit status; stdout ${run.stdout}, stderr ${run.stderr}`);
  t.deepEqual(JSON.parse(run.stdout), prevResultOf(pod), "the plugin must print the previous result unchanged");
}

test.serial("agents chain the plugin and install it", (t) => {
  for (const node of [CNI_NODE, SERVER_NODE]) {
    const paths = cniPaths(node);
    const conflist = readConflist(node);
    t.deepEqual(conflist.plugins.slice(0, -1), PRIMARY_CONFLIST.plugins, `${node}: the network plugin's entries`);
    t.is(conflist.name, PRIMARY_CONFLIST.name);
    t.is(conflist.cniVersion, PRIMARY_CONFLIST.cniVersion);
    t.deepEqual(conflist.plugins.at(-1), {
      type: PLUGIN_TYPE,
      agent_socket: paths.socketPath,
      exclude_namespaces: ["kube-system"],
      timeout_seconds: CNI_TIMEOUT_SECONDS,
    });
    const installed = path.join(paths.binDir, PLUGIN_TYPE);
    t.true(fs.readFileSync(installed).equals(fs.readFileSync(PLUGIN_SOURCE)), `${node}: installed binary differs from the build`);
    t.is(fs.statSync(installed).mode & 0o777, 0o755);
    t.true(fs.lstatSync(paths.socketPath).isSocket(), `${node}: no socket at ${paths.socketPath}`);
  }
});

test.serial("pods running before the agent are enrolled", async (t) => {
  const line = await theCluster().agent(CNI_NODE).waitEnrolled("shop/early", 1_000);
  t.is(line.workload, "shop/early");
});

test.serial("ADD returns once the pod is captured", async (t) => {
  const c = theCluster();
  const agent = c.agent(CNI_NODE);
  const pod = schedulePod({ name: "fresh", namespace: "shop", serviceAccount: "fresh" });
  t.is(podIpOf("fresh"), undefined, "the pod must have no IP in the API before ADD");
  const mark = c.auditRecords(SERVER_NODE).length;

  const run = await runPlugin("ADD", pod);
  // The first connections start right after the exit, before anything else in this test.
  const allowed = curl(c.topology, "fresh", `http://${c.topology.pod("api").ip}:8080/`, 5);
  const denied = curl(c.topology, "fresh", `http://${c.topology.pod("ledger").ip}:8080/`, 5);
  const [allowedResult, deniedResult] = await Promise.all([allowed, denied]);

  assertPrevResult(t, run, pod);
  t.is(podIpOf("fresh"), undefined, "no status update happened while ADD ran");

  t.is(allowedResult.exitCode, 0, allowedResult.stderr);
  t.is(allowedResult.body.toString(), "api\n");
  const allowedRecord = await inboundRecord(mark, pod, "api");
  t.is(allowedRecord.transport, "hbone");
  t.is(allowedRecord.src.identity, `spiffe://${FRESH_PRINCIPAL}`);

  t.true(curlWasReset(deniedResult), `curl to ledger: exit ${deniedResult.exitCode} ${deniedResult.stderr}`);
  const deniedRecord = await inboundRecord(mark, pod, "ledger");
  t.is(deniedRecord.transport, "hbone");
  t.is(deniedRecord.decision, "deny");
  t.is(deniedRecord.reason, "denied_by_policy");
  t.is(deniedRecord.policy, "shop/deny-fresh");

  const added = await agent.waitForLog(cniLine("shop/fresh"), 2_000, "the CNI ADD line");
  const enrolled = await agent.waitForLog(enrolledLine("shop/fresh"), 2_000, "enrolment of shop/fresh");
  t.is(added.ip, pod.ip);
  t.true(agent.lines.indexOf(enrolled) < agent.lines.indexOf(added), "the pod was enrolled after the CNI line");
  t.true(Number(added.time) <= run.exitedAt, `the CNI line (${added.time}) is later than the plugin's exit (${run.exitedAt})`);

  // The kubelet reports the IP only now; the agent logged the CNI line before this update.
  const reportedAt = Date.now();
  reportPodIp(pod);
  t.true(Number(added.time) < reportedAt);
  const annotated = await waitFor(() => redirectionOf("fresh"), 5_000);
  t.is(annotated, "enabled");
});

test.serial("replaced sandbox with the same IP is captured", async (t) => {
  const c = theCluster();
  const pod = schedulePod({ name: "resandbox", namespace: "shop", serviceAccount: "fresh" });
  const first = await runPlugin("ADD", pod);
  t.is(first.status, 0, first.stdout);
  // The runtime replaces the sandbox and no DEL reaches the agent: the old namespace goes, and a
  // new one gets the same IP. Without a check of the namespace the agent would keep the old one.
  c.topology.removePod("resandbox");
  const netns = `${PREFIX}-resandbox2`;
  const node = c.topology.node(CNI_NODE);
  const hostSide = "v-resandbox2";
  run("ip", ["netns", "add", netns]);
  run("ip", ["link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", hostSide, "netns", node.netns]);
  c.topology.exec(netns, "ip", ["link", "set", "lo", "up"]);
  c.topology.exec(netns, "ip", ["addr", "add", `${pod.ip}/24`, "dev", "eth0"]);
  c.topology.exec(netns, "ip", ["link", "set", "eth0", "up"]);
  c.topology.exec(netns, "ip", ["route", "add", "default", "via", pod.ip.replace(/\.\d+$/, ".1")]);
  c.topology.exec(node.netns, "ip", ["link", "set", hostSide, "master", "br0"]);
  c.topology.exec(node.netns, "ip", ["link", "set", hostSide, "up"]);
  const replaced: PodHandle = { ...pod, netns };
  c.topology.pods.set("resandbox", replaced);

  const mark = c.auditRecords(SERVER_NODE).length;
  const second = await runPlugin("ADD", replaced);
  assertPrevResult(t, second, replaced);
  const denied = await curl(c.topology, "resandbox", `http://${c.topology.pod("ledger").ip}:8080/`, 5);
  t.true(curlWasReset(denied), `curl to ledger from the new sandbox: exit ${denied.exitCode} ${denied.stderr}`);
  const record = await inboundRecord(mark, replaced, "ledger");
  t.is(record.transport, "hbone");
  t.is(record.decision, "deny");

  // The runtime deletes the sandbox: its pod leaves the mesh at once.
  const serverMark = c.auditRecords(CNI_NODE, "workload.unenrolled").length;
  const del = await runPlugin("DEL", replaced);
  t.is(del.status, 0, del.stdout);
  const unenrolled = await c.waitForAudit(CNI_NODE, (r) => r.workload === "resandbox" && r.reason === "pod sandbox deleted (CNI DEL)", 5_000, "workload.unenrolled");
  t.truthy(unenrolled);
  t.true(c.auditRecords(CNI_NODE, "workload.unenrolled").length > serverMark);
});

test.serial("ADD waits for the pod uid the runtime names", async (t) => {
  const c = theCluster();
  // The agent has an older pod of this name, which opted out; the runtime starts a newer one.
  const pod = c.topology.addPodTo(CNI_NODE, { name: "renamed", namespace: "shop", serviceAccount: "fresh" });
  const older = c.kube!.put(podObject(pod, { withoutIp: true, labels: { "istio.io/dataplane-mode": "none" } }));
  const olderUid = (older.metadata as { uid: string }).uid;
  const newerUid = "0e4a7c2b-7f10-4c77-9a7e-5f1b8a0d9c31";
  const args = `IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=renamed;K8S_POD_INFRA_CONTAINER_ID=sandbox-renamed;K8S_POD_UID=${newerUid}`;
  t.not(olderUid, newerUid);
  // The agent waits 10 s for the uid, within the plugin's reply timeout.
  const run = await runPlugin("ADD", pod, { timeout_seconds: 20 }, { CNI_ARGS: args });
  t.not(run.status, 0, `ADD for an unseen pod uid succeeded: ${run.stdout}`);
  t.is(JSON.parse(run.stdout).code, 100, "the agent's refusal");
  t.regex(JSON.parse(run.stdout).msg, /pod shop\/renamed with uid 0e4a7c2b-7f10-4c77-9a7e-5f1b8a0d9c31, or its namespace, is not in the agent's view/);
  const matching = await runPlugin("ADD", pod, {}, { CNI_ARGS: args.replace(newerUid, olderUid) });
  t.is(matching.status, 0, matching.stdout);
});

test.serial("ADD outside ambient mode skips enrolment", async (t) => {
  const c = theCluster();
  const agent = c.agent(CNI_NODE);
  const from = agent.lines.length;
  const pod = schedulePod({ name: "outsider", namespace: "plain", serviceAccount: "default" });
  const mark = c.auditRecords(SERVER_NODE).length;

  const run = await runPlugin("ADD", pod);
  assertPrevResult(t, run, pod);
  await agent.waitForLog((line) => line.msg === "CNI ADD for a pod outside ambient mode" && line.pod === "plain/outsider", 2_000, "the outside-ambient line", from);

  const result = await curl(c.topology, "outsider", `http://${c.topology.pod("api").ip}:8080/`, 5);
  t.is(result.exitCode, 0, result.stderr);
  const record = await inboundRecord(mark, pod, "api");
  t.is(record.transport, "plaintext");
  t.false(agent.lines.slice(from).some(enrolledLine("plain/outsider")), "the agent enrolled a pod outside ambient mode");
});

test.serial("restart keeps CNI pod before its IP", async (t) => {
  const c = theCluster();
  const pod = schedulePod({ name: "restarter", namespace: "shop", serviceAccount: "fresh" });
  const run = await runPlugin("ADD", pod);
  assertPrevResult(t, run, pod);
  await c.agent(CNI_NODE).stop();
  await c.restartAgent(CNI_NODE, ["early", "restarter"], cniArgs(CNI_NODE));
  t.is(podIpOf("restarter"), undefined, "the kubelet has not reported the IP yet");
  const mark = c.auditRecords(SERVER_NODE).length;
  const denied = await curl(c.topology, "restarter", `http://${c.topology.pod("ledger").ip}:8080/`, 5);
  t.true(curlWasReset(denied), `curl to ledger after the restart: exit ${denied.exitCode} ${denied.stderr}`);
  const record = await inboundRecord(mark, pod, "ledger");
  t.is(record.transport, "hbone");
  t.is(record.decision, "deny");
});

test.serial("ADD waits for a stopped agent, then fails", async (t) => {
  const c = theCluster();
  const paths = cniPaths(CNI_NODE);
  const excluded = schedulePod({ name: "sysd", namespace: "kube-system", serviceAccount: "default" });
  const late = schedulePod({ name: "late", namespace: "shop", serviceAccount: "late" });
  await c.agent(CNI_NODE).stop();
  t.false(fs.existsSync(paths.socketPath), "the stopped agent left its socket");
  t.truthy(readConflist(CNI_NODE).plugins.find((plugin) => plugin.type === PLUGIN_TYPE), "the stopped agent must leave its entry chained");

  // A pod in an excluded namespace starts without asking the agent.
  const skipped = await runPlugin("ADD", excluded);
  assertPrevResult(t, skipped, excluded);
  t.true(skipped.elapsedMs < 1_000, `ADD in kube-system took ${skipped.elapsedMs} ms`);

  const failed = await runPlugin("ADD", late);
  t.not(failed.status, 0);
  const error = JSON.parse(failed.stdout);
  t.is(error.code, 11);
  t.regex(error.msg, /did not accept a connection/);
  const minimumMs = CNI_TIMEOUT_SECONDS * 1000 - 100;
  t.true(failed.elapsedMs >= minimumMs && failed.elapsedMs < CNI_TIMEOUT_SECONDS * 1000 + 2_000, `ADD failed after ${failed.elapsedMs} ms`);

  const removed = await runPlugin("DEL", late);
  t.is(removed.status, 0, removed.stdout);
  t.is(removed.stdout, "");

  // The new agent finds no IP for the pod in the API, so it must not enrol it before the retried ADD.
  const agent = await c.restartAgent(CNI_NODE, ["early"], cniArgs(CNI_NODE));
  await new Promise((resolve) => setTimeout(resolve, 500));
  t.false(agent.lines.some(enrolledLine("shop/late")), "the restarted agent enrolled shop/late before its ADD");

  const mark = c.auditRecords(SERVER_NODE).length;
  const retried = await runPlugin("ADD", late);
  assertPrevResult(t, retried, late);
  t.truthy(agent.lines.find(cniLine("shop/late")) ?? (await agent.waitForLog(cniLine("shop/late"), 2_000, "the CNI ADD line")));
  const result = await curl(c.topology, "late", `http://${c.topology.pod("api").ip}:8080/`, 5);
  t.is(result.exitCode, 0, result.stderr);
  const record = await inboundRecord(mark, late, "api");
  t.is(record.transport, "hbone");
  t.is(record.src.identity, "spiffe://cluster.local/ns/shop/sa/late");
});

test.serial("ADD sent during agent start-up succeeds", async (t) => {
  const c = theCluster();
  const paths = cniPaths(CNI_NODE);
  const pod = schedulePod({ name: "racer", namespace: "shop", serviceAccount: "racer" });
  await c.agent(CNI_NODE).stop();
  t.false(fs.existsSync(paths.socketPath));

  // The plugin waits longer here than --cni-timeout, so that a slow agent start on this machine does not fail the ADD.
  const plugin = runPlugin("ADD", pod, { timeout_seconds: 20 });
  const starting = c.restartAgent(CNI_NODE, ["early"], cniArgs(CNI_NODE));
  const run = await plugin;
  const agent = await starting;

  assertPrevResult(t, run, pod);
  const added = await agent.waitForLog(cniLine("shop/racer"), 2_000, "the CNI ADD line");
  t.true(Number(added.time) <= run.exitedAt, "the plugin exited before the agent put the capture in place");
  const mark = c.auditRecords(SERVER_NODE).length;
  const result = await curl(c.topology, "racer", `http://${c.topology.pod("api").ip}:8080/`, 5);
  t.is(result.exitCode, 0, result.stderr);
  const record = await inboundRecord(mark, pod, "api");
  t.is(record.transport, "hbone");
});

test.serial("agentctl cni remove unchains the plugin", async (t) => {
  const c = theCluster();
  const confDir = cniPaths(CNI_NODE).confDir;
  // A running agent would put its entry back, so the command refuses while it serves the socket.
  const refused = await agentctl(["cni", "remove", "--conf-dir", confDir]);
  t.is(refused.code, 1);
  t.regex(refused.stderr, /an agent serves .*cni\.sock and would put the entry back: stop it first, or pass --force/);
  t.true(readConflist(CNI_NODE).plugins.some((plugin) => plugin.type === PLUGIN_TYPE), "the entry stays after a refusal");
  await c.agent(CNI_NODE).stop();

  const removed = await agentctl(["cni", "remove", "--conf-dir", confDir]);
  t.is(removed.code, 0, removed.stderr);
  t.regex(removed.stdout, /removed the agent's plugin entry from .*10-bridge\.conflist/);
  t.deepEqual(readConflist(CNI_NODE), PRIMARY_CONFLIST);

  const again = await agentctl(["cni", "remove", "--conf-dir", confDir]);
  t.is(again.code, 0, again.stderr);
  t.regex(again.stdout, /nothing to remove/);
  t.deepEqual(readConflist(CNI_NODE), PRIMARY_CONFLIST);

  const missing = await agentctl(["cni", "remove"]);
  t.is(missing.code, 2);
  t.regex(missing.stderr, /missing --conf-dir/);
});

async function waitFor<T>(read: () => T | undefined, timeoutMs: number): Promise<T | undefined> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = read();
    if (value !== undefined || Date.now() > deadline) return value;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
