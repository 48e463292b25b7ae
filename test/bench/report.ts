// The benchmark's results: the JSON file the run writes and the table it prints, with the targets
// next to the figures. The targets are printed, never asserted.

import type { IdentityFigures } from "./identity";
import type { RotationFigures } from "./cert-rotation";
import fs from "node:fs";
import os from "node:os";
import type { EnrollmentFigures } from "./enrollment";
import type { LookupFigures } from "./lookup";
import { round } from "./stats";

export interface PathLatency {
  p50: number;
  p99: number;
}

/** The content of bench-results.json; the unit of each figure is in its name. */
export interface BenchResults {
  time: string;
  machine: { cores: number; model: string };
  throughput_gbps: { direct: number; mesh: number; native_tls: number };
  cpu_s_per_gib_per_hop: number;
  /**
   * Round-trip latency. `mesh` runs the agents on the CPU of the client and echo server, as `direct`
   * runs its two processes. `mesh_agents_unpinned` lets the scheduler place the agents.
   */
  latency_us: { direct: PathLatency; mesh: PathLatency; mesh_agents_unpinned?: PathLatency };
  new_connections_per_s: { direct: number; mesh: number };
  idle_connection_kib: number;
  agent_rss_mb: number;
  /** Enrolment time and original-destination lookups; absent from runs before they were measured. */
  capture?: CaptureFigures;
  /** Certificate issuance and rotation at node scale; absent from runs before they were measured. */
  identity?: IdentityFigures;
}

/** The figures of the capture layer, which `--capture-only` measures alone. */
export interface CaptureFigures {
  enrollment: EnrollmentFigures;
  /** Enrolment with the agent in nftables capture mode; absent from runs before it was measured. */
  enrollment_nftables?: EnrollmentFigures;
  original_destination_lookup: LookupFigures;
}

/** Target of enrolment: every pod of a node served within this many ms of reading the manifests. */
const ENROLLMENT_TARGET_MS = 2000;
/** Target of one original-destination lookup, in µs. */
const LOOKUP_TARGET_US = 10;

/** Describes the machine the run used. */
export function describeMachine(): BenchResults["machine"] {
  const cpus = os.cpus();
  const fromCpuinfo = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync("/proc/cpuinfo", "utf8"))?.[1];
  return { cores: cpus.length, model: (fromCpuinfo ?? cpus[0]?.model ?? "unknown").trim() };
}

/** Writes the results as pretty-printed JSON. */
export function writeResults(file: string, results: BenchResults): void {
  fs.writeFileSync(file, JSON.stringify(results, null, 2) + "\n");
}

interface Row {
  figure: string;
  direct: string;
  mesh: string;
  nativeTls: string;
  target: string;
  met: boolean | undefined;
}

function format(value: number, digits: number): string {
  return Number.isFinite(value) ? String(round(value, digits)) : "n/a";
}

function buildRows(results: BenchResults): Row[] {
  const latency = results.latency_us;
  const addedP50 = latency.mesh.p50 - latency.direct.p50;
  const addedP99 = latency.mesh.p99 - latency.direct.p99;
  const throughput = results.throughput_gbps;
  return [
    { figure: "throughput, Gbit/s (1 stream)", direct: format(throughput.direct, 2), mesh: format(throughput.mesh, 2), nativeTls: format(throughput.native_tls, 2), target: "mesh >= native_tls", met: throughput.mesh >= throughput.native_tls },
    { figure: "agent CPU-s per GiB per hop", direct: "", mesh: format(results.cpu_s_per_gib_per_hop, 3), nativeTls: "", target: "<= 1.0", met: results.cpu_s_per_gib_per_hop <= 1.0 },
    { figure: "latency p50, µs (1 KiB echo)", direct: format(latency.direct.p50, 1), mesh: format(latency.mesh.p50, 1), nativeTls: "", target: `added <= 60 (now ${format(addedP50, 1)})`, met: addedP50 <= 60 },
    { figure: "latency p99, µs (1 KiB echo)", direct: format(latency.direct.p99, 1), mesh: format(latency.mesh.p99, 1), nativeTls: "", target: `added <= 200 (now ${format(addedP99, 1)})`, met: addedP99 <= 200 },
    ...unpinnedRows(results),
    { figure: "new connections per s", direct: format(results.new_connections_per_s.direct, 0), mesh: format(results.new_connections_per_s.mesh, 0), nativeTls: "", target: "mesh >= 5000", met: results.new_connections_per_s.mesh >= 5000 },
    { figure: "KiB per idle connection", direct: "", mesh: format(results.idle_connection_kib, 1), nativeTls: "", target: "<= 30", met: results.idle_connection_kib <= 30 },
    { figure: "agent RSS, MB (steady state)", direct: "", mesh: format(results.agent_rss_mb, 1), nativeTls: "", target: "", met: undefined },
    ...(results.capture ? captureRows(results.capture) : []),
    ...(results.identity ? identityRows(results.identity) : []),
  ];
}

/** Target of issuance: key, CSR and signature with the embedded CA, median. */
export const ISSUE_TARGET_MS = 5;

/** Rows for workload identity: issuing one certificate, and every identity re-issued under load without a failed connection. */
function identityRows(identity: IdentityFigures): Row[] {
  const row = (figure: string, value: string, target: string, met: boolean | undefined): Row => ({ figure, direct: "", mesh: value, nativeTls: "", target, met });
  const chosen = identity.issue.chosen;
  const rotationRows = (rotation: RotationFigures, ca: string): Row[] => [
    row(
      `${rotation.identities} identities re-issued (${ca}): failed connections`,
      `${rotation.failedConnections} of ${rotation.connections}`,
      "0",
      rotation.failedConnections === 0 && rotation.rotations === rotation.identities && rotation.longLivedSurvived === rotation.longLived,
    ),
    row(`${rotation.identities} identities re-issued (${ca}): s from first to last`, format(rotation.rotationSpreadSeconds, 2), "", undefined),
    row(`${rotation.identities} identities issued at start (${ca}), s`, format(rotation.initialIssueSeconds, 2), "", undefined),
  ];
  return [
    row("certificate issue, ms (embedded CA, p50)", format(chosen.p50_ms, 2), `<= ${ISSUE_TARGET_MS}`, chosen.p50_ms <= ISSUE_TARGET_MS),
    row("certificate issue, ms (embedded CA, p90)", format(chosen.p90_ms, 2), "", undefined),
    ...rotationRows(identity.rotation_embedded, "embedded CA"),
    ...rotationRows(identity.rotation_istio_ca, "Istio CA, gRPC"),
  ];
}

/** Renders the identity figures alone, for an `--identity-only` run. */
export function formatIdentityTable(identity: IdentityFigures, machine: BenchResults["machine"], time: string): string {
  return formatValueTable(identityRows(identity), machine, time);
}

/** Rows for the capture layer: enrolment time and the original-destination lookup. */
function captureRows(capture: CaptureFigures): Row[] {
  const { enrollment, original_destination_lookup: lookup } = capture;
  const row = (figure: string, value: string, target: string, met: boolean | undefined): Row => ({ figure, direct: "", mesh: value, nativeTls: "", target, met });
  const rows = [
    enrollmentRow(enrollment),
    ...(capture.enrollment_nftables ? [enrollmentRow(capture.enrollment_nftables)] : []),
    row("orig-dst lookup, µs (hit, ffi-rs)", format(lookup.ffi_hit_us, 2), `<= ${LOOKUP_TARGET_US}`, lookup.ffi_hit_us <= LOOKUP_TARGET_US),
    row("orig-dst lookup, µs (miss, ffi-rs)", format(lookup.ffi_miss_us, 2), `<= ${LOOKUP_TARGET_US}`, lookup.ffi_miss_us <= LOOKUP_TARGET_US),
  ];
  if (lookup.napi_hit_us !== undefined && lookup.napi_miss_us !== undefined) {
    rows.push(row("orig-dst lookup, µs (hit, Node-API)", format(lookup.napi_hit_us, 2), "(comparison)", undefined));
    rows.push(row("orig-dst lookup, µs (miss, Node-API)", format(lookup.napi_miss_us, 2), "(comparison)", undefined));
  }
  return rows;
}

/** Returns the enrolment row of one run, named after its capture mode. */
function enrollmentRow(enrollment: EnrollmentFigures): Row {
  const figure = `enrolment, ms (${enrollment.pods} pods, median, ${enrollment.capture ?? "ebpf"})`;
  const met = enrollment.median_ms <= ENROLLMENT_TARGET_MS;
  return { figure, direct: "", mesh: format(enrollment.median_ms, 0), nativeTls: "", target: `<= ${ENROLLMENT_TARGET_MS}`, met };
}

/** Renders the capture-layer figures alone, for a `--capture-only` run. */
export function formatCaptureTable(capture: CaptureFigures, machine: BenchResults["machine"], time: string): string {
  return formatValueTable(captureRows(capture), machine, time);
}

/** Renders rows that have one value each (no direct or native_tls column) as a plain-text table. */
function formatValueTable(rows: Row[], machine: BenchResults["machine"], time: string): string {
  const header = ["figure", "value", "target", "met"];
  const body = rows.map((row) => [row.figure, row.mesh, row.target, metText(row.met)]);
  const widths = header.map((title, column) => Math.max(title.length, ...body.map((cells) => cells[column].length)));
  const line = (cells: string[]): string => cells.map((cell, column) => cell.padEnd(widths[column])).join("  ").trimEnd();
  return [line(header), line(widths.map((width) => "-".repeat(width))), ...body.map(line), "", `machine: ${machine.model}, ${machine.cores} cores, ${time}`].join("\n");
}

/** Rows for the mesh round trips with the agents free to run on any CPU, when measured. */
function unpinnedRows(results: BenchResults): Row[] {
  const unpinned = results.latency_us.mesh_agents_unpinned;
  if (!unpinned) return [];
  const direct = results.latency_us.direct;
  return [
    { figure: "latency p50, µs, agents unpinned", direct: "", mesh: format(unpinned.p50, 1), nativeTls: "", target: `(added ${format(unpinned.p50 - direct.p50, 1)})`, met: undefined },
    { figure: "latency p99, µs, agents unpinned", direct: "", mesh: format(unpinned.p99, 1), nativeTls: "", target: `(added ${format(unpinned.p99 - direct.p99, 1)})`, met: undefined },
  ];
}

/** Returns the "met" cell of a row: yes, no, or empty for a figure without target. */
function metText(met: boolean | undefined): string {
  if (met === undefined) return "";
  return met ? "yes" : "no";
}

/** Renders the results as a plain-text table with one row per figure. */
export function formatTable(results: BenchResults): string {
  const header = ["figure", "direct", "mesh", "native_tls", "target", "met"];
  const body = buildRows(results).map((row) => [row.figure, row.direct, row.mesh, row.nativeTls, row.target, metText(row.met)]);
  const widths = header.map((title, column) => Math.max(title.length, ...body.map((cells) => cells[column].length)));
  const line = (cells: string[]): string => cells.map((cell, column) => cell.padEnd(widths[column])).join("  ").trimEnd();
  const machine = `${results.machine.model}, ${results.machine.cores} cores, ${results.time}`;
  return [line(header), line(widths.map((width) => "-".repeat(width))), ...body.map(line), "", `machine: ${machine}`].join("\n");
}

/** Renders the results as a Markdown table, for docs/benchmarks.md. */
export function formatMarkdown(results: BenchResults): string {
  const rows = buildRows(results).map((row) => `| ${row.figure} | ${row.direct} | ${row.mesh} | ${row.nativeTls} | ${row.target} | ${row.met === undefined ? "" : row.met ? "yes" : "no"} |`);
  return ["| figure | direct | mesh | native_tls | target | met |", "|---|---|---|---|---|---|", ...rows].join("\n");
}
