// L4 AuthorizationPolicy and PeerAuthentication end to end: real eBPF capture, real mutual TLS,
// curl and socat as clients. Each case writes its Istio manifests into one file that the agents
// follow, then checks what the client really got (the bytes served, or a reset) and the inbound
// audit record of the server's node (decision, reason, policy, rule).
//
// Clients run on the first node, servers on the second, so that every decision is taken by the
// second node's agent on a connection that crossed the node link.

import test, { type ExecutionContext } from "ava";
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { testPrefixFamily, type LogLine } from "../harness/agent-process";
import { curl, curlWasReset, type CurlResult } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { writeManifest, type NamespaceSpec } from "../harness/manifests";
import { listNetns, type NodeSpec, type Topology } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aaauthz");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aaauthz-n1";
const SERVER_NODE = "aaauthz-n2";
const HTTP_PORTS = [8080, 8081];
const ECHO_PORT = 9000;
/** The manifest file that contains the policies of the running case. Each case replaces it. */
const CASE_FILE = "case.yaml";
const ALTERNATE_ROOT = "mesh-root";

const ALPHA = "cluster.local/ns/clients/sa/alpha";
const BETA = "cluster.local/ns/clients/sa/beta";

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "cli-a", namespace: "clients", serviceAccount: "alpha" },
      { name: "cli-b", namespace: "clients", serviceAccount: "beta" },
      { name: "cli-o", namespace: "other", serviceAccount: "default" },
      { name: "peer", namespace: "servers", serviceAccount: "peer" },
      { name: "legacy", namespace: "legacy", serviceAccount: "default" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "srv", namespace: "servers", serviceAccount: "srv" },
      { name: "open", namespace: "open", serviceAccount: "open" },
    ],
  },
];

const NAMESPACES: NamespaceSpec[] = [
  { name: "clients", ambient: true },
  { name: "other", ambient: true },
  { name: "servers", ambient: true },
  { name: "open", ambient: true },
  { name: "legacy", ambient: false },
  { name: "istio-system", ambient: false },
  { name: ALTERNATE_ROOT, ambient: false },
];

const ENROLLED = ["cli-a", "cli-b", "cli-o", "peer", "srv", "open"];

/**
 * Serves HTTP on each port given after the root folder, from the subfolder named by the port, so
 * that the body names the port that served the request. One process runs one thread per port.
 */
const MULTI_PORT_HTTP_SERVER = `
import functools, http.server, os, sys, threading
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
for port in sys.argv[2:]:
    handler = functools.partial(Quiet, directory=os.path.join(sys.argv[1], port))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", int(port)), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Event().wait()
`;

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({ prefix: PREFIX, nodes: NODES, namespaces: NAMESPACES });
  const site = path.join(cluster.workDir, "site");
  await startServers(cluster, site);
  await cluster.startAgents(ENROLLED);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

/** Starts HTTP on 8080 and 8081 and a socat echo server on 9000 in srv, and HTTP on 8080 in open. */
async function startServers(c: Cluster, site: string): Promise<void> {
  for (const [pod, ports] of [["srv", HTTP_PORTS], ["open", [8080]]] as const) {
    for (const port of ports) {
      fs.mkdirSync(path.join(site, pod, String(port)), { recursive: true });
      fs.writeFileSync(path.join(site, pod, String(port), "index.html"), bodyOf(pod, port));
    }
    const args = ["-c", MULTI_PORT_HTTP_SERVER, path.join(site, pod), ...ports.map(String)];
    c.topology.spawn(c.topology.pod(pod).netns, "python3", args, { stdio: ["ignore", "ignore", "ignore"] });
  }
  c.topology.spawn(c.topology.pod("srv").netns, "socat", [`TCP-LISTEN:${ECHO_PORT},fork,reuseaddr`, "PIPE"], { stdio: ["ignore", "ignore", "ignore"] });
  await waitListening(c.topology, "srv", [...HTTP_PORTS, ECHO_PORT]);
  await waitListening(c.topology, "open", [8080]);
}

function bodyOf(pod: string, port: number): string {
  return `${pod}:${port}\n`;
}

async function waitListening(topology: Topology, pod: string, ports: number[]): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (const port of ports) {
    for (;;) {
      const listening = topology.exec(topology.pod(pod).netns, "ss", ["-Hltn", `sport = :${port}`], { allowFail: true });
      if (listening.trim() !== "") break;
      if (Date.now() > deadline) throw new Error(`no server in ${pod} listens on port ${port} after 10 s`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

/**
 * Replaces the case file with `manifests` and waits until the server node's agent applied it.
 * The agent logs the number of AuthorizationPolicies it has, which must equal those in the file.
 */
async function applyCase(manifests: string[], extraFiles: Record<string, string> = {}): Promise<number> {
  const c = theCluster();
  const agent = c.agent(SERVER_NODE);
  const mark = agent.lines.length;
  for (const [name, content] of Object.entries(extraFiles)) writeManifest(c.manifestsDir, name, content);
  const content = manifests.join("---\n");
  writeManifest(c.manifestsDir, CASE_FILE, content);
  const policies = (content.match(/^kind: AuthorizationPolicy$/gm) ?? []).length;
  await agent.waitForLog(
    (line) => line.msg === "configuration updated" && line.policies === policies,
    10_000,
    `the manifests of the case with ${policies} AuthorizationPolicies`,
    mark,
  );
  return mark;
}

/** What one client connection got, and the audit record of the server's agent for it. */
interface Attempt {
  /** The bytes the client received. */
  received: string;
  /** True when the client finished without an error. */
  succeeded: boolean;
  /** True when the client saw its connection reset or refused. */
  reset: boolean;
  exitCode: number;
  stderr: string;
  record: Record<string, any>;
}

/** Requests http://<server>:<port>/ with curl from `client`, then waits for the inbound record. */
async function httpGet(client: string, server: string, port: number): Promise<Attempt> {
  const c = theCluster();
  const mark = c.auditRecords(SERVER_NODE).length;
  const result: CurlResult = await curl(c.topology, client, `http://${c.topology.pod(server).ip}:${port}/`, 5);
  const record = await inboundRecord(mark, client, server, port);
  return {
    received: result.body.toString(),
    succeeded: result.exitCode === 0 && result.status === 200,
    reset: curlWasReset(result),
    exitCode: result.exitCode,
    stderr: result.stderr,
    record,
  };
}

/** Sends `payload` with socat from `client` to the echo server, then waits for the inbound record. */
async function echo(client: string, payload: string): Promise<Attempt> {
  const c = theCluster();
  const mark = c.auditRecords(SERVER_NODE).length;
  const result = await socat(c.topology, client, c.topology.pod("srv").ip, ECHO_PORT, payload);
  const record = await inboundRecord(mark, client, "srv", ECHO_PORT);
  const reset = /Connection reset by peer|Connection refused/.test(result.stderr);
  return { received: result.output, succeeded: result.exitCode === 0 && !reset, reset, exitCode: result.exitCode, stderr: result.stderr, record };
}

/**
 * Runs `socat - TCP:ip:port` in a pod with `payload` on its stdin. After the stdin ends socat
 * waits up to 2 s for the echo, and the process is killed after 10 s in any case. socat 1.7.4
 * exits with 0 when the peer resets the connection after socat closed its sending side, and
 * reports the reset only as a warning. -d prints warnings, so stderr shows a reset.
 */
function socat(topology: Topology, pod: string, ip: string, port: number, payload: string): Promise<{ exitCode: number; output: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn("ip", ["netns", "exec", topology.pod(pod).netns, "socat", "-d", "-t", "2", "-T", "5", "-", `TCP:${ip}:${port},connect-timeout=5`]);
    let output = "";
    let stderr = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ exitCode: code ?? -1, output, stderr: stderr.trim() });
    });
    child.stdin.end(payload);
  });
}

/** Waits for the server node's inbound record, written at index `mark` or later, of a connection from `client` to `server`:`port`. */
async function inboundRecord(mark: number, client: string, server: string, port: number): Promise<Record<string, any>> {
  const c = theCluster();
  const source = `${c.topology.pod(client).ip}:`;
  const destination = `${c.topology.pod(server).ip}:${port}`;
  const deadline = Date.now() + 10_000;
  for (;;) {
    const found = c
      .auditRecords(SERVER_NODE)
      .slice(mark)
      .find((record) => record.direction === "inbound" && String(record.src.addr).startsWith(source) && record.dst.addr === destination);
    if (found) return found;
    if (Date.now() > deadline) {
      throw new Error(`no inbound record on ${SERVER_NODE} for ${client} -> ${destination} within 10 s; new records:\n${JSON.stringify(c.auditRecords(SERVER_NODE).slice(mark), null, 1)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

interface ExpectedDecision {
  decision: "allow" | "deny";
  reason: string;
  policy?: string;
  policy_kind?: string;
  rule?: number;
}

/** Picks the authorization fields of a record, leaving out the absent ones. */
function decisionOf(record: Record<string, any>): ExpectedDecision {
  const picked: Record<string, unknown> = {};
  for (const field of ["decision", "reason", "policy", "policy_kind", "rule"]) {
    if (record[field] !== undefined) picked[field] = record[field];
  }
  return picked as unknown as ExpectedDecision;
}

function assertServed(t: ExecutionContext, attempt: Attempt, body: string, description: string): void {
  t.true(attempt.succeeded, `${description}: the client failed (exit code ${attempt.exitCode}): ${attempt.stderr}`);
  t.is(attempt.received, body, `${description}: the client received other bytes`);
}

function assertReset(t: ExecutionContext, attempt: Attempt, description: string): void {
  t.false(attempt.succeeded, `${description}: the client was served`);
  t.is(attempt.received, "", `${description}: the client received bytes`);
  t.true(attempt.reset, `${description}: expected a reset or refused connection, got exit code ${attempt.exitCode}: ${attempt.stderr}`);
}

/** Resolves with the first log line of `node`'s agent after `mark` whose JSON contains every string of `parts`. */
function waitForLogWith(node: string, parts: string[], mark: number, description: string): Promise<LogLine> {
  return theCluster()
    .agent(node)
    .waitForLog((line) => parts.every((part) => JSON.stringify(line).includes(part)), 10_000, description, mark);
}

test.serial("allow-nothing denies every client of its namespace", async (t) => {
  await applyCase([
    `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: servers
spec: {}
`,
  ]);

  for (const client of ["cli-a", "cli-o", "peer"]) {
    const attempt = await httpGet(client, "srv", 8080);
    assertReset(t, attempt, `${client} to srv`);
    t.deepEqual(decisionOf(attempt.record), { decision: "deny", reason: "no_allow_match" }, `${client} to srv`);
    t.is(attempt.record.transport, "hbone");
  }
  const plaintext = await httpGet("legacy", "srv", 8080);
  assertReset(t, plaintext, "legacy to srv");
  t.deepEqual(decisionOf(plaintext.record), { decision: "deny", reason: "no_allow_match" }, "legacy to srv");
  t.is(plaintext.record.transport, "plaintext");

  const open = await httpGet("cli-a", "open", 8080);
  assertServed(t, open, bodyOf("open", 8080), "cli-a to open");
  t.deepEqual(decisionOf(open.record), { decision: "allow", reason: "no_policy" });
});

test.serial("ALLOW by principal admits one service account", async (t) => {
  await applyCase([
    `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-alpha
  namespace: servers
spec:
  selector:
    matchLabels:
      app: srv
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/other/sa/nobody"]
    - from:
        - source:
            principals: ["${ALPHA}"]
`,
  ]);

  const alpha = await httpGet("cli-a", "srv", 8080);
  assertServed(t, alpha, bodyOf("srv", 8080), "alpha");
  t.deepEqual(decisionOf(alpha.record), { decision: "allow", reason: "allowed_by_policy", policy: "servers/allow-alpha", policy_kind: "AuthorizationPolicy", rule: 1 });
  t.is(alpha.record.src.identity, `spiffe://${ALPHA}`);

  const beta = await httpGet("cli-b", "srv", 8080);
  assertReset(t, beta, "beta");
  t.deepEqual(decisionOf(beta.record), { decision: "deny", reason: "no_allow_match" });
  t.is(beta.record.src.identity, `spiffe://${BETA}`);
  t.is(beta.record.bytes_sent, 0);
  t.is(beta.record.error?.code, "POLICY_DENIED");
});

test.serial("ALLOW on two of three ports resets the third", async (t) => {
  await applyCase([
    `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: two-ports
  namespace: servers
spec:
  selector:
    matchLabels:
      app: srv
  action: ALLOW
  rules:
    - to:
        - operation:
            ports: ["8080", "${ECHO_PORT}"]
`,
  ]);

  const http = await httpGet("cli-a", "srv", 8080);
  assertServed(t, http, bodyOf("srv", 8080), "port 8080");
  t.deepEqual(decisionOf(http.record), { decision: "allow", reason: "allowed_by_policy", policy: "servers/two-ports", policy_kind: "AuthorizationPolicy", rule: 0 });

  const payload = `ping-${process.pid}\n`;
  const echoed = await echo("cli-a", payload);
  assertServed(t, echoed, payload, `port ${ECHO_PORT}`);
  t.deepEqual(decisionOf(echoed.record), { decision: "allow", reason: "allowed_by_policy", policy: "servers/two-ports", policy_kind: "AuthorizationPolicy", rule: 0 });

  const other = await httpGet("cli-a", "srv", 8081);
  assertReset(t, other, "port 8081");
  t.deepEqual(decisionOf(other.record), { decision: "deny", reason: "no_allow_match" });
});

test.serial("namespace DENY from one source namespace", async (t) => {
  await applyCase([
    `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-from-other
  namespace: servers
spec:
  action: DENY
  rules:
    - from:
        - source:
            namespaces: ["other"]
`,
  ]);

  const denied = await httpGet("cli-o", "srv", 8080);
  assertReset(t, denied, "cli-o");
  t.deepEqual(decisionOf(denied.record), { decision: "deny", reason: "denied_by_policy", policy: "servers/deny-from-other", policy_kind: "AuthorizationPolicy", rule: 0 });
  t.regex(denied.record.error?.message ?? "", /AuthorizationPolicy servers\/deny-from-other rules\[0\] denies it/);

  const socatDenied = await echo("cli-o", "denied\n");
  assertReset(t, socatDenied, "cli-o with socat");
  t.is(socatDenied.record.policy, "servers/deny-from-other");

  const allowed = await httpGet("cli-a", "srv", 8081);
  assertServed(t, allowed, bodyOf("srv", 8081), "cli-a");
  t.deepEqual(decisionOf(allowed.record), { decision: "allow", reason: "no_policy" });
});

test.serial("STRICT namespace rejects plaintext from outside the mesh", async (t) => {
  await applyCase([
    `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: namespace-strict
  namespace: servers
spec:
  mtls:
    mode: STRICT
`,
  ]);

  const plaintext = await httpGet("legacy", "srv", 8080);
  assertReset(t, plaintext, "legacy");
  t.deepEqual(decisionOf(plaintext.record), { decision: "deny", reason: "mtls_required", policy: "servers/namespace-strict", policy_kind: "PeerAuthentication" });
  t.is(plaintext.record.transport, "plaintext");
  t.is(plaintext.record.error?.code, "MTLS_REQUIRED");

  const mutual = await httpGet("cli-a", "srv", 8080);
  assertServed(t, mutual, bodyOf("srv", 8080), "cli-a");
  t.deepEqual(decisionOf(mutual.record), { decision: "allow", reason: "no_policy" });

  // The PeerAuthentication of the servers namespace leaves the open namespace PERMISSIVE.
  const elsewhere = await httpGet("legacy", "open", 8080);
  assertServed(t, elsewhere, bodyOf("open", 8080), "legacy to open");
});

test.serial("portLevelMtls PERMISSIVE opens one port of a STRICT workload", async (t) => {
  await applyCase([
    `apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: srv-strict
  namespace: servers
spec:
  selector:
    matchLabels:
      app: srv
  mtls:
    mode: STRICT
  portLevelMtls:
    8081:
      mode: PERMISSIVE
`,
  ]);

  const permissive = await httpGet("legacy", "srv", 8081);
  assertServed(t, permissive, bodyOf("srv", 8081), "legacy to 8081");
  t.deepEqual(decisionOf(permissive.record), { decision: "allow", reason: "no_policy" });

  const strict = await httpGet("legacy", "srv", 8080);
  assertReset(t, strict, "legacy to 8080");
  t.deepEqual(decisionOf(strict.record), { decision: "deny", reason: "mtls_required", policy: "servers/srv-strict", policy_kind: "PeerAuthentication" });

  const mutual = await httpGet("cli-b", "srv", 8080);
  assertServed(t, mutual, bodyOf("srv", 8080), "cli-b to 8080");
});

test.serial("invalid policy file is rejected alone", async (t) => {
  const c = theCluster();
  // Either bad policy, read in any form, would be an ALLOW policy for srv and deny cli-o.
  const badPort = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad-port
  namespace: servers
spec:
  action: ALLOW
  rules:
    - to:
        - operation:
            ports: ["80x"]
`;
  const unknownField = `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: bad-field
  namespace: servers
spec:
  action: ALLOW
  rules:
    - from:
        - source:
            principal: ["${ALPHA}"]
`;
  try {
    const mark = await applyCase(
      [
        `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-beta
  namespace: servers
spec:
  action: DENY
  rules:
    - from:
        - source:
            principals: ["${BETA}"]
`,
      ],
      { "bad-port.yaml": badPort, "bad-field.yaml": unknownField },
    );

    const portLine = await waitForLogWith(SERVER_NODE, ["bad-port.yaml", "spec.rules[0].to[0].operation.ports[0]", '\\"80x\\"'], mark, "the rejection of bad-port.yaml");
    t.regex(String(portLine.msg), /bad-port\.yaml:\d+: AuthorizationPolicy servers\/bad-port: spec\.rules\[0\]\.to\[0\]\.operation\.ports\[0\]: invalid port "80x"/);
    const fieldLine = await waitForLogWith(SERVER_NODE, ["bad-field.yaml", "spec.rules[0].from[0].source.principal"], mark, "the rejection of bad-field.yaml");
    t.regex(String(fieldLine.msg), /bad-field\.yaml:\d+: AuthorizationPolicy servers\/bad-field: spec\.rules\[0\]\.from\[0\]\.source\.principal: unknown field/);

    const denied = await httpGet("cli-b", "srv", 8080);
    assertReset(t, denied, "cli-b");
    t.deepEqual(decisionOf(denied.record), { decision: "deny", reason: "denied_by_policy", policy: "servers/deny-beta", policy_kind: "AuthorizationPolicy", rule: 0 });

    const allowed = await httpGet("cli-o", "srv", 8080);
    assertServed(t, allowed, bodyOf("srv", 8080), "cli-o");
    t.deepEqual(decisionOf(allowed.record), { decision: "allow", reason: "no_policy" });
  } finally {
    fs.rmSync(path.join(c.manifestsDir, "bad-port.yaml"), { force: true });
    fs.rmSync(path.join(c.manifestsDir, "bad-field.yaml"), { force: true });
  }
});

test.serial("dry-run DENY is recorded, not enforced", async (t) => {
  await applyCase([
    `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: dry-deny-alpha
  namespace: servers
  annotations:
    istio.io/dry-run: "true"
spec:
  selector:
    matchLabels:
      app: srv
  action: DENY
  rules:
    - from:
        - source:
            principals: ["${ALPHA}"]
`,
  ]);

  const alpha = await httpGet("cli-a", "srv", 8080);
  assertServed(t, alpha, bodyOf("srv", 8080), "cli-a");
  t.deepEqual(decisionOf(alpha.record), { decision: "allow", reason: "no_policy" });
  t.deepEqual(alpha.record.dry_run, [{ policy: "servers/dry-deny-alpha", rule: 0, decision: "deny" }]);

  const beta = await httpGet("cli-b", "srv", 8080);
  assertServed(t, beta, bodyOf("srv", 8080), "cli-b");
  t.is(beta.record.dry_run, undefined, "a dry-run policy that does not match cli-b is in its record");
});

test.serial("HTTP-only fields drop ALLOW rules, DENY keeps ports", async (t) => {
  const mark = await applyCase([
    `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: servers
spec:
  selector:
    matchLabels:
      app: srv
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["${ALPHA}"]
      to:
        - operation:
            methods: ["GET"]
    - from:
        - source:
            namespaces: ["other"]
`,
    `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-post-8081
  namespace: servers
spec:
  selector:
    matchLabels:
      app: srv
  action: DENY
  rules:
    - to:
        - operation:
            ports: ["8081"]
            methods: ["POST"]
`,
  ]);

  const alpha = await httpGet("cli-a", "srv", 8080);
  assertReset(t, alpha, "cli-a, allowed only by the rule with methods");
  t.deepEqual(decisionOf(alpha.record), { decision: "deny", reason: "no_allow_match" });

  const other = await httpGet("cli-o", "srv", 8080);
  assertServed(t, other, bodyOf("srv", 8080), "cli-o on 8080");
  t.deepEqual(decisionOf(other.record), { decision: "allow", reason: "allowed_by_policy", policy: "servers/allow-get", policy_kind: "AuthorizationPolicy", rule: 1 });

  // A GET on 8081 is denied too: the DENY rule is enforced on its port alone.
  const denied = await httpGet("cli-o", "srv", 8081);
  assertReset(t, denied, "cli-o on 8081");
  t.deepEqual(decisionOf(denied.record), { decision: "deny", reason: "denied_by_policy", policy: "servers/deny-post-8081", policy_kind: "AuthorizationPolicy", rule: 0 });

  const allowWarning = await waitForLogWith(SERVER_NODE, ["servers/allow-get", "to[0].operation.methods"], mark, "the warning about allow-get");
  t.is(allowWarning.level, 40, "the warning about allow-get is not logged at level warn");
  const denyWarning = await waitForLogWith(SERVER_NODE, ["servers/deny-post-8081", "to[0].operation.methods"], mark, "the warning about deny-post-8081");
  t.is(denyWarning.level, 40, "the warning about deny-post-8081 is not logged at level warn");
});

test.serial("root namespace policies apply mesh-wide", async (t) => {
  const c = theCluster();
  const meshDeny = (namespace: string, principal: string) => `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: mesh-deny
  namespace: ${namespace}
spec:
  action: DENY
  rules:
    - from:
        - source:
            principals: ["${principal}"]
`;
  await applyCase([meshDeny("istio-system", BETA), meshDeny(ALTERNATE_ROOT, ALPHA)]);

  // With the default root namespace istio-system, its policy applies in the servers namespace.
  const beta = await httpGet("cli-b", "srv", 8080);
  assertReset(t, beta, "cli-b, default root");
  t.deepEqual(decisionOf(beta.record), { decision: "deny", reason: "denied_by_policy", policy: "istio-system/mesh-deny", policy_kind: "AuthorizationPolicy", rule: 0 });
  const alpha = await httpGet("cli-a", "srv", 8080);
  assertServed(t, alpha, bodyOf("srv", 8080), "cli-a, default root");
  t.deepEqual(decisionOf(alpha.record), { decision: "allow", reason: "no_policy" });

  // Another root namespace: istio-system is an ordinary namespace, and mesh-root's policy applies.
  await c.agent(SERVER_NODE).stop();
  await c.restartAgent(SERVER_NODE, ["srv", "open"], ["--root-namespace", ALTERNATE_ROOT]);
  const betaMoved = await httpGet("cli-b", "srv", 8080);
  assertServed(t, betaMoved, bodyOf("srv", 8080), `cli-b, root ${ALTERNATE_ROOT}`);
  t.deepEqual(decisionOf(betaMoved.record), { decision: "allow", reason: "no_policy" });
  const alphaMoved = await httpGet("cli-a", "open", 8080);
  assertReset(t, alphaMoved, `cli-a to open, root ${ALTERNATE_ROOT}`);
  t.deepEqual(decisionOf(alphaMoved.record), { decision: "deny", reason: "denied_by_policy", policy: `${ALTERNATE_ROOT}/mesh-deny`, policy_kind: "AuthorizationPolicy", rule: 0 });
});

test.serial("teardown leaves no namespace", async (t) => {
  await theCluster().destroy();
  t.deepEqual(
    listNetns().filter((name) => name.startsWith(PREFIX)),
    [],
  );
});
