// The HBONE connection pool against a test HBONE server on loopback: real TLS 1.3 and HTTP/2, with
// connection counts, stream limits, idle close, PING keepalive and failures the test controls.

import crypto from "node:crypto";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import test, { type ExecutionContext } from "ava";
import type { EmbeddedCa } from "../../agent/identity/ca";
import { CertManager, type CertificateProvider, type WorkloadCertificate } from "../../agent/identity/cert-manager";
import { hboneTlsOptions, withSecureContext } from "../../agent/identity/certificate";
import { silentLogger } from "../../agent/log";
import { HBONE_PORT } from "../../agent/proxy/hbone";
import { OutboundProxy } from "../../agent/proxy/outbound";
import { HbonePool, poolKeyOf, type HboneDestination, type HbonePoolOptions } from "../../agent/proxy/pool";
import type { Identity } from "../../agent/state/types";
import {
  LoopbackPodNetwork,
  MemorySink,
  createCa,
  echo,
  exchange,
  identity,
  startApp,
  startMesh,
  workload,
  type Mesh,
} from "./proxy-fixtures";

const CLIENT_IDENTITY = identity("default", "sleep");
const SERVER_IDENTITY = identity("apps", "echo");

interface TestServerOptions {
  ip: string;
  port: number;
  identity?: Identity;
  /** SETTINGS_MAX_CONCURRENT_STREAMS the server advertises. */
  maxConcurrentStreams?: number;
  /**
   * How the server ends its n-th stream (1-based, over all sessions) instead of serving it.
   * "refused" sends RST_STREAM REFUSED_STREAM, which reports that the stream was not processed.
   * "reset" sends RST_STREAM INTERNAL_ERROR, which does not. undefined serves the stream.
   */
  endStream?: (n: number) => "refused" | "reset" | undefined;
}

/** A minimal HBONE server: it responds to every CONNECT with status 200 and echoes the stream's bytes. */
interface TestServer {
  /** HTTP/2 sessions accepted so far. */
  sessions: number;
  /** HTTP/2 sessions closed so far. */
  closedSessions: number;
  /** The highest number of streams open at once on one session. */
  maxOpenStreams: number;
  /** Streams received so far, over all sessions. */
  streams: number;
  /** While true, new connections get the server's SETTINGS and nothing else: the server never reads again. */
  mute: boolean;
  /** TCP connections accepted so far, including those whose TLS handshake failed. */
  tcpConnections: number;
  /** Serial numbers of the client certificates, one per accepted TLS connection. */
  clientSerials: string[];
  /** Live HTTP/2 sessions, for tests that act on them. */
  live: Set<http2.ServerHttp2Session>;
  setCertificate(certificate: WorkloadCertificate): void;
  close(): Promise<void>;
}

async function startServer(t: ExecutionContext, ca: EmbeddedCa, options: TestServerOptions): Promise<TestServer> {
  const certificate = withSecureContext(await ca.issue(options.identity ?? SERVER_IDENTITY));
  const sockets = new Set<net.Socket>();
  const h2 = http2.createServer({ settings: { maxConcurrentStreams: options.maxConcurrentStreams ?? 200 } });
  const tlsServer = tls.createServer({
    ...hboneTlsOptions(certificate),
    ALPNProtocols: ["h2"],
    requestCert: true,
    rejectUnauthorized: true,
  });
  const server: TestServer = {
    sessions: 0,
    closedSessions: 0,
    maxOpenStreams: 0,
    streams: 0,
    mute: false,
    tcpConnections: 0,
    clientSerials: [],
    live: new Set(),
    setCertificate: (next) => tlsServer.setSecureContext(hboneTlsOptions(next)),
    close: () => closeServer(tlsServer, sockets),
  };
  trackSessions(h2, server, options.endStream);
  tlsServer.on("connection", () => (server.tcpConnections += 1));
  tlsServer.on("secureConnection", (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => undefined);
    server.clientSerials.push(socket.getPeerX509Certificate()?.serialNumber ?? "none");
    if (server.mute) {
      muteConnection(socket);
    } else {
      h2.emit("connection", socket);
    }
  });
  await new Promise<void>((resolve) => tlsServer.listen(options.port, options.ip, resolve));
  t.teardown(() => server.close());
  return server;
}

function trackSessions(h2: http2.Http2Server, server: TestServer, endStream: TestServerOptions["endStream"]): void {
  h2.on("session", (session) => {
    server.sessions += 1;
    server.live.add(session);
    let open = 0;
    session.on("error", () => undefined);
    session.on("stream", (stream) => {
      open += 1;
      server.maxOpenStreams = Math.max(server.maxOpenStreams, open);
      stream.once("close", () => (open -= 1));
    });
    session.once("close", () => {
      server.closedSessions += 1;
      server.live.delete(session);
    });
  });
  h2.on("stream", (stream) => {
    server.streams += 1;
    stream.on("error", () => undefined);
    const ending = endStream?.(server.streams);
    if (ending !== undefined) {
      stream.close(ending === "refused" ? http2.constants.NGHTTP2_REFUSED_STREAM : http2.constants.NGHTTP2_INTERNAL_ERROR);
      return;
    }
    stream.respond({ ":status": 200 });
    stream.pipe(stream);
  });
}

/** Sends a server SETTINGS frame (MAX_CONCURRENT_STREAMS 100) and stops reading, so PINGs go unanswered. */
function muteConnection(socket: tls.TLSSocket): void {
  const frame = Buffer.from([0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x3, 0, 0, 0, 100]);
  socket.write(frame);
  socket.pause();
}

function closeServer(tlsServer: tls.Server, sockets: Set<net.Socket>): Promise<void> {
  for (const socket of sockets) {
    socket.destroy();
  }
  return new Promise((resolve) => tlsServer.close(() => resolve()));
}

interface PoolSetup {
  pool: HbonePool;
  destination: HboneDestination;
}

function createPool(
  t: ExecutionContext,
  subnet: number,
  certs: CertificateProvider,
  options: Partial<HbonePoolOptions> = {},
): PoolSetup {
  const clientIp = `127.77.${subnet}.1`;
  const pool = new HbonePool({ network: new LoopbackPodNetwork(clientIp), certs, logger: silentLogger(), ...options });
  t.teardown(() => pool.destroy());
  const destination: HboneDestination = {
    sourceIdentity: CLIENT_IDENTITY,
    sourceIp: clientIp,
    destinationIdentities: [SERVER_IDENTITY],
    hboneAddress: { ip: `127.77.${subnet}.2`, port: HBONE_PORT },
  };
  return { pool, destination };
}

function certManager(t: ExecutionContext, ca: EmbeddedCa): CertManager {
  const certs = new CertManager(ca, silentLogger());
  t.teardown(() => certs.close());
  return certs;
}

function connectHeaders(subnet: number): http2.OutgoingHttpHeaders {
  return { ":method": "CONNECT", ":authority": `127.77.${subnet}.2:8080` };
}

/** Opens a tunnel and waits for the 200 response. */
async function openTunnel(setup: PoolSetup, subnet: number): Promise<http2.ClientHttp2Stream> {
  const stream = await setup.pool.request(setup.destination, connectHeaders(subnet));
  const status = await new Promise<number>((resolve, reject) => {
    stream.once("response", (headers) => resolve(Number(headers[":status"])));
    stream.once("close", () => reject(new Error(`stream closed before its response (RST_STREAM code ${stream.rstCode})`)));
    setTimeout(() => reject(new Error("no CONNECT response within 3 s")), 3_000).unref();
  });
  if (status !== 200) {
    throw new Error(`CONNECT failed with status ${status}`);
  }
  return stream;
}

/** Writes `text` and resolves with the echo. Rejects when the stream is or becomes closed, or after 5 s. */
function roundTrip(stream: http2.ClientHttp2Stream, text: string): Promise<string> {
  if (stream.destroyed || stream.closed) return Promise.reject(new Error(`the stream was closed before the round trip (RST_STREAM code ${stream.rstCode})`));
  return new Promise((resolve, reject) => {
    let received = "";
    const timer = setTimeout(() => reject(new Error(`the round trip timed out after 5 s with ${received.length} of ${text.length} bytes back`)), 5_000);
    const settle = (error?: Error): void => {
      clearTimeout(timer);
      stream.off("data", onData);
      if (error) reject(error);
      else resolve(received);
    };
    const onData = (chunk: Buffer): void => {
      received += chunk.toString();
      if (received.length >= text.length) settle();
    };
    stream.on("data", onData);
    stream.once("error", settle);
    stream.once("close", () => settle(new Error(`the stream closed after ${received.length} of ${text.length} bytes came back (RST_STREAM code ${stream.rstCode})`)));
    stream.write(text);
  });
}

async function waitFor(condition: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function pooledConnections(pool: HbonePool): number {
  return pool.stats().keys.reduce((sum, key) => sum + key.connections, 0);
}

/** Starts an outbound proxy on 127.77.<subnet>.1 whose HBONE destination is the test server on .2. */
async function startProxy(t: ExecutionContext, subnet: number, certs: CertificateProvider): Promise<OutboundProxy> {
  const clientIp = `127.77.${subnet}.1`;
  const serverIp = `127.77.${subnet}.2`;
  const serverWorkload = workload("echo", "apps", "echo", serverIp);
  const proxy = new OutboundProxy({
    node: "node-1",
    workload: workload("sleep", "default", "sleep", clientIp),
    identity: CLIENT_IDENTITY,
    network: new LoopbackPodNetwork(clientIp),
    certs,
    originalDestination: () => ({ ip: serverIp, port: 8080 }),
    resolveDestination: (ip, port) => ({ kind: "hbone", workload: serverWorkload, identity: SERVER_IDENTITY, address: { ip, port } }),
    audit: new MemorySink(),
    logger: silentLogger(),
  });
  await proxy.start();
  t.teardown(() => proxy.stop().then(() => undefined));
  return proxy;
}

test("pool key sorts destination identities", (t) => {
  const base: HboneDestination = {
    sourceIdentity: CLIENT_IDENTITY,
    sourceIp: "10.0.0.1",
    destinationIdentities: [identity("apps", "b"), identity("apps", "a")],
    hboneAddress: { ip: "10.0.0.2", port: HBONE_PORT },
  };
  const swapped = { ...base, destinationIdentities: [identity("apps", "a"), identity("apps", "b")] };

  t.is(poolKeyOf(base), poolKeyOf(swapped));
  t.is(
    poolKeyOf(base),
    "spiffe://cluster.local/ns/default/sa/sleep spiffe://cluster.local/ns/apps/sa/a,spiffe://cluster.local/ns/apps/sa/b 10.0.0.2:15008 10.0.0.1",
  );
  t.not(poolKeyOf(base), poolKeyOf({ ...base, sourceIp: "10.0.0.3" }));
  t.not(poolKeyOf(base), poolKeyOf({ ...base, hboneAddress: { ip: "10.0.0.4", port: HBONE_PORT } }));
});

test("proxy reuses one connection for sequential tunnels", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.60.2", port: HBONE_PORT });
  const proxy = await startProxy(t, 60, certManager(t, ca));
  const mesh = { clientIp: "127.77.60.1" } as Mesh;

  const first = await exchange(mesh, Buffer.from("first"));
  const second = await exchange(mesh, Buffer.from("second"));

  t.is(first.received.toString(), "first");
  t.is(second.received.toString(), "second");
  t.is(server.sessions, 1);
  t.is(server.clientSerials.length, 1);
  const stats = proxy.poolStats();
  t.is(stats.keys.length, 1);
  t.is(stats.keys[0].connections, 1);
  t.is(stats.keys[0].streams, 0);
});

test("proxy reuses one connection with the inbound server", async (t) => {
  const mesh = await startMesh(t, { subnet: 61 });
  await startApp(t, mesh.serverIp, 8080, echo);

  const first = await exchange(mesh, Buffer.from("one"));
  const second = await exchange(mesh, Buffer.from("two"));

  t.is(first.received.toString(), "one");
  t.is(second.received.toString(), "two");
  const stats = mesh.outbound.poolStats();
  t.is(stats.keys.length, 1);
  t.is(stats.keys[0].connections, 1);
  await waitFor(() => mesh.destinationAudit.records.length === 2, 2_000, "two inbound records");
  t.is(mesh.destinationAudit.records.filter((record) => record.error === undefined).length, 2);
});

test("150 concurrent tunnels open 2 connections", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.62.2", port: HBONE_PORT });
  const setup = createPool(t, 62, certManager(t, ca));

  const streams = await Promise.all(Array.from({ length: 150 }, () => openTunnel(setup, 62)));

  t.is(server.sessions, 2);
  t.is(server.maxOpenStreams, 100);
  const stats = setup.pool.stats();
  t.is(stats.keys.length, 1);
  t.is(stats.keys[0].connections, 2);
  t.is(stats.keys[0].streams, 150);
  t.is(stats.keys[0].waiting, 0);
  t.is(await roundTrip(streams[149], "still echoing"), "still echoing");
  for (const stream of streams) {
    stream.close();
  }
  await waitFor(() => setup.pool.stats().keys[0]?.streams === 0, 2_000, "all streams to close");
});

test("peer limit of 10 opens 15 connections for 150", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.63.2", port: HBONE_PORT, maxConcurrentStreams: 10 });
  const setup = createPool(t, 63, certManager(t, ca));

  const streams = await Promise.all(Array.from({ length: 150 }, () => openTunnel(setup, 63)));

  t.is(server.sessions, 15);
  t.is(server.maxOpenStreams, 10);
  const stats = setup.pool.stats();
  t.is(stats.keys[0].connections, 15);
  t.is(stats.keys[0].streams, 150);
  for (const stream of streams) {
    stream.close();
  }
});

test("idle connection closes after the idle timeout", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.64.2", port: HBONE_PORT });
  const setup = createPool(t, 64, certManager(t, ca), { idleTimeoutMs: 300 });

  const stream = await openTunnel(setup, 64);
  stream.close();
  await waitFor(() => setup.pool.stats().keys[0]?.streams === 0, 1_000, "the stream to close");
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.is(pooledConnections(setup.pool), 1, "closed before the idle timeout");
  t.is(server.closedSessions, 0);

  await waitFor(() => server.closedSessions === 1, 2_000, "the server session to close");
  t.is(pooledConnections(setup.pool), 0);
  const next = await openTunnel(setup, 64);
  t.is(await roundTrip(next, "after idle"), "after idle");
  t.is(server.sessions, 2);
});

test("missed PING acknowledgement destroys the connection", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.65.2", port: HBONE_PORT });
  const setup = createPool(t, 65, certManager(t, ca), { pingIntervalMs: 100, pingTimeoutMs: 300 });
  server.mute = true;

  const stuck = await setup.pool.request(setup.destination, connectHeaders(65));
  const stuckError = new Promise<Error>((resolve, reject) => {
    stuck.once("error", resolve);
    setTimeout(() => reject(new Error("the stream on the silent connection was not reset within 3 s")), 3_000).unref();
  });
  t.is(pooledConnections(setup.pool), 1);
  server.mute = false;

  const error = await stuckError;
  t.regex(error.message, /did not acknowledge a PING within 300 ms/);
  t.is(pooledConnections(setup.pool), 0);
  const next = await openTunnel(setup, 65);
  t.is(await roundTrip(next, "alive"), "alive");
  t.is(server.sessions, 1);
  t.is(server.clientSerials.length, 2);
});

test("answered PINGs keep the connection", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.66.2", port: HBONE_PORT });
  // The 2.5 s wait is longer than the 1 s PING timeout, so a PING whose acknowledgement the pool
  // failed to count would destroy the connection before the round trip.
  const setup = createPool(t, 66, certManager(t, ca), { pingIntervalMs: 50, pingTimeoutMs: 1_000 });

  const stream = await openTunnel(setup, 66);
  await new Promise((resolve) => setTimeout(resolve, 2_500));

  t.is(pooledConnections(setup.pool), 1, "the pool destroyed the connection during the PING wait");
  t.is(await roundTrip(stream, "still here"), "still here");
  t.is(server.sessions, 1);
  stream.close();
});

test("connect failure does not poison later requests", async (t) => {
  const ca = await createCa(t);
  const setup = createPool(t, 67, certManager(t, ca));

  const error = await t.throwsAsync(setup.pool.request(setup.destination, connectHeaders(67)));
  t.is((error as { code?: string }).code, "UPSTREAM_CONNECT_FAILED");
  t.regex(error.message, /connect to 127\.77\.67\.2:15008 failed/);
  t.is(pooledConnections(setup.pool), 0);

  await startServer(t, ca, { ip: "127.77.67.2", port: HBONE_PORT });
  const stream = await openTunnel(setup, 67);
  t.is(await roundTrip(stream, "back"), "back");
});

test("identity failure does not poison later requests", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.68.2", port: HBONE_PORT, identity: identity("apps", "impostor") });
  const setup = createPool(t, 68, certManager(t, ca));

  const failures = await Promise.allSettled([1, 2, 3].map(() => setup.pool.request(setup.destination, connectHeaders(68))));
  for (const failure of failures) {
    t.is(failure.status, "rejected");
    const reason = (failure as PromiseRejectedResult).reason as { code?: string; message: string };
    t.is(reason.code, "IDENTITY_ERROR");
    t.regex(reason.message, /presented spiffe:\/\/cluster\.local\/ns\/apps\/sa\/impostor, expected spiffe:\/\/cluster\.local\/ns\/apps\/sa\/echo/);
  }
  t.is(server.tcpConnections, 1, "waiters on one handshake share it");
  t.is(pooledConnections(setup.pool), 0);

  server.setCertificate(withSecureContext(await ca.issue(SERVER_IDENTITY)));
  const stream = await openTunnel(setup, 68);
  t.is(await roundTrip(stream, "trusted"), "trusted");
});

test("aborted request leaves an idle connection", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.72.2", port: HBONE_PORT });
  const setup = createPool(t, 72, certManager(t, ca), { idleTimeoutMs: 200 });
  const abort = new AbortController();

  const request = setup.pool.request(setup.destination, connectHeaders(72), abort.signal);
  abort.abort();

  const error = await t.throwsAsync(request);
  t.is((error as { code?: string }).code, "STREAM_RESET");
  t.regex(error.message, /aborted while its connection was being set up/);
  await waitFor(() => server.sessions === 1, 2_000, "the handshake to finish");
  await waitFor(() => server.closedSessions === 1, 2_000, "the idle connection to close");
  t.is(pooledConnections(setup.pool), 0);
});

test("GOAWAY keeps open streams and moves new ones", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.69.2", port: HBONE_PORT });
  const setup = createPool(t, 69, certManager(t, ca));
  const open = await openTunnel(setup, 69);

  for (const session of server.live) {
    session.goaway(http2.constants.NGHTTP2_NO_ERROR, 1);
  }
  await waitFor(() => pooledConnections(setup.pool) === 0, 1_000, "the connection to leave the pool");

  t.is(setup.pool.stats().draining, 1);
  t.is(await roundTrip(open, "draining"), "draining");
  const next = await openTunnel(setup, 69);
  t.is(await roundTrip(next, "fresh"), "fresh");
  t.is(server.sessions, 2);
});

test("new connections use the rotated certificate", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.70.2", port: HBONE_PORT });
  let current = withSecureContext(await ca.issue(CLIENT_IDENTITY));
  const certs: CertificateProvider = { get: async () => current };
  const setup = createPool(t, 70, certs, { maxStreamsPerConnection: 1 });
  const first = await openTunnel(setup, 70);

  current = withSecureContext(await ca.issue(CLIENT_IDENTITY));
  const second = await openTunnel(setup, 70);

  t.is(server.clientSerials.length, 2);
  t.not(server.clientSerials[0], server.clientSerials[1]);
  t.is(await roundTrip(first, "old certificate"), "old certificate");
  t.is(await roundTrip(second, "new certificate"), "new certificate");
});

test("a rotation retires pooled connections and new streams use the new certificate", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.74.2", port: HBONE_PORT });
  const { certs, rotate } = rotatingCerts(withSecureContext(await ca.issue(CLIENT_IDENTITY)));
  const setup = createPool(t, 74, certs);
  const first = await openTunnel(setup, 74);

  rotate(withSecureContext(await ca.issue(CLIENT_IDENTITY)));
  const second = await openTunnel(setup, 74);

  t.is(server.clientSerials.length, 2, "the stream after the rotation took a new connection");
  t.not(server.clientSerials[0], server.clientSerials[1]);
  t.is(setup.pool.stats().draining, 1);
  t.is(await roundTrip(first, "old certificate"), "old certificate", "the stream of the retired connection still flows");
  t.is(await roundTrip(second, "new certificate"), "new certificate");
});

test("a retired connection keeps its open stream past the PING timeout", async (t) => {
  const ca = await createCa(t);
  await startServer(t, ca, { ip: "127.77.76.2", port: HBONE_PORT });
  const { certs, rotate } = rotatingCerts(withSecureContext(await ca.issue(CLIENT_IDENTITY)));
  // The timeout leaves room for a loaded machine: the server shares this process's event loop with
  // the other tests of the file, and a late PING acknowledgement would count as a dead connection.
  const setup = createPool(t, 76, certs, { pingIntervalMs: 100, pingTimeoutMs: 1_000 });
  const open = await openTunnel(setup, 76);

  rotate(withSecureContext(await ca.issue(CLIENT_IDENTITY)));
  // Many PING intervals and more than two timeouts pass while the retired connection carries its stream.
  await new Promise((resolve) => setTimeout(resolve, 2_500));

  t.false(open.destroyed, "the stream was cut when its retired connection stopped answering PINGs");
  t.is(await roundTrip(open, "still flowing"), "still flowing");
});

test("a connection retires when its certificate expires", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.75.2", port: HBONE_PORT });
  const issued = withSecureContext(await ca.issue(CLIENT_IDENTITY));
  // The manager never hands out an expired certificate, so the pool learns expiry from notAfter alone.
  const shortLived = { ...issued, notAfter: new Date(Date.now() + 300) };
  let current = shortLived;
  const setup = createPool(t, 75, { get: async () => current });
  await openTunnel(setup, 75);
  current = issued;

  await waitFor(() => setup.pool.stats().draining === 1, 2_000, "the connection to retire at notAfter");
  await openTunnel(setup, 75);

  t.is(server.clientSerials.length, 2);
});

test("pool close sends GOAWAY and rejects requests", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.71.2", port: HBONE_PORT });
  const setup = createPool(t, 71, certManager(t, ca), { closeGraceMs: 200 });
  const stream = await openTunnel(setup, 71);

  const started = Date.now();
  await setup.pool.close();

  t.true(Date.now() - started < 1_000);
  t.true(stream.destroyed);
  await waitFor(() => server.closedSessions === 1, 1_000, "the server session to close");
  const error = await t.throwsAsync(setup.pool.request(setup.destination, connectHeaders(71)));
  t.is((error as { code?: string }).code, "STREAM_RESET");
});

/** Pod sockets as NetnsPodNetwork makes them: half-open allowed, for proxied applications. */
class HalfOpenLoopbackPodNetwork extends LoopbackPodNetwork {
  override connect(host: string, port: number): net.Socket {
    return net.connect({ host, port, localAddress: this.ip, allowHalfOpen: true });
  }
}

test("peer FIN on a half-open pod socket drops the connection", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.73.2", port: HBONE_PORT });
  const setup = createPool(t, 73, certManager(t, ca), { network: new HalfOpenLoopbackPodNetwork("127.77.73.1") });
  const first = await openTunnel(setup, 73);
  t.is(await roundTrip(first, "before"), "before");
  first.close();

  // The server closes its TCP connections without a GOAWAY, as an agent that is killed does.
  await server.close();
  await waitFor(() => pooledConnections(setup.pool) === 0, 2_000, "the pool to drop the connection the server closed");

  await startServer(t, ca, { ip: "127.77.73.2", port: HBONE_PORT });
  const next = await openTunnel(setup, 73);
  t.is(await roundTrip(next, "after"), "after");
});

/** Sends `text` through the outbound proxy on 127.77.<subnet>.1:15001, half-closes, and collects the reply. */
function exchangeThroughProxy(subnet: number, text: string): Promise<{ received: string; errorCode?: string }> {
  const clientIp = `127.77.${subnet}.1`;
  return new Promise((resolve, reject) => {
    let received = "";
    let errorCode: string | undefined;
    const socket = net.connect({ host: clientIp, port: 15001, localAddress: clientIp });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error("no reply through the proxy within 5 s"));
    }, 5_000);
    socket.on("data", (chunk: Buffer) => (received += chunk.toString()));
    socket.on("error", (error: NodeJS.ErrnoException) => (errorCode ??= error.code));
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ received, errorCode });
    });
    socket.end(text);
  });
}

/** A TCP relay whose server-to-client direction the test can hold, to delay what the server sends. */
interface Relay {
  /** Bytes relayed from clients to the server so far. */
  forwarded: number;
  hold(): void;
  release(): void;
}

/** Relays every connection to ip:port on to target; the test removes it. */
async function startRelay(t: ExecutionContext, ip: string, port: number, target: { ip: string; port: number }): Promise<Relay> {
  const upstreams = new Set<net.Socket>();
  const sockets = new Set<net.Socket>();
  let held = false;
  const relay: Relay = {
    forwarded: 0,
    hold: () => {
      held = true;
      for (const upstream of upstreams) upstream.pause();
    },
    release: () => {
      held = false;
      for (const upstream of upstreams) upstream.resume();
    },
  };
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: target.ip, port: target.port, localAddress: ip });
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on("error", () => undefined);
      socket.on("close", () => sockets.delete(socket));
    }
    upstreams.add(upstream);
    upstream.on("close", () => upstreams.delete(upstream));
    client.on("data", (chunk: Buffer) => {
      relay.forwarded += chunk.length;
      upstream.write(chunk);
    });
    upstream.pipe(client);
    if (held) upstream.pause();
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise<void>((resolve) => server.listen(port, ip, resolve));
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  );
  return relay;
}

/** Opens a connection through the outbound proxy on 127.77.<subnet>.1:15001 and keeps it open. */
async function openThroughProxy(t: ExecutionContext, subnet: number): Promise<net.Socket> {
  const clientIp = `127.77.${subnet}.1`;
  const socket = net.connect({ host: clientIp, port: 15001, localAddress: clientIp });
  socket.on("error", () => undefined);
  t.teardown(() => void socket.destroy());
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  return socket;
}

/** Writes `text` and resolves with the echo of the same length. */
function echoOf(socket: net.Socket, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let received = "";
    const timer = setTimeout(() => reject(new Error(`no echo of ${JSON.stringify(text)} within 3 s`)), 3_000);
    const onData = (chunk: Buffer): void => {
      received += chunk.toString();
      if (received.length >= text.length) {
        clearTimeout(timer);
        socket.off("data", onData);
        resolve(received);
      }
    };
    socket.on("data", onData);
    socket.write(text);
  });
}

test("stream that crosses a GOAWAY is retried", async (t) => {
  // The server is reached through a relay on .2, which lets the test deliver the server's GOAWAY
  // only after the client has sent a new stream: the race of a peer agent that hands its node over.
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.236.3", port: HBONE_PORT });
  const relay = await startRelay(t, "127.77.236.2", HBONE_PORT, { ip: "127.77.236.3", port: HBONE_PORT });
  await startProxy(t, 236, certManager(t, ca));
  const first = await openThroughProxy(t, 236);
  t.is(await echoOf(first, "first"), "first");

  relay.hold();
  for (const session of server.live) {
    // Stream 1 is the first connection's only stream, so the second connection's stream 3 is above it.
    session.goaway(http2.constants.NGHTTP2_NO_ERROR, 1);
  }
  const forwardedBefore = relay.forwarded;
  const second = exchangeThroughProxy(236, "after goaway");
  await waitFor(() => relay.forwarded > forwardedBefore, 2_000, "the second stream to reach the server");
  relay.release();
  const result = await second;

  t.is(result.errorCode, undefined);
  t.is(result.received, "after goaway");
  t.is(server.sessions, 2, "the retry did not use a fresh connection");
  t.is(await echoOf(first, "still open"), "still open", "the GOAWAY ended the first connection's open stream");
});

test("RST_STREAM REFUSED_STREAM is retried", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.237.2", port: HBONE_PORT, endStream: (n) => (n === 1 ? "refused" : undefined) });
  await startProxy(t, 237, certManager(t, ca));

  const result = await exchangeThroughProxy(237, "after refusal");

  t.is(result.errorCode, undefined);
  t.is(result.received, "after refusal");
  t.is(server.streams, 2);
  t.is(server.sessions, 2, "the retry did not use a fresh connection");
});

test("refused stream is retried only once", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.238.2", port: HBONE_PORT, endStream: () => "refused" });
  await startProxy(t, 238, certManager(t, ca));

  const result = await exchangeThroughProxy(238, "never served");

  t.is(result.errorCode, "ECONNRESET");
  t.is(result.received, "");
  t.is(server.streams, 2);
});

test("stream reset after processing is not retried", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.239.2", port: HBONE_PORT, endStream: (n) => (n === 1 ? "reset" : undefined) });
  await startProxy(t, 239, certManager(t, ca));

  const result = await exchangeThroughProxy(239, "maybe processed");

  t.is(result.errorCode, "ECONNRESET");
  t.is(server.streams, 1);
});

/** Returns a certificate provider whose rotations the test triggers with `rotate`. */
function rotatingCerts(initial: WorkloadCertificate): { certs: CertificateProvider; rotate(next: WorkloadCertificate): void } {
  let current = initial;
  const listeners = new Set<(certificate: WorkloadCertificate) => void>();
  return {
    certs: {
      get: async () => current,
      onRotation: (_identity, listener) => {
        listeners.add(listener);
        return () => listeners.delete(listener);
      },
    },
    rotate: (next) => {
      current = next;
      for (const listener of listeners) listener(next);
    },
  };
}

test("a retired connection closes after its last stream ends", async (t) => {
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.77.2", port: HBONE_PORT });
  const { certs, rotate } = rotatingCerts(withSecureContext(await ca.issue(CLIENT_IDENTITY)));
  const setup = createPool(t, 77, certs);
  const open = await openTunnel(setup, 77);

  rotate(withSecureContext(await ca.issue(CLIENT_IDENTITY)));
  await new Promise((resolve) => setTimeout(resolve, 200));
  t.is(server.closedSessions, 0, "the retired connection stays while its stream is open");
  open.close();

  // The server may see the close before the client's session emits it, so both are awaited.
  await waitFor(() => server.closedSessions === 1 && setup.pool.stats().draining === 0, 2_000, "the retired connection to close on both sides");
  t.is(server.closedSessions, 1);
});

test("rotation mid-handshake moves waiting requests", async (t) => {
  // A relay delays the server's side of the handshake while the requests wait and the certificate rotates.
  const ca = await createCa(t);
  const server = await startServer(t, ca, { ip: "127.77.79.2", port: HBONE_PORT });
  const relay = await startRelay(t, "127.77.78.2", HBONE_PORT, { ip: "127.77.79.2", port: HBONE_PORT });
  const old = withSecureContext(await ca.issue(CLIENT_IDENTITY));
  const { certs, rotate } = rotatingCerts(old);
  const setup = createPool(t, 78, certs);
  relay.hold();
  const tunnels = Array.from({ length: 50 }, () => openTunnel(setup, 78).then((stream) => ({ stream }), (error: Error) => ({ error })));
  await new Promise((resolve) => setTimeout(resolve, 200));

  const rotated = withSecureContext(await ca.issue(CLIENT_IDENTITY));
  rotate(rotated);
  relay.release();
  const results = await Promise.all(tunnels);

  t.deepEqual(results.filter((result) => "error" in result).map((result) => ("error" in result ? result.error.message : "")), []);
  const serials = server.clientSerials.map((serial) => (serial === new crypto.X509Certificate(old.certPem).serialNumber ? "old" : "new"));
  t.deepEqual(serials, ["old", "new"], "the handshake under way finished, then the requests took a connection with the new certificate");
  const echoes = await Promise.all(results.map((result, index) => ("stream" in result ? roundTrip(result.stream, `echo ${index}`) : "failed")));
  t.is(echoes.filter((echoed, index) => echoed === `echo ${index}`).length, 50);
});
