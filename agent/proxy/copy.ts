// The bidirectional copy between the two halves of a proxied connection: TCP sockets and HTTP/2
// CONNECT streams. A TCP FIN maps to END_STREAM in that direction and back. An abort maps to an abort:
// a TCP reset or socket error becomes an RST_STREAM, and an RST_STREAM with any code other than NO_ERROR
// or CANCEL becomes a TCP reset. RST_STREAM NO_ERROR or CANCEL reads as end of stream, as in ztunnel.
// NOTE: a TCP reset that arrives while its connection is busy is sometimes read as end of file (seen on
// Linux 6.18 with Node 20 readers, also without the agent in the path). The copy then forwards a FIN,
// so the other side gets a clean close. Reading SO_ERROR at end of file did not catch these cases.

import http2 from "node:http2";
import type net from "node:net";
import type { Duplex } from "node:stream";
import { AgentError } from "../errors";
import type { BufferedBytes } from "./buffered-bytes";
import { unackedBytesOf } from "./tcp";

const { NGHTTP2_NO_ERROR, NGHTTP2_CANCEL } = http2.constants;

/** One half of a proxied connection. */
export interface CopyEndpoint {
  /** Names the endpoint in errors: "client", "application", "tunnel". */
  readonly name: string;
  readonly duplex: Duplex;
  /** Aborts the endpoint so that its remote side receives a reset. */
  reset(): void;
  /**
   * Tells, once the endpoint closed, whether it closed normally rather than by an abort. `error` is
   * the first error it emitted, `ended` whether its readable side ended.
   */
  closedNormally(error: unknown, ended: boolean): boolean;
  /**
   * Bytes written to the endpoint's socket that its peer has not acknowledged yet, or undefined
   * when the endpoint cannot measure it. The idle timeout reads it to see bytes move inside the kernel.
   */
  unackedBytes?(): number | undefined;
  /**
   * Returns whether the endpoint waits for its HTTP/2 peer. It does when bytes written to it wait
   * for the peer's flow-control window (queued on the stream, or a write not yet completed), or
   * when its writable side ended and its readable side waits for the peer's response. Only HTTP/2
   * streams have it.
   */
  awaitsPeer?(): boolean;
}

/**
 * Byte counts of a copy in progress, updated in place as chunks pass, so that the owner of a
 * connection can read them while bytes flow.
 */
export interface ByteCounters {
  /** Bytes read from the first endpoint and written to the second. */
  bytesForward: number;
  /** Bytes read from the second endpoint and written to the first. */
  bytesBackward: number;
}

/** Limits that a copy enforces while it runs. */
export interface CopyLimits {
  /**
   * Time in ms without a byte read or written in either direction, after which both endpoints
   * are reset (IDLE_TIMEOUT). 0 turns it off.
   */
  idleTimeoutMs: number;
  /** The node-wide count to which the copy adds each chunk it writes until the write completes. */
  buffered?: BufferedBytes;
}

export interface CopyResult {
  /** Bytes read from the first endpoint and written to the second. */
  bytesForward: number;
  /** Bytes read from the second endpoint and written to the first. */
  bytesBackward: number;
  /** The first abort or error on either endpoint; absent when both closed normally. */
  error?: AgentError;
}

/**
 * A TCP socket as one half of a copy. Half-open is enabled so that a FIN closes one direction only.
 * Endpoints are classes fed by the copy's listeners, so an open connection keeps no closures here.
 */
class TcpEndpoint implements CopyEndpoint {
  #aborted = false;

  constructor(
    readonly name: string,
    readonly duplex: net.Socket,
  ) {
    duplex.allowHalfOpen = true;
  }

  reset(): void {
    this.#aborted = true;
    if (!this.duplex.destroyed) resetSocket(this.duplex);
  }

  closedNormally(error: unknown, ended: boolean): boolean {
    return !this.#aborted && error === undefined && ended;
  }

  unackedBytes(): number | undefined {
    return unackedBytesOf(this.duplex);
  }
}

/** An HTTP/2 stream that carries a CONNECT tunnel, as one half of a copy. */
class StreamEndpoint implements CopyEndpoint {
  #aborted = false;

  constructor(
    readonly name: string,
    readonly duplex: http2.Http2Stream,
  ) {}

  reset(): void {
    this.#aborted = true;
    if (!this.duplex.destroyed) {
      // RFC 9113 section 8.5 specifies CONNECT_ERROR, but Node's close(code) first ends the writable
      // side, and once that END_STREAM completes the stream the peer ignores the RST_STREAM behind it.
      // destroy(error) sends RST_STREAM INTERNAL_ERROR at once, which peers also read as an abort.
      this.duplex.destroy(new AgentError("STREAM_RESET", `the ${this.name} stream was aborted because its other half failed`));
    }
  }

  closedNormally(error: unknown): boolean {
    // Node reports every RST_STREAM as an error; NO_ERROR and CANCEL are a normal end here.
    const rstCode = this.duplex.rstCode;
    const errorIsEnd = error === undefined || ((error as NodeJS.ErrnoException).code === "ERR_HTTP2_STREAM_ERROR" && isEndOfStreamCode(rstCode));
    return !this.#aborted && errorIsEnd && isEndOfStreamCode(rstCode);
  }

  awaitsPeer(): boolean {
    // bufferSize counts the stream's writable buffer and the bytes handed to nghttp2 and not yet sent.
    const stream = this.duplex;
    return stream.bufferSize > 0 || (stream.writableEnded && !stream.readableEnded);
  }
}

/** Wraps a TCP socket. Half-open is enabled so that a FIN closes one direction only. */
export function tcpEndpoint(name: string, socket: net.Socket): CopyEndpoint {
  return new TcpEndpoint(name, socket);
}

/** Wraps an HTTP/2 stream that carries a CONNECT tunnel. */
export function streamEndpoint(name: string, stream: http2.Http2Stream): CopyEndpoint {
  return new StreamEndpoint(name, stream);
}

/** Sends a TCP RST when the socket has a handle, and destroys it otherwise. */
export function resetSocket(socket: net.Socket): void {
  if (socket.destroyed) {
    return;
  }
  // On Node 20, resetAndDestroy() while an end() is still being flushed fails with EINVAL and never
  // emits "close", which leaks the descriptor and stalls the copy. Destroy such a socket instead.
  if (socket.writableEnded && !socket.writableFinished) {
    socket.destroy();
    return;
  }
  try {
    socket.resetAndDestroy();
  } catch {
    // resetAndDestroy throws on a socket that is not a connected TCP socket.
    socket.destroy();
  }
}

/**
 * Copies bytes both ways between `first` and `second` until both closed, with byte counts.
 * `counters` is added to as chunks pass, so its owner can read the bytes of an open connection.
 * `limits` adds the idle timeout and the node-wide buffered bytes count. Resolves, never rejects:
 * failures come back as CopyResult.error, IDLE_TIMEOUT among them.
 */
export function copyBidirectional(
  first: CopyEndpoint,
  second: CopyEndpoint,
  counters: ByteCounters = { bytesForward: 0, bytesBackward: 0 },
  limits?: CopyLimits,
): Promise<CopyResult> {
  let error: AgentError | undefined;
  const copy: CopyState = {
    counters,
    closedByCopy: new Set(),
    recordError: (endpoint, cause) => {
      error ??= new AgentError("STREAM_RESET", describeAbort(endpoint, cause), { cause });
    },
    lastActivity: 0,
  };
  const idleTimer = limits && limits.idleTimeoutMs > 0 ? new IdleTimer(copy, limits.idleTimeoutMs, first, second, (idle) => (error ??= idle)) : undefined;
  const forwardWrites = limits ? new PendingWrites(copy, limits.buffered) : undefined;
  const backwardWrites = limits ? new PendingWrites(copy, limits.buffered) : undefined;

  return new Promise((resolve) => {
    let open = 2;
    const onClosed = (): void => {
      open -= 1;
      if (open === 0) {
        idleTimer?.stop();
        forwardWrites?.close();
        backwardWrites?.close();
        const result: CopyResult = { bytesForward: counters.bytesForward, bytesBackward: counters.bytesBackward };
        if (error !== undefined) result.error = error;
        resolve(result);
      }
    };
    forwardOneWay(first, second, true, copy, onClosed, forwardWrites);
    forwardOneWay(second, first, false, copy, onClosed, backwardWrites);
  });
}

/**
 * Resets both endpoints of a copy once no byte moved for `timeoutMs`. One timer per copy: each
 * chunk read and each write completed only stamps the time, and the timer, when it fires early,
 * waits for the rest.
 *
 * A TCP socket whose send buffer is full takes more bytes only after about a third of it
 * drained, which on a fast link is megabytes. So a slow reader can take bytes for longer than
 * the timeout without a write completing. Each time the timer fires, it therefore also reads how
 * many bytes each TCP endpoint's peer has not acknowledged yet: a count that changed since the
 * previous firing means bytes moved in the kernel. A reader that stopped reading keeps that count
 * still and is reset after one to two timeouts.
 *
 * An HTTP/2 stream reports nothing of the kind. The peer's agent grants flow-control window in
 * bursts, after its application took half a window, which at a slow reader can take longer than
 * the timeout. After the last write, the peer may keep a window of bytes for its reader. So while
 * a stream endpoint waits for its peer (bytes waiting for window, or its writable side ended and
 * its readable side still open) and no TCP endpoint of the copy keeps bytes for its reader, this
 * node leaves the decision to the other node's copy. That copy sees its application take bytes or
 * stall, and resets the stream when it stalls, which ends this copy too. A copy that keeps bytes
 * for its own TCP reader is judged here, so two copies stalled both ways do not wait for each
 * other. A stream whose writable side is open and has nothing queued gives no such hint: a sender
 * that stops without ending, while the peer still keeps bytes for a slow reader, is judged here.
 */
class IdleTimer {
  #timer: NodeJS.Timeout;
  #unacked: [number | undefined, number | undefined];

  constructor(
    private readonly copy: CopyState,
    private readonly timeoutMs: number,
    private readonly first: CopyEndpoint,
    private readonly second: CopyEndpoint,
    private readonly onIdle: (error: AgentError) => void,
  ) {
    copy.lastActivity = Date.now();
    this.#unacked = this.#readUnacked();
    this.#timer = setTimeout(() => this.#check(), timeoutMs);
    this.#timer.unref();
  }

  stop(): void {
    clearTimeout(this.#timer);
  }

  #check(): void {
    const now = Date.now();
    if (this.#kernelMoved()) this.copy.lastActivity = now;
    if (this.#peerDecides()) this.copy.lastActivity = now;
    const idleMs = now - this.copy.lastActivity;
    if (idleMs < this.timeoutMs) {
      this.#timer = setTimeout(() => this.#check(), this.timeoutMs - idleMs);
      this.#timer.unref();
      return;
    }
    this.onIdle(new AgentError("IDLE_TIMEOUT", `no byte moved in either direction, read or written, for ${this.timeoutMs / 1000} s, the idle timeout (--idle-timeout), so the agent closed the connection`));
    this.first.reset();
    this.second.reset();
  }

  /** Returns whether an endpoint's count of unacknowledged bytes changed since the previous firing. */
  #kernelMoved(): boolean {
    const previous = this.#unacked;
    this.#unacked = this.#readUnacked();
    return this.#unacked.some((bytes, index) => bytes !== undefined && previous[index] !== undefined && bytes !== previous[index]);
  }

  /**
   * Returns whether a stream endpoint waits for its peer while no TCP endpoint contains bytes for
   * its reader, unsent or unacknowledged. It reads the counts of the current firing.
   */
  #peerDecides(): boolean {
    const endpoints = [this.first, this.second];
    if (!endpoints.some((endpoint) => endpoint.awaitsPeer?.() === true)) return false;
    const holding = endpoints.some((endpoint, index) => endpoint.awaitsPeer === undefined && (endpoint.duplex.writableLength > 0 || (this.#unacked[index] ?? 0) > 0));
    return !holding;
  }

  #readUnacked(): [number | undefined, number | undefined] {
    return [this.first.unackedBytes?.(), this.second.unackedBytes?.()];
  }
}

/**
 * The chunks one direction of a copy has written and the target has not yet flushed. Each write
 * that completes stamps the copy's activity for the idle timeout, and with `buffered` the chunks
 * are counted in the node-wide BufferedBytes. Write callbacks of a stream run in write order, so
 * each one removes the oldest length.
 */
class PendingWrites {
  readonly #lengths: number[] = [];
  #bytes = 0;
  #closed = false;

  constructor(
    private readonly copy: CopyState,
    private readonly buffered: BufferedBytes | undefined,
  ) {}

  add(length: number): void {
    if (this.buffered === undefined) return;
    this.#lengths.push(length);
    this.#bytes += length;
    this.buffered.add(length);
  }

  /** The write callback: the oldest chunk was flushed, or failed with its stream. */
  readonly written = (): void => {
    if (this.#closed) return;
    this.copy.lastActivity = Date.now();
    if (this.buffered === undefined) return;
    const length = this.#lengths.shift() ?? 0;
    this.#bytes -= length;
    this.buffered.subtract(length);
  };

  /** Removes what is still counted once the copy ended, so later callbacks do nothing. */
  close(): void {
    this.buffered?.subtract(this.#bytes);
    this.#bytes = 0;
    this.#lengths.length = 0;
    this.#closed = true;
  }
}

/** State shared by the two directions of one copy. */
interface CopyState {
  counters: ByteCounters;
  /** Endpoints the copy itself closed after their other half closed; their close is not an abort. */
  closedByCopy: Set<CopyEndpoint>;
  recordError(endpoint: CopyEndpoint, error: unknown): void;
  /** Date.now() of the latest chunk read or write completed in either direction, which the idle timeout reads. */
  lastActivity: number;
}

/**
 * Forwards source into target with backpressure, and propagates the source's end and close to the
 * target. A hand-written loop rather than stream.pipe(): pipe() keeps nine closures per direction
 * for the life of the connection, which is most of what an idle tunnel costs in memory.
 */
function forwardOneWay(
  source: CopyEndpoint,
  target: CopyEndpoint,
  forward: boolean,
  copy: CopyState,
  onClosed: () => void,
  pendingWrites: PendingWrites | undefined,
): void {
  let lastError: unknown;
  let sourceEnded = false;
  const input = source.duplex;
  const output = target.duplex;
  input.on("error", (error) => (lastError ??= error));
  input.on("data", (chunk: Buffer) => {
    if (forward) copy.counters.bytesForward += chunk.length;
    else copy.counters.bytesBackward += chunk.length;
    copy.lastActivity = Date.now();
    // A target that is gone takes nothing more; its close event settles the copy.
    if (output.destroyed || output.writableEnded) return;
    let flowing: boolean;
    if (pendingWrites === undefined) {
      flowing = output.write(chunk);
    } else {
      pendingWrites.add(chunk.length);
      flowing = output.write(chunk, pendingWrites.written);
    }
    if (!flowing && !input.isPaused()) {
      input.pause();
      output.once("drain", () => input.resume());
    }
  });
  input.resume();
  source.duplex.once("end", () => {
    sourceEnded = true;
    endWritable(target.duplex);
  });
  source.duplex.once("close", () => {
    if (source.closedNormally(lastError, sourceEnded) || (copy.closedByCopy.has(source) && lastError === undefined)) {
      finishAfterNormalClose(target, sourceEnded, copy);
    } else {
      copy.recordError(source, lastError);
      target.reset();
    }
    onClosed();
  });
}

/**
 * After the source closed normally, ends the target's writable side. A source that closed without
 * its readable side ending (RST_STREAM NO_ERROR or CANCEL before END_STREAM) counts as end of stream.
 */
function finishAfterNormalClose(target: CopyEndpoint, sourceEnded: boolean, copy: CopyState): void {
  if (!sourceEnded) {
    endWritable(target.duplex);
  }
  // The closed source takes no more bytes, so the target's remaining input has nowhere to go:
  // close the target once its output is flushed instead of stalling on a pipe that never drains.
  const duplex = target.duplex;
  if (!duplex.readableEnded && !duplex.destroyed) {
    copy.closedByCopy.add(target);
    if (duplex.writableFinished) {
      duplex.destroy();
    } else {
      duplex.once("finish", () => duplex.destroy());
    }
  }
}

function endWritable(duplex: Duplex): void {
  if (!duplex.destroyed && !duplex.writableEnded) {
    duplex.end();
  }
}

function isEndOfStreamCode(code: number | undefined): boolean {
  return code === undefined || code === NGHTTP2_NO_ERROR || code === NGHTTP2_CANCEL;
}

function describeAbort(endpoint: CopyEndpoint, error: unknown): string {
  if (endpoint.duplex instanceof Object && "rstCode" in endpoint.duplex) {
    const rstCode = (endpoint.duplex as http2.Http2Stream).rstCode;
    return `the ${endpoint.name} stream was reset (RST_STREAM code ${rstCode}${error ? `, ${errorText(error)}` : ""})`;
  }
  return `the ${endpoint.name} connection was reset or aborted${error ? ` (${errorText(error)})` : ""}`;
}

function errorText(error: unknown): string {
  const { code, message } = error as NodeJS.ErrnoException;
  return code ? `${code}: ${message}` : String(message ?? error);
}
