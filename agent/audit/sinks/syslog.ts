// Ships audit records to a syslog receiver as RFC 5424 messages over TCP or TLS (RFC 5425), one
// octet-counted message per record (syslog-format.ts).
//
// How send() decides that a batch arrived: syslog over TCP and TLS has no acknowledgement by the
// receiving application, so the sink relies on two things.
//  1. Kernel acknowledgement. After writing a batch, send() polls the socket's send queue
//     (SIOCOUTQ) until it is empty, which means the receiver's kernel acknowledged every byte.
//     send() rejects when the write and the acknowledgement together take longer than
//     ackTimeoutMs, or when the connection breaks first. A receiver that reads nothing can keep a
//     large write from ever reaching the kernel, so the deadline starts before the write, and on
//     expiry the connection is destroyed.
//  2. Replay of recent records. A receiver that stops loses what is still unread in its socket
//     buffer or queued inside it, although its kernel acknowledged those bytes. The sink therefore
//     keeps the records first written during the last replayWindowMs. When the connection breaks
//     (closed, reset, failed write or timed out), those records are sent again first on the next
//     connection. A replayed record keeps the time of its first write, so a receiver that keeps
//     breaking connections gets it only during replayWindowMs after that. A receiver may get a
//     record twice. Both copies carry the same `id` in the structured data, and receivers drop the second.
// This covers a receiver that stops or restarts. It does not cover one that accepts a record and
// then loses it more than replayWindowMs later without closing the connection. RELP gives an
// acknowledgement per message for that case; rsyslog supports it, but this sink does not speak it.
//
// A broken connection is replaced on the next send(); send() rejects on every failure, so the
// pipeline resends the batch after its backoff.
//
// A message longer than maxMessageBytes is replaced by a stand-in (syslog-format.ts), because
// receivers cut longer frames and parse the rest as further messages.

import fs from "node:fs";
import net from "node:net";
import tls from "node:tls";

import { socketUnackedBytes } from "../../capture/native-socket-queue";
import { AgentError } from "../../errors";
import type { Logger } from "../../log";
import type { AuditSink, SpooledRecord } from "../sink";
import {
  DEFAULT_SD_ID,
  DEFAULT_SYSLOG_FACILITY,
  DEFAULT_SYSLOG_MAX_MESSAGE_BYTES,
  checkMaxMessageBytes,
  checkSyslogHeader,
  formatSyslogFrame,
  type SyslogHeader,
} from "./syslog-format";

/** TLS settings. Setting them selects TLS (RFC 5425) instead of plain TCP. */
export interface SyslogTlsOptions {
  /** PEM file of the CA certificates that verify the receiver. Without it, Node's bundled CAs are used. */
  ca?: string;
  /** PEM file of a client certificate chain, for receivers that require mutual TLS. Needs `key`. */
  cert?: string;
  /** PEM file of the client certificate's private key. */
  key?: string;
  /** Name that the receiver's certificate must carry, also sent as SNI. Default `host`. */
  serverName?: string;
}

export interface SyslogSinkOptions {
  host: string;
  port: number;
  tls?: SyslogTlsOptions;
  /** Facility name (authpriv, local0, …) or number from 0 to 23. Default authpriv (10). */
  facility?: string | number;
  /** The node name, sent as HOSTNAME. */
  node: string;
  /** SD-ID of the element with id, seq and v. Default audit@32473. */
  sdId?: string;
  /** Timeout of the TCP connect and of the TLS handshake, each. Default 10 s. */
  connectTimeoutMs?: number;
  /** Timeout for writing a batch and for the receiver's kernel to acknowledge it, together. Default 10 s. */
  ackTimeoutMs?: number;
  /** Time for which written records are kept for a replay. Default 5 s. */
  replayWindowMs?: number;
  /** Maximum bytes of messages kept for a replay. Beyond it the oldest are dropped. Default 32 MiB. */
  replayMaxBytes?: number;
  /**
   * Maximum bytes of one message without its octet count, at most what the receiver accepts
   * (rsyslog's maxMessageSize). A longer record is sent as a stand-in. Default 8192, minimum 2048.
   */
  maxMessageBytes?: number;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_ACK_TIMEOUT_MS = 10_000;
const DEFAULT_REPLAY_WINDOW_MS = 5_000;
const DEFAULT_REPLAY_MAX_BYTES = 32 * 1024 * 1024;
/** Interval between two reads of the send queue while send() waits for the acknowledgement. */
const ACK_POLL_INTERVAL_MS = 1;
/** The poll interval doubles from ACK_POLL_INTERVAL_MS up to this, so a slow receiver costs few native calls. */
const ACK_POLL_MAX_INTERVAL_MS = 32;
/** Time close() waits for the receiver to close the connection before it destroys the socket. */
const CLOSE_TIMEOUT_MS = 1_000;
/** Minimum time between two warnings about records sent as stand-ins. */
const STAND_IN_WARNING_INTERVAL_MS = 60_000;

/** A record to write, with its framed message. */
interface FramedRecord {
  record: SpooledRecord;
  frame: Buffer;
  /** When the record was first written, on any connection, in ms since the epoch; undefined before its first write. */
  firstWrittenAt?: number;
}

/** A record written on a connection, kept for a replay. */
interface WrittenRecord extends FramedRecord {
  firstWrittenAt: number;
}

/** One TCP or TLS connection to the receiver. */
interface SyslogConnection {
  /** The socket that send() writes to: the TLS socket, or the TCP socket itself. */
  socket: net.Socket;
  /** The TCP socket under it, whose send queue is read. */
  tcp: net.Socket;
  fd: number;
  /** The reason the connection can no longer be used, set by the first error, end or close. */
  broken?: Error;
  brokenAt?: number;
  written: WrittenRecord[];
  writtenBytes: number;
}

export class SyslogSink implements AuditSink {
  readonly name: string;
  /**
   * A remote call costs the agent far more than one record, so a batch that is not full waits up to
   * 500 ms to fill: at low rates this cut the agent's CPU per connection measurably (docs/benchmarks.md).
   */
  readonly lingerMs = 500;
  private readonly header: SyslogHeader;
  private readonly connectTimeoutMs: number;
  private readonly ackTimeoutMs: number;
  private readonly replayWindowMs: number;
  private readonly replayMaxBytes: number;
  private readonly maxMessageBytes: number;
  private connection: SyslogConnection | undefined;
  /** Records of broken connections to send again, first thing on the next connection. */
  private replay: WrittenRecord[] = [];
  private sending = false;
  private closed = false;
  /** When the last stand-in warning was logged, and how many stand-ins were sent since without a warning. */
  private standInWarnedAt = 0;
  private standInsNotWarned = 0;

  constructor(
    private readonly options: SyslogSinkOptions,
    private readonly logger: Logger,
  ) {
    if (!Number.isInteger(options.port) || options.port < 1 || options.port > 65535) {
      throw new AgentError("INVALID_AUDIT_SINK", `syslog port ${options.port} is invalid: use an integer from 1 to 65535`);
    }
    this.header = checkSyslogHeader({
      facility: options.facility ?? DEFAULT_SYSLOG_FACILITY,
      hostname: options.node,
      procId: String(process.pid),
      sdId: options.sdId ?? DEFAULT_SD_ID,
    });
    const scheme = options.tls ? "syslog+tls" : "syslog+tcp";
    const host = net.isIPv6(options.host) ? `[${options.host}]` : options.host;
    this.name = `${scheme}://${host}:${options.port}`;
    this.connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    this.ackTimeoutMs = options.ackTimeoutMs ?? DEFAULT_ACK_TIMEOUT_MS;
    this.replayWindowMs = options.replayWindowMs ?? DEFAULT_REPLAY_WINDOW_MS;
    this.replayMaxBytes = options.replayMaxBytes ?? DEFAULT_REPLAY_MAX_BYTES;
    this.maxMessageBytes = checkMaxMessageBytes(options.maxMessageBytes ?? DEFAULT_SYSLOG_MAX_MESSAGE_BYTES);
  }

  /** Returns undefined: a syslog receiver cannot report which records it holds. Connects on the first send(). */
  async open(): Promise<undefined> {
    return undefined;
  }

  async send(batch: readonly SpooledRecord[]): Promise<void> {
    if (this.closed) throw new AgentError("AUDIT_SINK_FAILED", `sending to ${this.name} failed: the sink is closed`);
    if (this.sending) throw new AgentError("INTERNAL", `sending to ${this.name} failed: another send() is still running. Await it first`);
    this.sending = true;
    try {
      const connection = await this.usableConnection();
      const records = this.recordsToWrite(batch);
      await this.deliverBeforeDeadline(connection, records);
      this.replay = [];
      this.forgetOldRecords(connection);
    } catch (error) {
      this.dropConnection(error);
      throw this.deliveryError(error);
    } finally {
      this.sending = false;
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    const connection = this.connection;
    this.connection = undefined;
    if (connection === undefined || connection.socket.destroyed) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        connection.socket.destroy();
        resolve();
      }, CLOSE_TIMEOUT_MS);
      connection.socket.once("close", () => {
        clearTimeout(timer);
        resolve();
      });
      connection.socket.end();
    });
  }

  /** Returns the open connection, or replaces a broken one (keeping its recent records for a replay). */
  private async usableConnection(): Promise<SyslogConnection> {
    const current = this.connection;
    if (current !== undefined && current.broken === undefined) return current;
    if (current !== undefined) this.dropConnection(current.broken);
    const connection = await this.connect();
    this.connection = connection;
    this.logger.info({ sink: this.name, replay: this.replay.length }, "connected to the syslog receiver");
    return connection;
  }

  /**
   * Returns the replayed records followed by the batch, in seq order, each id once. A record of
   * the batch may also be in the replay when an earlier send() of the same batch failed.
   */
  private recordsToWrite(batch: readonly SpooledRecord[]): FramedRecord[] {
    const byId = new Map<string, FramedRecord>();
    for (const written of this.replay) byId.set(written.record.id, written);
    for (const record of batch) {
      if (byId.has(record.id)) continue;
      const { frame, standInForBytes } = formatSyslogFrame(this.header, record.record, record.line, this.maxMessageBytes);
      if (standInForBytes !== undefined) this.warnStandIn(record, standInForBytes);
      byId.set(record.id, { record, frame });
    }
    return [...byId.values()].sort((a, b) => a.record.seq - b.record.seq);
  }

  /** Logs a record sent as a stand-in, at most once per STAND_IN_WARNING_INTERVAL_MS, with the count of the others. */
  private warnStandIn(record: SpooledRecord, bytes: number): void {
    this.standInsNotWarned++;
    const now = Date.now();
    if (now - this.standInWarnedAt < STAND_IN_WARNING_INTERVAL_MS) return;
    this.logger.warn(
      { sink: this.name, seq: record.seq, id: record.id, bytes, max_message_bytes: this.maxMessageBytes, stand_ins: this.standInsNotWarned },
      "audit record is longer than the syslog maximum message size, so a stand-in with its id and hash was sent; the full record is in the audit file and the other sinks",
    );
    this.standInWarnedAt = now;
    this.standInsNotWarned = 0;
  }

  /**
   * Writes the records and waits for their acknowledgement, both within ackTimeoutMs. On expiry
   * the connection is destroyed, which also ends a write that the receiver never took.
   */
  private async deliverBeforeDeadline(connection: SyslogConnection, records: FramedRecord[]): Promise<void> {
    const deadline = Date.now() + this.ackTimeoutMs;
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => {
        const error = this.ackTimeoutError();
        this.markBroken(connection, error);
        connection.socket.destroy();
        reject(error);
      }, this.ackTimeoutMs);
    });
    const delivered = (async () => {
      await this.writeRecords(connection, records);
      await this.awaitAcknowledgement(connection, deadline);
    })();
    try {
      await Promise.race([delivered, expired]);
    } finally {
      clearTimeout(timer);
    }
  }

  private async writeRecords(connection: SyslogConnection, records: FramedRecord[]): Promise<void> {
    const now = Date.now();
    for (const written of records) {
      connection.written.push({ ...written, firstWrittenAt: written.firstWrittenAt ?? now });
      connection.writtenBytes += written.frame.length;
    }
    const data = Buffer.concat(records.map((written) => written.frame));
    await new Promise<void>((resolve, reject) => {
      connection.socket.write(data, (error) => (error ? reject(error) : resolve()));
    });
  }

  /**
   * Resolves once the receiver's kernel acknowledged every byte written on the connection. The
   * send queue is read only while the socket is open: after destroy() its fd may belong to another file.
   */
  private async awaitAcknowledgement(connection: SyslogConnection, deadline: number): Promise<void> {
    for (let interval = ACK_POLL_INTERVAL_MS; ; interval = Math.min(interval * 2, ACK_POLL_MAX_INTERVAL_MS)) {
      if (connection.broken !== undefined) throw connection.broken;
      if (connection.socket.destroyed || connection.tcp.destroyed) throw new Error("the connection was closed");
      const pending = connection.socket.writableLength + connection.tcp.writableLength;
      if (pending === 0 && socketUnackedBytes(connection.fd) === 0) return;
      if (Date.now() >= deadline) throw this.ackTimeoutError();
      await delay(interval);
    }
  }

  private ackTimeoutError(): AgentError {
    return new AgentError(
      "AUDIT_SINK_FAILED",
      `sending to ${this.name} failed: the receiver did not take and acknowledge the written records within ${this.ackTimeoutMs} ms. ` +
        "Check that the syslog receiver runs and reads its connections",
    );
  }

  /** Drops records first written before the replay window, and the oldest ones beyond replayMaxBytes. */
  private forgetOldRecords(connection: SyslogConnection): void {
    const oldest = Date.now() - this.replayWindowMs;
    let drop = 0;
    let bytes = connection.writtenBytes;
    while (drop < connection.written.length && (connection.written[drop].firstWrittenAt < oldest || bytes > this.replayMaxBytes)) {
      bytes -= connection.written[drop].frame.length;
      drop++;
    }
    if (drop === 0) return;
    const overflow = connection.written[drop - 1].firstWrittenAt >= oldest;
    if (overflow) {
      // NOTE: records dropped here are not replayed if the receiver loses them within the window.
      this.logger.warn({ sink: this.name, dropped: drop, replayMaxBytes: this.replayMaxBytes }, "syslog replay buffer is full, so the oldest records will not be replayed");
    }
    connection.written.splice(0, drop);
    connection.writtenBytes = bytes;
  }

  /**
   * Closes the current connection after a failure and moves the records written on it into the
   * replay, if they were first written during the replay window before it broke.
   */
  private dropConnection(reason: unknown): void {
    const connection = this.connection;
    if (connection === undefined) return;
    this.connection = undefined;
    if (connection.broken === undefined) this.markBroken(connection, toError(reason));
    connection.socket.destroy();
    // Replayed records that were never acknowledged keep their first write time, so the window and
    // the byte cap apply to them as to the connection's own records.
    const since = (connection.brokenAt ?? Date.now()) - this.replayWindowMs;
    const replayed = new Map<string, FramedRecord & { firstWrittenAt: number }>();
    for (const written of [...this.replay, ...connection.written]) {
      if (written.firstWrittenAt >= since) replayed.set(written.record.id, written);
    }
    const kept = [...replayed.values()].sort((a, b) => a.record.seq - b.record.seq);
    let bytes = kept.reduce((sum, written) => sum + written.frame.length, 0);
    while (kept.length > 0 && bytes > this.replayMaxBytes) bytes -= kept.shift()!.frame.length;
    this.replay = kept;
    this.logger.warn(
      { sink: this.name, err: connection.broken, replay: this.replay.length },
      "connection to the syslog receiver broke; recent records will be sent again on the next connection",
    );
  }

  private markBroken(connection: SyslogConnection, reason: Error): void {
    if (connection.broken !== undefined) return;
    connection.broken = reason;
    connection.brokenAt = Date.now();
  }

  private deliveryError(error: unknown): AgentError {
    if (error instanceof AgentError) return error;
    const message = error instanceof Error ? error.message : String(error);
    return new AgentError(
      "AUDIT_SINK_FAILED",
      `sending to ${this.name} failed: ${message}. Check that the syslog receiver runs and accepts ${this.options.tls ? "TLS" : "TCP"} connections on that port`,
      { cause: error },
    );
  }

  /** Opens a TCP connection and, with TLS options, runs the TLS handshake on it. */
  private async connect(): Promise<SyslogConnection> {
    const tcp = await this.connectTcp();
    const fd = (tcp as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (fd === undefined || fd < 0) {
      tcp.destroy();
      throw new AgentError("INTERNAL", `connecting to ${this.name} failed: the socket has no file descriptor, so its send queue cannot be read`);
    }
    let socket: net.Socket = tcp;
    try {
      if (this.options.tls) socket = await this.handshake(tcp, this.options.tls);
    } catch (error) {
      tcp.destroy();
      throw error;
    }
    const connection: SyslogConnection = { socket, tcp, fd, written: [], writtenBytes: 0 };
    const onBroken = (reason: Error): void => this.markBroken(connection, reason);
    socket.on("error", onBroken);
    if (socket !== tcp) tcp.on("error", onBroken);
    socket.on("end", () => onBroken(new Error("the receiver closed the connection")));
    socket.on("close", () => onBroken(new Error("the connection was closed")));
    // The receiver sends nothing. Reading the socket makes Node report its end and resets.
    socket.on("data", () => undefined);
    return connection;
  }

  private connectTcp(): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const tcp = net.connect({ host: this.options.host, port: this.options.port });
      const timer = setTimeout(() => {
        tcp.destroy();
        reject(new Error(`connecting timed out after ${this.connectTimeoutMs} ms`));
      }, this.connectTimeoutMs);
      tcp.once("connect", () => {
        clearTimeout(timer);
        tcp.setNoDelay(true);
        tcp.setKeepAlive(true, 30_000);
        resolve(tcp);
      });
      // This listener stays attached after the connect, so an error during the TLS handshake
      // destroys the socket instead of being thrown as an unhandled 'error' event.
      tcp.once("error", (error) => {
        clearTimeout(timer);
        tcp.destroy();
        reject(error);
      });
    });
  }

  /** Runs the TLS handshake over `tcp` and verifies the receiver's certificate against `serverName`. */
  private handshake(tcp: net.Socket, options: SyslogTlsOptions): Promise<tls.TLSSocket> {
    const serverName = options.serverName ?? this.options.host;
    const secure = tls.connect({
      socket: tcp,
      ca: options.ca ? readPem(options.ca, "CA certificates") : undefined,
      cert: options.cert ? readPem(options.cert, "client certificate") : undefined,
      key: options.key ? readPem(options.key, "client key") : undefined,
      // SNI carries host names only, so an IP address is not sent as SNI.
      servername: net.isIP(serverName) ? undefined : serverName,
      checkServerIdentity: (_host, certificate) => tls.checkServerIdentity(serverName, certificate),
    });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        secure.destroy();
        reject(new Error(`the TLS handshake timed out after ${this.connectTimeoutMs} ms`));
      }, this.connectTimeoutMs);
      secure.once("secureConnect", () => {
        clearTimeout(timer);
        secure.removeAllListeners("error");
        resolve(secure);
      });
      secure.once("error", (error) => {
        clearTimeout(timer);
        secure.destroy();
        reject(new Error(`the TLS handshake failed: ${error.message}`, { cause: error }));
      });
    });
  }
}

function readPem(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    throw new AgentError("INVALID_AUDIT_SINK", `reading the syslog TLS ${what} ${file} failed: ${(error as Error).message}. Check the path in the sink settings`);
  }
}

function toError(reason: unknown): Error {
  return reason instanceof Error ? reason : new Error(String(reason));
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
