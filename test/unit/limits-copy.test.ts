import test from "ava";
import crypto from "node:crypto";
import { once } from "node:events";
import { copyBidirectional, tcpEndpoint } from "../../agent/proxy/copy";
import { BufferedBytes } from "../../agent/proxy/buffered-bytes";
import { socketPair } from "../harness/socket-pair";

/** Joins two loopback connections by a proxy copy with `limits`: client → (proxy copy) → app. */
async function proxiedPair(limits: { idleTimeoutMs: number; buffered?: BufferedBytes }) {
  const client = await socketPair();
  const app = await socketPair();
  const copy = copyBidirectional(tcpEndpoint("client", client.far), tcpEndpoint("application", app.near), undefined, limits);
  return { client: client.near, app: app.far, copy };
}

async function waitFor(condition: () => boolean, what: string): Promise<void> {
  for (let waited = 0; !condition(); waited += 10) {
    if (waited > 10_000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test("buffered bytes rise while the reader stalls and return to zero", async (t) => {
  const buffered = new BufferedBytes(1 << 30);
  const { client, app, copy } = await proxiedPair({ idleTimeoutMs: 0, buffered });
  app.pause();
  const payload = crypto.randomBytes(32 * 1024 * 1024);
  client.end(payload);
  await waitFor(() => buffered.bytes > 0, "bytes held by the copy");
  t.true(buffered.bytes > 0);
  t.true(buffered.bytes <= payload.length);

  const hash = crypto.createHash("sha256");
  app.on("data", (chunk: Buffer) => hash.update(chunk));
  app.resume();
  await once(app, "end");
  app.end();
  const result = await copy;
  t.is(result.error, undefined);
  t.is(result.bytesForward, payload.length);
  t.is(hash.digest("hex"), crypto.createHash("sha256").update(payload).digest("hex"));
  t.is(buffered.bytes, 0);
});

test("buffered bytes return to zero after a reset", async (t) => {
  const buffered = new BufferedBytes(1 << 30);
  const { client, app, copy } = await proxiedPair({ idleTimeoutMs: 0, buffered });
  app.pause();
  client.on("error", () => undefined);
  app.on("error", () => undefined);
  client.write(crypto.randomBytes(16 * 1024 * 1024));
  await waitFor(() => buffered.bytes > 0, "bytes held by the copy");
  app.resetAndDestroy();
  const result = await copy;
  t.truthy(result.error);
  t.is(buffered.bytes, 0);
});

test("idle connection is reset with IDLE_TIMEOUT", async (t) => {
  const { client, app, copy } = await proxiedPair({ idleTimeoutMs: 50 });
  client.on("error", () => undefined);
  app.on("error", () => undefined);
  const result = await copy;
  t.is(result.error?.code, "IDLE_TIMEOUT");
  t.regex(result.error?.message ?? "", /--idle-timeout/);
  await Promise.all([client.closed ? undefined : once(client, "close"), app.closed ? undefined : once(app, "close")]);
  t.true(client.destroyed);
  t.true(app.destroyed);
});

test("traffic keeps a connection past the idle timeout", async (t) => {
  const { client, app, copy } = await proxiedPair({ idleTimeoutMs: 400 });
  client.on("error", () => undefined);
  app.on("error", () => undefined);
  let received = 0;
  app.on("data", (chunk: Buffer) => (received += chunk.length));
  // 12 bytes over about 600 ms, longer than the timeout, at most 50 ms apart.
  for (let i = 0; i < 12; i += 1) {
    client.write("x");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  await waitFor(() => received === 12, "the bytes at the application");
  t.false(client.destroyed);
  const result = await copy;
  t.is(result.error?.code, "IDLE_TIMEOUT");
  t.is(result.bytesForward, 12);
});

test("no idle timeout with 0", async (t) => {
  const { client, app, copy } = await proxiedPair({ idleTimeoutMs: 0 });
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.false(client.destroyed);
  client.end();
  await once(app, "end");
  app.end();
  t.is((await copy).error, undefined);
});
