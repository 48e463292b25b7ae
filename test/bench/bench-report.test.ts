// Pure parts of the benchmark: statistics, iperf3 report parsing, the results table and CPU
// profile summaries. The benchmark itself runs with `make bench`, not in the test suite.

import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { selfTimes } from "./cpu-profile";
import { parseIperfJson } from "./iperf";
import { cpuSeconds, rssKib } from "./proc-stats";
import { formatMarkdown, formatTable, type BenchResults } from "./report";
import { nearestRank, summarizeLatency } from "./stats";

const RESULTS: BenchResults = {
  time: "2026-01-01T00:00:00.000Z",
  machine: { cores: 2, model: "Test CPU" },
  throughput_gbps: { direct: 14, mesh: 3, native_tls: 2.5 },
  cpu_s_per_gib_per_hop: 1.5,
  latency_us: { direct: { p50: 20, p99: 40 }, mesh: { p50: 70, p99: 300 } },
  new_connections_per_s: { direct: 16000, mesh: 6000 },
  idle_connection_kib: 25,
  agent_rss_mb: 100,
};

test("nearestRank picks the ranked sample", (t) => {
  const samples = Array.from({ length: 100 }, (_, index) => index + 1);
  t.is(nearestRank(samples, 0.5), 50);
  t.is(nearestRank(samples, 0.99), 99);
  t.is(nearestRank(samples, 1), 100);
  t.is(nearestRank([7], 0.01), 7);
  t.true(Number.isNaN(nearestRank([], 0.5)));
});

test("summarizeLatency sorts before ranking", (t) => {
  const summary = summarizeLatency([30, 10, 20, 40]);
  t.is(summary.count, 4);
  t.is(summary.p50, 20);
  t.is(summary.p99, 40);
  t.is(summary.mean, 25);
  t.is(summary.max, 40);
});

test("parseIperfJson reads the received totals", (t) => {
  const report = { end: { sum_received: { bits_per_second: 8e9, bytes: 5_000_000_000, seconds: 5 } } };
  t.deepEqual(parseIperfJson(JSON.stringify(report)), { bitsPerSecond: 8e9, bytes: 5_000_000_000, seconds: 5 });
});

test("parseIperfJson rejects an iperf3 error report", (t) => {
  t.throws(() => parseIperfJson(JSON.stringify({ error: "unable to connect to server" })), { message: /unable to connect/ });
  t.throws(() => parseIperfJson(JSON.stringify({ end: { sum_received: { bits_per_second: 0, bytes: 0, seconds: 5 } } })), { message: /no received bytes/ });
});

test("formatTable compares each figure with its target", (t) => {
  const lines = formatTable(RESULTS).split("\n");
  const row = (figure: string): string => lines.find((line) => line.startsWith(figure)) ?? "";
  t.regex(row("throughput"), /mesh >= native_tls\s+yes$/);
  t.regex(row("agent CPU-s"), /<= 1\.0\s+no$/);
  t.regex(row("latency p50"), /added <= 60 \(now 50\)\s+yes$/);
  t.regex(row("latency p99"), /added <= 200 \(now 260\)\s+no$/);
  t.regex(row("new connections"), /mesh >= 5000\s+yes$/);
  t.regex(row("KiB per idle"), /<= 30\s+yes$/);
  t.true(lines.at(-1)?.includes("Test CPU, 2 cores"));
});

test("formatMarkdown renders one row per figure", (t) => {
  const rows = formatMarkdown(RESULTS).split("\n");
  t.is(rows.length, 2 + 7);
  t.is(rows[2], "| throughput, Gbit/s (1 stream) | 14 | 3 | 2.5 | mesh >= native_tls | yes |");
});

test("proc-stats reads this process", (t) => {
  t.true(cpuSeconds(process.pid) > 0);
  t.true(rssKib(process.pid) > 1024);
});

test("selfTimes sums samples per function", (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "bench-profile-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const frame = (functionName: string) => ({ functionName, url: "", lineNumber: 0, columnNumber: 0, scriptId: "0" });
  const profile = {
    nodes: [
      { id: 1, callFrame: frame("(idle)") },
      { id: 2, callFrame: frame("encrypt") },
      { id: 3, callFrame: frame("(garbage collector)") },
    ],
    samples: [1, 2, 2, 3, 2],
    timeDeltas: [5000, 1000, 1000, 1000, 1000],
  };
  const file = path.join(dir, "agent.cpuprofile");
  fs.writeFileSync(file, JSON.stringify(profile));
  const result = selfTimes(file);
  t.is(result.totalMs, 4);
  t.deepEqual(result.functions, [
    { name: "encrypt", ms: 3 },
    { name: "(garbage collector)", ms: 1 },
  ]);
});
