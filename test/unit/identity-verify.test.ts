// Peer certificate verification over real TLS 1.3 handshakes on loopback: the inbound HBONE server
// against clients presenting crafted certificates, and the HBONE client against servers doing so.
// Each pod pair uses 127.79.<subnet>.1 (client) and .2 (server).

import crypto from "node:crypto";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import test, { type ExecutionContext } from "ava";
import type { CertificateProvider } from "../../agent/identity/cert-manager";
import {
  chainFailureOf,
  leafSpiffeIdentity,
  verificationReasonOf,
  verifyServerCertificate,
  type AcceptedTrustDomains,
  type VerificationFailureReason,
} from "../../agent/identity/verify";
import { silentLogger } from "../../agent/log";
import { connectHbone } from "../../agent/proxy/hbone-client";
import { HBONE_PORT } from "../../agent/proxy/hbone";
import { InboundHboneServer } from "../../agent/proxy/inbound";
import { RefusalLog } from "../../agent/proxy/refusal-log";
import type { AuditEvent } from "../../agent/audit/record";
import type { RbacConnection } from "../../agent/rbac/types";
import type { Identity } from "../../agent/state/types";
import { asWorkloadCertificate, createIntermediate, createLeaf, createRoot, type LeafOptions, type TestCa, type TestLeaf } from "./cert-fixtures";
import { ALLOW_ALL, LoopbackPodNetwork, MemorySink, identity, workload } from "./proxy-fixtures";
import { delay } from "./hbone-fixtures";

const HOUR_MS = 3_600_000;
const CLIENT_ID = "spiffe://cluster.local/ns/default/sa/sleep";
const SERVER_ID = "spiffe://cluster.local/ns/apps/sa/echo";
const SERVER_IDENTITY = identity("apps", "echo");
const APP_PORT = 8080;

interface Roots {
  trusted: TestCa;
  untrusted: TestCa;
}

let rootsPromise: Promise<Roots> | undefined;

/** Creates the roots shared by all tests, once: one that servers and clients trust, one that they do not. */
function roots(): Promise<Roots> {
  rootsPromise ??= (async () => ({
    trusted: await createRoot({ name: "verify test trusted root" }),
    untrusted: await createRoot({ name: "verify test untrusted root" }),
  }))();
  return rootsPromise;
}

/** Returns a certificate provider that hands out `leaf` as the server's certificate, trusting `rootsPem`. */
function providerOf(leaf: TestLeaf, rootsPem: string): CertificateProvider {
  const certificate = asWorkloadCertificate(leaf, SERVER_IDENTITY, rootsPem);
  return { get: async () => certificate };
}

interface ServerPod {
  clientIp: string;
  serverIp: string;
  audit: MemorySink;
  /** The records of the server's refusal log, such as connection.refused. */
  refused: AuditEvent[];
  authorizations: RbacConnection[];
  /** Connections the application behind the server accepted. */
  appConnections: () => number;
}

/** Starts the inbound HBONE server of a pod on 127.79.<subnet>.2, with an application on port 8080. */
async function startServerPod(t: ExecutionContext, subnet: number, aliases: string[] = [], serverLeaf?: TestLeaf): Promise<ServerPod> {
  const { trusted } = await roots();
  const clientIp = `127.79.${subnet}.1`;
  const serverIp = `127.79.${subnet}.2`;
  const audit = new MemorySink();
  const refused: AuditEvent[] = [];
  const authorizations: RbacConnection[] = [];
  const leaf = serverLeaf ?? (await createLeaf(trusted, { uris: [SERVER_ID] }));
  const server = new InboundHboneServer({
    node: "node-2",
    workload: workload("echo", "apps", "echo", serverIp),
    identity: SERVER_IDENTITY,
    network: new LoopbackPodNetwork(serverIp),
    certs: providerOf(leaf, trusted.certPem),
    trustDomain: "cluster.local",
    trustDomainAliases: aliases,
    authorize: (connection) => {
      authorizations.push(connection);
      return ALLOW_ALL;
    },
    lookupSource: () => undefined,
    audit,
    logger: silentLogger(),
    refusals: new RefusalLog({ node: "node-2", audit: { write: (record) => refused.push(record) }, logger: silentLogger() }),
  });
  await server.start();
  t.teardown(() => server.stop());

  let accepted = 0;
  const app = net.createServer((socket) => {
    accepted += 1;
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => app.listen(APP_PORT, serverIp, resolve));
  t.teardown(() => new Promise<void>((resolve) => app.close(() => resolve())));
  return { clientIp, serverIp, audit, refused, authorizations, appConnections: () => accepted };
}

/**
 * Runs a TLS handshake with the pod's HBONE port presenting `leaf` (none when undefined), then sends
 * a CONNECT to the application. Resolves with the response status, or with what ended the attempt.
 */
function attemptConnect(pod: ServerPod, leaf: TestLeaf | undefined, trustedPem: string): Promise<{ status?: number; ended?: string }> {
  return new Promise((resolve) => {
    const socket = tls.connect({
      socket: net.connect({ host: pod.serverIp, port: HBONE_PORT, localAddress: pod.clientIp }),
      ...(leaf ? { key: leaf.keyPem, cert: leaf.chainPem } : {}),
      ca: trustedPem,
      minVersion: "TLSv1.3",
      ALPNProtocols: ["h2"],
      servername: "",
      checkServerIdentity: () => undefined,
    });
    const timer = setTimeout(() => finish({ ended: "timeout" }), 5_000);
    const finish = (outcome: { status?: number; ended?: string }): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(outcome);
    };
    socket.on("error", (error: NodeJS.ErrnoException) => finish({ ended: error.code ?? error.message }));
    socket.once("secureConnect", () => {
      const session = http2.connect(`https://${pod.serverIp}:${HBONE_PORT}`, { createConnection: () => socket });
      session.on("error", (error: NodeJS.ErrnoException) => finish({ ended: error.code ?? error.message }));
      session.on("close", () => finish({ ended: "session closed" }));
      const stream = session.request({ ":method": "CONNECT", ":authority": `${pod.serverIp}:${APP_PORT}` }, { endStream: false });
      stream.on("error", (error: NodeJS.ErrnoException) => finish({ ended: error.code ?? error.message }));
      stream.on("response", (headers) => finish({ status: Number(headers[":status"]) }));
      stream.on("close", () => finish({ ended: `stream closed with code ${stream.rstCode}` }));
    });
  });
}

/** Asserts that the pod rejected one handshake with `reason` and `code`, and served no stream. */
async function assertRejected(
  t: ExecutionContext,
  pod: ServerPod,
  outcome: { status?: number; ended?: string },
  reason: string,
  code: string,
): Promise<void> {
  t.is(outcome.status, undefined, "no CONNECT response");
  const record = await pod.audit.next("inbound");
  t.is(record.reason, reason);
  t.is(record.error?.code, code);
  t.is(record.decision, "deny");
  t.is(record.transport, "hbone");
  t.regex(record.src.addr, new RegExp(`^${pod.clientIp.replace(/\./g, "\\.")}:\\d+$`));
  t.is(record.src.identity, undefined, "an unverified identity is not recorded as proven");
  t.is(record.dst.addr, `${pod.serverIp}:${HBONE_PORT}`);
  t.is(record.dst.identity, SERVER_ID);
  t.is(pod.audit.records.length, 1, "one record per rejected handshake");
  t.is(pod.authorizations.length, 0, "no stream reached authorization");
  t.is(pod.appConnections(), 0, "no stream reached the application");
}

async function clientLeaf(options: LeafOptions & { issuer?: TestCa } = {}): Promise<TestLeaf> {
  const { trusted } = await roots();
  return createLeaf(options.issuer ?? trusted, { uris: [CLIENT_ID], ...options });
}

test("server accepts a valid client certificate", async (t) => {
  const pod = await startServerPod(t, 1);
  const { trusted } = await roots();

  const outcome = await attemptConnect(pod, await clientLeaf(), trusted.certPem);

  t.is(outcome.status, 200);
  t.is(pod.authorizations.length, 1);
  t.is(pod.authorizations[0]?.sourceIdentity?.serviceAccount, "sleep");
});

test("server rejects an expired client certificate", async (t) => {
  const pod = await startServerPod(t, 2);
  const { trusted } = await roots();
  const leaf = await clientLeaf({ notBefore: new Date(Date.now() - 3 * HOUR_MS), notAfter: new Date(Date.now() - 2 * HOUR_MS) });

  const outcome = await attemptConnect(pod, leaf, trusted.certPem);

  await assertRejected(t, pod, outcome, "certificate_expired", "CERT_EXPIRED");
});

test("server rejects a not yet valid client certificate", async (t) => {
  const pod = await startServerPod(t, 3);
  const { trusted } = await roots();
  const leaf = await clientLeaf({ notBefore: new Date(Date.now() + 2 * HOUR_MS), notAfter: new Date(Date.now() + 3 * HOUR_MS) });

  const outcome = await attemptConnect(pod, leaf, trusted.certPem);

  await assertRejected(t, pod, outcome, "certificate_not_yet_valid", "CERT_NOT_YET_VALID");
});

test("server rejects a client of an unknown root", async (t) => {
  const pod = await startServerPod(t, 4);
  const { trusted, untrusted } = await roots();

  const outcome = await attemptConnect(pod, await clientLeaf({ issuer: untrusted }), trusted.certPem);

  await assertRejected(t, pod, outcome, "unknown_root", "UNKNOWN_ROOT");
});

test("server rejects an unknown root behind an intermediate", async (t) => {
  const pod = await startServerPod(t, 5);
  const { trusted, untrusted } = await roots();
  const intermediate = await createIntermediate(untrusted, { name: "verify test untrusted intermediate" });

  const outcome = await attemptConnect(pod, await clientLeaf({ issuer: intermediate }), trusted.certPem);

  await assertRejected(t, pod, outcome, "unknown_root", "UNKNOWN_ROOT");
});

test("server accepts a client behind a trusted intermediate", async (t) => {
  const pod = await startServerPod(t, 6);
  const { trusted } = await roots();
  const intermediate = await createIntermediate(trusted, { name: "verify test trusted intermediate" });

  const outcome = await attemptConnect(pod, await clientLeaf({ issuer: intermediate }), trusted.certPem);

  t.is(outcome.status, 200);
});

test("server rejects a client of another trust domain", async (t) => {
  const pod = await startServerPod(t, 7);
  const { trusted } = await roots();

  const outcome = await attemptConnect(pod, await clientLeaf({ uris: ["spiffe://other.local/ns/default/sa/sleep"] }), trusted.certPem);

  await assertRejected(t, pod, outcome, "wrong_trust_domain", "WRONG_TRUST_DOMAIN");
});

test("server accepts a client of an alias trust domain", async (t) => {
  const pod = await startServerPod(t, 8, ["old.local"]);
  const { trusted } = await roots();

  const outcome = await attemptConnect(pod, await clientLeaf({ uris: ["spiffe://old.local/ns/default/sa/sleep"] }), trusted.certPem);

  t.is(outcome.status, 200);
  t.is(pod.authorizations[0]?.sourceIdentity?.trustDomain, "old.local", "policies see the identity as presented");
});

test("server rejects an alias that is not configured", async (t) => {
  const pod = await startServerPod(t, 9, ["new.local"]);
  const { trusted } = await roots();

  const outcome = await attemptConnect(pod, await clientLeaf({ uris: ["spiffe://old.local/ns/default/sa/sleep"] }), trusted.certPem);

  await assertRejected(t, pod, outcome, "wrong_trust_domain", "WRONG_TRUST_DOMAIN");
});

test("server rejects a client with only a DNS SAN", async (t) => {
  const pod = await startServerPod(t, 10);
  const { trusted } = await roots();

  const outcome = await attemptConnect(pod, await clientLeaf({ uris: [], dnsNames: ["sleep.default.svc"] }), trusted.certPem);

  await assertRejected(t, pod, outcome, "no_spiffe_san", "NO_SPIFFE_SAN");
});

test("server rejects a malformed SPIFFE id", async (t) => {
  const pod = await startServerPod(t, 11);
  const { trusted } = await roots();
  const leaf = await clientLeaf({ uris: ["spiffe://cluster.local/ns/default/serviceaccount/sleep"] });

  const outcome = await attemptConnect(pod, leaf, trusted.certPem);

  await assertRejected(t, pod, outcome, "malformed_spiffe_id", "MALFORMED_SPIFFE_ID");
});

test("server rejects a client with two URI SANs", async (t) => {
  const pod = await startServerPod(t, 14);
  const { trusted } = await roots();
  const leaf = await clientLeaf({ uris: [CLIENT_ID, "spiffe://cluster.local/ns/apps/sa/echo"] });

  const outcome = await attemptConnect(pod, leaf, trusted.certPem);

  await assertRejected(t, pod, outcome, "malformed_spiffe_id", "MALFORMED_SPIFFE_ID");
});

test("server rejects a CA certificate as client leaf", async (t) => {
  const pod = await startServerPod(t, 15);
  const { trusted } = await roots();
  const leaf = await clientLeaf({ caFlag: true });

  const outcome = await attemptConnect(pod, leaf, trusted.certPem);

  await assertRejected(t, pod, outcome, "invalid_chain", "TLS_FAILURE");
});

/** Connects to the pod's HBONE port with `leaf` and resolves with the HTTP/2 session. */
async function hboneSession(t: ExecutionContext, pod: ServerPod, leaf: TestLeaf): Promise<http2.ClientHttp2Session> {
  const { trusted } = await roots();
  const socket = tls.connect({
    socket: net.connect({ host: pod.serverIp, port: HBONE_PORT, localAddress: pod.clientIp }),
    key: leaf.keyPem,
    cert: leaf.chainPem,
    ca: trusted.certPem,
    minVersion: "TLSv1.3",
    ALPNProtocols: ["h2"],
    servername: "",
    checkServerIdentity: () => undefined,
  });
  t.teardown(() => socket.destroy());
  await new Promise((resolve, reject) => socket.once("secureConnect", resolve).once("error", reject));
  const session = http2.connect(`https://${pod.serverIp}:${HBONE_PORT}`, { createConnection: () => socket });
  session.on("error", () => undefined);
  return session;
}

/** Opens a CONNECT stream to the pod's application; resolves with the stream and its status, or the RST_STREAM code. */
function connectStream(pod: ServerPod, session: http2.ClientHttp2Session): Promise<{ stream: http2.ClientHttp2Stream; status?: number; rstCode?: number }> {
  return new Promise((resolve) => {
    const stream = session.request({ ":method": "CONNECT", ":authority": `${pod.serverIp}:${APP_PORT}` }, { endStream: false });
    stream.on("error", () => undefined);
    stream.once("response", (headers) => resolve({ stream, status: Number(headers[":status"]) }));
    stream.once("close", () => resolve({ stream, rstCode: stream.rstCode }));
  });
}

test("server sends GOAWAY when an idle client's certificate expires", async (t) => {
  const pod = await startServerPod(t, 16);
  const leaf = await clientLeaf({ notAfter: new Date(Date.now() + 3_000) });
  const notAfter = Date.parse(new crypto.X509Certificate(leaf.certPem).validTo);
  const session = await hboneSession(t, pod, leaf);
  const goaway = new Promise<number>((resolve) => session.once("goaway", (code) => resolve(code)));

  const code = await Promise.race([goaway, delay(6_000).then(() => -1)]);

  t.is(code, http2.constants.NGHTTP2_NO_ERROR);
  t.true(Date.now() >= notAfter - 50, "not before the certificate expired");
});

test("expired client keeps open stream, new rejected", async (t) => {
  const pod = await startServerPod(t, 17);
  const leaf = await clientLeaf({ notAfter: new Date(Date.now() + 3_000) });
  const notAfter = Date.parse(new crypto.X509Certificate(leaf.certPem).validTo);
  const session = await hboneSession(t, pod, leaf);
  let goaway = false;
  session.once("goaway", () => (goaway = true));
  const open = await connectStream(pod, session);
  t.is(open.status, 200);

  await delay(Math.max(notAfter - Date.now(), 0) + 300);
  const rejected = await connectStream(pod, session);
  const echoed = new Promise<string>((resolve) => open.stream.once("data", (chunk: Buffer) => resolve(chunk.toString())));
  open.stream.write("after expiry");

  t.is(rejected.rstCode, http2.constants.NGHTTP2_REFUSED_STREAM);
  t.is(await echoed, "after expiry");
  t.false(goaway, "no GOAWAY while a stream is open, so the client keeps checking the connection with PINGs");
  open.stream.close();
  const closed = await Promise.race([new Promise<boolean>((resolve) => session.once("goaway", () => resolve(true))), delay(5_000).then(() => false)]);
  t.true(closed, "GOAWAY once the last stream ended");
});

test("server rejects a client without certificate", async (t) => {
  const pod = await startServerPod(t, 12);
  const { trusted } = await roots();

  const outcome = await attemptConnect(pod, undefined, trusted.certPem);

  await assertRejected(t, pod, outcome, "no_peer_certificate", "NO_PEER_CERTIFICATE");
});

test("server records a failed TLS handshake", async (t) => {
  const pod = await startServerPod(t, 13);
  const leaf = await clientLeaf();

  // TLS 1.2 only: the HBONE server accepts TLS 1.3 alone, so the handshake fails before any certificate.
  const outcome = await new Promise<string>((resolve) => {
    const socket = tls.connect({
      socket: net.connect({ host: pod.serverIp, port: HBONE_PORT, localAddress: pod.clientIp }),
      key: leaf.keyPem,
      cert: leaf.chainPem,
      maxVersion: "TLSv1.2",
      rejectUnauthorized: false,
    });
    socket.on("error", (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message));
    socket.on("secureConnect", () => resolve("connected"));
  });

  t.not(outcome, "connected");
  await delay(200);
  const [record] = pod.refused;
  t.is(record?.type, "connection.refused");
  if (record?.type !== "connection.refused") return;
  t.is(record.reason, "tls_handshake");
  t.regex(record.message, /TLS handshake with client 127\.79\.13\.1:\d+ failed/);
  t.regex(record.src.addr, /^127\.79\.13\.1:\d+$/);
  t.deepEqual(pod.audit.records, [], "a failed TLS handshake gets no connection record");
  t.is(pod.appConnections(), 0);
});

/** Connects to the pod with the HBONE client expecting `expected`, and returns the error it rejected with. */
async function connectAsClient(
  pod: ServerPod,
  expected: Identity[],
  accepted?: AcceptedTrustDomains,
): Promise<{ code?: string; message: string; reason?: string } | "connected"> {
  const { trusted } = await roots();
  const leaf = await clientLeaf();
  try {
    const session = await connectHbone({
      network: new LoopbackPodNetwork(pod.clientIp),
      certificate: asWorkloadCertificate(leaf, identity("default", "sleep"), trusted.certPem),
      expectedIdentities: expected,
      acceptedTrustDomains: accepted,
      hboneAddress: { ip: pod.serverIp, port: HBONE_PORT },
      timeoutMs: 5_000,
      onSocket: () => undefined,
      onSession: () => undefined,
    });
    session.destroy();
    return "connected";
  } catch (error) {
    const failure = error as { code?: string; message: string };
    return { code: failure.code, message: failure.message, reason: verificationReasonOf(error) };
  }
}

test("client accepts the expected server identity", async (t) => {
  const pod = await startServerPod(t, 20);

  t.is(await connectAsClient(pod, [SERVER_IDENTITY]), "connected");
});

test("client rejects an unexpected server identity", async (t) => {
  const pod = await startServerPod(t, 21);

  const outcome = await connectAsClient(pod, [identity("apps", "not-echo")]);

  t.not(outcome, "connected");
  if (outcome === "connected") return;
  t.is(outcome.code, "IDENTITY_ERROR");
  t.is(outcome.reason, "identity_mismatch");
  t.regex(outcome.message, /presented spiffe:\/\/cluster\.local\/ns\/apps\/sa\/echo, expected .*not-echo/);
});

test("client rejects an expired server certificate", async (t) => {
  const { trusted } = await roots();
  const expired = await createLeaf(trusted, { uris: [SERVER_ID], notBefore: new Date(Date.now() - 3 * HOUR_MS), notAfter: new Date(Date.now() - HOUR_MS) });
  const pod = await startServerPod(t, 22, [], expired);

  const outcome = await connectAsClient(pod, [SERVER_IDENTITY]);

  t.not(outcome, "connected");
  if (outcome === "connected") return;
  t.is(outcome.code, "CERT_EXPIRED");
  t.is(outcome.reason, "certificate_expired");
});

test("client rejects a server of an unknown root", async (t) => {
  const { untrusted } = await roots();
  const forged = await createLeaf(untrusted, { uris: [SERVER_ID] });
  const pod = await startServerPod(t, 23, [], forged);

  const outcome = await connectAsClient(pod, [SERVER_IDENTITY]);

  t.not(outcome, "connected");
  if (outcome === "connected") return;
  t.is(outcome.code, "UNKNOWN_ROOT");
  t.is(outcome.reason, "unknown_root");
});

test("client rejects a server without SPIFFE SAN", async (t) => {
  const { trusted } = await roots();
  const dnsOnly = await createLeaf(trusted, { dnsNames: ["echo.apps.svc"] });
  const pod = await startServerPod(t, 24, [], dnsOnly);

  const outcome = await connectAsClient(pod, [SERVER_IDENTITY]);

  t.not(outcome, "connected");
  if (outcome === "connected") return;
  t.is(outcome.code, "NO_SPIFFE_SAN");
});

test("client rejects a server whose root may not vouch for its trust domain", async (t) => {
  const pod = await startServerPod(t, 26);
  const seen: string[] = [];
  const vouching = (allowed: boolean): AcceptedTrustDomains => ({
    trustDomain: "cluster.local",
    aliases: [],
    vouchesFor: (leaf, _intermediates, trustDomain) => {
      seen.push(`${leaf.subjectAltName} ${trustDomain}`);
      return allowed;
    },
  });

  const rejected = await connectAsClient(pod, [SERVER_IDENTITY], vouching(false));
  const allowed = await connectAsClient(pod, [SERVER_IDENTITY], vouching(true));

  t.not(rejected, "connected");
  if (rejected !== "connected") t.is(rejected.reason, "unknown_root");
  t.is(allowed, "connected");
  t.deepEqual(seen, [`URI:${SERVER_ID} cluster.local`, `URI:${SERVER_ID} cluster.local`], "the server's leaf is the one asked about");
});

test("client accepts a server in an alias trust domain", async (t) => {
  const { trusted } = await roots();
  const aliased = await createLeaf(trusted, { uris: ["spiffe://old.local/ns/apps/sa/echo"] });
  const pod = await startServerPod(t, 25, [], aliased);

  const withAlias = await connectAsClient(pod, [SERVER_IDENTITY], { trustDomain: "cluster.local", aliases: ["old.local"] });
  const withoutAlias = await connectAsClient(pod, [SERVER_IDENTITY], { trustDomain: "cluster.local", aliases: [] });

  t.is(withAlias, "connected");
  t.not(withoutAlias, "connected");
  if (withoutAlias !== "connected") t.is(withoutAlias.code, "IDENTITY_ERROR");
});

// Pure checks of the verifier's rules, without TLS.

test("leaf with one SPIFFE URI names its identity", async (t) => {
  const { trusted } = await roots();
  const leaf = await createLeaf(trusted, { uris: ["spiffe://cluster.local/ns/a/sa/b"], dnsNames: ["b.a.svc"] });

  const named = leafSpiffeIdentity(new crypto.X509Certificate(leaf.certPem));

  t.deepEqual(named, { identity: identity("a", "b") });
});

const SEVERAL_URIS: string[][] = [
  ["spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d"],
  ["spiffe://cluster.local/bad", "spiffe://cluster.local/ns/a/sa/b"],
  ["https://example.com/x", "spiffe://cluster.local/ns/a/sa/b"],
];

for (const uris of SEVERAL_URIS) {
  test(`leaf with URI SANs ${uris.join(" + ")} is malformed`, async (t) => {
    const { trusted } = await roots();
    const leaf = await createLeaf(trusted, { uris });

    const named = leafSpiffeIdentity(new crypto.X509Certificate(leaf.certPem));

    t.true("reason" in named && named.reason === "malformed_spiffe_id");
  });
}

test("leaf with only non-SPIFFE URIs has no SPIFFE SAN", async (t) => {
  const { trusted } = await roots();
  const leaf = await createLeaf(trusted, { uris: ["https://example.com/x"], dnsNames: ["x.example.com"] });

  const named = leafSpiffeIdentity(new crypto.X509Certificate(leaf.certPem));

  t.true("reason" in named && named.reason === "no_spiffe_san");
});

test("chain error codes map to reasons", (t) => {
  const table: [string, VerificationFailureReason | undefined][] = [
    ["CERT_HAS_EXPIRED", "certificate_expired"],
    ["CERT_NOT_YET_VALID", "certificate_not_yet_valid"],
    ["UNABLE_TO_VERIFY_LEAF_SIGNATURE", "unknown_root"],
    ["UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "unknown_root"],
    ["SELF_SIGNED_CERT_IN_CHAIN", "unknown_root"],
    ["DEPTH_ZERO_SELF_SIGNED_CERT", "unknown_root"],
    ["INVALID_CA", "invalid_chain"],
    ["ECONNRESET", undefined],
    ["ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED", undefined],
  ];
  for (const [code, reason] of table) {
    t.is(chainFailureOf(code, "127.0.0.1:15008")?.reason, reason, code);
  }
});

test("unauthorized chain fails closed", async (t) => {
  const leaf = new crypto.X509Certificate((await clientLeaf()).certPem);

  const verification = verifyServerCertificate({ leaf, authorized: false, chainError: null }, [SERVER_IDENTITY], undefined, "peer");

  t.false(verification.verified);
  if (!verification.verified) t.is(verification.reason, "invalid_chain");
});

test("alias matching needs both trust domains accepted", async (t) => {
  const { trusted } = await roots();
  const leaf = new crypto.X509Certificate((await createLeaf(trusted, { uris: ["spiffe://old.local/ns/apps/sa/echo"] })).certPem);
  const accepted = { trustDomain: "cluster.local", aliases: ["old.local"] };

  const sameDomain = verifyServerCertificate({ leaf, authorized: true }, [identity("apps", "echo", "old.local")], undefined, "peer");
  const aliased = verifyServerCertificate({ leaf, authorized: true }, [SERVER_IDENTITY], accepted, "peer");
  const foreign = verifyServerCertificate({ leaf, authorized: true }, [identity("apps", "echo", "remote.local")], accepted, "peer");
  const otherAccount = verifyServerCertificate({ leaf, authorized: true }, [identity("apps", "other")], accepted, "peer");

  t.true(sameDomain.verified);
  t.true(aliased.verified);
  t.false(foreign.verified);
  t.false(otherAccount.verified);
});
