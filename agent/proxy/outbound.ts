// The outbound proxy of one enrolled pod: accepts the connections capture steers to port 15001 and
// sends each one to its original destination, through an HBONE tunnel when the destination is in the
// mesh and as plain TCP otherwise.

import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import type { AuditSink } from "../audit/record";
import { AgentError } from "../errors";
import type { CertificateProvider, WorkloadCertificate } from "../identity/cert-manager";
import { formatSpiffeId, sameIdentity } from "../identity/spiffe";
import type { Logger } from "../log";
import type { Identity, Workload } from "../state/types";
import { ConnectionRecord, peerOf } from "./connection-record";
import { copyBidirectional, resetSocket, streamEndpoint, tcpEndpoint } from "./copy";
import {
  CLIENT_SETTINGS,
  CONNECT_TIMEOUT_MS,
  CONNECTION_WINDOW_BYTES,
  HBONE_PORT,
  MAX_SESSION_MEMORY_MB,
  OUTBOUND_PORT,
  buildConnectHeaders,
  identityFromSubjectAltName,
  type Authority,
} from "./hbone";
import type { PodNetwork } from "./pod-network";
import { connectTcp, formatAddress, normalizeIp, remoteAddressOf } from "./tcp";

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

export interface OutboundProxyOptions {
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
  audit: AuditSink;
  logger: Logger;
}

/** One accepted connection, so that stop() can abort it. */
interface ActiveConnection {
  client: net.Socket;
  record: ConnectionRecord;
  /** Closes whatever the connection opened upstream. */
  upstream: Set<{ destroy(): void }>;
  done: Promise<void>;
}

export class OutboundProxy {
  readonly #options: OutboundProxyOptions;
  readonly #logger: Logger;
  readonly #sourceIdentity: string;
  readonly #active = new Set<ActiveConnection>();
  #server: net.Server | undefined;

  constructor(options: OutboundProxyOptions) {
    this.#options = options;
    this.#logger = options.logger.child({ component: "outbound" });
    this.#sourceIdentity = formatSpiffeId(options.identity);
  }

  /** Listens on port 15001 inside the pod. */
  async start(): Promise<void> {
    // Paused until the destination is known, so no byte is read before there is somewhere to send it.
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => this.#accept(client));
    server.on("error", (error) => this.#logger.error({ err: error }, "outbound listener failed"));
    await this.#options.network.listen(server, OUTBOUND_PORT);
    this.#server = server;
    this.#logger.info({ port: OUTBOUND_PORT }, "outbound proxy started");
  }

  /** Closes the listener and resets every open connection; resolves once each has written its record. */
  async stop(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    const closed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    const stopping = new AgentError("STREAM_RESET", `the outbound proxy of ${this.#options.workload.uid} stopped`);
    for (const connection of this.#active) {
      connection.record.fail(stopping);
      resetSocket(connection.client);
      for (const upstream of connection.upstream) {
        upstream.destroy();
      }
    }
    await Promise.allSettled([...this.#active].map((connection) => connection.done));
    await closed;
    this.#logger.info("outbound proxy stopped");
  }

  #accept(client: net.Socket): void {
    client.on("error", () => undefined);
    const record = new ConnectionRecord({
      node: this.#options.node,
      direction: "outbound",
      transport: "plaintext",
      src: peerOf(remoteAddressOf(client), this.#options.workload, this.#sourceIdentity),
      dst: { addr: "unknown" },
    });
    const connection: ActiveConnection = { client, record, upstream: new Set(), done: Promise.resolve() };
    this.#active.add(connection);
    connection.done = this.#handle(connection).finally(() => this.#active.delete(connection));
  }

  async #handle(connection: ActiveConnection): Promise<void> {
    const { client, record } = connection;
    const logger = this.#logger.child({ connection_id: record.id, "src.addr": record.src.addr });
    try {
      const destination = this.#originalDestination(client, record);
      const target = this.#options.resolveDestination(destination.ip, destination.port);
      if (target.kind === "unavailable") {
        record.dst = { addr: formatAddress(destination.ip, destination.port), service: target.service };
        const error = new AgentError("NO_HEALTHY_ENDPOINT", target.message);
        record.deny(target.reason, error);
        throw error;
      }
      record.dst = peerOf(formatAddress(target.address.ip, target.address.port), target.workload);
      if (target.service !== undefined) record.dst.service = target.service;
      logger.debug({ "dst.addr": record.dst.addr, "dst.service": target.service, kind: target.kind }, "connection opened");
      if (target.kind === "hbone") {
        await this.#tunnel(connection, target.address, target, logger);
      } else {
        await this.#passthrough(connection, target.address);
      }
    } catch (error) {
      record.fail(error);
      resetSocket(client);
    } finally {
      record.write(this.#options.audit, logger);
    }
  }

  #originalDestination(client: net.Socket, record: ConnectionRecord): Authority {
    const destination = this.#options.originalDestination(client);
    if (!destination) {
      const error = new AgentError(
        "NO_ORIGINAL_DESTINATION",
        `no original destination recorded for the connection from ${record.src.addr}; check that capture is attached for this pod`,
      );
      record.deny("no_original_destination", error);
      throw error;
    }
    return { ip: normalizeIp(destination.ip), port: destination.port };
  }

  /** Connects straight to the destination and copies bytes both ways. */
  async #passthrough(connection: ActiveConnection, destination: Authority): Promise<void> {
    const upstream = await this.#connectUpstream(connection, destination.ip, destination.port);
    const result = await copyBidirectional(tcpEndpoint("client", connection.client), tcpEndpoint("destination", upstream));
    this.#recordCopy(connection.record, result);
  }

  /** Opens an HBONE tunnel to the destination pod and copies bytes through it. */
  async #tunnel(
    connection: ActiveConnection,
    destination: Authority,
    target: Extract<DestinationTarget, { kind: "hbone" }>,
    logger: Logger,
  ): Promise<void> {
    const { client, record } = connection;
    record.transport = "hbone";
    record.dst.identity = formatSpiffeId(target.identity);
    record.dst.hbone_addr = formatAddress(target.workload.ip, HBONE_PORT);

    const certificate = await this.#options.certs.get(this.#options.identity);
    const tlsSocket = await this.#openTls(connection, target, certificate);
    const session = this.#openSession(connection, tlsSocket, record.dst.hbone_addr, logger);
    try {
      const source = { ip: normalizeIp(client.remoteAddress ?? ""), port: client.remotePort ?? 0 };
      const stream = session.request(buildConnectHeaders({ destination, source, workload: this.#options.workload }), {
        endStream: false,
      });
      stream.on("error", () => undefined);
      const status = await responseStatus(stream, record.dst.hbone_addr);
      if (status !== 200) {
        this.#rejectTunnel(record, status);
      }
      const result = await copyBidirectional(tcpEndpoint("client", client), streamEndpoint("tunnel", stream));
      this.#recordCopy(record, result);
    } finally {
      closeSession(session);
    }
  }

  async #connectUpstream(connection: ActiveConnection, ip: string, port: number): Promise<net.Socket> {
    try {
      const socket = await connectTcp(this.#options.network, ip, port, CONNECT_TIMEOUT_MS, (pending) => connection.upstream.add(pending));
      socket.on("error", () => undefined);
      return socket;
    } catch (error) {
      throw new AgentError(
        "UPSTREAM_CONNECT_FAILED",
        `connect to ${formatAddress(ip, port)} failed: ${(error as Error).message}`,
        { cause: error },
      );
    }
  }

  /**
   * Runs the TLS 1.3 handshake with the destination's HBONE port: our workload certificate, ALPN h2,
   * no SNI, the chain checked against our roots and the server's URI SAN against the expected identity.
   */
  async #openTls(
    connection: ActiveConnection,
    target: Extract<DestinationTarget, { kind: "hbone" }>,
    certificate: WorkloadCertificate,
  ): Promise<tls.TLSSocket> {
    const raw = await this.#connectUpstream(connection, target.workload.ip, HBONE_PORT);
    const hboneAddr = formatAddress(target.workload.ip, HBONE_PORT);
    const tlsSocket = tls.connect({
      socket: raw,
      secureContext: certificate.secureContext,
      ALPNProtocols: ["h2"],
      // An empty servername sends no SNI: HBONE servers pick their certificate by the address dialled.
      servername: "",
      rejectUnauthorized: true,
      checkServerIdentity: (_host, peer) => checkServerIdentity(peer, target.identity, hboneAddr),
    });
    connection.upstream.add(tlsSocket);
    tlsSocket.on("error", () => undefined);
    await handshake(tlsSocket, hboneAddr);
    if (tlsSocket.alpnProtocol !== "h2") {
      tlsSocket.destroy();
      throw new AgentError("TLS_FAILURE", `${hboneAddr} did not negotiate ALPN h2 (got ${String(tlsSocket.alpnProtocol)})`);
    }
    return tlsSocket;
  }

  #openSession(connection: ActiveConnection, tlsSocket: tls.TLSSocket, hboneAddr: string, logger: Logger): http2.ClientHttp2Session {
    const session = http2.connect(`https://${hboneAddr}`, {
      createConnection: () => tlsSocket,
      settings: CLIENT_SETTINGS,
      maxSessionMemory: MAX_SESSION_MEMORY_MB,
    });
    connection.upstream.add(session);
    session.on("error", (error) => logger.debug({ err: error, hbone_addr: hboneAddr }, "HBONE session failed"));
    session.once("connect", () => session.setLocalWindowSize(CONNECTION_WINDOW_BYTES));
    return session;
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
    }
  }
}

/** Returns an error when the server's certificate does not carry the expected SPIFFE identity. */
function checkServerIdentity(peer: tls.PeerCertificate, expected: Identity, hboneAddr: string): Error | undefined {
  const presented = identityFromSubjectAltName(peer.subjectaltname);
  if (presented && sameIdentity(presented, expected)) {
    return undefined;
  }
  return new AgentError(
    "IDENTITY_ERROR",
    `${hboneAddr} presented ${presented ? formatSpiffeId(presented) : "no SPIFFE identity"}, expected ${formatSpiffeId(expected)}`,
  );
}

/** Resolves on secureConnect; rejects with TLS_FAILURE (or the identity error) on failure or after the connect timeout. */
function handshake(tlsSocket: tls.TLSSocket, hboneAddr: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error(`no TLS handshake after ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
    const fail = (error: Error): void => {
      clearTimeout(timer);
      tlsSocket.off("secureConnect", succeed);
      tlsSocket.destroy();
      reject(
        error instanceof AgentError
          ? error
          : new AgentError("TLS_FAILURE", `TLS handshake with ${hboneAddr} failed: ${error.message}`, { cause: error }),
      );
    };
    const succeed = (): void => {
      clearTimeout(timer);
      tlsSocket.off("error", fail);
      resolve();
    };
    tlsSocket.once("secureConnect", succeed);
    tlsSocket.once("error", fail);
  });
}

/** Waits for the CONNECT response and returns its status. */
function responseStatus(stream: http2.ClientHttp2Stream, hboneAddr: string): Promise<number> {
  return new Promise((resolve, reject) => {
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
      stream.off("response", onResponse);
      stream.off("close", onClose);
    };
    stream.once("response", onResponse);
    stream.once("close", onClose);
  });
}

/** Closes an HTTP/2 session gracefully, and for good after a short grace period. */
function closeSession(session: http2.ClientHttp2Session): void {
  if (session.destroyed) {
    return;
  }
  session.close();
  setTimeout(() => session.destroy(), 1_000).unref();
}
