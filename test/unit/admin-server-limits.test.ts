import test from "ava";
import http from "node:http";
import net from "node:net";
import { AdminServer } from "../../agent/admin/server";
import { silentLogger } from "../../agent/log";
import type { RefusalEvent } from "../../agent/proxy/refusal-log";

/** The per-address limit of every admin, metrics and readiness server. */
const PER_SOURCE_LIMIT = 8;

async function startServer(t: { teardown(fn: () => void | Promise<void>): void }): Promise<{ port: number; refusals: RefusalEvent[] }> {
  const refusals: RefusalEvent[] = [];
  const server = new AdminServer(
    "127.0.0.1:0",
    { "/metrics": () => ({ ok: true }) },
    silentLogger(),
    {},
    { name: "metrics server", flag: "--metrics" },
    { log: { refuse: (event) => refusals.push(event) }, listener: "metrics" },
  );
  await server.start();
  t.teardown(() => server.stop());
  return { port: server.listeningAddress()!.port, refusals };
}

/** Connects from `localAddress` and resolves once connected; the caller destroys the socket. */
function connectFrom(port: number, localAddress: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port, localAddress }, () => resolve(socket));
    socket.once("error", reject);
  });
}

/** Resolves once `socket` closes, with whether the server sent any byte before. */
function closed(socket: net.Socket): Promise<{ received: number }> {
  return new Promise((resolve) => {
    let received = 0;
    socket.on("data", (chunk: Buffer) => (received += chunk.length));
    socket.on("error", () => undefined);
    socket.once("close", () => resolve({ received }));
  });
}

function get(port: number, localAddress: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const request = http.get({ host: "127.0.0.1", port, path: "/metrics", localAddress, agent: false }, (response) => {
      response.resume();
      response.on("end", () => resolve(response.statusCode ?? 0));
    });
    request.on("error", reject);
  });
}

test("connection over per-address limit is recorded", async (t) => {
  const { port, refusals } = await startServer(t);
  const held: net.Socket[] = [];
  t.teardown(() => held.forEach((socket) => socket.destroy()));
  for (let index = 0; index < PER_SOURCE_LIMIT; index += 1) held.push(await connectFrom(port, "127.0.0.2"));

  const extra = await connectFrom(port, "127.0.0.2");
  const outcome = await closed(extra);
  t.is(outcome.received, 0, "the server answered a connection over the limit");
  t.is(refusals.length, 1);
  const [refusal] = refusals;
  t.is(refusal.listener, "metrics");
  t.is(refusal.reason, "admin_connections");
  t.is(refusal.port, port);
  t.is(refusal.limit, PER_SOURCE_LIMIT);
  t.regex(refusal.src.addr, /^127\.0\.0\.2:\d+$/);
  t.is(refusal.dst?.addr, `127.0.0.1:${port}`);
  t.regex(refusal.message, /127\.0\.0\.2 has 8 open connections to the metrics server/);
});

test("other address and the node itself are still served", async (t) => {
  const { port, refusals } = await startServer(t);
  const held: net.Socket[] = [];
  t.teardown(() => held.forEach((socket) => socket.destroy()));
  for (let index = 0; index < PER_SOURCE_LIMIT; index += 1) held.push(await connectFrom(port, "127.0.0.2"));

  t.is(await get(port, "127.0.0.3"), 200);
  // A connection from the server's own address is not counted against any limit.
  t.is(await get(port, "127.0.0.1"), 200);
  t.deepEqual(refusals, []);
});

test("closed connection frees its slot", async (t) => {
  const { port, refusals } = await startServer(t);
  const held: net.Socket[] = [];
  t.teardown(() => held.forEach((socket) => socket.destroy()));
  for (let index = 0; index < PER_SOURCE_LIMIT; index += 1) held.push(await connectFrom(port, "127.0.0.2"));
  const first = held.shift()!;
  const gone = closed(first);
  first.destroy();
  await gone;
  // The server handles the close on a later tick than the client.
  await new Promise((resolve) => setTimeout(resolve, 50));

  t.is(await get(port, "127.0.0.2"), 200);
  t.deepEqual(refusals, []);
});

test("trickled headers get 408 and are recorded", async (t) => {
  const { port, refusals } = await startServer(t);
  const socket = await connectFrom(port, "127.0.0.2");
  t.teardown(() => socket.destroy());
  const outcome = new Promise<string>((resolve) => {
    let head = "";
    socket.on("data", (chunk: Buffer) => (head += chunk.toString("latin1")));
    socket.on("error", () => undefined);
    socket.once("close", () => resolve(head));
  });
  // The request line, never finished: the server's 5 s headers timeout ends it.
  socket.write("GET /metrics HT");

  t.regex(await outcome, /^HTTP\/1\.1 408 /);
  t.is(refusals.length, 1);
  const [refusal] = refusals;
  t.is(refusal.listener, "metrics");
  t.is(refusal.reason, "request_timeout");
  t.is(refusal.limit, 5);
  t.regex(refusal.src.addr, /^127\.0\.0\.2:\d+$/);
  t.is(refusal.dst?.addr, `127.0.0.1:${port}`);
  t.regex(refusal.message, /did not send its request headers within 5 s, the limit of the metrics server/);
});

test("malformed request gets 400 without a record", async (t) => {
  const { port, refusals } = await startServer(t);
  const socket = await connectFrom(port, "127.0.0.2");
  t.teardown(() => socket.destroy());
  const outcome = closed(socket);
  let head = "";
  socket.on("data", (chunk: Buffer) => (head += chunk.toString("latin1")));
  socket.write("NOT HTTP\r\n\r\n");

  await outcome;
  t.regex(head, /^HTTP\/1\.1 400 /);
  t.deepEqual(refusals, []);
});

test("idle keep-alive connection closes without a record", async (t) => {
  const { port, refusals } = await startServer(t);
  const socket = await connectFrom(port, "127.0.0.2");
  t.teardown(() => socket.destroy());
  const outcome = closed(socket);
  socket.write("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");

  // The server closes the connection after its keep-alive timeout, an ordinary close.
  t.true((await outcome).received > 0);
  t.deepEqual(refusals, []);
});
