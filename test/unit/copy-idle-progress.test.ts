// The idle timeout of a copy counts bytes that move, read or written, in either direction. A slow
// reader behind full socket buffers keeps its connection; a reader that stopped reading does not.
// An HTTP/2 stream whose peer grants window slowly keeps its copy too. Loopback only. Serial: a
// test that blocks the event loop would stall the other's reader.

import test, { type ExecutionContext } from "ava";
import crypto from "node:crypto";
import http2 from "node:http2";
import net from "node:net";
import { once } from "node:events";
import { copyBidirectional, streamEndpoint, tcpEndpoint } from "../../agent/proxy/copy";
import { BufferedBytes } from "../../agent/proxy/buffered-bytes";
import { socketPair } from "../harness/socket-pair";

/** Joins two loopback connections by a copy with the idle timeout `idleTimeoutMs`: client → (copy) → app. */
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

/**
 * Joins a loopback TCP connection by a copy to an HTTP/2 stream of a local server, as on the node
 * of an HBONE client: client → (copy) → tunnel stream → `onStream`.
 */
async function tunneledPair(t: ExecutionContext, idleTimeoutMs: number, onStream: (stream: http2.ServerHttp2Stream) => void) {
  const server = http2.createServer();
  server.on("stream", (stream) => {
    stream.on("error", () => undefined);
    stream.respond({ ":status": 200 });
    onStream(stream);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const session = http2.connect(`http://127.0.0.1:${(server.address() as net.AddressInfo).port}`);
  session.on("error", () => undefined);
  t.teardown(() => {
    session.destroy();
    server.close();
  });
  const tunnel = session.request({ ":method": "POST", ":path": "/" });
  tunnel.on("error", () => undefined);
  await once(tunnel, "response");
  const client = await socketPair();
  client.near.on("error", () => undefined);
  const copy = copyBidirectional(tcpEndpoint("client", client.far), streamEndpoint("tunnel", tunnel), undefined, {
    idleTimeoutMs,
    buffered: new BufferedBytes(1 << 30),
  });
  return { client: client.near, tunnel, copy };
}

test.serial("stream granting window slowly keeps its copy", async (t) => {
  let received = 0;
  const hash = crypto.createHash("sha256");
  const { client, tunnel, copy } = await tunneledPair(t, 200, (stream) => {
    // 4 KiB every 50 ms. Node grants window once half of the stream's 64 KiB was read, about
    // every 0.4 s, and no write to the stream completes in between.
    stream.pause();
    const timer = setInterval(() => {
      for (let chunk = stream.read(4096) ?? stream.read(); chunk !== null; chunk = null) {
        hash.update(chunk as Buffer);
        received += (chunk as Buffer).length;
      }
    }, 50);
    stream.once("end", () => {
      clearInterval(timer);
      stream.end();
    });
    stream.once("close", () => clearInterval(timer));
  });
  const payload = crypto.randomBytes(160 * 1024);
  client.end(payload);
  client.resume();
  const result = await copy;
  t.is(result.error, undefined, "the copy ended without an error");
  t.is(received, payload.length);
  t.is(hash.digest("hex"), crypto.createHash("sha256").update(payload).digest("hex"));
  t.false(tunnel.rstCode !== undefined && tunnel.rstCode !== http2.constants.NGHTTP2_NO_ERROR, "the tunnel was not reset");
});

test.serial("idle copy with a stream is reset", async (t) => {
  const { copy } = await tunneledPair(t, 200, () => undefined);
  const keepAlive = setInterval(() => undefined, 1_000);
  t.teardown(() => clearInterval(keepAlive));
  const result = await copy;
  t.is(result.error?.code, "IDLE_TIMEOUT");
});
