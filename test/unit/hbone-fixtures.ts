// Fixtures for driving the inbound HBONE server by hand: a server pod on 127.77.<subnet>.2 with any
// server option overridden, a raw HTTP/2 client session from 127.77.<subnet>.1 with the client
// settings and certificate the outbound proxy uses, a log capture, and streaming payload helpers.

import crypto from "node:crypto";
import http2 from "node:http2";
import net from "node:net";
import { Writable } from "node:stream";
import tls from "node:tls";
import type { ExecutionContext } from "ava";
import pino from "pino";
import { CertManager } from "../../agent/identity/cert-manager";
import type { EmbeddedCa } from "../../agent/identity/ca";
import { silentLogger, type Logger } from "../../agent/log";
import { CLIENT_SETTINGS, CONNECTION_WINDOW_BYTES, HBONE_PORT, MAX_SESSION_MEMORY_MB } from "../../agent/proxy/hbone";
import { InboundHboneServer, type InboundHboneServerOptions } from "../../agent/proxy/inbound";
import type { RbacConnection } from "../../agent/rbac/types";
import type { Identity, Workload } from "../../agent/state/types";
import { ALLOW_ALL, LoopbackPodNetwork, MemorySink, TRUST_DOMAIN, createCa, identity, workload } from "./proxy-fixtures";

/** Pino output captured as parsed JSON lines. */
export class LogCapture {
  readonly lines: Record<string, unknown>[] = [];
  readonly logger: Logger;

  constructor() {
    const lines = this.lines;
    const stream = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        for (const line of chunk.toString().split("\n")) {
          if (line.trim() !== "") lines.push(JSON.parse(line) as Record<string, unknown>);
        }
        callback();
      },
    });
    this.logger = pino({ level: "debug" }, stream);
  }

  /** Returns the lines whose msg equals `message`. */
  withMessage(message: string): Record<string, unknown>[] {
    return this.lines.filter((line) => line.msg === message);
  }
}

export interface InboundPod {
  clientIp: string;
  serverIp: string;
  ca: EmbeddedCa;
  certs: CertManager;
  clientIdentity: Identity;
  serverIdentity: Identity;
  clientWorkload: Workload;
  serverWorkload: Workload;
  audit: MemorySink;
  server: InboundHboneServer;
  authorizations: RbacConnection[];
}

/** Starts the inbound HBONE server of a pod on 127.77.<subnet>.2; `overrides` replace any option. */
export async function startInboundPod(
  t: ExecutionContext,
  subnet: number,
  overrides: Partial<InboundHboneServerOptions> = {},
): Promise<InboundPod> {
  const clientIp = `127.77.${subnet}.1`;
  const serverIp = `127.77.${subnet}.2`;
  const ca = await createCa(t);
  const certs = new CertManager(ca, silentLogger());
  t.teardown(() => certs.close());

  const clientWorkload = workload("sleep", "default", "sleep", clientIp);
  const serverWorkload = workload("echo", "apps", "echo", serverIp);
  const audit = new MemorySink();
  const authorizations: RbacConnection[] = [];

  const server = new InboundHboneServer({
    node: "node-2",
    workload: serverWorkload,
    identity: identity("apps", "echo"),
    network: new LoopbackPodNetwork(serverIp),
    certs,
    trustDomain: TRUST_DOMAIN,
    authorize: (connection) => {
      authorizations.push(connection);
      return ALLOW_ALL;
    },
    lookupSource: (ip) => (ip === clientIp ? clientWorkload : undefined),
    audit,
    logger: silentLogger(),
    ...overrides,
  });
  await server.start();
  t.teardown(() => server.stop());

  return {
    clientIp,
    serverIp,
    ca,
    certs,
    clientIdentity: identity("default", "sleep"),
    serverIdentity: identity("apps", "echo"),
    clientWorkload,
    serverWorkload,
    audit,
    server,
    authorizations,
  };
}

/**
 * Opens an HBONE connection to the pod's port 15008 with the client's certificate and the HTTP/2
 * settings and connection window of the outbound proxy. The test's teardown destroys it.
 */
export async function openClientSession(
  t: ExecutionContext,
  pod: InboundPod,
  settings: http2.Settings = CLIENT_SETTINGS,
): Promise<http2.ClientHttp2Session> {
  const certificate = await pod.certs.get(pod.clientIdentity);
  const socket = tls.connect({
    socket: net.connect({ host: pod.serverIp, port: HBONE_PORT, localAddress: pod.clientIp }),
    secureContext: certificate.secureContext,
    ALPNProtocols: ["h2"],
    servername: "",
    checkServerIdentity: () => undefined,
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("secureConnect", resolve);
    socket.once("error", reject);
  });
  const session = http2.connect(`https://${pod.serverIp}:${HBONE_PORT}`, {
    createConnection: () => socket,
    settings,
    maxSessionMemory: MAX_SESSION_MEMORY_MB,
  });
  session.on("error", () => undefined);
  await new Promise<void>((resolve, reject) => {
    session.once("connect", () => resolve());
    session.once("error", reject);
  });
  session.setLocalWindowSize(CONNECTION_WINDOW_BYTES);
  t.teardown(() => session.destroy());
  return session;
}

/** Sends a CONNECT to `authority` and resolves with the stream once the server responded 200. */
export function openTunnel(
  session: http2.ClientHttp2Session,
  authority: string,
  extraHeaders: http2.OutgoingHttpHeaders = {},
): Promise<http2.ClientHttp2Stream> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ":method": "CONNECT", ":authority": authority, ...extraHeaders }, { endStream: false });
    stream.on("error", () => undefined);
    stream.once("response", (headers) => {
      const status = Number(headers[":status"]);
      if (status === 200) {
        resolve(stream);
      } else {
        reject(new Error(`CONNECT to ${authority} got status ${status}`));
      }
    });
    stream.once("close", () => reject(new Error(`CONNECT to ${authority} closed with RST_STREAM code ${stream.rstCode}`)));
  });
}

/** Resolves after `ms` milliseconds. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A deterministic byte source: AES-128-CTR keystream, fast enough to feed a gigabyte transfer. */
export class PatternSource {
  readonly #cipher: crypto.Cipher;
  readonly #zeros: Buffer;

  constructor(seed: number, chunkBytes = 256 << 10) {
    const key = crypto.createHash("sha256").update(`pattern ${seed}`).digest().subarray(0, 16);
    this.#cipher = crypto.createCipheriv("aes-128-ctr", key, Buffer.alloc(16));
    this.#zeros = Buffer.alloc(chunkBytes);
  }

  /** Returns the next `bytes` bytes of the stream, at most the chunk size given to the constructor. */
  next(bytes: number): Buffer {
    return this.#cipher.update(this.#zeros.subarray(0, bytes));
  }
}

/** Reads a stream to its end and resolves with the byte count and sha256, or rejects on error. */
export function hashUntilEnd(stream: NodeJS.ReadableStream): Promise<{ bytes: number; sha256: string }> {
  return new Promise((resolve, reject) => {
    const hash = crypto.createHash("sha256");
    let bytes = 0;
    stream.on("data", (chunk: Buffer) => {
      bytes += chunk.length;
      hash.update(chunk);
    });
    stream.once("end", () => resolve({ bytes, sha256: hash.digest("hex") }));
    stream.once("error", reject);
  });
}

/** HTTP/2 frame types and flags that RawHboneClient uses (RFC 9113 section 6). */
const FRAME = { DATA: 0x0, HEADERS: 0x1, RST_STREAM: 0x3, SETTINGS: 0x4, GOAWAY: 0x7 } as const;
const FLAG_END_STREAM = 0x1;
const FLAG_ACK = 0x1;
const FLAG_END_HEADERS = 0x4;
const CONNECTION_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/**
 * An HTTP/2 client that writes frames itself over mutual TLS, so that a test can send frame sequences
 * Node's client never sends, such as RST_STREAM NO_ERROR without a preceding END_STREAM.
 */
export class RawHboneClient {
  readonly #socket: tls.TLSSocket;
  #input = Buffer.alloc(0);
  readonly #responses = new Map<number, (firstHeaderByte: number) => void>();
  /** RST_STREAM codes the server sent, by stream id. */
  readonly resets = new Map<number, number>();
  /** DATA payload bytes the server sent, by stream id. */
  readonly #received = new Map<number, Buffer>();

  private constructor(socket: tls.TLSSocket) {
    this.#socket = socket;
    socket.on("data", (chunk: Buffer) => this.#receive(chunk));
    socket.on("error", () => undefined);
  }

  /** Connects to the pod's port 15008 with the client's certificate and sends the preface and SETTINGS. */
  static async connect(t: ExecutionContext, pod: InboundPod): Promise<RawHboneClient> {
    const certificate = await pod.certs.get(pod.clientIdentity);
    const socket = tls.connect({
      socket: net.connect({ host: pod.serverIp, port: HBONE_PORT, localAddress: pod.clientIp }),
      secureContext: certificate.secureContext,
      ALPNProtocols: ["h2"],
      servername: "",
      checkServerIdentity: () => undefined,
    });
    t.teardown(() => socket.destroy());
    await new Promise<void>((resolve, reject) => {
      socket.once("secureConnect", resolve);
      socket.once("error", reject);
    });
    const client = new RawHboneClient(socket);
    socket.write(Buffer.concat([CONNECTION_PREFACE, frame(FRAME.SETTINGS, 0, 0, Buffer.alloc(0))]));
    return client;
  }

  /**
   * Sends a CONNECT on `streamId` and resolves with the response status. Only 200 is decoded (HPACK
   * static index 8); any other response resolves as undefined.
   */
  connect(streamId: number, authority: string): Promise<number | undefined> {
    const block = Buffer.concat([literalWithIndexedName(2, "CONNECT"), literalWithIndexedName(1, authority)]);
    const response = new Promise<number | undefined>((resolve) => {
      this.#responses.set(streamId, (firstByte) => resolve(firstByte === 0x88 ? 200 : undefined));
    });
    this.#socket.write(frame(FRAME.HEADERS, FLAG_END_HEADERS, streamId, block));
    return response;
  }

  /** Waits until the server sent at least `bytes` bytes of DATA on `streamId`, and returns them all. */
  async receivedData(streamId: number, bytes: number, timeoutMs = 5_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while ((this.#received.get(streamId)?.length ?? 0) < bytes) {
      if (Date.now() > deadline) {
        throw new Error(`stream ${streamId} received ${this.#received.get(streamId)?.length ?? 0} of ${bytes} bytes within ${timeoutMs} ms`);
      }
      await delay(10);
    }
    return this.#received.get(streamId)!;
  }

  sendData(streamId: number, payload: Buffer, endStream = false): void {
    this.#socket.write(frame(FRAME.DATA, endStream ? FLAG_END_STREAM : 0, streamId, payload));
  }

  sendRstStream(streamId: number, code: number): void {
    const payload = Buffer.alloc(4);
    payload.writeUInt32BE(code);
    this.#socket.write(frame(FRAME.RST_STREAM, 0, streamId, payload));
  }

  #receive(chunk: Buffer): void {
    this.#input = Buffer.concat([this.#input, chunk]);
    while (this.#input.length >= 9) {
      const length = this.#input.readUIntBE(0, 3);
      if (this.#input.length < 9 + length) {
        return;
      }
      const type = this.#input[3];
      const flags = this.#input[4];
      const streamId = this.#input.readUInt32BE(5) & 0x7fffffff;
      const payload = this.#input.subarray(9, 9 + length);
      this.#input = this.#input.subarray(9 + length);
      if (type === FRAME.SETTINGS && !(flags & FLAG_ACK)) {
        this.#socket.write(frame(FRAME.SETTINGS, FLAG_ACK, 0, Buffer.alloc(0)));
      } else if (type === FRAME.HEADERS) {
        this.#responses.get(streamId)?.(payload[0]);
        this.#responses.delete(streamId);
      } else if (type === FRAME.DATA) {
        this.#received.set(streamId, Buffer.concat([this.#received.get(streamId) ?? Buffer.alloc(0), payload]));
      } else if (type === FRAME.RST_STREAM) {
        this.resets.set(streamId, payload.readUInt32BE(0));
      }
    }
  }
}

function frame(type: number, flags: number, streamId: number, payload: Buffer): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(payload.length, 0, 3);
  header[3] = type;
  header[4] = flags;
  header.writeUInt32BE(streamId, 5);
  return Buffer.concat([header, payload]);
}

/** HPACK literal header field without indexing, name from the static table, value without Huffman coding. */
function literalWithIndexedName(staticIndex: number, value: string): Buffer {
  const bytes = Buffer.from(value);
  if (staticIndex > 14 || bytes.length > 126) {
    throw new Error("literalWithIndexedName supports static indexes below 15 and values below 127 bytes");
  }
  return Buffer.concat([Buffer.from([staticIndex, bytes.length]), bytes]);
}
