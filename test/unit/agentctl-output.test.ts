// Table, JSON and YAML output of the agentctl commands that read the admin API, from fixtures typed
// by the admin API's views.

import test from "ava";
import YAML from "yaml";
import { UsageError } from "../../agent/cli/admin-client";
import { formatCertificates, formatConnections, formatLogLevels, formatServices, formatStatusView, formatWorkloads } from "../../agent/cli/inspect-output";
import { formatBytes, formatDuration, formatTable, parseOutputFormat, render } from "../../agent/cli/output";
import { parseLogSettings } from "../../agent/cli/inspect-commands";
import { formatStatusReport, statusData } from "../../agent/cli/status-command";
import { synopsisOf } from "../../agent/cli/usage";
import { CERTIFICATE_SHAPE, listProblem, shapeProblem, STATUS_SHAPE } from "../../agent/cli/view-shapes";
import type { CertificateView } from "../../agent/admin/views";
import { CERTIFICATES, CONNECTIONS, LOG_LEVELS, NOW, READINESS, SERVICES, STATUS, WORKLOADS } from "./agentctl-fixtures";

/** Splits a table into rows of cells, cutting each line at the header's column starts. */
function cells(table: string): string[][] {
  const [header, ...rows] = table.trimEnd().split("\n");
  const starts = [...header.matchAll(/(?:^|\s{2})(\S)/g)].map((match) => (match.index ?? 0) + match[0].indexOf(match[1]));
  return [header, ...rows].map((line) => starts.map((start, i) => line.slice(start, starts[i + 1]).trim()));
}

test("table aligns columns under the header", (t) => {
  const table = formatTable(["NAME", "VALUE"], [["a", "1"], ["longer", "22"]]);
  t.is(table, "NAME    VALUE\na       1\nlonger  22\n");
});

test("table leaves the last column unpadded", (t) => {
  const table = formatTable(["A", "B"], [["x", ""], ["y", "long text"]]);
  t.deepEqual(table.split("\n"), ["A  B", "x", "y  long text", ""]);
});

test("output format accepts table json yaml", (t) => {
  t.is(parseOutputFormat(undefined), "table");
  t.is(parseOutputFormat("json"), "json");
  t.is(parseOutputFormat("yaml"), "yaml");
  t.is(parseOutputFormat(undefined, ["json", "yaml"]), "json");
});

test("output format rejects other values by name", (t) => {
  const error = t.throws(() => parseOutputFormat("xml"), { instanceOf: UsageError });
  t.is(error?.message, 'invalid -o "xml": use table, json, yaml');
  const config = t.throws(() => parseOutputFormat("table", ["json", "yaml"]), { instanceOf: UsageError });
  t.is(config?.message, 'invalid -o "table": use json, yaml');
});

test("render json and yaml keep every field", (t) => {
  t.deepEqual(JSON.parse(render("json", WORKLOADS, () => "")), WORKLOADS);
  t.deepEqual(YAML.parse(render("yaml", WORKLOADS, () => "")), WORKLOADS);
  t.is(render("json", STATUS, () => "").split("\n")[1], '  "version": "0.1.0",', "json is indented by two spaces");
  t.is(render("table", STATUS, () => "TABLE"), "TABLE");
});

test("duration keeps the two largest units", (t) => {
  const cases: [number, string][] = [
    [0, "0s"],
    [45, "45s"],
    [303, "5m 3s"],
    [7200, "2h"],
    [8100, "2h 15m"],
    [86_400 * 89 + 3600 * 23 + 59, "89d 23h"],
    [86_400 + 30, "1d"],
    [-90, "1m 30s"],
  ];
  for (const [seconds, expected] of cases) t.is(formatDuration(seconds), expected, `${seconds} s`);
});

test("bytes use binary units", (t) => {
  t.is(formatBytes(0), "0 B");
  t.is(formatBytes(512), "512 B");
  t.is(formatBytes(1536), "1.5 KiB");
  t.is(formatBytes(20 * 1024 * 1024), "20.0 MiB");
});

test("workloads table has the ztunnel columns", (t) => {
  const rows = cells(formatWorkloads(WORKLOADS));
  t.deepEqual(rows[0], ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "STATE"]);
  t.deepEqual(rows[1], ["shop", "web", "10.0.1.5,fd00::1:5", "node-a", "HBONE", "Up"]);
  t.deepEqual(rows[2], ["backend", "api", "10.0.2.7", "node-b", "HBONE", "Remote"]);
  t.deepEqual(rows[3], ["shop", "legacy", "-", "node-a", "TCP", "NotEnrolled"]);
});

test("empty workloads table prints the header", (t) => {
  t.is(formatWorkloads([]), "NAMESPACE  POD NAME  ADDRESS  NODE  PROTOCOL  STATE\n");
});

test("services table shows ports and endpoints", (t) => {
  const rows = cells(formatServices(SERVICES));
  t.deepEqual(rows[0], ["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "PORTS", "ENDPOINTS"]);
  t.deepEqual(rows[1], ["backend", "api", "10.96.0.10", "80->8080/TCP,9090/TCP", "2/3"]);
});

test("certificates table has a row per chain entry", (t) => {
  const [table, notes] = formatCertificates(CERTIFICATES, NOW).split("\n\n");
  const rows = cells(table);
  t.deepEqual(rows[0], ["IDENTITY", "TYPE", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "EXPIRES IN"]);
  t.deepEqual(rows[1], ["spiffe://cluster.local/ns/shop/sa/web", "Leaf", "valid", "0a1b", "2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z", "12h"]);
  t.deepEqual(rows[2], ["spiffe://cluster.local/ns/shop/sa/web", "Root", "expired", "01", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "expired 28d 12h ago"]);
  t.deepEqual(rows[3], ["spiffe://cluster.local/ns/shop/sa/batch", "-", "failing", "-", "-", "-", "-"]);
  t.is(notes, "spiffe://cluster.local/ns/shop/sa/batch: 3 failed requests, next retry at 2026-03-01T12:00:30Z: CA unreachable\n");
});

test("connections table shows the peer identity", (t) => {
  const rows = cells(formatConnections(CONNECTIONS));
  t.deepEqual(rows[0], ["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL", "IDENTITY", "BYTES SENT", "BYTES RECV", "AGE"]);
  t.deepEqual(rows[1], [
    "shop/web",
    "outbound",
    "10.0.1.5:40000",
    "10.0.2.7:15008",
    "10.0.2.7:8080",
    "HBONE",
    "spiffe://cluster.local/ns/backend/sa/api",
    "1.5 KiB",
    "20.0 MiB",
    "5m",
  ]);
  t.deepEqual(rows[2], ["shop/web", "inbound", "10.0.1.5:8080", "10.0.3.2:51000", "-", "TCP", "-", "10 B", "0 B", "2s"]);
});

test("log levels table lists the default first", (t) => {
  t.deepEqual(cells(formatLogLevels(LOG_LEVELS)), [
    ["COMPONENT", "LEVEL"],
    ["(default)", "info"],
    ["capture", "info"],
    ["proxy", "debug"],
  ]);
});

test("status view summarises the node", (t) => {
  const text = formatStatusView(STATUS, NOW);
  t.regex(text, /^agent: version 0\.1\.0 on node node-a \(pid 4242, up 3h 2m\)$/m);
  t.regex(text, /^ready: yes$/m);
  t.regex(text, /^ {2}capture {8}ok$/m);
  t.regex(text, /^capture: ebpf \(--capture auto: all hooks present\)$/m);
  t.regex(text, /^ {2}aa_connect4 +cgroup\/connect4 +\/sys\/fs\/cgroup$/m);
  t.regex(text, /^ {2}aa_netns +25\/100 +25\.0%$/m);
  t.regex(text, /^pods: 1 enrolled, 0 pending, 0 isolated$/m);
  t.regex(text, /^certificates: 2 total: 1 valid, 0 refreshing, 0 pending, 1 failing, 0 expired; next expiry 2026-03-02T00:00:00Z \(12h\)$/m);
  t.regex(text, /^connections: 1 inbound, 1 outbound$/m);
});

test("status view lists connections refused or closed by a limit", (t) => {
  const refusals = [
    { listener: "inbound", reason: "tls_handshake", count: 2 },
    { listener: "outbound", reason: "connections_per_pod", count: 3, flag: "--max-connections-per-pod" },
  ];
  const text = formatStatusView({ ...STATUS, refusals }, NOW);
  t.regex(text, /^connections refused or closed by a limit \(docs\/limits\.md\):$/m);
  t.regex(text, /^ {2}LISTENER +REASON +COUNT +LIMIT$/m);
  t.regex(text, /^ {2}inbound +tls_handshake +2 +-$/m);
  t.regex(text, /^ {2}outbound +connections_per_pod +3 +--max-connections-per-pod$/m);
  t.regex(formatStatusView({ ...STATUS, refusals: [] }, NOW), /^connections refused or closed by a limit: none$/m);
  t.notRegex(formatStatusView(STATUS, NOW), /refused or closed/);
});

test("status view without capture says so", (t) => {
  t.regex(formatStatusView({ ...STATUS, capture: undefined }, NOW), /^capture: not attached$/m);
});

test("status report adds the watches to the view", (t) => {
  const text = formatStatusReport({ status: STATUS, readiness: READINESS }, NOW);
  t.regex(text, /^agent: version 0\.1\.0/);
  t.regex(text, /^configuration source: manifest files$/m);
  t.deepEqual(statusData({ status: STATUS, readiness: { ...READINESS, pending: ["shop/new"] } }), { ...READINESS, ...STATUS, pendingPods: ["shop/new"] });
});

test("status report without view is the readiness", (t) => {
  const text = formatStatusReport({ readiness: READINESS }, NOW);
  t.regex(text, /^ready: yes\n/);
  t.regex(text, /^enrolled pods: 1$/m);
  t.notRegex(text, /^agent:/m);
  t.deepEqual(statusData({ readiness: READINESS }), READINESS);
});

test("certificates table keeps identities without chain", (t) => {
  const pending: CertificateView = { identity: "spiffe://cluster.local/ns/shop/sa/new", state: "pending", failures: 0, workloads: ["shop/new"], chain: [] };
  const failedOnce: CertificateView = { ...pending, identity: "spiffe://cluster.local/ns/shop/sa/once", state: "failing", failures: 1, lastError: "CA returned 403" };
  const [table, notes] = formatCertificates([pending, failedOnce], NOW).split("\n\n");
  const rows = cells(table);
  t.deepEqual(rows[1], ["spiffe://cluster.local/ns/shop/sa/new", "-", "pending", "-", "-", "-", "-"]);
  t.deepEqual(rows[2], ["spiffe://cluster.local/ns/shop/sa/once", "-", "failing", "-", "-", "-", "-"]);
  t.is(notes, "spiffe://cluster.local/ns/shop/sa/once: 1 failed request: CA returned 403\n");
});

test("status view lists unhealthy certificates", (t) => {
  const failing = CERTIFICATES.filter((certificate) => certificate.state !== "valid");
  const text = formatStatusView(STATUS, NOW, failing);
  t.regex(text, /; next expiry 2026-03-02T00:00:00Z \(12h\)\n {2}spiffe:\/\/cluster\.local\/ns\/shop\/sa\/batch: failing, next retry at 2026-03-01T12:00:30Z: CA unreachable\nconnections:/);
});

test("status view caps the certificate list", (t) => {
  const many: CertificateView[] = Array.from({ length: 13 }, (_, index) => ({
    identity: `spiffe://cluster.local/ns/shop/sa/sa${index}`,
    state: "pending",
    failures: 0,
    workloads: [],
    chain: [],
  }));
  const lines = formatStatusView(STATUS, NOW, many).split("\n");
  t.is(lines.filter((line) => /^ {2}spiffe:/.test(line)).length, 10);
  t.true(lines.includes("  spiffe://cluster.local/ns/shop/sa/sa9: pending"));
  t.true(lines.includes("  and 3 more: agentctl certificates lists them"));
});

test("status report of stopping agent", (t) => {
  const readiness = { ...READINESS, ready: false, stopping: true };
  const text = formatStatusReport({ status: { ...STATUS, ready: false, stopping: true }, readiness }, NOW);
  t.regex(text, /^agent: version 0\.1\.0.*\nstopping: the agent is draining its connections and exits soon\n {2}configuration +ok$/m);
  t.notRegex(text, /^ready:/m);
  const readinessOnly = formatStatusReport({ readiness }, NOW);
  t.regex(readinessOnly, /^stopping: the agent is draining its connections and exits soon$/m);
  t.regex(formatStatusReport({ status: { ...STATUS, ready: false }, readiness: { ...READINESS, ready: false } }, NOW), /^ready: no$/m);
});

test("log settings accept every form", (t) => {
  t.deepEqual(parseLogSettings("access:debug", undefined), ["access:debug"]);
  t.deepEqual(parseLogSettings("access=debug", undefined), ["access:debug"]);
  t.deepEqual(parseLogSettings("access:debug,outbound=warn", undefined), ["access:debug", "outbound:warn"]);
  t.deepEqual(parseLogSettings("info,cni=debug", undefined), ["info", "cni:debug"]);
  t.deepEqual(parseLogSettings("proxy", "trace"), ["proxy:trace"]);
  t.deepEqual(parseLogSettings("proxy, outbound:warn", "trace"), ["proxy:trace", "outbound:warn"]);
});

test("log settings reject bad entries by name", (t) => {
  const cases: [string, string][] = [
    ["proxy", 'missing level for "proxy": write proxy=LEVEL, or add --level LEVEL'],
    ["Proxy=debug", 'invalid log setting "Proxy=debug": write COMPONENT=LEVEL, COMPONENT:LEVEL or LEVEL, for example proxy=debug'],
    ["proxy=loud", 'invalid level "loud" in "proxy=loud": use fatal, error, warn, info, debug, trace, silent'],
    ["proxy=debug,,cni=info", 'invalid log setting "" of "proxy=debug,,cni=info": write COMPONENT=LEVEL, COMPONENT:LEVEL or LEVEL, for example proxy=debug'],
    ["proxy:debug:x", 'invalid log setting "proxy:debug:x": write COMPONENT=LEVEL, COMPONENT:LEVEL or LEVEL, for example proxy=debug'],
  ];
  for (const [argument, message] of cases) {
    const error = t.throws(() => parseLogSettings(argument, undefined), { instanceOf: UsageError }, argument);
    t.is(error?.message, message, argument);
  }
});

test("shape check names the first misfit", (t) => {
  t.is(shapeProblem(STATUS, STATUS_SHAPE), undefined);
  t.is(shapeProblem({ ...STATUS, stopping: true }, STATUS_SHAPE), undefined);
  t.is(listProblem(CERTIFICATES, CERTIFICATE_SHAPE), undefined);
  t.is(shapeProblem([], STATUS_SHAPE), "JSON that is a list, expected an object");
  t.is(shapeProblem({ ...STATUS, version: 1 }, STATUS_SHAPE), 'JSON in which "version" is a number, expected a string');
  t.is(shapeProblem({ ...STATUS, checks: null }, STATUS_SHAPE), 'JSON in which "checks" is null, expected an object');
  t.is(shapeProblem({ ...STATUS, stopping: "yes" }, STATUS_SHAPE), 'JSON in which "stopping" is a string, expected a boolean');
  t.is(shapeProblem({ ...STATUS, certificates: { ...STATUS.certificates, failing: "1" } }, STATUS_SHAPE), 'JSON in which "certificates.failing" is a string, expected a number');
  t.is(listProblem({}, CERTIFICATE_SHAPE), "JSON that is an object, expected a list");
  t.is(listProblem([CERTIFICATES[0], { ...CERTIFICATES[1], chain: {} }], CERTIFICATE_SHAPE), 'JSON in which "[1].chain" is an object, expected a list');
});

test("synopsis lines of a command", (t) => {
  const usage = "usage: x\n\n  ca init --dir DIR\n                     create a CA\n  doctor [--a A]\n         [--b B]\n                     check\n  Options of doctor:\n";
  t.deepEqual(synopsisOf(usage, ["ca"]), ["usage: agentctl ca init --dir DIR"]);
  t.deepEqual(synopsisOf(usage, ["ca", "init"]), ["usage: agentctl ca init --dir DIR"]);
  t.deepEqual(synopsisOf(usage, ["doctor"]), ["usage: agentctl doctor [--a A]", "       [--b B]"]);
  t.deepEqual(synopsisOf(usage, ["ca", "list"]), []);
  t.deepEqual(synopsisOf(usage, []), []);
});
