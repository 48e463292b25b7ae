// The limits of the inbound HBONE server (15008) against hostile clients. They cover connections per
// client IP, the handshake deadline (TCP accept to the first CONNECT stream the limits admit), and streams per
// connection, per client identity and per pod. They also cover the header list size, rapid stream
// resets and idle sessions, and write the refusal records of TLS and HTTP/2 failures.
//
// What Node.js 20.20 (nghttp2 1.61) does by itself, measured with test/harness/h2-raw.ts:
// - SETTINGS and PING floods: the session fails with "Flooding was detected" once about 1000
//   acknowledgements are queued, and the socket closes without GOAWAY.
// - CONTINUATION floods: the session fails with "Too many CONTINUATION frames following a HEADER
//   frame", without GOAWAY.
// - Rapid reset: nghttp2 sends GOAWAY INTERNAL_ERROR after about 1000 resets (burst 1000, 33 per
//   second) but leaves the socket open and emits no event to JavaScript. Node 20 ignores the
//   streamResetBurst and streamResetRate options, so this module counts resets itself.
// - SETTINGS_MAX_CONCURRENT_STREAMS: nghttp2 refuses excess streams with RST_STREAM REFUSED_STREAM
//   from the moment the SETTINGS frame is sent, and fails the session with "Protocol error" once
//   the client acknowledged it. Neither refusal reaches JavaScript as a stream.
// - SETTINGS_MAX_HEADER_LIST_SIZE: applies only after the client acknowledged the SETTINGS frame.
//   Node then resets the stream with ENHANCE_YOUR_CALM and emits nothing. Before that, any size up
//   to Node's 128 header pairs reaches the 'stream' event, where admitStream() checks it.
// - WINDOW_UPDATE overflow, frames on idle streams and malformed frames: the session fails with
//   "Flow control error" or "Protocol error".
// - More than maxSessionInvalidFrames invalid frames (empty DATA frames, streams that nghttp2
//   refused before the SETTINGS acknowledgement): ERR_HTTP2_TOO_MANY_INVALID_FRAMES.
// - An HPACK block that the decoder rejects, or a stream that depends on itself: nghttp2 sends GOAWAY
//   and stops reading without any JavaScript event, so session-liveness.ts polls for such sessions.

import http2 from "node:http2";
import type net from "node:net";
import type tls from "node:tls";
import type { AuditPeer } from "../audit/record";
import type { Logger } from "../log";
import type { LimitTracker, Release } from "./limit-tracker";
import type { ProxyLimits } from "./limits";
import type { RefusalLog, RefusalReason } from "./refusal-log";
import { HBONE_PORT, MAX_SESSION_INVALID_FRAMES } from "./hbone";
import { DEFAULT_LIVENESS, SessionLiveness, type LivenessTiming } from "./session-liveness";
import { normalizeIp, remoteAddressOf } from "./tcp";

/**
 * Streams a client may reset before their response, in one burst, on one connection. The bucket
 * refills at RAPID_RESET_PER_SECOND. Past it the connection gets GOAWAY ENHANCE_YOUR_CALM. A
 * client's proxy resets a stream before its response only when its application gave up during
 * the connect, which is rare next to this.
 */
export const RAPID_RESET_BURST = 200;
/** Refill rate of the reset bucket, per second. */
export const RAPID_RESET_PER_SECOND = 20;

/** The pod, limits and records of one InboundGuard. */
export interface InboundGuardOptions {
  /** The pod's uid, the key of its counters in the tracker. */
  podUid: string;
  /** The pod as refusal records name it. */
  destination(localIp: string): AuditPeer;
  /** The limits to apply: the tracker's own, or those with a server's override. */
  limits: Readonly<ProxyLimits>;
  tracker: LimitTracker;
  refusals: RefusalLog;
  logger: Logger;
  /** The liveness check of sessions with open streams, or DEFAULT_LIVENESS when absent. */
  liveness?: Readonly<LivenessTiming>;
}

/** The state of one HBONE session that the limits need. */
interface SessionState {
  /** Streams admitted and not yet closed. */
  open: Set<http2.ServerHttp2Stream>;
  /** Tokens of the rapid-reset bucket, and when they were last refilled. */
  resetTokens: number;
  refilledAt: number;
  idleTimer?: NodeJS.Timeout;
  liveness: SessionLiveness;
  tcp?: net.Socket;
}

/** Applies the limits of one pod's inbound HBONE server and records each refusal. */
export class InboundGuard {
  readonly #options: InboundGuardOptions;
  readonly #handshakeTimers = new WeakMap<net.Socket, NodeJS.Timeout>();
  /** TCP sockets already refused, so that the TLS error their destruction causes is not recorded again. */
  readonly #refused = new WeakSet<net.Socket>();
  readonly #sessions = new WeakMap<http2.ServerHttp2Session, SessionState>();
  /** Streams this side refused, so that their reset does not count as the client's. */
  readonly #refusedStreams = new WeakSet<http2.ServerHttp2Stream>();

  constructor(options: InboundGuardOptions) {
    this.#options = options;
  }

  /** The limits this guard applies. */
  get limits(): Readonly<ProxyLimits> {
    return this.#options.limits;
  }

  /** The node-wide count of bytes the proxies buffer, for the copy of each stream. */
  get buffered(): LimitTracker["buffered"] {
    return this.#options.tracker.buffered;
  }

  /**
   * Counts an accepted TCP connection against maxConnectionsPerPeer and arms the handshake
   * deadline. Returns false after destroying a refused socket.
   */
  acceptConnection(socket: net.Socket): boolean {
    const ip = normalizeIp(socket.remoteAddress ?? "");
    const release = this.#options.tracker.acquirePeer(this.#options.podUid, "inbound", ip);
    if (release === undefined) {
      const limit = this.limits.maxConnectionsPerPeer;
      this.#refuse(socket, "connections_per_peer", `client ${ip} has ${limit} open connections to ${this.#options.podUid} on port ${HBONE_PORT}, the limit (--max-connections-per-peer)`, limit);
      socket.destroy();
      return false;
    }
    const timer = setTimeout(() => this.#handshakeExpired(socket), this.limits.handshakeTimeoutMs);
    timer.unref();
    this.#handshakeTimers.set(socket, timer);
    socket.once("close", () => {
      clearTimeout(timer);
      release();
    });
    return true;
  }

  #handshakeExpired(socket: net.Socket): void {
    if (socket.destroyed) return;
    const seconds = this.limits.handshakeTimeoutMs / 1000;
    this.#refuse(socket, "handshake_timeout", `client ${remoteAddressOf(socket)} sent no CONNECT request within ${seconds} s of connecting, or only refused ones, the limit (--handshake-timeout)`, seconds);
    socket.destroy();
  }

  /**
   * Records a TLS handshake that failed: garbage, a truncated handshake, no TLS 1.3, Node's
   * handshake timeout. A client that closed the connection before sending a byte, as a port
   * probe does, gets a debug log line only.
   */
  recordTlsFailure(error: NodeJS.ErrnoException, tcp: net.Socket | undefined, source: string): void {
    if (tcp && this.#refused.has(tcp)) return;
    const closedEarly = (error.code === "ECONNRESET" || error.code === "EPIPE") && (tcp?.bytesRead ?? 0) === 0;
    if (closedEarly) {
      this.#options.logger.debug({ code: error.code, "src.addr": source }, "HBONE client closed the connection before its TLS handshake");
      return;
    }
    if (error.code === "ERR_TLS_HANDSHAKE_TIMEOUT") {
      const seconds = this.limits.handshakeTimeoutMs / 1000;
      this.#refuseFrom(tcp, source, "handshake_timeout", `client ${source} did not finish its TLS handshake within ${seconds} s, the limit (--handshake-timeout)`, seconds);
      return;
    }
    const cause = error.code ?? error.message;
    this.#refuseFrom(tcp, source, "tls_handshake", `TLS handshake with client ${source} failed: ${cause} (${tcp?.bytesRead ?? 0} bytes received)`);
  }

  /** Counts a session whose client certificate failed verification. Its connection record states why. */
  countRejectedCertificate(): void {
    this.#options.refusals.countClosed("inbound", "tls_handshake");
  }

  /** Starts following a verified session: its HTTP/2 errors, its idle time, its liveness and its stream resets. */
  watchSession(session: http2.ServerHttp2Session, tcp: net.Socket | undefined): void {
    const timing = this.#options.liveness ?? DEFAULT_LIVENESS;
    const state: SessionState = {
      open: new Set(),
      resetTokens: RAPID_RESET_BURST,
      refilledAt: Date.now(),
      liveness: new SessionLiveness(session, tcp, timing, () => state.open.size > 0, (stalled) => this.#sessionDead(session, state, stalled)),
      tcp,
    };
    this.#sessions.set(session, state);
    session.on("error", (error: NodeJS.ErrnoException) => this.#sessionFailed(session, state, error));
    session.once("close", () => {
      clearTimeout(state.idleTimer);
      state.liveness.stop();
    });
    this.#armIdle(session, state);
  }

  /**
   * Destroys a session whose liveness PING was not acknowledged, with its streams. Their copies then
   * reset the application sockets, and the streams release their slots and buffered bytes.
   */
  #sessionDead(session: http2.ServerHttp2Session, state: SessionState, stalled: boolean): void {
    const source = state.tcp ? remoteAddressOf(state.tcp) : "unknown";
    const seconds = (this.#options.liveness ?? DEFAULT_LIVENESS).pingTimeoutMs / 1000;
    const streams = state.open.size;
    const message = stalled
      ? `HTTP/2 session with client ${source} read and wrote no byte while a PING waited ${seconds} s to be sent: Node.js ended the session after an HTTP/2 error of the client without reporting it, or the client stopped taking bytes, so the agent closed it and its ${streams} open streams`
      : `client ${source} did not acknowledge a PING within ${seconds} s while its HTTP/2 session read and wrote no byte, so the agent closed the session and its ${streams} open streams`;
    this.#refuseFrom(state.tcp, source, "http2_protocol", message);
    // The error goes to the session's 'error' listener, which logs it, and the streams are destroyed with it.
    session.destroy(new Error(message), http2.constants.NGHTTP2_PROTOCOL_ERROR);
  }

  /**
   * Records the HTTP/2 error that ended a session. Floods are reason http2_flood, and so are more
   * than MAX_SESSION_INVALID_FRAMES invalid frames (ERR_HTTP2_TOO_MANY_INVALID_FRAMES: empty DATA
   * frames, frames on closed streams, streams that nghttp2 refused). A "Protocol error", or too many
   * invalid frames, while the session has maxStreamsPerConnection streams open is nghttp2 refusing
   * more streams than the limit. A client that vanished or sent GOAWAY with an error is logged only.
   */
  #sessionFailed(session: http2.ServerHttp2Session, state: SessionState, error: NodeJS.ErrnoException): void {
    const source = state.tcp ? remoteAddressOf(state.tcp) : "unknown";
    const invalidFrames = error.code === "ERR_HTTP2_TOO_MANY_INVALID_FRAMES";
    if (error.code !== "ERR_HTTP2_ERROR" && !invalidFrames) {
      this.#options.logger.debug({ err: error, "src.addr": source }, "HBONE session failed");
      return;
    }
    const limit = this.limits.maxStreamsPerConnection;
    if ((invalidFrames || /Protocol error/.test(error.message)) && state.open.size >= limit) {
      this.#refuseFrom(state.tcp, source, "streams_per_connection", `client ${source} opened more than ${limit} streams on one connection, the limit (--max-streams-per-connection)`, limit);
    } else if (invalidFrames) {
      this.#refuseFrom(state.tcp, source, "http2_flood", `client ${source} sent more than ${MAX_SESSION_INVALID_FRAMES} invalid HTTP/2 frames on one connection, such as empty DATA frames or frames on closed streams`);
    } else {
      const reason: RefusalReason = /Flooding|Too many CONTINUATION/.test(error.message) ? "http2_flood" : "http2_protocol";
      this.#refuseFrom(state.tcp, source, reason, `HTTP/2 session with client ${source} failed: ${error.message}`);
    }
    session.destroy();
  }

  /**
   * Admits a CONNECT stream, or refuses it and returns undefined. Checks, in order: streams open
   * on its connection, the header list size, the node's buffered bytes, the pod's inbound
   * connections, and the streams of the client's identity. The returned function releases what
   * the stream counted, and the stream's close releases it too. Only an admitted stream ends the
   * connection's handshake deadline, so a connection whose streams are all refused is closed at
   * it, whatever the idle timeout.
   */
  admitStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, identity: string): Release | undefined {
    const session = stream.session as http2.ServerHttp2Session;
    const state = this.#sessions.get(session);
    // Every verified session is watched, so a stream of another session is refused unrecorded.
    if (!state) {
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return undefined;
    }

    const refused = this.#checkStream(state, headers, identity);
    if (refused) {
      this.#refusedStreams.add(stream);
      this.#refuseFrom(state.tcp, refused.source, refused.reason, refused.message, refused.limit);
      if (refused.reason === "header_list_size") stream.respond({ ":status": 431 }, { endStream: true });
      else stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return undefined;
    }

    const releasePod = this.#options.tracker.acquire(this.#options.podUid, "inbound");
    const releasePeer = releasePod && this.#options.tracker.acquirePeerStream(this.#options.podUid, identity);
    if (!releasePod || !releasePeer) {
      releasePod?.();
      const byPod = !releasePod;
      const limit = byPod ? this.limits.maxConnectionsPerPod : this.limits.maxStreamsPerPeer;
      const source = state.tcp ? remoteAddressOf(state.tcp) : "unknown";
      const message = byPod
        ? `pod ${this.#options.podUid} has ${limit} open inbound connections, the limit (--max-connections-per-pod)`
        : `client identity ${identity} has ${limit} open streams to ${this.#options.podUid}, the limit (--max-streams-per-peer)`;
      this.#refusedStreams.add(stream);
      this.#refuseFrom(state.tcp, source, byPod ? "connections_per_pod" : "streams_per_peer", message, limit);
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return undefined;
    }

    this.#firstAdmitted(state);
    state.open.add(stream);
    clearTimeout(state.idleTimer);
    state.liveness.start();
    const release = (): void => {
      releasePod();
      releasePeer();
    };
    stream.once("close", () => {
      release();
      // Node closes every stream of a failed session before it emits the session's 'error', which
      // reads how many were open.
      if (session.destroyed) return;
      state.open.delete(stream);
      this.#countReset(session, state, stream);
      if (state.open.size === 0) this.#armIdle(session, state);
    });
    return release;
  }

  #checkStream(
    state: SessionState,
    headers: http2.IncomingHttpHeaders,
    identity: string,
  ): { reason: RefusalReason; message: string; limit?: number; source: string } | undefined {
    const source = state.tcp ? remoteAddressOf(state.tcp) : "unknown";
    const perConnection = this.limits.maxStreamsPerConnection;
    if (state.open.size >= perConnection) this.#pruneClosed(state);
    if (state.open.size >= perConnection) {
      return { reason: "streams_per_connection", message: `client ${source} (${identity}) has ${perConnection} open streams on one connection, the limit (--max-streams-per-connection)`, limit: perConnection, source };
    }
    const size = headerListSize(headers);
    const maxHeaderList = this.limits.maxHeaderListBytes;
    if (size > maxHeaderList) {
      return { reason: "header_list_size", message: `client ${source} (${identity}) sent a header list of ${size} bytes, more than the limit of ${maxHeaderList} (--max-header-list-size)`, limit: maxHeaderList, source };
    }
    if (this.#options.tracker.buffered.exceeded) {
      const max = this.limits.maxBufferedBytes;
      const bytes = this.#options.tracker.buffered.bytes;
      return { reason: "buffered_bytes", message: `the proxies buffer ${bytes} bytes read and not yet written, more than the limit of ${max} (--max-buffered-bytes)`, limit: max, source };
    }
    return undefined;
  }

  /** Ends the handshake deadline: the limits admitted a CONNECT stream of the connection. */
  #firstAdmitted(state: SessionState): void {
    if (state.tcp) clearTimeout(this.#handshakeTimers.get(state.tcp));
  }

  /** Drops streams that Node closed already but whose 'close' event has not run yet. */
  #pruneClosed(state: SessionState): void {
    for (const stream of state.open) {
      if (stream.closed || stream.destroyed) state.open.delete(stream);
    }
  }

  /**
   * Takes a token for a stream that the client reset before its response. Without tokens left the
   * session gets GOAWAY ENHANCE_YOUR_CALM and is destroyed.
   */
  #countReset(session: http2.ServerHttp2Session, state: SessionState, stream: http2.ServerHttp2Stream): void {
    if (stream.headersSent || this.#refusedStreams.has(stream) || !stream.rstCode) return;
    const now = Date.now();
    state.resetTokens = Math.min(RAPID_RESET_BURST, state.resetTokens + ((now - state.refilledAt) / 1000) * RAPID_RESET_PER_SECOND);
    state.refilledAt = now;
    state.resetTokens -= 1;
    if (state.resetTokens >= 0 || session.destroyed) return;
    const source = state.tcp ? remoteAddressOf(state.tcp) : "unknown";
    this.#refuseFrom(state.tcp, source, "http2_flood", `client ${source} reset more than ${RAPID_RESET_BURST} streams before their response (rapid reset), faster than ${RAPID_RESET_PER_SECOND} per second`);
    // The code is that of the final GOAWAY. The error goes to the session's 'error' listener, which logs it.
    session.destroy(new Error(`rapid reset from client ${source}`), http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
  }

  /** Arms the timer that closes the session with GOAWAY after idleTimeoutMs without an open stream (0 turns it off). */
  #armIdle(session: http2.ServerHttp2Session, state: SessionState): void {
    const idleMs = this.limits.idleTimeoutMs;
    if (idleMs === 0 || session.closed || session.destroyed) return;
    clearTimeout(state.idleTimer);
    state.idleTimer = setTimeout(() => {
      if (state.open.size > 0 || session.closed || session.destroyed) return;
      this.#options.refusals.countClosed("inbound", "idle_timeout");
      this.#options.logger.info({ "src.addr": state.tcp ? remoteAddressOf(state.tcp) : "unknown", idleMs }, "closing an HBONE connection without a stream for the idle timeout");
      session.close();
    }, idleMs);
    state.idleTimer.unref();
  }

  #refuse(socket: net.Socket, reason: RefusalReason, message: string, limit?: number): void {
    this.#refuseFrom(socket, remoteAddressOf(socket), reason, message, limit);
  }

  /**
   * Writes one refusal through the refusal log, and marks its TCP socket so that the TLS error of
   * the socket's destruction is not recorded again.
   */
  #refuseFrom(tcp: net.Socket | undefined, source: string, reason: RefusalReason, message: string, limit?: number): void {
    if (tcp) this.#refused.add(tcp);
    const localIp = normalizeIp(tcp?.localAddress ?? "");
    this.#options.refusals.refuse({
      listener: "inbound",
      port: HBONE_PORT,
      src: { addr: source },
      dst: this.#options.destination(localIp),
      reason,
      message,
      ...(limit === undefined ? {} : { limit }),
    });
  }
}

/** Returns the size of a header list as RFC 9113 section 6.5.2 counts it: name and value octets plus 32 per field. */
export function headerListSize(headers: http2.IncomingHttpHeaders): number {
  let size = 0;
  for (const [name, value] of Object.entries(headers)) {
    const values = Array.isArray(value) ? value : [value ?? ""];
    for (const item of values) size += Buffer.byteLength(name) + Buffer.byteLength(String(item)) + 32;
  }
  return size;
}
