// Test certificates with chosen properties: roots, intermediates and leaves with any URI and DNS
// SANs and any validity window, so that a test can present exactly the certificate it needs.

import "reflect-metadata";
import crypto from "node:crypto";
import * as x509 from "@peculiar/x509";
import { withSecureContext, type WorkloadCertificate } from "../../agent/identity/certificate";
import type { Identity } from "../../agent/state/types";

x509.cryptoProvider.set(crypto.webcrypto as never);

type CryptoKeyPair = crypto.webcrypto.CryptoKeyPair;

const EC_KEY: crypto.webcrypto.EcKeyGenParams = { name: "ECDSA", namedCurve: "P-256" };
const SIGNING: crypto.webcrypto.EcdsaParams = { name: "ECDSA", hash: "SHA-256" };
const HOUR_MS = 3_600_000;

/** A CA certificate and its key pair, able to sign leaves and intermediates. */
export interface TestCa {
  certificate: x509.X509Certificate;
  certPem: string;
  keys: CryptoKeyPair;
  /** The intermediates between this CA and its root, leaf side first, PEM; empty for a root. */
  chainPem: string;
}

export interface CaOptions {
  /** Common name of the subject; must differ between CAs of one test so chains are not confused. */
  name: string;
  notBefore?: Date;
  notAfter?: Date;
  /** The key pair of the new certificate; a new one when absent. */
  keys?: CryptoKeyPair;
}

/** Creates a self-signed ECDSA P-256 root, valid from an hour ago for a day unless the options set the window. */
export async function createRoot(options: CaOptions): Promise<TestCa> {
  const keys = (await crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"])) as CryptoKeyPair;
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serialNumber(),
    name: `CN=${options.name}`,
    notBefore: options.notBefore ?? new Date(Date.now() - HOUR_MS),
    notAfter: options.notAfter ?? new Date(Date.now() + 24 * HOUR_MS),
    keys,
    signingAlgorithm: SIGNING,
    extensions: caExtensions(),
  });
  return { certificate, certPem: pemOf(certificate), keys, chainPem: "" };
}

/** Creates an intermediate CA signed by `issuer`. */
export async function createIntermediate(issuer: TestCa, options: CaOptions): Promise<TestCa> {
  const keys = options.keys ?? ((await crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"])) as CryptoKeyPair);
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    subject: `CN=${options.name}`,
    issuer: issuer.certificate.subject,
    notBefore: options.notBefore ?? new Date(Date.now() - HOUR_MS),
    notAfter: options.notAfter ?? new Date(Date.now() + 24 * HOUR_MS),
    publicKey: keys.publicKey,
    signingKey: issuer.keys.privateKey,
    signingAlgorithm: SIGNING,
    extensions: caExtensions(),
  });
  const certPem = pemOf(certificate);
  return { certificate, certPem, keys, chainPem: certPem + issuer.chainPem };
}

export interface LeafOptions {
  /** URI SANs in order, for example a SPIFFE id. */
  uris?: string[];
  /** DNS SANs. */
  dnsNames?: string[];
  notBefore?: Date;
  notAfter?: Date;
  /** Marks the leaf as a CA (basicConstraints CA:true, no key usage), which a workload certificate must not be. */
  caFlag?: boolean;
}

/** A leaf certificate with its key, ready to present in TLS. */
export interface TestLeaf {
  certPem: string;
  keyPem: string;
  /** The leaf followed by the issuer's intermediates. */
  chainPem: string;
  notBefore: Date;
  notAfter: Date;
}

/** Creates a leaf signed by `issuer` with the given SANs and validity (an hour ago to a day ahead by default). */
export async function createLeaf(issuer: TestCa, options: LeafOptions): Promise<TestLeaf> {
  const keys = (await crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"])) as CryptoKeyPair;
  const names: x509.JsonGeneralName[] = [
    ...(options.uris ?? []).map((value) => ({ type: "url" as const, value })),
    ...(options.dnsNames ?? []).map((value) => ({ type: "dns" as const, value })),
  ];
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(options.caFlag === true, undefined, true),
    ...(options.caFlag ? [] : [new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true)]),
    new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
    await x509.AuthorityKeyIdentifierExtension.create(issuer.keys.publicKey),
  ];
  if (names.length > 0) {
    extensions.push(new x509.SubjectAlternativeNameExtension(names, true));
  }
  const notBefore = options.notBefore ?? new Date(Date.now() - HOUR_MS);
  const notAfter = options.notAfter ?? new Date(Date.now() + 24 * HOUR_MS);
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    // A leaf without SANs gets a subject so that it is still a valid certificate.
    subject: names.length > 0 ? "" : "CN=no-san-leaf",
    issuer: issuer.certificate.subject,
    notBefore,
    notAfter,
    publicKey: keys.publicKey,
    signingKey: issuer.keys.privateKey,
    signingAlgorithm: SIGNING,
    extensions,
  });
  const der = await crypto.webcrypto.subtle.exportKey("pkcs8", keys.privateKey);
  const certPem = pemOf(certificate);
  return {
    certPem,
    keyPem: x509.PemConverter.encode(der, "PRIVATE KEY") + "\n",
    chainPem: certPem + issuer.chainPem,
    notBefore: certificate.notBefore,
    notAfter: certificate.notAfter,
  };
}

/**
 * Wraps a test leaf as a workload certificate whose secure context trusts `rootsPem`. `identity` is
 * only a label here: the certificate's SANs are whatever the leaf carries.
 */
export function asWorkloadCertificate(leaf: TestLeaf, identity: Identity, rootsPem: string): WorkloadCertificate {
  return withSecureContext(
    {
      identity,
      certPem: leaf.certPem,
      keyPem: leaf.keyPem,
      chainPem: leaf.chainPem,
      caRootsPem: rootsPem,
      notBefore: leaf.notBefore,
      notAfter: leaf.notAfter,
    },
    rootsPem,
  );
}

function caExtensions(): x509.Extension[] {
  return [
    new x509.BasicConstraintsExtension(true, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
  ];
}

function pemOf(certificate: x509.X509Certificate): string {
  return certificate.toString("pem") + "\n";
}

function serialNumber(): string {
  const bytes = crypto.randomBytes(16);
  bytes[0] = (bytes[0] & 0x7f) | 0x01;
  return bytes.toString("hex");
}
