import test from "ava";
import crypto from "node:crypto";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import { silentLogger } from "../../agent/log";
import { ConnectionDrain } from "../../agent/proxy/drain";
import { InboundPlaintextServer } from "../../agent/proxy/inbound-plaintext";
import {
  ALLOW_ALL,
  LoopbackPodNetwork,
  MemorySink,
  exchange,
  identity,
  rawHboneSession,
  sha256,
  startApp,
  startMesh,
  waitForOpen,
  workload,
} from "./proxy-fixtures";

/** Creates a fake connection whose end the test controls. */
function fakeConnection(): { done: Promise<void>; finish: () => void; aborted: boolean } {
  let finish = (): void => undefined;
  const done = new Promise<void>((resolve) => (finish = resolve));
  return { done, finish, aborted: false };
}

function drainOf(connections: Set<ReturnType<typeof fakeConnection>>): ConnectionDrain<ReturnType<typeof fakeConnection>> {
  return new ConnectionDrain(
    () => connections,
    (connection) => {
      connection.aborted = true;
      connections.delete(connection);
      connection.finish();
    },
  );
}

/** Replies with `body` after `delayMs` and closes, whatever the client sent. */
function delayedReply(body: Buffer, delayMs: number) {
  return (socket: net.Socket): void => {
    socket.resume();
    const timer = setTimeout(() => socket.end(body), delayMs);
    socket.once("close", () => clearTimeout(timer));
  };
}

/** Resolves with the error code of a TCP connect to ip:port, or "connected". */
function connectOutcome(ip: string, port: number, localAddress: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: ip, port, localAddress });
    socket.once("connect", () => {
      socket.destroy();
      resolve("connected");
    });
    socket.once("error", (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message));
  });
}

test("drain counts connections that finish in time", async (t) => {
  const first = fakeConnection();
  const second = fakeConnection();
  const connections = new Set([first, second]);
  const drain = drainOf(connections);

  const result = drain.drain(1_000);
  setTimeout(() => {
    connections.delete(first);
    first.finish();
    connections.delete(second);
    second.finish();
  }, 50);

  t.deepEqual(await result, { open: 2, finished: 2, aborted: 0 });
  t.false(first.aborted);
  t.false(second.aborted);
});

test("drain aborts what is open at the deadline", async (t) => {
  const quick = fakeConnection();
  const slow = fakeConnection();
  const connections = new Set([quick, slow]);
  const drain = drainOf(connections);
  setTimeout(() => {
    connections.delete(quick);
    quick.finish();
  }, 20);

  const startedAt = Date.now();
  const summary = await drain.drain(200);

  t.deepEqual(summary, { open: 2, finished: 1, aborted: 1 });
  t.true(slow.aborted);
  t.false(quick.aborted);
  t.true(Date.now() - startedAt >= 190, `the drain ended after ${Date.now() - startedAt} ms, before its deadline`);
  t.true(drain.expired);
});

test("second drain call shortens the deadline", async (t) => {
  const open = fakeConnection();
  const drain = drainOf(new Set([open]));

  const startedAt = Date.now();
  const first = drain.drain(10_000);
  setTimeout(() => void drain.drain(0), 50);

  t.deepEqual(await first, { open: 1, finished: 0, aborted: 1 });
  t.true(Date.now() - startedAt < 2_000, "the second call did not cut the drain short");
});

test("later drain call never extends the deadline", async (t) => {
  const open = fakeConnection();
  const drain = drainOf(new Set([open]));

  const startedAt = Date.now();
  const first = drain.drain(150);
  const second = drain.drain(10_000);

  t.is(first, second);
  t.deepEqual(await second, { open: 1, finished: 0, aborted: 1 });
  t.true(Date.now() - startedAt < 2_000);
});

test("outbound drain lets an open connection finish", async (t) => {
  const mesh = await startMesh(t, { subnet: 90 });
  const body = crypto.randomBytes(256 * 1024);
  await startApp(t, mesh.serverIp, 8080, delayedReply(body, 400));
  const pending = exchange(mesh, Buffer.from("request"));
  await waitForOpen(mesh.inbound);

  const startedAt = Date.now();
  const stopped = mesh.outbound.stop(3_000);
  const refused = await connectOutcome(mesh.clientIp, 15001, mesh.clientIp);
  const result = await pending;
  const summary = await stopped;

  t.is(refused, "ECONNREFUSED", "the outbound listener accepted a connection after stop()");
  t.is(result.errorCode, undefined);
  t.is(sha256(result.received), sha256(body));
  t.deepEqual(summary, { open: 1, finished: 1, aborted: 0 });
  t.true(Date.now() - startedAt < 2_500, "stop() waited for the deadline though the connection had finished");
  t.is(mesh.sourceAudit.records.length, 1);
  t.is(mesh.sourceAudit.records[0].error, undefined);
  t.is(mesh.sourceAudit.records[0].bytes_recv, body.length);
});

test("outbound drain resets at the deadline", async (t) => {
  const mesh = await startMesh(t, { subnet: 91 });
  await startApp(t, mesh.serverIp, 8080, (socket) => socket.resume());
  const pending = exchange(mesh, Buffer.from("never answered"));
  await waitForOpen(mesh.inbound);

  const startedAt = Date.now();
  const summary = await mesh.outbound.stop(300);
  const elapsed = Date.now() - startedAt;
  const result = await pending;

  t.deepEqual(summary, { open: 1, finished: 0, aborted: 1 });
  t.true(elapsed >= 290 && elapsed < 2_000, `stop() took ${elapsed} ms with a 300 ms deadline`);
  t.is(result.errorCode, "ECONNRESET");
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.error?.code, "DRAIN_TIMEOUT");
  t.is(mesh.sourceAudit.records.length, 1);
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(inbound.error?.code, "STREAM_RESET");
});

test("outbound second stop aborts at once", async (t) => {
  const mesh = await startMesh(t, { subnet: 92 });
  await startApp(t, mesh.serverIp, 8080, (socket) => socket.resume());
  const pending = exchange(mesh, Buffer.from("never answered"));
  await waitForOpen(mesh.inbound);

  const startedAt = Date.now();
  const first = mesh.outbound.stop(10_000);
  await new Promise((resolve) => setTimeout(resolve, 100));
  const second = mesh.outbound.stop(0);
  const summary = await first;

  t.is(await second, summary);
  t.deepEqual(summary, { open: 1, finished: 0, aborted: 1 });
  t.true(Date.now() - startedAt < 2_000, "the second stop() did not cut the drain short");
  t.is((await pending).errorCode, "ECONNRESET");
  t.is(mesh.sourceAudit.records.length, 1);
  t.is(mesh.sourceAudit.records[0].error?.code, "DRAIN_TIMEOUT");
});

test("outbound stop without grace resets at once", async (t) => {
  const mesh = await startMesh(t, { subnet: 93 });
  await startApp(t, mesh.serverIp, 8080, (socket) => socket.resume());
  const pending = exchange(mesh, Buffer.from("hold"));
  await waitForOpen(mesh.inbound);

  const summary = await mesh.outbound.stop();

  t.deepEqual(summary, { open: 1, finished: 0, aborted: 1 });
  t.is((await pending).errorCode, "ECONNRESET");
  t.is(mesh.sourceAudit.records[0].error?.code, "STREAM_RESET");
});

test("inbound drain sends GOAWAY and finishes streams", async (t) => {
  const mesh = await startMesh(t, { subnet: 94 });
  const body = crypto.randomBytes(256 * 1024);
  await startApp(t, mesh.serverIp, 8080, delayedReply(body, 400));
  const pending = exchange(mesh, Buffer.from("request"));
  const idle = await rawHboneSession(mesh, { secureContext: (await mesh.certs.get(mesh.clientIdentity)).secureContext });
  const goaway = new Promise<number>((resolve) => idle.once("goaway", (code: number) => resolve(code)));
  await waitForOpen(mesh.inbound);

  const startedAt = Date.now();
  const stopped = mesh.inbound.stop(3_000);
  const refused = await connectOutcome(mesh.serverIp, 15008, mesh.clientIp);
  const result = await pending;
  const summary = await stopped;

  t.is(await goaway, 0, "the idle HBONE connection received no GOAWAY NO_ERROR");
  t.is(refused, "ECONNREFUSED", "the HBONE listener accepted a connection after stop()");
  t.is(result.errorCode, undefined);
  t.is(sha256(result.received), sha256(body));
  t.deepEqual(summary, { open: 1, finished: 1, aborted: 0 });
  t.true(Date.now() - startedAt < 2_500, "stop() waited for the deadline though the stream had finished");
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(inbound.error, undefined);
  t.is(inbound.bytes_recv, body.length);
  t.is(mesh.destinationAudit.records.length, 1);
  closeQuietly(idle);
});

test("inbound drain sends GOAWAY to late handshakes", async (t) => {
  const mesh = await startMesh(t, { subnet: 97 });
  const raw = net.connect({ host: mesh.serverIp, port: 15008, localAddress: mesh.clientIp });
  raw.on("error", () => undefined);
  await new Promise<void>((resolve) => raw.once("connect", () => resolve()));
  await new Promise((resolve) => setTimeout(resolve, 50));

  const stopped = mesh.inbound.stop(2_000);
  const secure = tls.connect({
    socket: raw,
    ALPNProtocols: ["h2"],
    servername: "",
    checkServerIdentity: () => undefined,
    secureContext: (await mesh.certs.get(mesh.clientIdentity)).secureContext,
  });
  secure.on("error", () => undefined);
  const session = http2.connect(`https://${mesh.serverIp}:15008`, { createConnection: () => secure });
  session.on("error", () => undefined);
  const goaway = await new Promise<number | string>((resolve) => {
    session.once("goaway", (code: number) => resolve(code));
    session.once("close", () => resolve("closed without GOAWAY"));
    setTimeout(() => resolve("no GOAWAY within 3 s"), 3_000).unref();
  });

  t.is(goaway, 0);
  t.deepEqual(await stopped, { open: 0, finished: 0, aborted: 0 });
  closeQuietly(session);
});

test("inbound drain resets streams at the deadline", async (t) => {
  const mesh = await startMesh(t, { subnet: 95 });
  await startApp(t, mesh.serverIp, 8080, (socket) => socket.resume());
  const pending = exchange(mesh, Buffer.from("never answered"));
  await waitForOpen(mesh.inbound);

  const startedAt = Date.now();
  const summary = await mesh.inbound.stop(300);
  const elapsed = Date.now() - startedAt;
  const result = await pending;

  t.deepEqual(summary, { open: 1, finished: 0, aborted: 1 });
  t.true(elapsed >= 290 && elapsed < 2_000, `stop() took ${elapsed} ms with a 300 ms deadline`);
  t.is(result.errorCode, "ECONNRESET", "the client did not see the cut stream as a reset");
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(inbound.error?.code, "DRAIN_TIMEOUT");
  t.is(mesh.destinationAudit.records.length, 1);
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.error?.code, "STREAM_RESET");
});

/**
 * A pod network for the plaintext server on loopback. No sk_lookup steers port 8080 to the 15006
 * listener here, so the listener itself takes port 8080. The server's connect to the application at
 * 8080 then goes to `appPort` instead.
 */
class SteeredPodNetwork extends LoopbackPodNetwork {
  constructor(
    ip: string,
    private readonly appPort: number,
  ) {
    super(ip);
  }

  override listen(server: net.Server): Promise<void> {
    return super.listen(server, 8080);
  }

  override connect(host: string): net.Socket {
    return net.connect({ host, port: this.appPort, localAddress: this.ip });
  }
}

/** Connects to ip:8080 as a plaintext client, writes a request, and collects the reply until close. */
function plaintextExchange(ip: string, localAddress: string): Promise<{ received: Buffer; errorCode?: string }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let errorCode: string | undefined;
    const socket = net.connect({ host: ip, port: 8080, localAddress });
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", (error: NodeJS.ErrnoException) => (errorCode ??= error.code));
    socket.on("close", () => resolve({ received: Buffer.concat(chunks), errorCode }));
    socket.write("request");
  });
}

test("plaintext drain finishes then resets", async (t) => {
  const podIp = "127.77.96.2";
  const clientIp = "127.77.96.1";
  const audit = new MemorySink();
  const server = new InboundPlaintextServer({
    node: "node-2",
    workload: workload("echo", "apps", "echo", podIp),
    identity: identity("apps", "echo"),
    network: new SteeredPodNetwork(podIp, 18080),
    authorize: () => ALLOW_ALL,
    lookupSource: () => undefined,
    audit,
    logger: silentLogger(),
  });
  const body = crypto.randomBytes(64 * 1024);
  let served = 0;
  // The first connection gets its reply after 200 ms, the second never gets one.
  await startApp(t, podIp, 18080, (socket) => (served++ === 0 ? delayedReply(body, 200)(socket) : socket.resume()));
  await server.start();
  t.teardown(() => server.stop());
  const quick = plaintextExchange(podIp, clientIp);
  const stuck = plaintextExchange(podIp, clientIp);
  await new Promise((resolve) => setTimeout(resolve, 100));

  const startedAt = Date.now();
  const stopped = server.stop(600);
  const refused = await connectOutcome(podIp, 8080, clientIp);
  const summary = await stopped;
  const elapsed = Date.now() - startedAt;

  t.is(refused, "ECONNREFUSED", "the plaintext listener accepted a connection after stop()");
  t.deepEqual(summary, { open: 2, finished: 1, aborted: 1 });
  t.true(elapsed >= 590 && elapsed < 2_000, `stop() took ${elapsed} ms with a 600 ms deadline`);
  const finished = await quick;
  t.is(finished.errorCode, undefined);
  t.is(sha256(finished.received), sha256(body));
  t.is((await stuck).errorCode, "ECONNRESET");
  const codes = audit.records.map((record) => record.error?.code ?? "none").sort();
  t.deepEqual(codes, ["DRAIN_TIMEOUT", "none"]);
});

function closeQuietly(session: http2.ClientHttp2Session): void {
  if (!session.destroyed) session.destroy();
}
