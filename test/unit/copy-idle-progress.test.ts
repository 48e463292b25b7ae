// The idle timeout of a copy counts bytes that move, read or written, in either direction. A slow
// reader behind full socket buffers keeps its connection; a reader that stopped reading does not.
// Loopback TCP only. Serial: a test that blocks the event loop would stall the other's reader.

import test from "ava";
import crypto from "node:crypto";
import net from "node:net";
import { once } from "node:events";
import { copyBidirectional, tcpEndpoint } from "../../agent/proxy/copy";
import { BufferedBytes } from "../../agent/proxy/limit-tracker";

/** Returns both ends of a TCP connection on loopback. */
async function socketPair(): Promise<{ near: net.Socket; far: net.Socket }> {
  const server = net.createServer({ allowHalfOpen: true });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as net.AddressInfo;
  const accepted = once(server, "connection");
  const near = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true });
  const [far] = (await accepted) as [net.Socket];
  await once(near, "connect");
  server.close();
  return { near, far };
}

/** Two loopback connections joined by a copy: client → (copy) → app, with the idle timeout `idleTimeoutMs`. */
async function proxiedPair(idleTimeoutMs: number) {
  const client = await socketPair();
  const app = await socketPair();
  const copy = copyBidirectional(tcpEndpoint("client", client.far), tcpEndpoint("application", app.near), undefined, {
    idleTimeoutMs,
    buffered: new BufferedBytes(1 << 30),
  });
  for (const socket of [client.near, app.far]) socket.on("error", () => undefined);
  return { client: client.near, app: app.far, proxied: [client.far, app.near], copy };
}

test.serial("a slow reader behind full buffers keeps its transfer past the idle timeout", async (t) => {
  const { client, app, copy } = await proxiedPair(400);
  // More than the kernel buffers of both connections hold, so the copy waits on the reader.
  const payload = crypto.randomBytes(8 * 1024 * 1024);
  client.end(payload);
  app.pause();
  const hash = crypto.createHash("sha256");
  let received = 0;
  let ended = false;
  app.once("end", () => (ended = true));
  // 64 KiB every 50 ms: several times slower than the writer, and steady.
  while (!ended && !app.destroyed) {
    for (let chunk = app.read(64 * 1024) ?? app.read(); chunk !== null; chunk = null) {
      hash.update(chunk as Buffer);
      received += (chunk as Buffer).length;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  app.end();
  const result = await copy;
  t.is(result.error, undefined, "the copy ended without an error");
  t.is(received, payload.length);
  t.is(hash.digest("hex"), crypto.createHash("sha256").update(payload).digest("hex"));
});

test.serial("a reader that stopped reading with full buffers is reset with IDLE_TIMEOUT", async (t) => {
  const { client, app, proxied, copy } = await proxiedPair(300);
  app.pause();
  // The writer fills every buffer on the way, then nothing moves.
  client.write(crypto.randomBytes(16 * 1024 * 1024));
  // The copy's timer does not hold the process open, and stuck sockets may not either.
  const keepAlive = setInterval(() => undefined, 1_000);
  t.teardown(() => clearInterval(keepAlive));
  const result = await copy;
  t.is(result.error?.code, "IDLE_TIMEOUT");
  t.true(result.bytesForward > 0);
  t.true(proxied.every((socket) => socket.destroyed), "the copy reset both of its sockets");
});
