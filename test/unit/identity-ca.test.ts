import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import test from "ava";
import { AgentError } from "../../agent/errors";
import { EmbeddedCa, initCa } from "../../agent/identity/ca";

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

  const certificate = await ca.issue(sleep);

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

  const error = await t.throwsAsync(EmbeddedCa.load(dir), { instanceOf: AgentError });

  t.true(error?.message.includes(path.join(dir, "ca.json")));
});
