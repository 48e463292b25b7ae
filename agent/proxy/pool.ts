// The HBONE connection pool of one pod's outbound proxy: mutual TLS 1.3 + HTTP/2 connections to the
// HBONE ports of other pods, each carrying many CONNECT streams.
//
// Invariants:
// - A connection serves one key (poolKeyOf): source identity, expected destination identities,
//   destination HBONE address and source IP.
// - A connection carries at most min(maxStreamsPerConnection, the peer's SETTINGS_MAX_CONCURRENT_STREAMS)
//   streams. Requests waiting for its handshake count as streams, so concurrent requests share a
//   connection that is still handshaking instead of each opening their own.
// - A connection that failed, received GOAWAY, missed a PING acknowledgement, went idle or closed leaves
//   the pool at once and never takes a new stream. After a GOAWAY its open streams run until they end.
// - A new connection presents the source's current certificate. A rotation of that certificate, or of
//   the trusted roots, retires the connections made before it: they take no new stream, their open
//   streams finish with the old certificate and PINGs, and they close after the last one. A
//   connection also retires when its own certificate or the peer's expires.

import type http2 from "node:http2";
import type net from "node:net";
import type tls from "node:tls";
import { AgentError } from "../errors";
import type { CertificateProvider, WorkloadCertificate } from "../identity/cert-manager";
import { formatSpiffeId } from "../identity/spiffe";
import type { AcceptedTrustDomains } from "../identity/verify";
import type { Logger } from "../log";
import type { Identity } from "../state/types";
import { CONNECT_TIMEOUT_MS, type Authority } from "./hbone";
import { connectHbone } from "./hbone-client";
import type { PodNetwork } from "./pod-network";
import { formatAddress, ignoreError } from "./tcp";

/** Streams one connection carries at most, even when the peer allows more (ztunnel uses 100). */
export const MAX_STREAMS_PER_CONNECTION = 100;
/** A connection without streams for this long is closed. */
export const IDLE_TIMEOUT_MS = 5 * 60_000;
/** Each connection sends a PING this often. */
export const PING_INTERVAL_MS = 10_000;
/** A connection whose PING is not acknowledged within this time is destroyed with its streams. */
export const PING_TIMEOUT_MS = 20_000;
/** close() destroys connections whose streams have not ended after this grace period. */
export const CLOSE_GRACE_MS = 1_000;

/**
 * Connections one request tries before it fails. A request moves on only when the connection it waited
 * for turned out full, because the peer allows fewer streams than were waiting, or went away right after
 * its handshake. A few attempts are enough unless the peer sends GOAWAY after every handshake.
 */
const MAX_ATTEMPTS = 8;

export interface HbonePoolOptions {
  /** The source pod's network: every connection is made from inside it. */
  network: PodNetwork;
  certs: CertificateProvider;
  logger: Logger;
  /** Default MAX_STREAMS_PER_CONNECTION. */
  maxStreamsPerConnection?: number;
  /** Default IDLE_TIMEOUT_MS. */
  idleTimeoutMs?: number;
  /** Default PING_INTERVAL_MS. */
  pingIntervalMs?: number;
  /** Default PING_TIMEOUT_MS. */
  pingTimeoutMs?: number;
  /** Limit for each of the TCP connect, the TLS handshake and the peer's first SETTINGS. Default CONNECT_TIMEOUT_MS. */
  connectTimeoutMs?: number;
  /** Default CLOSE_GRACE_MS. */
  closeGraceMs?: number;
  /** Trust domains that count as one when the destination's identity is checked; exact match when absent. */
  acceptedTrustDomains?: AcceptedTrustDomains;
}

/** The source and destination of a stream. Every field is part of the pool key. */
export interface HboneDestination {
  sourceIdentity: Identity;
  /** The source pod's IP: connections leave from it. */
  sourceIp: string;
  /** The identities the destination's certificate may carry. It must carry one of them. */
  destinationIdentities: readonly Identity[];
  /** The destination pod's HBONE address, podIP:15008. */
  hboneAddress: Authority;
}

/** Connections and streams of one pool key. */
export interface PoolKeyStats {
  key: string;
  connections: number;
  /** Open streams on the key's pooled connections. */
  streams: number;
  /** Requests waiting for a handshake on the key's connections. */
  waiting: number;
}

export interface PoolStats {
  keys: PoolKeyStats[];
  /** Connections out of the pool (GOAWAY, close) whose streams have not ended yet. */
  draining: number;
}

type ConnectionState = "connecting" | "ready" | "draining" | "closed";

interface PooledConnection {
  readonly id: number;
  readonly key: string;
  readonly hboneAddr: string;
  readonly logger: Logger;
  state: ConnectionState;
  /** Settles once the connection can take streams, or with the error that ended its setup. */
  ready: Promise<void>;
  /** The TCP and TLS sockets under the session, so that a connection can be destroyed during its setup. */
  sockets: net.Socket[];
  session?: http2.ClientHttp2Session;
  /** Requests that reserved a stream here and wait for the handshake. */
  waiting: number;
  /** Streams opened and not closed yet. */
  streams: number;
  /** min(maxStreamsPerConnection, the peer's SETTINGS_MAX_CONCURRENT_STREAMS), undefined until the peer's SETTINGS arrive. */
  limit?: number;
  idleTimer?: NodeJS.Timeout;
  /** Retires the connection when the first of the two certificates expires. */
  expiryTimer?: NodeJS.Timeout;
  /** The source's certificate this connection presented; a rotation retires it. */
  certificate?: WorkloadCertificate;
  /** formatSpiffeId of the source identity. */
  source: string;
  /** Why the connection must leave the pool once its handshake completes: a rotation during the handshake. */
  retireWhenReady?: string;
  /** Out of the pool by #retire: it closes after its last stream. */
  retired?: boolean;
  pingTimer?: NodeJS.Timeout;
  pingDeadline?: NodeJS.Timeout;
}

interface KeyGroup {
  connections: Set<PooledConnection>;
  /** The stream limit a connection of this key last learned from its peer; handshaking connections assume it. */
  learnedLimit?: number;
}

/** Builds the pool key of a destination: source identity, sorted destination identities, HBONE address, source IP. */
export function poolKeyOf(destination: HboneDestination): string {
  const identities = destination.destinationIdentities.map(formatSpiffeId).sort().join(",");
  const address = formatAddress(destination.hboneAddress.ip, destination.hboneAddress.port);
  return `${formatSpiffeId(destination.sourceIdentity)} ${identities} ${address} ${destination.sourceIp}`;
}

export class HbonePool {
  readonly #network: PodNetwork;
  readonly #certs: CertificateProvider;
  readonly #acceptedTrustDomains: AcceptedTrustDomains | undefined;
  readonly #logger: Logger;
  readonly #maxStreams: number;
  readonly #idleTimeoutMs: number;
  readonly #pingIntervalMs: number;
  readonly #pingTimeoutMs: number;
  readonly #connectTimeoutMs: number;
  readonly #closeGraceMs: number;
  /** Connections that take new streams, by key. */
  readonly #groups = new Map<string, KeyGroup>();
  /** Every connection not closed yet, in the pool or draining. */
  readonly #connections = new Set<PooledConnection>();
  /** Unsubscribe functions of the rotation listeners, per source identity. */
  readonly #rotationSubscriptions = new Map<string, () => void>();
  #nextId = 1;
  #closed = false;

  constructor(options: HbonePoolOptions) {
    this.#network = options.network;
    this.#certs = options.certs;
    this.#acceptedTrustDomains = options.acceptedTrustDomains;
    this.#logger = options.logger.child({ component: "hbone-pool" });
    this.#maxStreams = options.maxStreamsPerConnection ?? MAX_STREAMS_PER_CONNECTION;
    this.#idleTimeoutMs = options.idleTimeoutMs ?? IDLE_TIMEOUT_MS;
    this.#pingIntervalMs = options.pingIntervalMs ?? PING_INTERVAL_MS;
    this.#pingTimeoutMs = options.pingTimeoutMs ?? PING_TIMEOUT_MS;
    this.#connectTimeoutMs = options.connectTimeoutMs ?? CONNECT_TIMEOUT_MS;
    this.#closeGraceMs = options.closeGraceMs ?? CLOSE_GRACE_MS;
  }

  /**
   * Opens a CONNECT stream to the destination on a pooled connection with room, opening a connection
   * when none has room. Rejects with the error that ended the connection's setup: UPSTREAM_CONNECT_FAILED,
   * TLS_FAILURE, IDENTITY_ERROR or NO_CERTIFICATE. The caller closes the stream. Aborting `signal`
   * makes this request stop waiting with STREAM_RESET, while the connection's handshake goes on for others.
   * `fresh` opens a new connection for the first attempt instead of taking a pooled one, for a retry
   * after the peer refused a stream: its other pooled connections may refuse too.
   */
  async request(
    destination: HboneDestination,
    headers: http2.OutgoingHttpHeaders,
    signal?: AbortSignal,
    options: { fresh?: boolean } = {},
  ): Promise<http2.ClientHttp2Stream> {
    const key = poolKeyOf(destination);
    for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt += 1) {
      this.#assertOpen(destination);
      const connection = this.#reserve(key, destination, options.fresh === true && attempt === 1);
      try {
        await untilReady(connection, signal);
      } finally {
        connection.waiting -= 1;
      }
      const stream = this.#openStream(connection, headers);
      if (stream) {
        return stream;
      }
      this.#scheduleIdleClose(connection);
      this.#closeIfRetiredAndIdle(connection);
    }
    throw new AgentError(
      "UPSTREAM_CONNECT_FAILED",
      `no HBONE connection to ${formatAddress(destination.hboneAddress.ip, destination.hboneAddress.port)} had room for a stream after ${MAX_ATTEMPTS} connections; check whether the destination's agent sends GOAWAY right after each handshake`,
    );
  }

  /**
   * Takes the connection of `session` out of the pool, so that the next request opens a fresh
   * connection. Its open streams run until they end. Does nothing when the connection already
   * left the pool, as after a GOAWAY.
   */
  retire(session: http2.Http2Session): void {
    const connection = [...this.#connections].find((candidate) => candidate.session === session);
    if (connection) this.#retire(connection, "it refused a stream");
  }

  /**
   * Takes a ready connection out of the pool: it takes no new stream, its open streams run until they
   * end, and it closes after the last one. No GOAWAY is sent until then, because Node cancels PINGs
   * after one, and the PINGs keep telling whether the peer of those streams is alive. A connection
   * still in its handshake is retired as soon as it is ready.
   */
  #retire(connection: PooledConnection, why: string): void {
    if (connection.state === "connecting") {
      connection.retireWhenReady = why;
      return;
    }
    if (connection.state !== "ready") {
      return;
    }
    connection.logger.debug({ streams: connection.streams }, `HBONE connection retired: ${why}`);
    this.#leavePool(connection);
    connection.state = "draining";
    connection.retired = true;
    this.#closeIfRetiredAndIdle(connection);
  }

  /** Closes a retired connection once no stream is open or waiting on it. */
  #closeIfRetiredAndIdle(connection: PooledConnection): void {
    if (!connection.retired || connection.state !== "draining" || connection.streams > 0 || connection.waiting > 0) return;
    connection.retired = false;
    this.#closeGracefully(connection).catch(() => undefined);
  }

  /**
   * Stops the PINGs of a connection that this side closes with GOAWAY. Node cancels every PING once
   * close() has run, so an unanswered PING no longer means that the peer is gone.
   */
  #stopPings(connection: PooledConnection): void {
    clearInterval(connection.pingTimer);
    clearTimeout(connection.pingDeadline);
    connection.pingTimer = undefined;
    connection.pingDeadline = undefined;
  }

  /** Counts pooled connections and their streams per key. */
  stats(): PoolStats {
    const keys: PoolKeyStats[] = [];
    for (const [key, group] of this.#groups) {
      let streams = 0;
      let waiting = 0;
      for (const connection of group.connections) {
        streams += connection.streams;
        waiting += connection.waiting;
      }
      keys.push({ key, connections: group.connections.size, streams, waiting });
    }
    const draining = [...this.#connections].filter((connection) => connection.state === "draining").length;
    return { keys, draining };
  }

  /**
   * Sends GOAWAY on every connection and resolves once all have closed. Connections whose streams have
   * not ended after the grace period are destroyed. Requests after close() fail.
   */
  async close(): Promise<void> {
    this.#closed = true;
    this.#stopFollowingRotations();
    const closing = [...this.#connections].map((connection) => this.#closeGracefully(connection));
    await Promise.all(closing);
  }

  /** Destroys every connection and its streams now. Requests after destroy() fail. */
  destroy(): void {
    this.#closed = true;
    this.#stopFollowingRotations();
    for (const connection of this.#connections) {
      this.#discard(connection, new AgentError("STREAM_RESET", `the HBONE pool closed the connection to ${connection.hboneAddr}`));
    }
  }

  #assertOpen(destination: HboneDestination): void {
    if (this.#closed) {
      const address = formatAddress(destination.hboneAddress.ip, destination.hboneAddress.port);
      throw new AgentError("STREAM_RESET", `the HBONE pool is closed, so no tunnel to ${address} was opened; the outbound proxy is stopping`);
    }
  }

  /** Reserves a stream on a connection of the key with room, opening a new connection when none has. */
  #reserve(key: string, destination: HboneDestination, fresh = false): PooledConnection {
    let group = this.#groups.get(key);
    if (!group) {
      group = { connections: new Set() };
      this.#groups.set(key, group);
    }
    const connection = (fresh ? undefined : this.#pick(group)) ?? this.#open(key, group, destination);
    connection.waiting += 1;
    clearTimeout(connection.idleTimer);
    connection.idleTimer = undefined;
    return connection;
  }

  #pick(group: KeyGroup): PooledConnection | undefined {
    for (const connection of group.connections) {
      const capacity = connection.limit ?? group.learnedLimit ?? this.#maxStreams;
      if (connection.waiting + connection.streams < capacity) {
        return connection;
      }
    }
    return undefined;
  }

  #open(key: string, group: KeyGroup, destination: HboneDestination): PooledConnection {
    const id = this.#nextId;
    this.#nextId += 1;
    const hboneAddr = formatAddress(destination.hboneAddress.ip, destination.hboneAddress.port);
    const connection: PooledConnection = {
      id,
      key,
      hboneAddr,
      logger: this.#logger.child({ hbone_connection: id, hbone_addr: hboneAddr }),
      state: "connecting",
      ready: Promise.resolve(),
      waiting: 0,
      streams: 0,
      sockets: [],
      source: formatSpiffeId(destination.sourceIdentity),
    };
    group.connections.add(connection);
    this.#connections.add(connection);
    connection.ready = this.#connect(connection, destination).catch((error: unknown) => {
      connection.logger.debug({ err: error }, "HBONE connection failed during setup");
      this.#discard(connection, error);
      throw error;
    });
    // Every waiter awaits `ready`; this handler only keeps a failure without waiters from being reported as unhandled.
    connection.ready.catch(() => undefined);
    return connection;
  }

  /** Takes the source's current certificate, sets up the HBONE connection, then makes it take streams. */
  async #connect(connection: PooledConnection, destination: HboneDestination): Promise<void> {
    const certificate = await this.#certs.get(destination.sourceIdentity);
    this.#followRotations(destination.sourceIdentity);
    connection.certificate = certificate;
    this.#assertConnecting(connection);
    const session = await connectHbone({
      network: this.#network,
      certificate,
      expectedIdentities: destination.destinationIdentities,
      acceptedTrustDomains: this.#acceptedTrustDomains,
      hboneAddress: destination.hboneAddress,
      timeoutMs: this.#connectTimeoutMs,
      onSocket: (socket) => connection.sockets.push(socket),
      onSession: (session) => this.#watchSession(connection, session),
    });
    this.#assertConnecting(connection);
    this.#markReady(connection, session);
  }

  #assertConnecting(connection: PooledConnection): void {
    if (connection.state !== "connecting") {
      throw new AgentError(
        "STREAM_RESET",
        `the HBONE connection to ${connection.hboneAddr} was closed during its setup, by the pool closing or by a GOAWAY from the server`,
      );
    }
  }

  #watchSession(connection: PooledConnection, session: http2.ClientHttp2Session): void {
    connection.session = session;
    session.on("error", (error) => connection.logger.debug({ err: error }, "HBONE session failed"));
    session.on("goaway", (code) => this.#onGoaway(connection, code));
    session.on("remoteSettings", (settings) => this.#learnLimit(connection, settings));
    session.once("close", () => this.#onClose(connection));
  }

  #markReady(connection: PooledConnection, session: http2.ClientHttp2Session): void {
    this.#learnLimit(connection, session.remoteSettings);
    if (connection.limit === 0) {
      throw new AgentError(
        "TUNNEL_REJECTED",
        `${connection.hboneAddr} allows no streams (SETTINGS_MAX_CONCURRENT_STREAMS 0); check the destination agent's log`,
      );
    }
    connection.state = "ready";
    if (connection.retireWhenReady !== undefined) {
      // Its waiting requests find no room on it and move to a new connection.
      this.#retire(connection, connection.retireWhenReady);
      return;
    }
    this.#retireAtExpiry(connection, session);
    connection.pingTimer = setInterval(() => this.#ping(connection), this.#pingIntervalMs);
    connection.pingTimer.unref();
    // Requests that gave up during the handshake may leave the connection without waiters.
    this.#scheduleIdleClose(connection);
    connection.logger.debug({ limit: connection.limit }, "HBONE connection opened");
  }

  /**
   * Subscribes once per source identity to its certificate rotations. Each new certificate, or new
   * trusted roots, retires the connections made before it. New streams then go over a connection
   * that presents the new certificate and verifies the peer against the current roots.
   */
  #followRotations(identity: Identity): void {
    const source = formatSpiffeId(identity);
    if (this.#rotationSubscriptions.has(source) || !this.#certs.onRotation) return;
    const unsubscribe = this.#certs.onRotation(identity, (certificate) => {
      for (const connection of this.#connections) {
        if (connection.source !== source || connection.certificate === undefined || connection.certificate === certificate) continue;
        this.#retire(connection, "the source certificate or the trusted roots changed");
      }
    });
    this.#rotationSubscriptions.set(source, unsubscribe);
  }

  /** Retires the connection when its own certificate or the peer's expires, whichever comes first. */
  #retireAtExpiry(connection: PooledConnection, session: http2.ClientHttp2Session): void {
    const peerNotAfter = (session.socket as tls.TLSSocket | undefined)?.getPeerX509Certificate?.()?.validTo;
    const expiries = [connection.certificate?.notAfter.getTime(), peerNotAfter === undefined ? undefined : Date.parse(peerNotAfter)].filter(
      (time): time is number => time !== undefined && Number.isFinite(time),
    );
    if (expiries.length === 0) return;
    // Node's timers cannot wait longer than about 24.8 days, more than any workload certificate lives.
    const delay = Math.min(Math.max(Math.min(...expiries) - Date.now(), 0), 2 ** 31 - 1);
    connection.expiryTimer = setTimeout(() => this.#retire(connection, "a certificate of the connection expired"), delay);
    connection.expiryTimer.unref();
  }

  #learnLimit(connection: PooledConnection, settings: http2.Settings): void {
    const peerLimit = settings.maxConcurrentStreams ?? Number.POSITIVE_INFINITY;
    connection.limit = Math.min(this.#maxStreams, peerLimit);
    const group = this.#groups.get(connection.key);
    if (group?.connections.has(connection)) {
      group.learnedLimit = connection.limit;
    }
  }

  /** Opens a stream when the connection is ready and has room, and returns undefined otherwise. */
  #openStream(connection: PooledConnection, headers: http2.OutgoingHttpHeaders): http2.ClientHttp2Stream | undefined {
    const session = connection.session;
    if (connection.state !== "ready" || !session || connection.streams >= (connection.limit ?? 0)) {
      return undefined;
    }
    let stream: http2.ClientHttp2Stream;
    try {
      stream = session.request(headers, { endStream: false });
    } catch (error) {
      // Node throws when the session went away or ran out of stream ids, so the connection takes no more streams.
      connection.logger.debug({ err: error }, "HBONE connection refused a new stream");
      this.#closeGracefully(connection).catch(() => undefined);
      return undefined;
    }
    connection.streams += 1;
    clearTimeout(connection.idleTimer);
    connection.idleTimer = undefined;
    // The caller attaches its own handlers; this one keeps an early stream error from crashing the process.
    stream.on("error", ignoreError);
    stream.once("close", () => {
      connection.streams -= 1;
      this.#scheduleIdleClose(connection);
      this.#closeIfRetiredAndIdle(connection);
    });
    return stream;
  }

  #scheduleIdleClose(connection: PooledConnection): void {
    if (connection.state !== "ready" || connection.streams > 0 || connection.waiting > 0 || connection.idleTimer) {
      return;
    }
    connection.idleTimer = setTimeout(() => {
      connection.logger.debug({ idle_ms: this.#idleTimeoutMs }, "closing idle HBONE connection");
      this.#closeGracefully(connection).catch(() => undefined);
    }, this.#idleTimeoutMs);
    connection.idleTimer.unref();
  }

  /** Sends a PING unless one is outstanding, and destroys the connection when the acknowledgement is late. */
  #ping(connection: PooledConnection): void {
    const session = connection.session;
    if (!session || session.destroyed || connection.pingDeadline) {
      return;
    }
    connection.pingDeadline = setTimeout(() => this.#onPingTimeout(connection), this.#pingTimeoutMs);
    connection.pingDeadline.unref();
    // The callback runs on an acknowledgement and when the PING is cancelled (session closed or
    // destroyed); only a missing callback means the peer is gone.
    session.ping(() => {
      clearTimeout(connection.pingDeadline);
      connection.pingDeadline = undefined;
    });
  }

  #onPingTimeout(connection: PooledConnection): void {
    const error = new AgentError(
      "STREAM_RESET",
      `the HBONE connection to ${connection.hboneAddr} did not acknowledge a PING within ${this.#pingTimeoutMs} ms, so it was destroyed with its ${connection.streams} open streams`,
    );
    connection.logger.warn({ streams: connection.streams, ping_timeout_ms: this.#pingTimeoutMs }, "HBONE connection missed its PING acknowledgement");
    this.#discard(connection, error);
  }

  #onGoaway(connection: PooledConnection, code: number): void {
    connection.logger.debug({ code, streams: connection.streams }, "HBONE connection received GOAWAY");
    this.#leavePool(connection);
    if (connection.state !== "closed") {
      connection.state = "draining";
    }
  }

  #onClose(connection: PooledConnection): void {
    this.#leavePool(connection);
    this.#clearTimers(connection);
    connection.state = "closed";
    this.#connections.delete(connection);
    connection.logger.debug("HBONE connection closed");
  }

  /** Sends GOAWAY, lets the open streams end, and destroys the connection after the grace period. */
  #closeGracefully(connection: PooledConnection): Promise<void> {
    const session = connection.session;
    if (connection.state === "connecting" || !session) {
      this.#discard(connection, new AgentError("STREAM_RESET", `the HBONE connection to ${connection.hboneAddr} was closed during its setup because the pool closed`));
      return Promise.resolve();
    }
    this.#leavePool(connection);
    if (session.destroyed) {
      return Promise.resolve();
    }
    connection.state = "draining";
    this.#stopPings(connection);
    const closed = new Promise<void>((resolve) => session.once("close", () => resolve()));
    const grace = setTimeout(() => session.destroy(), this.#closeGraceMs);
    grace.unref();
    session.close(() => clearTimeout(grace));
    return closed;
  }

  /** Takes the connection out of the pool and destroys it with its streams now. */
  #discard(connection: PooledConnection, error: unknown): void {
    this.#leavePool(connection);
    this.#clearTimers(connection);
    connection.state = "closed";
    this.#connections.delete(connection);
    const reason = error instanceof Error ? error : undefined;
    if (connection.session && !connection.session.destroyed) {
      connection.session.destroy(reason);
    }
    for (const socket of connection.sockets) {
      socket.destroy();
    }
  }

  #stopFollowingRotations(): void {
    for (const unsubscribe of this.#rotationSubscriptions.values()) unsubscribe();
    this.#rotationSubscriptions.clear();
  }

  #leavePool(connection: PooledConnection): void {
    clearTimeout(connection.idleTimer);
    connection.idleTimer = undefined;
    const group = this.#groups.get(connection.key);
    if (!group?.connections.delete(connection)) {
      return;
    }
    if (group.connections.size === 0) {
      this.#groups.delete(connection.key);
    }
  }

  #clearTimers(connection: PooledConnection): void {
    clearTimeout(connection.idleTimer);
    clearTimeout(connection.expiryTimer);
    clearInterval(connection.pingTimer);
    clearTimeout(connection.pingDeadline);
    connection.idleTimer = undefined;
    connection.pingTimer = undefined;
    connection.pingDeadline = undefined;
  }
}

/** Waits for the connection's setup to finish, or rejects with STREAM_RESET once `signal` aborts. */
function untilReady(connection: PooledConnection, signal: AbortSignal | undefined): Promise<void> {
  if (!signal) {
    return connection.ready;
  }
  const aborted = (): AgentError =>
    new AgentError("STREAM_RESET", `the request for a tunnel through ${connection.hboneAddr} was aborted while its connection was being set up`);
  if (signal.aborted) {
    return Promise.reject(aborted());
  }
  return new Promise((resolve, reject) => {
    const onAbort = (): void => reject(aborted());
    signal.addEventListener("abort", onAbort, { once: true });
    connection.ready.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}
