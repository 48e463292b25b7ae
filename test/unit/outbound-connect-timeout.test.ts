// The deadline of the response to a CONNECT: a destination that completes TLS and HTTP/2 and acknowledges
// PINGs, but never responds to a CONNECT, must not keep the source pod's outbound slot forever.
// Real outbound proxy, TLS and HTTP/2 on loopback; the destination is a bare HTTP/2 server.

import test, { type ExecutionContext } from "ava";
import http2 from "node:http2";
import net from "node:net";
import { CertManager } from "../../agent/identity/cert-manager";
import { hboneTlsOptions, withSecureContext } from "../../agent/identity/certificate";
import { silentLogger } from "../../agent/log";
import { LimitTracker } from "../../agent/proxy/limit-tracker";
import { DEFAULT_LIMITS } from "../../agent/proxy/limits";
import { CONNECT_RESPONSE_TIMEOUT_MS, OutboundProxy } from "../../agent/proxy/outbound";
import { CONNECT_TIMEOUT_MS } from "../../agent/proxy/hbone";
import { LoopbackPodNetwork, MemorySink, createCa, identity, workload } from "./proxy-fixtures";

const CLIENT_IP = "127.77.241.1";
const SERVER_IP = "127.77.241.2";

/** Starts an HBONE server that accepts every CONNECT stream, never sends a response and keeps the streams in the returned array. */
async function startSilentServer(t: ExecutionContext, certificate: Parameters<typeof hboneTlsOptions>[0]): Promise<http2.ServerHttp2Stream[]> {
  const streams: http2.ServerHttp2Stream[] = [];
  const sessions = new Set<http2.ServerHttp2Session>();
  const server = http2.createSecureServer({ ...hboneTlsOptions(certificate), requestCert: true, rejectUnauthorized: true });
  server.on("session", (session) => {
    sessions.add(session);
    session.on("close", () => sessions.delete(session));
    session.on("error", () => undefined);
  });
  server.on("stream", (stream) => {
    stream.on("error", () => undefined);
    streams.push(stream);
  });
  await new LoopbackPodNetwork(SERVER_IP).listen(server, 15008);
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        for (const session of sessions) session.destroy();
        server.close(() => resolve());
      }),
  );
  return streams;
}

/** Connects to the outbound proxy as the pod's application and resolves with how the connection ended. */
function dial(t: ExecutionContext): Promise<string> {
  const socket = net.connect({ host: CLIENT_IP, port: 15001, localAddress: CLIENT_IP });
  t.teardown(() => socket.destroy());
  let outcome = "closed";
  socket.on("error", (error: NodeJS.ErrnoException) => (outcome = error.code ?? error.message));
  socket.write("hello");
  return new Promise((resolve) => socket.once("close", () => resolve(outcome)));
}

test("the default deadline is the connect timeout plus a margin", (t) => {
  t.true(CONNECT_RESPONSE_TIMEOUT_MS > CONNECT_TIMEOUT_MS);
});

test("a CONNECT without an answer ends with TUNNEL_TIMEOUT and frees the pod's slot", async (t) => {
  const ca = await createCa(t);
  const certs = new CertManager(ca, silentLogger());
  t.teardown(() => certs.close());
  const serverIdentity = identity("apps", "silent");
  const streams = await startSilentServer(t, withSecureContext(await ca.issue(serverIdentity)));
  const server = workload("silent", "apps", "silent", SERVER_IP);
  const audit = new MemorySink();
  const outbound = new OutboundProxy({
    node: "aafx2-n1",
    workload: workload("sleep", "default", "sleep", CLIENT_IP),
    identity: identity("default", "sleep"),
    network: new LoopbackPodNetwork(CLIENT_IP),
    certs,
    originalDestination: () => ({ ip: SERVER_IP, port: 8080 }),
    resolveDestination: (ip, port) => ({ kind: "hbone", workload: server, identity: serverIdentity, address: { ip, port } }),
    audit,
    logger: silentLogger(),
    // One slot: the second connection gets through only if the first gave its slot back.
    limitTracker: new LimitTracker({ ...DEFAULT_LIMITS, maxConnectionsPerPod: 1 }),
    connectResponseTimeoutMs: 300,
  });
  await outbound.start();
  t.teardown(() => outbound.stop().then(() => undefined));

  for (let attempt = 1; attempt <= 2; attempt += 1) {
    t.is(await dial(t), "ECONNRESET");
    const record = await audit.next("outbound");
    audit.records.length = 0;
    t.is(record.error?.code, "TUNNEL_TIMEOUT");
    t.regex(record.error?.message ?? "", /sent no response to the CONNECT within 0\.3 s/);
    t.is(streams.length, attempt, "each connection reached the server with its own CONNECT");
  }
  // The proxy cancelled the unanswered streams, so they take no slot of the pooled connection.
  for (const stream of streams) {
    if (!stream.closed) await new Promise((resolve) => stream.once("close", resolve));
    t.is(stream.rstCode, http2.constants.NGHTTP2_CANCEL);
  }
});
