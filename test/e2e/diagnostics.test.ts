// End to end on the real kernel. Every agentctl command that reads a live agent runs in each output
// format, and its output is checked against what the test built. The Prometheus metrics are checked
// against connections of known sizes and the audit records they wrote. Last come agentctl's exit statuses.
//
// The pods' servers and clients are the round-trip scripts of the harness, whose byte counts are exact.

import test, { type ExecutionContext } from "ava";
import { spawnSync } from "node:child_process";
import { parse as parseYaml, parseAllDocuments } from "yaml";
import type { CertificateView, ConnectionView, LogLevelsView, ServiceView, StatusView, WorkloadView } from "../../agent/admin/views";
import type { AccessCheck, PolicyStatusReport, WorkloadExplanation } from "../../agent/rbac/explain";
import { AGENTCTL_BIN, TEST_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { serviceYaml } from "../harness/manifests";
import { parsePrometheusText, samplesOf, sumOf, type MetricSample } from "../harness/prometheus-text";
import { roundTrips, RoundClient, startRoundServer } from "../harness/round-trip";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aadiag");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "aadiag-n1";
const SERVER_NODE = "aadiag-n2";
const SERVER_PORT = 9000;
/** Outside the harness's pod ranges (10.N.<node>.0/24) and node link (10.200.0.0/30). */
const API_VIP = "10.96.74.10";
const WEB_ID = "spiffe://cluster.local/ns/shop/sa/web";
const SCRAPER_ID = "spiffe://cluster.local/ns/shop/sa/scraper";
const API_ID = "spiffe://cluster.local/ns/backend/sa/api";
const DB_ID = "spiffe://cluster.local/ns/backend/sa/db";

const NODES: NodeSpec[] = [
  {
    name: CLIENT_NODE,
    pods: [
      { name: "web", namespace: "shop", serviceAccount: "web" },
      { name: "scraper", namespace: "shop", serviceAccount: "scraper" },
      { name: "legacy", namespace: "legacy", serviceAccount: "default" },
    ],
  },
  {
    name: SERVER_NODE,
    pods: [
      { name: "api", namespace: "backend", serviceAccount: "api" },
      { name: "db", namespace: "backend", serviceAccount: "db" },
    ],
  },
];

const POLICIES = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-allow-web, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
      to: [{operation: {ports: ["${SERVER_PORT}"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-deny-scraper, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/scraper"]}}]
`;

let cluster: Cluster | undefined;
/** Every agentctl output of the run, checked for key material by the last test. */
const outputs: { command: string; text: string }[] = [];

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

function podIp(name: string): string {
  return theCluster().topology.pod(name).ip;
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
      { name: "legacy", ambient: false },
    ],
    extraManifests: {
      "policies.yaml": POLICIES,
      "services.yaml": serviceYaml({ name: "api", namespace: "backend", vip: API_VIP, selector: { app: "api" }, ports: [{ port: 80, targetPort: SERVER_PORT }] }),
    },
  });
  for (const pod of ["api", "db"]) await startRoundServer(cluster.topology, pod, SERVER_PORT);
  await cluster.startAgents(["web", "scraper", "api", "db"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Opens one connection from `pod` to host:SERVER_PORT, runs `rounds` and closes it; returns the client's source port. */
function connectionOf(pod: string, host: string, rounds: [number, number][]): Promise<number> {
  return roundTrips(theCluster().topology, pod, host, SERVER_PORT, rounds);
}

/** Connects from `pod` to host:port with a round client that the caller drives and closes. */
function connectFrom(pod: string, host: string, port = SERVER_PORT): Promise<{ client: RoundClient; port: number }> {
  return RoundClient.connect(theCluster().topology, pod, host, port);
}

interface CommandResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs the built agentctl inside a node's namespace, where that node's agent serves its admin API. */
function agentctl(node: string, ...args: string[]): CommandResult {
  const netns = theCluster().topology.node(node).netns;
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", process.execPath, AGENTCTL_BIN, ...args], { encoding: "utf8", timeout: 30_000 });
  outputs.push({ command: args.join(" "), text: result.stdout + result.stderr });
  return { status: result.status, signal: result.signal, stdout: result.stdout, stderr: result.stderr };
}

/** Runs curl inside a node's namespace; `--max-time 5`. */
function curlInNode(node: string, url: string): CommandResult & { httpStatus: number } {
  const netns = theCluster().topology.node(node).netns;
  const result = spawnSync("nsenter", [`--net=/var/run/netns/${netns}`, "--", "curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", url], { encoding: "utf8", timeout: 10_000 });
  const newline = result.stdout.lastIndexOf("\n");
  return { status: result.status, signal: result.signal, stdout: result.stdout.slice(0, Math.max(newline, 0)), stderr: result.stderr, httpStatus: Number(result.stdout.slice(newline + 1)) || 0 };
}

/** Fields whose value changes between two requests a moment apart. */
const VOLATILE_FIELDS = new Set(["durationMs", "uptimeSeconds", "expiresInSeconds"]);

function withoutVolatile(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withoutVolatile);
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(Object.entries(value).filter(([key]) => !VOLATILE_FIELDS.has(key)).map(([key, entry]) => [key, withoutVolatile(entry)]));
}

/**
 * Runs one agentctl command with -o json, -o yaml and -o table, checks that each exits 0, parses
 * the JSON and the YAML and checks that both carry the same data. Returns the JSON and the table.
 */
function inFormats<T>(t: ExecutionContext, node: string, args: string[], formats: ("table" | "json" | "yaml")[] = ["table", "json", "yaml"]): { json: T; table: string } {
  const results = Object.fromEntries(formats.map((format) => [format, agentctl(node, ...args, "-o", format)]));
  for (const [format, result] of Object.entries(results)) t.is(result.status, 0, `agentctl ${args.join(" ")} -o ${format} failed: ${result.stderr}`);
  const json = JSON.parse(results.json.stdout) as T;
  if (results.yaml !== undefined) t.deepEqual(withoutVolatile(parseYaml(results.yaml.stdout)), withoutVolatile(json), `agentctl ${args.join(" ")}: the YAML differs from the JSON`);
  return { json, table: results.table?.stdout ?? "" };
}

/** Splits a table into its header line and rows, each a list of cells separated by two or more spaces. */
function tableRows(table: string): { header: string[]; rows: string[][] } {
  const [header, ...rows] = table.split("\n").filter((line) => line.trim() !== "").map((line) => line.trim().split(/\s{2,}/));
  return { header, rows };
}

function metricsOf(node: string, path = "/metrics"): MetricSample[] {
  const response = curlInNode(node, `http://127.0.0.1:15020${path}`);
  if (response.httpStatus !== 200) throw new Error(`GET ${path} on ${node} returned ${response.httpStatus}: ${response.stderr}`);
  return parsePrometheusText(response.stdout);
}

/** Polls until `condition` holds; throws naming `description` after `timeoutMs`. */
async function waitFor(condition: () => boolean, description: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${description}`);
    await sleep(100);
  }
}

test.serial("status in every format", (t) => {
  const { json, table } = inFormats<StatusView>(t, CLIENT_NODE, ["status"]);
  t.is(json.node, CLIENT_NODE);
  t.true(json.ready);
  t.true(Object.values(json.checks).every(Boolean), JSON.stringify(json.checks));
  t.is(json.capture?.mode, TEST_CAPTURE);
  t.is(json.enrolled, 2);
  t.deepEqual(json.configuration, { source: "manifests", workloads: 5, services: 1, policies: 2, rejected: 0 });
  t.is(json.certificates.total, 2);
  t.is(json.certificates.valid, 2);

  const lines = table.split("\n");
  t.regex(lines[0], new RegExp(`^agent: version \\S+ on node ${CLIENT_NODE} \\(pid ${json.pid}, up `));
  t.is(lines[1], "ready: yes");
  t.regex(table, new RegExp(`^capture: ${TEST_CAPTURE} \\(requested with --capture ${TEST_CAPTURE}\\)$`, "m"));
  t.regex(table, /^configuration: from manifests: 5 workloads, 1 service, 2 policies, 0 rejected$/m);
  t.regex(table, /^pods: 2 enrolled, 0 pending, 0 isolated$/m);
});

test.serial("workloads and their filters", (t) => {
  const { json, table } = inFormats<WorkloadView[]>(t, CLIENT_NODE, ["workloads"]);
  t.deepEqual(
    json.map((workload) => [workload.uid, workload.ips, workload.node, workload.identity, workload.protocol, workload.local, workload.state]),
    [
      ["backend/api", [podIp("api")], SERVER_NODE, API_ID, "HBONE", false, "Remote"],
      ["backend/db", [podIp("db")], SERVER_NODE, DB_ID, "HBONE", false, "Remote"],
      ["legacy/legacy", [podIp("legacy")], CLIENT_NODE, "spiffe://cluster.local/ns/legacy/sa/default", "TCP", true, "NotEnrolled"],
      ["shop/scraper", [podIp("scraper")], CLIENT_NODE, SCRAPER_ID, "HBONE", true, "Up"],
      ["shop/web", [podIp("web")], CLIENT_NODE, WEB_ID, "HBONE", true, "Up"],
    ],
  );
  const { header, rows } = tableRows(table);
  t.deepEqual(header, ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "STATE"]);
  t.deepEqual(rows.find((row) => row[1] === "web"), ["shop", "web", podIp("web"), CLIENT_NODE, "HBONE", "Up"]);

  const uids = (args: string[]): string[] => inFormats<WorkloadView[]>(t, CLIENT_NODE, ["workloads", ...args], ["json", "yaml"]).json.map((workload) => workload.uid);
  t.deepEqual(uids(["--namespace", "backend"]), ["backend/api", "backend/db"]);
  t.deepEqual(uids(["--node", SERVER_NODE]), ["backend/api", "backend/db"]);
  t.deepEqual(uids(["--local"]), ["legacy/legacy", "shop/scraper", "shop/web"]);
  t.deepEqual(uids(["--local", "--namespace", "shop"]), ["shop/scraper", "shop/web"]);
  t.deepEqual(uids(["--namespace", "nothing-here"]), []);
});

test.serial("services in every format", (t) => {
  const { json, table } = inFormats<ServiceView[]>(t, CLIENT_NODE, ["services"]);
  t.deepEqual(json, [
    {
      namespace: "backend",
      name: "api",
      vips: [API_VIP],
      ports: [{ name: "", port: 80, targetPort: SERVER_PORT, protocol: "TCP" }],
      endpoints: { total: 1, healthy: 1, addresses: [podIp("api")] },
    },
  ]);
  const { header, rows } = tableRows(table);
  t.deepEqual(header, ["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "PORTS", "ENDPOINTS"]);
  t.deepEqual(rows, [["backend", "api", API_VIP, `80->${SERVER_PORT}/TCP`, "1/1"]]);
  t.deepEqual(inFormats<ServiceView[]>(t, CLIENT_NODE, ["services", "--namespace", "shop"], ["json", "yaml"]).json, []);
});

test.serial("policies in every format", (t) => {
  const { json, table } = inFormats<PolicyStatusReport>(t, SERVER_NODE, ["policies"]);
  t.deepEqual(
    json.authorizationPolicies.map((policy) => [policy.uid, policy.action, policy.status]),
    [
      ["backend/api-allow-web", "ALLOW", "enforced"],
      ["backend/api-deny-scraper", "DENY", "enforced"],
    ],
  );
  t.deepEqual(json.rejected, []);
  t.regex(table, /^AUTHORIZATION POLICIES$/m);
  t.regex(table, /backend\/api-deny-scraper\s+DENY\s+app=api\s+enforced\s+1\s+policies.yaml/);
});

test.serial("certificates in every format", (t) => {
  for (const [node, identities] of [
    [CLIENT_NODE, [SCRAPER_ID, WEB_ID]],
    [SERVER_NODE, [API_ID, DB_ID]],
  ] as const) {
    const { json, table } = inFormats<CertificateView[]>(t, node, ["certificates"]);
    t.deepEqual(json.map((certificate) => certificate.identity), [...identities]);
    for (const certificate of json) {
      t.is(certificate.state, "valid");
      t.is(certificate.workloads.length, 1);
      t.is(certificate.chain[0]?.type, "Leaf");
      // The embedded CA signs leaves with its root, which the view appends from the trusted roots.
      t.deepEqual(certificate.chain.map((entry) => entry.type), ["Leaf", "Root"]);
      t.is(certificate.notAfter, certificate.chain[0].notAfter);
      t.true(certificate.expiresInSeconds! > 0);
    }
    t.deepEqual(json.map((certificate) => certificate.workloads[0]), node === CLIENT_NODE ? ["shop/scraper", "shop/web"] : ["backend/api", "backend/db"]);
    const { header, rows } = tableRows(table);
    t.deepEqual(header, ["IDENTITY", "TYPE", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "EXPIRES IN"]);
    const leaf = json[0].chain[0];
    t.deepEqual(rows.find((row) => row[0] === identities[0] && row[1] === "Leaf")?.slice(0, 6), [identities[0], "Leaf", "valid", leaf.serialNumber, leaf.notBefore, leaf.notAfter]);
  }
});

test.serial("config dump without keys", (t) => {
  const { json } = inFormats<Record<string, any>>(t, SERVER_NODE, ["config"], ["json", "yaml"]);
  t.is(json.node, SERVER_NODE);
  t.deepEqual(Object.keys(json.workloadState).sort(), ["backend/api", "backend/db"]);
  t.deepEqual(json.workloadState["backend/api"].connections, { inbound: 0, outbound: 0 });
  t.deepEqual((json.services as ServiceView[]).map((service) => service.vips), [[API_VIP]]);
  t.deepEqual((json.certificates as CertificateView[]).map((certificate) => certificate.identity), [API_ID, DB_ID]);
  t.deepEqual(
    (json.policies as { name: string; scope: string; action: string }[]).map((policy) => [policy.name, policy.scope, policy.action]),
    [
      ["api-allow-web", "WorkloadSelector", "ALLOW"],
      ["api-deny-scraper", "WorkloadSelector", "DENY"],
    ],
  );
  t.is(json.captureMode.mode, TEST_CAPTURE);
  const text = JSON.stringify(json);
  t.false(text.includes("PRIVATE KEY"));
  t.false(/"(privateKey|private_key|key|keyPem)"\s*:/.test(text), "the dump has a key field");

  const table = agentctl(SERVER_NODE, "config", "-o", "table");
  t.is(table.status, 2, "config has no table format");
  t.regex(table.stderr, /invalid -o "table": use json, yaml/);
});

test.serial("authz check and explain in every format", (t) => {
  const check = inFormats<AccessCheck>(t, SERVER_NODE, ["authz", "check", "--from", "shop/web", "--to", `${API_VIP}:80`]);
  t.deepEqual(
    check.json.results.map((result) => [result.workload, result.service, result.port, result.decision, result.policy]),
    [["backend/api", "backend/api", SERVER_PORT, "allow", "backend/api-allow-web"]],
  );
  t.regex(check.table, new RegExp(`^ALLOW ${WEB_ID} -> backend/api:${SERVER_PORT} via Service backend/api port 80 by AuthorizationPolicy backend/api-allow-web rules\\[0\\]`));
  const denied = inFormats<AccessCheck>(t, SERVER_NODE, ["authz", "check", "--from", "shop/scraper", "--to", `backend/api:${SERVER_PORT}`]);
  t.deepEqual(denied.json.results.map((result) => [result.decision, result.policy]), [["deny", "backend/api-deny-scraper"]]);

  const explain = inFormats<WorkloadExplanation>(t, SERVER_NODE, ["authz", "explain", "backend/api"]);
  t.is(explain.json.ip, podIp("api"));
  t.deepEqual(explain.json.policies.map((policy) => [policy.uid, policy.action]), [
    ["backend/api-deny-scraper", "DENY"],
    ["backend/api-allow-web", "ALLOW"],
  ]);
  t.regex(explain.table, new RegExp(`^POD\\s+backend/api \\(${podIp("api").replaceAll(".", "\\.")}\\)$`, "m"));
});

test.serial("held connection listed on both nodes", async (t) => {
  const { client, port } = await connectFrom("web", podIp("api"));
  try {
    await client.round(1000, 20_000);
    const source = `${podIp("web")}:${port}`;
    const outboundOf = (): ConnectionView | undefined =>
      inFormats<ConnectionView[]>(t, CLIENT_NODE, ["connections", "--direction", "outbound"], ["json"]).json.find((connection) => connection.local === source);
    const inboundOf = (): ConnectionView | undefined =>
      inFormats<ConnectionView[]>(t, SERVER_NODE, ["connections", "--direction", "inbound"], ["json"]).json.find((connection) => connection.srcIdentity === WEB_ID);

    await waitFor(() => outboundOf()?.bytesRecv === 20_000, "the outbound connection's 20000 bytes received");
    const outbound = outboundOf()!;
    t.like(outbound, { workload: "shop/web", direction: "outbound", remote: `${podIp("api")}:15008`, remoteTarget: `${podIp("api")}:${SERVER_PORT}`, protocol: "HBONE", dstIdentity: API_ID, bytesSent: 1000 });
    await waitFor(() => inboundOf()?.bytesSent === 1000 && inboundOf()?.bytesRecv === 20_000, "the inbound connection's bytes");
    const inbound = inboundOf()!;
    t.like(inbound, { workload: "backend/api", direction: "inbound", protocol: "HBONE", srcIdentity: WEB_ID });

    // The other direction's filter leaves the connection out.
    t.false(inFormats<ConnectionView[]>(t, CLIENT_NODE, ["connections", "--direction", "inbound"], ["json"]).json.some((connection) => connection.local === source));
    t.deepEqual(inFormats<ConnectionView[]>(t, CLIENT_NODE, ["connections", "--workload", "shop/scraper"], ["json"]).json, []);

    await client.round(3000, 40_000);
    await waitFor(() => outboundOf()?.bytesSent === 4000 && outboundOf()?.bytesRecv === 60_000, "the outbound bytes to grow");
    await waitFor(() => inboundOf()?.bytesSent === 4000 && inboundOf()?.bytesRecv === 60_000, "the inbound bytes to grow");

    const { json, table } = inFormats<ConnectionView[]>(t, CLIENT_NODE, ["connections", "--direction", "outbound", "--workload", "shop/web"]);
    t.true(json.some((connection) => connection.id === outbound.id));
    const { header, rows } = tableRows(table);
    t.deepEqual(header, ["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL", "IDENTITY", "BYTES SENT", "BYTES RECV", "AGE"]);
    t.deepEqual(rows.find((row) => row[2] === source)?.slice(0, 9), ["shop/web", "outbound", source, `${podIp("api")}:15008`, `${podIp("api")}:${SERVER_PORT}`, "HBONE", API_ID, "3.9 KiB", "58.6 KiB"]);
    const serverTable = tableRows(inFormats<ConnectionView[]>(t, SERVER_NODE, ["connections", "--direction", "inbound"], ["table", "json"]).table);
    t.true(serverTable.rows.some((row) => row[0] === "backend/api" && row[1] === "inbound" && row[6] === WEB_ID), JSON.stringify(serverTable.rows));

    const dump = inFormats<Record<string, any>>(t, SERVER_NODE, ["config"], ["json"]).json;
    t.deepEqual(dump.workloadState["backend/api"].connections, { inbound: 1, outbound: 0 });
    const status = inFormats<StatusView>(t, CLIENT_NODE, ["status"], ["json"]).json;
    t.deepEqual(status.connections, { inbound: 0, outbound: 1 });
    t.is(sumOf(metricsOf(CLIENT_NODE), "ambient_agent_connections_open", { direction: "outbound" }), 1);
    t.is(sumOf(metricsOf(SERVER_NODE), "ambient_agent_connections_open", { direction: "inbound" }), 1);
  } finally {
    await client.close().catch(() => undefined);
    client.kill();
  }
  await waitFor(() => inFormats<ConnectionView[]>(t, CLIENT_NODE, ["connections"], ["json"]).json.length === 0, "the closed connection to leave the list");
});

/** Returns the istio_tcp_* labels of web's connections to api, as the node of `reporter` reports them. */
function webToApi(reporter: "source" | "destination"): Record<string, string> {
  return {
    reporter,
    source_workload: "web",
    source_workload_namespace: "shop",
    source_principal: WEB_ID,
    destination_workload: "api",
    destination_workload_namespace: "backend",
    destination_principal: API_ID,
    connection_security_policy: "mutual_tls",
  };
}

/** The destination_service* labels of api's Service. */
const API_SERVICE_LABELS = { destination_service: "api.backend.svc.cluster.local", destination_service_name: "api", destination_service_namespace: "backend" };

const TRAFFIC_COUNTERS = ["istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"];

function trafficTotals(node: string, labels: Record<string, string>): Record<string, number> {
  const samples = metricsOf(node);
  return Object.fromEntries(TRAFFIC_COUNTERS.map((name) => [name, sumOf(samples, name, labels)]));
}

function difference(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.keys(after).map((name) => [name, after[name] - (before[name] ?? 0)]));
}

test.serial("mTLS metrics match the bytes", async (t) => {
  const c = theCluster();
  const rounds: [number, number][][] = [[[64, 5_000]], [[3_000, 100_000], [500, 1]], [[20_000, 700]]];
  const requestBytes = rounds.flat().reduce((total, [request]) => total + request, 0);
  const replyBytes = rounds.flat().reduce((total, [, reply]) => total + reply, 0);
  const clientBefore = trafficTotals(CLIENT_NODE, webToApi("source"));
  const serverBefore = trafficTotals(SERVER_NODE, webToApi("destination"));
  const clientMark = c.auditRecords(CLIENT_NODE, "*").length;
  const serverMark = c.auditRecords(SERVER_NODE, "*").length;

  const ports: number[] = [];
  for (const connection of rounds) ports.push(await connectionOf("web", podIp("api"), connection));

  const sources = new Set(ports.map((port) => `${podIp("web")}:${port}`));
  const outboundRecords = (): Record<string, any>[] => c.auditRecords(CLIENT_NODE, "*").slice(clientMark).filter((record) => record.type === "connection.completed" && sources.has(record.src.addr));
  const inboundRecords = (): Record<string, any>[] =>
    c.auditRecords(SERVER_NODE, "*").slice(serverMark).filter((record) => record.type === "connection.completed" && record.direction === "inbound" && record.src.workload === "web");
  await waitFor(() => outboundRecords().length === rounds.length && inboundRecords().length === rounds.length, "an audit record of each connection on both nodes");
  const expected = {
    istio_tcp_connections_opened_total: rounds.length,
    istio_tcp_connections_closed_total: rounds.length,
    istio_tcp_received_bytes_total: requestBytes,
    istio_tcp_sent_bytes_total: replyBytes,
  };
  for (const records of [outboundRecords(), inboundRecords()]) {
    t.is(records.reduce((total, record) => total + record.bytes_sent, 0), requestBytes, "audit bytes_sent is the request bytes");
    t.is(records.reduce((total, record) => total + record.bytes_recv, 0), replyBytes, "audit bytes_recv is the reply bytes");
  }
  await waitFor(() => JSON.stringify(difference(trafficTotals(CLIENT_NODE, webToApi("source")), clientBefore)) === JSON.stringify(expected), "the client node's counters").catch(() => undefined);
  t.deepEqual(difference(trafficTotals(CLIENT_NODE, webToApi("source")), clientBefore), expected, "the client node's counters");
  await waitFor(() => JSON.stringify(difference(trafficTotals(SERVER_NODE, webToApi("destination")), serverBefore)) === JSON.stringify(expected), "the server node's counters").catch(() => undefined);
  t.deepEqual(difference(trafficTotals(SERVER_NODE, webToApi("destination")), serverBefore), expected, "the server node's counters");

  // Dialled by pod IP, the source names no Service, and the destination finds api's Service by its target port.
  for (const record of outboundRecords()) t.is(record.dst.service, undefined, "the outbound record names no Service");
  for (const record of inboundRecords()) t.is(record.dst.service, "backend/api", "the inbound record names the Service of the target port");
  const serverSeries = samplesOf(metricsOf(SERVER_NODE), "istio_tcp_connections_opened_total", webToApi("destination"));
  t.deepEqual([...new Set(serverSeries.map((sample) => sample.labels.destination_service))], [API_SERVICE_LABELS.destination_service]);
  t.deepEqual([...new Set(serverSeries.map((sample) => sample.labels.destination_service_name))], [API_SERVICE_LABELS.destination_service_name]);

  // Each node reports only its own side.
  t.is(sumOf(metricsOf(CLIENT_NODE), "istio_tcp_connections_opened_total", { reporter: "destination", source_workload: "web" }), 0);
  t.is(sumOf(metricsOf(SERVER_NODE), "istio_tcp_connections_opened_total", { reporter: "source", source_workload: "web" }), 0);
  // /stats/prometheus serves the same registry.
  t.true(sumOf(metricsOf(CLIENT_NODE, "/stats/prometheus"), "istio_tcp_connections_opened_total", webToApi("source")) >= rounds.length);
});

test.serial("Service VIP metrics name the Service", async (t) => {
  const labels = { ...webToApi("source"), ...API_SERVICE_LABELS };
  const serverLabels = { ...webToApi("destination"), ...API_SERVICE_LABELS };
  const before = sumOf(metricsOf(CLIENT_NODE), "istio_tcp_connections_closed_total", labels);
  const serverBefore = sumOf(metricsOf(SERVER_NODE), "istio_tcp_connections_closed_total", serverLabels);
  const serverMark = theCluster().auditRecords(SERVER_NODE, "*").length;
  const { client, port } = await connectFrom("web", API_VIP, 80);
  try {
    await client.round(100, 100);
    await client.close();
  } finally {
    client.kill();
  }
  await waitFor(() => sumOf(metricsOf(CLIENT_NODE), "istio_tcp_connections_closed_total", labels) === before + 1, "the closed connection through the VIP").catch(() => undefined);
  t.is(sumOf(metricsOf(CLIENT_NODE), "istio_tcp_connections_closed_total", labels), before + 1);

  // The destination reads the Service from the host of the CONNECT request's Forwarded header.
  const source = `${podIp("web")}:${port}`;
  const inbound = (): Record<string, any> | undefined =>
    theCluster().auditRecords(SERVER_NODE, "*").slice(serverMark).find((record) => record.type === "connection.completed" && record.src.addr === source);
  await waitFor(() => inbound() !== undefined, "the server node's record of the connection through the VIP");
  t.is(inbound()!.dst.service, "backend/api");
  await waitFor(() => sumOf(metricsOf(SERVER_NODE), "istio_tcp_connections_closed_total", serverLabels) === serverBefore + 1, "the server's count").catch(() => undefined);
  t.is(sumOf(metricsOf(SERVER_NODE), "istio_tcp_connections_closed_total", serverLabels), serverBefore + 1);
  const logged = await theCluster()
    .agent(SERVER_NODE)
    .waitForLog((line) => line.msg === "connection complete" && line["src.addr"] === source, 5_000, "the server's access log line of the connection");
  t.is(logged.forwarded, `for="${source}";host=api.backend.svc.cluster.local`, "the CONNECT request's Forwarded header names the Service");
});

test.serial("denial counted as opened, closed and failed", async (t) => {
  const c = theCluster();
  const denied = { reporter: "destination", source_workload: "scraper", source_principal: SCRAPER_ID, destination_workload: "api", destination_workload_namespace: "backend" };
  const countsOf = (samples: MetricSample[]): Record<string, number> => ({
    opened: sumOf(samples, "istio_tcp_connections_opened_total", { ...denied, response_flags: "-" }),
    closed: sumOf(samples, "istio_tcp_connections_closed_total", { ...denied, response_flags: "DENY" }),
    failed: sumOf(samples, "istio_tcp_connections_failed_total", { ...denied, response_flags: "DENY" }),
    closedWithoutFlag: sumOf(samples, "istio_tcp_connections_closed_total", { ...denied, response_flags: "-" }),
  });
  const before = countsOf(metricsOf(SERVER_NODE));
  const mark = c.auditRecords(SERVER_NODE, "*").length;

  const { client } = await connectFrom("scraper", podIp("api"));
  client.round(100, 100).catch(() => undefined);
  t.not(await client.exited(), 0, "the denied round failed");
  await waitFor(
    () => c.auditRecords(SERVER_NODE, "*").slice(mark).some((record) => record.type === "connection.completed" && record.src.workload === "scraper" && record.decision === "deny"),
    "the server node's record of the denial",
  );

  // As in ztunnel: opened when the request is routed, before authorization, then closed and failed with DENY.
  const after = countsOf(metricsOf(SERVER_NODE));
  t.is(after.opened, before.opened + 1, "opened with response_flags -");
  t.is(after.closed, before.closed + 1, "closed with response_flags DENY");
  t.is(after.failed, before.failed + 1, "failed with response_flags DENY");
  t.is(after.closedWithoutFlag, before.closedWithoutFlag, "no close without a flag");
});

test.serial("plaintext metrics have no mTLS", async (t) => {
  const c = theCluster();
  const labels = { reporter: "destination", destination_workload: "db", destination_workload_namespace: "backend", source_principal: "unknown" };
  const before = trafficTotals(SERVER_NODE, labels);
  const port = await connectionOf("legacy", podIp("db"), [[400, 9_000]]);
  const record = await c.waitForAudit(SERVER_NODE, (entry) => entry.src.addr === `${podIp("legacy")}:${port}`);
  t.is(record.transport, "plaintext");
  t.is(record.bytes_sent, 400);
  t.is(record.bytes_recv, 9_000);

  const samples = metricsOf(SERVER_NODE);
  t.deepEqual(difference(trafficTotals(SERVER_NODE, labels), before), {
    istio_tcp_connections_opened_total: 1,
    istio_tcp_connections_closed_total: 1,
    istio_tcp_received_bytes_total: 400,
    istio_tcp_sent_bytes_total: 9_000,
  });
  const policies = new Set(samplesOf(samples, "istio_tcp_connections_opened_total", labels).map((sample) => sample.labels.connection_security_policy));
  t.deepEqual([...policies], ["unknown"]);
});

test.serial("agent metrics match the views", (t) => {
  for (const node of [CLIENT_NODE, SERVER_NODE]) {
    const samples = metricsOf(node);
    t.is(sumOf(samples, "ambient_agent_enrolled_pods"), 2, `${node} enrolled pods`);
    t.deepEqual(
      samplesOf(samples, "ambient_agent_capture_mode").map((sample) => [sample.labels.mode, sample.labels.requested, sample.value]),
      [[TEST_CAPTURE, TEST_CAPTURE, 1]],
    );
    t.is(sumOf(samples, "ambient_agent_certificates", { state: "valid" }), 2);
    const certificates = inFormats<CertificateView[]>(t, node, ["certificates"], ["json"]).json;
    for (const certificate of certificates) {
      const [expiry] = samplesOf(samples, "ambient_agent_certificate_expiry_timestamp_seconds", { identity: certificate.identity });
      t.truthy(expiry, `no expiry metric for ${certificate.identity}`);
      t.true(Math.abs(expiry.value - Date.parse(certificate.notAfter!) / 1000) <= 1, `${certificate.identity}: expiry ${expiry.value} against notAfter ${certificate.notAfter}`);
    }
    t.deepEqual(samplesOf(samples, "ambient_agent_connections_open").map((sample) => sample.value), [0, 0]);
    t.is(samplesOf(samples, "istio_build", { component: "ztunnel" }).length, 1);
  }
});

test.serial("access log level changes", async (t) => {
  const c = theCluster();
  const agent = c.agent(CLIENT_NODE);
  const completeLine = (port: number) => (line: { msg?: string; [key: string]: unknown }) => line.msg === "connection complete" && line["src.addr"] === `${podIp("web")}:${port}`;

  const before = inFormats<LogLevelsView>(t, CLIENT_NODE, ["log"]);
  t.is(before.json.default, "debug");
  t.is(before.json.components.access, "debug");
  t.deepEqual(tableRows(before.table).header, ["COMPONENT", "LEVEL"]);
  t.deepEqual(tableRows(before.table).rows[0], ["(default)", "debug"]);
  t.deepEqual(tableRows(before.table).rows.find((row) => row[0] === "access"), ["access", "debug"]);

  const first = await connectionOf("web", podIp("api"), [[100, 100]]);
  await agent.waitForLog(completeLine(first), 5_000, "the access line at debug");

  const set = agentctl(CLIENT_NODE, "log", "access:warn", "-o", "json");
  t.is(set.status, 0, set.stderr);
  const changed = JSON.parse(set.stdout) as LogLevelsView;
  t.is(changed.components.access, "warn");
  t.is(changed.components.proxy, "debug");
  const quiet = await connectionOf("web", podIp("api"), [[100, 100]]);
  await c.waitForAudit(CLIENT_NODE, (record) => record.src.addr === `${podIp("web")}:${quiet}`);

  const reset = inFormats<LogLevelsView>(t, CLIENT_NODE, ["log", "--reset"], ["json"]);
  t.deepEqual(reset.json, before.json);
  // Lines leave the agent in order, so once the line of a later connection arrived, the quiet one's would have too.
  const after = await connectionOf("web", podIp("api"), [[100, 100]]);
  await agent.waitForLog(completeLine(after), 5_000, "the access line after the reset");
  t.false(agent.lines.some(completeLine(quiet)), "a connection complete line was written at access:warn");
});

test.serial("audit query and verify", (t) => {
  const c = theCluster();
  const file = c.auditFile(SERVER_NODE);
  const filters = ["--file", file, "--workload", "shop/web", "--type", "connection.completed"];
  const json = agentctl(SERVER_NODE, "audit", "query", ...filters, "-o", "json");
  t.is(json.status, 0, json.stderr);
  const records = json.stdout.split("\n").filter((line) => line !== "").map((line) => JSON.parse(line) as Record<string, any>);
  const expected = c.auditRecords(SERVER_NODE).filter((record) => record.src.workload === "web" || record.dst.workload === "web");
  t.true(records.length >= 3);
  t.deepEqual(records.map((record) => record.connection_id), expected.slice(0, records.length).map((record) => record.connection_id));
  const yaml = agentctl(SERVER_NODE, "audit", "query", ...filters, "-o", "yaml");
  t.is(yaml.status, 0, yaml.stderr);
  t.deepEqual(parseAllDocuments(yaml.stdout).map((document) => document.toJS()), records);
  const table = agentctl(SERVER_NODE, "audit", "query", ...filters);
  t.is(table.status, 0, table.stderr);
  t.regex(table.stdout.split("\n")[0], /^TIME\s+TYPE\s+DIR\s+DECISION\s+SOURCE\s+DESTINATION\s+POLICY\s+REASON$/);
  t.regex(table.stdout, /^\S+\s+completed\s+in\s+allow\s+shop\/sa\/web\s+backend\/sa\/api\s+backend\/api-allow-web\s+allowed_by_policy$/m);

  const verify = inFormats<{ records: number; problemCount: number; files: string[] }>(t, SERVER_NODE, ["audit", "verify", file]);
  t.is(verify.json.problemCount, 0);
  t.deepEqual(verify.json.files, [file]);
  t.true(verify.json.records >= c.auditRecords(SERVER_NODE, "*").length - 5);
  t.regex(verify.table, /^audit chain intact: \d+ records, seq 1 to \d+, in 1 file/m);
});

test.serial("doctor exit status matches its checks", (t) => {
  for (const format of ["json", "yaml", "table"]) {
    const result = agentctl(CLIENT_NODE, "doctor", "--pin-root", theCluster().pinRoot(CLIENT_NODE), "--capture", TEST_CAPTURE, "-o", format);
    const context = `agentctl doctor -o ${format} exited with ${result.status}${result.signal === null ? "" : ` (${result.signal})`}; stdout: ${result.stdout}; stderr: ${result.stderr}`;
    if (format === "table") {
      t.regex(result.stdout, /^CHECK\s+RESULT\s+MESSAGE$/m, context);
      t.regex(result.stdout, /^admin api\s+PASS\s+/m, context);
      t.is(result.status, /^0 failed/m.test(result.stdout) ? 0 : 1, context);
      continue;
    }
    const report = (format === "json" ? JSON.parse(result.stdout) : parseYaml(result.stdout)) as { checks: { name: string; result: string; message: string }[] };
    t.is(result.status, report.checks.some((check) => check.result === "FAIL") ? 1 : 0, context);
    t.is(report.checks.find((check) => check.name === "admin api")?.result, "PASS", context);
  }
});

test.serial("metrics and readiness ports", (t) => {
  for (const node of [CLIENT_NODE, SERVER_NODE]) {
    const address = theCluster().topology.node(node).linkIp;
    const ready = curlInNode(node, `http://${address}:15021/healthz/ready`);
    t.is(ready.httpStatus, 200, ready.stderr);
    t.true((JSON.parse(ready.stdout) as { ready: boolean }).ready);
    const metrics = curlInNode(node, `http://${address}:15020/metrics`);
    t.is(metrics.httpStatus, 200, metrics.stderr);
    t.true(parsePrometheusText(metrics.stdout).some((sample) => sample.name === "istio_build"));
    const admin = curlInNode(node, `http://${address}:15000/status`);
    t.is(admin.httpStatus, 0, "the admin API responded on the node's address");
    t.not(admin.status, 0);
    // The default address takes IPv6 too, for the kubelet of an IPv6-only node.
    const ready6 = curlInNode(node, "http://[::1]:15021/healthz/ready");
    t.is(ready6.httpStatus, 200, ready6.stderr);
  }
});

test.serial("exit statuses", (t) => {
  const ready = agentctl(CLIENT_NODE, "status");
  t.is(ready.status, 0, ready.stderr);
  const unreachable = agentctl(CLIENT_NODE, "status", "--admin", "127.0.0.1:1");
  t.is(unreachable.status, 1);
  t.regex(unreachable.stderr, /cannot reach the agent's admin API at 127\.0\.0\.1:1/);
  const unknownOption = agentctl(CLIENT_NODE, "workloads", "--bogus");
  t.is(unknownOption.status, 2);
  t.regex(unknownOption.stderr, /^agentctl workloads: unknown option --bogus; the options are --namespace, --node, --local, --admin, -o$/m);
  const badDirection = agentctl(CLIENT_NODE, "connections", "--direction", "sideways");
  t.is(badDirection.status, 2);
  t.regex(badDirection.stderr, /invalid --direction "sideways": use inbound or outbound/);
});

test.serial("no private key in any output", (t) => {
  t.true(outputs.length > 40, `only ${outputs.length} agentctl outputs were collected`);
  // Every PKCS#8 ECDSA P-256 key starts with these bytes, whatever its value.
  const pkcs8Prefix = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH";
  for (const { command, text } of outputs) {
    t.false(text.includes("PRIVATE KEY"), `agentctl ${command} printed a PEM private key`);
    t.false(text.includes(pkcs8Prefix), `agentctl ${command} printed a PKCS#8 key`);
  }
});
