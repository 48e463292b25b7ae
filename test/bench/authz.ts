// The authorization figures of `make bench`, measured in this process without namespaces or agents:
//
//   decision   authorizerFor(state, workload, settings).evaluate(connection), as the inbound proxy
//              calls it, with 10,000 AuthorizationPolicies spread over 100 namespaces. The allowed
//              connection matches the last ALLOW policy by uid. The denied one matches no policy, so
//              every DENY and ALLOW policy of the workload that its identity and port may match is
//              checked. Each is timed twice: with the same facts every time, and with a new source
//              address every time. The denied one is also timed with a new peer identity every
//              time. Its candidate lists are then built for every decision
//   worst case the same with 1,000 and 10,000 policies that all apply to one workload, from its own
//              namespace and from the root namespace, with a new source address every time
//   loading    ManifestSource reading a folder of 100 files with 100 policies each, and MeshState built
//   change     one file rewritten with one policy changed, refresh(), the new MeshState and the
//              authorizer of a workload that policy applies to
//
// Decisions are timed in batches (process.hrtime.bigint() around a batch, divided by its size),
// because one decision is shorter than the timer's resolution; p50, p99 and max are over batches.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import YAML from "yaml";
import { ManifestSource, buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import { silentLogger } from "../../agent/log";
import type { RbacConnection } from "../../agent/rbac/types";
import { authorizerFor, type AuthorizationSettings } from "../../agent/rbac/authorize";
import { MeshState } from "../../agent/state/mesh-state";
import { round, summarizeLatency, type LatencySummary } from "./stats";

/** Target of one decision with 10,000 policies loaded, at p99. */
export const DECISION_TARGET_US = 5;
/** Target of loading or changing one policy, at p99. */
export const CHANGE_TARGET_MS = 50;

const NAMESPACES = 100;
const POLICIES_PER_NAMESPACE = 100;
const PODS_PER_NAMESPACE = 10;
const ROOT_NAMESPACE = "istio-system";
const SETTINGS: AuthorizationSettings = { rootNamespace: ROOT_NAMESPACE, trustDomain: "cluster.local", trustDomainAliases: [] };

export interface DecisionFigures extends LatencySummary {
  /** Decisions per timed batch; the summary is over batch means. */
  batch: number;
  decision: string;
  reason: string;
}

export interface AuthzFigures {
  policies: number;
  namespaces: number;
  /** Policies that apply to the workload of the decision figures. */
  policies_per_workload: number;
  /** The same facts every time, and a new source address every time. */
  decision_us: {
    allowed: DecisionFigures;
    denied: DecisionFigures;
    allowed_new: DecisionFigures;
    denied_new: DecisionFigures;
    denied_new_identity: DecisionFigures;
  };
  worst_case_us: Record<string, DecisionFigures>;
  load_ms: { read_and_parse: number; mesh_state: number };
  change_ms: LatencySummary;
}

interface Settings {
  decisions: number;
  worstCaseDecisions: number;
  changes: number;
}

const FULL: Settings = { decisions: 200_000, worstCaseDecisions: 20_000, changes: 100 };
const QUICK: Settings = { decisions: 20_000, worstCaseDecisions: 2_000, changes: 10 };

// ---------------------------------------------------------------------------------------------
// The generated mesh

const namespaceName = (index: number): string => `ns-${String(index).padStart(3, "0")}`;

/**
 * Returns the manifest of generated policy `index` of `namespace`: a DENY for every fourth, a
 * selector for every third one, and rules that neither benchmark connection matches, over
 * principals, namespaces, service accounts, ipBlocks, ports and `when` conditions.
 */
function policyManifest(namespace: string, index: number, withSelectors: boolean, variant = 0): object {
  const action = index % 4 === 0 ? "DENY" : "ALLOW";
  const spec: Record<string, unknown> = { action, rules: action === "DENY" ? denyRules(namespace, index, variant) : allowRules(namespace, index, variant) };
  if (withSelectors && index % 3 === 0) spec.selector = { matchLabels: { app: `app-${index % 7}` } };
  return {
    apiVersion: "security.istio.io/v1",
    kind: "AuthorizationPolicy",
    metadata: { name: `p-${String(index).padStart(5, "0")}`, namespace },
    spec,
  };
}

function denyRules(namespace: string, index: number, variant: number): object[] {
  switch (index % 5) {
    case 0:
      return [{ from: [{ source: { principals: [`cluster.local/ns/${namespace}/sa/blocked-${index}`] } }], to: [{ operation: { ports: ["8080"] } }] }];
    case 1:
      return [{ from: [{ source: { namespaces: [`quarantine-${index}`] } }] }];
    case 2:
      return [{ from: [{ source: { ipBlocks: [`192.168.${index % 256}.0/24`] } }] }];
    case 3:
      return [{ to: [{ operation: { ports: [String(9000 + ((index + variant) % 1000))] } }] }];
    default:
      return [{ when: [{ key: "source.ip", values: [`172.16.${index % 256}.0/24`] }] }];
  }
}

function allowRules(namespace: string, index: number, variant: number): object[] {
  switch (index % 5) {
    case 0:
      return [{ from: [{ source: { principals: [`cluster.local/ns/${namespace}/sa/client-${index}`] } }], to: [{ operation: { ports: ["8080"] } }] }];
    case 1:
      return [{ from: [{ source: { namespaces: [`team-${index}`] } }] }];
    case 2:
      return [{ from: [{ source: { ipBlocks: [`10.${100 + (index % 100)}.0.0/16`] } }], to: [{ operation: { ports: ["8080", String(8443 + variant)] } }] }];
    case 3:
      return [{ from: [{ source: { serviceAccounts: [`client-${index}`, `${namespace}/worker-${index}`] } }] }];
    default:
      return [
        { from: [{ source: { principals: [`cluster.local/ns/team-${index}/*`] } }] },
        { to: [{ operation: { notPorts: ["8080"] } }] },
      ];
  }
}

/** Returns the ALLOW policy that the allowed connection matches; its name sorts after every generated one. */
function frontendPolicy(namespace: string): object {
  return {
    apiVersion: "security.istio.io/v1",
    kind: "AuthorizationPolicy",
    metadata: { name: "zz-allow-frontend", namespace },
    spec: { action: "ALLOW", rules: [{ from: [{ source: { principals: [`cluster.local/ns/${namespace}/sa/frontend`] } }], to: [{ operation: { ports: ["8080"] } }] }] },
  };
}

/** Returns the YAML of `count` policies of one namespace: count - 1 generated and the frontend policy last. */
function namespacePolicies(namespace: string, count: number, withSelectors: boolean, changed?: { index: number; variant: number }): string {
  const documents: object[] = [];
  for (let index = 0; index < count - 1; index += 1) {
    const variant = changed?.index === index ? changed.variant : 0;
    documents.push(policyManifest(namespace, index, withSelectors, variant));
  }
  documents.push(frontendPolicy(namespace));
  return documents.map((document) => YAML.stringify(document)).join("---\n");
}

function podsManifest(namespaces: string[]): string {
  const documents: object[] = [];
  namespaces.forEach((namespace, namespaceIndex) => {
    for (let pod = 0; pod < PODS_PER_NAMESPACE; pod += 1) {
      documents.push({
        apiVersion: "v1",
        kind: "Pod",
        metadata: { name: `w-${pod}`, namespace, labels: { app: `app-${pod % 7}` } },
        spec: { nodeName: "node-a", serviceAccountName: `sa-${pod}` },
        status: { podIP: `10.${200 + Math.floor(namespaceIndex / 256)}.${namespaceIndex % 256}.${10 + pod}` },
      });
    }
  });
  return documents.map((document) => YAML.stringify(document)).join("---\n");
}

function allowedConnection(namespace: string, destinationIp: string): RbacConnection {
  return {
    sourceIdentity: { trustDomain: "cluster.local", namespace, serviceAccount: "frontend" },
    sourceIp: "10.244.42.200",
    destinationIp,
    destinationPort: 8080,
  };
}

function deniedConnection(destinationIp: string): RbacConnection {
  return {
    sourceIdentity: { trustDomain: "cluster.local", namespace: "ns-077", serviceAccount: "intruder" },
    sourceIp: "10.250.0.1",
    destinationIp,
    destinationPort: 8080,
  };
}

// ---------------------------------------------------------------------------------------------
// Timing

/**
 * Returns 4,096 copies of `connection`, each from another source address in 10.244.0.0/16 (none
 * of which a generated policy names).
 */
function newSources(connection: RbacConnection): RbacConnection[] {
  return Array.from({ length: 4_096 }, (_, index) => ({ ...connection, sourceIp: `10.244.${index >> 8}.${index & 255}` }));
}

/**
 * Returns 4,096 copies of `connection`, each from another service account of its namespace, more
 * peer identities than an authorizer keeps candidate lists for.
 */
function newIdentities(connection: RbacConnection): RbacConnection[] {
  const identity = connection.sourceIdentity!;
  return Array.from({ length: 4_096 }, (_, index) => ({ ...connection, sourceIdentity: { ...identity, serviceAccount: `${identity.serviceAccount}-${index}` } }));
}

/** Times `count` decisions to workload `uid` of `connections` in turn, as the inbound proxy makes them. */
function timeDecisions(state: MeshState, uid: string, connections: RbacConnection[], count: number, maxSeconds: number): DecisionFigures {
  let turn = 0;
  const decide = () => authorizerFor(state, state.workload(uid)!, SETTINGS).evaluate(connections[turn++ % connections.length]);
  const result = decide();
  for (let warmup = 0; warmup < Math.min(count / 10, 10_000); warmup += 1) decide();
  const batch = batchSize(decide);

  const samples: number[] = [];
  const deadline = process.hrtime.bigint() + BigInt(Math.round(maxSeconds * 1e9));
  for (let done = 0; done < count; done += batch) {
    const start = process.hrtime.bigint();
    for (let index = 0; index < batch; index += 1) decide();
    const end = process.hrtime.bigint();
    samples.push(Number(end - start) / 1000 / batch);
    if (end > deadline) break;
  }
  const summary = summarizeLatency(samples);
  return { ...roundSummary(summary, 3), count: samples.length * batch, batch, decision: result.decision, reason: result.reason };
}

/** Returns a batch size that makes one batch last about 500 µs, from 1 to 100 decisions. */
function batchSize(decide: () => unknown): number {
  const start = process.hrtime.bigint();
  for (let index = 0; index < 100; index += 1) decide();
  const perDecisionNs = Number(process.hrtime.bigint() - start) / 100;
  return Math.min(100, Math.max(1, Math.round(500_000 / perDecisionNs)));
}

function roundSummary(summary: LatencySummary, digits: number): LatencySummary {
  return { count: summary.count, p50: round(summary.p50, digits), p99: round(summary.p99, digits), mean: round(summary.mean, digits), max: round(summary.max, digits) };
}

function millisecondsSince(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e6;
}

// ---------------------------------------------------------------------------------------------
// Measurements

/** Writes the 100 policy files and the pod file into `dir`. */
export function writeMesh(dir: string, namespaces: string[]): void {
  for (const namespace of namespaces) {
    fs.writeFileSync(path.join(dir, `policies-${namespace}.yaml`), namespacePolicies(namespace, POLICIES_PER_NAMESPACE, true));
  }
  fs.writeFileSync(path.join(dir, "pods.yaml"), podsManifest(namespaces));
}

/** Loads the folder from scratch, times the decisions, then times changes of one policy. */
async function measureMesh(dir: string, settings: Settings, step: (message: string) => void) {
  const namespaces = Array.from({ length: NAMESPACES }, (_, index) => namespaceName(index));
  writeMesh(dir, namespaces);

  step(`authz: loading ${NAMESPACES * POLICIES_PER_NAMESPACE} policies from ${NAMESPACES} files`);
  // Only refresh() re-reads: the watch and the poll would otherwise add re-reads to the timed changes.
  const source = new ManifestSource(dir, silentLogger(), { debounceMs: 3_600_000, pollIntervalMs: 3_600_000 });
  try {
    const loadStart = process.hrtime.bigint();
    await source.start();
    const readAndParse = millisecondsSince(loadStart);
    const stateStart = process.hrtime.bigint();
    let state = new MeshState(source.snapshot());
    const meshState = millisecondsSince(stateStart);
    if (state.snapshot.authorizationPolicies.size !== NAMESPACES * POLICIES_PER_NAMESPACE) {
      throw new Error(`expected ${NAMESPACES * POLICIES_PER_NAMESPACE} policies, loaded ${state.snapshot.authorizationPolicies.size}`);
    }

    const namespace = namespaces[42];
    const target = state.workload(`${namespace}/w-3`)!;
    const policiesPerWorkload = state.policiesForWorkload(target, ROOT_NAMESPACE).length;
    step(`authz: ${settings.decisions} decisions per connection, ${policiesPerWorkload} policies apply to ${target.uid}`);
    const allowedOnce = allowedConnection(namespace, target.ip);
    const deniedOnce = deniedConnection(target.ip);
    const allowed = timeDecisions(state, target.uid, [allowedOnce], settings.decisions, 30);
    const denied = timeDecisions(state, target.uid, [deniedOnce], settings.decisions, 30);
    const allowedNew = timeDecisions(state, target.uid, newSources(allowedOnce), settings.decisions, 30);
    const deniedNew = timeDecisions(state, target.uid, newSources(deniedOnce), settings.decisions, 30);
    const deniedNewIdentity = timeDecisions(state, target.uid, newIdentities(deniedOnce), settings.decisions, 30);
    for (const figures of [allowed, allowedNew]) expectOutcome(figures, "allow", "allowed_by_policy");
    for (const figures of [denied, deniedNew, deniedNewIdentity]) expectOutcome(figures, "deny", "no_allow_match");

    step(`authz: ${settings.changes} changes of one policy`);
    const changes: number[] = [];
    const file = path.join(dir, `policies-${namespace}.yaml`);
    for (let change = 1; change <= settings.changes; change += 1) {
      // Policy 8 is a namespace-wide DENY of one port (9000 + index + variant), so it applies to the target.
      const text = namespacePolicies(namespace, POLICIES_PER_NAMESPACE, true, { index: 8, variant: change });
      const start = process.hrtime.bigint();
      fs.writeFileSync(file, text);
      await source.refresh();
      state = new MeshState(source.snapshot(), state);
      const authorizer = authorizerFor(state, state.workload(target.uid)!, SETTINGS);
      changes.push(millisecondsSince(start));
      if (authorizer.evaluate({ ...deniedConnection(target.ip), destinationPort: 9008 + change }).reason !== "denied_by_policy") {
        throw new Error(`change ${change}: the changed policy ${namespace}/p-00008 did not take effect`);
      }
    }
    return {
      policiesPerWorkload,
      allowed,
      denied,
      allowedNew,
      deniedNew,
      deniedNewIdentity,
      load: { read_and_parse: round(readAndParse, 1), mesh_state: round(meshState, 1) },
      change: roundSummary(summarizeLatency(changes), 2),
    };
  } finally {
    await source.stop();
  }
}

function expectOutcome(figures: DecisionFigures, decision: string, reason: string): void {
  if (figures.decision !== decision || figures.reason !== reason) {
    throw new Error(`benchmark connection decided ${figures.decision} (${figures.reason}), expected ${decision} (${reason})`);
  }
}

/** Times decisions to one workload that `count` namespace-wide policies of `policyNamespace` apply to. */
function measureWorstCase(count: number, policyNamespace: string, decisions: number): { allowed: DecisionFigures; denied: DecisionFigures } {
  const text = [namespacePolicies(policyNamespace, count, false), podsManifest(["hot"])].join("---\n");
  const parsed = parseManifests("worst-case.yaml", text);
  if (parsed.problems.length > 0) throw new Error(`generated worst-case manifests are invalid: ${parsed.problems[0].message}`);
  const state = new MeshState(buildSnapshot(parsed.objects));
  const target = state.workload("hot/w-3")!;
  const applied = state.policiesForWorkload(target, ROOT_NAMESPACE).length;
  if (applied !== count) throw new Error(`expected ${count} policies to apply to ${target.uid}, found ${applied}`);
  // The frontend policy of `policyNamespace` names the frontend of that namespace.
  const allowed = timeDecisions(state, target.uid, newSources(allowedConnection(policyNamespace, target.ip)), decisions, 20);
  const denied = timeDecisions(state, target.uid, newSources(deniedConnection(target.ip)), decisions, 20);
  expectOutcome(allowed, "allow", "allowed_by_policy");
  expectOutcome(denied, "deny", "no_allow_match");
  return { allowed, denied };
}

export async function measureAuthz(quick: boolean, step: (message: string) => void): Promise<AuthzFigures> {
  const settings = quick ? QUICK : FULL;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-bench-authz-"));
  let mesh: Awaited<ReturnType<typeof measureMesh>>;
  try {
    mesh = await measureMesh(dir, settings, step);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }

  const worstCase: Record<string, DecisionFigures> = {};
  for (const [count, namespace] of [[1_000, "hot"], [10_000, "hot"], [10_000, ROOT_NAMESPACE]] as const) {
    step(`authz: worst case, ${count} policies of ${namespace} apply to one workload`);
    const decisions = Math.max(100, Math.round((settings.worstCaseDecisions * 1_000) / count));
    const figures = measureWorstCase(count, namespace, decisions);
    const scope = namespace === ROOT_NAMESPACE ? "root_namespace" : "same_namespace";
    worstCase[`${scope}_${count}_allowed`] = figures.allowed;
    worstCase[`${scope}_${count}_denied`] = figures.denied;
  }

  return {
    policies: NAMESPACES * POLICIES_PER_NAMESPACE,
    namespaces: NAMESPACES,
    policies_per_workload: mesh.policiesPerWorkload,
    decision_us: {
      allowed: mesh.allowed,
      denied: mesh.denied,
      allowed_new: mesh.allowedNew,
      denied_new: mesh.deniedNew,
      denied_new_identity: mesh.deniedNewIdentity,
    },
    worst_case_us: worstCase,
    load_ms: mesh.load,
    change_ms: mesh.change,
  };
}

// ---------------------------------------------------------------------------------------------
// Report

/** Renders the authorization figures as a plain-text table with their targets. */
export function formatAuthzTable(figures: AuthzFigures, machine: { cores: number; model: string }, time: string): string {
  const decisionRow = (name: string, value: DecisionFigures, target: boolean): string[] => {
    const cells = [`${name} (${value.reason}), batches of ${value.batch}`, value.p50.toFixed(3), value.p99.toFixed(3), value.max.toFixed(3)];
    if (!target) return [...cells, "", ""];
    return [...cells, `p99 <= ${DECISION_TARGET_US}`, value.p99 <= DECISION_TARGET_US ? "yes" : "no"];
  };
  const rows: string[][] = [
    decisionRow(`decision, µs, ${figures.policies} policies, ${figures.policies_per_workload} apply, allowed, same facts`, figures.decision_us.allowed, true),
    decisionRow(`decision, µs, ${figures.policies} policies, ${figures.policies_per_workload} apply, denied, same facts`, figures.decision_us.denied, true),
    decisionRow(`decision, µs, ${figures.policies} policies, ${figures.policies_per_workload} apply, allowed, new source`, figures.decision_us.allowed_new, true),
    decisionRow(`decision, µs, ${figures.policies} policies, ${figures.policies_per_workload} apply, denied, new source`, figures.decision_us.denied_new, true),
    decisionRow(`decision, µs, ${figures.policies} policies, ${figures.policies_per_workload} apply, denied, new identity`, figures.decision_us.denied_new_identity, false),
    ...Object.entries(figures.worst_case_us).map(([name, value]) => decisionRow(`worst case, µs, ${name.replaceAll("_", " ")}`, value, false)),
    ["load from scratch, ms: read and parse", String(figures.load_ms.read_and_parse), "", "", "", ""],
    ["load from scratch, ms: MeshState", String(figures.load_ms.mesh_state), "", "", "", ""],
    [
      `change one policy, ms (${figures.change_ms.count} changes)`,
      figures.change_ms.p50.toFixed(2),
      figures.change_ms.p99.toFixed(2),
      figures.change_ms.max.toFixed(2),
      `p99 <= ${CHANGE_TARGET_MS}`,
      figures.change_ms.p99 <= CHANGE_TARGET_MS ? "yes" : "no",
    ],
  ];
  const header = ["figure", "p50", "p99", "max", "target", "met"];
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((cells) => cells[column].length)));
  const line = (cells: string[]): string => cells.map((cell, column) => cell.padEnd(widths[column])).join("  ").trimEnd();
  return [
    line(header),
    line(widths.map((width) => "-".repeat(width))),
    ...rows.map(line),
    "",
    "Decision times are batch means: process.hrtime.bigint() around a batch, divided by the batch size.",
    `machine: ${machine.model}, ${machine.cores} cores, ${time}`,
  ].join("\n");
}
