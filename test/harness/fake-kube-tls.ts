// Certificates and kubeconfig files for the fake Kubernetes API server: a self-signed CA made at
// start, a server certificate for the IP addresses it listens on, and a kubeconfig that points a
// client at it.

import "reflect-metadata";
import crypto from "node:crypto";
import fs from "node:fs";
import * as x509 from "@peculiar/x509";
import YAML from "yaml";

// @peculiar/x509 signs and hashes through WebCrypto; Node provides it as crypto.webcrypto.
x509.cryptoProvider.set(crypto.webcrypto as never);

type CryptoKeyPair = crypto.webcrypto.CryptoKeyPair;

const EC_KEY: crypto.webcrypto.EcKeyGenParams = { name: "ECDSA", namedCurve: "P-256" };
const SIGNING: crypto.webcrypto.EcdsaParams = { name: "ECDSA", hash: "SHA-256" };
const DAY_MS = 24 * 3_600_000;

/** The CA of one fake API server; it signs a new server certificate whenever a listen address is added. */
export interface FakeKubeCa {
  certPem: string;
  certificate: x509.X509Certificate;
  keys: CryptoKeyPair;
}

/** A server certificate and its private key, PEM, for tls.createSecureContext. */
export interface ServerCredentials {
  cert: string;
  key: string;
}

function serialNumber(): string {
  return crypto.randomBytes(8).toString("hex").replace(/^./, "1");
}

async function generateKeys(): Promise<CryptoKeyPair> {
  return (await crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"])) as CryptoKeyPair;
}

/** Creates a self-signed ECDSA P-256 CA valid from an hour ago for a day. */
export async function createFakeKubeCa(): Promise<FakeKubeCa> {
  const keys = await generateKeys();
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serialNumber(),
    name: "CN=fake-kube-api-ca",
    notBefore: new Date(Date.now() - DAY_MS / 24),
    notAfter: new Date(Date.now() + DAY_MS),
    keys,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
    ],
  });
  return { certPem: certificate.toString("pem") + "\n", certificate, keys };
}

/** Issues a server certificate with these IP SANs and the DNS SANs "localhost" and "kubernetes.default.svc". */
export async function issueServerCredentials(ca: FakeKubeCa, ips: string[]): Promise<ServerCredentials> {
  const keys = await generateKeys();
  const names = [
    ...ips.map((ip) => ({ type: "ip" as const, value: ip })),
    { type: "dns" as const, value: "localhost" },
    { type: "dns" as const, value: "kubernetes.default.svc" },
  ];
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    subject: "CN=fake-kube-apiserver",
    issuer: ca.certificate.subject,
    notBefore: new Date(Date.now() - DAY_MS / 24),
    notAfter: new Date(Date.now() + DAY_MS),
    publicKey: keys.publicKey,
    signingKey: ca.keys.privateKey,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension(names),
    ],
  });
  const der = await crypto.webcrypto.subtle.exportKey("pkcs8", keys.privateKey);
  const key = crypto.createPrivateKey({ key: Buffer.from(der), format: "der", type: "pkcs8" }).export({ format: "pem", type: "pkcs8" }).toString();
  return { cert: certificate.toString("pem") + "\n" + ca.certPem, key };
}

export interface KubeconfigOptions {
  serverUrl: string;
  /** Bearer token of the user entry; no token when absent. */
  token?: string;
  /** PEM of the CA that signed the server certificate, written as certificate-authority-data. */
  caPem?: string;
}

/**
 * Builds a kubeconfig with one cluster, one user and one current context named "fake-kube-api".
 * An http:// server gets insecure-skip-tls-verify, which TLS-less access needs in client-node.
 */
export function kubeconfigYaml(options: KubeconfigOptions): string {
  const cluster: Record<string, string | boolean> = { server: options.serverUrl };
  if (options.caPem) cluster["certificate-authority-data"] = Buffer.from(options.caPem).toString("base64");
  // @kubernetes/client-node 1.4 rejects an http:// server unless insecure-skip-tls-verify is set.
  if (options.serverUrl.startsWith("http:")) cluster["insecure-skip-tls-verify"] = true;
  const user: Record<string, string> = {};
  if (options.token) user.token = options.token;
  const name = "fake-kube-api";
  return YAML.stringify({
    apiVersion: "v1",
    kind: "Config",
    clusters: [{ name, cluster }],
    users: [{ name, user }],
    contexts: [{ name, context: { cluster: name, user: name } }],
    "current-context": name,
  });
}

/** Writes kubeconfigYaml to `filePath` with mode 0600, because it contains the token. */
export function writeKubeconfigFile(filePath: string, options: KubeconfigOptions): void {
  fs.writeFileSync(filePath, kubeconfigYaml(options), { mode: 0o600 });
}
