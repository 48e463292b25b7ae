// Workload keys and certificate signing requests: an ECDSA P-256 key and a PKCS#10 request whose
// only name is the workload's SPIFFE URI SAN, as Istio's CA expects from ztunnel.

// @peculiar/x509 resolves its ASN.1 providers through tsyringe, which needs a Reflect metadata polyfill
// loaded before it.
import "reflect-metadata";
import crypto from "node:crypto";
import * as x509 from "@peculiar/x509";
import { AgentError } from "../errors";
import type { Identity } from "../state/types";
import { formatSpiffeId, parseSpiffeId, sameIdentity } from "./spiffe";
import { buildCertificationRequest, generateWorkloadKey, verifyEcdsaP256Request } from "./x509-der";

// @peculiar/x509 signs and hashes through WebCrypto; Node provides it as crypto.webcrypto.
x509.cryptoProvider.set(crypto.webcrypto as never);

export const EC_KEY: crypto.webcrypto.EcKeyGenParams = { name: "ECDSA", namedCurve: "P-256" };
export const SIGNING: crypto.webcrypto.EcdsaParams = { name: "ECDSA", hash: "SHA-256" };

/** A new workload key and the signing request for it. */
export interface CertificateRequest {
  identity: Identity;
  /** PKCS#10, PEM. */
  csrPem: string;
  /** The private key, PKCS#8 PEM. Never logged. */
  keyPem: string;
  /** The public key, DER SubjectPublicKeyInfo, to check that an issued certificate is for this key. */
  publicKeySpki: Buffer;
}

/** Makes a P-256 key and a CSR with an empty subject and the identity's SPIFFE URI SAN as its only name. */
export async function createCertificateRequest(identity: Identity): Promise<CertificateRequest> {
  // node:crypto keys and a DER builder: about 0.6 ms where @peculiar/x509 on WebCrypto took 2 to 4 ms.
  const key = generateWorkloadKey();
  const csrDer = buildCertificationRequest(formatSpiffeId(identity), key);
  return {
    identity: { ...identity },
    csrPem: x509.PemConverter.encode(csrDer, "CERTIFICATE REQUEST") + "\n",
    keyPem: key.privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    publicKeySpki: key.spki,
  };
}

/** The identity and key that a verified CSR requests. */
export interface VerifiedRequest {
  identity: Identity;
  publicKey: x509.PublicKey;
  csr: x509.Pkcs10CertificateRequest;
}

/**
 * Parses a PEM CSR and checks it as a CA must: a valid self-signature, an ECDSA P-256 key, and exactly
 * one name, a SPIFFE URI SAN. Throws AgentError IDENTITY_ERROR naming what is wrong.
 */
export async function verifyCertificateRequest(csrPem: string): Promise<VerifiedRequest> {
  let csr: x509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(csrPem);
  } catch (error) {
    throw new AgentError("IDENTITY_ERROR", "the certificate signing request is not a PEM PKCS#10 request", { cause: error });
  }
  // ecdsa-with-SHA256 is checked with node:crypto (0.1 ms); other algorithms go through WebCrypto (about 1 ms).
  const verified = verifyEcdsaP256Request(csr.rawData) ?? (await csr.verify());
  if (!verified) {
    throw new AgentError("IDENTITY_ERROR", "the certificate signing request's signature does not verify with its own key");
  }
  const algorithm = csr.publicKey.algorithm as Partial<crypto.webcrypto.EcKeyAlgorithm>;
  if (algorithm.name !== "ECDSA" || algorithm.namedCurve !== "P-256") {
    throw new AgentError("IDENTITY_ERROR", `the certificate signing request's key is ${algorithm.name} ${algorithm.namedCurve ?? ""}; expected ECDSA P-256`);
  }
  const san = csr.extensions.find((extension) => extension instanceof x509.SubjectAlternativeNameExtension) as
    | x509.SubjectAlternativeNameExtension
    | undefined;
  const names = san?.names.toJSON() ?? [];
  if (names.length !== 1 || names[0].type !== "url") {
    throw new AgentError(
      "IDENTITY_ERROR",
      `the certificate signing request names ${JSON.stringify(names)}; expected exactly one URI SAN, the SPIFFE id`,
    );
  }
  return { identity: parseSpiffeId(names[0].value), publicKey: csr.publicKey, csr };
}

/** Tells whether a PEM certificate carries the public key `publicKeySpki` (DER SubjectPublicKeyInfo). */
export function certificateMatchesKey(certPem: string, publicKeySpki: Buffer): boolean {
  const certificate = new crypto.X509Certificate(certPem);
  return certificate.publicKey.export({ type: "spki", format: "der" }).equals(publicKeySpki);
}

/** Returns the SPIFFE identity of a leaf certificate's first URI SAN, or undefined when it has none that parses. */
export function leafIdentity(certPem: string): Identity | undefined {
  const certificate = new x509.X509Certificate(certPem);
  for (const name of certificate.getExtension(x509.SubjectAlternativeNameExtension)?.names.toJSON() ?? []) {
    if (name.type !== "url") continue;
    try {
      return parseSpiffeId(name.value);
    } catch {
      // The first URI SAN that parses as SPIFFE is the identity; other URIs are ignored.
    }
  }
  return undefined;
}

/** Tells whether a leaf certificate's identity is `identity`. */
export function isLeafFor(certPem: string, identity: Identity): boolean {
  const presented = leafIdentity(certPem);
  return presented !== undefined && sameIdentity(presented, identity);
}

export async function exportPrivateKeyPem(key: crypto.webcrypto.CryptoKey): Promise<string> {
  const der = await crypto.webcrypto.subtle.exportKey("pkcs8", key);
  return x509.PemConverter.encode(der, "PRIVATE KEY") + "\n";
}
