// The trust bundle: roots from the CA and an extra roots file, deduplicated, with one "change" per
// change of the set. The handshake tests run a node:tls server with the HBONE server's TLS options
// on 127.79.<subnet>.2, whose secure context is rebuilt from the bundle on each change.

import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import tls from "node:tls";
import test, { type ExecutionContext } from "ava";
import { hboneTlsOptions } from "../../agent/identity/certificate";
import { TrustBundle, type TrustBundleOptions } from "../../agent/identity/trust-bundle";
import { presentedCertificateOf, verifyClientCertificate } from "../../agent/identity/verify";
import { silentLogger } from "../../agent/log";
import { createIntermediate, createLeaf, createRoot, type TestCa, type TestLeaf } from "./cert-fixtures";
import { delay } from "./hbone-fixtures";

const CLIENT_ID = "spiffe://cluster.local/ns/default/sa/sleep";
const SERVER_ID = "spiffe://cluster.local/ns/apps/sa/echo";

interface Fixture {
  rootA: TestCa;
  rootB: TestCa;
  file: string;
  bundle: TrustBundle;
  changes: () => number;
}

/** Creates a bundle whose CA roots are root A and whose extra roots file contains `fileRoots` (root B by default). */
async function createBundle(t: ExecutionContext, options: Partial<TrustBundleOptions> & { fileRoots?: (roots: TestCa[]) => string } = {}): Promise<Fixture> {
  const rootA = await createRoot({ name: "bundle test root A" });
  const rootB = await createRoot({ name: "bundle test root B" });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "trust-bundle-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "roots.pem");
  fs.writeFileSync(file, options.fileRoots ? options.fileRoots([rootA, rootB]) : rootB.certPem);
  const bundle = new TrustBundle({ trustDomain: "cluster.local", extraRootsFile: file, logger: silentLogger(), ...options });
  let changes = 0;
  bundle.on("change", () => {
    changes += 1;
  });
  bundle.setCaRoots(rootA.certPem);
  await bundle.start();
  t.teardown(() => bundle.stop());
  return { rootA, rootB, file, bundle, changes: () => changes };
}

test("bundle holds the CA roots and the file roots", async (t) => {
  const { rootA, rootB, bundle, file } = await createBundle(t);

  const roots = bundle.roots();

  t.is(roots.length, 2);
  t.deepEqual(roots.map((root) => root.fingerprint), [rootA.certificate, rootB.certificate].map((root) => fingerprintOf(root.toString("pem"))));
  t.deepEqual(roots[0].sources, ["ca"]);
  t.deepEqual(roots[1].sources, [file]);
  t.true(roots[0].subject.includes("bundle test root A"));
  t.true(roots[0].notAfter.getTime() > Date.now());
  t.is(bundle.pem(), rootA.certPem + rootB.certPem);
});

test("bundle deduplicates a root in two sources", async (t) => {
  const { rootA, bundle, file } = await createBundle(t, { fileRoots: ([a]) => `# the CA's root, again\n${a.certPem}` });

  const roots = bundle.roots();

  t.is(roots.length, 1);
  t.deepEqual(roots[0].sources, ["ca", file]);
  t.is(bundle.pem(), rootA.certPem);
});

test("bundle emits no change for unchanged sources", async (t) => {
  const { rootA, rootB, bundle, file, changes } = await createBundle(t);
  const before = changes();

  bundle.setCaRoots(rootA.certPem);
  const sameText = await bundle.reloadExtraRoots();
  fs.writeFileSync(file, `# reordered with a comment\n${rootB.certPem}\n`);
  const sameSet = await bundle.reloadExtraRoots();

  t.false(sameText);
  t.false(sameSet);
  t.is(changes(), before);
});

test("bundle emits one change per new set", async (t) => {
  const { rootA, rootB, bundle, changes } = await createBundle(t);
  const rootC = await createRoot({ name: "bundle test root C" });
  const before = changes();

  bundle.setCaRoots(rootA.certPem + rootC.certPem);

  t.is(changes(), before + 1);
  t.is(bundle.roots().length, 3);
  t.true(bundle.pem().includes(rootB.certPem));
});

test("bundle keeps the last good file roots", async (t) => {
  const { rootB, bundle, file, changes } = await createBundle(t);
  const before = changes();
  const pemBefore = bundle.pem();
  const badContents = [
    "not a certificate",
    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    (await createLeaf(await createRoot({ name: "bundle test leaf issuer" }), { uris: [CLIENT_ID] })).certPem,
  ];

  for (const contents of badContents) {
    fs.writeFileSync(file, contents);
    t.false(await bundle.reloadExtraRoots(), contents.slice(0, 30));
  }
  fs.rmSync(file);
  t.false(await bundle.reloadExtraRoots(), "missing file");

  t.is(bundle.pem(), pemBefore);
  t.true(bundle.pem().includes(rootB.certPem));
  t.is(changes(), before);
});

test("bundle rejects a bad file at start", async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "trust-bundle-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "roots.pem");
  fs.writeFileSync(file, "garbage\n");
  const bundle = new TrustBundle({ trustDomain: "cluster.local", extraRootsFile: file, logger: silentLogger() });
  t.teardown(() => bundle.stop());

  const error = await t.throwsAsync(() => bundle.start());

  t.is((error as { code?: string }).code, "TRUST_BUNDLE_ERROR");
  t.true(error?.message.includes(file));
});

test("bundle rejects invalid CA roots", async (t) => {
  const { bundle } = await createBundle(t);
  const pemBefore = bundle.pem();

  const error = t.throws(() => bundle.setCaRoots("nothing here"));

  t.is((error as { code?: string }).code, "TRUST_BUNDLE_ERROR");
  t.is(bundle.pem(), pemBefore);
});

test("bundle follows file changes", async (t) => {
  const { rootA, bundle, file } = await createBundle(t, { pollIntervalMs: 60_000 });
  const rootC = await createRoot({ name: "bundle test root C" });
  const changed = new Promise<void>((resolve) => bundle.once("change", () => resolve()));

  // Written beside the file and renamed over it, as a ConfigMap update or an atomic writer does.
  fs.writeFileSync(`${file}.tmp`, rootC.certPem);
  fs.renameSync(`${file}.tmp`, file);

  await Promise.race([changed, delay(5_000).then(() => Promise.reject(new Error("no change within 5 s")))]);
  t.is(bundle.pem(), rootA.certPem + rootC.certPem);
});

test("bundle accepts its trust domain and aliases", (t) => {
  const bundle = new TrustBundle({ trustDomain: "cluster.local", aliases: ["old.local", "cluster.local"], logger: silentLogger() });

  t.true(bundle.accepts("cluster.local"));
  t.true(bundle.accepts("old.local"));
  t.false(bundle.accepts("other.local"));
  t.deepEqual(bundle.aliases, ["old.local"]);
});

test("bundle rejects an invalid alias", (t) => {
  const error = t.throws(() => new TrustBundle({ trustDomain: "cluster.local", aliases: ["Old.Local"], logger: silentLogger() }));

  t.is((error as { code?: string }).code, "TRUST_BUNDLE_ERROR");
});

/** Starts a node:tls server with the HBONE server's options, trusting the bundle and rebuilt on each change. */
async function startVerifyingServer(t: ExecutionContext, subnet: number, fixture: Fixture): Promise<string> {
  const serverIp = `127.79.${subnet}.2`;
  const serverLeaf = await createLeaf(fixture.rootA, { uris: [SERVER_ID] });
  const contextOptions = (): tls.SecureContextOptions =>
    hboneTlsOptions({ keyPem: serverLeaf.keyPem, chainPem: serverLeaf.chainPem, rootPem: fixture.bundle.pem() });
  const server = tls.createServer({ ...contextOptions(), requestCert: true, rejectUnauthorized: false }, (socket) => {
    const verification = verifyClientCertificate(presentedCertificateOf(socket), fixture.bundle, String(socket.remoteAddress));
    socket.end(verification.verified ? "verified" : verification.reason);
  });
  fixture.bundle.on("change", () => server.setSecureContext(contextOptions()));
  await new Promise<void>((resolve) => server.listen(8443, serverIp, resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return serverIp;
}

/** Connects with `leaf` and returns the server's reply: "verified" or the rejection reason. */
function handshake(serverIp: string, leaf: TestLeaf, trustedPem: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      socket: net.connect({ host: serverIp, port: 8443 }),
      key: leaf.keyPem,
      cert: leaf.chainPem,
      ca: trustedPem,
      minVersion: "TLSv1.3",
      servername: "",
      checkServerIdentity: () => undefined,
    });
    let answer = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      answer += chunk;
    });
    socket.on("end", () => resolve(answer));
    socket.on("error", reject);
  });
}

test("handshakes accept leaves of both CA roots", async (t) => {
  const fixture = await createBundle(t);
  fixture.bundle.setCaRoots(fixture.rootA.certPem + fixture.rootB.certPem);
  const serverIp = await startVerifyingServer(t, 40, fixture);
  const leafA = await createLeaf(fixture.rootA, { uris: [CLIENT_ID] });
  const leafB = await createLeaf(fixture.rootB, { uris: [CLIENT_ID] });

  t.is(await handshake(serverIp, leafA, fixture.rootA.certPem), "verified");
  t.is(await handshake(serverIp, leafB, fixture.rootA.certPem), "verified");
});

test("handshakes reject leaves of a removed CA root", async (t) => {
  const fixture = await createBundle(t, { fileRoots: ([rootA]) => rootA.certPem });
  fixture.bundle.setCaRoots(fixture.rootA.certPem + fixture.rootB.certPem);
  const serverIp = await startVerifyingServer(t, 41, fixture);
  const leafA = await createLeaf(fixture.rootA, { uris: [CLIENT_ID] });
  const leafB = await createLeaf(fixture.rootB, { uris: [CLIENT_ID] });
  t.is(await handshake(serverIp, leafB, fixture.rootA.certPem), "verified");

  // The CA's next response names root A only, so root B's rotation overlap is over.
  fixture.bundle.setCaRoots(fixture.rootA.certPem);
  t.is(fixture.bundle.roots().length, 1);

  t.is(await handshake(serverIp, leafB, fixture.rootA.certPem), "unknown_root");
  t.is(await handshake(serverIp, leafA, fixture.rootA.certPem), "verified");
});

test("an extra root vouches for an alias trust domain only", async (t) => {
  const fixture = await createBundle(t, { aliases: ["east.local"] });
  const serverIp = await startVerifyingServer(t, 42, fixture);
  const peerLeaf = await createLeaf(fixture.rootB, { uris: ["spiffe://east.local/ns/default/sa/sleep"] });
  const spoofedLeaf = await createLeaf(fixture.rootB, { uris: [CLIENT_ID] });

  t.is(await handshake(serverIp, peerLeaf, fixture.rootA.certPem), "verified");
  t.is(await handshake(serverIp, spoofedLeaf, fixture.rootA.certPem), "unknown_root", "a peer cluster's root cannot issue this mesh's identities");
});

test("a leaf behind an intermediate of a CA root is accepted", async (t) => {
  const fixture = await createBundle(t);
  const serverIp = await startVerifyingServer(t, 44, fixture);
  const intermediate = await createIntermediate(fixture.rootA, { name: "bundle test intermediate under A" });
  const leaf = await createLeaf(intermediate, { uris: [CLIENT_ID] });

  t.is(await handshake(serverIp, leaf, fixture.rootA.certPem), "verified");
});

test("no extra roots: reordered chain accepted", async (t) => {
  const fixture = await createBundle(t, { fileRoots: ([rootA]) => rootA.certPem });
  const serverIp = await startVerifyingServer(t, 46, fixture);
  const upper = await createIntermediate(fixture.rootA, { name: "bundle test upper intermediate" });
  const lower = await createIntermediate(upper, { name: "bundle test lower intermediate" });
  const leaf = await createLeaf(lower, { uris: [CLIENT_ID] });
  const reordered = { ...leaf, chainPem: leaf.certPem + upper.certPem + lower.certPem };

  t.is(await handshake(serverIp, reordered, fixture.rootA.certPem), "verified");
});

test("forged link to CA root rejected", async (t) => {
  const fixture = await createBundle(t, { aliases: ["east.local"] });
  const serverIp = await startVerifyingServer(t, 45, fixture);
  // Root B's name and key under root A's name, signed by an impostor of A: the link is by name only.
  const impostorA = await createRoot({ name: "bundle test root A" });
  const bridge = await createIntermediate(impostorA, { name: "bundle test root B", keys: fixture.rootB.keys });
  const leaf = await createLeaf(fixture.rootB, { uris: [CLIENT_ID] });
  const forged = { ...leaf, chainPem: leaf.certPem + bridge.certPem + fixture.rootA.certPem };

  t.is(await handshake(serverIp, forged, fixture.rootA.certPem), "unknown_root");
});

test("an extra root that leaves the file stops vouching", async (t) => {
  const fixture = await createBundle(t, { aliases: ["east.local"] });
  const serverIp = await startVerifyingServer(t, 43, fixture);
  const peerLeaf = await createLeaf(fixture.rootB, { uris: ["spiffe://east.local/ns/default/sa/sleep"] });
  t.is(await handshake(serverIp, peerLeaf, fixture.rootA.certPem), "verified");

  fs.writeFileSync(fixture.file, fixture.rootA.certPem);
  await fixture.bundle.reloadExtraRoots();

  t.is(await handshake(serverIp, peerLeaf, fixture.rootA.certPem), "unknown_root");
});

function fingerprintOf(pem: string): string {
  return new crypto.X509Certificate(pem).fingerprint256;
}
