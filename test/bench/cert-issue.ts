// Time to issue one workload certificate with the embedded CA (new P-256 key, CSR, CSR check, signed
// leaf, PKCS#8 key), for each way of building X.509 the project considered, side by side in one run:
//
//   x509-webcrypto   @peculiar/x509 generators on WebCrypto keys, as the CA first did
//   x509-nodekeys    node:crypto keys imported into WebCrypto, then the same generators
//   asn1-nodecrypto  node:crypto keys and signatures, DER from @peculiar/asn1-x509 and asn1-csr:
//                    the chosen path, timed through EmbeddedCa.issue()
//
// Run directly: `node dist/test/bench/cert-issue.js [iterations]` (200 by default).

import "reflect-metadata";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as x509 from "@peculiar/x509";
import { EmbeddedCa, initCa } from "../../agent/identity/ca";
import { createCertificateRequest } from "../../agent/identity/csr";
import type { Identity } from "../../agent/state/types";
import { nearestRank, round } from "./stats";

x509.cryptoProvider.set(crypto.webcrypto as never);

type CryptoKeyPair = crypto.webcrypto.CryptoKeyPair;

const EC_KEY: crypto.webcrypto.EcKeyGenParams = { name: "ECDSA", namedCurve: "P-256" };
const SIGNING: crypto.webcrypto.EcdsaParams = { name: "ECDSA", hash: "SHA-256" };
const IDENTITY: Identity = { trustDomain: "cluster.local", namespace: "bench", serviceAccount: "client" };
const SPIFFE_ID = "spiffe://cluster.local/ns/bench/sa/client";
/** Untimed calls before each candidate, so that JIT compilation does not count. */
const WARMUP = 20;

export interface IssueTiming {
  name: string;
  samples: number;
  p50_ms: number;
  p90_ms: number;
}

export interface IssueFigures {
  candidates: IssueTiming[];
  /** The path EmbeddedCa.issue() takes, and its two halves. */
  chosen: IssueTiming;
  create_csr: IssueTiming;
  sign_csr: IssueTiming;
}

/** Times each candidate `iterations` times, one after the other, with a CA in a temporary folder. */
export async function benchIssue(iterations: number): Promise<IssueFigures> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ambient-bench-ca-"));
  try {
    await initCa(dir);
    const ca = await EmbeddedCa.load(dir);
    const root = await webCryptoRoot(dir);

    const webcrypto = await timeCalls("x509-webcrypto", iterations, () => issueWithWebCrypto(root, generateWebCryptoKeys));
    const nodeKeys = await timeCalls("x509-nodekeys", iterations, () => issueWithWebCrypto(root, importNodeKeys));
    const chosen = await timeCalls("asn1-nodecrypto", iterations, () => ca.issue(IDENTITY));
    const createCsr = await timeCalls("createCertificateRequest", iterations, () => createCertificateRequest(IDENTITY));
    const csrPem = (await createCertificateRequest(IDENTITY)).csrPem;
    const signCsr = await timeCalls("EmbeddedCa.sign", iterations, () => ca.sign(csrPem));
    return { candidates: [webcrypto, nodeKeys, chosen], chosen, create_csr: createCsr, sign_csr: signCsr };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function timeCalls(name: string, iterations: number, call: () => Promise<unknown>): Promise<IssueTiming> {
  for (let i = 0; i < WARMUP; i++) await call();
  const samples: number[] = [];
  for (let i = 0; i < iterations; i++) {
    const start = process.hrtime.bigint();
    await call();
    samples.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  samples.sort((a, b) => a - b);
  return { name, samples: samples.length, p50_ms: round(nearestRank(samples, 0.5), 3), p90_ms: round(nearestRank(samples, 0.9), 3) };
}

interface WebCryptoRoot {
  certificate: x509.X509Certificate;
  privateKey: crypto.webcrypto.CryptoKey;
}

async function webCryptoRoot(dir: string): Promise<WebCryptoRoot> {
  const certificate = new x509.X509Certificate(fs.readFileSync(path.join(dir, "root-cert.pem"), "utf8"));
  const keyDer = x509.PemConverter.decodeFirst(fs.readFileSync(path.join(dir, "root-key.pem"), "utf8"));
  const privateKey = await crypto.webcrypto.subtle.importKey("pkcs8", keyDer, EC_KEY, false, ["sign"]);
  return { certificate, privateKey };
}

function generateWebCryptoKeys(): Promise<CryptoKeyPair> {
  return crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"]) as Promise<CryptoKeyPair>;
}

/** node:crypto key generation, then an import into WebCrypto: Node 20 has no KeyObject.toCryptoKey. */
async function importNodeKeys(): Promise<CryptoKeyPair> {
  const { privateKey, publicKey } = crypto.generateKeyPairSync("ec", { namedCurve: "P-256" });
  const subtle = crypto.webcrypto.subtle;
  return {
    privateKey: await subtle.importKey("pkcs8", privateKey.export({ type: "pkcs8", format: "der" }), EC_KEY, true, ["sign"]),
    publicKey: await subtle.importKey("spki", publicKey.export({ type: "spki", format: "der" }), EC_KEY, true, ["verify"]),
  };
}

/** Issues with @peculiar/x509 on WebCrypto, in the steps of EmbeddedCa.issue(): key, CSR, CSR check, leaf, PKCS#8 export. */
async function issueWithWebCrypto(root: WebCryptoRoot, generateKeys: () => Promise<CryptoKeyPair>): Promise<string> {
  const keys = await generateKeys();
  const san = new x509.SubjectAlternativeNameExtension([{ type: "url", value: SPIFFE_ID }], true);
  const csrPem = (await x509.Pkcs10CertificateRequestGenerator.create({ keys, signingAlgorithm: SIGNING, extensions: [san] })).toString("pem");
  const csr = new x509.Pkcs10CertificateRequest(csrPem);
  if (!(await csr.verify())) throw new Error("the benchmark's CSR does not verify");
  const now = Date.now();
  const leaf = await x509.X509CertificateGenerator.create({
    serialNumber: crypto.randomBytes(16).toString("hex").replace(/^./, "1"),
    subject: "",
    issuer: root.certificate.subject,
    notBefore: new Date(now - 60_000),
    notAfter: new Date(now + 24 * 3600_000),
    publicKey: csr.publicKey,
    signingKey: root.privateKey,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      san,
      await x509.AuthorityKeyIdentifierExtension.create(root.certificate.publicKey),
    ],
  });
  const keyDer = await crypto.webcrypto.subtle.exportKey("pkcs8", keys.privateKey);
  return leaf.toString("pem") + x509.PemConverter.encode(keyDer, "PRIVATE KEY");
}

/** Formats the figures as a table, one row per candidate and one per half of the chosen path. */
export function formatIssueTable(figures: IssueFigures): string {
  const rows = [...figures.candidates, figures.create_csr, figures.sign_csr];
  const lines = [`${"path".padEnd(26)} ${"p50 ms".padStart(8)} ${"p90 ms".padStart(8)}  samples`];
  for (const row of rows) {
    lines.push(`${row.name.padEnd(26)} ${row.p50_ms.toFixed(3).padStart(8)} ${row.p90_ms.toFixed(3).padStart(8)}  ${row.samples}`);
  }
  return lines.join("\n");
}

async function main(): Promise<void> {
  const iterations = Number(process.argv[2] ?? 200);
  if (!Number.isInteger(iterations) || iterations <= 0 || iterations > 10_000) {
    throw new Error(`invalid iteration count ${process.argv[2]}: expected an integer from 1 to 10000`);
  }
  const figures = await benchIssue(iterations);
  console.log(`Node ${process.version}, ${os.cpus()[0]?.model ?? "unknown CPU"} x${os.cpus().length}`);
  console.log(formatIssueTable(figures));
}

if (require.main === module) {
  main().catch((error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  });
}
