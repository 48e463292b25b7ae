// The handshake deadline of the inbound HBONE server (15008) ends only with an admitted CONNECT
// stream. A client whose streams are all refused is closed at the deadline even with the idle
// timeout off, so a valid certificate cannot keep connections without a stream open forever.

import http2 from "node:http2";
import net from "node:net";
import test from "ava";
import type { AuditEvent } from "../../agent/audit/record";
import { silentLogger } from "../../agent/log";
import { LimitTracker } from "../../agent/proxy/limit-tracker";
import { DEFAULT_LIMITS } from "../../agent/proxy/limits";
import { RefusalLog } from "../../agent/proxy/refusal-log";
import { delay, openClientSession, openTunnel, startInboundPod } from "./hbone-fixtures";

const APP_PORT = 8080;

test("a connection whose only CONNECT was refused closes at the handshake deadline", async (t) => {
  const refused: AuditEvent[] = [];
  const refusals = new RefusalLog({ node: "aafx2-n2", audit: { write: (record) => refused.push(record) }, logger: silentLogger() });
  // One slot for the pod: the first session's tunnel takes it, so the second session's CONNECT is refused.
  const limitTracker = new LimitTracker({ ...DEFAULT_LIMITS, maxConnectionsPerPod: 1, handshakeTimeoutMs: 400, idleTimeoutMs: 0 });
  const pod = await startInboundPod(t, 243, { limitTracker, refusals });
  const app = net.createServer((socket) => socket.pipe(socket));
  await new Promise<void>((resolve) => app.listen(APP_PORT, pod.serverIp, resolve));
  t.teardown(() => new Promise<void>((resolve) => app.close(() => resolve())));
  const authority = `${pod.serverIp}:${APP_PORT}`;

  const admitted = await openClientSession(t, pod);
  await openTunnel(admitted, authority);
  const refusedSession = await openClientSession(t, pod);
  const error = await t.throwsAsync(openTunnel(refusedSession, authority));
  t.regex(error?.message ?? "", new RegExp(`RST_STREAM code ${http2.constants.NGHTTP2_REFUSED_STREAM}`));

  await new Promise<void>((resolve) => (refusedSession.closed ? resolve() : refusedSession.once("close", () => resolve())));
  const timeouts = refused.filter((record) => record.type === "connection.refused" && record.reason === "handshake_timeout");
  t.is(timeouts.length, 1);
  const [record] = timeouts;
  if (record?.type !== "connection.refused") return;
  t.regex(record.message, /sent no CONNECT request within 0\.4 s of connecting, or only refused ones/);
  t.is(record.src.addr.split(":")[0], pod.clientIp);

  // The session with an admitted stream outlives the deadline.
  await delay(500);
  t.false(admitted.closed || admitted.destroyed);
});
