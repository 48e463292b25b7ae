// The inbound HBONE server's responses to malformed or forbidden CONNECT requests.

import type http2 from "node:http2";
import test from "ava";
import { connectStatus, rawHboneSession, startApp, startMesh, echo, type Mesh } from "./proxy-fixtures";

async function clientSession(mesh: Mesh): Promise<http2.ClientHttp2Session> {
  const certificate = await mesh.certs.get(mesh.clientIdentity);
  return rawHboneSession(mesh, { secureContext: certificate.secureContext });
}

test("inbound answers 200 to a valid CONNECT", async (t) => {
  const mesh = await startMesh(t, { subnet: 20 });
  await startApp(t, mesh.serverIp, 8080, echo);
  const session = await clientSession(mesh);
  t.teardown(() => session.destroy());

  const outcome = await connectStatus(session, { ":method": "CONNECT", ":authority": `${mesh.serverIp}:8080` });

  t.is(outcome.status, 200);
});

test("inbound answers 400 to authority mismatch", async (t) => {
  const mesh = await startMesh(t, { subnet: 21 });
  await startApp(t, mesh.serverIp, 8080, echo);
  const session = await clientSession(mesh);
  t.teardown(() => session.destroy());

  const outcome = await connectStatus(session, { ":method": "CONNECT", ":authority": "127.77.21.9:8080" });

  t.is(outcome.status, 400);
  const record = await mesh.destinationAudit.next("inbound");
  t.is(record.error?.code, "AUTHORITY_MISMATCH");
  t.is(record.decision, "deny");
  t.is(mesh.authorizations.length, 0);
});

test("inbound answers 400 to invalid authority", async (t) => {
  const mesh = await startMesh(t, { subnet: 22 });
  const session = await clientSession(mesh);
  t.teardown(() => session.destroy());

  const outcome = await connectStatus(session, { ":method": "CONNECT", ":authority": "echo.apps:8080" });

  t.is(outcome.status, 400);
  const record = await mesh.destinationAudit.next("inbound");
  t.is(record.error?.code, "BAD_REQUEST");
});

test("inbound answers 400 to other methods", async (t) => {
  const mesh = await startMesh(t, { subnet: 23 });
  const session = await clientSession(mesh);
  t.teardown(() => session.destroy());

  const outcome = await connectStatus(session, { ":method": "GET", ":path": "/", ":authority": `${mesh.serverIp}:8080` });

  t.is(outcome.status, 400);
  const record = await mesh.destinationAudit.next("inbound");
  t.is(record.error?.code, "BAD_REQUEST");
});

test("inbound answers 503 to proxy ports", async (t) => {
  const mesh = await startMesh(t, { subnet: 24 });
  const session = await clientSession(mesh);
  t.teardown(() => session.destroy());

  for (const port of [15001, 15006, 15008]) {
    const outcome = await connectStatus(session, { ":method": "CONNECT", ":authority": `${mesh.serverIp}:${port}` });
    t.is(outcome.status, 503, `port ${port}`);
  }
  const records = mesh.destinationAudit.records;
  t.is(records.length, 3);
  t.true(records.every((record) => record.error?.code === "PROXY_PORT"));
});

test("inbound answers 401 when policy denies", async (t) => {
  const mesh = await startMesh(t, {
    subnet: 25,
    authorize: () => ({ decision: "deny", policy: "apps/only-admin", reason: "no_allow_match", dryRun: [] }),
  });
  const session = await clientSession(mesh);
  t.teardown(() => session.destroy());

  const outcome = await connectStatus(session, { ":method": "CONNECT", ":authority": `${mesh.serverIp}:8080` });

  t.is(outcome.status, 401);
  const record = await mesh.destinationAudit.next("inbound");
  t.is(record.decision, "deny");
  t.is(record.policy, "apps/only-admin");
  t.is(record.reason, "no_allow_match");
});

test("inbound answers 503 when the application is absent", async (t) => {
  const mesh = await startMesh(t, { subnet: 26 });
  const session = await clientSession(mesh);
  t.teardown(() => session.destroy());

  const outcome = await connectStatus(session, { ":method": "CONNECT", ":authority": `${mesh.serverIp}:8081` });

  t.is(outcome.status, 503);
  const record = await mesh.destinationAudit.next("inbound");
  t.is(record.error?.code, "UPSTREAM_CONNECT_FAILED");
});
