// The admin API's routes over the agent's state: /status, /workloads, /services, /certificates,
// /connections, /logging and /config_dump, with the shapes of views.ts. The daemon fills
// AdminSources, and each route reads its sources at request time.

import crypto from "node:crypto";

import type { CaptureBackend } from "../capture/backend";
import { readCaptureEntries, type CaptureEntries } from "../capture/ebpf/inspect";
import type { CaptureSelection } from "../capture/probe";
import { KUBERNETES_SOURCE, type KubeHealth } from "../discovery/kube-source";
import type { ManifestProblem } from "../discovery/manifest-problem";
import { enrollmentDecision, type EnrollmentSettings } from "../enroll/enrollment";
import type { EnrolledWorkload } from "../enroll/reconciler";
import { AgentError } from "../errors";
import type { CertificateStatus } from "../identity/cert-manager";
import type { IdentityRuntime } from "../identity/setup";
import { formatSpiffeId } from "../identity/spiffe";
import { InvalidLogLevelError, parseLogLevels, type LogLevels, type Logger } from "../log";
import { workloadIps } from "../state/ip";
import { limitFlagOf, limitSettings, type ProxyLimits } from "../proxy/limits";
import type { MeshState } from "../state/mesh-state";
import type { Direction, ObjectSource, Service, Workload } from "../state/types";
import { readinessChecks, readinessResponse, type ReadinessInputs } from "./readiness";
import { requireState, type AdminPostRoute, type AdminRoutes } from "./server";
import type {
  CertificateChainEntry,
  CertificateView,
  ConnectionView,
  LogLevelsView,
  MapUsageView,
  ProgramView,
  RefusalView,
  ServiceView,
  StatusView,
  WorkloadView,
} from "./views";

/** The open connections of the agent's proxies. */
export interface ConnectionSource {
  views(direction?: Direction): ConnectionView[];
  counts(): { inbound: number; outbound: number };
}

/** The agent's state as the routes read it. Every function returns the current value. */
export interface AdminSources {
  node: string;
  version: string;
  /** Milliseconds since the epoch when the agent started. */
  startedAt: number;
  configurationSource: "kubernetes" | "manifests";
  trustDomain(): string;
  /** The mesh state; undefined until the configuration is read. */
  state(): MeshState | undefined;
  enrollmentSettings(): EnrollmentSettings;
  rootNamespace: string;
  /** The enrolled workloads, or undefined before the reconciler starts. */
  enrolled(): readonly EnrolledWorkload[] | undefined;
  /** The workloads the reconciler was last asked to enrol: this node's ambient pods, one per IP. */
  desired(): readonly Workload[];
  ambiguous(): readonly { workload: string; ip: string; netns: string; cookie: bigint }[];
  isolated(): readonly { workload: string; netns: string; cookie: bigint }[];
  certificates(): readonly CertificateStatus[];
  identity(): IdentityRuntime | undefined;
  captureSelection(): CaptureSelection | undefined;
  captureAttached(): boolean;
  /** The loaded programs and the use of the capture maps; undefined before capture is attached. May throw when they cannot be read. */
  captureUsage(): { programs: ProgramView[]; maps: MapUsageView[] } | undefined;
  /** The pinned capture entries, or an error in their place. */
  captureEntries(): unknown;
  kubernetes(): KubeHealth | undefined;
  cni(): ReadinessInputs["cni"];
  /** The probe SNAT table's state with --probe-snat, else undefined. */
  probeSnat?(): ReadinessInputs["probeSnat"];
  problems(): readonly ManifestProblem[];
  connections(): ConnectionSource | undefined;
  stopping(): boolean;
  /** The proxies' limits in force. It is absent in tests of single modules. */
  limits?(): ProxyLimits;
  /** Refusals since start per listener and reason (RefusalLog.totals). It is absent in tests of single modules. */
  refusals?(): readonly { listener: string; reason: string; count: number }[];
  /** The log levels of the agent's logger tree; /logging is not served without them. */
  logLevels?: LogLevels;
}

/** Builds /status, /workloads, /services, /certificates, /connections, /config_dump, /healthz/ready and, with log levels, /logging. */
export function inspectionRoutes(sources: AdminSources): AdminRoutes {
  return {
    "/status": () => statusView(sources),
    "/workloads": () => workloadViews(sources, requireState(() => sources.state())),
    "/services": () => serviceViews(requireState(() => sources.state())),
    "/certificates": () => certificateViews(sources.certificates(), sources.identity()?.trust.pem()),
    "/connections": (query) => connectionViews(sources, query),
    "/config_dump": () => configDump(sources),
    "/healthz/ready": () => readinessResponse(readinessInputs(sources)),
    ...(sources.logLevels && { "/logging": () => sources.logLevels!.view() }),
  };
}

function readinessInputs(sources: AdminSources): ReadinessInputs {
  const enrolled = sources.enrolled();
  const state = sources.state();
  return {
    configurationRead: state !== undefined,
    kubernetes: sources.kubernetes(),
    captureAttached: sources.captureAttached(),
    enrolmentRunning: enrolled !== undefined,
    pending: enrolled === undefined ? [] : pendingPods(sources, enrolled),
    certificates: sources.certificates(),
    cni: sources.cni(),
    probeSnat: sources.probeSnat?.(),
    enrolled: enrolled?.length ?? 0,
    stopping: sources.stopping(),
  };
}

/** Counts this node's pods that are served, waited for (see pendingPods) and isolated because another namespace has their IP. */
export function podCounts(sources: AdminSources): { enrolled: number; pending: number; isolated: number } {
  const enrolled = sources.enrolled();
  const state = sources.state();
  return {
    enrolled: enrolled?.length ?? 0,
    pending: enrolled === undefined ? 0 : pendingPods(sources, enrolled).length,
    isolated: sources.ambiguous().length,
  };
}

/**
 * Lists the pods that the reconciler was asked to enrol and does not serve yet: their listeners
 * or their certificate are missing, or their network namespace is not found. A pod isolated
 * because another namespace has its IP is not counted. A pod that lost an IP to another Pod
 * object is not asked for, so it is not counted either.
 */
function pendingPods(sources: AdminSources, enrolled: readonly EnrolledWorkload[]): string[] {
  const served = new Set(enrolled.map((entry) => entry.workload.uid));
  const isolated = new Set(sources.ambiguous().map((entry) => entry.workload));
  return sources
    .desired()
    .filter((workload) => !served.has(workload.uid) && !isolated.has(workload.uid))
    .map((workload) => workload.uid)
    .sort(compare);
}

export function statusView(sources: AdminSources, now = Date.now()): StatusView {
  const { ready, checks } = readinessChecks(readinessInputs(sources));
  const state = sources.state();
  const selection = sources.captureSelection();
  const usage = readCaptureUsage(sources);
  const certificates = sources.certificates();
  const enrolledUids = new Set((sources.enrolled() ?? []).map((entry) => entry.workload.uid));
  const counts = podCounts(sources);
  return {
    version: sources.version,
    node: sources.node,
    pid: process.pid,
    uptimeSeconds: Math.floor((now - sources.startedAt) / 1000),
    ready,
    checks,
    ...(sources.stopping() && { stopping: true }),
    capture: selection && {
      mode: selection.mode,
      requested: selection.requested,
      reason: selection.reason,
      programs: "error" in usage ? [] : usage.programs,
      maps: "error" in usage ? [] : usage.maps,
    },
    configuration: {
      source: sources.configurationSource,
      workloads: state?.snapshot.workloads.size ?? 0,
      services: state?.snapshot.services.size ?? 0,
      policies: (state?.snapshot.authorizationPolicies.size ?? 0) + (state?.snapshot.peerAuthentications.size ?? 0),
      // One object may have many field problems; count the objects.
      rejected: new Set(sources.problems().map((problem) => `${problem.file}\u0000${problem.document}\u0000${problem.object}`)).size,
    },
    enrolled: enrolledUids.size,
    pending: counts.pending,
    isolated: counts.isolated,
    connections: sources.connections()?.counts() ?? { inbound: 0, outbound: 0 },
    ...(sources.refusals && { refusals: refusalViews(sources.refusals()) }),
    certificates: certificateCounts(certificates),
  };
}

/** Lists the refusals with a count above 0, sorted by listener and reason, each with the flag of its limit. */
export function refusalViews(totals: readonly { listener: string; reason: string; count: number }[]): RefusalView[] {
  return totals
    .filter((total) => total.count > 0)
    .map((total) => {
      const flag = limitFlagOf(total.reason);
      return { listener: total.listener, reason: total.reason, count: total.count, ...(flag !== undefined && { flag }) };
    })
    .sort((a, b) => compare(a.listener, b.listener) || compare(a.reason, b.reason));
}

/** Reads the capture programs and maps, or the reason they cannot be listed. */
function readCaptureUsage(sources: AdminSources): { programs: ProgramView[]; maps: MapUsageView[] } | { error: string } {
  try {
    return sources.captureUsage() ?? { error: "capture is not attached yet" };
  } catch (error) {
    return { error: `cannot read the capture programs and maps: ${(error as Error).message}` };
  }
}

function certificateCounts(certificates: readonly CertificateStatus[]): StatusView["certificates"] {
  const counts: StatusView["certificates"] = { total: certificates.length, valid: 0, refreshing: 0, pending: 0, failing: 0, expired: 0 };
  for (const certificate of certificates) {
    counts[certificate.state]++;
    if (certificate.notAfter !== undefined && (counts.nextExpiry === undefined || certificate.notAfter < counts.nextExpiry)) {
      counts.nextExpiry = certificate.notAfter;
    }
  }
  return counts;
}

/** Lists every workload of the mesh state, sorted by namespace then name, with its state on this node. */
export function workloadViews(sources: AdminSources, state: MeshState): WorkloadView[] {
  const enrolled = new Set((sources.enrolled() ?? []).map((entry) => entry.workload.uid));
  // Pods kept closed because their listeners failed are retried, so they show as Pending.
  const isolated = new Set(sources.ambiguous().map((entry) => entry.workload));
  const settings = sources.enrollmentSettings();
  const trustDomain = sources.trustDomain();
  const views: WorkloadView[] = [];
  for (const workload of state.snapshot.workloads.values()) {
    const decision = enrollmentDecision(state, workload, settings);
    const local = workload.nodeName === sources.node;
    views.push({
      uid: workload.uid,
      namespace: workload.namespace,
      name: workload.name,
      node: workload.nodeName,
      ips: ipv4First(workloadIps(workload)),
      serviceAccount: workload.serviceAccount,
      identity: formatSpiffeId({ trustDomain, namespace: workload.namespace, serviceAccount: workload.serviceAccount }),
      protocol: decision.enrolled ? "HBONE" : "TCP",
      local,
      state: workloadState(workload, local, decision.enrolled, enrolled, isolated),
      reason: decision.reason,
    });
  }
  return views.sort((a, b) => compare(a.namespace, b.namespace) || compare(a.name, b.name));
}

function workloadState(workload: Workload, local: boolean, ambient: boolean, enrolled: ReadonlySet<string>, isolated: ReadonlySet<string>): WorkloadView["state"] {
  if (!local) return "Remote";
  if (enrolled.has(workload.uid)) return "Up";
  if (isolated.has(workload.uid)) return "Isolated";
  return ambient && workload.ip !== "" ? "Pending" : "NotEnrolled";
}

function ipv4First(ips: readonly string[]): string[] {
  return [...ips.filter((ip) => !ip.includes(":")), ...ips.filter((ip) => ip.includes(":"))];
}

function compare(a: string, b: string): number {
  if (a < b) return -1;
  if (a > b) return 1;
  return 0;
}

/** Lists the Services sorted by namespace then name, with the endpoints the agent routes to. */
export function serviceViews(state: MeshState): ServiceView[] {
  return state
    .services()
    .map((service) => ({
      namespace: service.namespace,
      name: service.name,
      vips: [...service.vips],
      ports: service.ports.map((port) => ({ name: port.name, port: port.port, targetPort: port.targetPort, protocol: port.protocol })),
      endpoints: serviceEndpointSummary(state, service),
    }))
    .sort((a, b) => compare(a.namespace, b.namespace) || compare(a.name, b.name));
}

/**
 * Counts a Service's endpoints as routing picks them: the endpoints of its EndpointSlices when it
 * has any (one per address, ready ones healthy), else the pods its selector matches that have an
 * IP (ready ones healthy). `addresses` lists the healthy ones, sorted.
 */
function serviceEndpointSummary(state: MeshState, service: Service): ServiceView["endpoints"] {
  const all = new Map<string, boolean>();
  const slices = state.endpointSlicesForService(service);
  if (slices.length > 0) {
    for (const slice of slices) {
      if (slice.addressType === "FQDN") continue;
      for (const endpoint of slice.endpoints) {
        const address = endpoint.addresses[0];
        if (address !== undefined) all.set(address, (all.get(address) ?? false) || endpoint.ready);
      }
    }
  } else {
    for (const workload of state.workloadsForService(service)) {
      for (const ip of workload.ip === "" ? [] : workloadIps(workload)) all.set(ip, workload.ready);
    }
  }
  const healthy = [...all].filter(([, ready]) => ready).map(([address]) => address).sort();
  return { total: all.size, healthy: healthy.length, addresses: healthy };
}

/** Describes the certificates of this node's identities with their chains. Private keys are never read here. */
/**
 * Describes each identity's certificate, with its chain and then the trusted roots (`rootsPem`)
 * that issued the chain's last certificate.
 */
export function certificateViews(statuses: readonly CertificateStatus[], rootsPem?: string, now = Date.now()): CertificateView[] {
  const roots = (rootsPem?.match(CERTIFICATE_PEM) ?? []).map((pem) => new crypto.X509Certificate(pem));
  return statuses
    .map((status) => {
      const view: CertificateView = {
        identity: status.identity,
        state: status.state,
        failures: status.failures,
        workloads: [...status.workloads],
        chain: status.chainPem === undefined ? [] : parseChain(status.chainPem, roots),
      };
      if (status.notBefore !== undefined) view.notBefore = status.notBefore;
      if (status.notAfter !== undefined) {
        view.notAfter = status.notAfter;
        view.expiresInSeconds = Math.floor((Date.parse(status.notAfter) - now) / 1000);
      }
      if (status.refreshAt !== undefined) view.refreshAt = status.refreshAt;
      if (status.nextRetryAt !== undefined) view.nextRetryAt = status.nextRetryAt;
      if (status.lastError !== undefined) view.lastError = status.lastError;
      return view;
    })
    .sort((a, b) => compare(a.identity, b.identity));
}

const CERTIFICATE_PEM = /-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g;

/**
 * Parses a PEM chain, leaf first: the first certificate is the Leaf, a self-signed one is a Root,
 * and the others are Intermediates. Only CERTIFICATE blocks are read, so a key in the text is
 * skipped. The `roots` that issued the chain's last certificate follow it, unless the chain ends
 * with a root already.
 */
export function parseChain(chainPem: string, roots: readonly crypto.X509Certificate[] = []): CertificateChainEntry[] {
  const certificates = (chainPem.match(CERTIFICATE_PEM) ?? []).map((pem) => new crypto.X509Certificate(pem));
  const entries = certificates.map((certificate, index) => chainEntry(certificate, index === 0 ? "Leaf" : selfSigned(certificate) ? "Root" : "Intermediate"));
  const last = certificates[certificates.length - 1];
  if (last !== undefined && !(certificates.length > 1 && selfSigned(last))) {
    for (const root of roots) {
      if (last.checkIssued(root) && last.verify(root.publicKey)) entries.push(chainEntry(root, "Root"));
    }
  }
  return entries;
}

function selfSigned(certificate: crypto.X509Certificate): boolean {
  return certificate.checkIssued(certificate) && certificate.verify(certificate.publicKey);
}

function chainEntry(certificate: crypto.X509Certificate, type: CertificateChainEntry["type"]): CertificateChainEntry {
  return {
    type,
    // Node.js returns undefined for an empty subject, which a SPIFFE leaf may have, and one line per attribute otherwise.
    subject: (certificate.subject ?? "").split("\n").join(", "),
    serialNumber: certificate.serialNumber,
    notBefore: new Date(certificate.validFrom).toISOString(),
    notAfter: new Date(certificate.validTo).toISOString(),
  };
}

/** Lists the open connections, in one direction when the query names it. */
export function connectionViews(sources: AdminSources, query: URLSearchParams): ConnectionView[] {
  const direction = query.get("direction");
  if (direction !== null && direction !== "inbound" && direction !== "outbound") {
    throw new AgentError("INVALID_QUERY", `invalid direction "${direction}"; request /connections?direction=inbound or ?direction=outbound, or omit it for both`);
  }
  return sources.connections()?.views(direction ?? undefined) ?? [];
}

/** A policy as /config_dump lists it. Scope is Global (root namespace), Namespace, or WorkloadSelector, as ztunnel names them. */
interface PolicyDumpEntry {
  kind: "AuthorizationPolicy" | "PeerAuthentication";
  namespace: string;
  name: string;
  scope: "Global" | "Namespace" | "WorkloadSelector";
  /** ALLOW, DENY, AUDIT or CUSTOM for an AuthorizationPolicy; the mTLS mode for a PeerAuthentication. */
  action: string;
  /** The workload selector's labels, when the scope is WorkloadSelector. */
  selector?: Readonly<Record<string, string>>;
  /** An AuthorizationPolicy's rules as enforced (HTTP-only fields dropped); absent when the policy has no rules field. */
  rules?: readonly unknown[];
  dryRun?: boolean;
  portLevelMtls?: Readonly<Record<number, string>>;
  /** The file and document, or the API object, the policy was read from. */
  source: string;
}

/** Names where an object was read: "kubernetes" (the API server), or a file and document such as "policies.yaml, document 2". */
function sourceOf(source: ObjectSource): string {
  return source.file === KUBERNETES_SOURCE ? source.file : `${source.file}, document ${source.document + 1}`;
}

function policyDump(state: MeshState, rootNamespace: string): PolicyDumpEntry[] {
  const scopeOf = (namespace: string, selector: Readonly<Record<string, string>> | undefined): PolicyDumpEntry["scope"] => {
    if (selector !== undefined && Object.keys(selector).length > 0) return "WorkloadSelector";
    return namespace === rootNamespace ? "Global" : "Namespace";
  };
  const entries: PolicyDumpEntry[] = [];
  for (const policy of state.snapshot.authorizationPolicies.values()) {
    const entry: PolicyDumpEntry = {
      kind: "AuthorizationPolicy",
      namespace: policy.namespace,
      name: policy.name,
      scope: scopeOf(policy.namespace, policy.selector),
      action: policy.action,
      source: sourceOf(policy.source),
    };
    if (policy.selector !== undefined && Object.keys(policy.selector).length > 0) entry.selector = policy.selector;
    if (policy.rules !== undefined) entry.rules = policy.rules;
    if (policy.dryRun) entry.dryRun = true;
    entries.push(entry);
  }
  for (const policy of state.snapshot.peerAuthentications.values()) {
    entries.push({
      kind: "PeerAuthentication",
      namespace: policy.namespace,
      name: policy.name,
      scope: scopeOf(policy.namespace, policy.selector),
      action: policy.mode,
      ...(policy.selector !== undefined && Object.keys(policy.selector).length > 0 && { selector: policy.selector }),
      portLevelMtls: policy.portLevelMtls,
      source: sourceOf(policy.source),
    });
  }
  return entries.sort((a, b) => compare(a.kind, b.kind) || compare(a.namespace, b.namespace) || compare(a.name, b.name));
}

/**
 * Builds /config_dump, in the spirit of ztunnel's: version, node, workloads, services, policies,
 * certificates (without keys) and the state of each enrolled pod, plus the agent's own diagnostics
 * (identity, enrolled, isolated and ambiguous namespaces, capture entries and mode).
 */
export function configDump(sources: AdminSources): Record<string, unknown> {
  const state = sources.state();
  const identity = sources.identity();
  const selection = sources.captureSelection();
  const enrolled = sources.enrolled() ?? [];
  const connections = sources.connections();
  const perWorkload = new Map<string, { inbound: number; outbound: number }>();
  for (const view of connections?.views() ?? []) {
    const counts = perWorkload.get(view.workload) ?? { inbound: 0, outbound: 0 };
    counts[view.direction]++;
    perWorkload.set(view.workload, counts);
  }
  const workloadState: Record<string, unknown> = {};
  for (const entry of enrolled) {
    workloadState[entry.workload.uid] = {
      state: "Up",
      netns: entry.netnsPath,
      cookie: entry.cookie.toString(),
      connections: perWorkload.get(entry.workload.uid) ?? { inbound: 0, outbound: 0 },
    };
  }
  return {
    version: sources.version,
    node: sources.node,
    trustDomain: sources.trustDomain(),
    identity: identity && {
      ca: identity.caDescription,
      trustDomainAliases: identity.trust.aliases,
      roots: identity.trust.roots(),
      queue: identity.certs.queue,
    },
    workloads: state ? workloadViews(sources, state) : [],
    services: state ? serviceViews(state) : [],
    policies: state ? policyDump(state, sources.rootNamespace) : [],
    certificates: certificateViews(sources.certificates(), sources.identity()?.trust.pem()),
    workloadState,
    isolated: sources.isolated().map((entry) => ({ ...entry, cookie: entry.cookie.toString() })),
    ambiguous: sources.ambiguous().map((entry) => ({ ...entry, cookie: entry.cookie.toString() })),
    enrolled: enrolled.map((entry) => ({
      workload: entry.workload.uid,
      ip: entry.workload.ip,
      netns: entry.netnsPath,
      cookie: entry.cookie.toString(),
    })),
    capture: sources.captureEntries(),
    captureMode: selection && {
      mode: selection.mode,
      requested: selection.requested,
      reason: selection.reason,
      features: selection.features,
    },
    captureUsage: readCaptureUsage(sources),
    ...(sources.limits && { limits: limitSettings(sources.limits()) }),
  };
}

/**
 * Applies POST /logging: ?level=LEVEL sets every component, ?level=COMPONENT:LEVEL[,...] sets
 * single components, and ?reset returns to the start-up levels. Logs what changed at info, with
 * the client's address. Throws AgentError INVALID_QUERY naming a bad component or level.
 */
export function changeLogLevels(levels: LogLevels, query: URLSearchParams, remoteAddress: string | undefined, logger: Logger): LogLevelsView {
  const level = query.get("level");
  const reset = query.get("reset");
  if (reset !== null && reset !== "" && reset !== "true") {
    throw new AgentError("INVALID_QUERY", `invalid reset=${JSON.stringify(reset)}; POST /logging?reset (or ?reset=true) returns to the start-up levels`);
  }
  if (query.has("reset") === (level !== null)) {
    throw new AgentError("INVALID_QUERY", "POST /logging requires exactly one of ?level=LEVEL, ?level=COMPONENT:LEVEL[,COMPONENT:LEVEL] or ?reset, for example /logging?level=cni:debug");
  }
  let changes: string[];
  if (level === null) {
    changes = levels.reset();
  } else {
    try {
      changes = levels.set(parseLogLevels(level, levels.components()));
    } catch (error) {
      if (error instanceof InvalidLogLevelError) throw new AgentError("INVALID_QUERY", error.message);
      throw error;
    }
  }
  logger.info({ changes, request: level === null ? "reset" : `level=${level}`, remoteAddress }, changes.length > 0 ? "log levels changed" : "log levels unchanged");
  return levels.view();
}

/**
 * Builds POST /logging over the agent's log levels; none without them. Changes are logged at info
 * whatever the levels are, so that silencing a component, the admin API's own included, leaves a
 * line that names who did it.
 */
export function loggingPostRoutes(levels: LogLevels | undefined, logger: Logger): Record<string, AdminPostRoute> {
  if (levels === undefined) return {};
  // A child that binds no component is not governed by the levels once it has a level of its own.
  const changeLogger = logger.child({});
  changeLogger.level = "info";
  return { "/logging": (query, remoteAddress) => changeLogLevels(levels, query, remoteAddress, changeLogger) };
}

/** Reads the pinned capture entries for the config dump. Returns an error in their place when none can be read. */
export function captureEntriesOf(capture: CaptureBackend | undefined, pinRoot: string): CaptureEntries | { error: string } {
  if (!capture) return { error: "capture is not attached yet" };
  if (capture.mode !== "ebpf") return { error: `capture runs in ${capture.mode} mode, which pins no eBPF entries` };
  try {
    return readCaptureEntries(pinRoot);
  } catch (error) {
    return { error: (error as Error).message };
  }
}
