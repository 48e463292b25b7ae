// The inbound HBONE server's limits on loopback: the header list size, streams per peer identity,
// connections per pod, the handshake deadline, idle sessions, the liveness check, and invalid-frame
// floods, each with its refusal record and counter. The netns end-to-end test (abuse-hbone) covers
// other floods and TLS failures with real pods.

import http2 from "node:http2";
import net from "node:net";
import test, { type ExecutionContext } from "ava";
import type { AuditEvent } from "../../agent/audit/record";
import { silentLogger } from "../../agent/log";
import { HBONE_PORT } from "../../agent/proxy/hbone";
import type { InboundHboneServerOptions } from "../../agent/proxy/inbound";
import { headerListSize } from "../../agent/proxy/inbound-guard";
import { LimitTracker } from "../../agent/proxy/limit-tracker";
import { DEFAULT_LIMITS, type ProxyLimits } from "../../agent/proxy/limits";
import { RefusalLog } from "../../agent/proxy/refusal-log";
import {
  FrameFlag,
  FrameType,
  RawH2Connection,
  Setting,
  connectHeaderBlock,
  dataFrame,
  errorCodeOf,
  headersFrame,
  pingFrame,
  settingsFrame,
  windowUpdateFrame,
} from "../harness/h2-raw";
import { delay, openClientSession, openTunnel, startInboundPod, type InboundPod } from "./hbone-fixtures";

const APP_PORT = 8080;

/**
 * Waits past the tick of a stream reset. NOTE: on Node 20.20, a client session can be destroyed in
 * the same tick as the server's RST_STREAM of one stream while another stream is open. Its destroy()
 * then never returns and memory grows until std::bad_alloc, so the teardown destroys the client sessions.
 */
function afterReset(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

interface GuardedPod extends InboundPod {
  refused: AuditEvent[];
  refusals: RefusalLog;
  limitTracker: LimitTracker;
  /** The open connections of the echo application on APP_PORT. */
  appSockets: Set<net.Socket>;
}

/**
 * Starts an inbound pod with `limits`, other server `options` and a refusal log that keeps its
 * records, plus an echo application.
 */
async function startGuardedPod(
  t: ExecutionContext,
  subnet: number,
  limits: Partial<ProxyLimits>,
  options: Partial<InboundHboneServerOptions> = {},
): Promise<GuardedPod> {
  const refused: AuditEvent[] = [];
  const refusals = new RefusalLog({ node: "node-2", audit: { write: (record) => refused.push(record) }, logger: silentLogger() });
  const limitTracker = new LimitTracker({ ...DEFAULT_LIMITS, ...limits });
  const pod = await startInboundPod(t, subnet, { limitTracker, refusals, ...options });
  const appSockets = new Set<net.Socket>();
  const app = net.createServer((socket) => {
    appSockets.add(socket);
    socket.once("close", () => appSockets.delete(socket));
    socket.on("error", () => undefined);
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => app.listen(APP_PORT, pod.serverIp, resolve));
  // close() waits for the open connections, which a stuck stream would hold for ever.
  t.teardown(() => new Promise<void>((resolve) => {
    app.close(() => resolve());
    for (const socket of appSockets) socket.destroy();
  }));
  return { ...pod, refused, refusals, limitTracker, appSockets };
}

function refusalsOf(pod: GuardedPod, reason: string): AuditEvent[] {
  return pod.refused.filter((record) => record.type === "connection.refused" && record.reason === reason);
}

function totalOf(pod: GuardedPod, reason: string): number {
  return pod.refusals.totals().find((total) => total.listener === "inbound" && total.reason === reason)?.count ?? 0;
}

async function waitFor(condition: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(20);
  }
}

test("header list size counts 32 bytes per field", (t) => {
  t.is(headerListSize({}), 0);
  t.is(headerListSize({ ":method": "CONNECT" }), 7 + 7 + 32);
  t.is(headerListSize({ a: ["bb", "ccc"] }), 1 + 2 + 32 + 1 + 3 + 32);
  t.is(headerListSize({ "x-é": "ü" }), 4 + 2 + 32, "sizes are in bytes, not characters");
});

test("streams over the peer identity limit are refused", async (t) => {
  const pod = await startGuardedPod(t, 180, { maxStreamsPerPeer: 2 });
  const authority = `${pod.serverIp}:${APP_PORT}`;
  const first = await openClientSession(t, pod);
  const second = await openClientSession(t, pod);
  await openTunnel(first, authority);
  await openTunnel(second, authority);

  const error = await t.throwsAsync(openTunnel(first, authority));
  await afterReset();
  t.regex(error?.message ?? "", new RegExp(`RST_STREAM code ${http2.constants.NGHTTP2_REFUSED_STREAM}`));
  const [record] = refusalsOf(pod, "streams_per_peer");
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.is(record.limit, 2);
  t.regex(record.message, /spiffe:\/\/cluster\.local\/ns\/default\/sa\/sleep has 2 open streams/);
  t.is(record.dst?.workload, "echo");
  t.is(totalOf(pod, "streams_per_peer"), 1);
  t.is(pod.audit.records.length, 0, "a refused stream gets no connection record");
});

test("streams over the pod limit are refused", async (t) => {
  const pod = await startGuardedPod(t, 181, { maxConnectionsPerPod: 1 });
  const session = await openClientSession(t, pod);
  await openTunnel(session, `${pod.serverIp}:${APP_PORT}`);

  await t.throwsAsync(openTunnel(session, `${pod.serverIp}:${APP_PORT}`));
  await afterReset();
  t.is(refusalsOf(pod, "connections_per_pod").length, 1);
  t.is(totalOf(pod, "connections_per_pod"), 1);
});

test("a closed stream releases its counts", async (t) => {
  const pod = await startGuardedPod(t, 182, { maxStreamsPerPeer: 1 });
  const session = await openClientSession(t, pod);
  const tunnel = await openTunnel(session, `${pod.serverIp}:${APP_PORT}`);
  tunnel.close();
  await waitFor(() => pod.audit.records.length === 1, "the first stream's record");

  await t.notThrowsAsync(openTunnel(session, `${pod.serverIp}:${APP_PORT}`));
  t.deepEqual(refusalsOf(pod, "streams_per_peer"), []);
});

/** Opens a raw HBONE connection to the pod with the client's certificate and sends the preface. */
async function rawConnection(t: ExecutionContext, pod: GuardedPod, settings: ReadonlyArray<readonly [number, number]> = []): Promise<RawH2Connection> {
  const certificate = await pod.certs.get(pod.clientIdentity);
  const connection = await RawH2Connection.open({
    host: pod.serverIp,
    port: HBONE_PORT,
    tls: { certPem: certificate.chainPem, keyPem: certificate.keyPem, caPem: certificate.rootPem },
  });
  t.teardown(() => connection.destroy());
  connection.start(settings);
  return connection;
}

test("oversized header list gets 431", async (t) => {
  const pod = await startGuardedPod(t, 183, { maxHeaderListBytes: 1024 });
  const connection = await rawConnection(t, pod);

  // The client has not acknowledged the server's SETTINGS, so Node's own limit does not apply yet.
  connection.write(headersFrame(1, connectHeaderBlock(`${pod.serverIp}:${APP_PORT}`, [["x-pad", "p".repeat(2000)]])));
  const answer = await connection.waitForFrame((frame) => frame.streamId === 1, 5_000, "the answer on stream 1");

  t.is(answer.type, FrameType.HEADERS);
  t.true(answer.payload.includes(Buffer.from("431")), `:status 431 in ${answer.payload.toString("hex")}`);
  const [record] = refusalsOf(pod, "header_list_size");
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.is(record.limit, 1024);
  t.regex(record.message, /header list of 21\d\d bytes, more than the limit of 1024/);
  t.is(pod.audit.records.length, 0, "an oversized request gets no connection record");
});

test("oversized header list after SETTINGS ack is reset by Node", async (t) => {
  const pod = await startGuardedPod(t, 186, { maxHeaderListBytes: 1024 });
  const connection = await rawConnection(t, pod);
  await connection.waitForFrame((frame) => frame.type === FrameType.SETTINGS && frame.flags === 0, 5_000, "the server's SETTINGS");
  connection.write(settingsFrame([], true));
  await delay(100);

  connection.write(headersFrame(1, connectHeaderBlock(`${pod.serverIp}:${APP_PORT}`, [["x-pad", "p".repeat(2000)]])));
  const answer = await connection.waitForFrame((frame) => frame.streamId === 1, 5_000, "the answer on stream 1");

  t.is(answer.type, FrameType.RST_STREAM);
  t.is(errorCodeOf(answer), http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
  // NOTE: Node 20.20 resets the stream before any JavaScript event, so no refusal is recorded.
  t.deepEqual(refusalsOf(pod, "header_list_size"), []);
});

test("connection without a CONNECT closes at the deadline", async (t) => {
  const pod = await startGuardedPod(t, 184, { handshakeTimeoutMs: 300 });
  const session = await openClientSession(t, pod);
  await new Promise<void>((resolve) => session.once("close", () => resolve()));

  const [record] = refusalsOf(pod, "handshake_timeout");
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.regex(record.message, /sent no CONNECT request within 0\.3 s/);
  t.regex(record.src.addr, /^127\.77\.184\.1:\d+$/);
  t.is(record.port, HBONE_PORT);
});

test("idle HBONE session gets GOAWAY", async (t) => {
  const pod = await startGuardedPod(t, 185, { idleTimeoutMs: 300 });
  const connection = await rawConnection(t, pod);
  // One stream ends the handshake deadline; the application closes it at once.
  connection.write(headersFrame(1, connectHeaderBlock(`${pod.serverIp}:1`), { endStream: true }));
  await connection.waitForFrame((frame) => frame.streamId === 1, 5_000, "the answer to the CONNECT");

  const goaway = await connection.waitForGoaway(5_000);
  t.is(goaway.payload.readUInt32BE(4), http2.constants.NGHTTP2_NO_ERROR);
  t.is(totalOf(pod, "idle_timeout"), 1);
  t.is(connection.frames.filter((frame) => frame.type === FrameType.GOAWAY).length, 1);
});

/** Liveness checks fast enough for tests: a PING after 100 ms without a byte read, 300 ms to acknowledge it. */
const FAST_LIVENESS: Partial<InboundHboneServerOptions> = { liveness: { intervalMs: 100, pingTimeoutMs: 300 } };

/**
 * A header block that starts with a dynamic table size update to 2^31 - 1, past the server's
 * table size. nghttp2 responds with GOAWAY COMPRESSION_ERROR and then stops reading the socket
 * without a JavaScript event.
 */
const INVALID_HPACK_BLOCK = Buffer.from([0x3f, 0xff, 0xff, 0xff, 0xff, 0x0f]);

/** Opens `count` CONNECT streams to the echo application on a raw connection and waits for each response. */
async function openRawTunnels(connection: RawH2Connection, pod: GuardedPod, count: number): Promise<void> {
  for (let index = 0; index < count; index++) {
    connection.write(headersFrame(1 + 2 * index, connectHeaderBlock(`${pod.serverIp}:${APP_PORT}`)));
  }
  for (let index = 0; index < count; index++) {
    const streamId = 1 + 2 * index;
    await connection.waitForFrame((frame) => frame.streamId === streamId && frame.type === FrameType.HEADERS, 5_000, `the answer on stream ${streamId}`);
  }
}

/** Asserts that the pod's streams released everything: application sockets, buffered bytes, and the peer's stream slots. */
async function assertReleased(t: ExecutionContext, pod: GuardedPod, streams: number): Promise<void> {
  await waitFor(() => pod.appSockets.size === 0, "the application sockets to close");
  await waitFor(() => pod.audit.records.length === streams, "a record per stream");
  t.true(pod.audit.records.every((record) => record.error !== undefined), "each stream ended with an error");
  t.is(pod.limitTracker.buffered.bytes, 0);
  const session = await openClientSession(t, pod);
  for (let index = 0; index < streams; index++) {
    await t.notThrowsAsync(openTunnel(session, `${pod.serverIp}:${APP_PORT}`), `stream ${index + 1} of ${streams} of a new client`);
  }
}

test("session ended by nghttp2 releases its streams", async (t) => {
  const streams = 4;
  const pod = await startGuardedPod(t, 190, { maxStreamsPerPeer: streams }, FAST_LIVENESS);
  const connection = await rawConnection(t, pod);
  connection.write(settingsFrame([], true));
  await openRawTunnels(connection, pod, streams);
  await waitFor(() => pod.appSockets.size === streams, "an application socket per stream");

  connection.write(headersFrame(1 + 2 * streams, INVALID_HPACK_BLOCK));
  const goaway = await connection.waitForGoaway();
  t.is(errorCodeOf(goaway), http2.constants.NGHTTP2_COMPRESSION_ERROR);
  await waitFor(() => refusalsOf(pod, "http2_protocol").length === 1, "the http2_protocol record");

  const [record] = refusalsOf(pod, "http2_protocol");
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.regex(record.message, /read and wrote no byte while a PING waited 0\.3 s to be sent: Node\.js ended the session after an HTTP\/2 error of the client/);
  t.regex(record.message, /its 4 open streams/);
  t.regex(record.src.addr, /^127\.0\.0\.1:\d+$/, "the raw client's address");
  t.is(totalOf(pod, "http2_protocol"), 1);
  await waitFor(() => connection.isClosed, "the server to close the connection");
  await assertReleased(t, pod, streams);
});

test("unacknowledged PING closes the session", async (t) => {
  const streams = 2;
  const pod = await startGuardedPod(t, 191, { maxStreamsPerPeer: streams }, FAST_LIVENESS);
  // The raw client never acknowledges a PING.
  const connection = await rawConnection(t, pod);
  connection.write(settingsFrame([], true));
  await openRawTunnels(connection, pod, streams);

  await waitFor(() => connection.isClosed, "the server to close the connection");
  const ping = connection.frames.find((frame) => frame.type === FrameType.PING);
  t.truthy(ping, `a PING before the close; frames: ${connection.describeFrames()}`);
  const [record] = refusalsOf(pod, "http2_protocol");
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.regex(record.message, /did not acknowledge a PING within 0\.3 s while its HTTP\/2 session read and wrote no byte, so the agent closed the session and its 2 open streams/);
  t.is(totalOf(pod, "http2_protocol"), 1);
  await assertReleased(t, pod, streams);
});

test("session acknowledging PINGs stays open", async (t) => {
  const pod = await startGuardedPod(t, 192, {}, FAST_LIVENESS);
  const session = await openClientSession(t, pod);
  let pings = 0;
  session.on("ping", () => (pings += 1));
  const tunnel = await openTunnel(session, `${pod.serverIp}:${APP_PORT}`);

  await waitFor(() => pings >= 3, "three liveness PINGs");
  const echoed = new Promise<Buffer>((resolve) => tunnel.once("data", resolve));
  tunnel.write("still open");
  t.is((await echoed).toString(), "still open");
  t.deepEqual(pod.refused, []);
});

test("session of a client that reads its socket slowly stays open", async (t) => {
  const pod = await startGuardedPod(t, 195, {}, FAST_LIVENESS);
  // An application that sends more than the kernel buffers hold on loopback as soon as a tunnel connects.
  const payload = Buffer.alloc(4 * 1024 * 1024, 0x5a);
  const sender = net.createServer((socket) => {
    socket.on("error", () => undefined);
    socket.end(payload);
  });
  await new Promise<void>((resolve) => sender.listen(APP_PORT + 1, pod.serverIp, resolve));
  t.teardown(() => new Promise<void>((resolve) => sender.close(() => resolve())));

  // Windows large enough that the client never needs to send a WINDOW_UPDATE: it only reads.
  const connection = await rawConnection(t, pod, [[Setting.INITIAL_WINDOW_SIZE, 0x7fffffff]]);
  connection.write(settingsFrame([], true), windowUpdateFrame(0, 0x7fffffff - 65_535));
  connection.write(headersFrame(1, connectHeaderBlock(`${pod.serverIp}:${APP_PORT + 1}`)));
  await connection.waitForFrame((frame) => frame.streamId === 1 && frame.type === FrameType.HEADERS, 5_000, "the answer to the CONNECT");

  // One socket buffer (16 KiB) every 5 ms, and nothing sent but PING acknowledgements. A PING would
  // wait behind megabytes of DATA, far longer than the 0.3 s the client has to acknowledge it, so
  // the check must count the session's writes as progress.
  connection.socket.pause();
  let acknowledged = 0;
  const received = (): number => connection.frames.reduce((sum, frame) => sum + (frame.type === FrameType.DATA && frame.streamId === 1 ? frame.payload.length : 0), 0);
  while (received() < payload.length && !connection.isClosed) {
    connection.socket.read();
    const pings = connection.frames.filter((frame) => frame.type === FrameType.PING && (frame.flags & FrameFlag.ACK) === 0);
    for (const ping of pings.slice(acknowledged)) connection.write(pingFrame(ping.payload, true));
    acknowledged = pings.length;
    await delay(5);
  }

  t.false(connection.isClosed, `frames: ${connection.describeFrames().slice(-300)}`);
  t.is(received(), payload.length);
  t.deepEqual(refusalsOf(pod, "http2_protocol"), []);
});

test("empty DATA flood is recorded", async (t) => {
  const pod = await startGuardedPod(t, 193, {});
  const connection = await rawConnection(t, pod);
  connection.write(settingsFrame([], true));
  await openRawTunnels(connection, pod, 1);

  // Node counts an empty DATA frame without END_STREAM as invalid, and fails the session past 100 of them.
  connection.write(...Array.from({ length: 200 }, () => dataFrame(1, Buffer.alloc(0))));
  await waitFor(() => connection.isClosed, "the server to close the connection");

  const [record] = refusalsOf(pod, "http2_flood");
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.regex(record.message, /sent more than 100 invalid HTTP\/2 frames/);
  t.is(totalOf(pod, "http2_flood"), 1);
});

test("streams past the limit before SETTINGS ack are recorded", async (t) => {
  const limit = 5;
  const pod = await startGuardedPod(t, 194, { maxStreamsPerConnection: limit });
  const connection = await rawConnection(t, pod);

  // Without the acknowledgement, nghttp2 refuses the streams over the limit itself, and Node fails
  // the session once more than 100 were refused.
  const authority = `${pod.serverIp}:${APP_PORT}`;
  connection.write(...Array.from({ length: limit + 150 }, (_, index) => headersFrame(1 + 2 * index, connectHeaderBlock(authority))));
  await waitFor(() => connection.isClosed, "the server to close the connection");

  // How many of nghttp2's RST_STREAM REFUSED_STREAM frames leave before the session is destroyed varies with load.
  const [record] = refusalsOf(pod, "streams_per_connection");
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.is(record.limit, limit);
  t.is(totalOf(pod, "streams_per_connection"), 1);
});
