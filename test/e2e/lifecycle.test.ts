// End to end on the real kernel: pods come, go, change address and change enrollment while the
// agents run (and while one is down), and each change leaves exactly the capture entries, links and
// listeners it should. The checks read the agents' state the way an operator does. Under eBPF
// capture, `agentctl capture list` shows the pinned entries. Under nftables capture, the agent's
// state folder lists the pods with a table, and `nft list` in the pod shows the table. `agentctl
// config` shows what an agent serves, and `ss` in the pod shows its listeners.

import test, { type ExecutionContext } from "ava";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import type { CaptureEntries } from "../../agent/capture/ebpf/inspect";
import { netnsCookie } from "../../agent/capture/native";
import { ADDRESS_CACHE_TTL_MS } from "../../agent/enroll/netns";
import { AGENTCTL_BIN, NFTABLES_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { curl, startHttpServer } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { namespaceYaml, podsYaml, writeManifest, type NamespaceSpec } from "../harness/manifests";
import { nftCaptureTable, nftStatePods, removeNftState } from "../harness/nft-state";
import { POD_NETWORK, run, type NodeSpec, type PodHandle } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aalfc");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
/** Node names differ per capture mode: an agent locks its node name, and nftables keeps state per node name. */
const CLIENT_NODE = NFTABLES_CAPTURE ? "nlfc1" : "lfc1";
const SERVER_NODE = NFTABLES_CAPTURE ? "nlfc2" : "lfc2";
const AGENT_PORTS = [15001, 15006, 15008];
const HTTP_PORT = 8080;

const APP = "lfcapp";
const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "client", namespace: APP, serviceAccount: "client" },
      { name: "mover", namespace: APP, serviceAccount: "mover" },
      { name: "phoenix", namespace: APP, serviceAccount: "phoenix" },
      { name: "gone", namespace: APP, serviceAccount: "gone" },
      { name: "gonedown", namespace: APP, serviceAccount: "gonedown" },
      { name: "hostnet", namespace: APP, serviceAccount: "hostnet" },
      { name: "outsider", namespace: "lfcplain", serviceAccount: "default" },
    ],
  },
  { name: SERVER_NODE, pods: [{ name: "server", namespace: "lfcsrv", serviceAccount: "server" }] },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: APP, ambient: true },
  { name: "lfcsrv", ambient: true },
  { name: "lfcplain", ambient: false },
];
const ENROLLED_AT_START = ["client", "mover", "phoenix", "gone", "gonedown", "server"];
/** Pods whose manifest sets spec.hostNetwork: true, although each has a namespace of its own here. */
const HOST_NETWORK_PODS = new Set(["hostnet"]);

let cluster: Cluster | undefined;
let site = "";

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created. Fix the first failure above and rerun.");
  return cluster;
}

/** Renders the pods manifest, with spec.hostNetwork set for HOST_NETWORK_PODS. */
function writePods(c: Cluster): void {
  const documents = podsYaml(c.topology)
    .split("---\n")
    .map((document) => {
      const name = /^ {2}name: (\S+)$/m.exec(document)?.[1] ?? "";
      return HOST_NETWORK_PODS.has(name) ? document.replace("\nspec:\n", "\nspec:\n  hostNetwork: true\n") : document;
    });
  writeManifest(c.manifestsDir, "pods.yaml", documents.join("---\n"));
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES });
  writePods(cluster);
  site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "index.html"), "lifecycle\n");
  for (const pod of ["server", "mover"]) await startHttpServer(cluster.topology, pod, site, HTTP_PORT);
  // Every pod exists before the agents start, so the start itself must find and enroll them.
  await cluster.startAgents(ENROLLED_AT_START);
});

let failed = false;
test.afterEach.always((t) => {
  if (!t.passed) failed = true;
});

test.after.always(async () => {
  // The agents' logs stay in the work folder after a failure.
  if (failed && cluster) console.error(`lifecycle: agent logs kept in ${cluster.workDir}`);
  await cluster?.destroy({ removeWorkDir: !failed });
  removeNftState([CLIENT_NODE, SERVER_NODE]);
});

// ---- Operator views of an agent's state ----

/** Runs `agentctl capture list` for the node's pin root: the pinned entries, readable with the agent down. */
function captureList(node: string): CaptureEntries {
  const output = execFileSync(process.execPath, [AGENTCTL_BIN, "capture", "list", "--pin-root", theCluster().pinRoot(node)], { encoding: "utf8" });
  return JSON.parse(output) as CaptureEntries;
}

interface ConfigDump {
  enrolled: { workload: string; ip: string; cookie: string }[];
  isolated: { workload: string }[];
  ambiguous: { workload: string; ip: string; netns: string; cookie: string }[];
  capture: CaptureEntries;
}

/** Runs `agentctl config` in the node's namespace, where the agent's admin API listens. */
function configDump(node: string): ConfigDump {
  const netns = theCluster().topology.node(node).netns;
  const output = execFileSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", process.execPath, AGENTCTL_BIN, "config"], { encoding: "utf8" });
  return JSON.parse(output) as ConfigDump;
}

/** Returns the netns cookie under which the node's agent serves the pod; throws when it does not. */
function servedCookie(pod: PodHandle): string {
  const uid = `${pod.namespace}/${pod.name}`;
  const entry = configDump(pod.node).enrolled.find((candidate) => candidate.workload === uid);
  if (!entry) throw new Error(`agent ${pod.node} does not serve ${uid}: ${JSON.stringify(configDump(pod.node).enrolled)}`);
  return entry.cookie;
}

/** Lists the agent ports that have a listener in the namespace at `netnsPath`. */
function agentListeners(netnsPath: string): number[] {
  const output = execFileSync("nsenter", [`--net=${netnsPath}`, "--", "ss", "-Hltn"], { encoding: "utf8" });
  // Each line reads "LISTEN 0 511 0.0.0.0:15001 0.0.0.0:*": the fourth field is the local address.
  const ports = output
    .split("\n")
    .map((line) => line.trim().split(/\s+/)[3] ?? "")
    .map((local) => Number(local.slice(local.lastIndexOf(":") + 1)));
  return AGENT_PORTS.filter((port) => ports.includes(port));
}

/** Asserts that the pod is served: captured at its IP, and listening on every agent port. */
function assertServed(t: ExecutionContext, pod: PodHandle): string {
  const cookie = servedCookie(pod);
  if (NFTABLES_CAPTURE) assertNftCaptured(t, pod, cookie);
  else assertPinnedCaptured(t, pod, cookie);
  t.deepEqual(agentListeners(`/var/run/netns/${pod.netns}`), AGENT_PORTS, `${pod.name}: agent listeners`);
  return cookie;
}

/** eBPF capture: the pod is enrolled with its IP, guarded inbound, and has its sk_lookup link. */
function assertPinnedCaptured(t: ExecutionContext, pod: PodHandle, cookie: string): void {
  const entries = captureList(pod.node);
  t.deepEqual(entries.enrolled.filter((entry) => entry.cookie === cookie), [{ cookie, podIp: pod.ip }], `${pod.name}: enrolled map entry`);
  t.deepEqual(entries.inboundPods.filter((entry) => entry.cookie === cookie), [{ podIp: pod.ip, cookie }], `${pod.name}: inbound pod entry`);
  t.true(entries.inboundListeners.includes(`${pod.ip}:15006`), `${pod.name}: no inbound listener entry for ${pod.ip}:15006 in ${JSON.stringify(entries.inboundListeners)}`);
  t.true(entries.inboundLinks.includes(cookie), `${pod.name}: no sk_lookup link pinned for cookie ${cookie}`);
}

/** nftables capture: the agent lists the pod's namespace with its IP, and the namespace has the table for that IP. */
function assertNftCaptured(t: ExecutionContext, pod: PodHandle, cookie: string): void {
  const listed = nftStatePods(pod.node).filter((entry) => entry.cookie === cookie || entry.podIp === pod.ip);
  t.deepEqual(listed.map((entry) => [entry.cookie, entry.podIp, entry.state]), [[cookie, pod.ip, "captured"]], `${pod.name}: nftables state entry`);
  const table = nftCaptureTable(`/var/run/netns/${pod.netns}`);
  t.not(table, undefined, `${pod.name}: no table inet ambient_agent in ${pod.netns}`);
  t.regex(table ?? "", new RegExp(`ip saddr ${pod.ip.replaceAll(".", "\\.")} accept`), `${pod.name}: the table does not capture ${pod.ip}`);
}

/**
 * Asserts that nothing of the node's capture refers to the pod's cookie or to `ip`, and that the agent
 * lists it neither as enrolled nor as isolated. `netnsPath` (when the namespace still exists) must have
 * no agent listener.
 */
function assertNotServed(t: ExecutionContext, node: string, uid: string, cookie: string, ip: string, netnsPath?: string): void {
  assertCaptureReleased(t, node, uid, cookie, ip, netnsPath);
  const dump = configDump(node);
  t.false(dump.enrolled.some((entry) => entry.workload === uid), `${uid} is still listed as enrolled`);
  t.false(dump.isolated.some((entry) => entry.workload === uid), `${uid} is listed as isolated`);
  if (netnsPath) t.deepEqual(agentListeners(netnsPath), [], `${uid}: agent listeners left in ${netnsPath}`);
}

/**
 * Asserts that the node's capture keeps nothing of the namespace with `cookie` or of the address
 * `ip`. Under nftables capture, the namespace at `netnsPath` (when given) has no capture table.
 */
function assertCaptureReleased(t: ExecutionContext, node: string, uid: string, cookie: string, ip: string, netnsPath?: string): void {
  if (NFTABLES_CAPTURE) {
    const listed = nftStatePods(node).filter((entry) => entry.cookie === cookie || entry.podIp === ip);
    t.deepEqual(listed, [], `${uid}: nftables state entries left`);
    if (netnsPath) t.is(nftCaptureTable(netnsPath), undefined, `${uid}: table inet ambient_agent left in ${netnsPath}`);
    return;
  }
  const entries = captureList(node);
  t.deepEqual(entries.enrolled.filter((entry) => entry.cookie === cookie || entry.podIp === ip), [], `${uid}: enrolled map entries left`);
  t.deepEqual(entries.inboundPods.filter((entry) => entry.cookie === cookie || entry.podIp === ip), [], `${uid}: inbound pod entries left`);
  t.deepEqual(entries.inboundListeners.filter((key) => key.startsWith(`${ip}:`)), [], `${uid}: inbound listener entries left`);
  t.false(entries.inboundLinks.includes(cookie), `${uid}: sk_lookup link for cookie ${cookie} still pinned`);
}

/** Checks whether the node's capture still contains the namespace with `cookie` as pinned entries or a listed nftables table. */
function captureHolds(node: string, cookie: string): boolean {
  if (NFTABLES_CAPTURE) return nftStatePods(node).some((entry) => entry.cookie === cookie);
  return captureList(node).enrolled.some((entry) => entry.cookie === cookie);
}

// ---- Traffic checks ----

type AuditRecord = Record<string, any>;

/** Waits for an audit record of `node`, written after the first `from` records, that satisfies `predicate`. */
async function waitForAuditAfter(node: string, from: number, predicate: (record: AuditRecord) => boolean, timeoutMs = 10_000): Promise<AuditRecord> {
  const c = theCluster();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = c.auditRecords(node).slice(from).find(predicate);
    if (found) return found;
    if (Date.now() > deadline) {
      throw new Error(`no matching audit record on ${node} within ${timeoutMs} ms; new records:\n${JSON.stringify(c.auditRecords(node).slice(from), null, 1)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Curls the server from `pod` and asserts that both agents carried it over HBONE. */
async function assertTunnelled(t: ExecutionContext, pod: PodHandle): Promise<void> {
  const c = theCluster();
  const marks = [c.auditRecords(CLIENT_NODE).length, c.auditRecords(SERVER_NODE).length];
  const result = await curl(c.topology, pod.name, `http://${c.topology.pod("server").ip}:${HTTP_PORT}/index.html`);
  t.is(result.exitCode, 0, `${pod.name} to server: ${result.stderr}`);
  const fromPod = (record: AuditRecord): boolean => String(record.src?.addr).startsWith(`${pod.ip}:`);
  const outbound = await waitForAuditAfter(CLIENT_NODE, marks[0], (record) => record.direction === "outbound" && fromPod(record));
  t.is(outbound.transport, "hbone", `${pod.name}: outbound record`);
  const inbound = await waitForAuditAfter(SERVER_NODE, marks[1], (record) => record.direction === "inbound" && fromPod(record));
  t.is(inbound.transport, "hbone", `${pod.name}: inbound record`);
  t.is(inbound.src.identity, `spiffe://cluster.local/ns/${pod.namespace}/sa/${pod.serviceAccount}`);
}

/** Curls the server from `pod` and asserts that its node's agent did not capture it: plaintext at the server. */
async function assertNotCaptured(t: ExecutionContext, pod: PodHandle): Promise<void> {
  const c = theCluster();
  const marks = [c.auditRecords(CLIENT_NODE).length, c.auditRecords(SERVER_NODE).length];
  const result = await curl(c.topology, pod.name, `http://${c.topology.pod("server").ip}:${HTTP_PORT}/index.html`);
  t.is(result.exitCode, 0, `${pod.name} to server: ${result.stderr}`);
  const inbound = await waitForAuditAfter(SERVER_NODE, marks[1], (record) => String(record.src?.addr).startsWith(`${pod.ip}:`));
  t.is(inbound.transport, "plaintext", `${pod.name}: the server saw a tunnel from a pod outside the mesh`);
  t.is(inbound.src.identity, undefined);
  const captured = c.auditRecords(CLIENT_NODE).slice(marks[0]).filter((record) => record.src?.addr === inbound.src.addr);
  t.deepEqual(captured, [], `${pod.name}: its node's agent captured the connection`);
}

/** Asserts that a plaintext client reaches `pod` at `ip` through the pod's inbound plaintext capture. */
async function assertInboundCaptured(t: ExecutionContext, pod: PodHandle): Promise<void> {
  const c = theCluster();
  const mark = c.auditRecords(pod.node).length;
  const result = await curl(c.topology, "outsider", `http://${pod.ip}:${HTTP_PORT}/index.html`);
  t.is(result.exitCode, 0, `outsider to ${pod.name}: ${result.stderr}`);
  const record = await waitForAuditAfter(pod.node, mark, (entry) => entry.direction === "inbound" && entry.dst?.addr === `${pod.ip}:${HTTP_PORT}`);
  t.is(record.transport, "plaintext");
}

// ---- Changes to the cluster ----

function uidOf(pod: PodHandle): string {
  return `${pod.namespace}/${pod.name}`;
}

function waitUnenrolled(pod: PodHandle, mark: number): Promise<unknown> {
  const uid = uidOf(pod);
  return theCluster()
    .agent(pod.node)
    .waitForLog((line) => line.msg === "workload unenrolled" && line.workload === uid, 10_000, `unenrollment of ${uid}`, mark);
}

/** Moves the pod's address within its namespace to `ip`, keeping its default route. */
function readdressPod(pod: PodHandle, ip: string): void {
  const c = theCluster();
  const gateway = `${pod.ip.split(".").slice(0, 3).join(".")}.1`;
  // Deleting the primary address also deletes the secondaries of its subnet and the default route.
  c.topology.exec(pod.netns, "ip", ["addr", "del", `${pod.ip}/24`, "dev", "eth0"]);
  c.topology.exec(pod.netns, "ip", ["addr", "add", `${ip}/24`, "dev", "eth0"]);
  c.topology.exec(pod.netns, "ip", ["route", "replace", "default", "via", gateway]);
  pod.ip = ip;
}

/** Creates a new namespace for `pod` on its node's bridge with address `ip`, as a recreated pod gets. */
function recreatePodNetns(pod: PodHandle, netnsSuffix: string, ip: string): void {
  const c = theCluster();
  const netns = `${PREFIX}-${pod.name}${netnsSuffix}`;
  const nodeNetns = c.topology.node(pod.node).netns;
  const hostSide = `v-${pod.name}${netnsSuffix}`.slice(0, 15);
  run("ip", ["netns", "add", netns]);
  run("ip", ["link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", hostSide, "netns", nodeNetns]);
  c.topology.exec(netns, "ip", ["link", "set", "lo", "up"]);
  c.topology.exec(netns, "ip", ["addr", "add", `${ip}/24`, "dev", "eth0"]);
  c.topology.exec(netns, "ip", ["link", "set", "eth0", "up"]);
  c.topology.exec(netns, "ip", ["route", "add", "default", "via", `${ip.split(".").slice(0, 3).join(".")}.1`]);
  c.topology.exec(nodeNetns, "ip", ["link", "set", hostSide, "master", "br0"]);
  c.topology.exec(nodeNetns, "ip", ["link", "set", hostSide, "up"]);
  pod.netns = netns;
  pod.ip = ip;
}

/** Removes the pod from the topology (so from the manifest written next) and deletes its namespace name. */
function deletePod(pod: PodHandle): void {
  const c = theCluster();
  c.topology.pods.delete(pod.name);
  run("ip", ["netns", "del", pod.netns]);
}

/** The lowest unicast MAC address, below every random veth address. */
const LOWEST_MAC = "00:00:00:00:00:01";
const LOW_MAC_VETH = "v-lowmac";

/** Reads the MAC address of a link in a namespace. */
function linkMac(netns: string, link: string): string {
  const [details] = JSON.parse(theCluster().topology.exec(netns, "ip", ["-j", "link", "show", link])) as { address: string }[];
  return details.address;
}

/** Waits until `link` no longer exists in `netns`: a deleted namespace's veth goes away shortly after. */
async function waitLinkGone(netns: string, link: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (theCluster().topology.exec(netns, "ip", ["-j", "link", "show", link], { allowFail: true }).trim() !== "") {
    if (Date.now() > deadline) throw new Error(`${link} still exists in ${netns} ${timeoutMs} ms after its peer's namespace was deleted`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// ---- Tests ----

test.serial("pods present at start are enrolled and tunnelled", async (t) => {
  const c = theCluster();
  for (const name of ENROLLED_AT_START) assertServed(t, c.topology.pod(name));
  await assertTunnelled(t, c.topology.pod("client"));
  await assertInboundCaptured(t, c.topology.pod("mover"));
});

test.serial("hostNetwork pod in an ambient namespace is never enrolled", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("hostnet");
  const node = c.agent(CLIENT_NODE);
  t.false(
    node.lines.some((line) => typeof line.workload === "string" && line.workload === uidOf(pod)),
    "the agent acted on the hostNetwork pod",
  );
  assertCaptureReleased(t, CLIENT_NODE, uidOf(pod), "none", pod.ip, `/var/run/netns/${pod.netns}`);
  t.deepEqual(agentListeners(`/var/run/netns/${pod.netns}`), []);
  t.false(configDump(CLIENT_NODE).enrolled.some((entry) => entry.workload === uidOf(pod)));
  await assertNotCaptured(t, pod);
});

test.serial("namespace label off and on applies live", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("client");
  const cookie = servedCookie(pod);
  const node = c.agent(CLIENT_NODE);

  let mark = node.lines.length;
  writeManifest(c.manifestsDir, "namespaces.yaml", NAMESPACES.map((spec) => namespaceYaml({ ...spec, ambient: spec.ambient && spec.name !== APP })).join("---\n"));
  await waitUnenrolled(pod, mark);
  assertNotServed(t, CLIENT_NODE, uidOf(pod), cookie, pod.ip, `/var/run/netns/${pod.netns}`);
  await assertNotCaptured(t, pod);

  mark = node.lines.length;
  writeManifest(c.manifestsDir, "namespaces.yaml", NAMESPACES.map(namespaceYaml).join("---\n"));
  await c.waitEnrolled(["client", "mover", "phoenix", "gone", "gonedown"], () => mark);
  assertServed(t, pod);
  await assertTunnelled(t, pod);
});

test.serial("pod opt-out label applies live", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("client");
  const cookie = servedCookie(pod);
  const node = c.agent(CLIENT_NODE);

  let mark = node.lines.length;
  pod.labels = { "istio.io/dataplane-mode": "none" };
  writePods(c);
  await waitUnenrolled(pod, mark);
  assertNotServed(t, CLIENT_NODE, uidOf(pod), cookie, pod.ip, `/var/run/netns/${pod.netns}`);
  await assertNotCaptured(t, pod);

  mark = node.lines.length;
  pod.labels = {};
  writePods(c);
  await c.waitEnrolled(["client"], () => mark);
  assertServed(t, pod);
  await assertTunnelled(t, pod);
});

test.serial("pod IP change in its namespace is followed", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("mover");
  const cookie = servedCookie(pod);
  const oldIp = pod.ip;
  const node = c.agent(CLIENT_NODE);

  const mark = node.lines.length;
  readdressPod(pod, `${POD_NETWORK}.1.200`);
  writePods(c);
  await node.waitForLog((line) => line.msg === "workload re-enrolled" && line.workload === uidOf(pod) && line.ip === pod.ip, 10_000, "re-enrollment of mover", mark);

  t.is(assertServed(t, pod), cookie, "the namespace's cookie changed");
  if (NFTABLES_CAPTURE) {
    t.false(nftStatePods(CLIENT_NODE).some((entry) => entry.podIp === oldIp), `the old IP ${oldIp} is still listed`);
    t.false((nftCaptureTable(`/var/run/netns/${pod.netns}`) ?? "").includes(`${oldIp} `), `the table still names the old IP ${oldIp}`);
  } else {
    const entries = captureList(CLIENT_NODE);
    t.false(entries.inboundPods.some((entry) => entry.podIp === oldIp), `the old IP ${oldIp} is still guarded`);
    t.false(entries.inboundListeners.some((key) => key.startsWith(`${oldIp}:`)), `the old IP ${oldIp} still has a listener entry`);
  }
  await assertTunnelled(t, pod);
  await assertInboundCaptured(t, pod);
});

test.serial("pod recreated with a new IP and namespace is followed", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("phoenix");
  const oldCookie = servedCookie(pod);
  const oldIp = pod.ip;
  const node = c.agent(CLIENT_NODE);

  // Hold the old namespace open, so its listeners can be checked after its name is gone.
  const oldNetnsFd = fs.openSync(`/var/run/netns/${pod.netns}`, "r");
  try {
    const mark = node.lines.length;
    run("ip", ["netns", "del", pod.netns]);
    recreatePodNetns(pod, "2", `${POD_NETWORK}.1.201`);
    writePods(c);
    await c.waitEnrolled(["phoenix"], () => mark);

    const newCookie = assertServed(t, pod);
    t.not(newCookie, oldCookie, "the recreated pod is served under the old namespace's cookie");
    assertCaptureReleased(t, CLIENT_NODE, uidOf(pod), oldCookie, oldIp, `/proc/${process.pid}/fd/${oldNetnsFd}`);
    t.deepEqual(agentListeners(`/proc/${process.pid}/fd/${oldNetnsFd}`), [], "the agent still listens in the old namespace");
  } finally {
    fs.closeSync(oldNetnsFd);
  }
  await assertTunnelled(t, pod);
});

test.serial("pod deleted while the agent runs leaves nothing", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("gone");
  const cookie = servedCookie(pod);
  const node = c.agent(CLIENT_NODE);

  const netnsFd = fs.openSync(`/var/run/netns/${pod.netns}`, "r");
  try {
    const mark = node.lines.length;
    deletePod(pod);
    writePods(c);
    await waitUnenrolled(pod, mark);
    assertNotServed(t, CLIENT_NODE, uidOf(pod), cookie, pod.ip, `/proc/${process.pid}/fd/${netnsFd}`);
  } finally {
    fs.closeSync(netnsFd);
  }
});

test.serial("node bridge keeps its MAC", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("client");
  const nodeNetns = c.topology.node(CLIENT_NODE).netns;
  const gatewayMac = linkMac(nodeNetns, "br0");

  // A pod whose bridge-side veth has the lowest possible MAC joins and leaves the client's node.
  // A bridge that takes its MAC from its ports would take that veth's MAC while it is there. The
  // client, made to learn the gateway's MAC again meanwhile, would then send its tunnel's packets
  // to a MAC that nothing on the bridge owns once the veth is gone.
  const netns = `${PREFIX}-lowmac`;
  run("ip", ["netns", "add", netns]);
  try {
    run("ip", ["link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", LOW_MAC_VETH, "netns", nodeNetns]);
    c.topology.exec(nodeNetns, "ip", ["link", "set", LOW_MAC_VETH, "address", LOWEST_MAC]);
    c.topology.exec(nodeNetns, "ip", ["link", "set", LOW_MAC_VETH, "master", "br0"]);
    c.topology.exec(nodeNetns, "ip", ["link", "set", LOW_MAC_VETH, "up"]);
    t.is(linkMac(nodeNetns, "br0"), gatewayMac, "the bridge took the MAC of a pod that joined");
    c.topology.exec(pod.netns, "ip", ["neigh", "flush", "dev", "eth0"]);
    await assertTunnelled(t, pod);
  } finally {
    run("ip", ["netns", "del", netns]);
  }

  await waitLinkGone(nodeNetns, LOW_MAC_VETH);
  t.is(linkMac(nodeNetns, "br0"), gatewayMac, "the bridge changed MAC when a pod left");
  await assertTunnelled(t, pod);
});

test.serial("pod deleted while the agent is down is removed at start", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("gonedown");
  const cookie = servedCookie(pod);

  await c.agent(CLIENT_NODE).kill();
  // The capture outlives the agent, so the pod stays closed while nothing serves it.
  t.true(captureHolds(CLIENT_NODE, cookie), "the killed agent's capture vanished with it");
  if (NFTABLES_CAPTURE) t.not(nftCaptureTable(`/var/run/netns/${pod.netns}`), undefined, "the killed agent's table vanished with it");
  deletePod(pod);
  writePods(c);

  const agent = await c.restartAgent(CLIENT_NODE, ["client", "mover", "phoenix"]);
  await agent.waitReady();
  assertNotServed(t, CLIENT_NODE, uidOf(pod), cookie, pod.ip);
  for (const name of ["client", "mover", "phoenix"]) assertServed(t, c.topology.pod(name));
  await assertTunnelled(t, c.topology.pod("client"));
});

/** Adds `ip` to the loopback of the outsider pod, as a process with CAP_NET_ADMIN there could, and returns a function that removes it. */
function copyIpToOutsider(ip: string): () => void {
  const c = theCluster();
  const outsider = c.topology.pod("outsider");
  c.topology.exec(outsider.netns, "ip", ["addr", "add", `${ip}/32`, "dev", "lo"]);
  return () => c.topology.exec(outsider.netns, "ip", ["addr", "del", `${ip}/32`, "dev", "lo"], { allowFail: true });
}

test.serial("copied pod IP cannot strip capture at restart", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("mover");
  const cookie = servedCookie(pod);
  await c.agent(CLIENT_NODE).kill();
  const removeCopy = copyIpToOutsider(pod.ip);
  try {
    // Two namespaces have mover's IP now. The one the killed agent enrolled is mover's.
    const agent = await c.restartAgent(CLIENT_NODE, ["client", "mover", "phoenix"]);
    await agent.waitReady();
    t.is(servedCookie(pod), cookie, "the restarted agent enrolled another namespace for mover");
    assertServed(t, pod);
    t.false(agent.lines.some((line) => line.msg === "removed stale outbound capture entry"), "the restart removed capture entries");
  } finally {
    removeCopy();
  }
});

test.serial("new pod with a copied IP stays isolated", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("mover");
  let agent = c.agent(CLIENT_NODE);
  const cookie = servedCookie(pod);
  const outsiderCookie = netnsCookie(`/var/run/netns/${c.topology.pod("outsider").netns}`).toString();
  const assertBothIsolated = (when: string): void => {
    t.true(captureHolds(CLIENT_NODE, cookie), `${when}: mover's namespace is not captured while its IP is ambiguous`);
    t.true(captureHolds(CLIENT_NODE, outsiderCookie), `${when}: the namespace with the copy is not captured`);
    const dump = configDump(CLIENT_NODE);
    t.false(dump.enrolled.some((entry) => entry.workload === uidOf(pod)), `${when}: mover was enrolled while two namespaces had its IP`);
    const listed = dump.ambiguous.filter((entry) => entry.workload === uidOf(pod)).map((entry) => entry.cookie);
    t.deepEqual(listed.sort(), [cookie, outsiderCookie].sort(), `${when}: agentctl config does not list both isolated namespaces`);
  };

  // mover leaves the mesh, another namespace takes a copy of its IP, and mover joins again.
  let mark = agent.lines.length;
  pod.labels = { "istio.io/dataplane-mode": "none" };
  writePods(c);
  await waitUnenrolled(pod, mark);
  const removeCopy = copyIpToOutsider(pod.ip);
  try {
    // The agent caches a namespace's addresses for ADDRESS_CACHE_TTL_MS, so wait until it must see the copy when mover joins.
    await new Promise((resolve) => setTimeout(resolve, ADDRESS_CACHE_TTL_MS + 500));
    mark = agent.lines.length;
    pod.labels = {};
    writePods(c);
    await agent.waitForLog((line) => /all of them are isolated/.test(String(line.msg)), 10_000, "isolation of both namespaces", mark);
    // Neither namespace runs outside the mesh: both are captured with no listener.
    assertBothIsolated("while the agent runs");

    // A restart meanwhile must not take either namespace for mover's: isolating them recorded neither.
    await agent.kill();
    agent = await c.restartAgent(CLIENT_NODE, ["client", "phoenix"]);
    await agent.waitReady();
    await agent.waitForLog((line) => /all of them are isolated/.test(String(line.msg)), 10_000, "isolation of both namespaces after the restart");
    assertBothIsolated("after a restart");
  } finally {
    mark = agent.lines.length;
    removeCopy();
  }
  // Once mover alone has the IP it is enrolled, and the other namespace is released.
  await agent.waitEnrolled(uidOf(pod), 15_000, mark);
  t.is(servedCookie(pod), cookie);
  t.false(captureHolds(CLIENT_NODE, outsiderCookie), "the namespace with the copy stayed captured");
  await assertTunnelled(t, c.topology.pod("client"));
});

test.serial("copy in another enrolled pod strips nothing", async (t) => {
  const c = theCluster();
  const pod = c.topology.pod("mover");
  const holder = c.topology.pod("phoenix");
  const cookies = { pod: servedCookie(pod), holder: servedCookie(holder) };
  // phoenix, an enrolled pod, adds mover's IP; the agent restarts while the copy is there.
  c.topology.exec(holder.netns, "ip", ["addr", "add", `${pod.ip}/32`, "dev", "lo"]);
  let agent = c.agent(CLIENT_NODE);
  try {
    await agent.kill();
    agent = await c.restartAgent(CLIENT_NODE, ["client", "mover", "phoenix"]);
    await agent.waitReady();
    t.is(servedCookie(pod), cookies.pod, "mover was enrolled in another namespace");
    t.is(servedCookie(holder), cookies.holder);
  } finally {
    c.topology.exec(holder.netns, "ip", ["addr", "del", `${pod.ip}/32`, "dev", "lo"], { allowFail: true });
  }
  // Both stay captured once the copy is gone: nothing was released on mover's account.
  await new Promise((resolve) => setTimeout(resolve, 1_500));
  assertServed(t, pod);
  assertServed(t, holder);
  await assertTunnelled(t, holder);
});
