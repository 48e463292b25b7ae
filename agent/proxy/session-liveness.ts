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
// socket only, which the idle timeout bounds. Each check reads three numbers: the bytes the
// session's socket read and wrote, and the bytes its TCP peer has not acknowledged yet. A session
// where none of them changed since the previous check gets a PING, and one that leaves it
// unanswered for pingTimeoutMs while none of them changes is reported dead. Every HTTP/2 peer must
// acknowledge a PING (RFC 9113 section 6.7), and the HTTP/2 libraries of Node's client and of
// ztunnel do so without their application.
//
// Writes count because a PING waits behind the DATA that Node already handed to the socket. On a
// slow link a client can take a download for minutes without sending a byte (its window is not
// half used), and Node then writes nothing new until the kernel took its previous write. The
// kernel's count of unacknowledged bytes still changes as the client's acknowledgements arrive.
//
// A session closing gracefully is not checked: Node.js 20.20.2 cancels a PING submitted after
// close() (ERR_HTTP2_PING_CANCEL). A PING submitted before close() is still sent and acknowledged.

import type http2 from "node:http2";
import type net from "node:net";
import { unackedBytesOf } from "./tcp";

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
 * Reports a session that read and wrote nothing while its PING went unacknowledged. `stalled` is
 * true when the PING never left the outbound queue: nghttp2 ended the session, or the client
 * stopped taking bytes. When it is false, the PING was sent and the client did not acknowledge it.
 */
export type DeadSessionHandler = (stalled: boolean) => void;

/** The byte counts a check compares with those of the previous check. */
interface Progress {
  read: number;
  written: number;
  /** The TCP peer's unacknowledged bytes, or undefined when unknown. */
  unacked: number | undefined;
}

/**
 * The liveness check of one HTTP/2 session. It uses one timer, armed only while the session has
 * open streams. `tcp` is the TCP socket under the session, whose kernel send queue the check reads.
 */
export class SessionLiveness {
  #timer: NodeJS.Timeout | undefined;
  /** The byte counts at the previous check, or undefined before the first. */
  #progress: Progress | undefined;
  /** Whether a PING of this check waits for its acknowledgement. */
  #pinging = false;

  constructor(
    private readonly session: http2.Http2Session,
    private readonly tcp: net.Socket | undefined,
    private readonly timing: Readonly<LivenessTiming>,
    private readonly hasOpenStreams: () => boolean,
    private readonly onDead: DeadSessionHandler,
  ) {}

  /** Starts the checks unless they run already. Call it when the session gets an open stream. */
  start(): void {
    if (this.#timer === undefined && !this.session.destroyed) this.#arm(this.timing.intervalMs);
  }

  /** Stops the checks. Call it when the session closes. */
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
    const moved = this.#moved();
    if (this.#pinging) {
      // Bytes still move, so the PING may wait behind them: give it another timeout.
      if (moved) {
        this.#arm(this.timing.pingTimeoutMs);
        return;
      }
      this.#pinging = false;
      this.onDead((session.state.outboundQueueSize ?? 0) > 0);
      return;
    }
    // The next start() arms the checks again.
    if (session.closed || !this.hasOpenStreams()) return;
    if (moved) {
      this.#arm(this.timing.intervalMs);
      return;
    }
    this.#pinging = true;
    session.ping((error) => this.#answered(error));
    this.#arm(this.timing.pingTimeoutMs);
  }

  /** Returns whether the session read or wrote a byte, or its kernel send queue changed, since the previous call. */
  #moved(): boolean {
    const socket = this.session.socket;
    const previous = this.#progress;
    const current: Progress = { read: socket.bytesRead, written: socket.bytesWritten, unacked: unackedBytesOf(this.tcp) };
    this.#progress = current;
    if (previous === undefined) return true;
    const kernelMoved = current.unacked !== undefined && previous.unacked !== undefined && current.unacked !== previous.unacked;
    return current.read !== previous.read || current.written !== previous.written || kernelMoved;
  }

  /**
   * Handles the PING's acknowledgement. Node cancels the PING (an error) when the session is
   * destroyed. close() while the PING waits cancels nothing: the client's acknowledgement still
   * arrives, and without it the next check reports the session.
   */
  #answered(error: Error | null): void {
    if (error !== null || !this.#pinging) return;
    this.#pinging = false;
    this.stop();
    if (this.session.destroyed) return;
    this.#moved();
    this.#arm(this.timing.intervalMs);
  }
}
