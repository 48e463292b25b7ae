// Verification of a TLS peer's certificate for HBONE, shared by the server (which checks the
// client) and the client (which checks the server). Node's OpenSSL verifies the chain against the
// trust bundle's roots during the handshake. This module turns that outcome and the leaf's SPIFFE
// URI SAN into the proven Identity, or into a rejection with a reason for the audit record.

import { X509Certificate } from "node:crypto";
import type crypto from "node:crypto";
import type tls from "node:tls";
import { AgentError, type ErrorCode } from "../errors";
import type { Identity } from "../state/types";
import { formatSpiffeId, parseSpiffeId } from "./spiffe";

/** Why a peer certificate was rejected: the `reason` of the audit record. */
export type VerificationFailureReason =
  | "no_peer_certificate"
  | "certificate_expired"
  | "certificate_not_yet_valid"
  | "unknown_root"
  | "invalid_chain"
  | "no_spiffe_san"
  | "malformed_spiffe_id"
  | "wrong_trust_domain"
  | "identity_mismatch";

/** The error code registered for each rejection reason. */
export const VERIFICATION_ERROR_CODES: Readonly<Record<VerificationFailureReason, ErrorCode>> = {
  no_peer_certificate: "NO_PEER_CERTIFICATE",
  certificate_expired: "CERT_EXPIRED",
  certificate_not_yet_valid: "CERT_NOT_YET_VALID",
  unknown_root: "UNKNOWN_ROOT",
  invalid_chain: "TLS_FAILURE",
  no_spiffe_san: "NO_SPIFFE_SAN",
  malformed_spiffe_id: "MALFORMED_SPIFFE_ID",
  wrong_trust_domain: "WRONG_TRUST_DOMAIN",
  identity_mismatch: "IDENTITY_ERROR",
};

/** The TLS handshake's outcome for the peer's certificate. */
export interface PresentedCertificate {
  /** The peer's leaf certificate, or undefined when it sent none. */
  leaf: crypto.X509Certificate | undefined;
  /** Node's verdict on the chain: true only when it chains to a trusted root and every certificate in it is valid now. */
  authorized: boolean;
  /** Node's chain error code (TLSSocket.authorizationError), such as CERT_HAS_EXPIRED; absent when authorized. */
  chainError?: string | null;
  /**
   * The other certificates Node reported with the leaf: those the peer sent, and the trusted root
   * Node found. Node links them by name, not by signature, so they are candidates only: a check
   * that relies on them verifies each signature itself.
   */
  intermediates?: crypto.X509Certificate[];
}

/**
 * The trust domains a side accepts as its own: its trust domain and the aliases configured for it,
 * such as the mesh's previous name during a trust domain migration.
 */
export interface AcceptedTrustDomains {
  readonly trustDomain: string;
  readonly aliases: readonly string[];
  /**
   * Tells whether the roots allowed for `trustDomain` vouch for `leaf`, through the candidate
   * intermediates. Without it, any trusted root vouches for any trust domain.
   */
  vouchesFor?(leaf: crypto.X509Certificate, intermediates: readonly crypto.X509Certificate[], trustDomain: string): boolean;
}

/** A rejected peer certificate: the registered code of its reason, and the reason itself for the audit record. */
export class PeerVerificationError extends AgentError {
  readonly reason: VerificationFailureReason;

  constructor(reason: VerificationFailureReason, message: string) {
    super(VERIFICATION_ERROR_CODES[reason], message);
    this.reason = reason;
  }
}

export type Verification =
  | { verified: true; identity: Identity }
  | { verified: false; reason: VerificationFailureReason; error: PeerVerificationError };

/** Reads what the handshake of `socket` reported about the peer's certificate. */
export function presentedCertificateOf(socket: tls.TLSSocket): PresentedCertificate {
  // Read first: on Node 20, once getPeerX509Certificate() has run, getPeerCertificate(true) no longer
  // follows the intermediates the peer sent.
  const intermediates = issuersOf(socket.getPeerCertificate(true));
  return {
    leaf: socket.getPeerX509Certificate(),
    authorized: socket.authorized === true,
    // Node sets authorizationError to null on success and to the error's code (a string) on failure.
    chainError: socket.authorizationError == null ? undefined : String(socket.authorizationError),
    intermediates,
  };
}

/** Returns the certificates Node linked above `leaf` (at most 16), parsed, without the leaf itself. */
export function issuersOf(leaf: tls.PeerCertificate | undefined): crypto.X509Certificate[] {
  const issuers: crypto.X509Certificate[] = [];
  let certificate = leaf as tls.DetailedPeerCertificate | undefined;
  for (let depth = 0; depth < 16 && certificate?.raw; depth += 1) {
    const issuer: tls.DetailedPeerCertificate | undefined = certificate.issuerCertificate;
    if (!issuer?.raw || issuer === certificate || issuer.fingerprint256 === certificate.fingerprint256) break;
    issuers.push(new X509Certificate(issuer.raw));
    certificate = issuer;
  }
  return issuers;
}

/**
 * Verifies an HBONE client's certificate on the server: it must be present, chain to a trusted
 * root, be valid now, and carry a SPIFFE identity in one of the accepted trust domains. `peer`
 * names the client in messages ("ip:port").
 */
export function verifyClientCertificate(presented: PresentedCertificate, accepted: AcceptedTrustDomains, peer: string): Verification {
  const proven = verifyChainAndIdentity(presented, `client ${peer}`, accepted);
  if (!proven.verified) {
    return proven;
  }
  if (!acceptsTrustDomain(accepted, proven.identity.trustDomain)) {
    return reject(
      "wrong_trust_domain",
      `client ${peer} presented ${formatSpiffeId(proven.identity)}, whose trust domain is not ${describeTrustDomains(accepted)}; ` +
        `add its trust domain as an alias if the two meshes share roots`,
    );
  }
  return proven;
}

/**
 * Verifies an HBONE server's certificate on the client: it must chain to a trusted root, be valid
 * now, and carry one of the expected identities. A presented trust domain matches an expected one
 * when both are among `accepted` (the client's own trust domain and its aliases). Otherwise, and
 * without `accepted`, the trust domains must be equal. `peer` names the server in messages ("ip:port").
 */
export function verifyServerCertificate(
  presented: PresentedCertificate,
  expected: readonly Identity[],
  accepted: AcceptedTrustDomains | undefined,
  peer: string,
): Verification {
  const proven = verifyChainAndIdentity(presented, peer, accepted);
  if (!proven.verified) {
    return proven;
  }
  if (expected.some((identity) => matchesExpected(proven.identity, identity, accepted))) {
    return proven;
  }
  const expectedIds = expected.map(formatSpiffeId);
  const expectedText = expectedIds.length === 1 ? expectedIds[0] : `one of ${expectedIds.join(", ")}`;
  return reject("identity_mismatch", `${peer} presented ${formatSpiffeId(proven.identity)}, expected ${expectedText}`);
}

/**
 * Maps a chain error code of Node's TLS to a rejection, or to undefined for other codes. The code is
 * TLSSocket.authorizationError, or that of the error a client socket with rejectUnauthorized emits.
 */
export function chainFailureOf(code: string | undefined, peer: string): PeerVerificationError | undefined {
  const reason = code === undefined ? undefined : CHAIN_ERRORS.get(code);
  return reason === undefined ? undefined : new PeerVerificationError(reason, chainMessage(reason, code!, peer));
}

/** Returns the verification reason behind an error, so that a caller can record it; undefined for other errors. */
export function verificationReasonOf(error: unknown): VerificationFailureReason | undefined {
  return error instanceof PeerVerificationError ? error.reason : undefined;
}

/**
 * Returns the identity of a leaf: its one URI SAN, a SPIFFE id. An X.509 SVID has exactly one URI
 * SAN, so a leaf with several is malformed_spiffe_id whatever they name: otherwise a CA that signs
 * a second URI could let one certificate pass for two workloads. A leaf whose URI does not parse
 * is malformed_spiffe_id; one without a spiffe:// URI is no_spiffe_san.
 */
export function leafSpiffeIdentity(
  leaf: crypto.X509Certificate,
): { identity: Identity } | { reason: "no_spiffe_san" | "malformed_spiffe_id"; detail: string } {
  const uris = uriSubjectAltNames(leaf.subjectAltName);
  const spiffeUris = uris.filter((uri) => uri.toLowerCase().startsWith("spiffe://"));
  if (spiffeUris.length === 0) {
    return { reason: "no_spiffe_san", detail: `its subject alternative names are ${leaf.subjectAltName ?? "none"}` };
  }
  if (uris.length > 1) {
    return { reason: "malformed_spiffe_id", detail: `it has ${uris.length} URI SANs (${uris.join(", ")}); a workload certificate has exactly one` };
  }
  try {
    return { identity: parseSpiffeId(uris[0]) };
  } catch (error) {
    return { reason: "malformed_spiffe_id", detail: (error as Error).message };
  }
}

/** Tells whether `trustDomain` is the accepted trust domain or one of its aliases. */
export function acceptsTrustDomain(accepted: AcceptedTrustDomains, trustDomain: string): boolean {
  return trustDomain === accepted.trustDomain || accepted.aliases.includes(trustDomain);
}

/**
 * The chain errors Node reports by OpenSSL's X509_V_ERR name, and the rejection each means.
 * Unknown root: the issuer of the leaf or of an intermediate is not among the trusted roots.
 */
const CHAIN_ERRORS: ReadonlyMap<string, VerificationFailureReason> = new Map([
  ["CERT_HAS_EXPIRED", "certificate_expired"],
  ["CERT_NOT_YET_VALID", "certificate_not_yet_valid"],
  ["UNABLE_TO_VERIFY_LEAF_SIGNATURE", "unknown_root"],
  ["UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "unknown_root"],
  ["UNABLE_TO_GET_ISSUER_CERT", "unknown_root"],
  ["SELF_SIGNED_CERT_IN_CHAIN", "unknown_root"],
  ["DEPTH_ZERO_SELF_SIGNED_CERT", "unknown_root"],
  ["UNABLE_TO_DECRYPT_CERT_SIGNATURE", "invalid_chain"],
  ["UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY", "invalid_chain"],
  ["CERT_SIGNATURE_FAILURE", "invalid_chain"],
  ["ERROR_IN_CERT_NOT_BEFORE_FIELD", "invalid_chain"],
  ["ERROR_IN_CERT_NOT_AFTER_FIELD", "invalid_chain"],
  ["CERT_CHAIN_TOO_LONG", "invalid_chain"],
  ["CERT_REVOKED", "invalid_chain"],
  ["INVALID_CA", "invalid_chain"],
  ["PATH_LENGTH_EXCEEDED", "invalid_chain"],
  ["INVALID_PURPOSE", "invalid_chain"],
  ["CERT_UNTRUSTED", "invalid_chain"],
  ["CERT_REJECTED", "invalid_chain"],
]);

function verifyChainAndIdentity(presented: PresentedCertificate, peer: string, accepted: AcceptedTrustDomains | undefined): Verification {
  if (!presented.leaf) {
    return reject("no_peer_certificate", `${peer} presented no certificate; HBONE requires a workload certificate on both sides`);
  }
  if (!presented.authorized || presented.chainError) {
    // Fail closed: a chain Node did not authorize is rejected even when its error code is unknown here.
    const code = presented.chainError ?? "UNKNOWN";
    const error = chainFailureOf(code, peer) ?? new PeerVerificationError("invalid_chain", chainMessage("invalid_chain", code, peer));
    return { verified: false, reason: error.reason, error };
  }
  if (presented.leaf.ca) {
    return reject("invalid_chain", `${peer} presented a CA certificate (basicConstraints CA:true) as its leaf; a workload certificate has CA:false`);
  }
  const named = leafSpiffeIdentity(presented.leaf);
  if ("identity" in named) {
    return checkRootVouches(presented, named.identity, peer, accepted) ?? { verified: true, identity: named.identity };
  }
  if (named.reason === "malformed_spiffe_id") {
    return reject("malformed_spiffe_id", `${peer} presented a certificate with a malformed SPIFFE id: ${named.detail}`);
  }
  return reject("no_spiffe_san", `${peer} presented a certificate without a spiffe:// URI SAN (${named.detail}); expected a workload certificate`);
}

/**
 * Rejects an identity whose chain ended at a root that may not vouch for its trust domain, such as
 * a peer cluster's root from --trust-bundle presenting an identity of this mesh's trust domain.
 */
function checkRootVouches(presented: PresentedCertificate, identity: Identity, peer: string, accepted: AcceptedTrustDomains | undefined): Verification | undefined {
  if (!accepted?.vouchesFor || !presented.leaf) return undefined;
  if (accepted.vouchesFor(presented.leaf, presented.intermediates ?? [], identity.trustDomain)) return undefined;
  return reject(
    "unknown_root",
    `${peer} presented ${formatSpiffeId(identity)}, but its chain as sent (leaf first, each certificate's issuer next, at most 8 intermediates) ` +
      `does not lead to one of the CA's roots; identities of ${identity.trustDomain} must chain to the CA's roots, and --trust-bundle roots vouch for alias trust domains only`,
  );
}

function matchesExpected(presented: Identity, expected: Identity, accepted: AcceptedTrustDomains | undefined): boolean {
  if (presented.namespace !== expected.namespace || presented.serviceAccount !== expected.serviceAccount) {
    return false;
  }
  if (presented.trustDomain === expected.trustDomain) {
    return true;
  }
  return accepted !== undefined && acceptsTrustDomain(accepted, presented.trustDomain) && acceptsTrustDomain(accepted, expected.trustDomain);
}

function chainMessage(reason: VerificationFailureReason, code: string, peer: string): string {
  switch (reason) {
    case "certificate_expired":
      return `${peer} presented a certificate chain with an expired certificate (${code}); check the peer's certificate rotation and both clocks`;
    case "certificate_not_yet_valid":
      return `${peer} presented a certificate chain with a certificate not valid yet (${code}); check both clocks`;
    case "unknown_root":
      return `${peer} presented a certificate that chains to none of the trusted roots (${code}); check the trust bundle`;
    default:
      return `${peer} presented an invalid certificate chain (${code}): a certificate in it is not a valid CA for the next, or the chain is malformed; check how the peer's certificate was issued`;
  }
}

function reject(reason: VerificationFailureReason, message: string): Verification {
  return { verified: false, reason, error: new PeerVerificationError(reason, message) };
}

function describeTrustDomains(accepted: AcceptedTrustDomains): string {
  return accepted.aliases.length === 0 ? accepted.trustDomain : `${accepted.trustDomain} or an alias (${accepted.aliases.join(", ")})`;
}

/** Returns the URI entries of Node's subjectAltName text ("URI:spiffe://..., DNS:..."), in order. */
export function uriSubjectAltNames(subjectAltName: string | undefined): string[] {
  const uris: string[] = [];
  // Node quotes a value that contains a comma or a quote as a JSON string.
  const pattern = /([A-Za-z ]+):("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)/g;
  for (const match of (subjectAltName ?? "").matchAll(pattern)) {
    if (match[1] !== "URI") continue;
    uris.push(match[2].startsWith('"') ? unquoteSubjectAltName(match[2]) : match[2]);
  }
  return uris;
}

/**
 * Decodes a quoted value. One that is not valid JSON (a raw control character, an unknown escape)
 * stays quoted: it still counts as a URI SAN, and no SPIFFE id parses from it.
 */
function unquoteSubjectAltName(quoted: string): string {
  try {
    return JSON.parse(quoted) as string;
  } catch {
    return quoted;
  }
}
