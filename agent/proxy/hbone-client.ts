// The client side of one HBONE connection: TCP connect from inside the source pod, the mutual TLS 1.3
// handshake, and the HTTP/2 handshake up to the peer's first SETTINGS. The pool decides when to open one.

import crypto from "node:crypto";
import http2 from "node:http2";
import type net from "node:net";
import tls from "node:tls";
import { AgentError } from "../errors";
import type { WorkloadCertificate } from "../identity/cert-manager";
import { chainFailureOf, issuersOf, verifyServerCertificate, type AcceptedTrustDomains } from "../identity/verify";
import type { Identity } from "../state/types";
import { CLIENT_SETTINGS, CONNECTION_WINDOW_BYTES, MAX_SESSION_MEMORY_MB, type Authority } from "./hbone";
import type { PodNetwork } from "./pod-network";
import { connectTcp, formatAddress } from "./tcp";

export interface HboneConnectOptions {
  /** The source pod's network: the connection is made from inside it. */
  network: PodNetwork;
  /** The source workload's certificate, presented to the server. */
  certificate: WorkloadCertificate;
  /** The identities the server's certificate may carry. It must carry one of them. */
  expectedIdentities: readonly Identity[];
  /**
   * The source's trust domain and its aliases: a server identity in one of them matches an expected
   * identity in another. Without this option, trust domains must be equal.
   */
  acceptedTrustDomains?: AcceptedTrustDomains;
  /** The destination pod's HBONE address, podIP:15008. */
  hboneAddress: Authority;
  /** Limit for each of the TCP connect, the TLS handshake and the peer's first SETTINGS. */
  timeoutMs: number;
  /** Receives the TCP socket and then the TLS socket as soon as each exists, so that the caller can abort the setup. */
  onSocket(socket: net.Socket): void;
  /** Receives the session before its HTTP/2 handshake, so that the caller can attach its listeners first. */
  onSession(session: http2.ClientHttp2Session): void;
}

/**
 * Opens an HBONE connection and resolves once the peer's first SETTINGS arrived, which carry its stream
 * limit. Rejects with UPSTREAM_CONNECT_FAILED, TLS_FAILURE, or a PeerVerificationError whose code names
 * why the server's certificate was rejected (CERT_EXPIRED, UNKNOWN_ROOT, IDENTITY_ERROR...), and destroys
 * what it opened.
 */
export async function connectHbone(options: HboneConnectOptions): Promise<http2.ClientHttp2Session> {
  const hboneAddr = formatAddress(options.hboneAddress.ip, options.hboneAddress.port);
  const socket = await connectSocket(options, hboneAddr);
  const tlsSocket = await openTls(options, socket, hboneAddr);
  const session = http2.connect(`https://${hboneAddr}`, {
    createConnection: () => tlsSocket,
    settings: CLIENT_SETTINGS,
    maxSessionMemory: MAX_SESSION_MEMORY_MB,
  });
  session.once("connect", () => session.setLocalWindowSize(CONNECTION_WINDOW_BYTES));
  options.onSession(session);
  await awaitPeerSettings(session, hboneAddr, options.timeoutMs);
  return session;
}

async function connectSocket(options: HboneConnectOptions, hboneAddr: string): Promise<net.Socket> {
  const { ip, port } = options.hboneAddress;
  try {
    const socket = await connectTcp(options.network, ip, port, options.timeoutMs, options.onSocket);
    socket.on("error", () => undefined);
    // Pod sockets allow half-open connections for proxied applications, and the TLS socket
    // inherits that setting. A half-open HBONE connection outlives the FIN of a peer agent that
    // died, so the pool would keep it and streams opened on it would hang until the PING timeout.
    socket.allowHalfOpen = false;
    // Set on the TCP socket: session.socket.setNoDelay() throws on Node 20.
    socket.setNoDelay(true);
    return socket;
  } catch (error) {
    throw new AgentError(
      "UPSTREAM_CONNECT_FAILED",
      `connect to ${hboneAddr} failed: ${(error as Error).message}; check that the destination's agent listens on its HBONE port`,
      { cause: error },
    );
  }
}

/**
 * Runs the TLS 1.3 handshake with the destination's HBONE port: our workload certificate, ALPN h2,
 * no SNI, the chain checked against our roots and the server's URI SAN against the expected identities.
 */
async function openTls(options: HboneConnectOptions, socket: net.Socket, hboneAddr: string): Promise<tls.TLSSocket> {
  const tlsSocket = tls.connect({
    socket,
    secureContext: options.certificate.secureContext,
    ALPNProtocols: ["h2"],
    // An empty servername sends no SNI: HBONE servers pick their certificate by the address dialled.
    servername: "",
    // Node checks the chain first and calls checkServerIdentity only for a chain it trusts.
    // NOTE: Node skips checkServerIdentity on a resumed TLS session, so passing `session` here
    // would need the identity check moved after the handshake.
    rejectUnauthorized: true,
    checkServerIdentity: (_host, peer) => checkServerIdentity(peer, options, hboneAddr),
  });
  options.onSocket(tlsSocket);
  tlsSocket.on("error", () => undefined);
  await handshake(tlsSocket, hboneAddr, options.timeoutMs);
  if (tlsSocket.alpnProtocol !== "h2") {
    tlsSocket.destroy();
    throw new AgentError(
      "TLS_FAILURE",
      `${hboneAddr} did not negotiate ALPN h2 (got ${String(tlsSocket.alpnProtocol)}); check that the port is an HBONE server`,
    );
  }
  return tlsSocket;
}

/** Returns an error when the server's certificate, whose chain Node verified, carries none of the expected SPIFFE identities. */
function checkServerIdentity(peer: tls.PeerCertificate, options: HboneConnectOptions, hboneAddr: string): Error | undefined {
  // Node passes the chain it verified, completed with the trusted root.
  const presented = { leaf: new crypto.X509Certificate(peer.raw), authorized: true, intermediates: issuersOf(peer) };
  const verification = verifyServerCertificate(presented, options.expectedIdentities, options.acceptedTrustDomains, hboneAddr);
  return verification.verified ? undefined : verification.error;
}

/**
 * Resolves on secureConnect. Rejects on failure or after timeoutMs with the identity error, the
 * rejection that Node's chain error stands for, or TLS_FAILURE.
 */
function handshake(tlsSocket: tls.TLSSocket, hboneAddr: string, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error(`no TLS handshake after ${timeoutMs} ms`)), timeoutMs);
    const fail = (error: Error): void => {
      clearTimeout(timer);
      tlsSocket.off("secureConnect", succeed);
      tlsSocket.off("close", closedEarly);
      tlsSocket.destroy();
      reject(handshakeError(error, hboneAddr));
    };
    const closedEarly = (): void => fail(new Error("the connection closed during the handshake"));
    const succeed = (): void => {
      clearTimeout(timer);
      tlsSocket.off("error", fail);
      tlsSocket.off("close", closedEarly);
      resolve();
    };
    tlsSocket.once("secureConnect", succeed);
    tlsSocket.once("error", fail);
    tlsSocket.once("close", closedEarly);
  });
}

/** Returns the error a failed handshake rejects with: ours, the rejection of Node's chain error, or TLS_FAILURE. */
function handshakeError(error: Error, hboneAddr: string): AgentError {
  if (error instanceof AgentError) {
    return error;
  }
  return (
    chainFailureOf((error as NodeJS.ErrnoException).code, hboneAddr) ??
    new AgentError("TLS_FAILURE", `TLS handshake with ${hboneAddr} failed: ${error.message}`, { cause: error })
  );
}

/**
 * Resolves when the peer's first SETTINGS frame arrives, which carries its stream limit. Rejects with
 * TLS_FAILURE when the session fails or closes first: in TLS 1.3 a server that rejects our certificate
 * does so after our side of the handshake completed.
 */
function awaitPeerSettings(session: http2.ClientHttp2Session, hboneAddr: string, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error(`no HTTP/2 SETTINGS within ${timeoutMs} ms`)), timeoutMs);
    const fail = (error: Error): void => {
      cleanup();
      session.destroy();
      reject(
        new AgentError(
          "TLS_FAILURE",
          `the HBONE connection to ${hboneAddr} failed before its HTTP/2 handshake finished (${error.message}); the server may have rejected our certificate`,
          { cause: error },
        ),
      );
    };
    const closedEarly = (): void => fail(new Error("closed by the server"));
    const succeed = (): void => {
      cleanup();
      resolve();
    };
    const cleanup = (): void => {
      clearTimeout(timer);
      session.off("remoteSettings", succeed);
      session.off("error", fail);
      session.off("close", closedEarly);
    };
    session.once("remoteSettings", succeed);
    session.once("error", fail);
    session.once("close", closedEarly);
  });
}
