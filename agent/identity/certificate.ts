// A workload certificate and the TLS settings every HBONE socket uses with it.

import tls from "node:tls";
import type { Identity } from "../state/types";

/** TLS 1.3 suites HBONE offers: AES-GCM only, as ztunnel does (no ChaCha20). */
export const HBONE_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384";

/** A workload's certificate, its key and the roots that peers' certificates must chain to. */
export interface WorkloadCertificate {
  identity: Identity;
  /** The leaf certificate alone, PEM. */
  certPem: string;
  /** The leaf's private key, PKCS#8 PEM. */
  keyPem: string;
  /** The leaf followed by its intermediates, PEM. */
  chainPem: string;
  /** The trusted roots, PEM. */
  rootPem: string;
  notBefore: Date;
  notAfter: Date;
  /** Built once per certificate: TLS 1.3 only, AES-GCM suites, this key and chain, trusting rootPem. */
  secureContext: tls.SecureContext;
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
