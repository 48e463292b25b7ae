import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import test from "ava";
import { parseIdentityFlags } from "../../agent/cli/identity-flags";
import { initCa, ROOT_CERT_FILE } from "../../agent/identity/ca";
import { startIdentity } from "../../agent/identity/setup";
import { silentLogger } from "../../agent/log";

const sleep = { trustDomain: "cluster.local", namespace: "default", serviceAccount: "sleep" };

function tempDir(t: import("ava").ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-identity-setup-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("flags: an embedded CA folder", (t) => {
  const options = parseIdentityFlags({ "ca-dir": "ca", "trust-domain-alias": ["old.example"], "cert-ttl": "3600" });

  t.deepEqual(options.ca, { kind: "embedded", dir: path.resolve("ca") });
  t.deepEqual(options.trustDomainAliases, ["old.example"]);
  t.is(options.certTtlSeconds, 3600);
});

test("flags: Istio's CA with its defaults", (t) => {
  const options = parseIdentityFlags({ "ca-address": "istiod.istio-system.svc:15012", "ca-root-cert": "/etc/istio/root-cert.pem" });

  t.deepEqual(options.ca, {
    kind: "istio",
    address: "istiod.istio-system.svc:15012",
    rootCertFile: "/etc/istio/root-cert.pem",
    tokenFile: "/var/run/secrets/tokens/istio-token",
    clusterId: "Kubernetes",
    serverName: undefined,
  });
  t.is(options.certTtlSeconds, undefined);
});

const badFlags: Array<[string, Parameters<typeof parseIdentityFlags>[0], RegExp]> = [
  ["a missing CA", {}, /no CA given: pass --ca-dir DIR .* or --ca-address/],
  ["a second CA", { "ca-dir": "ca", "ca-address": "istiod:15012", "ca-root-cert": "r.pem" }, /--ca-dir and --ca-address both name a CA/],
  ["Istio's CA without its root", { "ca-address": "istiod:15012" }, /--ca-address needs --ca-root-cert FILE/],
  ["an Istio flag with the embedded CA", { "ca-dir": "ca", "ca-token-file": "t" }, /--ca-token-file applies to Istio's CA only/],
  ["an address without a port", { "ca-address": "istiod", "ca-root-cert": "r.pem" }, /invalid --ca-address "istiod": give host:port/],
  ["a lifetime below 10 s", { "ca-dir": "ca", "cert-ttl": "5" }, /invalid --cert-ttl "5": .* at least 10/],
  ["a lifetime that is not a number", { "ca-dir": "ca", "cert-ttl": "1h" }, /invalid --cert-ttl "1h"/],
  ["a lifetime in exponent form", { "ca-dir": "ca", "cert-ttl": "1e3" }, /invalid --cert-ttl "1e3"/],
  ["port 0", { "ca-address": "istiod:0", "ca-root-cert": "r.pem" }, /invalid --ca-address "istiod:0"/],
  ["a port above 65535", { "ca-address": "istiod:99999", "ca-root-cert": "r.pem" }, /invalid --ca-address "istiod:99999"/],
];

for (const [name, values, message] of badFlags) {
  test(`flags: ${name} is rejected, with the fix in the message`, (t) => {
    t.throws(() => parseIdentityFlags(values), { message });
  });
}

test("embedded CA roots follow folder reloads", async (t) => {
  const dir = tempDir(t);
  const caDir = path.join(dir, "ca");
  const otherDir = path.join(dir, "other");
  await initCa(caDir);
  await initCa(otherDir);
  const ownRoot = fs.readFileSync(path.join(caDir, ROOT_CERT_FILE), "utf8");
  const otherRoot = fs.readFileSync(path.join(otherDir, ROOT_CERT_FILE), "utf8");
  const identity = await startIdentity({ ca: { kind: "embedded", dir: caDir }, trustDomainAliases: [] }, silentLogger());
  t.teardown(() => identity.close());
  let changes = 0;
  identity.trust.on("change", () => (changes += 1));

  const before = await identity.certs.get(sleep);
  t.is(identity.trust.roots().length, 1);
  t.is(before.rootPem.match(/BEGIN CERTIFICATE/g)?.length, 1);

  fs.writeFileSync(path.join(caDir, ROOT_CERT_FILE), ownRoot + otherRoot);
  await identity.reload();
  const overlap = await identity.certs.get(sleep);
  t.is(changes, 1);
  t.is(identity.trust.roots().length, 2);
  t.is(overlap.certPem, before.certPem, "the certificate stays; only its trusted roots change");
  t.is(overlap.rootPem.match(/BEGIN CERTIFICATE/g)?.length, 2);

  await identity.reload();
  t.is(changes, 1, "an unchanged folder changes nothing");

  fs.writeFileSync(path.join(caDir, ROOT_CERT_FILE), "not a certificate\n");
  await identity.reload();
  t.is(identity.trust.roots().length, 2, "a folder that does not load keeps the last good roots");

  fs.writeFileSync(path.join(caDir, ROOT_CERT_FILE), ownRoot);
  await identity.reload();
  t.is(changes, 2);
  t.is(identity.trust.roots().length, 1);
  t.is((await identity.certs.get(sleep)).rootPem.match(/BEGIN CERTIFICATE/g)?.length, 1);
});

test("missing CA folder names agentctl ca init", async (t) => {
  const dir = tempDir(t);
  await t.throwsAsync(startIdentity({ ca: { kind: "embedded", dir: path.join(dir, "none") }, trustDomainAliases: [] }, silentLogger()), {
    message: /agentctl ca init --dir/,
  });
});
