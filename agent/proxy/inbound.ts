// The inbound HBONE server of one enrolled pod: terminates mutual TLS on port 15008, checks the
// client's SPIFFE identity, authorizes each CONNECT stream and connects it to the application.

import http2 from "node:http2";
import net from "node:net";
import type tls from "node:tls";
import type { AuditRecorder } from "../audit/record";
import { AgentError } from "../errors";
import { hboneTlsOptions } from "../identity/certificate";
import type { CertificateProvider, WorkloadCertificate } from "../identity/cert-manager";
import { formatSpiffeId } from "../identity/spiffe";
import { presentedCertificateOf, verifyClientCertificate, type AcceptedTrustDomains } from "../identity/verify";
import type { Logger } from "../log";
import type { AuthorizationResult, RbacConnection } from "../rbac/types";
import { hasWorkloadIp } from "../state/ip";
import type { Identity, Workload } from "../state/types";
import { ConnectionRecord, denialError, peerOf, type ConnectionRegistry } from "./connection-record";
import { copyBidirectional, resetSocket, streamEndpoint, tcpEndpoint } from "./copy";
import { ConnectionDrain, stopReason, type DrainSummary } from "./drain";
import { InboundGuard } from "./inbound-guard";
import { resolveLimitOptions, type ProxyLimitOptions } from "./limit-tracker";
import { closeReasonOf, type RefusalLog } from "./refusal-log";
import {
  CONNECT_TIMEOUT_MS,
  CONNECTION_WINDOW_BYTES,
  HBONE_PORT,
  MAX_SESSION_INVALID_FRAMES,
  MAX_SESSION_MEMORY_MB,
  MAX_SESSION_REJECTED_STREAMS,
  PROXY_PORTS,
  SERVER_SETTINGS,
  parseAuthority,
  parseForwardedFor,
  parseForwardedHost,
  type Authority,
} from "./hbone";
import type { PodNetwork } from "./pod-network";
import { recordPolicyChange } from "./policy-change";
import type { LivenessTiming } from "./session-liveness";
import { connectTcp, formatAddress, ignoreError, normalizeIp, remoteAddressOf } from "./tcp";
import { applicationSourceFor } from "./transparency";

export interface InboundHboneServerOptions extends ProxyLimitOptions {
  node: string;
  /** The enrolled pod this server delivers to. */
  workload: Workload;
  identity: Identity;
  network: PodNetwork;
  certs: CertificateProvider;
  /** Clients must present a certificate of this trust domain or of one of `trustDomainAliases`. */
  trustDomain: string;
  /** Other trust domains accepted from clients, such as the mesh's previous name during a migration. */
  trustDomainAliases?: readonly string[];
  /**
   * The trust bundle, which also decides which roots may vouch for which trust domain. When given, its
   * trust domain and aliases replace `trustDomain` and `trustDomainAliases`.
   */
  acceptedTrustDomains?: AcceptedTrustDomains;
  authorize(connection: RbacConnection): AuthorizationResult;
  /** The workload that owns a source address, for the audit record only. */
  lookupSource(ip: string): Workload | undefined;
  audit: AuditRecorder;
  logger: Logger;
  /** The agent's tracker of open connections, with which every connection record registers. */
  tracker?: ConnectionRegistry;
  /**
   * Returns the workload this server delivers to as the mesh state has it now, or undefined once it
   * left. Checked on every CONNECT. Without this option, `workload` counts as known for good.
   */
  currentWorkload?(): Workload | undefined;
  /**
   * Returns the uid of the Service that a connection to the pod's `port` is for, given the `host`
   * that the client's agent named in its Forwarded header (see inboundServiceOf). Without this
   * option, inbound records name no Service.
   */
  destinationService?(port: number, requestedHost: string | undefined): string | undefined;
  /** Deadline of the connect to the application, in ms. Defaults to CONNECT_TIMEOUT_MS. */
  connectTimeoutMs?: number;
  /** Streams a client may open at once on one HBONE connection, in place of the limits' maxStreamsPerConnection. */
  maxConcurrentStreams?: number;
  /** The liveness check of HBONE connections with open streams, or DEFAULT_LIVENESS when absent. */
  liveness?: Readonly<LivenessTiming>;
}

/** The client facts that one HBONE connection (TLS session) proved. */
interface TunnelPeer {
  identity: Identity;
  /** The tunnel's remote address. */
  ip: string;
  port: number;
  /** The address the tunnel arrived on; every CONNECT on it must name this IP. */
  localIp: string;
  /** The reason the tunnel takes no new stream (its certificate expired, or the trusted roots changed); undefined while it does. */
  retired?: string;
}

/** One CONNECT stream being served, so that stop() can wait for it or abort it. */
interface ActiveStream {
  stream: http2.ServerHttp2Stream;
  session: http2.ServerHttp2Session;
  /** Settles once the stream's record is written. */
  done: Promise<void>;
  /** The facts the stream passed authorization with, so recheck() can evaluate them again; unset until then. */
  authorized?: RbacConnection;
  /** The connection to the application, once it is open. */
  upstream?: net.Socket;
}

export class InboundHboneServer {
  readonly #options: InboundHboneServerOptions;
  readonly #logger: Logger;
  readonly #acceptedTrustDomains: AcceptedTrustDomains;
  readonly #refusals: RefusalLog;
  readonly #guard: InboundGuard;
  readonly #peers = new WeakMap<http2.ServerHttp2Session, TunnelPeer>();
  readonly #sessions = new Set<http2.ServerHttp2Session>();
  readonly #streams = new Set<ActiveStream>();
  /** The audit record of each stream being served, so that a drain's abort can record why it ended. */
  readonly #records = new WeakMap<http2.ServerHttp2Stream, ConnectionRecord>();
  readonly #drain = new ConnectionDrain<ActiveStream>(() => this.#streams, (active) => this.#abortStream(active));
  /** Connects to the application not yet finished, so that stop() can abort them. */
  readonly #pendingConnects = new Set<net.Socket>();
  #server: http2.Http2SecureServer | undefined;
  #certificate: WorkloadCertificate | undefined;
  #stopFollowing: (() => void) | undefined;
  /** Counts changes of the trusted roots, so a handshake that began before the latest one is known. */
  #rootsGeneration = 0;
  /** The roots generation at which each TCP connection was accepted. */
  readonly #acceptedAt = new WeakMap<net.Socket, number>();
  /** The outcome of the first stop() call; later calls can only shorten its deadline. */
  #stopped: Promise<DrainSummary> | undefined;
  #stopReason: AgentError | undefined;

  constructor(options: InboundHboneServerOptions) {
    this.#options = options;
    this.#logger = options.logger.child({ component: "inbound" });
    this.#acceptedTrustDomains = options.acceptedTrustDomains ?? { trustDomain: options.trustDomain, aliases: options.trustDomainAliases ?? [] };
    const { tracker, refusals } = resolveLimitOptions(options, options.node, this.#logger);
    this.#refusals = refusals;
    const limits = { ...tracker.limits, maxStreamsPerConnection: options.maxConcurrentStreams ?? tracker.limits.maxStreamsPerConnection };
    this.#guard = new InboundGuard({
      podUid: options.workload.uid,
      destination: (localIp) => {
        const hboneAddr = formatAddress(localIp || options.workload.ip, HBONE_PORT);
        return { ...peerOf(hboneAddr, options.workload, formatSpiffeId(options.identity)), hbone_addr: hboneAddr };
      },
      limits,
      tracker,
      refusals,
      logger: this.#logger,
      liveness: options.liveness,
    });
  }

  /** Gets the pod's certificate and listens on port 15008 inside the pod. */
  async start(): Promise<void> {
    const certificate = await this.#options.certs.get(this.#options.identity);
    const limits = this.#guard.limits;
    const server = http2.createSecureServer({
      ...hboneTlsOptions(certificate),
      // The server requests a certificate but lets the handshake finish whatever the client sent, and
      // #acceptSession verifies it before any stream is served. With rejectUnauthorized: true, Node 20
      // destroys such a socket itself and reports only "socket hang up" (ECONNRESET), so the audit
      // record could not say why; Node's own chain verdict stays in socket.authorizationError.
      requestCert: true,
      rejectUnauthorized: false,
      ALPNProtocols: ["h2"],
      allowHTTP1: false,
      // Node's net.Server option, applied to each accepted TCP socket under the TLS session.
      noDelay: true,
      // Node's default of 120 s would let a stalled handshake hold stop() open that long. The guard's
      // own deadline, from the accept to the first CONNECT, covers the rest of the handshake.
      handshakeTimeout: limits.handshakeTimeoutMs,
      settings: { ...SERVER_SETTINGS, maxConcurrentStreams: limits.maxStreamsPerConnection, maxHeaderListSize: limits.maxHeaderListBytes },
      maxSessionMemory: MAX_SESSION_MEMORY_MB,
      maxSessionInvalidFrames: MAX_SESSION_INVALID_FRAMES,
      maxSessionRejectedStreams: MAX_SESSION_REJECTED_STREAMS,
    });
    server.on("session", (session) => this.#acceptSession(session));
    server.on("stream", (stream, headers) => this.#trackStream(stream, headers));
    // Node reports a failed handshake after the socket closed, when its addresses are gone. Reading
    // them on accept makes the TCP socket cache them for the audit record of the failure.
    server.on("connection", (socket: net.Socket) => {
      void [socket.remoteAddress, socket.localAddress];
      if (!this.#guard.acceptConnection(socket)) return;
      this.#acceptedAt.set(socket, this.#rootsGeneration);
    });
    server.on("tlsClientError", (error: NodeJS.ErrnoException, socket: tls.TLSSocket) => this.#guard.recordTlsFailure(error, parentOf(socket), handshakePeerOf(socket)));
    server.on("error", (error) => this.#logger.error({ err: error }, "HBONE listener failed"));
    await this.#options.network.listen(server as unknown as net.Server, HBONE_PORT);
    this.#server = server;
    this.#certificate = certificate;
    this.#followRotations();
    this.#logger.info({ port: HBONE_PORT }, "inbound HBONE server started");
  }

  /** Counts the CONNECT streams open now, for the drain log. */
  get openConnections(): number {
    return this.#streams.size;
  }

  /**
   * Authorizes every open stream again, with the facts it passed authorization with, and resets
   * the ones now denied (RST_STREAM to the client, TCP RST to the application). Their records get
   * reason policy_change. Streams not yet authorized are skipped, because they are authorized with
   * the current configuration anyway. Returns how many streams it closed.
   */
  recheck(): number {
    let closed = 0;
    for (const active of this.#streams) {
      const record = this.#records.get(active.stream);
      if (active.authorized === undefined || record === undefined || active.stream.destroyed) continue;
      const result = this.#options.authorize(active.authorized);
      if (result.decision !== "deny") continue;
      const error = recordPolicyChange(record, active.authorized, result);
      this.#logger.info({ connection_id: record.id, policy: result.policy, reason: result.reason }, "closing a stream that the new configuration denies");
      this.#resetForPolicyChange(active, error);
      closed += 1;
    }
    return closed;
  }

  #resetForPolicyChange(active: ActiveStream, error: AgentError): void {
    // An error makes Node send RST_STREAM INTERNAL_ERROR, which the client's proxy turns into a TCP reset.
    active.stream.destroy(error);
    if (active.upstream) resetSocket(active.upstream);
  }

  /**
   * Closes the listener at once and sends GOAWAY on every HBONE connection, so clients open no new
   * stream here. Open streams keep flowing for up to `graceMs`. Then the rest are reset and every
   * connection is closed. Resolves once each stream has written its record. A second call may
   * shorten the deadline (0 aborts at once) and resolves with the same summary.
   */
  stop(graceMs = 0): Promise<DrainSummary> {
    if (this.#stopped) {
      void this.#drain.drain(graceMs);
      return this.#stopped;
    }
    this.#stopReason = stopReason(`the inbound HBONE server of ${this.#options.workload.uid}`, graceMs);
    this.#stopped = this.#closeAndDrain(graceMs);
    return this.#stopped;
  }

  async #closeAndDrain(graceMs: number): Promise<DrainSummary> {
    this.#stopFollowing?.();
    const server = this.#server;
    this.#server = undefined;
    const closed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    for (const session of this.#sessions) {
      session.close();
    }
    const summary = await this.#drain.drain(graceMs);
    for (const session of this.#sessions) {
      session.destroy();
    }
    await closed;
    this.#logger.info(summary, "inbound HBONE server stopped");
    return summary;
  }

  /** Resets one stream at the drain deadline, and the client's outbound proxy then resets its application connection. */
  #abortStream(active: ActiveStream): void {
    this.#records.get(active.stream)?.fail(this.#stopReason);
    // An error makes Node send RST_STREAM INTERNAL_ERROR. Without one it sends NO_ERROR, which reads as end of stream.
    if (!active.stream.destroyed) active.stream.destroy(this.#stopReason);
    // Every stream is aborted together, so every connect still pending to the application can go too.
    for (const socket of this.#pendingConnects) {
      socket.destroy();
    }
  }

  /**
   * Verifies the client's certificate and remembers what the session proved. A session that fails is
   * destroyed here, synchronously in Node's "session" event and so before any of its frames is read,
   * and its rejection gets an audit record. Streams of a session not in #peers are refused as well.
   */
  #acceptSession(session: http2.ServerHttp2Session): void {
    const socket = session.socket as tls.TLSSocket;
    const remote = remoteAddressOf(socket);
    const verification = verifyClientCertificate(presentedCertificateOf(socket), this.#acceptedTrustDomains, remote);
    if (!verification.verified) {
      session.on("error", (error) => this.#logger.debug({ err: error, "src.addr": remote }, "HBONE session failed"));
      // The record reads the addresses through session.socket, which is unbound once the session is destroyed.
      this.#recordRejection(socket, verification.reason, verification.error);
      this.#guard.countRejectedCertificate();
      session.destroy();
      return;
    }
    this.#guard.watchSession(session, parentOf(socket));
    const identity = verification.identity;
    this.#peers.set(session, {
      identity,
      ip: normalizeIp(socket.remoteAddress ?? ""),
      port: socket.remotePort ?? 0,
      localIp: normalizeIp(socket.localAddress ?? ""),
    });
    this.#sessions.add(session);
    const expiry = this.#retireAtExpiry(session, socket);
    // Its handshake ran with the roots of before a change: new streams need a new handshake.
    const parent = parentOf(socket);
    if (parent && (this.#acceptedAt.get(parent) ?? this.#rootsGeneration) < this.#rootsGeneration) {
      this.#retireSession(session, "the trusted roots changed during its handshake");
    }
    session.once("close", () => {
      clearTimeout(expiry);
      this.#sessions.delete(session);
    });
    session.setLocalWindowSize(CONNECTION_WINDOW_BYTES);
    // A handshake that completed after stop() began gets GOAWAY at once: no stream is served on it.
    if (this.#stopped) session.close();
  }

  /**
   * Retires the tunnel when the client's certificate expires, so that new streams need a new
   * connection with the client's new certificate. Node's timers cannot wait longer than about 24.8
   * days, which is more than any workload certificate lives.
   */
  #retireAtExpiry(session: http2.ServerHttp2Session, socket: tls.TLSSocket): NodeJS.Timeout | undefined {
    const notAfter = socket.getPeerX509Certificate()?.validTo;
    if (notAfter === undefined) return undefined;
    const delay = Math.min(Math.max(Date.parse(notAfter) - Date.now(), 0), 2 ** 31 - 1);
    const timer = setTimeout(() => this.#retireSession(session, `the client certificate expired at ${notAfter}`), delay);
    timer.unref();
    return timer;
  }

  /**
   * Refuses new streams on a tunnel (REFUSED_STREAM, which the client retries on a new connection)
   * while its open streams finish, and closes it after the last one. GOAWAY waits until then, because
   * the client stops its PINGs, and with them its check that this side is alive, once it gets one.
   */
  #retireSession(session: http2.ServerHttp2Session, why: string): void {
    const peer = this.#peers.get(session);
    if (!peer || peer.retired !== undefined) return;
    peer.retired = why;
    this.#logger.info({ "src.addr": formatAddress(peer.ip, peer.port), reason: why }, "HBONE connection retired: open streams finish, new ones are refused");
    this.#closeIfRetiredAndIdle(session);
  }

  #closeIfRetiredAndIdle(session: http2.ServerHttp2Session): void {
    if (this.#peers.get(session)?.retired === undefined || session.closed || session.destroyed) return;
    for (const active of this.#streams) {
      if (active.session === session) return;
    }
    session.close();
  }

  /**
   * Writes the audit record of a rejected HBONE connection: decision deny, the rejection reason, and
   * the pod's HBONE address as the destination, because no CONNECT named a target yet.
   */
  #recordRejection(socket: tls.TLSSocket, reason: string, error: AgentError): void {
    const source = handshakePeerOf(socket);
    const sourceIp = socket.remoteAddress ?? parentOf(socket)?.remoteAddress;
    const hboneAddr = formatAddress(normalizeIp(socket.localAddress ?? parentOf(socket)?.localAddress ?? this.#options.workload.ip), HBONE_PORT);
    const record = new ConnectionRecord({
      node: this.#options.node,
      direction: "inbound",
      transport: "hbone",
      src: peerOf(source, sourceIp ? this.#options.lookupSource(normalizeIp(sourceIp)) : undefined),
      dst: { ...peerOf(hboneAddr, this.#options.workload, formatSpiffeId(this.#options.identity)), hbone_addr: hboneAddr },
      tracker: this.#options.tracker,
      workload: this.#options.workload.uid,
    });
    record.deny(reason, error);
    record.write(this.#options.audit, this.#logger);
  }

  #trackStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders): void {
    // Read now: Node clears a stream's session once the stream is destroyed.
    const session = stream.session as http2.ServerHttp2Session;
    const active: ActiveStream = { stream, session, done: Promise.resolve() };
    this.#streams.add(active);
    active.done = this.#handleStream(stream, headers, active).finally(() => {
      this.#streams.delete(active);
      this.#closeIfRetiredAndIdle(session);
    });
    if (this.#drain.expired) this.#drain.abort(active);
  }

  async #handleStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, active: ActiveStream): Promise<void> {
    stream.on("error", ignoreError);
    const peer = this.#peers.get(stream.session as http2.ServerHttp2Session);
    if (!peer || peer.retired !== undefined) {
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    // A stream refused by a limit gets a connection.refused record and no connection record.
    const release = this.#guard.admitStream(stream, headers, formatSpiffeId(peer.identity));
    if (!release) return;
    const record = this.#newRecord(peer, headers);
    this.#records.set(stream, record);
    let upstream: net.Socket | undefined;
    try {
      const target = this.#validateRequest(peer, headers, record);
      this.#checkDestinationKnown(target, record);
      this.#route(target, headers, record);
      active.authorized = this.#authorize(peer, target, record);
      upstream = await this.#connectApplication(peer, target, stream);
      active.upstream = upstream;
      stream.respond({ ":status": 200 });
      record.opened(this.#options.audit);
      const limits = { idleTimeoutMs: this.#guard.limits.idleTimeoutMs, buffered: this.#guard.buffered };
      const result = await copyBidirectional(streamEndpoint("tunnel", stream), tcpEndpoint("application", upstream), record.counters, limits);
      record.bytesSent = result.bytesForward;
      record.bytesRecv = result.bytesBackward;
      if (result.error) {
        record.fail(result.error);
        const reason = closeReasonOf(result.error);
        if (reason !== undefined) this.#refusals.countClosed("inbound", reason);
      }
    } catch (error) {
      record.fail(error);
      upstream?.destroy();
      answerFailure(stream, error);
    } finally {
      release();
      record.write(this.#options.audit, this.#logger, requestContext(headers));
    }
  }

  #newRecord(peer: TunnelPeer, headers: http2.IncomingHttpHeaders): ConnectionRecord {
    // The forwarded header carries the client application's own port; its IP must be the tunnel's.
    const forwarded = parseForwardedFor(headers["forwarded"]);
    const source = forwarded && normalizeIp(forwarded.ip) === peer.ip ? forwarded : { ip: peer.ip, port: peer.port };
    return new ConnectionRecord({
      node: this.#options.node,
      direction: "inbound",
      transport: "hbone",
      src: peerOf(formatAddress(source.ip, source.port), this.#options.lookupSource(peer.ip), formatSpiffeId(peer.identity)),
      dst: {
        ...peerOf(String(headers[":authority"] ?? "unknown"), this.#options.workload, formatSpiffeId(this.#options.identity)),
        hbone_addr: formatAddress(peer.localIp, HBONE_PORT),
      },
      tracker: this.#options.tracker,
      workload: this.#options.workload.uid,
    });
  }

  /** Checks the method, the authority, that it names the address the tunnel arrived on, and the port. */
  #validateRequest(peer: TunnelPeer, headers: http2.IncomingHttpHeaders, record: ConnectionRecord): Authority {
    try {
      if (headers[":method"] !== "CONNECT") {
        throw new AgentError("BAD_REQUEST", `HBONE request method ${String(headers[":method"])} is not CONNECT`);
      }
      const target = parseAuthority(headers[":authority"]);
      record.dst.addr = formatAddress(target.ip, target.port);
      if (normalizeIp(target.ip) !== peer.localIp) {
        throw new AgentError(
          "AUTHORITY_MISMATCH",
          `CONNECT authority ${record.dst.addr} names another address than ${peer.localIp}, where the tunnel arrived`,
        );
      }
      if (PROXY_PORTS.has(target.port)) {
        throw new AgentError("PROXY_PORT", `CONNECT authority ${record.dst.addr} names a proxy port; tunnels may not target 15001, 15006 or 15008`);
      }
      return target;
    } catch (error) {
      const code = error instanceof AgentError ? error.code.toLowerCase() : "bad_request";
      record.deny(code, error as AgentError);
      // Both codes mean the client aimed the tunnel at something other than the pod's own ports:
      // the agent, the node or loopback.
      if (code === "proxy_port" || code === "authority_mismatch") this.#refusals.countClosed("inbound", "proxy_port_target");
      throw error;
    }
  }

  /** Rejects a CONNECT to a workload that the mesh state no longer has at the requested address. */
  #checkDestinationKnown(target: Authority, record: ConnectionRecord): void {
    const current = this.#options.currentWorkload ? this.#options.currentWorkload() : this.#options.workload;
    if (current && hasWorkloadIp(current, target.ip)) {
      return;
    }
    const error = new AgentError(
      "UNKNOWN_DESTINATION",
      `no workload is known at ${record.dst.addr}: ${this.#options.workload.uid} left the mesh state or changed its address`,
    );
    record.deny("unknown_destination", error);
    throw error;
  }

  /** Marks the validated request routed and names the Service it is for. */
  #route(target: Authority, headers: http2.IncomingHttpHeaders, record: ConnectionRecord): void {
    record.routed = true;
    const service = this.#options.destinationService?.(target.port, parseForwardedHost(headers["forwarded"]));
    if (service !== undefined) record.dst.service = service;
  }

  /** Authorizes the stream and returns the facts it was allowed with; throws the denial otherwise. */
  #authorize(peer: TunnelPeer, target: Authority, record: ConnectionRecord): RbacConnection {
    const connection: RbacConnection = {
      sourceIdentity: peer.identity,
      sourceIp: peer.ip,
      destinationIp: target.ip,
      destinationPort: target.port,
    };
    const result = this.#options.authorize(connection);
    record.authorized(result);
    if (result.decision === "deny") {
      const error = denialError(result, formatSpiffeId(peer.identity), record.dst.addr);
      record.fail(error);
      throw error;
    }
    return connection;
  }

  /**
   * Connects to the application, from the tunnel's source address (the client pod's IP) where the
   * pod network can keep it. A client reset of the stream meanwhile aborts the connect.
   */
  async #connectApplication(peer: TunnelPeer, target: Authority, stream: http2.ServerHttp2Stream): Promise<net.Socket> {
    const address = formatAddress(target.ip, target.port);
    const source = applicationSourceFor(this.#options.network, peer, target.ip, this.#logger, false);
    let pending: net.Socket | undefined;
    const abortConnect = (): void => {
      pending?.destroy();
    };
    stream.once("close", abortConnect);
    try {
      // A stream reset in the same read as its headers is closed already, and its 'close' has passed.
      if (stream.closed || stream.destroyed) throw resetDuringConnect(address);
      const timeoutMs = this.#options.connectTimeoutMs ?? CONNECT_TIMEOUT_MS;
      const socket = await connectTcp(this.#options.network, target.ip, target.port, timeoutMs, (created) => {
        pending = created;
        this.#pendingConnects.add(created);
      }, source);
      socket.on("error", ignoreError);
      if (stream.closed || stream.destroyed) {
        socket.destroy();
        throw resetDuringConnect(address);
      }
      return socket;
    } catch (error) {
      if (error instanceof AgentError) {
        throw error;
      }
      if (stream.closed || stream.destroyed) {
        throw resetDuringConnect(address, error);
      }
      throw new AgentError("UPSTREAM_CONNECT_FAILED", `connect to the application at ${address} failed: ${(error as Error).message}`, {
        cause: error,
      });
    } finally {
      stream.off("close", abortConnect);
      if (pending) this.#pendingConnects.delete(pending);
    }
  }

  /**
   * Installs each new certificate of the pod's identity for new TLS connections: one secure context
   * per rotation. Connections already open keep the certificate they started with.
   */
  #followRotations(): void {
    this.#stopFollowing = this.#options.certs.onRotation?.(this.#options.identity, (certificate) => {
      if (!this.#server || certificate === this.#certificate) return;
      const rootsOnly = certificate.certPem === this.#certificate?.certPem;
      this.#server.setSecureContext(hboneTlsOptions(certificate));
      this.#certificate = certificate;
      if (!rootsOnly) {
        this.#logger.info({ notAfter: certificate.notAfter.toISOString() }, "inbound HBONE certificate rotated");
        return;
      }
      // The trusted roots changed: every client is verified again against them on a new connection.
      this.#rootsGeneration += 1;
      for (const session of this.#sessions) this.#retireSession(session, "the trusted roots changed");
    });
  }
}

function resetDuringConnect(address: string, cause?: unknown): AgentError {
  return new AgentError("STREAM_RESET", `the client reset the CONNECT stream to ${address} before the connect to the application finished`, {
    cause,
  });
}

/** Responds to a failed CONNECT with the error's HBONE status, or resets the stream when the response was already sent. */
function answerFailure(stream: http2.ServerHttp2Stream, error: unknown): void {
  if (stream.destroyed || stream.closed) {
    return;
  }
  if (stream.headersSent) {
    // destroy() resets the stream at once; see the reset of streamEndpoint in copy.ts for why not close(code).
    stream.destroy(error instanceof Error ? error : new Error(String(error)));
    return;
  }
  const status = error instanceof AgentError ? (error.status ?? 503) : 503;
  stream.respond({ ":status": status }, { endStream: true });
}

/** Maximum length of a header value copied into a log line, because clients choose these values. */
const MAX_LOGGED_HEADER_CHARS = 256;

/** Returns the request headers that the connection's log line carries. */
function requestContext(headers: http2.IncomingHttpHeaders): Record<string, unknown> {
  return {
    forwarded: loggedHeader(headers["forwarded"]),
    traceparent: loggedHeader(headers["traceparent"]),
    baggage: loggedHeader(headers["baggage"]),
  };
}

/** Returns a request header for a log line, cut to MAX_LOGGED_HEADER_CHARS. */
function loggedHeader(value: string | string[] | undefined): string | undefined {
  if (value === undefined) return undefined;
  const text = Array.isArray(value) ? value.join(", ") : value;
  return text.length > MAX_LOGGED_HEADER_CHARS ? `${text.slice(0, MAX_LOGGED_HEADER_CHARS)}...(${text.length} chars)` : text;
}

/**
 * Returns the client address of a failed TLS handshake, or "unknown". The TLS socket has lost its
 * peer by then, but the TCP socket under it (Node's undocumented `_parent`) cached it on accept.
 */
function handshakePeerOf(socket: tls.TLSSocket): string {
  const own = remoteAddressOf(socket);
  if (own !== "unknown") return own;
  const parent = parentOf(socket);
  return parent ? remoteAddressOf(parent) : "unknown";
}

/** Returns the TCP socket under a TLS socket (Node's undocumented `_parent`), when Node kept it. */
function parentOf(socket: tls.TLSSocket): net.Socket | undefined {
  const parent = (socket as tls.TLSSocket & { _parent?: unknown })._parent;
  return parent instanceof net.Socket ? parent : undefined;
}
