// Outbound proxy to inbound HBONE server over real TLS 1.3 and HTTP/2 on loopback addresses.

import crypto from "node:crypto";
import type net from "node:net";
import test from "ava";
import type { AuditRecord } from "../../agent/audit/record";
import {
  createCa,
  echo,
  exchange,
  identity,
  sha256,
  startApp,
  startMesh,
  waitForOpen,
} from "./proxy-fixtures";

/** Checks the fields every record carries. */
function assertRecordShape(t: import("ava").ExecutionContext, record: AuditRecord): void {
  t.regex(record.time, /^\d{4}-\d\d-\d\dT/);
  t.regex(record.start, /^\d{4}-\d\d-\d\dT/);
  t.truthy(record.node);
  t.truthy(record.connection_id);
  t.true(typeof record.duration_ms === "number" && record.duration_ms >= 0);
  t.true(Number.isInteger(record.bytes_sent));
  t.true(Number.isInteger(record.bytes_recv));
  t.truthy(record.src.addr);
  t.truthy(record.dst.addr);
}

test("tunnel echoes bytes and writes both records", async (t) => {
  const mesh = await startMesh(t, { subnet: 1 });
  await startApp(t, mesh.serverIp, 8080, echo);

  const result = await exchange(mesh, Buffer.from("hello through the mesh"));
  t.is(result.errorCode, undefined);
  t.is(result.received.toString(), "hello through the mesh");

  const outbound = await mesh.sourceAudit.next("outbound");
  const inbound = await mesh.destinationAudit.next("inbound");
  assertRecordShape(t, outbound);
  assertRecordShape(t, inbound);
  t.is(outbound.transport, "hbone");
  t.is(outbound.decision, "allow");
  t.is(outbound.error, undefined);
  t.is(outbound.src.identity, "spiffe://cluster.local/ns/default/sa/sleep");
  t.is(outbound.src.workload, "sleep");
  t.is(outbound.dst.addr, `${mesh.serverIp}:8080`);
  t.is(outbound.dst.hbone_addr, `${mesh.serverIp}:15008`);
  t.is(outbound.dst.identity, "spiffe://cluster.local/ns/apps/sa/echo");
  t.is(outbound.bytes_sent, 22);
  t.is(outbound.bytes_recv, 22);

  t.is(inbound.transport, "hbone");
  t.is(inbound.decision, "allow");
  t.is(inbound.reason, "no_policy");
  t.is(inbound.error, undefined);
  t.is(inbound.src.identity, "spiffe://cluster.local/ns/default/sa/sleep");
  t.is(inbound.src.workload, "sleep");
  t.is(inbound.src.namespace, "default");
  t.is(inbound.dst.workload, "echo");
  t.is(inbound.dst.addr, `${mesh.serverIp}:8080`);
  t.is(inbound.bytes_sent, 22);
  t.is(inbound.bytes_recv, 22);
  t.deepEqual(mesh.authorizations, [
    { sourceIdentity: mesh.clientIdentity, sourceIp: mesh.clientIp, destinationIp: mesh.serverIp, destinationPort: 8080 },
  ]);
});

test("tunnel carries 20 MB intact", async (t) => {
  const mesh = await startMesh(t, { subnet: 2 });
  await startApp(t, mesh.serverIp, 8080, echo);
  const payload = crypto.randomBytes(20 * 1024 * 1024);

  const result = await exchange(mesh, payload, 60_000);

  t.is(result.errorCode, undefined);
  t.is(result.received.length, payload.length);
  t.is(sha256(result.received), sha256(payload));
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.bytes_sent, payload.length);
  t.is(outbound.bytes_recv, payload.length);
});

test("tunnel keeps half-closed connections open", async (t) => {
  const mesh = await startMesh(t, { subnet: 3 });
  // Reads until the client's FIN, then replies on the direction that is still open.
  await startApp(t, mesh.serverIp, 8080, (socket) => {
    let total = 0;
    socket.on("data", (chunk: Buffer) => (total += chunk.length));
    socket.on("end", () => setTimeout(() => socket.end(`received ${total} bytes`), 50));
  });

  const result = await exchange(mesh, Buffer.alloc(100_000, 7));

  t.is(result.errorCode, undefined);
  t.is(result.received.toString(), "received 100000 bytes");
});

test("tunnel denied by policy resets the client", async (t) => {
  const mesh = await startMesh(t, {
    subnet: 4,
    authorize: () => ({ decision: "deny", policy: "apps/deny-sleep", reason: "denied_by_policy", dryRun: [] }),
  });
  let appConnections = 0;
  await startApp(t, mesh.serverIp, 8080, (socket) => {
    appConnections += 1;
    echo(socket);
  });

  const result = await exchange(mesh, Buffer.from("let me in"));

  t.is(result.errorCode, "ECONNRESET");
  t.is(result.received.length, 0);
  t.is(appConnections, 0);
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(inbound.decision, "deny");
  t.is(inbound.policy, "apps/deny-sleep");
  t.is(inbound.reason, "denied_by_policy");
  t.is(inbound.error?.code, "POLICY_DENIED");
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.decision, "deny");
  t.is(outbound.reason, "denied_at_destination");
  t.is(outbound.error?.code, "POLICY_DENIED");
  assertRecordShape(t, outbound);
  assertRecordShape(t, inbound);
});

test("tunnel to wrong identity resets the client", async (t) => {
  const mesh = await startMesh(t, { subnet: 5, expectedIdentity: identity("apps", "not-echo") });
  await startApp(t, mesh.serverIp, 8080, echo);

  const result = await exchange(mesh, Buffer.from("secret"));

  t.is(result.errorCode, "ECONNRESET");
  t.is(result.received.length, 0);
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.error?.code, "IDENTITY_ERROR");
  t.regex(outbound.error?.message ?? "", /presented spiffe:\/\/cluster\.local\/ns\/apps\/sa\/echo, expected .*not-echo/);
  t.is(outbound.dst.identity, "spiffe://cluster.local/ns/apps/sa/not-echo");
  t.is(mesh.destinationAudit.records.length, 0);
});

test("tunnel to absent application answers 503", async (t) => {
  const mesh = await startMesh(t, { subnet: 6 });
  mesh.destination = { ip: mesh.serverIp, port: 8099 };

  const result = await exchange(mesh, Buffer.from("anyone?"));

  t.is(result.errorCode, "ECONNRESET");
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(inbound.error?.code, "UPSTREAM_CONNECT_FAILED");
  t.is(inbound.decision, "allow");
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.error?.code, "TUNNEL_REJECTED");
  t.regex(outbound.error?.message ?? "", /status 503/);
});

test("application reset reaches the client as a reset", async (t) => {
  const mesh = await startMesh(t, { subnet: 7 });
  await startApp(t, mesh.serverIp, 8080, (socket: net.Socket) => {
    socket.once("data", () => socket.resetAndDestroy());
  });

  const result = await exchange(mesh, Buffer.from("trigger"));

  t.is(result.errorCode, "ECONNRESET");
  const inbound = await mesh.destinationAudit.next("inbound");
  t.is(inbound.error?.code, "STREAM_RESET");
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.error?.code, "STREAM_RESET");
});

test("passthrough destination is plain TCP", async (t) => {
  const mesh = await startMesh(t, { subnet: 8, passthrough: true });
  await startApp(t, mesh.serverIp, 8080, echo);

  const result = await exchange(mesh, Buffer.from("plain"));

  t.is(result.received.toString(), "plain");
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.transport, "plaintext");
  t.is(outbound.dst.hbone_addr, undefined);
  t.is(outbound.bytes_sent, 5);
  t.is(mesh.destinationAudit.records.length, 0);
});

test("missing original destination resets the client", async (t) => {
  const mesh = await startMesh(t, { subnet: 9, destination: null });

  const result = await exchange(mesh, Buffer.from("where to?"));

  t.is(result.errorCode, "ECONNRESET");
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.error?.code, "NO_ORIGINAL_DESTINATION");
  t.is(outbound.decision, "deny");
  t.is(outbound.dst.addr, "unknown");
});

test("server of another trust domain rejects the client", async (t) => {
  const mesh = await startMesh(t, { subnet: 10, serverTrustDomain: "other.local" });
  await startApp(t, mesh.serverIp, 8080, echo);

  const result = await exchange(mesh, Buffer.from("hello"));

  t.is(result.errorCode, "ECONNRESET");
  const outbound = await mesh.sourceAudit.next("outbound");
  t.is(outbound.error?.code, "TLS_FAILURE");
  // The pool tries a second connection, so the server rejects one or two handshakes, each with its record.
  t.true(mesh.destinationAudit.records.length >= 1);
  t.true(mesh.destinationAudit.records.every((record) => record.reason === "wrong_trust_domain" && record.error?.code === "WRONG_TRUST_DOMAIN"));
});

test("stop resets open connections and records them", async (t) => {
  const mesh = await startMesh(t, { subnet: 11 });
  await startApp(t, mesh.serverIp, 8080, () => undefined);
  const pending = exchange(mesh, Buffer.from("hold"));
  await waitForOpen(mesh.inbound);

  await mesh.outbound.stop();
  await mesh.inbound.stop();

  const result = await pending;
  t.is(result.errorCode, "ECONNRESET");
  t.is(mesh.sourceAudit.records.length, 1);
  t.is(mesh.sourceAudit.records[0].error?.code, "STREAM_RESET");
  t.is(mesh.destinationAudit.records.length, 1);
});

test("another CA cannot impersonate a client", async (t) => {
  const otherCa = await createCa(t);
  const mesh = await startMesh(t, { subnet: 12 });
  await startApp(t, mesh.serverIp, 8080, echo);
  const forged = await otherCa.issue(mesh.clientIdentity);
  const { rawHboneSession, connectStatus } = await import("./proxy-fixtures");

  const outcome = await rawHboneSession(mesh, {
    key: forged.keyPem,
    cert: forged.chainPem,
    ca: mesh.ca.rootPem,
    minVersion: "TLSv1.3",
  })
    .then((session) => connectStatus(session, { ":method": "CONNECT", ":authority": `${mesh.serverIp}:8080` }))
    .catch((error: NodeJS.ErrnoException) => ({ status: undefined, error: error.code ?? error.message }));

  t.is(outcome.status, undefined);
  t.truthy(outcome.error);
  t.is(mesh.destinationAudit.records.length, 1);
  t.is(mesh.destinationAudit.records[0].reason, "unknown_root");
  t.is(mesh.destinationAudit.records[0].decision, "deny");
});
