import "reflect-metadata";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as x509 from "@peculiar/x509";
import test from "ava";
import { AgentError } from "../../agent/errors";
import { EmbeddedCa, initCa } from "../../agent/identity/ca";
import { withSecureContext } from "../../agent/identity/certificate";
import { certificateMatchesKey, createCertificateRequest } from "../../agent/identity/csr";

const sleep = { trustDomain: "cluster.local", namespace: "default", serviceAccount: "sleep" };

function temporaryDir(t: import("ava").ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ambient-ca-test-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("initCa writes root, key and config", async (t) => {
  const dir = path.join(temporaryDir(t), "ca");
  await initCa(dir, { trustDomain: "mesh.example" });

  const root = new crypto.X509Certificate(fs.readFileSync(path.join(dir, "root-cert.pem")));
  t.true(root.ca);
  t.true(root.checkIssued(root));
  t.true(root.verify(root.publicKey));
  t.regex(root.subject, /O=mesh\.example/);
  t.is(root.publicKey.asymmetricKeyDetails?.namedCurve, "prime256v1");
  const years = (Date.parse(root.validTo) - Date.now()) / (365.25 * 24 * 3600 * 1000);
  t.true(years > 9.9 && years < 10.1, `root valid ${years} years`);

  const keyFile = path.join(dir, "root-key.pem");
  t.is(fs.statSync(keyFile).mode & 0o777, 0o600);
  t.regex(fs.readFileSync(keyFile, "utf8"), /^-----BEGIN PRIVATE KEY-----/);
  const config = JSON.parse(fs.readFileSync(path.join(dir, "ca.json"), "utf8"));
  t.is(config.trustDomain, "mesh.example");
  t.false(Number.isNaN(Date.parse(config.created)));
});

test("initCa rejects an existing CA", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const before = fs.readFileSync(path.join(dir, "root-cert.pem"), "utf8");

  const error = await t.throwsAsync(initCa(dir), { instanceOf: AgentError });

  t.is(error?.code, "CA_ERROR");
  t.regex(error?.message ?? "", /already exists.*--force/);
  t.is(fs.readFileSync(path.join(dir, "root-cert.pem"), "utf8"), before);
});

test("initCa with force replaces the CA", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const before = fs.readFileSync(path.join(dir, "root-cert.pem"), "utf8");

  await initCa(dir, { force: true, trustDomain: "other.local" });

  t.not(fs.readFileSync(path.join(dir, "root-cert.pem"), "utf8"), before);
  t.is((await EmbeddedCa.load(dir)).trustDomain, "other.local");
});

test("issue makes a P-256 leaf with the SPIFFE SAN", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const ca = await EmbeddedCa.load(dir);

  const certificate = withSecureContext(await ca.issue(sleep));

  const leaf = new crypto.X509Certificate(certificate.certPem);
  const root = new crypto.X509Certificate(ca.rootPem);
  t.true(leaf.checkIssued(root));
  t.true(leaf.verify(root.publicKey));
  t.false(leaf.ca);
  t.is(leaf.subjectAltName, "URI:spiffe://cluster.local/ns/default/sa/sleep");
  t.deepEqual(leaf.keyUsage, ["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"]);
  t.is(crypto.createPrivateKey(certificate.keyPem).asymmetricKeyDetails?.namedCurve, "prime256v1");
  t.true(leaf.checkPrivateKey(crypto.createPrivateKey(certificate.keyPem)));
  t.is(certificate.chainPem, certificate.certPem);
  t.is(certificate.rootPem, ca.rootPem);
  t.deepEqual(certificate.identity, sleep);
  t.truthy(certificate.secureContext);
});

test("issue sets a 24 hour validity from a minute ago", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const ca = await EmbeddedCa.load(dir);
  const now = Date.now();

  const certificate = await ca.issue(sleep);
  const short = await ca.issue(sleep, 600);

  const leaf = new crypto.X509Certificate(certificate.certPem);
  t.true(Math.abs(Date.parse(leaf.validFrom) - (now - 60_000)) < 5_000);
  t.true(Math.abs(Date.parse(leaf.validTo) - (now + 24 * 3600_000)) < 5_000);
  t.is(certificate.notAfter.getTime(), Date.parse(leaf.validTo));
  t.true(Math.abs(short.notAfter.getTime() - (now + 600_000)) < 5_000);
});

test("issue rejects another trust domain", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const ca = await EmbeddedCa.load(dir);

  const error = await t.throwsAsync(ca.issue({ ...sleep, trustDomain: "evil.local" }), { instanceOf: AgentError });

  t.is(error?.code, "IDENTITY_ERROR");
});

test("load names the missing file and the fix", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  fs.rmSync(path.join(dir, "root-key.pem"));

  const error = await t.throwsAsync(EmbeddedCa.load(dir), { instanceOf: AgentError });

  t.is(error?.code, "CA_ERROR");
  t.true(error?.message.includes(path.join(dir, "root-key.pem")));
  t.true(error?.message.includes(`agentctl ca init --dir ${dir}`));
});

test("load rejects a key of another CA", async (t) => {
  const first = temporaryDir(t);
  const second = temporaryDir(t);
  await initCa(first);
  await initCa(second);
  fs.copyFileSync(path.join(second, "root-key.pem"), path.join(first, "root-key.pem"));

  const error = await t.throwsAsync(EmbeddedCa.load(first), { instanceOf: AgentError });

  t.regex(error?.message ?? "", /does not belong to the certificate/);
});

test("load rejects a folder without a CA", async (t) => {
  const dir = temporaryDir(t);
  fs.writeFileSync(path.join(dir, "notes.txt"), "");

  const error = await t.throwsAsync(EmbeddedCa.load(dir), { instanceOf: AgentError });

  t.is(error?.code, "CA_ERROR");
  t.true(error?.message.includes(`folder ${dir} contains no CA`));
  t.true(error?.message.includes("found: notes.txt"));
  t.true(error?.message.includes("root-cert.pem + root-key.pem + ca.json"));
  t.true(error?.message.includes("ca-cert.pem + ca-key.pem + root-cert.pem + cert-chain.pem"));
});

// Test CAs with chosen properties, written in the folder layouts of Istio's CA Secrets.

x509.cryptoProvider.set(crypto.webcrypto as never);

const HOUR_MS = 3_600_000;
const EC_KEY: crypto.webcrypto.EcKeyGenParams = { name: "ECDSA", namedCurve: "P-256" };
const RSA_KEY: crypto.webcrypto.RsaHashedKeyGenParams = {
  name: "RSASSA-PKCS1-v1_5",
  modulusLength: 2048,
  publicExponent: new Uint8Array([1, 0, 1]),
  hash: "SHA-256",
};

interface TestCert {
  certificate: x509.X509Certificate;
  pem: string;
  keyPem: string;
  keys: crypto.webcrypto.CryptoKeyPair;
}

interface CertOptions {
  name: string;
  /** Signs the certificate; self-signed when absent. */
  issuer?: TestCert;
  ca?: boolean;
  keyUsage?: x509.KeyUsageFlags;
  notBefore?: Date;
  notAfter?: Date;
  rsa?: boolean;
}

async function createCert(options: CertOptions): Promise<TestCert> {
  const algorithm = options.rsa ? RSA_KEY : EC_KEY;
  const keys = (await crypto.webcrypto.subtle.generateKey(algorithm, true, ["sign", "verify"])) as crypto.webcrypto.CryptoKeyPair;
  const signer = options.issuer?.keys ?? keys;
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: crypto.randomBytes(8).toString("hex").replace(/^./, "1"),
    subject: `CN=${options.name}`,
    issuer: options.issuer?.certificate.subject ?? `CN=${options.name}`,
    notBefore: options.notBefore ?? new Date(Date.now() - HOUR_MS),
    notAfter: options.notAfter ?? new Date(Date.now() + 240 * HOUR_MS),
    publicKey: keys.publicKey,
    signingKey: signer.privateKey,
    signingAlgorithm: signer.privateKey.algorithm.name === "ECDSA" ? { name: "ECDSA", hash: "SHA-256" } : RSA_KEY,
    extensions: [
      new x509.BasicConstraintsExtension(options.ca ?? true, undefined, true),
      new x509.KeyUsagesExtension(options.keyUsage ?? x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  const keyDer = await crypto.webcrypto.subtle.exportKey("pkcs8", keys.privateKey);
  return { certificate, pem: certificate.toString("pem") + "\n", keyPem: x509.PemConverter.encode(keyDer, "PRIVATE KEY") + "\n", keys };
}

/** Creates a root, an intermediate under it and a signing CA under that: the shape of a plugged-in Istio CA. */
async function createHierarchy(signing: Partial<CertOptions> = {}): Promise<{ root: TestCert; middle: TestCert; signing: TestCert }> {
  const root = await createCert({ name: "test root" });
  const middle = await createCert({ name: "test intermediate", issuer: root });
  return { root, middle, signing: await createCert({ name: "test signing CA", issuer: middle, ...signing }) };
}

function writeFiles(dir: string, files: Record<string, string>): void {
  for (const [name, content] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), content);
}

function cacertsFiles(hierarchy: { root: TestCert; middle: TestCert; signing: TestCert }): Record<string, string> {
  const { root, middle, signing } = hierarchy;
  return {
    "ca-cert.pem": signing.pem,
    "ca-key.pem": signing.keyPem,
    "root-cert.pem": root.pem,
    "cert-chain.pem": signing.pem + middle.pem + root.pem,
  };
}

/** Splits a PEM bundle into node:crypto certificates, in order. */
function certificatesOf(pem: string): crypto.X509Certificate[] {
  return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []).map((block) => new crypto.X509Certificate(block));
}

async function loadError(t: import("ava").ExecutionContext, dir: string, trustDomain?: string): Promise<string> {
  const error = await t.throwsAsync(EmbeddedCa.load(dir, { trustDomain }), { instanceOf: AgentError });
  t.is(error?.code, "CA_ERROR");
  return error?.message ?? "";
}

test("cacerts layout issues through the intermediates", async (t) => {
  const dir = temporaryDir(t);
  const hierarchy = await createHierarchy();
  // cert-chain.pem in another order than the chain: the CA orders the chain itself.
  writeFiles(dir, { ...cacertsFiles(hierarchy), "cert-chain.pem": hierarchy.root.pem + hierarchy.middle.pem + hierarchy.signing.pem });
  const ca = await EmbeddedCa.load(dir, { trustDomain: "mesh.example" });

  const issued = await ca.issue({ ...sleep, trustDomain: "mesh.example" });

  t.is(ca.format, "istio-cacerts");
  const [leaf, signing, middle, ...rest] = certificatesOf(issued.chainPem);
  t.is(rest.length, 0);
  t.is(leaf.fingerprint256, new crypto.X509Certificate(issued.certPem).fingerprint256);
  t.is(signing.fingerprint256, new crypto.X509Certificate(hierarchy.signing.pem).fingerprint256);
  t.is(middle.fingerprint256, new crypto.X509Certificate(hierarchy.middle.pem).fingerprint256);
  const root = new crypto.X509Certificate(issued.caRootsPem);
  t.true(leaf.verify(signing.publicKey));
  t.true(signing.verify(middle.publicKey));
  t.true(middle.verify(root.publicKey));
  t.is(leaf.subjectAltName, "URI:spiffe://mesh.example/ns/default/sa/sleep");
  t.is(issued.caRootsPem, hierarchy.root.pem);
});

test("cacerts chain works in TLS", async (t) => {
  const dir = temporaryDir(t);
  writeFiles(dir, cacertsFiles(await createHierarchy()));
  const ca = await EmbeddedCa.load(dir);
  const issued = await ca.issue(sleep);
  const tls = await import("node:tls");

  const server = tls.createServer({ key: issued.keyPem, cert: issued.chainPem, minVersion: "TLSv1.3" }, (socket) => socket.end());
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => server.close());
  const port = (server.address() as import("node:net").AddressInfo).port;
  const authorized = await new Promise<boolean>((resolve, reject) => {
    const socket = tls.connect({ host: "127.0.0.1", port, ca: issued.caRootsPem, checkServerIdentity: () => undefined }, () => {
      resolve(socket.authorized);
      socket.destroy();
    });
    socket.on("error", reject);
  });

  t.true(authorized);
});

test("istio-ca-secret layout issues from its root", async (t) => {
  const dir = temporaryDir(t);
  const root = await createCert({ name: "istio self-signed", rsa: true });
  // Istio writes the other keys of istio-ca-secret empty; empty files count as absent.
  writeFiles(dir, { "ca-cert.pem": root.pem, "ca-key.pem": root.keyPem, "cert-chain.pem": "", "root-cert.pem": "" });
  const ca = await EmbeddedCa.load(dir);

  const issued = await ca.issue(sleep);

  t.is(ca.format, "istio-ca-secret");
  t.is(ca.trustDomain, "cluster.local");
  t.is(issued.chainPem, issued.certPem);
  t.is(issued.caRootsPem, root.pem);
  const leaf = new crypto.X509Certificate(issued.certPem);
  t.true(leaf.verify(new crypto.X509Certificate(root.pem).publicKey));
  t.is(leaf.publicKey.asymmetricKeyDetails?.namedCurve, "prime256v1");
});

test("Secret mounted through symlinks loads", async (t) => {
  const dir = temporaryDir(t);
  const files = cacertsFiles(await createHierarchy());
  // The kubelet's layout: files in a timestamped folder, ..data pointing at it, one symlink per key.
  const versioned = "..2026_01_02_03_04_05.123456789";
  fs.mkdirSync(path.join(dir, versioned));
  writeFiles(path.join(dir, versioned), files);
  fs.symlinkSync(versioned, path.join(dir, "..data"));
  for (const name of Object.keys(files)) fs.symlinkSync(path.join("..data", name), path.join(dir, name));

  const ca = await EmbeddedCa.load(dir);
  const issued = await ca.issue(sleep);

  t.is(ca.format, "istio-cacerts");
  t.is(certificatesOf(issued.chainPem).length, 3);
  t.true(fs.lstatSync(path.join(dir, "ca-key.pem")).isSymbolicLink());
});

test("two roots both reach caRootsPem", async (t) => {
  const dir = temporaryDir(t);
  const hierarchy = await createHierarchy();
  const newRoot = await createCert({ name: "new root" });
  writeFiles(dir, { ...cacertsFiles(hierarchy), "root-cert.pem": newRoot.pem + hierarchy.root.pem });
  const ca = await EmbeddedCa.load(dir);

  const issued = await ca.issue(sleep);

  t.is(issued.caRootsPem, newRoot.pem + hierarchy.root.pem);
  t.is(ca.rootPem, issued.caRootsPem);
  t.deepEqual(
    certificatesOf(issued.caRootsPem).map((root) => root.subject),
    ["CN=new root", "CN=test root"],
  );
});

test("agent layout signs with the root matching the key", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const current = fs.readFileSync(path.join(dir, "root-cert.pem"), "utf8");
  const next = await createCert({ name: "next root" });
  fs.writeFileSync(path.join(dir, "root-cert.pem"), next.pem + current);
  const ca = await EmbeddedCa.load(dir);

  const issued = await ca.issue(sleep);

  t.is(issued.caRootsPem, next.pem + current);
  t.true(new crypto.X509Certificate(issued.certPem).verify(new crypto.X509Certificate(current).publicKey));
});

test("load rejects a key of another signing CA", async (t) => {
  const dir = temporaryDir(t);
  const other = await createCert({ name: "other" });
  writeFiles(dir, { ...cacertsFiles(await createHierarchy()), "ca-key.pem": other.keyPem });

  const message = await loadError(t, dir);

  t.true(message.includes(path.join(dir, "ca-key.pem")));
  t.regex(message, /does not belong to the certificate in ca-cert\.pem/);
});

test("load rejects a signing certificate that is no CA", async (t) => {
  const dir = temporaryDir(t);
  writeFiles(dir, cacertsFiles(await createHierarchy({ ca: false })));

  const message = await loadError(t, dir);

  t.true(message.includes(path.join(dir, "ca-cert.pem")));
  t.regex(message, /not a CA certificate/);
});

test("load rejects a CA without keyCertSign", async (t) => {
  const dir = temporaryDir(t);
  writeFiles(dir, cacertsFiles(await createHierarchy({ keyUsage: x509.KeyUsageFlags.digitalSignature })));

  const message = await loadError(t, dir);

  t.true(message.includes(path.join(dir, "ca-cert.pem")));
  t.regex(message, /lacks keyCertSign/);
});

test("load rejects an expired signing certificate", async (t) => {
  const dir = temporaryDir(t);
  const expired = { notBefore: new Date(Date.now() - 48 * HOUR_MS), notAfter: new Date(Date.now() - HOUR_MS) };
  writeFiles(dir, cacertsFiles(await createHierarchy(expired)));

  const message = await loadError(t, dir);

  t.true(message.includes(path.join(dir, "ca-cert.pem")));
  t.regex(message, /expired on/);
});

test("load rejects a missing cert-chain.pem", async (t) => {
  const dir = temporaryDir(t);
  const files = cacertsFiles(await createHierarchy());
  delete files["cert-chain.pem"];
  writeFiles(dir, files);

  const message = await loadError(t, dir);

  t.true(message.includes(`missing ${path.join(dir, "cert-chain.pem")} for the istio-cacerts layout`));
  t.true(message.includes("found: ca-cert.pem, ca-key.pem, root-cert.pem"));
});

test("load rejects a chain that misses a root", async (t) => {
  const dir = temporaryDir(t);
  const hierarchy = await createHierarchy();
  const stranger = await createCert({ name: "stranger root" });
  writeFiles(dir, { ...cacertsFiles(hierarchy), "root-cert.pem": stranger.pem });

  const message = await loadError(t, dir);

  t.true(message.includes(path.join(dir, "ca-cert.pem")));
  t.regex(message, /does not chain to any root in root-cert\.pem/);
});

test("load rejects a trust domain other than ca.json", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir, { trustDomain: "mesh.example" });

  const message = await loadError(t, dir, "other.local");

  t.true(message.includes(path.join(dir, "ca.json")));
  t.regex(message, /names trust domain mesh\.example, not the requested other\.local/);
});

test("issued leaf has only the SPIFFE name", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const ca = await EmbeddedCa.load(dir);

  const leaf = new x509.X509Certificate((await ca.issue(sleep)).certPem);

  t.is(leaf.subject, "");
  const san = leaf.getExtension(x509.SubjectAlternativeNameExtension);
  t.true(san?.critical);
  t.deepEqual(san?.names.toJSON(), [{ type: "url", value: "spiffe://cluster.local/ns/default/sa/sleep" }]);
  const usage = leaf.getExtension(x509.KeyUsagesExtension);
  t.true(usage?.critical);
  t.is(usage?.usages, x509.KeyUsageFlags.digitalSignature);
  t.deepEqual([...(leaf.getExtension(x509.ExtendedKeyUsageExtension)?.usages ?? [])], [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]);
  const constraints = leaf.getExtension(x509.BasicConstraintsExtension);
  t.true(constraints?.critical);
  t.false(constraints?.ca);
  const rootKeyId = new x509.X509Certificate(ca.rootPem).getExtension(x509.SubjectKeyIdentifierExtension)?.keyId;
  t.is(leaf.getExtension(x509.AuthorityKeyIdentifierExtension)?.keyId, rootKeyId);
});

test("leaf validity ends with the signing CA", async (t) => {
  const dir = temporaryDir(t);
  const caEnd = new Date(Math.floor((Date.now() + 2 * HOUR_MS) / 1000) * 1000);
  writeFiles(dir, cacertsFiles(await createHierarchy({ notAfter: caEnd })));
  const ca = await EmbeddedCa.load(dir);

  const issued = await ca.issue(sleep, 24 * 3600);

  t.is(issued.notAfter.getTime(), caEnd.getTime());
  t.is(Date.parse(new crypto.X509Certificate(issued.certPem).validTo), caEnd.getTime());
});

test("sign issues for a workload's CSR", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const ca = await EmbeddedCa.load(dir);
  const request = await createCertificateRequest(sleep);

  const signed = await ca.sign(request.csrPem, 600);

  t.deepEqual(signed.identity, sleep);
  t.true(certificateMatchesKey(signed.certPem, request.publicKeySpki));
  t.is(signed.caRootsPem, ca.rootPem);
  t.true(Math.abs(signed.notAfter.getTime() - (Date.now() + 600_000)) < 5_000);
});

/** Makes a CSR with the given names and key through @peculiar/x509. */
async function requestWith(names: x509.JsonGeneralName[], rsa = false): Promise<string> {
  const keys = (await crypto.webcrypto.subtle.generateKey(rsa ? RSA_KEY : EC_KEY, true, ["sign", "verify"])) as crypto.webcrypto.CryptoKeyPair;
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    keys,
    signingAlgorithm: rsa ? RSA_KEY : { name: "ECDSA", hash: "SHA-256" },
    extensions: [new x509.SubjectAlternativeNameExtension(names, true)],
  });
  return csr.toString("pem");
}

const SLEEP_URI = { type: "url" as const, value: "spiffe://cluster.local/ns/default/sa/sleep" };

test("sign rejects CSRs a workload must not get", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const ca = await EmbeddedCa.load(dir);
  const valid = await createCertificateRequest(sleep);
  const der = x509.PemConverter.decodeFirst(valid.csrPem);
  const tampered = Buffer.from(der);
  tampered[tampered.length - 1] ^= 0x01;
  const cases: Array<[string, string, RegExp]> = [
    ["two SANs", await requestWith([SLEEP_URI, { type: "url", value: "spiffe://cluster.local/ns/default/sa/other" }]), /expected exactly one URI SAN/],
    ["a DNS SAN", await requestWith([{ type: "dns", value: "sleep.default.svc" }]), /expected exactly one URI SAN/],
    ["a bad signature", x509.PemConverter.encode(tampered, "CERTIFICATE REQUEST"), /signature does not verify/],
    ["an RSA key", await requestWith([SLEEP_URI], true), /expected ECDSA P-256/],
    ["another trust domain", await requestWith([{ type: "url", value: "spiffe://evil.local/ns/default/sa/sleep" }]), /serves trust domain cluster\.local/],
  ];

  for (const [name, csrPem, message] of cases) {
    const error = await t.throwsAsync(ca.sign(csrPem), { instanceOf: AgentError }, name);
    t.is(error?.code, "IDENTITY_ERROR", name);
    t.regex(error?.message ?? "", message, name);
  }
});

test("reload keeps the CA until files change", async (t) => {
  const dir = temporaryDir(t);
  await initCa(dir);
  const ca = await EmbeddedCa.load(dir);

  t.is(await ca.reload(), ca);

  await initCa(dir, { force: true });
  const next = await ca.reload();
  t.not(next, ca);
  t.not(next.rootPem, ca.rootPem);
  t.is(await next.reload(), next);
});
