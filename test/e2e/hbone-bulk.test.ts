// A 1 GiB transfer through the outbound proxy and the inbound HBONE server on loopback, to an
// application that stops reading for periods, checked by streaming sha256 on both ends.

import crypto from "node:crypto";
import net from "node:net";
import test, { type ExecutionContext } from "ava";
import { PatternSource, delay } from "../unit/hbone-fixtures";
import { startApp, startMesh, type Mesh } from "../unit/proxy-fixtures";

const TOTAL_BYTES = 1 << 30;
/** The application stops reading for PAUSE_MS after each PAUSE_EVERY_BYTES it received. */
const PAUSE_EVERY_BYTES = 64 << 20;
const PAUSE_MS = 150;
/** Write sizes cycle through these, so that writes end at arbitrary offsets of the stream. */
const WRITE_SIZES = [1, 1_000, 16_384, 65_537, 131_071, 262_144];

interface Digest {
  bytes: number;
  sha256: string;
}

/** Reads to EOF with pauses, hashing as it goes, then closes its side. */
function readSlowly(socket: net.Socket): Promise<Digest & { pauses: number }> {
  return new Promise((resolve, reject) => {
    const hash = crypto.createHash("sha256");
    let bytes = 0;
    let nextPause = PAUSE_EVERY_BYTES;
    let pauses = 0;
    socket.on("data", (chunk: Buffer) => {
      hash.update(chunk);
      bytes += chunk.length;
      if (bytes >= nextPause) {
        nextPause += PAUSE_EVERY_BYTES;
        pauses += 1;
        socket.pause();
        setTimeout(() => socket.resume(), PAUSE_MS);
      }
    });
    socket.once("end", () => {
      socket.end();
      resolve({ bytes, sha256: hash.digest("hex"), pauses });
    });
    socket.once("error", reject);
  });
}

/** Writes `total` pattern bytes in varying sizes, waiting for drain whenever write() reports a full buffer. */
async function writePattern(socket: net.Socket, total: number): Promise<Digest> {
  const source = new PatternSource(42, Math.max(...WRITE_SIZES));
  const hash = crypto.createHash("sha256");
  let written = 0;
  for (let index = 0; written < total; index += 1) {
    const chunk = source.next(Math.min(WRITE_SIZES[index % WRITE_SIZES.length], total - written));
    hash.update(chunk);
    written += chunk.length;
    if (!socket.write(chunk)) {
      await new Promise((resolve) => socket.once("drain", resolve));
    }
  }
  socket.end();
  return { bytes: written, sha256: hash.digest("hex") };
}

/** Logs the throughput and CPU time of a transfer that started at `started`. */
function logRate(t: ExecutionContext, started: bigint, cpuStarted: NodeJS.CpuUsage, pauses: number): void {
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuStarted);
  t.log(
    `1 GiB in ${seconds.toFixed(1)} s (${((TOTAL_BYTES * 8) / seconds / 1e9).toFixed(2)} Gbit/s), ` +
      `${((cpu.user + cpu.system) / 1e6).toFixed(1)} CPU-s in this process, ${pauses} reader pauses of ${PAUSE_MS} ms`,
  );
}

function dialThroughMesh(mesh: Mesh): net.Socket {
  const client = net.connect({ host: mesh.clientIp, port: 15001, localAddress: mesh.clientIp, allowHalfOpen: true });
  client.on("error", () => undefined);
  return client;
}

test("1 GiB reaches a slow application byte-exact", async (t) => {
  t.timeout(180_000);
  const mesh = await startMesh(t, { subnet: 175 });
  let received: Promise<Digest & { pauses: number }> | undefined;
  await startApp(t, mesh.serverIp, 8080, (socket) => {
    received = readSlowly(socket);
  });
  const client = dialThroughMesh(mesh);
  const clientClosed = new Promise((resolve) => client.once("close", resolve));
  await new Promise((resolve) => client.once("connect", resolve));
  client.resume();
  const started = process.hrtime.bigint();
  const cpuStarted = process.cpuUsage();

  const sent = await writePattern(client, TOTAL_BYTES);
  while (!received) await delay(10);
  const atApp = await received;
  await clientClosed;
  logRate(t, started, cpuStarted, atApp.pauses);

  t.is(sent.bytes, TOTAL_BYTES);
  t.is(atApp.bytes, TOTAL_BYTES);
  t.is(atApp.sha256, sent.sha256);
  t.is(atApp.pauses, TOTAL_BYTES / PAUSE_EVERY_BYTES);
  const outbound = await mesh.sourceAudit.next("outbound");
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(outbound.error, undefined);
  t.is(inbound.error, undefined);
  t.is(outbound.bytes_sent, TOTAL_BYTES);
  t.is(inbound.bytes_sent, TOTAL_BYTES);
});

test("1 GiB reaches a slow client byte-exact", async (t) => {
  t.timeout(180_000);
  const mesh = await startMesh(t, { subnet: 176 });
  let sent: Promise<Digest> | undefined;
  await startApp(t, mesh.serverIp, 8080, (socket) => {
    socket.resume();
    sent = writePattern(socket, TOTAL_BYTES);
  });
  const client = dialThroughMesh(mesh);
  const received = readSlowly(client);
  const clientClosed = new Promise((resolve) => client.once("close", resolve));
  await new Promise((resolve) => client.once("connect", resolve));
  const started = process.hrtime.bigint();
  const cpuStarted = process.cpuUsage();

  const atClient = await received;
  const atApp = await sent!;
  await clientClosed;
  logRate(t, started, cpuStarted, atClient.pauses);

  t.is(atApp.bytes, TOTAL_BYTES);
  t.is(atClient.bytes, TOTAL_BYTES);
  t.is(atClient.sha256, atApp.sha256);
  t.is(atClient.pauses, TOTAL_BYTES / PAUSE_EVERY_BYTES);
  const outbound = await mesh.sourceAudit.next("outbound");
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(outbound.error, undefined);
  t.is(inbound.error, undefined);
  t.is(outbound.bytes_recv, TOTAL_BYTES);
  t.is(inbound.bytes_recv, TOTAL_BYTES);
});
