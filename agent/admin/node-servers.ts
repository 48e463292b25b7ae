// The agent's three HTTP servers and the Prometheus registry they read: the admin API, the metrics
// server (GET /metrics and /stats/prometheus) and the readiness server (GET /healthz/ready). The
// metrics and readiness servers serve the admin API's own route functions, so all three agree.

import net from "node:net";
import { Registry, collectDefaultMetrics } from "prom-client";
import type { AuditPipelineStatus } from "../audit/pipeline";
import { retryUntilBound } from "../handover/takeover";
import type { LogLevels, Logger } from "../log";
import type { ConnectionTracker } from "../proxy/connection-tracker";
import type { Workload } from "../state/types";
import { registerAuditMetrics } from "./metrics";
import { registerAgentMetrics, type AgentMetricsSources } from "./metrics-agent";
import { TrafficMetrics } from "./metrics-traffic";
import { loggingPostRoutes } from "./routes";
import { AdminServer, TextResponse, parseAddress, type AdminRefusals, type AdminRoute, type AdminRoutes } from "./server";
import type { MapUsageView } from "./views";

/** The "host:port" addresses of the servers. The metrics and readiness servers are not created when their address is absent. */
export interface NodeServerAddresses {
  admin: string;
  metrics?: string;
  readiness?: string;
}

/** The values behind the metrics. Each function is read when Prometheus scrapes. */
export interface NodeMetricsSources extends Omit<AgentMetricsSources, "captureMaps" | "connections"> {
  /** The audit pipeline's status; undefined before the pipeline exists. */
  audit(): AuditPipelineStatus | undefined;
  /** The workload by uid, for the istio_tcp_* labels. */
  workload(uid: string): Workload | undefined;
  /** The mesh's trust domain. */
  trustDomain(): string;
  /** The capture maps' usage; undefined while capture is not attached. May throw when the maps cannot be read. */
  captureUsage(): { maps: MapUsageView[] } | undefined;
  /** The open connections of every proxy, which also feed the istio_tcp_* metrics. */
  connections: ConnectionTracker;
}

interface Listener {
  server: AdminServer;
  /** The server's name and address, for the error of a failed rebind. */
  description: string;
}

export class NodeServers {
  /** The registry behind the admin API's /metrics and the metrics server. */
  readonly registry = new Registry();
  /** GET /metrics of the admin API and the metrics server: the registry in Prometheus' text format. */
  readonly metricsRoute: AdminRoute = async () => new TextResponse(this.registry.contentType, await this.registry.metrics());
  #admin: AdminServer | undefined;
  #listeners: Listener[] = [];
  /** Set while reading the capture maps' usage fails, so the failure is logged once. */
  #captureUsageFailing = false;

  constructor(
    private readonly addresses: NodeServerAddresses,
    /** The agent's logger; each server logs through a child with its own component. */
    private readonly logger: Logger,
  ) {}

  /** Registers the audit metrics, the Istio TCP metrics, the agent's own metrics and the process metrics. */
  registerMetrics(sources: NodeMetricsSources): void {
    registerAuditMetrics(this.registry, () => sources.audit());
    const traffic = new TrafficMetrics({ workload: (uid) => sources.workload(uid), trustDomain: () => sources.trustDomain() });
    traffic.register(this.registry);
    sources.connections.observe(traffic);
    registerAgentMetrics(this.registry, {
      version: sources.version,
      capture: () => sources.capture(),
      captureMaps: () => this.#captureMapUsage(sources),
      workloads: () => sources.workloads(),
      certificates: () => sources.certificates(),
      policyRejections: () => sources.policyRejections(),
      rejectedPolicies: () => sources.rejectedPolicies(),
      connections: () => sources.connections.counts(),
      refusals: () => sources.refusals?.() ?? [],
    });
    collectDefaultMetrics({ register: this.registry });
  }

  /**
   * Creates the admin API over `routes`, with POST /logging when `logLevels` is given, and the
   * metrics and readiness servers over its /metrics and /healthz/ready routes. None listens yet.
   * Each server records the connections it drops at its limits in `refusals` when given.
   */
  create(routes: AdminRoutes, logLevels: LogLevels | undefined, refusals?: AdminRefusals["log"]): void {
    const adminLogger = this.logger.child({ component: "admin" });
    if (!isLoopback(parseAddress(this.addresses.admin).host)) {
      adminLogger.warn(
        { admin: this.addresses.admin },
        `the admin API listens on ${this.addresses.admin}, which other hosts and pods may reach: it lists every connection and changes log levels; pass --admin 127.0.0.1:15000 unless a firewall keeps others out`,
      );
    }
    const adminRefusals = refusals && { log: refusals, listener: "admin" as const };
    this.#admin = new AdminServer(this.addresses.admin, routes, adminLogger, loggingPostRoutes(logLevels, adminLogger), undefined, adminRefusals);
    this.#listeners = this.#createListeners(routes["/healthz/ready"], routes["/metrics"], refusals);
  }

  /** Starts the admin API, then the metrics and readiness servers. */
  async start(): Promise<void> {
    await this.#admin!.start();
    for (const listener of this.#listeners) await listener.server.start();
  }

  /** Starts every server once the agent it replaced has released the ports, retrying while a port is still taken. */
  async rebind(): Promise<void> {
    const admin = this.#admin!;
    await retryUntilBound(() => admin.start(), `binding the admin API on ${this.addresses.admin}`);
    for (const listener of this.#listeners) await retryUntilBound(() => listener.server.start(), `binding ${listener.description}`);
  }

  /** Stops the admin API, then the metrics and readiness servers together. */
  async stop(): Promise<void> {
    await this.#admin?.stop();
    await Promise.all(this.#listeners.map((listener) => listener.server.stop()));
  }

  /**
   * Creates the metrics server (GET /metrics and /stats/prometheus, from the admin API's registry)
   * and the readiness server (GET /healthz/ready, the admin API's response), each only when its
   * address is configured. A path either does not serve returns 404.
   */
  #createListeners(readiness: AdminRoute, metrics: AdminRoute, refusals: AdminRefusals["log"] | undefined): Listener[] {
    const listeners: Listener[] = [];
    if (this.addresses.metrics !== undefined) {
      const routes = { "/metrics": metrics, "/stats/prometheus": metrics };
      const logger = this.logger.child({ component: "metrics" });
      const recorded = refusals && { log: refusals, listener: "metrics" as const };
      const server = new AdminServer(this.addresses.metrics, routes, logger, {}, { name: "metrics server", flag: "--metrics" }, recorded);
      listeners.push({ server, description: `the metrics server on ${this.addresses.metrics}` });
    }
    if (this.addresses.readiness !== undefined) {
      const logger = this.logger.child({ component: "readiness" });
      const recorded = refusals && { log: refusals, listener: "readiness" as const };
      const server = new AdminServer(this.addresses.readiness, { "/healthz/ready": probeSummary(readiness) }, logger, {}, { name: "readiness server", flag: "--readiness" }, recorded);
      listeners.push({ server, description: `the readiness server on ${this.addresses.readiness}` });
    }
    return listeners;
  }

  /** Returns the capture maps' usage for the metrics; none while capture is not attached or cannot be read. */
  #captureMapUsage(sources: NodeMetricsSources): MapUsageView[] {
    try {
      const maps = sources.captureUsage()?.maps ?? [];
      this.#captureUsageFailing = false;
      return maps;
    } catch (error) {
      // Logged once per failing period, because Prometheus scrapes every few seconds.
      if (!this.#captureUsageFailing) this.logger.warn({ err: error }, "cannot read the capture maps' usage; the capture map metrics are left out until it can be read");
      this.#captureUsageFailing = true;
      return [];
    }
  }
}

/** Tells whether a listen host is a loopback address or localhost. */
export function isLoopback(host: string): boolean {
  if (host === "localhost" || host === "::1") return true;
  return net.isIPv4(host) && host.startsWith("127.");
}

/**
 * Wraps the admin API's readiness route for the readiness server, which every pod can reach: the
 * same status with only `ready`, `checks` and `stopping` in the body. The API server's address,
 * the watches and the names of the node's pods stay on the admin API.
 */
function probeSummary(readiness: AdminRoute): AdminRoute {
  return async (query) => {
    const full = (await readiness(query)) as TextResponse;
    const body = JSON.parse(full.text) as { ready: boolean; checks: Record<string, boolean>; stopping?: boolean };
    const summary = { ready: body.ready, checks: body.checks, ...(body.stopping === true && { stopping: true }) };
    return new TextResponse("application/json", JSON.stringify(summary, null, 2) + "\n", full.status);
  };
}
