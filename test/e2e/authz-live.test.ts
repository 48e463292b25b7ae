// End to end on the real kernel: open connections are authorized again when the configuration
// changes. Two client pods on one node keep a line-echo connection open to a server pod on the
// other node. A new AuthorizationPolicy, or a label change that brings the server under a selector
// policy, must close the connection it no longer allows and leave the other one flowing, also while
// the agent drains before it exits.

import test from "ava";
import type { ChildProcess } from "node:child_process";
import readline from "node:readline";
import { testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { podsYaml, writeManifest } from "../harness/manifests";
import type { NodeSpec, Topology } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aalive");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aalive-n1";
const SERVER_NODE = "aalive-n2";
const ECHO_PORT = 9000;
/** How long a closed connection may take to end at the client after the manifest change. */
const CLOSE_DEADLINE_MS = 10_000;

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "a", namespace: "shop", serviceAccount: "a" },
      { name: "b", namespace: "shop", serviceAccount: "b" },
    ],
  },
  { name: SERVER_NODE, pods: [{ name: "server", namespace: "backend", serviceAccount: "server" }] },
];

const DENY_A_POLICY = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-a
  namespace: backend
spec:
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/a"]
`;

const DENY_B_POLICY = DENY_A_POLICY.replace("deny-a", "deny-b").replace("sa/a", "sa/b");

const ALLOW_B_GUARDED_POLICY = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-b-guarded
  namespace: backend
spec:
  selector:
    matchLabels:
      tier: guarded
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/b"]
`;

/** A threaded line-echo server on ECHO_PORT. */
const ECHO_SERVER = `
import socketserver
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server(("0.0.0.0", ${ECHO_PORT}), Echo).serve_forever()
`;

/**
 * Returns the Python source of a client that sends a line, reads its echo and sleeps 100 ms, for
 * at most 1200 lines (about 2 minutes). It prints "ok N" per echo and one final line: "error
 * CODE", "eof" or "done".
 */
function lineClientScript(host: string): string {
  return `
import errno, socket, sys, time
connection = socket.create_connection(("${host}", ${ECHO_PORT}), timeout=5)
reader = connection.makefile("rb")
for i in range(1200):
    try:
        connection.sendall(b"line %d\\n" % i)
        reply = reader.readline()
    except socket.timeout:
        print("error timeout", flush=True)
        sys.exit(1)
    except OSError as error:
        print("error", errno.errorcode.get(error.errno, str(error)), flush=True)
        sys.exit(1)
    if not reply:
        print("eof", flush=True)
        sys.exit(2)
    print("ok", i, flush=True)
    time.sleep(0.1)
print("done", flush=True)
`;
}

/** A running line client: how many echoes it read and how it ended. */
class LineClient {
  echoes = 0;
  /** The client's final line ("error ECONNRESET", "eof", ...), once it ended. */
  end: string | undefined;
  readonly ended: Promise<string>;

  constructor(readonly pod: string, private readonly child: ChildProcess) {
    let finish = (_line: string): void => undefined;
    this.ended = new Promise((resolve) => (finish = resolve));
    const lines = readline.createInterface({ input: child.stdout! });
    lines.on("line", (line) => {
      if (line.startsWith("ok ")) this.echoes += 1;
      else this.end ??= line;
    });
    child.once("exit", (code) => {
      this.end ??= `exit ${code}`;
      finish(this.end);
    });
  }

  /** Waits until the client has read `count` more echoes; fails after 5 s. */
  async waitForEchoes(count: number): Promise<void> {
    const target = this.echoes + count;
    const deadline = Date.now() + 5_000;
    while (this.echoes < target) {
      if (this.end !== undefined) throw new Error(`the client in ${this.pod} ended (${this.end}) after ${this.echoes} echoes`);
      if (Date.now() > deadline) throw new Error(`the client in ${this.pod} read ${this.echoes} of ${target} echoes within 5 s`);
      await sleep(50);
    }
  }

  /** Resolves with the final line once the client ended, or with undefined after `timeoutMs`. */
  async waitForEnd(timeoutMs: number): Promise<string | undefined> {
    return Promise.race([this.ended, sleep(timeoutMs).then(() => undefined)]);
  }

  stop(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL");
  }
}

let cluster: Cluster | undefined;
const clients: LineClient[] = [];

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Starts the echo server in the server pod and waits until it listens. */
async function startEchoServer(topology: Topology): Promise<void> {
  const netns = topology.pod("server").netns;
  const server = topology.spawn(netns, "python3", ["-c", ECHO_SERVER], { stdio: ["ignore", "ignore", "ignore"] });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (topology.exec(netns, "ss", ["-Hltn", `sport = :${ECHO_PORT}`], { allowFail: true }).trim() !== "") return;
    if (server.exitCode !== null) throw new Error(`the echo server exited with code ${server.exitCode}`);
    await sleep(100);
  }
  throw new Error(`the echo server did not listen on ${ECHO_PORT} within 10 s`);
}

/** Starts a line client in `pod` towards the server pod, and waits for its first echoes. */
async function startLineClient(pod: string): Promise<LineClient> {
  const topology = theCluster().topology;
  const child = topology.spawn(topology.pod(pod).netns, "python3", ["-c", lineClientScript(topology.pod("server").ip)], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  const client = new LineClient(pod, child);
  clients.push(client);
  await client.waitForEchoes(3);
  return client;
}

/** Writes a manifest and waits until the server node's agent has applied it. */
async function applyManifest(name: string, content: string): Promise<void> {
  const c = theCluster();
  const agent = c.agent(SERVER_NODE);
  const fromLine = agent.lines.length;
  writeManifest(c.manifestsDir, name, content);
  await agent.waitForLog((line) => line.msg === "configuration updated", 10_000, `the configuration update after writing ${name}`, fromLine);
}

function isInboundFrom(serviceAccount: string, record: Record<string, any>): boolean {
  return record.direction === "inbound" && record.src.identity === `spiffe://cluster.local/ns/shop/sa/${serviceAccount}`;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "shop", ambient: true },
      { name: "backend", ambient: true },
    ],
  });
  await startEchoServer(cluster.topology);
  await cluster.startAgents(["a", "b", "server"]);
});

test.after.always(async () => {
  for (const client of clients) client.stop();
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("new DENY policy closes the open connection", async (t) => {
  const c = theCluster();
  const a = await startLineClient("a");
  const b = await startLineClient("b");
  const agent = c.agent(SERVER_NODE);
  const fromLine = agent.lines.length;

  const writtenAt = Date.now();
  writeManifest(c.manifestsDir, "live-policy.yaml", DENY_A_POLICY);
  const end = await a.waitForEnd(CLOSE_DEADLINE_MS);

  t.not(end, undefined, `a's connection was still open ${CLOSE_DEADLINE_MS / 1000} s after the DENY policy was written`);
  t.regex(end ?? "", /^(error ECONNRESET|eof)$/, `a's connection ended with "${end}", not a reset`);
  t.log(`a's connection ended ${Date.now() - writtenAt} ms after the policy was written`);
  await b.waitForEchoes(10);

  const record = await c.waitForAudit(SERVER_NODE, (candidate) => isInboundFrom("a", candidate));
  t.is(record.decision, "deny");
  t.is(record.reason, "policy_change");
  t.is(record.policy, "backend/deny-a");
  t.is(record.policy_kind, "AuthorizationPolicy");
  t.is(record.rule, 0);
  t.is(record.error?.code, "POLICY_CHANGED");
  t.regex(record.error?.message ?? "", /^closed: policy change: spiffe:\/\/cluster\.local\/ns\/shop\/sa\/a may not connect to .*backend\/deny-a/);
  t.true(record.bytes_sent >= 3 * "line 0\n".length, `the record counts ${record.bytes_sent} bytes sent`);
  t.is(record.bytes_recv, record.bytes_sent, "the echo returned as many bytes as were sent");
  const log = await agent.waitForLog((line) => typeof line.msg === "string" && line.msg.startsWith("closed 1 connections"), 5_000, "the recheck log line", fromLine);
  t.is(log.closed, 1);
  t.deepEqual(c.auditRecords(SERVER_NODE).filter((candidate) => isInboundFrom("b", candidate)), [], "b's open connection wrote a record");
  b.stop();
});

test.serial("label change brings the pod under an ALLOW policy", async (t) => {
  const c = theCluster();
  // The ALLOW policy selects pods labelled tier=guarded, which the server pod is not yet.
  await applyManifest("live-policy.yaml", ALLOW_B_GUARDED_POLICY);
  const a = await startLineClient("a");
  const b = await startLineClient("b");
  const earlier = new Set(c.auditRecords(SERVER_NODE).filter((candidate) => isInboundFrom("a", candidate)).map((candidate) => candidate.connection_id));

  c.topology.pod("server").labels = { tier: "guarded" };
  writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  const end = await a.waitForEnd(CLOSE_DEADLINE_MS);

  t.not(end, undefined, `a's connection was still open ${CLOSE_DEADLINE_MS / 1000} s after the label change`);
  t.regex(end ?? "", /^(error ECONNRESET|eof)$/, `a's connection ended with "${end}", not a reset`);
  await b.waitForEchoes(10);
  const record = await c.waitForAudit(SERVER_NODE, (candidate) => isInboundFrom("a", candidate) && !earlier.has(candidate.connection_id));
  t.is(c.auditRecords(SERVER_NODE).filter((candidate) => isInboundFrom("a", candidate)).length, earlier.size + 1);
  t.is(record.decision, "deny");
  t.is(record.reason, "policy_change");
  t.is(record.policy, undefined, "no policy decides a connection that no ALLOW policy matches");
  t.is(record.error?.code, "POLICY_CHANGED");
  t.regex(record.error?.message ?? "", /^closed: policy change: .*no ALLOW policy matches/);

  // A new connection from a is rejected at once, and b's connection still flows.
  const outcome = await startLineClient("a").then(
    () => "connected",
    (error: Error) => error.message,
  );
  t.regex(outcome, /ended/, `a new connection from a was not rejected: ${outcome}`);
  await b.waitForEchoes(5);
  b.stop();
});

test.serial("a draining agent still closes denied connections", async (t) => {
  const c = theCluster();
  // After the label change, the ALLOW policy admits b alone. A long drain keeps the agent serving b.
  const previous = c.agent(SERVER_NODE);
  previous.signal("SIGTERM");
  await previous.waitExit(15_000);
  const agent = await c.restartAgent(SERVER_NODE, ["server"], ["--drain-timeout", "30"]);
  const b = await startLineClient("b");
  const fromLine = agent.lines.length;

  agent.signal("SIGTERM");
  await agent.waitForLog((line) => typeof line.msg === "string" && line.msg.startsWith("draining"), 10_000, "the drain start", fromLine);
  writeManifest(c.manifestsDir, "live-policy.yaml", DENY_B_POLICY);
  const end = await b.waitForEnd(CLOSE_DEADLINE_MS);

  t.not(end, undefined, `b's connection was still open ${CLOSE_DEADLINE_MS / 1000} s after a DENY policy was written during the drain`);
  t.regex(end ?? "", /^(error ECONNRESET|eof)$/, `b's connection ended with "${end}", not a reset`);
  // With no connection left, the drain ends and the agent exits, its audit file flushed.
  const exit = await agent.waitExit(15_000);
  t.is(exit.code, 0);
  const records = c.auditRecords(SERVER_NODE).filter((candidate) => isInboundFrom("b", candidate) && candidate.reason === "policy_change");
  t.is(records.length, 1);
  t.is(records[0].policy, "backend/deny-b");
});
