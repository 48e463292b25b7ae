// End to end on the real kernel: an agent replaced with --replace under steady load. Two nodes run
// one real agent each, and pods have an IPv4 and an IPv6 address. A client pod on the first node
// opens short HTTP connections to a server pod on the second, over IPv4 and over IPv6 at once,
// while the second node's agent and then the first node's are replaced. Every connection must
// succeed, be audited with mTLS, and cross the node link only as HBONE.

import test, { type ExecutionContext } from "ava";
import { execFileSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { AgentProcess, NFTABLES_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { curl, PacketCapture } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { podsYaml, writeManifest, type NamespaceSpec } from "../harness/manifests";
import { nftCaptureTable } from "../harness/nft-state";
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
  if (!cluster) throw new Error("the cluster was not created. Fix the first failure above and rerun.");
  return cluster;
}

function serverUrl(): string {
  return `http://${theCluster().topology.pod("server").ip}:8080/marker.html`;
}

function serverIp6(): string {
  const ip6 = theCluster().topology.pod("server").ip6;
  if (ip6 === undefined) throw new Error("the server pod has no IPv6 address. Create the cluster as dual-stack.");
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

/** Runs the load client in the client pod against `host` until `stopFile` appears, and resolves with its results. */
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

/**
 * Makes the server pod's listeners fail: the pod leaves the mesh, a process in it binds port
 * 15006, and the pod joins again, so the agent of rst2 isolates it. With `sharePort` the process
 * sets SO_REUSEPORT, so that a replacement agent, whose listeners set it too, can bind next to it
 * while the running agent keeps failing. Resolves with the process once the agent isolated the pod.
 */
async function isolateServer(sharePort: boolean): Promise<ChildProcess> {
  const c = theCluster();
  const server = c.topology.pod("server");
  const agent = c.agent("rst2");
  let mark = agent.lines.length;
  server.labels = { "istio.io/dataplane-mode": "none" };
  writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  await agent.waitForLog((line) => line.msg === "workload unenrolled" && line.workload === "back/server", 10_000, "unenrollment of server", mark);

  const reusePort = sharePort ? "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); " : "";
  const squatter = c.topology.spawn(server.netns, "python3", [
    "-c",
    `import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ${reusePort}s.bind(('0.0.0.0',15006)); s.listen(); print('bound', flush=True); time.sleep(60)`,
  ]);
  await waitForOutput(squatter, /bound/, "the process taking port 15006");

  mark = agent.lines.length;
  server.labels = {};
  writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  await agent.waitForLog((line) => line.msg === "workload isolated until its listeners start" && line.workload === "back/server", 10_000, "isolation of server", mark);
  return squatter;
}

/**
 * Waits until a TCP socket listens on `port` in the network namespace of the process `pid`. It
 * reads /proc/<pid>/net/tcp every millisecond, because the agents' log lines arrive up to 100 ms late.
 */
async function waitForListener(pid: number, port: number, timeoutMs: number): Promise<void> {
  const listening = new RegExp(`^\\s*\\d+: [0-9A-F]{8}:${port.toString(16).toUpperCase().padStart(4, "0")} 00000000:0000 0A `, "m");
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (listening.test(fs.readFileSync(`/proc/${pid}/net/tcp`, "utf8"))) return;
    await sleep(1);
  }
  throw new Error(`nothing listened on port ${port} in the network namespace of PID ${pid} within ${timeoutMs} ms`);
}

/** Ends `child` and waits until it has exited. */
async function killAndWait(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGKILL");
  await exited;
}

/** Checks that the server pod is captured and served: its table is not in the isolated form, and the client reaches it. */
async function assertServerCaptured(t: ExecutionContext, context: string): Promise<void> {
  const c = theCluster();
  if (NFTABLES_CAPTURE) {
    const table = nftCaptureTable(`/var/run/netns/${c.topology.pod("server").netns}`) ?? "";
    t.regex(table, /redirect to :15006/, `${context}: the server pod has no capture table`);
    t.notRegex(table, /iifname != "lo" ip saddr != \S+ meta l4proto tcp reject/, `${context}: the server pod's table is still in the isolated form:\n${table}`);
  }
  const result = await curl(c.topology, "client", serverUrl(), 5);
  t.is(result.exitCode, 0, `${context}: the client did not reach the server pod: ${result.stderr}`);
}

test.serial("hand-over undoes old agent's isolation", async (t) => {
  const c = theCluster();
  const squatter = await isolateServer(true);
  const old = c.agent("rst2");
  try {
    // The old agent retries the pod every second and fails, because the replacement has bound its
    // ports. It is paused from the moment the replacement listens in the pod until the retry is
    // due, so that the retry runs after the replacement enrolled the pod and before the old agent exits.
    const replacement = spawnReplacement("rst2");
    await waitForListener(squatter.pid!, 15008, 20_000);
    old.signal("SIGSTOP");
    try {
      await sleep(1_500);
    } finally {
      old.signal("SIGCONT");
    }
    await replacement.waitReady(20_000);
    await old.waitExit(5_000);
    t.deepEqual(old.exit, { code: 0, signal: null }, `the replaced agent of rst2 did not exit cleanly:\n${old.tail()}`);
    t.truthy(replacement.lines.find((line) => line.msg === "workload enrolled" && line.workload === "back/server"), `the replacement did not enroll the server pod:\n${replacement.tail()}`);
    const prepared = old.lines.findIndex((line) => line.msg === "a replacement agent is starting its listeners next to this agent's");
    const retried = old.lines.slice(prepared).some((line) => line.workload === "back/server" && String(line.msg).startsWith("failed to start the workload's listeners"));
    // NOTE: with eBPF capture the replacement went from its 15008 listener to the hand-over in
    // about 2 ms on the test machine, so the pause can come too late, and then this run checks no
    // retry. Writing an nftables table took about 12 ms more, which leaves time for the pause.
    if (NFTABLES_CAPTURE) t.true(retried, `the old agent did not retry the pod during the hand-over, so this test checked nothing:\n${old.tail()}`);
    else if (!retried) t.log("the old agent was paused after the hand-over, so this run checked no retry");
  } finally {
    await killAndWait(squatter);
  }
  await assertServerCaptured(t, "after the hand-over");
  t.falsy(c.agent("rst2").lines.find((line) => line.msg === "workload isolated until its listeners start"), "the replacement isolated the server pod");
});

test.serial("replacement enrolls pod isolated by both", async (t) => {
  const squatter = await isolateServer(false);
  try {
    const { old, replacement } = await replaceAgent("rst2");
    t.deepEqual(old.exit, { code: 0, signal: null }, `the replaced agent of rst2 did not exit cleanly:\n${old.tail()}`);
    const mark = replacement.lines.length;
    await killAndWait(squatter);
    await replacement.waitEnrolled("back/server", 10_000, mark);
  } finally {
    await killAndWait(squatter);
  }
  await assertServerCaptured(t, "after the hand-over");
});

test.serial("restart enrolls pod isolated by both", async (t) => {
  const c = theCluster();
  const squatter = await isolateServer(false);
  await c.agent("rst2").stop();
  const agent = await c.restartAgent("rst2", []);
  await agent.waitForLog((line) => line.msg === "workload isolated until its listeners start" && line.workload === "back/server", 10_000, "isolation of server");
  const mark = agent.lines.length;
  await killAndWait(squatter);
  await agent.waitEnrolled("back/server", 10_000, mark);
  await assertServerCaptured(t, "after the restart");
});

test.serial("restart undoes old agent's isolation", async (t) => {
  const c = theCluster();
  const squatter = await isolateServer(false);
  await c.agent("rst2").stop();
  await killAndWait(squatter);
  await c.restartAgent("rst2", ["server"]);
  await assertServerCaptured(t, "after the restart");
});

/** Resolves once `child` prints a line matching `pattern`, and rejects when it exits first or after 10 s. */
function waitForOutput(child: ChildProcess, pattern: RegExp, description: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let output = "";
    const onData = (chunk: Buffer): void => {
      output += chunk.toString();
      if (pattern.test(output)) finish();
    };
    const onExit = (code: number | null): void => finish(new Error(`${description} exited with code ${code}: ${output}`));
    const timer = setTimeout(() => finish(new Error(`${description} printed nothing matching ${pattern} within 10 s: ${output}`)), 10_000);
    const finish = (error?: Error): void => {
      clearTimeout(timer);
      child.stdout?.off("data", onData);
      child.off("exit", onExit);
      if (error) reject(error);
      else resolve();
    };
    child.stdout?.on("data", onData);
    child.once("exit", onExit);
  });
}
