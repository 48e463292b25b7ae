// The node agent: wires discovery, state, capture, identity, the per-pod proxies, authorization
// and audit together, and keeps them in step as the manifests change.

import fs from "node:fs";
import path from "node:path";

import type { AuditOptions } from "./audit/config";
import { createAuditPipeline } from "./audit/setup";
import {
  agentStartedRecord,
  agentStoppedRecord,
  captureModeRecord,
  certificateRecord,
  enrollmentReasons,
  policyRecords,
  rejectionRecords,
  unenforcedPolicyProblems,
  workloadRecord,
} from "./audit/control";
import type { ManifestProblem } from "./discovery/manifest-problem";
import type { AuditPipeline } from "./audit/pipeline";
import { NodeServers } from "./admin/node-servers";
import { ConnectionTracker, TRACKER_DISABLED_FOR_BENCHMARK } from "./proxy/connection-tracker";
import { problemPolicy } from "./rbac/policy-report";
import { captureEntriesOf, inspectionRoutes, podCounts, type AdminSources } from "./admin/routes";
import { authorizationRoutes } from "./admin/server";
import type { CaptureBackend } from "./capture/backend";
import { loadNative } from "./capture/native";
import { NetnsPodNetwork } from "./capture/netns-network";
import { LOCK_DIRECTORY, PinRootLock } from "./capture/pin-lock";
import type { CaptureSelection, RequestedCaptureMode } from "./capture/probe";
import { Predecessor } from "./handover/client";
import { handoverSocketPath } from "./handover/protocol";
import { HandoverServer, preparedTimeoutFromEnvironment } from "./handover/server";
import { EXIT_MARGIN_MS, HANDOVER_REPLY_TIMEOUT_MS, handoverHandlers, takeLocksWhenFree, takeOver } from "./handover/takeover";
import { HostNotReadyError, capabilityProblems, checkHost } from "./capture/preflight";
import { attachCapture, nftStateDirectory, selectCapture, setProbeSources } from "./capture/setup";
import { DEFAULT_PROBE_SOURCES } from "./capture/ebpf/exemptions";
import { hostNetnsPath, ProbeSnat } from "./capture/nft/probe-snat";
import { ManifestSource } from "./discovery/manifests";
import { KubeClient, type KubeCredentials } from "./discovery/kube-client";
import { KubeSource } from "./discovery/kube-source";
import { DEFAULT_ENROLLMENT_SETTINGS, enrollmentDecision, isAmbient, onePerIp, type EnrollmentSettings, type IpConflict } from "./enroll/enrollment";
import { ConfigWarnings } from "./config-warnings";
import { CniEnrolment } from "./enroll/cni-enrolment";
import { EnrolledFile, type EnrolledRecord } from "./enroll/enrolled-file";
import { DEFAULT_HOST_PROC, useHostProc } from "./enroll/netns";
import { RedirectionAnnotator } from "./enroll/redirection-annotation";
import { startCni, type CniRuntime, type CniSettings } from "./cni/setup";
import { AgentError } from "./errors";
import { EnrollmentReconciler, type WorkloadProxies } from "./enroll/reconciler";
import type { CertManager } from "./identity/cert-manager";
import { startIdentity, type IdentityOptions, type IdentityRuntime } from "./identity/setup";
import { identityOf } from "./identity/spiffe";
import { logLevelsOf, type Logger } from "./log";
import { InboundHboneServer } from "./proxy/inbound";
import { sumDrains } from "./proxy/drain";
import { InboundPlaintextServer } from "./proxy/inbound-plaintext";
import { LimitTracker } from "./proxy/limit-tracker";
import { DEFAULT_LIMITS, limitSettings, type ProxyLimits } from "./proxy/limits";
import { RefusalLog } from "./proxy/refusal-log";
import { OutboundProxy, type DestinationTarget } from "./proxy/outbound";
import { authorizerFor, type AuthorizationSettings } from "./rbac/authorize";
import type { AuthorizationResult, RbacConnection } from "./rbac/types";
import { inboundServiceOf } from "./state/destination-service";
import { EndpointPicker } from "./state/endpoints";
import { workloadIps } from "./state/ip";
import { MeshState } from "./state/mesh-state";
import type { ClusterSnapshot, Identity, Workload } from "./state/types";
import { removeCniEntry, removeNftCaptureTables, removePinnedCapture, removeProbeSnatTable, UninstallCheck, type DaemonSetRef, type StopDecision } from "./uninstall";
import { agentVersion } from "./version";

/** The reason of the workload.unenrolled records that an uninstall writes. */
export const UNINSTALL_REASON = "agent uninstalled";
/** How long an uninstall waits for the patches that remove the pods' redirection annotation. */
const UNINSTALL_ANNOTATION_TIMEOUT_MS = 3_000;

export interface AgentOptions {
  node: string;
  /** Folder of manifest files to read the mesh configuration from. Exactly one of this and `kubernetes`. */
  manifestsDir?: string;
  /** Credentials of the Kubernetes API server to read the mesh configuration from. */
  kubernetes?: KubeCredentials;
  /** Namespaces whose pods are never enrolled. Default ["kube-system"]. */
  excludedNamespaces?: readonly string[];
  /** The chained CNI plugin that keeps new pods waiting until their capture is in place; off when absent. */
  cni?: CniSettings;
  /** The CA, trust domain, trusted roots and certificate lifetime. */
  identity: IdentityOptions;
  audit: AuditOptions;
  /** bpffs folder holding this node's pinned maps and links. */
  pinRoot: string;
  cgroupPath: string;
  objectPath: string;
  /** "host:port" of the admin API. */
  adminAddress: string;
  /** "host:port" of the Prometheus metrics server (/metrics, /stats/prometheus); not started when absent. */
  metricsAddress?: string;
  /** "host:port" of the readiness server (/healthz/ready); not started when absent. */
  readinessAddress?: string;
  /** Namespace whose policies apply mesh-wide. */
  rootNamespace: string;
  /** Capture mode from --capture: ebpf, nftables, or auto (eBPF when every hook works, else nftables). Default auto. */
  capture?: RequestedCaptureMode;
  /**
   * Whether to take the node over from the agent that serves it now, with no failed connection
   * (see agent/handover). Without a running agent the start is a normal one.
   */
  replace?: boolean;
  /** Drain timeout for open connections when this agent stops or hands the node over, in milliseconds. Default 0. */
  drainTimeoutMs?: number;
  /**
   * Source addresses of kubelet health probes, which inbound capture lets through to the
   * application. Default DEFAULT_PROBE_SOURCES. An empty list exempts no source.
   */
  probeSources?: readonly string[];
  /**
   * Whether to keep the probe SNAT table in the host network namespace (agent/capture/nft/probe-snat.ts),
   * which rewrites the source of the host's connections to enrolled pods, the kubelet's probes among
   * them, to the first IPv4 and IPv6 probe source. Without it, a table an earlier run left is
   * removed at start. Default false.
   */
  probeSnat?: boolean;
  /** The host's network namespace, where the probe SNAT table lives. Default HOST_PROC/1/ns/net. */
  hostNetns?: string;
  /**
   * Whether the inbound proxies connect to applications from the client's address, so that the
   * applications' peer address is the real client. Default true.
   */
  transparentSource?: boolean;
  /**
   * The host's procfs as mounted where the agent runs, for the host's processes and the
   * per-namespace sysctls. Default /proc.
   */
  hostProc?: string;
  /**
   * The DaemonSet that runs this agent, watched from start to tell an uninstall from a restart at
   * a stop signal (agent/uninstall.ts). Needs `kubernetes`. No uninstall detection when absent.
   */
  daemonset?: DaemonSetRef;
  /** Limits of the proxies, such as open connections per pod and the idle timeout. Default DEFAULT_LIMITS. */
  limits?: ProxyLimits;
}

/** The agent's configuration source: the manifest folder or the Kubernetes API. */
interface ConfigSource {
  start(): Promise<void>;
  stop(): Promise<void>;
  snapshot(): ClusterSnapshot;
  problems(): ManifestProblem[];
  refresh(): Promise<void>;
  on(event: "change", listener: (snapshot: ClusterSnapshot) => void): unknown;
}

export { HostNotReadyError } from "./capture/preflight";

export class Agent {
  private state: MeshState | undefined;
  private source: ConfigSource | undefined;
  private kube: KubeSource | undefined;
  private annotator: RedirectionAnnotator | undefined;
  private cni: CniRuntime | undefined;
  /** Enrolment asked for by the CNI plugin, and the pod sandboxes it announced. */
  private readonly cniEnrolment: CniEnrolment;
  /** The enrolled workloads by cookie, kept for the next agent, which releases stale capture entries by pod. */
  private readonly enrolledFile: EnrolledFile;
  private enrolledSaveTimer: NodeJS.Timeout | undefined;
  /** Warnings about the configuration, each logged once while it lasts. */
  private readonly warnings: ConfigWarnings;
  /** IPs that several pods of this node claim, already warned about. */
  private ipConflicts = new Set<string>();
  /** The pods of this node that claim an IP with others now, by uid: none of them is enrolled. */
  private conflicted = new Set<string>();
  /** The pods the previous agent had enrolled, read at start, which win IP ties until the first enrolment ran. */
  private enrolledAtStart = new Set<string>();
  /** Aborted by abortStart(): start() then stops at its next step, and a wait for a stopped agent's locks ends. */
  readonly #startAbort = new AbortController();
  private capture: CaptureBackend | undefined;
  /** The probe SNAT table with --probe-snat. */
  private probeSnat: ProbeSnat | undefined;
  /** Set while an update of the probe SNAT table's addresses waits for the current burst of enrolments to end. */
  private probeSnatUpdatePending = false;
  private captureSelection: CaptureSelection | undefined;
  private audit: AuditPipeline | undefined;
  private reconciler: EnrollmentReconciler | undefined;
  /** The admin API, metrics and readiness servers, and the metrics registry. */
  private readonly servers: NodeServers;
  private certs: CertManager | undefined;
  private identity: IdentityRuntime | undefined;
  private lock: PinRootLock | undefined;
  private nodeLock: PinRootLock | undefined;
  private spoolLock: PinRootLock | undefined;
  private auditFileLock: PinRootLock | undefined;
  private handover: HandoverServer | undefined;
  /** Watches the DaemonSet and decides at a stop signal; set with --daemonset in Kubernetes mode. */
  private uninstallCheck: UninstallCheck | undefined;
  #handOver: () => void = () => undefined;
  /** Promise that settles once this agent has handed the node over to a replacement. The process should then call stop(). */
  readonly replaced = new Promise<void>((resolve) => (this.#handOver = resolve));
  /** Round-robin position of each Service port, so connections to a VIP spread over its endpoints. */
  private readonly endpointPicker = new EndpointPicker();
  /** The open connections of every proxy of this agent. */
  private readonly tracker = new ConnectionTracker();
  /** The counters behind the proxies' limits, shared by every pod's proxies. */
  private readonly limitTracker: LimitTracker;
  /** Counts refused connections and writes their connection.refused records; created with the audit pipeline. */
  private refusals: RefusalLog | undefined;
  /** policy.rejected records written since start, for ambient_agent_policy_rejections_total. */
  private policyRejections = 0;
  private trustDomain = "cluster.local";
  /** Set once stop() begins: configuration changes then only re-check open connections. */
  private stopping = false;
  /** Manifest problems already written as policy.rejected records. */
  private recordedProblems: readonly ManifestProblem[] = [];

  constructor(
    private readonly options: AgentOptions,
    private readonly logger: Logger,
  ) {
    this.warnings = new ConfigWarnings(logger, options.rootNamespace, () => this.enrollmentSettings());
    this.limitTracker = new LimitTracker(options.limits ?? DEFAULT_LIMITS);
    this.servers = new NodeServers({ admin: options.adminAddress, metrics: options.metricsAddress, readiness: options.readinessAddress }, logger);
    this.enrolledFile = new EnrolledFile(path.join(LOCK_DIRECTORY, `enrolled-${options.node}.json`));
    this.cniEnrolment = new CniEnrolment({
      node: this.options.node,
      state: () => this.state,
      settings: () => this.enrollmentSettings(),
      stopping: () => this.stopping,
      reconcile: async (reasons) => {
        if (this.state && this.reconciler && !this.stopping) await this.enrol(this.desiredWorkloads(this.state), reasons);
      },
      enrolled: (uid) => this.reconciler?.list().find((entry) => entry.workload.uid === uid),
      evict: async (uid, reason) => this.reconciler?.evict(uid, reason),
      enrolledByCni: () => {
        // Saved at once: the next agent needs the sandbox until the kubelet reports the pod's IP.
        this.saveEnrolled();
        this.syncAnnotations();
      },
      logger: this.logger.child({ component: "cni" }),
    });
  }

  async start(): Promise<void> {
    const lacking = capabilityProblems();
    if (lacking.length > 0) throw new HostNotReadyError(lacking);
    const selection = selectCapture(this.options, this.logger);
    this.captureSelection = selection;
    const problems = checkHost({
      pinRoot: this.options.pinRoot,
      cgroupPath: this.options.cgroupPath,
      objectPath: this.options.objectPath,
      capture: selection.mode,
      hostProc: this.options.hostProc ?? DEFAULT_HOST_PROC,
    });
    if (problems.length > 0) throw new HostNotReadyError(problems);
    const preparedTimeoutMs = preparedTimeoutFromEnvironment();
    // The locks are flock(2) locks, taken through the native library.
    loadNative();
    // A replacement takes the locks and the admin port only once the agent it replaces exits. It
    // requests the hand-over only once it can enrol at once, because a prepared agent enrols and
    // unenrols nothing. Until then it only checks whether an agent runs.
    const agentRuns = this.options.replace ? await this.probePredecessor() : false;
    this.checkAborted();
    // Records queue in memory until the pipeline starts, which waits for the predecessor to exit,
    // because the spool and the audit file take one writer at a time.
    this.audit = createAuditPipeline(this.options.node, this.options.audit, this.logger.child({ component: "audit" }));
    this.refusals = new RefusalLog({ node: this.options.node, audit: this.audit, logger: this.logger.child({ component: "limits" }) });
    this.registerMetrics();
    if (!agentRuns) {
      this.takeLocks();
      await this.startAudit();
    }
    useHostProc(this.options.hostProc ?? DEFAULT_HOST_PROC);

    this.identity = await startIdentity(this.options.identity, this.logger);
    this.checkAborted();
    this.trustDomain = this.identity.trustDomain;
    this.certs = this.identity.certs;
    this.certs.onIssued((event) => this.audit?.write(certificateRecord(event, this.options.node, new Date().toISOString())));

    this.source = await this.createSource();
    this.checkAborted();

    // The admin port is taken before capture is touched, so a port conflict fails without side effects.
    const sources = this.adminSources();
    const routes = {
      ...inspectionRoutes(sources),
      "/audit": () => this.audit?.status(),
      "/kubernetes": () => this.kube?.health() ?? { error: "the agent reads manifest files, not the Kubernetes API" },
      "/metrics": this.servers.metricsRoute,
      ...authorizationRoutes({
        state: () => this.state,
        settings: () => this.authorizationSettings(),
        problems: () => this.source?.problems() ?? [],
      }),
    };
    this.servers.create(routes, sources.logLevels, this.refusals);
    // Started before the first list of the API server, which may take long, so that readiness shows what the agent waits for.
    if (!agentRuns) await this.servers.start();
    this.checkAborted();

    await this.source.start();
    this.checkAborted();
    this.state = new MeshState(this.source.snapshot());
    this.warnings.check(this.state);
    this.recordPolicyChanges(undefined, this.state);

    const predecessor = agentRuns ? await this.contactPredecessor() : undefined;
    this.checkAborted();
    if (agentRuns && !predecessor) {
      await this.startAfterStoppedAgent();
      this.checkAborted();
    }

    this.capture = attachCapture(selection, this.options, this.logger);
    setProbeSources(this.capture, this.options, this.logger);
    this.reconciler = new EnrollmentReconciler({
      trustDomain: this.trustDomain,
      capture: this.capture,
      createProxies: (workload, identity, network, cookie) => this.createProxies(workload, identity, network, cookie),
      logger: this.logger.child({ component: "enroll" }),
      transparentSource: this.options.transparentSource ?? true,
      netnsHint: (workload) => this.cniEnrolment.pods.netnsOf(workload),
      onEnrollment: (event) => {
        this.audit?.write(workloadRecord(event, this.options.node, new Date().toISOString()));
        this.scheduleEnrolledSave();
        this.scheduleProbeSnatUpdate();
      },
    });
    const previous = [...this.enrolledFile.load().values()];
    this.startProbeSnat(previous);
    this.enrolledAtStart = new Set(previous.map((record) => record.workload.uid));
    this.restoreSandboxes(previous);
    NetnsPodNetwork.shareNewListeners = predecessor !== undefined;
    await this.enrol(this.desiredWorkloads(this.state), enrollmentReasons(undefined, this.state.snapshot, this.options.node, this.enrollmentSettings()));
    NetnsPodNetwork.shareNewListeners = false;
    if (predecessor) await this.takeOverFrom(predecessor);
    this.checkAborted();
    this.releaseStale(this.reconciler.removeStaleCookies());
    // Until now the table contains the previous agent's pods; this agent's pods are known from here on.
    this.probeSnat?.update(this.enrolledAddresses());
    this.enrolledAtStart = new Set();
    this.saveEnrolled();
    this.syncAnnotations();
    const apply = (snapshot: ClusterSnapshot): void => {
      this.applySnapshot(snapshot).catch((error: unknown) =>
        this.logger.error({ err: error, workloads: snapshot.workloads.size }, "applying the new configuration failed; the agent keeps serving and applies the next change"),
      );
    };
    this.source.on("change", apply);
    // A change published while the first enrolment ran had no listener yet.
    if (this.source.snapshot() !== this.state.snapshot) apply(this.source.snapshot());
    if (this.options.cni) {
      this.cni = await startCni(this.options.cni, { add: (event) => this.cniEnrolment.add(event), del: (event) => this.cniEnrolment.del(event) }, this.logger.child({ component: "cni" }));
    }
    this.handover = await HandoverServer.listen(
      handoverSocketPath(this.options.node),
      handoverHandlers(this.reconciler, this.capture, this.options.drainTimeoutMs ?? 0, () => this.#handOver(), this.logger.child({ component: "handover" })),
      this.logger.child({ component: "handover" }),
      preparedTimeoutMs,
    );
    this.checkAborted();
    this.logger.info(
      {
        enrolled: this.reconciler.list().map((entry) => entry.workload.uid),
        admin: this.options.adminAddress,
        replaced: predecessor?.pid,
        cni: this.cni?.chain.status(),
      },
      "agent ready",
    );
  }

  /**
   * Asks a start() in progress to stop at its next step, where it throws; the caller then calls
   * stop(). A source waiting for the API server's first list ends its wait at once.
   */
  abortStart(): void {
    this.#startAbort.abort(new AgentError("INTERNAL", "the agent was asked to stop while it was starting"));
    void this.source?.stop();
  }

  /** Tells whether `error` is the one that abortStart() made start() throw, not a failure of its own. */
  startAborted(error: unknown): boolean {
    return this.#startAbort.signal.aborted && error === this.#startAbort.signal.reason;
  }

  /** Throws when abortStart() was called, so that start() goes no further. */
  private checkAborted(): void {
    this.#startAbort.signal.throwIfAborted();
  }

  /**
   * Stops serving. Every listener closes at once. Open connections and HBONE streams may finish for
   * up to `drainMs`, and the ones still open then are reset. Each connection writes its audit record,
   * and the audit file is flushed before this resolves. The pinned capture programs and map entries
   * stay, so enrolled pods fail closed: their connections are refused until an agent serves them
   * again. `agentctl capture remove` detaches them.
   *
   * With `uninstall` (stopDecision() found the agent's DaemonSet deleted) the agent removes what it
   * installed on the node instead. First its CNI plugin entry goes, then every pod's enrolment,
   * with a workload.unenrolled record of reason UNINSTALL_REASON and the pod's redirection
   * annotation removed. Last goes the node's capture, as `agentctl cni remove` and `agentctl
   * capture remove` do: the pins, the nftables tables and the probe SNAT table, so also what the
   * previous agent left when this one stops before it enrolled the pods. New connections then
   * reach the pods directly while open ones drain. An agent that does not hold the node's locks
   * removes nothing, because another agent serves the node or is stopping, and decides for itself.
   *
   * The hand-over socket closes first, and a replacement that it is serving gets an error, so no
   * replacement takes the node while this agent drains or removes capture.
   */
  async stop(drainMs = 0, reason = "stop requested", uninstall = false): Promise<void> {
    this.handover?.close();
    // The uninstall steps below run only with the node's locks.
    const removes = uninstall && this.mayUninstall();
    const previous = removes ? this.previousEnrolments() : [];
    clearTimeout(this.enrolledSaveTimer);
    if (this.reconciler) this.saveEnrolled();
    await this.cni?.close();
    if (removes && this.options.cni) removeCniEntry(this.options.cni.confDir, this.logger.child({ component: "cni" }));
    // An uninstall still needs the annotator, which removes the annotations once the pods are unenrolled.
    if (!removes) this.annotator?.stop();
    // The manifests are still followed while connections drain, so a policy change still closes
    // the connections it denies; enrolment no longer changes.
    this.stopping = true;
    await this.drain(drainMs, removes);
    if (removes) await this.finishUninstall(previous);
    await Promise.all([this.source?.stop(), this.uninstallCheck?.stop()]);
    await this.servers.stop();
    this.capture?.close();
    this.probeSnat?.close();
    if (removes) this.removeNodeCapture();
    this.identity?.close();
    this.refusals?.flush();
    this.audit?.write(agentStoppedRecord({ reason, openConnections: this.reconciler?.openConnections() ?? 0 }, this.options.node, new Date().toISOString()));
    await this.audit?.close();
    this.releaseLocks();
    this.logger.info("agent stopped");
  }

  /** Resets every connection that a running drain still waits for; the pending stop() then completes. */
  abortDrain(): void {
    if (!this.reconciler) return;
    this.logger.warn({ open: this.reconciler.openConnections() }, "drain cut short: resetting the open connections now");
    void this.reconciler.stop(0);
  }

  /**
   * Decides whether a stop signal uninstalls the agent (see stop()). With --daemonset it reads the
   * DaemonSet, or when the read fails uses a deletion that the watch saw, in at most about twice
   * DAEMONSET_READ_TIMEOUT_MS. Without --daemonset the answer is always no. Every hand-over ends
   * first, so that none completes during the read, and an agent that already handed the node over
   * never uninstalls.
   */
  async stopDecision(): Promise<StopDecision> {
    this.handover?.close();
    if (this.handover?.handedOver) return { uninstall: false, reason: "node handed over to a new agent" };
    if (this.uninstallCheck) return this.uninstallCheck.decide();
    if (this.options.daemonset) return { uninstall: false, reason: "the agent stopped before it started watching its DaemonSet" };
    return { uninstall: false, reason: "no --daemonset to check" };
  }

  /**
   * Tells whether this agent has the node's locks, which an uninstall needs, and takes them when
   * they are free, because a replacement that is still starting has none. When another agent has
   * them, that agent serves the node or is stopping, so removing capture would open its pods: a
   * warning is logged and the result is false.
   */
  private mayUninstall(): boolean {
    if (this.nodeLock !== undefined && this.lock !== undefined) return true;
    try {
      this.takeLocks();
      return true;
    } catch (error) {
      this.logger.warn({ err: error }, "uninstall skipped: another agent has this node's locks, so it serves the node or is stopping and decides for itself; this agent removes nothing");
      return false;
    }
  }

  /**
   * Returns the enrolled-pods file's records of pods that this agent does not serve: at an
   * uninstall before the first enrolment, the pods of the previous agent, whose capture goes with
   * the node's.
   */
  private previousEnrolments(): EnrolledRecord[] {
    const served = new Set((this.reconciler?.list() ?? []).map((entry) => entry.workload.uid));
    return [...this.enrolledFile.load().values()].filter((record) => !served.has(record.workload.uid));
  }

  /** Removes the node's capture for an uninstall: the pins, the nftables tables no agent removed, and the probe SNAT table. */
  private removeNodeCapture(): void {
    const logger = this.logger.child({ component: "capture" });
    removePinnedCapture(this.options.pinRoot, logger);
    removeNftCaptureTables(nftStateDirectory(this.options.node), logger);
    removeProbeSnatTable(this.hostNetns(), logger);
  }

  /** Closes the listeners and drains; an uninstall unenrolls every pod first (see stop()). */
  private async drain(drainMs: number, uninstall: boolean): Promise<void> {
    if (!this.reconciler) return;
    const open = this.reconciler.openConnections();
    this.logger.info({ open, drainTimeoutMs: drainMs, uninstall }, "draining: closing the listeners and waiting for open connections");
    const startedAt = Date.now();
    const summary = await (uninstall ? this.reconciler.uninstall(UNINSTALL_REASON, drainMs) : this.reconciler.stop(drainMs));
    this.logger.info({ ...summary, durationMs: Date.now() - startedAt }, "drain finished");
  }

  /**
   * Saves the now empty list of enrolled pods, records the unenrolment of `previous` (pods that
   * this agent did not serve), and removes the pods' redirection annotations, after an
   * uninstall's unenrolment.
   */
  private async finishUninstall(previous: readonly EnrolledRecord[]): Promise<void> {
    clearTimeout(this.enrolledSaveTimer);
    this.saveEnrolled();
    for (const record of previous) {
      this.logger.info({ workload: record.workload.uid, reason: UNINSTALL_REASON }, "workload unenrolled with the node's capture: the previous agent had enrolled it");
      this.audit?.write(workloadRecord({ action: "unenrolled", workload: record.workload, identity: record.identity, reason: UNINSTALL_REASON }, this.options.node, new Date().toISOString()));
    }
    // Without a first list there are no pods to patch.
    if (this.annotator && this.state) {
      this.annotator.sync(this.state.workloadsOnNode(this.options.node), new Set());
      const unwritten = await this.annotator.flush(UNINSTALL_ANNOTATION_TIMEOUT_MS);
      if (unwritten > 0) {
        this.logger.warn({ unwritten, timeoutMs: UNINSTALL_ANNOTATION_TIMEOUT_MS }, "uninstall: some pods keep their redirection annotation, because removing it failed or took too long");
      }
    }
    this.annotator?.stop();
  }

  /** Starts the audit pipeline, records the start, and completes the connections a killed predecessor left open. */
  private async startAudit(): Promise<void> {
    const audit = this.audit!;
    await audit.start();
    // With --replace, records of the new agent's first moments are queued already: these go first.
    if (this.captureSelection) audit.writeFirst(captureModeRecord(this.captureSelection, this.options.node, new Date().toISOString()));
    audit.writeFirst(agentStartedRecord({ previousStop: audit.previousStop, settings: this.recordedSettings() }, this.options.node, new Date().toISOString()));
    audit.recordInterrupted();
  }

  /** Returns the settings for the agent.started record: what shapes capture, policy and audit, never a key or token. */
  private recordedSettings(): Record<string, unknown> {
    const audit = this.options.audit;
    return {
      capture: this.options.capture ?? "auto",
      root_namespace: this.options.rootNamespace,
      admin: this.options.adminAddress,
      drain_timeout_ms: this.options.drainTimeoutMs ?? 0,
      replace: this.options.replace ?? false,
      probe_snat: this.options.probeSnat ?? false,
      limits: limitSettings(this.limitTracker.limits),
      audit: {
        file: audit.file?.path,
        sinks: this.audit?.status().sinks.map((sink) => sink.name),
        spool: audit.spoolDir,
        fsync: audit.fsync.mode === "interval" ? `${audit.fsync.intervalMs}ms` : audit.fsync.mode,
        redacted: audit.redaction.map((rule) => `${rule.path}:${rule.mode}`),
      },
    };
  }

  /** Takes the node, pin-root, spool and audit file locks, or none of them: a failure releases the ones taken. */
  private takeLocks(): void {
    try {
      this.nodeLock = PinRootLock.acquireNode(this.options.node);
      this.lock = PinRootLock.acquire(this.options.pinRoot);
      this.spoolLock = PinRootLock.acquireSpool(this.options.audit.spoolDir);
      if (this.options.audit.file) this.auditFileLock = PinRootLock.acquireAuditFile(this.options.audit.file.path);
    } catch (error) {
      this.releaseLocks();
      this.nodeLock = this.lock = this.spoolLock = this.auditFileLock = undefined;
      throw error;
    }
  }

  /** Registers the audit metrics, the Istio TCP metrics, the agent's own metrics and the process metrics. */
  private registerMetrics(): void {
    const sources = this.adminSources();
    this.servers.registerMetrics({
      version: agentVersion(),
      audit: () => this.audit?.status(),
      workload: (uid) => this.state?.workload(uid),
      trustDomain: () => this.trustDomain,
      capture: () => this.captureSelection && this.capture && { mode: this.captureSelection.mode, requested: this.captureSelection.requested },
      captureUsage: () => this.capture?.usage(),
      workloads: () => podCounts(sources),
      certificates: () => this.certs?.status() ?? [],
      policyRejections: () => this.policyRejections,
      rejectedPolicies: () => new Set(this.recordedProblems.flatMap((problem) => problemPolicy(problem)?.uid ?? [])).size,
      connections: this.tracker,
      refusals: () => this.refusals?.totals() ?? [],
    });
  }

  /** Tells whether an agent serves the node now, without asking it for anything. */
  private async probePredecessor(): Promise<boolean> {
    const socketPath = handoverSocketPath(this.options.node);
    const agentRuns = await Predecessor.probe(socketPath, HANDOVER_REPLY_TIMEOUT_MS);
    if (agentRuns) {
      this.logger.info({ socket: socketPath }, "an agent serves the node: requesting the hand-over once this agent can enrol the node's pods");
    } else {
      this.logger.info({ socket: socketPath }, "no running agent to replace: starting normally");
    }
    return agentRuns;
  }

  /** Asks the agent that serves the node to prepare a hand-over. Returns undefined when that agent has stopped since the probe. */
  private async contactPredecessor(): Promise<Predecessor | undefined> {
    const socketPath = handoverSocketPath(this.options.node);
    const predecessor = await Predecessor.contact(socketPath, HANDOVER_REPLY_TIMEOUT_MS, this.logger.child({ component: "handover" }));
    if (predecessor) {
      this.logger.info({ predecessor: predecessor.pid, enrolled: predecessor.enrolled.length, socket: socketPath }, "replacing the running agent: starting listeners next to its own");
    }
    return predecessor;
  }

  /**
   * Starts as without --replace once the agent that served the node has stopped before the
   * hand-over: takes the locks once that agent released them, then starts audit and the servers.
   * That agent's drain timeout is unknown here, so this agent waits for as long as its own would take.
   * The locks are flock(2) locks, so a draining agent in another pod's PID namespace holds them too.
   */
  private async startAfterStoppedAgent(): Promise<void> {
    const timeoutMs = (this.options.drainTimeoutMs ?? 0) + EXIT_MARGIN_MS;
    this.logger.info({ timeoutMs }, "the running agent stopped before the hand-over: starting normally once its locks are free");
    await takeLocksWhenFree(() => this.takeLocks(), timeoutMs, "the agent that served the node stopped before the hand-over", this.#startAbort.signal);
    await this.startAudit();
    await this.servers.rebind();
  }

  /** Hands the node over from the predecessor, then takes its locks, starts audit and binds the servers' ports. */
  private async takeOverFrom(predecessor: Predecessor): Promise<void> {
    await takeOver({
      predecessor,
      reconciler: this.reconciler!,
      capture: this.capture!,
      wanted: this.desiredWorkloads(this.state!).map((workload) => workload.uid),
      drainTimeoutMs: this.options.drainTimeoutMs ?? 0,
      takeLocks: () => this.takeLocks(),
      missingCapture: () => this.capture!.missingCapture(),
      signal: this.#startAbort.signal,
      logger: this.logger.child({ component: "handover" }),
    });
    await this.startAudit();
    await this.servers.rebind();
  }

  /**
   * Gives up the node and pin-root locks, for an exit that does not wait for stop() to finish, and
   * lets a replacement that this agent handed the node over to take it.
   */
  releaseLocks(): void {
    this.lock?.release();
    this.nodeLock?.release();
    this.spoolLock?.release();
    this.auditFileLock?.release();
    this.handover?.closeReleased();
  }

  /** Re-reads every manifest file now, as on SIGHUP. */
  async reload(): Promise<void> {
    this.logger.info("re-reading the manifests and the CA folder");
    await this.identity?.reload();
    await this.source?.refresh();
  }

  private async applySnapshot(snapshot: ClusterSnapshot): Promise<void> {
    const previous = this.state?.snapshot;
    this.state = new MeshState(snapshot, this.state);
    this.warnings.check(this.state);
    this.recordPolicyChanges(previous, this.state);
    this.logger.info(
      { workloads: snapshot.workloads.size, policies: snapshot.authorizationPolicies.size, peerAuthentications: snapshot.peerAuthentications.size },
      "configuration updated",
    );
    this.cniEnrolment.pods.retain((uid) => snapshot.workloads.has(uid));
    const desired = this.desiredWorkloads(this.state);
    // Open inbound connections were authorized with the previous configuration, so the ones the new
    // one denies are closed. This runs before enrolment, which may wait for new pods' certificates.
    const closed = this.reconciler?.recheck(new Set(desired.map((workload) => workload.uid))) ?? 0;
    if (closed > 0) this.logger.info({ closed }, `closed ${closed} connections that the new configuration no longer allows`);
    if (!this.stopping) await this.enrol(desired, enrollmentReasons(previous, snapshot, this.options.node, this.enrollmentSettings()));
    this.syncAnnotations();
  }

  /**
   * Records the release of pods whose capture entries a previous agent left and that are no
   * longer wanted. Each gets a workload.unenrolled record with the reason, and a log line naming it.
   */
  private releaseStale(cookies: readonly bigint[]): void {
    if (cookies.length === 0) return;
    const previous = this.enrolledFile.load();
    for (const cookie of cookies) {
      const record = previous.get(cookie.toString());
      if (record === undefined) continue;
      const reason = `while no agent ran: ${this.releaseReason(record.workload)}`;
      this.logger.info({ workload: record.workload.uid, cookie: cookie.toString(), reason }, "released the capture of a pod that is no longer enrolled");
      this.audit?.write(workloadRecord({ action: "unenrolled", workload: record.workload, identity: record.identity, reason }, this.options.node, new Date().toISOString()));
    }
  }

  /**
   * Takes over the CNI sandboxes that the previous agent had enrolled: until the kubelet reports a
   * new pod's IP, only the sandbox has it, and without it the pod would be released.
   */
  private restoreSandboxes(previous: readonly EnrolledRecord[]): void {
    for (const record of previous) {
      const sandbox = record.sandbox;
      const workload = this.state?.workload(record.workload.uid);
      if (sandbox === undefined || workload === undefined || workload.nodeName !== this.options.node) continue;
      if (workload.podUid !== undefined && record.workload.podUid !== undefined && workload.podUid !== record.workload.podUid) continue;
      if (!fs.existsSync(sandbox.netns)) continue;
      this.cniEnrolment.pods.add(workload.uid, sandbox);
    }
  }

  /** Says why a workload that a previous agent enrolled is not enrolled now. */
  private releaseReason(before: Workload): string {
    const now = this.state?.workload(before.uid);
    if (now === undefined) return "pod deleted";
    if (now.nodeName !== this.options.node) return `pod moved to node ${now.nodeName}`;
    if (now.ip === "") return "pod has no IP";
    if (this.conflicted.has(now.uid)) return "another pod of this node has its IP";
    const decision = enrollmentDecision(this.state!, now, this.enrollmentSettings());
    return decision.enrolled ? "its sandbox was replaced" : decision.reason;
  }

  /** Returns the path of the host's network namespace: --host-netns, else the one of the host's PID 1. */
  private hostNetns(): string {
    return hostNetnsPath(this.options.hostNetns, this.options.hostProc ?? DEFAULT_HOST_PROC);
  }

  /**
   * With --probe-snat, writes the probe SNAT table with the addresses of the pods that the previous
   * agent had enrolled, which the first enrolment then replaces. Without it, removes a table that
   * an earlier run left. A failure is logged and never stops the start.
   */
  private startProbeSnat(previous: readonly EnrolledRecord[]): void {
    const logger = this.logger.child({ component: "capture" });
    if (!this.options.probeSnat) {
      removeProbeSnatTable(this.hostNetns(), logger);
      return;
    }
    this.probeSnat = new ProbeSnat({ hostNetns: this.hostNetns(), probeSources: this.options.probeSources ?? DEFAULT_PROBE_SOURCES, logger });
    this.probeSnat.install(previous.flatMap((record) => workloadIps(record.workload)));
  }

  /** Returns the addresses of the enrolled workloads, every family. */
  private enrolledAddresses(): string[] {
    return (this.reconciler?.list() ?? []).flatMap((entry) => workloadIps(entry.workload));
  }

  /**
   * Updates the probe SNAT table's addresses once the current burst of enrolments is over, in one
   * nftables transaction. Nothing changes once the agent stops: the table keeps its pods.
   */
  private scheduleProbeSnatUpdate(): void {
    if (this.probeSnat === undefined || this.probeSnatUpdatePending) return;
    this.probeSnatUpdatePending = true;
    setImmediate(() => {
      this.probeSnatUpdatePending = false;
      if (!this.stopping) this.probeSnat?.update(this.enrolledAddresses());
    });
  }

  /** Saves the enrolled set soon, once a burst of enrolments is over. */
  private scheduleEnrolledSave(): void {
    if (this.enrolledSaveTimer !== undefined) return;
    this.enrolledSaveTimer = setTimeout(() => {
      this.enrolledSaveTimer = undefined;
      this.saveEnrolled();
    }, 100);
    this.enrolledSaveTimer.unref();
  }

  private saveEnrolled(): void {
    const entries = this.reconciler?.list() ?? [];
    const error = this.enrolledFile.save(
      entries.map((entry) => ({ cookie: entry.cookie, workload: entry.workload, identity: entry.identity, sandbox: this.cniEnrolment.pods.sandboxOf(entry.workload.uid) })),
    );
    if (error) this.logger.warn({ err: error }, "cannot save the list of enrolled pods; a later agent cannot name the pods whose capture it releases");
  }

  /** Creates the configuration source that the options name: the manifest folder or the Kubernetes API. */
  private async createSource(): Promise<ConfigSource> {
    if (this.options.kubernetes) {
      const client = await KubeClient.load(this.options.kubernetes);
      this.logger.info({ server: client.server, credentials: this.options.kubernetes.kind }, "reading the configuration from the Kubernetes API server");
      this.kube = new KubeSource({ node: this.options.node, client }, this.logger.child({ component: "kubernetes" }));
      this.annotator = new RedirectionAnnotator(client, this.logger.child({ component: "annotations" }), () => this.annotationInputs());
      if (this.options.daemonset) {
        this.uninstallCheck = new UninstallCheck(client, this.options.daemonset, this.logger.child({ component: "kubernetes" }));
        this.uninstallCheck.start();
      }
      return this.kube;
    }
    if (!this.options.manifestsDir) throw new AgentError("INTERNAL", "no configuration source: pass --manifests DIR or --kubernetes");
    this.logger.info({ dir: this.options.manifestsDir }, "reading the manifests");
    return new ManifestSource(this.options.manifestsDir, this.logger.child({ component: "manifests" }));
  }

  private enrollmentSettings(): EnrollmentSettings {
    return { excludedNamespaces: this.options.excludedNamespaces ?? DEFAULT_ENROLLMENT_SETTINGS.excludedNamespaces };
  }

  /**
   * Lists the workloads of this node to enroll: the ambient ones with an IP, one per IP. A pod
   * that the CNI plugin announced has the addresses of its current sandbox, from the plugin.
   */
  private desiredWorkloads(state: MeshState): Workload[] {
    const settings = this.enrollmentSettings();
    // Every pod of the node with an address claims it, ambient or not: a live pod that left the
    // mesh still owns its namespace, which a pod being deleted with the same IP must not take.
    const claimants = state
      .workloadsOnNode(this.options.node)
      .map((workload) => this.cniEnrolment.pods.complete(workload))
      .filter((workload) => workload.ip !== "" && !workload.hostNetwork);
    // Two Pod objects with one IP: a pod not being deleted wins, then the one enrolled now (or by
    // the previous agent, at start).
    const enrolled = new Set([...(this.reconciler?.list() ?? []).map((entry) => entry.workload.uid), ...this.enrolledAtStart]);
    const { kept, conflicts } = onePerIp(claimants, (workload) => (workload.deleting ? 2 : 0) + (enrolled.has(workload.uid) ? 0 : 1));
    this.warnIpConflicts(conflicts);
    return kept.filter((workload) => isAmbient(state, workload, settings));
  }

  /**
   * Requests the certificates of the pods to enrol, then enrols them. A pod whose listeners fail
   * keeps its certificate requested while it is retried, so a failing request shows in readiness.
   */
  private async enrol(desired: Workload[], reasons?: ReadonlyMap<string, string>): Promise<void> {
    this.certs?.expectPods(new Map(desired.map((workload) => [workload.uid, identityOf(workload, this.trustDomain)])));
    await this.reconciler?.update(desired, reasons);
  }

  /** Logs each IP that several pods of this node claim at once, once while it lasts: none of them is enrolled. */
  private warnIpConflicts(conflicts: readonly IpConflict[]): void {
    this.conflicted = new Set(conflicts.flatMap((conflict) => conflict.uids));
    const current = new Set(conflicts.map((conflict) => `${conflict.ip} ${conflict.uids.join(" ")}`));
    for (const conflict of conflicts) {
      if (this.ipConflicts.has(`${conflict.ip} ${conflict.uids.join(" ")}`)) continue;
      this.logger.warn({ ip: conflict.ip, pods: conflict.uids }, `pods ${conflict.uids.join(", ")} of this node all have IP ${conflict.ip}; none of them is enrolled until one alone has it`);
    }
    this.ipConflicts = current;
  }

  /** Writes ambient.istio.io/redirection on the pods whose capture is in place, and removes it from the others. */
  private syncAnnotations(): void {
    const inputs = this.annotationInputs();
    if (inputs) this.annotator?.sync(inputs.podsOnNode, inputs.enrolled);
  }

  /** Returns the node's pods and the uids whose capture is in place, or undefined before enrolment runs or once the agent stops. */
  private annotationInputs(): { podsOnNode: Workload[]; enrolled: Set<string> } | undefined {
    if (!this.state || !this.reconciler || this.stopping) return undefined;
    return { podsOnNode: this.state.workloadsOnNode(this.options.node), enrolled: new Set(this.reconciler.list().map((entry) => entry.workload.uid)) };
  }

  /** Writes the audit records of policies added, changed, removed and rejected since `previous`. */
  private recordPolicyChanges(previous: ClusterSnapshot | undefined, state: MeshState): void {
    const time = new Date().toISOString();
    const problems = [...(this.source?.problems() ?? []), ...unenforcedPolicyProblems(state.snapshot)];
    for (const record of policyRecords(previous, state.snapshot, this.options.node, time)) this.audit?.write(record);
    for (const record of rejectionRecords(this.recordedProblems, problems, this.options.node, time)) {
      this.audit?.write(record);
      this.policyRejections += 1;
    }
    this.recordedProblems = problems;
  }

  private createProxies(workload: Workload, identity: Identity, network: NetnsPodNetwork, cookie: bigint): WorkloadProxies {
    const logger = this.logger.child({ component: "proxy", workload: workload.uid });
    const tracker = TRACKER_DISABLED_FOR_BENCHMARK ? undefined : this.tracker;
    const limits = { limits: this.limitTracker.limits, limitTracker: this.limitTracker, refusals: this.refusals };
    const common = { node: this.options.node, workload, identity, network, certs: this.certs!, audit: this.audit!, logger, tracker, ...limits };
    const outbound = new OutboundProxy({
      ...common,
      pool: { acceptedTrustDomains: this.identity!.trust },
      originalDestination: (socket) => this.capture!.takeOriginalDestination(cookie, socket),
      resolveDestination: (ip, port) => this.resolveDestination(ip, port),
    });
    const inbound = new InboundHboneServer({
      ...common,
      trustDomain: this.trustDomain,
      acceptedTrustDomains: this.identity!.trust,
      authorize: (connection) => this.authorizeInbound(workload.uid, connection),
      lookupSource: (ip) => this.state?.workloadByIp(ip),
      currentWorkload: () => this.state?.workload(workload.uid),
      destinationService: (port, requestedHost) => this.state && inboundServiceOf(this.state, workload.uid, port, requestedHost),
    });
    const plaintext = new InboundPlaintextServer({
      ...common,
      authorize: (connection) => this.authorizeInbound(workload.uid, connection),
      lookupSource: (ip) => this.state?.workloadByIp(ip),
      onListenerFd: (fd, family) =>
        family === 6 && network.podIp6 !== undefined
          ? this.capture!.attachInbound6?.(cookie, network.podIp6, network.podIp, fd)
          : this.capture!.attachInbound(network.netnsPath, cookie, network.podIp ?? workload.ip, fd),
      inboundDestination: (socket) => this.capture!.inboundDestination(socket),
      destinationService: (port) => this.state && inboundServiceOf(this.state, workload.uid, port, undefined),
    });
    const servers = [inbound, plaintext, outbound];
    const certs = this.certs!;
    return {
      start: async () => {
        // The certificate is requested before the listeners start, so the first connection finds it.
        certs.retain(identity, workload.uid);
        for (const server of servers) await server.start();
      },
      // Each stop() closes its listener before its first await, so all three close in this tick.
      stop: async (graceMs = 0) => {
        const drained = sumDrains(await Promise.all(servers.map((server) => server.stop(graceMs))));
        certs.release(identity, workload.uid);
        return drained;
      },
      openConnections: () => servers.reduce((open, server) => open + server.openConnections, 0),
      recheck: () => inbound.recheck() + plaintext.recheck(),
    };
  }

  /**
   * Decides how an outbound connection reaches `ip:port`. A Service VIP is replaced by one of the
   * Service's ready endpoints (its pod IP and target port). The destination pod is then reached
   * through an HBONE tunnel when it is in the mesh, and as plain TCP otherwise.
   */
  private resolveDestination(ip: string, port: number): DestinationTarget {
    const state = this.state;
    if (state === undefined) return { kind: "passthrough", address: { ip, port } };

    const choice = this.endpointPicker.pick(state, ip, port);
    if (choice?.kind === "unavailable") {
      return { kind: "unavailable", service: choice.service.uid, reason: choice.reason, message: choice.message };
    }
    if (choice?.kind === "endpoint") {
      const { workload, ip: endpointIp, targetPort } = choice.endpoint;
      return this.routeToWorkload(state, workload, { ip: endpointIp, port: targetPort }, choice.service.uid);
    }
    return this.routeToWorkload(state, state.workloadByIp(ip), { ip, port });
  }

  private routeToWorkload(
    state: MeshState,
    workload: Workload | undefined,
    address: { ip: string; port: number },
    service?: string,
  ): DestinationTarget {
    const serviceField = service === undefined ? {} : { service };
    if (workload && isAmbient(state, workload, this.enrollmentSettings())) {
      return { kind: "hbone", workload, identity: identityOf(workload, this.trustDomain), address, ...serviceField };
    }
    return { kind: "passthrough", workload, address, ...serviceField };
  }

  /**
   * Authorizes an inbound connection with the policies that apply to the destination workload now.
   * A workload that left the mesh state is denied.
   */
  private authorizeInbound(uid: string, connection: RbacConnection): AuthorizationResult {
    const state = this.state!;
    const workload = state.workload(uid);
    if (!workload) return { decision: "deny", reason: "no_allow_match", dryRun: [] };
    return authorizerFor(state, workload, this.authorizationSettings()).evaluate(connection);
  }

  private authorizationSettings(): AuthorizationSettings {
    return {
      rootNamespace: this.options.rootNamespace,
      trustDomain: this.trustDomain,
      trustDomainAliases: this.identity?.trust.aliases,
      enrollment: this.enrollmentSettings(),
    };
  }

  /** Collects the agent's state for the admin routes, as functions read at request time. */
  private adminSources(): AdminSources {
    return {
      node: this.options.node,
      version: agentVersion(),
      // The process's start, so that uptime matches the pid that /status reports.
      startedAt: Date.now() - Math.round(process.uptime() * 1000),
      configurationSource: this.options.kubernetes ? "kubernetes" : "manifests",
      rootNamespace: this.options.rootNamespace,
      trustDomain: () => this.trustDomain,
      state: () => this.state,
      enrollmentSettings: () => this.enrollmentSettings(),
      enrolled: () => this.reconciler?.list(),
      desired: () => this.reconciler?.desiredWorkloads() ?? [],
      ambiguous: () => this.reconciler?.listAmbiguous() ?? [],
      isolated: () => this.reconciler?.listIsolated() ?? [],
      certificates: () => this.certs?.status() ?? [],
      identity: () => this.identity,
      captureSelection: () => this.captureSelection,
      captureAttached: () => this.capture !== undefined,
      captureUsage: () => this.capture?.usage(),
      captureEntries: () => captureEntriesOf(this.capture, this.options.pinRoot),
      probeSnat: () => this.probeSnat?.status(),
      kubernetes: () => this.kube?.health(),
      cni: () => (this.options.cni ? (this.cni?.chain.status() ?? { chained: false, outcome: "not started" }) : undefined),
      problems: () => this.source?.problems() ?? [],
      connections: () => this.tracker,
      stopping: () => this.stopping,
      limits: () => this.limitTracker.limits,
      refusals: () => this.refusals?.totals() ?? [],
      logLevels: logLevelsOf(this.logger),
    };
  }
}
