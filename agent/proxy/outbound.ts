// The outbound proxy of one enrolled pod: accepts the connections capture steers to port 15001 and
// sends each one to its original destination, through an HBONE tunnel when the destination is in the
// mesh and as plain TCP otherwise.

import http2 from "node:http2";
import net from "node:net";
import type { AuditRecorder } from "../audit/record";
import { AgentError } from "../errors";
import type { CertificateProvider } from "../identity/cert-manager";
import { formatSpiffeId } from "../identity/spiffe";
import { verificationReasonOf } from "../identity/verify";
import type { Logger } from "../log";
import { hasWorkloadIp, workloadIpOfFamily } from "../state/ip";
import { serviceHostname } from "../state/destination-service";
import type { Identity, Workload } from "../state/types";
import { ConnectionRecord, peerOf, type ConnectionRegistry } from "./connection-record";
import { copyBidirectional, resetSocket, streamEndpoint, tcpEndpoint } from "./copy";
import { ConnectionDrain, stopReason, type DrainSummary } from "./drain";
import { CONNECT_TIMEOUT_MS, HBONE_PORT, OUTBOUND_PORT, PROXY_PORTS, buildConnectHeaders, type Authority } from "./hbone";
import { bufferedBytesRefusal, copyLimitsOf, resolveLimitOptions, type LimitTracker, type ProxyLimitOptions, type Release } from "./limit-tracker";
import { closeReasonOf, type RefusalEvent, type RefusalLog } from "./refusal-log";
import type { PodNetwork } from "./pod-network";
import { HbonePool, type HbonePoolOptions, type PoolStats } from "./pool";
import { connectTcp, formatAddress, ignoreError, normalizeIp, remoteAddressOf } from "./tcp";

/**
 * The route of an outbound connection. `address` is where the bytes go: the original destination, or
 * for a Service VIP the chosen endpoint's pod IP and target port. `service` is the Service's
 * "namespace/name" when the application dialled a VIP.
 */
export type DestinationTarget =
  /** Through an HBONE tunnel to the destination pod, whose certificate must carry `identity`. */
  | { kind: "hbone"; workload: Workload; identity: Identity; address: Authority; service?: string }
  /** As plain TCP: the destination is outside the mesh. */
  | { kind: "passthrough"; workload?: Workload; address: Authority; service?: string }
  /** Nowhere: a Service without a usable endpoint for the port. The connection is refused with `reason`. */
  | { kind: "unavailable"; service: string; reason: string; message: string };

export interface OutboundProxyOptions extends ProxyLimitOptions {
  node: string;
  /** The enrolled pod whose connections this proxy carries. */
  workload: Workload;
  identity: Identity;
  network: PodNetwork;
  certs: CertificateProvider;
  /** The address the application dialled before capture redirected it; undefined when capture has no record. */
  originalDestination(socket: net.Socket): Authority | undefined;
  /** Routes a connection the application made to ip:port. */
  resolveDestination(ip: string, port: number): DestinationTarget;
  audit: AuditRecorder;
  logger: Logger;
  /** The agent's tracker of open connections, with which every connection record registers. */
  tracker?: ConnectionRegistry;
  /** Limits and timers of the HBONE connection pool. The pool's defaults apply when absent. */
  pool?: Omit<HbonePoolOptions, "network" | "certs" | "logger">;
  /** Deadline of the response to a CONNECT request, in ms. Defaults to CONNECT_RESPONSE_TIMEOUT_MS. */
  connectResponseTimeoutMs?: number;
}

/**
 * How long the outbound side waits for the response to a CONNECT: the destination agent's own
 * deadline for its connect to the application (CONNECT_TIMEOUT_MS), plus 5 s for the round trip
 * and a busy peer. A peer that acknowledges PINGs but never responds to a CONNECT then keeps the
 * pod's outbound slot for this long, not forever.
 */
export const CONNECT_RESPONSE_TIMEOUT_MS = CONNECT_TIMEOUT_MS + 5_000;

/** The destination of a connection: its original destination, and the route resolveDestination chose. */
interface Route {
  destination: Authority;
  target: DestinationTarget;
}

/** A connection the limits let in: its slot of the pod's outbound connections, and its route when capture recorded one. */
interface Admission {
  release: Release;
  route?: Route;
}

/** One accepted connection, so that stop() can abort it. */
interface ActiveConnection {
  client: net.Socket;
  record: ConnectionRecord;
  /** Closes whatever the connection opened upstream. */
  upstream: Set<{ destroy(error?: Error): void }>;
  done: Promise<void>;
}

export class OutboundProxy {
  readonly #options: OutboundProxyOptions;
  readonly #logger: Logger;
  readonly #sourceIdentity: string;
  readonly #active = new Set<ActiveConnection>();
  readonly #drain = new ConnectionDrain<ActiveConnection>(() => this.#active, (connection) => this.#abort(connection));
  readonly #pool: HbonePool;
  readonly #limits: LimitTracker;
  readonly #refusals: RefusalLog;
  #server: net.Server | undefined;
  /** The outcome of the first stop() call; later calls can only shorten its deadline. */
  #stopped: Promise<DrainSummary> | undefined;
  #stopReason: AgentError | undefined;

  constructor(options: OutboundProxyOptions) {
    this.#options = options;
    this.#logger = options.logger.child({ component: "outbound" });
    this.#sourceIdentity = formatSpiffeId(options.identity);
    this.#pool = new HbonePool({ ...options.pool, network: options.network, certs: options.certs, logger: this.#logger });
    const { tracker, refusals } = resolveLimitOptions(options, options.node, this.#logger);
    this.#limits = tracker;
    this.#refusals = refusals;
  }

  /** Counts the HBONE pool's connections and streams, for diagnostics. */
  poolStats(): PoolStats {
    return this.#pool.stats();
  }

  /** Listens on port 15001 inside the pod. */
  async start(): Promise<void> {
    // Paused until the destination is known, so no byte is read before there is somewhere to send it.
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (client) => this.#accept(client));
    server.on("error", (error) => this.#logger.error({ err: error }, "outbound listener failed"));
    await this.#options.network.listen(server, OUTBOUND_PORT);
    this.#server = server;
    this.#logger.info({ port: OUTBOUND_PORT }, "outbound proxy started");
  }

  /** Counts the connections open now, for the drain log. */
  get openConnections(): number {
    return this.#active.size;
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
    this.#stopReason = stopReason(`the outbound proxy of ${this.#options.workload.uid}`, graceMs);
    this.#stopped = this.#closeAndDrain(graceMs);
    return this.#stopped;
  }

  async #closeAndDrain(graceMs: number): Promise<DrainSummary> {
    const closed = this.#closeListener();
    const summary = await this.#drain.drain(graceMs);
    await this.#pool.close();
    await closed;
    this.#logger.info(summary, "outbound proxy stopped");
    return summary;
  }

  #closeListener(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    return server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
  }

  #abort(connection: ActiveConnection): void {
    connection.record.fail(this.#stopReason);
    resetSocket(connection.client);
    for (const upstream of connection.upstream) {
      // Both kinds must read as an abort at the destination: a TCP reset, or for a pooled CONNECT stream
      // a destroy with an error, which sends RST_STREAM INTERNAL_ERROR and leaves the shared connection up.
      if (upstream instanceof net.Socket) resetSocket(upstream);
      else upstream.destroy(this.#stopReason);
    }
  }

  #accept(client: net.Socket): void {
    client.on("error", ignoreError);
    const admission = this.#admit(client);
    if (admission === undefined) return;
    const record = new ConnectionRecord({
      node: this.#options.node,
      direction: "outbound",
      transport: "plaintext",
      src: peerOf(remoteAddressOf(client), this.#options.workload, this.#sourceIdentity),
      dst: { addr: "unknown" },
      tracker: this.#options.tracker,
      workload: this.#options.workload.uid,
    });
    const connection: ActiveConnection = { client, record, upstream: new Set(), done: Promise.resolve() };
    this.#active.add(connection);
    connection.done = this.#handle(connection, admission).finally(() => {
      this.#active.delete(connection);
      admission.release();
    });
  }

  /**
   * Applies the limits before the connection gets a record: the node's buffered bytes, a proxy
   * port as the destination, and the pod's open outbound connections. Resets the client and
   * records the refusal when one of them refuses it.
   */
  #admit(client: net.Socket): Admission | undefined {
    const workload = this.#options.workload;
    const limits = this.#limits.limits;
    const src = peerOf(remoteAddressOf(client), workload, this.#sourceIdentity);
    const refuse = (event: Pick<RefusalEvent, "reason" | "message" | "limit" | "dst">): undefined => {
      resetSocket(client);
      this.#refusals.refuse({ listener: "outbound", port: OUTBOUND_PORT, src, ...event });
      return undefined;
    };
    const overBuffered = bufferedBytesRefusal(this.#limits, this.#options.node);
    if (overBuffered !== undefined) return refuse(overBuffered);
    // A client reset before the accept leaves a socket without a peer address to look up by: #handle records it.
    const recorded = client.remoteAddress === undefined ? undefined : this.#options.originalDestination(client);
    let route: Route | undefined;
    if (recorded !== undefined) {
      const destination = { ip: normalizeIp(recorded.ip), port: recorded.port };
      route = { destination, target: this.#options.resolveDestination(destination.ip, destination.port) };
    }
    const proxyPort = route && this.#proxyPortTarget(route);
    if (proxyPort !== undefined) {
      const message = `pod ${workload.uid} dialled ${proxyPort.addr}, a proxy port (15001, 15006, 15008) of ${proxyPort.owner}, which is never a destination`;
      return refuse({ reason: "proxy_port_target", message, dst: { addr: proxyPort.addr } });
    }
    const release = this.#limits.acquire(workload.uid, "outbound");
    if (release === undefined) {
      const message = `pod ${workload.uid} has ${limits.maxConnectionsPerPod} open outbound connections, the limit (--max-connections-per-pod)`;
      const dst = route && { addr: formatAddress(route.destination.ip, route.destination.port) };
      return refuse({ reason: "connections_per_pod", message, limit: limits.maxConnectionsPerPod, dst });
    }
    return { release, route };
  }

  /**
   * Returns the address and its owner when the connection would reach a proxy port (15001, 15006,
   * 15008) of a loopback or unspecified address, of this pod, or of a pod in the mesh: such a
   * connection can only loop through the agent or reach its listeners from the wrong side. Checks
   * the dialled address and, for a Service, the chosen endpoint.
   */
  #proxyPortTarget({ destination, target }: Route): { addr: string; owner: string } | undefined {
    const addresses = target.kind === "unavailable" ? [destination] : [destination, target.address];
    for (const address of addresses) {
      if (!PROXY_PORTS.has(address.port)) continue;
      const addr = formatAddress(address.ip, address.port);
      if (hasWorkloadIp(this.#options.workload, address.ip)) return { addr, owner: "the pod itself" };
      if (isLoopbackIp(address.ip)) return { addr, owner: "a loopback address" };
      if (address.ip === "0.0.0.0" || address.ip === "::") return { addr, owner: "the unspecified address, which Linux connects to the local host" };
      const routedInMesh = target.kind === "hbone" && target.address.ip === address.ip && target.address.port === address.port;
      if (routedInMesh) return { addr, owner: "a pod in the mesh" };
    }
    return undefined;
  }

  async #handle(connection: ActiveConnection, admission: Admission): Promise<void> {
    const { client, record } = connection;
    try {
      const { destination, target } = this.#checkedRoute(client, record, admission.route);
      if (target.kind === "unavailable") {
        record.dst = { addr: formatAddress(destination.ip, destination.port), service: target.service };
        const error = new AgentError("NO_HEALTHY_ENDPOINT", target.message);
        record.deny(target.reason, error);
        throw error;
      }
      record.dst = peerOf(formatAddress(target.address.ip, target.address.port), target.workload);
      if (target.service !== undefined) record.dst.service = target.service;
      record.routed = true;
      if (this.#logger.isLevelEnabled("debug")) {
        this.#logger.debug(
          { connection_id: record.id, "src.addr": record.src.addr, "dst.addr": record.dst.addr, "dst.service": target.service, kind: target.kind },
          "connection opened",
        );
      }
      if (target.kind === "hbone") {
        await this.#tunnel(connection, target.address, target);
      } else {
        await this.#passthrough(connection, target.address);
      }
    } catch (error) {
      // A destination whose certificate failed verification is a refusal with its own reason.
      const reason = verificationReasonOf(error);
      if (reason && error instanceof AgentError) record.deny(reason, error);
      else record.fail(error);
      resetSocket(client);
    } finally {
      record.write(this.#options.audit, this.#logger);
    }
  }

  /** Returns the route that #admit looked up, and throws the denial when capture recorded no original destination. */
  #checkedRoute(client: net.Socket, record: ConnectionRecord, route: Route | undefined): Route {
    if (client.remoteAddress === undefined) {
      throw new AgentError("STREAM_RESET", "the client reset the connection before the agent accepted it");
    }
    if (!route) {
      const error = new AgentError(
        "NO_ORIGINAL_DESTINATION",
        `no original destination recorded for the connection from ${record.src.addr}; check that capture is attached for this pod`,
      );
      record.deny("no_original_destination", error);
      throw error;
    }
    return route;
  }

  /** Connects straight to the destination and copies bytes both ways. */
  async #passthrough(connection: ActiveConnection, destination: Authority): Promise<void> {
    const upstream = await this.#connectUpstream(connection, destination.ip, destination.port);
    connection.record.opened(this.#options.audit);
    const result = await copyBidirectional(tcpEndpoint("client", connection.client), tcpEndpoint("destination", upstream), connection.record.counters, copyLimitsOf(this.#limits));
    this.#recordCopy(connection.record, result);
  }

  /** Opens an HBONE tunnel to the destination pod and copies bytes through it. */
  async #tunnel(
    connection: ActiveConnection,
    destination: Authority,
    target: Extract<DestinationTarget, { kind: "hbone" }>,
  ): Promise<void> {
    const { client, record } = connection;
    record.transport = "hbone";
    record.dst.identity = formatSpiffeId(target.identity);
    // The tunnel goes to the address the route chose, so an IPv6 destination gets an IPv6 tunnel.
    record.dst.hbone_addr = formatAddress(destination.ip, HBONE_PORT);

    const { stream, status } = await this.#requestTunnel(connection, destination, target);
    try {
      if (status !== 200) {
        this.#rejectTunnel(record, status);
      }
      record.opened(this.#options.audit);
      const result = await copyBidirectional(tcpEndpoint("client", client), streamEndpoint("tunnel", stream), record.counters, copyLimitsOf(this.#limits));
      this.#recordCopy(record, result);
    } finally {
      closeStream(stream);
    }
  }

  /**
   * Opens a CONNECT stream and waits for its response status. A stream that the peer refused
   * without processing it is sent again once, on a fresh connection. The peer signals this with
   * REFUSED_STREAM: in RST_STREAM, or implicitly for a stream above the last-stream-id of its
   * GOAWAY, as an agent that hands its node over sends. No application byte has been sent by
   * then, because copying starts only after the response.
   */
  async #requestTunnel(
    connection: ActiveConnection,
    destination: Authority,
    target: Extract<DestinationTarget, { kind: "hbone" }>,
  ): Promise<{ stream: http2.ClientHttp2Stream; status: number }> {
    const { record } = connection;
    const hboneAddr = formatAddress(destination.ip, HBONE_PORT);
    for (let attempt = 1; ; attempt += 1) {
      const stream = await this.#openStream(connection, destination, target, attempt > 1);
      // A closed stream no longer refers to its session, which a retry must avoid.
      const session = stream.session;
      connection.upstream.add(stream);
      if (this.#logger.isLevelEnabled("debug")) {
        stream.on("error", (error) => this.#logger.debug({ err: error, connection_id: record.id }, "HBONE stream failed"));
      }
      try {
        const timeoutMs = this.#options.connectResponseTimeoutMs ?? CONNECT_RESPONSE_TIMEOUT_MS;
        return { stream, status: await responseStatus(stream, hboneAddr, timeoutMs) };
      } catch (error) {
        connection.upstream.delete(stream);
        // A stream without a response is still open on the shared connection: cancel it.
        closeStream(stream);
        if (stream.rstCode !== http2.constants.NGHTTP2_REFUSED_STREAM) throw error;
        // A connection that refused a stream takes no more, whether or not this request retries.
        if (session) this.#pool.retire(session);
        if (attempt >= MAX_TUNNEL_ATTEMPTS) throw error;
        this.#logger.debug({ connection_id: record.id, hbone_addr: hboneAddr }, "HBONE peer refused the CONNECT stream unprocessed; retrying on a fresh connection");
      }
    }
  }

  /**
   * Takes a CONNECT stream to the destination from the pool. A function of its own so that what
   * only the request needs (headers, abort controller) is garbage once the tunnel runs.
   */
  async #openStream(
    connection: ActiveConnection,
    destination: Authority,
    target: Extract<DestinationTarget, { kind: "hbone" }>,
    fresh: boolean,
  ): Promise<http2.ClientHttp2Stream> {
    const { client } = connection;
    const source = { ip: normalizeIp(client.remoteAddress ?? ""), port: client.remotePort ?? 0 };
    const serviceHost = target.service === undefined ? undefined : serviceHostname(target.service);
    const headers = buildConnectHeaders({ destination, source, workload: this.#options.workload, serviceHost });
    // Lets stop() end the wait for a pooled connection that is still handshaking.
    const waiting = new AbortController();
    const pending = { destroy: () => waiting.abort() };
    connection.upstream.add(pending);
    try {
      return await this.#pool.request(
        {
          sourceIdentity: this.#options.identity,
          sourceIp: workloadIpOfFamily(this.#options.workload, net.isIP(destination.ip) === 6 ? 6 : 4) ?? this.#options.workload.ip,
          destinationIdentities: [target.identity],
          hboneAddress: { ip: destination.ip, port: HBONE_PORT },
        },
        headers,
        waiting.signal,
        { fresh },
      );
    } finally {
      connection.upstream.delete(pending);
    }
  }

  async #connectUpstream(connection: ActiveConnection, ip: string, port: number): Promise<net.Socket> {
    try {
      const socket = await connectTcp(this.#options.network, ip, port, CONNECT_TIMEOUT_MS, (pending) => connection.upstream.add(pending));
      socket.on("error", ignoreError);
      return socket;
    } catch (error) {
      throw new AgentError(
        "UPSTREAM_CONNECT_FAILED",
        `connect to ${formatAddress(ip, port)} failed: ${(error as Error).message}`,
        { cause: error },
      );
    }
  }

  #rejectTunnel(record: ConnectionRecord, status: number): never {
    if (status === 401) {
      const error = new AgentError(
        "POLICY_DENIED",
        `${record.dst.hbone_addr} denied the connection to ${record.dst.addr} with status 401: an AuthorizationPolicy of the destination rejects ${this.#sourceIdentity}`,
      );
      record.deny("denied_at_destination", error);
      throw error;
    }
    throw new AgentError(
      "TUNNEL_REJECTED",
      `${record.dst.hbone_addr} answered the CONNECT to ${record.dst.addr} with status ${status}; check the destination agent's log for this connection`,
    );
  }

  #recordCopy(record: ConnectionRecord, result: Awaited<ReturnType<typeof copyBidirectional>>): void {
    record.bytesSent = result.bytesForward;
    record.bytesRecv = result.bytesBackward;
    if (result.error) {
      record.fail(result.error);
      const reason = closeReasonOf(result.error);
      if (reason !== undefined) this.#refusals.countClosed("outbound", reason);
    }
  }
}

/**
 * CONNECT attempts per connection: the first, and one retry when the peer refused the stream
 * unprocessed. A second refusal fails the connection, so a peer that refuses everything costs
 * two streams per connection, not a loop.
 */
const MAX_TUNNEL_ATTEMPTS = 2;

/** Returns whether a canonical IP (normalizeIp) is a loopback address: 127.0.0.0/8 or ::1. */
function isLoopbackIp(ip: string): boolean {
  return ip.startsWith("127.") || ip === "::1";
}

/**
 * Waits for the CONNECT response and returns its status. Past `timeoutMs` without one, rejects
 * with TUNNEL_TIMEOUT, and the caller cancels the stream.
 */
function responseStatus(stream: http2.ClientHttp2Stream, hboneAddr: string, timeoutMs: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(
        new AgentError(
          "TUNNEL_TIMEOUT",
          `${hboneAddr} sent no response to the CONNECT within ${timeoutMs / 1000} s; check that the destination agent is healthy and its log for this connection`,
        ),
      );
    }, timeoutMs);
    const onResponse = (headers: http2.IncomingHttpHeaders): void => {
      cleanup();
      resolve(Number(headers[":status"]));
    };
    const onClose = (): void => {
      cleanup();
      reject(
        new AgentError(
          "TLS_FAILURE",
          `the HBONE connection to ${hboneAddr} closed before the CONNECT response (RST_STREAM code ${stream.rstCode}); the server may have rejected our certificate`,
        ),
      );
    };
    const cleanup = (): void => {
      clearTimeout(timer);
      stream.off("response", onResponse);
      stream.off("close", onClose);
    };
    stream.once("response", onResponse);
    stream.once("close", onClose);
  });
}

/** Cancels a CONNECT stream that is still open, so that its pooled connection gets the slot back. */
function closeStream(stream: http2.ClientHttp2Stream): void {
  if (!stream.closed && !stream.destroyed) {
    stream.close(http2.constants.NGHTTP2_CANCEL);
  }
}
