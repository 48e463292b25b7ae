// End to end on the real kernel: an agent replaced with --replace under steady load. Two nodes run
// one real agent each, and pods have an IPv4 and an IPv6 address. A client pod on the first node
// opens short HTTP connections to a server pod on the second, over IPv4 and over IPv6 at once,
// while the second node's agent and then the first node's are replaced. Every connection must
// succeed, be audited with mTLS, and cross the node link only as HBONE.

import test from "ava";
import { execFileSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { AgentProcess, testPrefixFamily } from "../harness/agent-process";
import { curl, PacketCapture } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import type { NamespaceSpec } from "../harness/manifests";
import { registerPid } from "../harness/pid-registry";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aarst");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const MARKER = "restart-marker-51c2e08d";
const DRAIN_TIMEOUT_S = 2;
/** Bounds of the load: it stops at whichever comes first. */
const LOAD_MAX_SECONDS = 40;
const LOAD_MAX_CONNECTIONS = 800;

const NODES: NodeSpec[] = [
  { name: "rst1", pods: [{ name: "client", namespace: "front", serviceAccount: "client" }] },
  { name: "rst2", pods: [{ name: "server", namespace: "back", serviceAccount: "server" }] },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "front", ambient: true },
  { name: "back", ambient: true },
];

// Two threads each open one connection at a time: connect, GET, read, close, pause 50 ms. Prints
// "ok <local port>" or "fail <local port> <error>" per connection, and stops when the stop file
// appears, after argv[3] seconds, or after argv[4] connections.
const LOAD_CLIENT = `
import http.client, os, sys, threading, time
host, port, seconds, limit, stop_file, marker = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6].encode()
end = time.time() + seconds
lock = threading.Lock()
count = [0]
def report(line):
    with lock:
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()
def worker():
    while time.time() < end and not os.path.exists(stop_file):
        with lock:
            if count[0] >= limit:
                return
            count[0] += 1
        connection = http.client.HTTPConnection(host, port, timeout=10)
        local_port = 0
        try:
            connection.connect()
            local_port = connection.sock.getsockname()[1]
            connection.request("GET", "/marker.html")
            response = connection.getresponse()
            body = response.read()
            if response.status == 200 and marker in body:
                report("ok %d" % local_port)
            else:
                report("fail %d status=%d" % (local_port, response.status))
        except Exception as error:
            report("fail %d %r" % (local_port, error))
        finally:
            connection.close()
        time.sleep(0.05)
threads = [threading.Thread(target=worker) for _ in range(2)]
for thread in threads: thread.start()
for thread in threads: thread.join()
report("done")
`;

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function serverUrl(): string {
  return `http://${theCluster().topology.pod("server").ip}:8080/marker.html`;
}

function serverIp6(): string {
  const ip6 = theCluster().topology.pod("server").ip6;
  if (ip6 === undefined) throw new Error("the server pod has no IPv6 address; the cluster must be dual-stack");
  return ip6;
}

/** Starts python3's HTTP server on [::]:port, which serves IPv4 and IPv6, and waits until it listens. */
async function startDualStackHttpServer(c: Cluster, pod: string, root: string, port: number): Promise<void> {
  const netns = c.topology.pod(pod).netns;
  const server = c.topology.spawn(netns, "python3", ["-m", "http.server", String(port), "--bind", "::", "--directory", root], {
    stdio: ["ignore", "ignore", "ignore"],
  });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (c.topology.exec(netns, "ss", ["-Hltn", `sport = :${port}`], { allowFail: true }).trim() !== "") return;
    if (server.exitCode !== null) throw new Error(`HTTP server in ${pod} exited with code ${server.exitCode}`);
    await sleep(100);
  }
  throw new Error(`HTTP server in ${pod} did not listen on [::]:${port} within 10 s`);
}

/** Starts an agent with --replace for `node`, next to the one that runs, and makes it the node's agent. */
function spawnReplacement(node: string): AgentProcess {
  const c = theCluster();
  const previous = c.agent(node);
  const replacement = new AgentProcess({ ...previous.options, extraArgs: [...(previous.options.extraArgs ?? []), "--replace"] });
  registerPid(PREFIX, replacement.pid);
  c.agents.set(node, replacement);
  return replacement;
}

/** Replaces the agent of `node` and waits until the old one has exited and the new one is ready. */
async function replaceAgent(node: string): Promise<{ old: AgentProcess; replacement: AgentProcess }> {
  const old = theCluster().agent(node);
  const replacement = spawnReplacement(node);
  await replacement.waitReady(40_000);
  await old.waitExit(5_000);
  return { old, replacement };
}

interface LoadResult {
  ok: number[];
  failures: string[];
  /** What the load client wrote to stderr. */
  errors: string;
}

/** Runs the load client in the client pod against `host` until `stopFile` appears; resolves with its results. */
function runLoad(host: string, stopFile: string): { child: ChildProcess; done: Promise<LoadResult> } {
  const c = theCluster();
  const args = ["-c", LOAD_CLIENT, host, "8080", String(LOAD_MAX_SECONDS), String(LOAD_MAX_CONNECTIONS), stopFile, MARKER];
  const child = c.topology.spawn(c.topology.pod("client").netns, "python3", args);
  let output = "";
  let errors = "";
  child.stdout!.on("data", (chunk: Buffer) => (output += chunk.toString()));
  child.stderr!.on("data", (chunk: Buffer) => (errors += chunk.toString()));
  const done = new Promise<LoadResult>((resolve) => {
    child.once("exit", () => {
      const lines = output.split("\n").filter((line) => line.trim() !== "");
      resolve({
        ok: lines.filter((line) => line.startsWith("ok ")).map((line) => Number(line.split(" ")[1])),
        failures: lines.filter((line) => line.startsWith("fail ")),
        errors,
      });
    });
  });
  return { child, done };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: NAMESPACES,
    agentArgs: ["--drain-timeout", String(DRAIN_TIMEOUT_S)],
    dualStack: true,
  });
  const site = path.join(cluster.workDir, "site");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "marker.html"), `${MARKER}\n`);
  await startDualStackHttpServer(cluster, "server", site, 8080);
  await cluster.startAgents(["client", "server"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("replacing both agents under load fails no connection", async (t) => {
  const c = theCluster();
  const pcap = path.join(c.workDir, "node-link.pcap");
  const wire = await PacketCapture.start(c.topology, c.topology.node("rst1").netns, "n-link", pcap);
  const stopFile = path.join(c.workDir, "stop-load");
  const load4 = runLoad(c.topology.pod("server").ip, stopFile);
  const load6 = runLoad(serverIp6(), stopFile);

  let result4: LoadResult;
  let result6: LoadResult;
  try {
    await sleep(2_000);
    const second = await replaceAgent("rst2");
    await sleep(2_000);
    const first = await replaceAgent("rst1");
    await sleep(2_000);
    t.deepEqual(second.old.exit, { code: 0, signal: null }, `the replaced agent of rst2 did not exit cleanly:\n${second.old.tail()}`);
    t.deepEqual(first.old.exit, { code: 0, signal: null }, `the replaced agent of rst1 did not exit cleanly:\n${first.old.tail()}`);
    t.truthy(second.replacement.lines.find((line) => line.msg === "agent ready" && typeof line.replaced === "number"), "the new agent of rst2 did not log whom it replaced");
  } finally {
    fs.writeFileSync(stopFile, "");
    result4 = await load4.done;
    result6 = await load6.done;
    await wire.stop();
  }

  for (const [family, result] of [["IPv4", result4], ["IPv6", result6]] as const) {
    t.log(`${family}: ${result.ok.length} connections succeeded, ${result.failures.length} failed`);
    t.deepEqual(result.failures, [], `${result.failures.length} of ${result.failures.length + result.ok.length} ${family} connections failed`);
    t.true(result.ok.length >= 50, `only ${result.ok.length} ${family} connections ran during the replacements; load client stderr: ${result.errors}`);
  }

  // Every connection was audited with mTLS on both nodes, by whichever agent served it.
  await sleep(500);
  const outbound = new Map(c.auditRecords("rst1").filter((record) => record.direction === "outbound").map((record) => [record.src.addr, record]));
  const inbound = new Map(c.auditRecords("rst2").filter((record) => record.direction === "inbound").map((record) => [record.src.addr, record]));
  const clientIp = c.topology.pod("client").ip;
  const clientIp6 = c.topology.pod("client").ip6;
  const sources = [
    ["IPv4", result4, (port: number) => `${clientIp}:${port}`],
    ["IPv6", result6, (port: number) => `[${clientIp6}]:${port}`],
  ] as const;
  for (const [family, result, source] of sources) {
    for (const failure of result.failures) {
      const port = Number(failure.split(" ")[1]);
      t.log(`${family} ${failure}: outbound record ${JSON.stringify(outbound.get(source(port)))}, inbound record ${JSON.stringify(inbound.get(source(port)))}`);
    }
    const missingOutbound = result.ok.filter((port) => outbound.get(source(port))?.transport !== "hbone");
    const missingInbound = result.ok.filter((port) => inbound.get(source(port))?.transport !== "hbone");
    t.deepEqual(missingOutbound, [], `${family} connections without an HBONE outbound record on rst1`);
    t.deepEqual(missingInbound, [], `${family} connections without an HBONE inbound record on rst2`);
  }
  const inboundIdentities = new Set([...inbound.values()].map((record) => record.src.identity));
  t.deepEqual([...inboundIdentities], ["spiffe://cluster.local/ns/front/sa/client"]);

  // Nothing but HBONE crossed the node link, and no application byte in plaintext.
  const raw = fs.readFileSync(pcap);
  t.false(raw.includes(Buffer.from(MARKER)), "application bytes crossed the node link in plaintext");
  const ports = execFileSync("tshark", ["-r", pcap, "-T", "fields", "-e", "tcp.dstport", "-e", "tcp.srcport"], { encoding: "utf8" })
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => line.split("\t").map(Number));
  t.true(ports.length > 0, "no packet crossed the node link");
  t.true(ports.every(([dst, src]) => dst === 15008 || src === 15008), `traffic on ports other than 15008: ${JSON.stringify(ports.filter(([dst, src]) => dst !== 15008 && src !== 15008).slice(0, 5))}`);
});

test.serial("replace with no running agent starts normally", async (t) => {
  const c = theCluster();
  await c.agent("rst2").stop();
  const replacement = spawnReplacement("rst2");
  await replacement.waitReady(20_000);
  await c.waitEnrolled(["server"]);
  t.truthy(replacement.lines.find((line) => line.msg === "no running agent to replace: starting normally"));
  const result = await curl(c.topology, "client", serverUrl());
  t.is(result.exitCode, 0, result.stderr);
});

test.serial("replace fails when the running agent is silent", async (t) => {
  const c = theCluster();
  const running = c.agent("rst2");
  // A stopped process keeps its hand-over socket, whose connections the kernel still accepts, but never replies.
  running.signal("SIGSTOP");
  let attempt: AgentProcess | undefined;
  try {
    attempt = new AgentProcess({ ...running.options, extraArgs: [...(running.options.extraArgs ?? []), "--replace"] });
    registerPid(PREFIX, attempt.pid);
    const exit = await attempt.waitExit(20_000);
    t.is(exit.code, 1);
    t.truthy(
      attempt.lines.find((line) => /did not reply to the prepare request on .* within 5 s; it keeps serving the node/.test(String(line.msg))),
      `no clear error in the log:\n${attempt.tail()}`,
    );
  } finally {
    running.signal("SIGCONT");
    if (attempt?.running) await attempt.kill();
  }
  t.true(running.running, "the running agent stopped");
  const result = await curl(c.topology, "client", serverUrl());
  t.is(result.exitCode, 0, `the running agent no longer serves after the failed replacement: ${result.stderr}`);
});
