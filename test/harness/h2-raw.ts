// A raw HTTP/2 client for abuse tests. It writes any frame, valid or not, over a plain TCP socket or
// over TLS with a client certificate, and collects every frame the server sends back. Frames follow
// RFC 9113 section 4, and header blocks are HPACK literals without Huffman coding (RFC 7541 section
// 6.2.2). It keeps no protocol state: no flow control, no SETTINGS acknowledgement unless asked, no
// stream bookkeeping.

import net from "node:net";
import tls from "node:tls";
import { netnsSocket } from "../../agent/capture/native";

/** HTTP/2 frame types (RFC 9113 section 6). */
export const FrameType = {
  DATA: 0x0,
  HEADERS: 0x1,
  PRIORITY: 0x2,
  RST_STREAM: 0x3,
  SETTINGS: 0x4,
  PUSH_PROMISE: 0x5,
  PING: 0x6,
  GOAWAY: 0x7,
  WINDOW_UPDATE: 0x8,
  CONTINUATION: 0x9,
} as const;

/** Frame flags. ACK shares its bit with END_STREAM, on SETTINGS and PING only. */
export const FrameFlag = { END_STREAM: 0x1, ACK: 0x1, END_HEADERS: 0x4, PADDED: 0x8, PRIORITY: 0x20 } as const;

/** HTTP/2 error codes (RFC 9113 section 7). */
export const H2Error = {
  NO_ERROR: 0x0,
  PROTOCOL_ERROR: 0x1,
  INTERNAL_ERROR: 0x2,
  FLOW_CONTROL_ERROR: 0x3,
  SETTINGS_TIMEOUT: 0x4,
  STREAM_CLOSED: 0x5,
  FRAME_SIZE_ERROR: 0x6,
  REFUSED_STREAM: 0x7,
  CANCEL: 0x8,
  COMPRESSION_ERROR: 0x9,
  CONNECT_ERROR: 0xa,
  ENHANCE_YOUR_CALM: 0xb,
  INADEQUATE_SECURITY: 0xc,
  HTTP_1_1_REQUIRED: 0xd,
} as const;

/** SETTINGS parameter ids. */
export const Setting = {
  HEADER_TABLE_SIZE: 0x1,
  ENABLE_PUSH: 0x2,
  MAX_CONCURRENT_STREAMS: 0x3,
  INITIAL_WINDOW_SIZE: 0x4,
  MAX_FRAME_SIZE: 0x5,
  MAX_HEADER_LIST_SIZE: 0x6,
} as const;

/** The client connection preface (RFC 9113 section 3.4). */
export const CLIENT_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/** One frame read from the server. */
export interface Frame {
  type: number;
  flags: number;
  streamId: number;
  payload: Buffer;
}

/** Where and how a raw client connects. */
export interface RawH2Target {
  host: string;
  port: number;
  /** A network namespace to make the socket in (a path under /var/run/netns); this process's own when absent. */
  netnsPath?: string;
  /** TLS 1.3 with ALPN h2 when given; plain TCP when absent. */
  tls?: { certPem: string; keyPem: string; caPem: string };
}

/** Encodes an HPACK integer with an N-bit prefix (RFC 7541 section 5.1); `first` contains the bits above the prefix. */
export function encodeHpackInteger(value: number, prefixBits: number, first = 0): Buffer {
  const max = (1 << prefixBits) - 1;
  if (value < max) return Buffer.from([first | value]);
  const bytes = [first | max];
  let rest = value - max;
  while (rest >= 128) {
    bytes.push((rest % 128) + 128);
    rest = Math.floor(rest / 128);
  }
  bytes.push(rest);
  return Buffer.from(bytes);
}

/** Encodes an HPACK string literal without Huffman coding. */
function encodeHpackString(text: string): Buffer {
  const bytes = Buffer.from(text, "latin1");
  return Buffer.concat([encodeHpackInteger(bytes.length, 7), bytes]);
}

/**
 * Encodes a header block of "literal header field without indexing, new name" entries only, so
 * the server's dynamic table never changes and any block can be cut anywhere into CONTINUATIONs.
 */
export function encodeHeaderBlock(headers: ReadonlyArray<readonly [string, string]>): Buffer {
  return Buffer.concat(headers.flatMap(([name, value]) => [Buffer.from([0x00]), encodeHpackString(name), encodeHpackString(value)]));
}

/** Builds one frame: the 9-byte header (24-bit length, type, flags, 31-bit stream id) and its payload. */
export function buildFrame(type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(payload.length, 0, 3);
  header.writeUInt8(type, 3);
  header.writeUInt8(flags, 4);
  header.writeUInt32BE(streamId & 0x7fffffff, 5);
  return Buffer.concat([header, payload]);
}

/** Builds a SETTINGS frame; an ACK has no parameters. */
export function settingsFrame(parameters: ReadonlyArray<readonly [number, number]> = [], ack = false): Buffer {
  const payload = Buffer.alloc(parameters.length * 6);
  parameters.forEach(([id, value], index) => {
    payload.writeUInt16BE(id, index * 6);
    payload.writeUInt32BE(value, index * 6 + 2);
  });
  return buildFrame(FrameType.SETTINGS, ack ? FrameFlag.ACK : 0, 0, payload);
}

/** Builds a PING frame with 8 bytes of opaque data. */
export function pingFrame(data: Buffer = Buffer.alloc(8), ack = false): Buffer {
  return buildFrame(FrameType.PING, ack ? FrameFlag.ACK : 0, 0, data.subarray(0, 8));
}

/** Builds a HEADERS frame carrying `block`; END_HEADERS unless `endHeaders` is false. */
export function headersFrame(streamId: number, block: Buffer, options: { endStream?: boolean; endHeaders?: boolean } = {}): Buffer {
  const flags = (options.endStream ? FrameFlag.END_STREAM : 0) | (options.endHeaders === false ? 0 : FrameFlag.END_HEADERS);
  return buildFrame(FrameType.HEADERS, flags, streamId, block);
}

/** Builds a CONTINUATION frame. */
export function continuationFrame(streamId: number, block: Buffer, endHeaders = false): Buffer {
  return buildFrame(FrameType.CONTINUATION, endHeaders ? FrameFlag.END_HEADERS : 0, streamId, block);
}

/** Builds a RST_STREAM frame. */
export function rstStreamFrame(streamId: number, code: number): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(code);
  return buildFrame(FrameType.RST_STREAM, 0, streamId, payload);
}

/** Builds a WINDOW_UPDATE frame; stream 0 is the connection window. */
export function windowUpdateFrame(streamId: number, increment: number): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(increment & 0x7fffffff);
  return buildFrame(FrameType.WINDOW_UPDATE, 0, streamId, payload);
}

/** Builds a DATA frame. */
export function dataFrame(streamId: number, data: Buffer, endStream = false): Buffer {
  return buildFrame(FrameType.DATA, endStream ? FrameFlag.END_STREAM : 0, streamId, data);
}

/** Builds a GOAWAY frame. */
export function goawayFrame(lastStreamId: number, code: number): Buffer {
  const payload = Buffer.alloc(8);
  payload.writeUInt32BE(lastStreamId & 0x7fffffff);
  payload.writeUInt32BE(code, 4);
  return buildFrame(FrameType.GOAWAY, 0, 0, payload);
}

/** Builds the header block of an HBONE CONNECT request to `authority`. */
export function connectHeaderBlock(authority: string, extra: ReadonlyArray<readonly [string, string]> = []): Buffer {
  return encodeHeaderBlock([[":method", "CONNECT"], [":authority", authority], ...extra]);
}

/** Returns the error code of a RST_STREAM or GOAWAY frame. */
export function errorCodeOf(frame: Frame): number {
  return frame.type === FrameType.GOAWAY ? frame.payload.readUInt32BE(4) : frame.payload.readUInt32BE(0);
}

/** A connection that writes raw bytes and frames and collects the frames it reads. */
export class RawH2Connection {
  /** Every frame read so far, in order. */
  readonly frames: Frame[] = [];
  /** Resolves when the socket closed, with the error that closed it if any. */
  readonly closed: Promise<Error | undefined>;
  #buffer: Buffer = Buffer.alloc(0);
  #waiters = new Set<() => void>();
  #isClosed = false;

  private constructor(readonly socket: net.Socket) {
    this.closed = new Promise((resolve) => {
      let failure: Error | undefined;
      socket.on("error", (error) => (failure = error));
      socket.on("close", () => {
        this.#isClosed = true;
        this.#wake();
        resolve(failure);
      });
    });
    socket.on("data", (chunk: Buffer) => this.#read(chunk));
  }

  /** Opens a connection with openSocket() and starts reading frames from it. */
  static async open(target: RawH2Target): Promise<RawH2Connection> {
    return new RawH2Connection(await openSocket(target));
  }

  /** Opens a plain TCP connection only, to write bytes that are not TLS. */
  static async openTcp(target: Omit<RawH2Target, "tls">): Promise<RawH2Connection> {
    return RawH2Connection.open({ ...target, tls: undefined });
  }

  /** Tells whether the socket closed. */
  get isClosed(): boolean {
    return this.#isClosed;
  }

  /** Writes bytes as they are; a write after the server closed is ignored. */
  write(...chunks: Buffer[]): void {
    if (this.#isClosed || this.socket.destroyed) return;
    this.socket.write(Buffer.concat(chunks));
  }

  /** Writes the client preface and a SETTINGS frame with `parameters`. */
  start(parameters: ReadonlyArray<readonly [number, number]> = []): void {
    this.write(CLIENT_PREFACE, settingsFrame(parameters));
  }

  /** Resolves with the first frame read (now or later) that satisfies `predicate`; rejects on close or timeout. */
  waitForFrame(predicate: (frame: Frame) => boolean, timeoutMs = 5_000, expected = "a frame"): Promise<Frame> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        const found = this.frames.find(predicate);
        if (found) return finish(() => resolve(found));
        if (this.#isClosed) finish(() => reject(new Error(`the connection closed before ${expected}; frames: ${this.describeFrames()}`)));
      };
      const timer = setTimeout(() => finish(() => reject(new Error(`no ${expected} within ${timeoutMs} ms; frames: ${this.describeFrames()}`))), timeoutMs);
      const finish = (settle: () => void): void => {
        clearTimeout(timer);
        this.#waiters.delete(check);
        settle();
      };
      this.#waiters.add(check);
      check();
    });
  }

  /** Resolves with the server's GOAWAY frame; rejects when none arrives before close or timeout. */
  waitForGoaway(timeoutMs = 5_000): Promise<Frame> {
    return this.waitForFrame((frame) => frame.type === FrameType.GOAWAY, timeoutMs, "GOAWAY");
  }

  /** Lists the frames read so far as type:stream:code, for failure messages. */
  describeFrames(): string {
    const names = Object.fromEntries(Object.entries(FrameType).map(([name, value]) => [value, name]));
    return this.frames
      .map((frame) => {
        const code = frame.type === FrameType.GOAWAY || frame.type === FrameType.RST_STREAM ? `:${errorCodeOf(frame)}` : "";
        return `${names[frame.type] ?? frame.type}:${frame.streamId}${code}`;
      })
      .join(" ");
  }

  /** Closes the connection at once. */
  destroy(): void {
    this.socket.destroy();
  }

  #read(chunk: Buffer): void {
    this.#buffer = this.#buffer.length === 0 ? chunk : Buffer.concat([this.#buffer, chunk]);
    while (this.#buffer.length >= 9) {
      const length = this.#buffer.readUIntBE(0, 3);
      if (this.#buffer.length < 9 + length) break;
      this.frames.push({
        type: this.#buffer.readUInt8(3),
        flags: this.#buffer.readUInt8(4),
        streamId: this.#buffer.readUInt32BE(5) & 0x7fffffff,
        payload: Buffer.from(this.#buffer.subarray(9, 9 + length)),
      });
      this.#buffer = this.#buffer.subarray(9 + length);
    }
    this.#wake();
  }

  #wake(): void {
    for (const check of [...this.#waiters]) check();
  }
}

/**
 * Opens a TCP connection, inside the target's namespace when it names one, and the TLS handshake
 * when `target.tls` is set; resolves once it is established. The TLS client checks the server's
 * chain against `caPem` but not its name. Also usable as the socket of Node's own HTTP/2 client.
 */
export async function openSocket(target: RawH2Target): Promise<net.Socket> {
  const tcp = target.netnsPath === undefined ? new net.Socket() : new net.Socket({ fd: netnsSocket(target.netnsPath, { agentSocket: false }) });
  tcp.connect(target.port, target.host);
  await settled(tcp, "connect");
  if (!target.tls) return tcp;
  // The TLS client starts its handshake on a connected socket only.
  const secure = tls.connect({
    socket: tcp,
    cert: target.tls.certPem,
    key: target.tls.keyPem,
    ca: target.tls.caPem,
    ALPNProtocols: ["h2"],
    minVersion: "TLSv1.3",
    checkServerIdentity: () => undefined,
  });
  await settled(secure, "secureConnect");
  return secure;
}

/** Resolves on `event`, rejects on the socket's first error before it. */
function settled(socket: net.Socket, event: string): Promise<void> {
  return new Promise((resolve, reject) => {
    socket.once(event, () => {
      socket.off("error", reject);
      resolve();
    });
    socket.once("error", reject);
  });
}
