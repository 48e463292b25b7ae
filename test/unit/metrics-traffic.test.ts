import test from "ava";
import { Counter, Registry } from "prom-client";
import { registerAgentMetrics } from "../../agent/admin/metrics-agent";
import { TRAFFIC_LABEL_NAMES, TrafficMetrics, canonicalRevision, canonicalService, responseFlagsOf, trafficLabels } from "../../agent/admin/metrics-traffic";
import { AgentError } from "../../agent/errors";
import { silentLogger } from "../../agent/log";
import { ConnectionRecord, peerOf, type ConnectionRecordInit } from "../../agent/proxy/connection-record";
import { ConnectionTracker } from "../../agent/proxy/connection-tracker";
import type { Workload } from "../../agent/state/types";
import { MemorySink, workload } from "./proxy-fixtures";

const client = { ...workload("client-7d9f", "shop", "client", "10.0.0.1"), labels: { app: "client", version: "v2" } };
const server = {
  ...workload("server-5c6b", "backend", "server", "10.0.0.2"),
  labels: { "service.istio.io/canonical-name": "api", "service.istio.io/canonical-revision": "r7", app: "ignored" },
};
const WORKLOADS = new Map<string, Workload>([client, server].map((entry) => [entry.uid, entry]));
const lookup = { workload: (uid: string) => WORKLOADS.get(uid), trustDomain: () => "cluster.local" };
const CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER_ID = "spiffe://cluster.local/ns/backend/sa/server";

/** Creates a tracker whose connections feed fresh traffic metrics in a registry of their own. */
function setup(): { tracker: ConnectionTracker; registry: Registry; sink: MemorySink } {
  const tracker = new ConnectionTracker();
  const registry = new Registry();
  const traffic = new TrafficMetrics(lookup);
  traffic.register(registry);
  tracker.observe(traffic);
  return { tracker, registry, sink: new MemorySink() };
}

function outboundHbone(tracker?: ConnectionTracker): ConnectionRecord {
  const init: ConnectionRecordInit = {
    node: "node-1",
    direction: "outbound",
    transport: "hbone",
    src: peerOf("10.0.0.1:40000", client, CLIENT_ID),
    dst: { ...peerOf("10.0.0.2:8080", server, SERVER_ID), service: "backend/api", hbone_addr: "10.0.0.2:15008" },
    tracker,
    workload: client.uid,
  };
  return new ConnectionRecord(init);
}

function inboundPlaintext(tracker?: ConnectionTracker): ConnectionRecord {
  return new ConnectionRecord({
    node: "node-1",
    direction: "inbound",
    transport: "plaintext",
    src: peerOf("192.168.1.9:50000", undefined),
    dst: peerOf("10.0.0.2:8080", server, SERVER_ID),
    tracker,
    workload: server.uid,
  });
}

interface Sample {
  labels: Record<string, string>;
  value: number;
}

/** Parses the Prometheus text format into samples by metric name. Label values here contain no escaped quotes. */
function parseExposition(text: string): Map<string, Sample[]> {
  const samples = new Map<string, Sample[]>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (match === null) throw new Error(`unparsable exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const pair of (match[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"/g)) labels[pair[1]] = pair[2];
    const list = samples.get(match[1]) ?? [];
    list.push({ labels, value: Number(match[3]) });
    samples.set(match[1], list);
  }
  return samples;
}

async function scrape(registry: Registry): Promise<Map<string, Sample[]>> {
  return parseExposition(await registry.metrics());
}

function valueOf(samples: Map<string, Sample[]>, name: string, where: Record<string, string> = {}): number | undefined {
  const found = (samples.get(name) ?? []).filter((sample) => Object.entries(where).every(([key, value]) => sample.labels[key] === value));
  return found.length === 0 ? undefined : found.reduce((sum, sample) => sum + sample.value, 0);
}

test("outbound HBONE labels have reporter source and mutual TLS", (t) => {
  const labels = trafficLabels(outboundHbone(), lookup);
  t.is(labels.reporter, "source");
  t.is(labels.connection_security_policy, "mutual_tls");
  t.is(labels.request_protocol, "tcp");
  t.is(labels.response_flags, "-");
  t.is(labels.source_workload, "client-7d9f");
  t.is(labels.source_workload_namespace, "shop");
  t.is(labels.source_canonical_service, "client");
  t.is(labels.source_canonical_revision, "v2");
  t.is(labels.source_app, "client");
  t.is(labels.source_version, "v2");
  t.is(labels.source_principal, CLIENT_ID);
  t.is(labels.source_cluster, "Kubernetes");
  t.is(labels.destination_service, "api.backend.svc.cluster.local");
  t.is(labels.destination_service_name, "api");
  t.is(labels.destination_service_namespace, "backend");
  t.is(labels.destination_workload, "server-5c6b");
  t.is(labels.destination_canonical_service, "api");
  t.is(labels.destination_canonical_revision, "r7");
  t.is(labels.destination_principal, SERVER_ID);
  t.is(labels.destination_cluster, "Kubernetes");
});

test("inbound plaintext labels have reporter destination and unknowns", (t) => {
  const labels = trafficLabels(inboundPlaintext(), lookup);
  t.is(labels.reporter, "destination");
  t.is(labels.connection_security_policy, "unknown");
  t.is(labels.source_workload, "unknown");
  t.is(labels.source_workload_namespace, "unknown");
  t.is(labels.source_canonical_service, "unknown");
  t.is(labels.source_principal, "unknown");
  t.is(labels.source_cluster, "unknown");
  t.is(labels.destination_service, "unknown");
  t.is(labels.destination_workload, "server-5c6b");
  t.is(labels.destination_principal, SERVER_ID);
});

test("canonical names follow Istio's label order", (t) => {
  const base = workload("web-1", "shop", "web", "10.0.0.3");
  t.is(canonicalService({ ...base, labels: {} }), "web-1");
  t.is(canonicalService({ ...base, labels: { app: "web" } }), "web");
  t.is(canonicalService({ ...base, labels: { app: "web", "app.kubernetes.io/name": "storefront" } }), "storefront");
  t.is(canonicalRevision({ ...base, labels: {} }), "latest");
  t.is(canonicalRevision({ ...base, labels: { version: "v1", "app.kubernetes.io/version": "1.2" } }), "1.2");
});

test("counters stay monotonic from open to close", async (t) => {
  const { tracker, registry, sink } = setup();
  const record = outboundHbone(tracker);
  record.opened(sink);
  const opened = await scrape(registry);
  t.is(valueOf(opened, "istio_tcp_connections_opened_total", { reporter: "source" }), 1);
  // As in ztunnel, the closed series of a label set exists once a connection of it closed.
  t.is(valueOf(opened, "istio_tcp_connections_closed_total", { reporter: "source" }), undefined);
  t.is(valueOf(opened, "istio_tcp_received_bytes_total"), 0);

  // The copy adds to the record's counters while bytes flow; a scrape reads them before the close.
  record.counters.bytesForward += 1_000;
  record.counters.bytesBackward += 50;
  const flowing = await scrape(registry);
  t.is(valueOf(flowing, "istio_tcp_received_bytes_total", { reporter: "source" }), 1_000);
  t.is(valueOf(flowing, "istio_tcp_sent_bytes_total", { reporter: "source" }), 50);

  record.counters.bytesForward += 24;
  record.write(sink, silentLogger());
  const closed = await scrape(registry);
  t.is(valueOf(closed, "istio_tcp_connections_opened_total"), 1);
  t.is(valueOf(closed, "istio_tcp_connections_closed_total"), 1);
  t.is(valueOf(closed, "istio_tcp_received_bytes_total"), 1_024);
  t.is(valueOf(closed, "istio_tcp_sent_bytes_total"), 50);
  t.is(sink.records[0].bytes_sent, 1_024);

  // A second write changes nothing, and the label set stays after its last connection closed.
  record.write(sink, silentLogger());
  const again = await scrape(registry);
  t.is(valueOf(again, "istio_tcp_connections_closed_total"), 1);
  t.is(valueOf(again, "istio_tcp_received_bytes_total"), 1_024);
});

test("denial counts as opened, closed and failed", async (t) => {
  const { tracker, registry, sink } = setup();
  const record = inboundPlaintext(tracker);
  record.routed = true;
  record.deny("no_allow_match", new AgentError("POLICY_DENIED", "denied for the test"));
  record.write(sink, silentLogger());
  const samples = await scrape(registry);
  const destination = { reporter: "destination" };
  t.is(valueOf(samples, "istio_tcp_connections_opened_total", { ...destination, response_flags: "-" }), 1);
  t.is(valueOf(samples, "istio_tcp_connections_opened_total"), 1);
  t.is(valueOf(samples, "istio_tcp_connections_closed_total", { ...destination, response_flags: "DENY" }), 1);
  t.is(valueOf(samples, "istio_tcp_connections_closed_total"), 1);
  t.is(valueOf(samples, "istio_tcp_connections_failed_total", { ...destination, response_flags: "DENY" }), 1);
  t.is(valueOf(samples, "istio_tcp_connections_failed_total"), 1);
  t.is(valueOf(samples, "istio_tcp_received_bytes_total", { response_flags: "-" }), 0);
});

test("failure before routing counts nowhere", async (t) => {
  const { tracker, registry, sink } = setup();
  const record = inboundPlaintext(tracker);
  record.deny("proxy_port", new AgentError("PROXY_PORT", "proxy port for the test"));
  record.write(sink, silentLogger());
  const samples = await scrape(registry);
  for (const name of ["istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_connections_failed_total", "istio_tcp_sent_bytes_total"]) {
    t.is(valueOf(samples, name), undefined, name);
  }
});

test("reset after establishment counts as failed CONNECT", async (t) => {
  const { tracker, registry, sink } = setup();
  const record = outboundHbone(tracker);
  record.opened(sink);
  record.counters.bytesForward += 300;
  record.fail(new AgentError("STREAM_RESET", "reset for the test"));
  record.write(sink, silentLogger());
  const samples = await scrape(registry);
  t.is(valueOf(samples, "istio_tcp_connections_opened_total", { response_flags: "-" }), 1);
  t.is(valueOf(samples, "istio_tcp_connections_closed_total", { response_flags: "CONNECT" }), 1);
  t.is(valueOf(samples, "istio_tcp_connections_closed_total", { response_flags: "-" }), undefined);
  t.is(valueOf(samples, "istio_tcp_connections_failed_total", { response_flags: "CONNECT" }), 1);
  t.is(valueOf(samples, "istio_tcp_received_bytes_total", { response_flags: "-" }), 300);
});

test("drained connection closes without a flag", async (t) => {
  const { tracker, registry, sink } = setup();
  const record = outboundHbone(tracker);
  record.opened(sink);
  record.fail(new AgentError("DRAIN_TIMEOUT", "drained for the test"));
  record.write(sink, silentLogger());
  const samples = await scrape(registry);
  t.is(valueOf(samples, "istio_tcp_connections_closed_total", { response_flags: "-" }), 1);
  t.is(valueOf(samples, "istio_tcp_connections_failed_total"), undefined);
});

const flagCases: [string | undefined, string][] = [
  [undefined, "-"],
  ["DRAIN_TIMEOUT", "-"],
  ["POLICY_DENIED", "DENY"],
  ["MTLS_REQUIRED", "DENY"],
  ["POLICY_CHANGED", "DENY"],
  ["UPSTREAM_CONNECT_FAILED", "CONNECT"],
  ["TUNNEL_REJECTED", "CONNECT"],
  ["STREAM_RESET", "CONNECT"],
  ["INTERNAL", "CONNECT"],
  ["TLS_FAILURE", "TLS_FAILURE"],
  ["UNKNOWN_ROOT", "TLS_FAILURE"],
  ["IDENTITY_ERROR", "IDENTITY_ERROR"],
  ["NO_CERTIFICATE", "IDENTITY_ERROR"],
  ["NO_HEALTHY_ENDPOINT", "CONNECT"],
];

for (const [code, flags] of flagCases) {
  test(`responseFlagsOf ${code ?? "no error"} is ${flags}`, (t) => {
    const record = inboundPlaintext();
    if (code !== undefined) record.fail(new AgentError(code as ConstructorParameters<typeof AgentError>[0], "for the test"));
    t.is(responseFlagsOf(record), flags);
  });
}

test("denial seen by the source is CONNECT", (t) => {
  // ztunnel's source side gets the destination's 401 as a failed CONNECT.
  const record = outboundHbone();
  record.fail(new AgentError("POLICY_DENIED", "denied at the destination"));
  t.is(responseFlagsOf(record), "CONNECT");
});

test("exposition equals a prom-client Counter's", async (t) => {
  // Label values with the characters the text format escapes, and several label sets and flags.
  const odd = { ...client, uid: "shop/odd", name: "odd", labels: { app: 'we"ird\\app', version: "line\nbreak" } };
  const workloads = new Map<string, Workload>([...WORKLOADS, [odd.uid, odd]]);
  const tracker = new ConnectionTracker();
  const traffic = new TrafficMetrics({ workload: (uid) => workloads.get(uid), trustDomain: () => "cluster.local" });
  const registry = new Registry();
  traffic.register(registry);
  tracker.observe(traffic);
  const sink = new MemorySink();
  const records = [outboundHbone(tracker), inboundPlaintext(tracker), outboundHbone(tracker)];
  const oddRecord = new ConnectionRecord({ node: "node-1", direction: "outbound", transport: "hbone", src: peerOf("10.0.0.9:1", odd, CLIENT_ID), dst: peerOf("10.0.0.2:8080", server, SERVER_ID), tracker });
  for (const record of [...records, oddRecord]) record.opened(sink);
  records[0].counters.bytesForward = 11;
  records[1].fail(new AgentError("POLICY_CHANGED", "for the test"));
  oddRecord.counters.bytesBackward = 5;
  for (const record of [records[0], records[1], oddRecord]) record.write(sink, silentLogger());

  // The reference: prom-client Counters given the same samples, read from the JSON of TrafficMetrics.
  const reference = new Registry();
  for (const family of await registry.getMetricsAsJSON()) {
    const counter = new Counter({ name: family.name, help: family.help, labelNames: TRAFFIC_LABEL_NAMES, registers: [reference] });
    for (const sample of family.values) counter.inc(sample.labels as Record<string, string>, sample.value);
  }
  t.is(await registry.metrics(), await reference.metrics());
  t.true((await registry.metrics()).includes('source_app="we\\"ird\\\\app"'), "the quote and backslash are escaped");
  t.is(valueOf(await scrape(registry), "istio_tcp_received_bytes_total", { reporter: "source" }), 11);
});

test("tracker lists open connections oldest first", (t) => {
  const { tracker, sink } = setup();
  const first = outboundHbone(tracker);
  const second = inboundPlaintext(tracker);
  t.deepEqual(tracker.counts(), { inbound: 1, outbound: 1 });
  t.deepEqual(
    tracker.views().map((view) => view.id),
    [first.id, second.id],
  );
  const [outbound] = tracker.views("outbound");
  t.is(outbound.workload, "shop/client-7d9f");
  t.is(outbound.protocol, "HBONE");
  t.is(outbound.local, "10.0.0.1:40000");
  t.is(outbound.remote, "10.0.0.2:15008");
  t.is(outbound.remoteTarget, "10.0.0.2:8080");
  t.is(tracker.views("inbound")[0].protocol, "TCP");

  first.counters.bytesForward = 7;
  t.is(tracker.views("outbound")[0].bytesSent, 7);
  first.write(sink, silentLogger());
  first.write(sink, silentLogger());
  t.deepEqual(tracker.counts(), { inbound: 1, outbound: 0 });
  t.deepEqual(
    tracker.views().map((view) => view.id),
    [second.id],
  );
});

test("agent metrics render capture, certificates and connections", async (t) => {
  const registry = new Registry();
  registerAgentMetrics(registry, {
    version: "1.2.3",
    capture: () => ({ mode: "ebpf", requested: "auto" }),
    captureMaps: () => [{ name: "aa_enrolled", entries: 3, maxEntries: 4096 }],
    workloads: () => ({ enrolled: 3, pending: 2, isolated: 1 }),
    certificates: () => [
      { identity: CLIENT_ID, state: "valid", notAfter: "2030-01-01T00:00:00.000Z", failures: 0, workloads: [client.uid] },
      { identity: SERVER_ID, state: "pending", failures: 2, workloads: [server.uid] },
    ],
    policyRejections: () => 4,
    rejectedPolicies: () => 2,
    connections: () => ({ inbound: 5, outbound: 6 }),
  });
  const samples = await scrape(registry);
  t.is(valueOf(samples, "istio_build", { component: "ztunnel", tag: "1.2.3" }), 1);
  t.is(valueOf(samples, "ambient_agent_capture_mode", { mode: "ebpf", requested: "auto" }), 1);
  t.is(valueOf(samples, "ambient_agent_capture_map_entries", { map: "aa_enrolled" }), 3);
  t.is(valueOf(samples, "ambient_agent_capture_map_max_entries", { map: "aa_enrolled" }), 4096);
  t.is(valueOf(samples, "ambient_agent_enrolled_pods"), 3);
  t.is(valueOf(samples, "ambient_agent_isolated_pods"), 1);
  t.is(valueOf(samples, "ambient_agent_pending_pods"), 2);
  t.is(valueOf(samples, "ambient_agent_certificate_expiry_timestamp_seconds", { identity: CLIENT_ID }), Date.parse("2030-01-01T00:00:00Z") / 1000);
  t.is(valueOf(samples, "ambient_agent_certificate_expiry_timestamp_seconds", { identity: SERVER_ID }), undefined);
  t.is(valueOf(samples, "ambient_agent_certificates", { state: "pending" }), 1);
  t.is(valueOf(samples, "ambient_agent_certificates", { state: "expired" }), 0);
  t.is(valueOf(samples, "ambient_agent_policy_rejections_total"), 4);
  t.is(valueOf(samples, "ambient_agent_rejected_policies"), 2);
  t.is(valueOf(samples, "ambient_agent_connections_open", { direction: "outbound" }), 6);
});

test("passthrough principals as ztunnel sets them", (t) => {
  // A connection to a pod outside the mesh: no mTLS, so no source principal, while the known
  // destination workload has its identity as principal.
  const record = new ConnectionRecord({
    node: "node-1",
    direction: "outbound",
    transport: "plaintext",
    src: peerOf("10.0.0.1:40000", client, CLIENT_ID),
    dst: peerOf("10.0.0.2:8080", server),
    workload: client.uid,
  });
  const labels = trafficLabels(record, lookup);
  t.is(labels.source_principal, "unknown");
  t.is(labels.destination_principal, SERVER_ID);
  t.is(labels.connection_security_policy, "unknown");
  t.is(labels.destination_zone, "unknown");
});
