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
import { InboundPlaintextServer } from "./proxy/inbound-plaintext";
import { OutboundProxy, type DestinationTarget } from "./proxy/outbound";
import { authorize } from "./rbac/authorize";
import type { RbacConnection } from "./rbac/types";
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
   * Stops serving. The pinned capture programs and map entries stay, so enrolled pods fail closed:
   * their connections are refused until an agent serves them again. `agentctl capture remove` detaches them.
   */
  async stop(): Promise<void> {
    this.source?.stop();
    await this.admin?.stop();
    await this.reconciler?.stop();
    this.capture?.close();
    await this.audit?.close();
    this.releaseLocks();
    this.logger.info("agent stopped");
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
    this.state = new MeshState(snapshot);
    this.logger.info(
      { workloads: snapshot.workloads.size, policies: snapshot.authorizationPolicies.size },
      "configuration updated",
    );
    await this.reconciler?.update(enrolledWorkloads(this.state, this.options.node));
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
      stop: async () => {
        await Promise.all(servers.map((server) => server.stop()));
      },
    };
  }

  /** Decides how an outbound connection reaches `ip`: through an HBONE tunnel when the destination is in the mesh. */
  private resolveDestination(ip: string, port: number): DestinationTarget {
    const address = { ip, port };
    const workload = this.state?.workloadByIp(ip);
    if (workload && this.state && isAmbient(this.state, workload)) {
      return { kind: "hbone", workload, identity: identityOf(workload, this.trustDomain), address };
    }
    return { kind: "passthrough", workload, address };
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
