// The inbound plaintext server of one enrolled pod, on port 15006. sk_lookup steers here every TCP
// connection to the pod that did not arrive through an HBONE tunnel, such as a client outside the
// mesh. PeerAuthentication decides whether plaintext is accepted at all (STRICT rejects it); then
// the pod's AuthorizationPolicies decide, with no peer identity, as for any plaintext source.

import net from "node:net";
import type { AuditPeer, AuditRecorder } from "../audit/record";
import { AgentError } from "../errors";
import { formatSpiffeId } from "../identity/spiffe";
import type { Logger } from "../log";
import type { AuthorizationResult, RbacConnection } from "../rbac/types";
import { hasWorkloadIp } from "../state/ip";
import type { Identity, Workload } from "../state/types";
import { ConnectionRecord, denialError, peerOf, type ConnectionRegistry } from "./connection-record";
import { copyBidirectional, resetSocket, tcpEndpoint } from "./copy";
import { ConnectionDrain, stopReason, type DrainSummary } from "./drain";
import { CONNECT_TIMEOUT_MS, INBOUND_PLAINTEXT_PORT, PROXY_PORTS } from "./hbone";
import type { PodNetwork } from "./pod-network";
import { recordPolicyChange } from "./policy-change";
import { connectTcp, formatAddress, ignoreError, normalizeIp, remoteAddressOf } from "./tcp";
import { applicationSourceFor } from "./transparency";
import { bufferedBytesRefusal, copyLimitsOf, resolveLimitOptions, type LimitTracker, type ProxyLimitOptions, type Release } from "./limit-tracker";
import { closeReasonOf, type RefusalEvent, type RefusalLog } from "./refusal-log";

export interface InboundPlaintextServerOptions extends ProxyLimitOptions {
  node: string;
  workload: Workload;
  identity: Identity;
  network: PodNetwork;
  /** Decides a connection with the workload's policies now, PeerAuthentication included. */
  authorize(connection: RbacConnection): AuthorizationResult;
  lookupSource(ip: string): Workload | undefined;
  audit: AuditRecorder;
  logger: Logger;
  /** The agent's tracker of open connections, with which every connection record registers. */
  tracker?: ConnectionRegistry;
  /**
   * Called with each listener's file descriptor before it accepts, so capture can steer to it:
   * the IPv4 one, and for a dual-stack pod the IPv6 one (family 6).
   */
  onListenerFd?(fd: number, family: 4 | 6): void;
  /**
   * The address the client dialled, when capture rewrote the destination (nftables REDIRECT).
   * When absent or undefined, the accepted socket's local address is the dialled address.
   */
  inboundDestination?(socket: net.Socket): { ip: string; port: number } | undefined;
  /** Returns the uid of the Service that a connection to the pod's `port` is for (see inboundServiceOf); without it, records name no Service. */
  destinationService?(port: number): string | undefined;
}

/** One accepted connection, so that stop() can abort it. */
interface ActiveConnection {
  client: net.Socket;
  /** The pod address and port the client dialled. */
  dialled: { ip: string; port: number };
  upstream?: net.Socket;
  record: ConnectionRecord;
  done: Promise<void>;
  /** The facts the connection passed authorization with, so recheck() can evaluate them again; unset until then. */
  authorized?: RbacConnection;
}

export class InboundPlaintextServer {
  readonly #options: InboundPlaintextServerOptions;
  readonly #logger: Logger;
  readonly #active = new Set<ActiveConnection>();
  readonly #drain = new ConnectionDrain<ActiveConnection>(() => this.#active, (connection) => this.#abort(connection));
  readonly #limits: LimitTracker;
  readonly #refusals: RefusalLog;
  #server: net.Server | undefined;
  /** The outcome of the first stop() call; later calls can only shorten its deadline. */
  #stopped: Promise<DrainSummary> | undefined;
  #stopReason: AgentError | undefined;

  constructor(options: InboundPlaintextServerOptions) {
    this.#options = options;
    this.#logger = options.logger.child({ component: "inbound-plaintext" });
    const { tracker, refusals } = resolveLimitOptions(options, options.node, this.#logger);
    this.#limits = tracker;
    this.#refusals = refusals;
  }

  /** Listens on port 15006 inside the pod. */
  async start(): Promise<void> {
    // Paused until the connection is allowed, so no byte is read from a client that will be rejected.
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (client) => this.#accept(client));
    server.on("error", (error) => this.#logger.error({ err: error }, "inbound plaintext listener failed"));
    await this.#options.network.listen(server, INBOUND_PLAINTEXT_PORT, this.#options.onListenerFd);
    this.#server = server;
    this.#logger.info({ port: INBOUND_PLAINTEXT_PORT }, "inbound plaintext server started");
  }

  /** Counts the connections open now, for the drain log. */
  get openConnections(): number {
    return this.#active.size;
  }

  /**
   * Authorizes every open connection again, with the facts it passed authorization with, and
   * resets the ones now denied (TCP RST to the client and to the application). Their records get
   * reason policy_change. Connections not yet authorized are skipped, because they are authorized
   * with the current configuration anyway. Returns how many connections it closed.
   */
  recheck(): number {
    let closed = 0;
    for (const connection of this.#active) {
      if (connection.authorized === undefined || connection.client.destroyed) continue;
      const result = this.#options.authorize(connection.authorized);
      if (result.decision !== "deny") continue;
      recordPolicyChange(connection.record, connection.authorized, result);
      this.#logger.info(
        { connection_id: connection.record.id, policy: result.policy, reason: result.reason },
        "closing a connection that the new configuration denies",
      );
      resetSocket(connection.client);
      if (connection.upstream) resetSocket(connection.upstream);
      closed += 1;
    }
    return closed;
  }

  /**
   * Closes the listener at once, lets open connections finish for up to `graceMs`, then resets the
   * rest. Resolves once every connection has written its record. A second call may shorten the
   * deadline (0 aborts at once) and resolves with the same summary.
   */
  stop(graceMs = 0): Promise<DrainSummary> {
    if (this.#stopped) {
      void this.#drain.drain(graceMs);
      return this.#stopped;
    }
    this.#stopReason = stopReason(`the inbound plaintext server of ${this.#options.workload.uid}`, graceMs);
    this.#stopped = this.#closeAndDrain(graceMs);
    return this.#stopped;
  }

  async #closeAndDrain(graceMs: number): Promise<DrainSummary> {
    const server = this.#server;
    this.#server = undefined;
    // Once the listener is closed, sk_lookup finds no socket for the pod and drops new connections.
    const closed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    const summary = await this.#drain.drain(graceMs);
    await closed;
    this.#logger.info(summary, "inbound plaintext server stopped");
    return summary;
  }

  #abort(connection: ActiveConnection): void {
    connection.record.fail(this.#stopReason);
    resetSocket(connection.client);
    if (connection.upstream) resetSocket(connection.upstream);
  }

  #accept(client: net.Socket): void {
    client.on("error", ignoreError);
    const sourceIp = normalizeIp(client.remoteAddress ?? "");
    const dialled = this.#dialledAddress(client);
    const src = peerOf(remoteAddressOf(client), this.#options.lookupSource(sourceIp));
    const dst = peerOf(formatAddress(normalizeIp(dialled.ip), dialled.port), this.#options.workload, formatSpiffeId(this.#options.identity));
    const release = this.#admit(client, sourceIp, src, dst, dialled.port);
    if (release === undefined) return;
    const record = new ConnectionRecord({
      node: this.#options.node,
      direction: "inbound",
      transport: "plaintext",
      src,
      dst,
      tracker: this.#options.tracker,
      workload: this.#options.workload.uid,
    });
    const connection: ActiveConnection = { client, dialled, record, done: Promise.resolve() };
    connection.done = this.#serve(connection, sourceIp).finally(() => {
      this.#active.delete(connection);
      release();
    });
    this.#active.add(connection);
  }

  /**
   * Applies the limits before the connection gets a record: the node's buffered bytes, a proxy
   * port as the destination, the client's open connections to this pod's 15006, and the pod's
   * open inbound connections. Resets the client and records the refusal when one of them refuses
   * it. Otherwise it returns the function that gives the slots back.
   */
  #admit(client: net.Socket, sourceIp: string, src: AuditPeer, dst: AuditPeer, port: number): Release | undefined {
    const pod = this.#options.workload.uid;
    const limits = this.#limits.limits;
    const refuse = (event: Pick<RefusalEvent, "reason" | "message" | "limit">): undefined => {
      resetSocket(client);
      this.#refusals.refuse({ listener: "inbound_plaintext", port: INBOUND_PLAINTEXT_PORT, src, dst, ...event });
      return undefined;
    };
    const overBuffered = bufferedBytesRefusal(this.#limits, this.#options.node);
    if (overBuffered !== undefined) return refuse(overBuffered);
    if (PROXY_PORTS.has(port)) {
      return refuse({ reason: "proxy_port_target", message: `plaintext connection from ${src.addr} to ${dst.addr}, a proxy port (15001, 15006, 15008) of pod ${pod}, which is never a destination` });
    }
    const releasePeer = this.#limits.acquirePeer(pod, "inbound_plaintext", sourceIp);
    if (releasePeer === undefined) {
      const message = `client ${sourceIp} has ${limits.maxConnectionsPerPeer} open plaintext connections to pod ${pod}, the limit (--max-connections-per-peer)`;
      return refuse({ reason: "connections_per_peer", message, limit: limits.maxConnectionsPerPeer });
    }
    const releasePod = this.#limits.acquire(pod, "inbound");
    if (releasePod === undefined) {
      releasePeer();
      const message = `pod ${pod} has ${limits.maxConnectionsPerPod} open inbound connections, the limit (--max-connections-per-pod)`;
      return refuse({ reason: "connections_per_pod", message, limit: limits.maxConnectionsPerPod });
    }
    return () => {
      releasePeer();
      releasePod();
    };
  }

  async #serve(connection: ActiveConnection, sourceIp: string): Promise<void> {
    const { client, record } = connection;
    try {
      const port = this.#checkDestination(connection.dialled, record);
      record.routed = true;
      const service = this.#options.destinationService?.(port);
      if (service !== undefined) record.dst.service = service;
      connection.authorized = this.#authorize(sourceIp, arrivalIp(connection.dialled.ip, this.#options.workload), port, record);
      connection.upstream = await this.#connectApplication(port, connection, sourceIp);
      connection.upstream.on("error", ignoreError);
      client.resume();
      record.opened(this.#options.audit);
      const result = await copyBidirectional(tcpEndpoint("client", client), tcpEndpoint("application", connection.upstream), record.counters, copyLimitsOf(this.#limits));
      record.bytesSent = result.bytesForward;
      record.bytesRecv = result.bytesBackward;
      if (result.error) this.#recordCopyError(record, result.error);
    } catch (error) {
      record.fail(error);
      connection.upstream?.destroy();
      resetSocket(client);
    } finally {
      record.write(this.#options.audit, this.#logger);
    }
  }

  #recordCopyError(record: ConnectionRecord, error: AgentError): void {
    record.fail(error);
    const reason = closeReasonOf(error);
    if (reason !== undefined) this.#refusals.countClosed("inbound_plaintext", reason);
  }

  /** Returns the address the client dialled: from capture when it rewrote the destination, else the socket's local address. */
  #dialledAddress(client: net.Socket): { ip: string; port: number } {
    const fromCapture = this.#options.inboundDestination?.(client);
    return fromCapture ?? { ip: client.localAddress ?? "", port: client.localPort ?? 0 };
  }

  /** Returns the port the client dialled. The address must be this pod's (#admit refused proxy ports). */
  #checkDestination(dialled: { ip: string; port: number }, record: ConnectionRecord): number {
    const ip = normalizeIp(dialled.ip);
    const port = dialled.port;
    if (!hasWorkloadIp(this.#options.workload, ip)) {
      const error = new AgentError("UNKNOWN_DESTINATION", `plaintext connection to ${record.dst.addr} is not for pod ${this.#options.workload.uid} at ${this.#options.workload.ip}`);
      record.deny("unknown_destination", error);
      throw error;
    }
    return port;
  }

  /** Authorizes the connection and returns the facts it was allowed with; throws the denial otherwise. */
  #authorize(sourceIp: string, destinationIp: string, port: number, record: ConnectionRecord): RbacConnection {
    const connection: RbacConnection = { sourceIp, destinationIp, destinationPort: port };
    const result = this.#options.authorize(connection);
    record.authorized(result);
    if (result.decision === "allow") return connection;
    const error = denialError(result, `plaintext client ${record.src.addr}`, record.dst.addr);
    record.fail(error);
    throw error;
  }

  /** Connects to the application, from the client's address where the pod network can keep it. */
  async #connectApplication(port: number, connection: ActiveConnection, sourceIp: string): Promise<net.Socket> {
    const ip = arrivalIp(connection.dialled.ip, this.#options.workload);
    const client = { ip: sourceIp, port: connection.client.remotePort ?? 0 };
    const source = applicationSourceFor(this.#options.network, client, ip, this.#logger, true);
    try {
      return await connectTcp(this.#options.network, ip, port, CONNECT_TIMEOUT_MS, (pending) => (connection.upstream = pending), source);
    } catch (error) {
      throw new AgentError("UPSTREAM_CONNECT_FAILED", `connect to the application at ${formatAddress(ip, port)} failed: ${(error as Error).message}`, {
        cause: error,
      });
    }
  }
}

/**
 * Returns the pod address a plaintext client dialled: the IPv4 or, for a dual-stack pod, the IPv6
 * address, as the accepted socket's local address shows it. Falls back to the primary pod IP once
 * the socket has lost its address.
 */
function arrivalIp(dialledIp: string, workload: Workload): string {
  return normalizeIp(dialledIp === "" ? workload.ip : dialledIp);
}
