// `make demo`: two nodes, five pods, one agent per node. Clients on node1 call an HTTP server on
// node2: one allowed by an AuthorizationPolicy, one denied, one through a Service VIP, and one from
// a namespace outside the mesh, which reaches a pod without policies in plaintext but not the
// policed one.
// Prints who reached whom and how, node2's agent explaining the two denials (agentctl authz check),
// what node2's agent serves (agentctl status, workloads, connections and its Istio metrics), then
// the audit records (queried and verified with agentctl), and removes everything it made. With
// --keep it leaves the nodes and agents running until Ctrl-C, for trying agentctl by hand.

import { execFileSync, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { curl, startHttpServer, type CurlResult } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { serviceYaml } from "../harness/manifests";
import { PIN_PARENT } from "../harness/cluster";
import { SCENARIO_ENROLLED, SCENARIO_NAMESPACES, SCENARIO_NODES, SCENARIO_POLICIES } from "../harness/scenario";

const PREFIX = "aademo";
const WORK_DIR = "/tmp/ambient-agent-demo";
const PID_FILE = path.join(WORK_DIR, "agents.pid");
/** A Service in front of the db pod: port 80 of this VIP goes to the pod's port 8080. */
const DB_SERVICE = { name: "db", namespace: "backend", vip: "10.96.0.10", selector: { app: "db" }, ports: [{ port: 80, targetPort: 8080 }] };
const KEEP = process.argv.includes("--keep");

interface Call {
  from: string;
  fromIp: string;
  to: string;
  toIp: string;
  result: CurlResult;
}

/** Records the PID of a process the demo started, so a run after a crash can end it. */
function rememberPid(pid: number | undefined): void {
  if (pid) fs.appendFileSync(PID_FILE, `${pid}\n`);
}

/** Ends the agents and servers that a crashed demo left, recognised by the PID file and their command line. */
function endLeftoverProcesses(): void {
  if (!fs.existsSync(PID_FILE)) return;
  for (const pid of fs.readFileSync(PID_FILE, "utf8").split(/\s+/).filter(Boolean).map(Number)) {
    try {
      const commandLine = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8");
      if (commandLine.includes(PREFIX) || commandLine.includes(WORK_DIR)) process.kill(pid, "SIGKILL");
    } catch {
      // The process is gone already.
    }
  }
  fs.rmSync(PID_FILE, { force: true });
}

// A denial resets the connection. When the reset arrives before curl has registered the connect,
// curl reports exit 7 ("couldn't connect") rather than 56.
const CURL_FAILURES: Record<number, string> = {
  7: "connection reset or refused",
  28: "timed out",
  52: "empty reply",
  56: "connection reset",
};

/** Builds one row of the summary: the call's outcome, its path, and the decision. */
function describe(call: Call, records: Record<string, any>[]): string[] {
  const { exitCode, status } = call.result;
  const outcome = exitCode === 0 ? `HTTP ${status}` : (CURL_FAILURES[exitCode] ?? `curl exit ${exitCode}`);
  const record = records.find(
    (entry) => String(entry.src?.addr).startsWith(call.fromIp + ":") && String(entry.dst?.addr).startsWith(call.toIp + ":"),
  );
  let path = "plaintext, not captured";
  if (record) path = record.transport === "hbone" ? "mTLS (HBONE)" : "plaintext, captured inbound";
  const decision = record ? `${record.decision}: ${record.policy ?? record.reason}` : "none: outside the mesh";
  return [call.from, call.to, outcome, path, decision];
}

/** Prints rows as a table with aligned columns. */
function printTable(rows: string[][]): void {
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => row[column].length)));
  for (const row of rows) console.log("  " + row.map((cell, column) => cell.padEnd(widths[column])).join("   ").trimEnd());
}

async function main(): Promise<void> {
  assertHostCapable();
  endLeftoverProcesses();
  removeLeftovers(PREFIX);
  fs.rmSync(WORK_DIR, { recursive: true, force: true });
  fs.mkdirSync(WORK_DIR, { recursive: true });

  console.log("Building two nodes and five pods as network namespaces...");
  const cluster = Cluster.create({
    prefix: PREFIX,
    workDir: WORK_DIR,
    nodes: SCENARIO_NODES,
    namespaces: SCENARIO_NAMESPACES,
    extraManifests: { "policies.yaml": SCENARIO_POLICIES, "services.yaml": serviceYaml(DB_SERVICE) },
  });

  // One teardown, shared by the signal handler and the normal end, so neither exits while the other runs.
  let teardown: Promise<void> | undefined;
  const tearDown = (): Promise<void> => {
    teardown ??= cluster.destroy().then(() => fs.rmSync(PID_FILE, { force: true }));
    return teardown;
  };
  // With --keep, Ctrl-C is the way to end the demo, so it exits 0 once everything is removed.
  const onSignal = (): void => {
    console.log(KEEP ? "\nTearing down: agents, pinned eBPF programs, namespaces..." : "\nInterrupted: tearing down...");
    void tearDown().then(() => {
      if (KEEP) console.log(`Done. Logs and audit files stay in ${WORK_DIR}.`);
      process.exit(KEEP ? 0 : 130);
    });
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);

  try {
    const site = path.join(WORK_DIR, "site");
    fs.mkdirSync(site, { recursive: true });
    fs.writeFileSync(path.join(site, "index.html"), "hello from the api pod\n");
    rememberPid((await startHttpServer(cluster.topology, "api", site, 8080)).pid);
    rememberPid((await startHttpServer(cluster.topology, "db", site, 8080)).pid);

    console.log("Starting one agent per node...");
    await cluster.startAgents(SCENARIO_ENROLLED, (pids) => pids.forEach(rememberPid));

    const calls: Call[] = [];
    for (const [client, server] of [["web", "api"], ["scraper", "api"], ["legacy", "api"], ["legacy", "db"]]) {
      const from = cluster.topology.pod(client);
      const to = cluster.topology.pod(server);
      const result = await curl(cluster.topology, client, `http://${to.ip}:8080/`, 5);
      calls.push({ from: `${from.namespace}/${from.name} ${from.ip}`, fromIp: from.ip, to: `${to.namespace}/${to.name} ${to.ip}:8080`, toIp: to.ip, result });
    }
    // Through the Service VIP: the outbound agent picks the db pod and tunnels to its port 8080.
    const web = cluster.topology.pod("web");
    const viaService = await curl(cluster.topology, "web", `http://${DB_SERVICE.vip}:80/`, 5);
    calls.push({
      from: `${web.namespace}/${web.name} ${web.ip}`,
      fromIp: web.ip,
      to: `Service ${DB_SERVICE.namespace}/${DB_SERVICE.name} ${DB_SERVICE.vip}:80`,
      toIp: cluster.topology.pod("db").ip,
      result: viaService,
    });
    await new Promise((resolve) => setTimeout(resolve, 500));

    const outbound = cluster.auditRecords("node1");
    const inbound = cluster.auditRecords("node2");
    console.log("\nWho reached whom (curl on node1 to HTTP servers on node2):\n");
    const rows = [["FROM", "TO", "RESULT", "PATH", "DECISION"]];
    for (const call of calls) rows.push(describe(call, [...inbound, ...outbound]));
    printTable(rows);
    console.log("\nWhy, as node2's agent explains it (agentctl authz check, run in node2's network namespace):\n");
    for (const [from, to] of [["shop/scraper", "backend/api:8080"], ["legacy/legacy", "backend/api:8080"]]) {
      console.log(`$ agentctl authz check --from ${from} --to ${to}`);
      console.log(agentctlOnNode(cluster, "node2", ["authz", "check", "--from", from, "--to", to]).replace(/^/gm, "  "));
    }
    await showNode(cluster);
    for (const node of ["node1", "node2"]) {
      const file = cluster.auditFile(node);
      console.log(`\nAudit records on ${node} so far:\n\n$ agentctl audit query --file ${file}`);
      console.log(agentctl(["audit", "query", "--file", file]).replace(/^/gm, "  "));
    }
    const file = cluster.auditFile("node2");
    console.log(`\nOne of them in full, and the check of node2's hash chain:\n\n$ agentctl audit query --file ${file} --decision deny --limit 1 -o json`);
    console.log(agentctl(["audit", "query", "--file", file, "--decision", "deny", "--limit", "1", "-o", "json"]).replace(/^/gm, "  "));
    console.log(`$ agentctl audit verify ${file}`);
    console.log(agentctl(["audit", "verify", file]).replace(/^/gm, "  "));
    if (KEEP) await keepRunning(cluster);
  } finally {
    console.log("\nTearing down: agents, pinned eBPF programs, namespaces...");
    await tearDown();
    const left = fs.existsSync(PIN_PARENT) ? fs.readdirSync(PIN_PARENT).filter((name) => name.startsWith(PREFIX)) : [];
    console.log(left.length === 0 ? `Done. Logs and audit files stay in ${WORK_DIR}.` : `Left behind under ${PIN_PARENT}: ${left.join(", ")}`);
  }
}

/**
 * Shows what node2's agent serves: its status, its workloads, a connection from web held open
 * (an HTTP request whose headers never end), and the Istio metrics of the calls made so far.
 */
async function showNode(cluster: Cluster): Promise<void> {
  console.log("\nWhat node2's agent serves (agentctl, run in node2's network namespace):\n");
  for (const args of [["status"], ["workloads", "--local"]]) {
    console.log(`$ agentctl ${args.join(" ")}`);
    console.log(agentctlOnNode(cluster, "node2", args).replace(/^/gm, "  "));
  }
  const api = cluster.topology.pod("api");
  const held = spawn("ip", ["netns", "exec", cluster.topology.pod("web").netns, "socat", "-", `TCP:${api.ip}:8080`], { stdio: ["pipe", "ignore", "ignore"] });
  rememberPid(held.pid);
  try {
    held.stdin.write("GET / HTTP/1.1\r\nHost: api\r\n");
    await waitFor(() => agentctlOnNode(cluster, "node2", ["connections", "-o", "json"]).includes(api.ip), 5_000);
    console.log("$ agentctl connections   # web holds one connection open to api");
    console.log(agentctlOnNode(cluster, "node2", ["connections"]).replace(/^/gm, "  "));
  } finally {
    held.kill("SIGKILL");
  }
  const netns = cluster.topology.node("node2").netns;
  const metrics = spawnSync("ip", ["netns", "exec", netns, "curl", "-s", "http://127.0.0.1:15020/metrics"], { encoding: "utf8", timeout: 10_000 }).stdout ?? "";
  console.log("\n$ curl -s 127.0.0.1:15020/metrics | grep -E '^istio_tcp_connections_(opened|failed)_total'   # labels shortened here");
  for (const line of metrics.split("\n").filter((text) => /^istio_tcp_connections_(opened|failed)_total/.test(text))) console.log("  " + shortenMetric(line));
}

/** Keeps only the labels that tell a metric line apart in the demo: reporter, source, destination and flags. */
function shortenMetric(line: string): string {
  const match = /^(\w+)\{(.*)\} (.+)$/.exec(line);
  if (!match) return line;
  const keep = ["reporter", "source_workload", "destination_workload", "connection_security_policy", "response_flags"];
  const labels = [...match[2].matchAll(/(\w+)="([^"]*)"/g)].filter(([, name]) => keep.includes(name)).map(([, name, value]) => `${name}="${value}"`);
  return `${match[1]}{${labels.join(",")}} ${match[3]}`;
}

/** Polls `check` every 100 ms until it returns true or `timeoutMs` passes. */
async function waitFor(check: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
}

/** Leaves the nodes and agents running and prints how to reach them, until SIGINT or SIGTERM tears them down. */
async function keepRunning(cluster: Cluster): Promise<void> {
  const agentctlPath = path.resolve(__dirname, "..", "..", "agent", "cli", "agentctl.js");
  console.log("\nThe nodes and agents keep running. Each agent serves its admin API on 127.0.0.1:15000 of its node's network namespace:\n");
  for (const node of ["node1", "node2"]) {
    const netns = cluster.topology.node(node).netns;
    console.log(`  nsenter --net=/var/run/netns/${netns} -- node ${agentctlPath} status`);
  }
  const web = cluster.topology.pod("web");
  console.log(`  ip netns exec ${cluster.topology.node("node2").netns} curl -s 127.0.0.1:15020/metrics`);
  console.log(`  ip netns exec ${web.netns} curl -s http://${cluster.topology.pod("api").ip}:8080/   # a call from web to api`);
  console.log("\nPress Ctrl-C to tear everything down.");
  // The signal handler tears down and exits; the timer keeps the process alive until then.
  setInterval(() => undefined, 60_000);
  await new Promise(() => undefined);
}

/** Runs the built agentctl here, as a 150-column terminal would, and returns its output. */
function agentctl(args: string[]): string {
  const agentctlPath = path.join(__dirname, "..", "..", "agent", "cli", "agentctl.js");
  return execFileSync(process.execPath, [agentctlPath, ...args], { encoding: "utf8", env: { ...process.env, COLUMNS: "150" } }).trimEnd();
}

/** Runs the built agentctl in a node's network namespace, where that node's agent serves its admin API on 127.0.0.1:15000. */
function agentctlOnNode(cluster: Cluster, node: string, args: string[]): string {
  const agentctl = path.join(__dirname, "..", "..", "agent", "cli", "agentctl.js");
  const netns = cluster.topology.node(node).netns;
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", process.execPath, agentctl, ...args], { encoding: "utf8", timeout: 20_000 });
  return result.status === 0 ? result.stdout.trimEnd() : `agentctl failed: ${result.stderr.trim()}`;
}

main().catch((error: Error) => {
  console.error(`demo failed: ${error.message}`);
  process.exit(1);
});
