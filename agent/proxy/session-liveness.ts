// Finds HTTP/2 sessions that nghttp2 ended by itself. After some client errors, nghttp2 1.61 in
// Node.js 20.20.2 sends GOAWAY, stops reading the socket and emits no event to JavaScript. Such errors
// are a header block that the HPACK decoder rejects (COMPRESSION_ERROR, for example a dynamic table
// size update over the limit) and a PRIORITY frame that makes a stream depend on itself
// (PROTOCOL_ERROR). Measured on loopback with test/harness/h2-raw.ts: the session emits no
// 'error', 'close', 'goaway' or 'frameError' event, session.state stays the same, its open streams
// emit nothing, and their writes never complete. The socket's bytesRead stops while the client
// goes on writing. A PING submitted afterwards stays in the outbound queue
// (state.outboundQueueSize 1) and is never acknowledged. So the session, its streams and what they
// hold would stay until something else closes them.
//
// The check therefore polls, and only sessions with open streams: a session without one costs a
// socket only, which the idle timeout bounds. Each check reads one number. A session that read no
// byte since the previous check gets a PING, and one that leaves it unanswered for pingTimeoutMs
// is reported dead. Every HTTP/2 peer must acknowledge a PING (RFC 9113 section 6.7), and the
// HTTP/2 libraries of Node's client and of ztunnel do so without their application. A session closing gracefully is not checked,
// because Node 20 cancels the PINGs of a closed session at once.

import type http2 from "node:http2";

/** How often a session with open streams is checked, and how long its PING may go unacknowledged. */
export interface LivenessTiming {
  /** Time in ms between two checks of a session with open streams. */
  intervalMs: number;
  /** Time in ms a client has to acknowledge the PING of a check. */
  pingTimeoutMs: number;
}

/**
 * The timing of the HBONE server. A session that nghttp2 ended is found within two intervals and
 * a PING timeout (40 s) of its last byte. The PING timeout gives a loaded client twice the
 * interval to acknowledge.
 */
export const DEFAULT_LIVENESS: Readonly<LivenessTiming> = { intervalMs: 10_000, pingTimeoutMs: 20_000 };

/**
 * Reports a session whose PING was not acknowledged. `stalled` is true when the PING never left the
 * outbound queue, the mark of a session that nghttp2 ended. When it is false, the PING was sent
 * and the client did not acknowledge it.
 */
export type DeadSessionHandler = (stalled: boolean) => void;

/** The liveness check of one HTTP/2 session; one timer, armed only while the session has open streams. */
export class SessionLiveness {
  #timer: NodeJS.Timeout | undefined;
  /** The socket's bytesRead at the previous check; -1 before the first. */
  #bytesRead = -1;
  /** Whether a PING of this check waits for its acknowledgement. */
  #pinging = false;

  constructor(
    private readonly session: http2.Http2Session,
    private readonly timing: Readonly<LivenessTiming>,
    private readonly hasOpenStreams: () => boolean,
    private readonly onDead: DeadSessionHandler,
  ) {}

  /** Starts the checks unless they run already; call it when the session gets an open stream. */
  start(): void {
    if (this.#timer === undefined && !this.session.destroyed) this.#arm(this.timing.intervalMs);
  }

  /** Stops the checks; call it when the session closes. */
  stop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  #arm(delayMs: number): void {
    this.#timer = setTimeout(() => this.#check(), delayMs);
    this.#timer.unref();
  }

  #check(): void {
    this.#timer = undefined;
    const session = this.session;
    if (session.destroyed) return;
    if (this.#pinging) {
      this.#pinging = false;
      this.onDead((session.state.outboundQueueSize ?? 0) > 0);
      return;
    }
    // The next start() arms the checks again.
    if (session.closed || !this.hasOpenStreams()) return;
    const bytesRead = session.socket.bytesRead;
    if (bytesRead !== this.#bytesRead) {
      this.#bytesRead = bytesRead;
      this.#arm(this.timing.intervalMs);
      return;
    }
    this.#pinging = true;
    session.ping((error) => this.#answered(error));
    this.#arm(this.timing.pingTimeoutMs);
  }

  /** Handles the PING's acknowledgement. Node cancels the PING (an error) when the session closes or is destroyed. */
  #answered(error: Error | null): void {
    if (error !== null || !this.#pinging) return;
    this.#pinging = false;
    this.stop();
    if (this.session.destroyed) return;
    this.#bytesRead = this.session.socket.bytesRead;
    this.#arm(this.timing.intervalMs);
  }
}
