// The node agent: wires discovery, state, capture, identity, the per-pod proxies, authorization
// and audit together, and keeps them in step as the manifests change.

import { AuditFileSink } from "./audit/file-sink";
import { AdminServer } from "./admin/server";
import { Capture } from "./capture/bpf";
import { loadNative } from "./capture/native";
import type { NetnsPodNetwork } from "./capture/netns-network";
import { PinRootLock } from "./capture/pin-lock";
import { checkHost } from "./capture/preflight";
import { ManifestSource } from "./discovery/manifests";
import { enrolledWorkloads, isAmbient } from "./enroll/enrollment";
import { EnrollmentReconciler, type WorkloadProxies } from "./enroll/reconciler";
import { EmbeddedCa } from "./identity/ca";
import { CertManager } from "./identity/cert-manager";
import { identityOf } from "./identity/spiffe";
import type { Logger } from "./log";
import { InboundHboneServer } from "./proxy/inbound";
import { sumDrains } from "./proxy/drain";
import { InboundPlaintextServer } from "./proxy/inbound-plaintext";
import { OutboundProxy, type DestinationTarget } from "./proxy/outbound";
import { authorize } from "./rbac/authorize";
import type { RbacConnection } from "./rbac/types";
import { EndpointPicker } from "./state/endpoints";
import { MeshState } from "./state/mesh-state";
import type { ClusterSnapshot, Identity, Workload } from "./state/types";

export interface AgentOptions {
  node: string;
  manifestsDir: string;
  caDir: string;
  auditFile: string;
  /** bpffs folder holding this node's pinned maps and links. */
  pinRoot: string;
  cgroupPath: string;
  objectPath: string;
  /** "host:port" of the admin API. */
  adminAddress: string;
  /** Namespace whose policies apply mesh-wide. */
  rootNamespace: string;
}

/** The problems found before start, each with what is missing and how to fix it. */
export class HostNotReadyError extends Error {
  constructor(readonly problems: { what: string; fix: string }[]) {
    super(
      "this host cannot run the agent:\n" + problems.map((problem) => `  - ${problem.what}: ${problem.fix}`).join("\n"),
    );
    this.name = "HostNotReadyError";
  }
}

export class Agent {
  private state: MeshState | undefined;
  private source: ManifestSource | undefined;
  private capture: Capture | undefined;
  private audit: AuditFileSink | undefined;
  private reconciler: EnrollmentReconciler | undefined;
  private admin: AdminServer | undefined;
  private certs: CertManager | undefined;
  private lock: PinRootLock | undefined;
  private nodeLock: PinRootLock | undefined;
  /** Round-robin position of each Service port, so connections to a VIP spread over its endpoints. */
  private readonly endpointPicker = new EndpointPicker();
  private trustDomain = "cluster.local";

  constructor(
    private readonly options: AgentOptions,
    private readonly logger: Logger,
  ) {}

  async start(): Promise<void> {
    const problems = checkHost({
      pinRoot: this.options.pinRoot,
      cgroupPath: this.options.cgroupPath,
      objectPath: this.options.objectPath,
    });
    if (problems.length > 0) throw new HostNotReadyError(problems);
    this.nodeLock = PinRootLock.acquireNode(this.options.node);
    this.lock = PinRootLock.acquire(this.options.pinRoot);
    loadNative();

    const ca = await EmbeddedCa.load(this.options.caDir);
    this.trustDomain = ca.trustDomain;
    this.certs = new CertManager(ca, this.logger.child({ component: "certs" }));
    this.audit = new AuditFileSink(this.options.auditFile, this.logger.child({ component: "audit" }));

    this.source = new ManifestSource(this.options.manifestsDir, this.logger.child({ component: "manifests" }));
    await this.source.start();
    this.state = new MeshState(this.source.snapshot());
    this.warnVipConflicts(this.state);

    // The admin port is taken before capture is touched, so a port conflict fails without side effects.
    this.admin = new AdminServer(this.options.adminAddress, () => this.configDump(), this.logger.child({ component: "admin" }));
    await this.admin.start();

    this.capture = Capture.attach(
      { pinRoot: this.options.pinRoot, cgroupPath: this.options.cgroupPath, objectPath: this.options.objectPath },
      this.logger.child({ component: "capture" }),
    );
    this.reconciler = new EnrollmentReconciler({
      trustDomain: this.trustDomain,
      capture: this.capture,
      createProxies: (workload, identity, network, cookie) => this.createProxies(workload, identity, network, cookie),
      logger: this.logger.child({ component: "enroll" }),
    });
    await this.reconciler.update(enrolledWorkloads(this.state, this.options.node));
    this.reconciler.removeStaleCookies();
    this.source.on("change", (snapshot: ClusterSnapshot) => void this.applySnapshot(snapshot));
    this.logger.info(
      { enrolled: this.reconciler.list().map((entry) => entry.workload.uid), admin: this.options.adminAddress },
      "agent ready",
    );
  }

  /**
   * Stops serving. Every listener closes at once. Open connections and HBONE streams may finish for
   * up to `drainMs`, and the ones still open then are reset. Each connection writes its audit record,
   * and the audit file is flushed before this resolves. The pinned capture programs and map entries
   * stay, so enrolled pods fail closed: their connections are refused until an agent serves them
   * again. `agentctl capture remove` detaches them.
   */
  async stop(drainMs = 0): Promise<void> {
    this.source?.stop();
    await this.drain(drainMs);
    await this.admin?.stop();
    this.capture?.close();
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

  private async drain(drainMs: number): Promise<void> {
    if (!this.reconciler) return;
    const open = this.reconciler.openConnections();
    this.logger.info({ open, drainTimeoutMs: drainMs }, "draining: closing the listeners and waiting for open connections");
    const startedAt = Date.now();
    const summary = await this.reconciler.stop(drainMs);
    this.logger.info({ ...summary, durationMs: Date.now() - startedAt }, "drain finished");
  }

  /** Gives up the node and pin-root locks, for an exit that does not wait for stop() to finish. */
  releaseLocks(): void {
    this.lock?.release();
    this.nodeLock?.release();
  }

  /** Re-reads every manifest file now, as on SIGHUP. */
  async reload(): Promise<void> {
    this.logger.info("re-reading the manifests");
    await this.source?.refresh();
  }

  private async applySnapshot(snapshot: ClusterSnapshot): Promise<void> {
    this.state = new MeshState(snapshot, this.state);
    this.warnVipConflicts(this.state);
    this.logger.info(
      { workloads: snapshot.workloads.size, policies: snapshot.authorizationPolicies.size },
      "configuration updated",
    );
    await this.reconciler?.update(enrolledWorkloads(this.state, this.options.node));
  }

  /** Logs each Service cluster IP that is not routed to its Service, and why. */
  private warnVipConflicts(state: MeshState): void {
    for (const { service, vip, workload, other } of state.vipConflicts()) {
      const fields = { service: service.uid, vip, workload: workload?.uid, other: other?.uid, file: service.source.file };
      if (workload) {
        this.logger.warn(
          fields,
          `Service ${service.uid} has cluster IP ${vip}, which is the IP of pod ${workload.uid}; the Service is not routed at that address. Give it a cluster IP from the Service range`,
        );
      } else if (other && state.serviceByVip(vip)?.uid === other.uid) {
        this.logger.warn(
          fields,
          `Service ${service.uid} has cluster IP ${vip}, which Service ${other.uid} already uses; ${other.uid} keeps it. Give ${service.uid} a cluster IP of its own`,
        );
      } else {
        this.logger.warn(
          fields,
          `Services ${service.uid} and ${other?.uid} both have cluster IP ${vip}; neither is routed at that address until one of them changes it`,
        );
      }
    }
  }

  private createProxies(workload: Workload, identity: Identity, network: NetnsPodNetwork, cookie: bigint): WorkloadProxies {
    const logger = this.logger.child({ workload: workload.uid });
    const common = { node: this.options.node, workload, identity, network, certs: this.certs!, audit: this.audit!, logger };
    const outbound = new OutboundProxy({
      ...common,
      originalDestination: (socket) =>
        this.capture!.takeOriginalDestination(cookie, socket.remoteAddress ?? "", socket.remotePort ?? 0),
      resolveDestination: (ip, port) => this.resolveDestination(ip, port),
    });
    const inbound = new InboundHboneServer({
      ...common,
      trustDomain: this.trustDomain,
      authorize: (connection) => this.authorizeInbound(workload.uid, connection),
      lookupSource: (ip) => this.state?.workloadByIp(ip),
      currentWorkload: () => this.state?.workload(workload.uid),
    });
    const plaintext = new InboundPlaintextServer({
      ...common,
      mtlsMode: (port) => this.mtlsModeFor(workload.uid, port),
      authorize: (connection) => this.authorizeInbound(workload.uid, connection),
      lookupSource: (ip) => this.state?.workloadByIp(ip),
      onListenerFd: (fd) => this.capture!.attachInbound(network.netnsPath, cookie, workload.ip, fd),
    });
    const servers = [inbound, plaintext, outbound];
    return {
      start: async () => {
        for (const server of servers) await server.start();
      },
      // Each stop() closes its listener before its first await, so all three close in this tick.
      stop: async (graceMs = 0) => sumDrains(await Promise.all(servers.map((server) => server.stop(graceMs)))),
      openConnections: () => servers.reduce((open, server) => open + server.openConnections, 0),
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
      const { workload, targetPort } = choice.endpoint;
      return this.routeToWorkload(state, workload, { ip: workload.ip, port: targetPort }, choice.service.uid);
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
    if (workload && isAmbient(state, workload)) {
      return { kind: "hbone", workload, identity: identityOf(workload, this.trustDomain), address, ...serviceField };
    }
    return { kind: "passthrough", workload, address, ...serviceField };
  }

  /** Authorizes an inbound connection with the policies that apply to the destination workload now. */
  private authorizeInbound(uid: string, connection: RbacConnection) {
    const state = this.state!;
    const workload = state.workload(uid);
    if (!workload) {
      return { decision: "deny" as const, reason: "no_allow_match" as const, dryRun: [] };
    }
    const policies = state.policiesForWorkload(workload, this.options.rootNamespace);
    return authorize(connection, policies, { trustDomain: this.trustDomain });
  }

  /** Returns the PeerAuthentication mode for a port of a workload; STRICT when the workload is unknown. */
  private mtlsModeFor(uid: string, port: number): "STRICT" | "PERMISSIVE" | "DISABLE" {
    const workload = this.state?.workload(uid);
    if (!workload) return "STRICT";
    return this.state!.mtlsModeFor(workload, port, this.options.rootNamespace);
  }

  private configDump(): unknown {
    const state = this.state;
    return {
      node: this.options.node,
      trustDomain: this.trustDomain,
      isolated: (this.reconciler?.listIsolated() ?? []).map((entry) => ({ ...entry, cookie: entry.cookie.toString() })),
      enrolled: (this.reconciler?.list() ?? []).map((entry) => ({
        workload: entry.workload.uid,
        ip: entry.workload.ip,
        netns: entry.netnsPath,
        cookie: entry.cookie.toString(),
      })),
      workloads: state ? [...state.snapshot.workloads.values()].map((workload) => workload.uid) : [],
      policies: state ? [...state.snapshot.authorizationPolicies.keys()] : [],
    };
  }
}
