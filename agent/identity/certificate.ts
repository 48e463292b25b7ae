// A workload certificate, the interface every CA implements, and the TLS settings every HBONE
// socket uses with a certificate.

import tls from "node:tls";
import type { Identity } from "../state/types";

/** TLS 1.3 suites HBONE offers: AES-GCM only, as ztunnel does (no ChaCha20). */
export const HBONE_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384";

/** A certificate that a CA returned for one identity, with its key and the CA's roots. */
export interface IssuedCertificate {
  identity: Identity;
  /** The leaf certificate alone, PEM. */
  certPem: string;
  /** The leaf's private key, PKCS#8 PEM. Never logged. */
  keyPem: string;
  /** The leaf followed by its intermediates, PEM. */
  chainPem: string;
  /** The roots the CA named with this certificate, PEM, one or more (several while a root rotates). */
  caRootsPem: string;
  notBefore: Date;
  notAfter: Date;
}

/** An issued certificate ready for TLS: the trusted roots it was combined with and its secure context. */
export interface WorkloadCertificate extends IssuedCertificate {
  /** The roots that peers' certificates must chain to, PEM: the trust bundle when the context was built. */
  rootPem: string;
  /** Built once per certificate and trust bundle: TLS 1.3 only, AES-GCM suites, this key and chain, trusting rootPem. */
  secureContext: tls.SecureContext;
}

/** A CA: the embedded one or Istio's over gRPC. */
export interface CertificateIssuer {
  /** Issues a certificate for `identity` valid about ttlSeconds (the CA's default when absent). */
  issue(identity: Identity, ttlSeconds?: number): Promise<IssuedCertificate>;
}

/** Returns the TLS options shared by the HBONE client and server: key, chain, roots, TLS 1.3 with AES-GCM. */
export function hboneTlsOptions(
  certificate: Pick<WorkloadCertificate, "keyPem" | "chainPem" | "rootPem">,
): tls.SecureContextOptions {
  return {
    key: certificate.keyPem,
    cert: certificate.chainPem,
    ca: certificate.rootPem,
    minVersion: "TLSv1.3",
    maxVersion: "TLSv1.3",
    ciphers: HBONE_CIPHERS,
  };
}

/** Builds the secure context of a certificate; costs about a millisecond, so build it once per certificate. */
export function buildSecureContext(
  certificate: Pick<WorkloadCertificate, "keyPem" | "chainPem" | "rootPem">,
): tls.SecureContext {
  return tls.createSecureContext(hboneTlsOptions(certificate));
}

/** Combines an issued certificate with the roots to trust (by default the CA's own) and builds its secure context. */
export function withSecureContext(issued: IssuedCertificate, rootPem: string = issued.caRootsPem): WorkloadCertificate {
  const material = { keyPem: issued.keyPem, chainPem: issued.chainPem, rootPem };
  return { ...issued, rootPem, secureContext: buildSecureContext(material) };
}
