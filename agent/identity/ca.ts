// The embedded CA: a root or intermediate kept in a folder (written by initCa, or an Istio CA Secret
// mounted as a folder), issuing short-lived workload certificates whose only name is the workload's
// SPIFFE URI SAN. For clusters without istiod, and for demos.

// @peculiar/x509 resolves its ASN.1 providers through tsyringe, which needs a Reflect metadata polyfill
// loaded before it.
import "reflect-metadata";
import crypto from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import * as x509 from "@peculiar/x509";
import { AgentError } from "../errors";
import type { Identity } from "../state/types";
import { CA_CONFIG_FILE, digestCaFolder, readCaFolder, ROOT_CERT_FILE, ROOT_KEY_FILE, type CaFolderFormat, type CaMaterial } from "./ca-folder";
import type { CertificateIssuer, IssuedCertificate } from "./certificate";
import { createCertificateRequest, verifyCertificateRequest } from "./csr";
import { formatSpiffeId, sameIdentity } from "./spiffe";
import { buildLeafCertificate, randomSerialNumber } from "./x509-der";

export { CA_CERT_FILE, CA_CONFIG_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE, type CaFolderFormat } from "./ca-folder";

type CryptoKey = crypto.webcrypto.CryptoKey;
type CryptoKeyPair = crypto.webcrypto.CryptoKeyPair;

// @peculiar/x509 signs and hashes through WebCrypto; Node provides it as crypto.webcrypto.
x509.cryptoProvider.set(crypto.webcrypto as never);

const DEFAULT_TRUST_DOMAIN = "cluster.local";
const ROOT_VALIDITY_YEARS = 10;
const DEFAULT_LEAF_TTL_SECONDS = 24 * 3600;
/** Leaves start a minute in the past so that peers with a slightly late clock accept them. */
const CLOCK_SKEW_MS = 60_000;

const EC_KEY: crypto.webcrypto.EcKeyGenParams = { name: "ECDSA", namedCurve: "P-256" };
const SIGNING: crypto.webcrypto.EcdsaParams = { name: "ECDSA", hash: "SHA-256" };

/** Contents of ca.json. */
interface CaConfig {
  trustDomain: string;
  /** RFC 3339 creation time. */
  created: string;
}

/**
 * Creates a CA in `dir`: root-cert.pem (self-signed ECDSA P-256, CA:true, keyCertSign, 10 years),
 * root-key.pem (PKCS#8, mode 0600) and ca.json. Rejects a folder that already contains a CA unless force is set.
 */
export async function initCa(dir: string, options: { trustDomain?: string; force?: boolean } = {}): Promise<void> {
  const trustDomain = options.trustDomain ?? DEFAULT_TRUST_DOMAIN;
  checkTrustDomain(trustDomain);
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  if (!options.force) {
    await assertNoCa(dir);
  }

  const keys = (await crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"])) as CryptoKeyPair;
  const now = Date.now();
  const notAfter = new Date(now);
  notAfter.setUTCFullYear(notAfter.getUTCFullYear() + ROOT_VALIDITY_YEARS);
  const root = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerialNumber().toString("hex"),
    name: `CN=ambient-agent root CA, O=${trustDomain}`,
    notBefore: new Date(now - CLOCK_SKEW_MS),
    notAfter,
    keys,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });

  const keyPem = await exportPrivateKeyPem(keys.privateKey);
  const config: CaConfig = { trustDomain, created: new Date(now).toISOString() };
  // ca.json goes last: a folder without it is an interrupted init, which load() reports.
  await writeFileAtomic(path.join(dir, ROOT_KEY_FILE), keyPem, 0o600);
  await writeFileAtomic(path.join(dir, ROOT_CERT_FILE), root.toString("pem") + "\n", 0o644);
  await writeFileAtomic(path.join(dir, CA_CONFIG_FILE), JSON.stringify(config, null, 2) + "\n", 0o644);
}

/** Options of EmbeddedCa.load. */
export interface EmbeddedCaOptions {
  /**
   * Trust domain of the identities the CA issues for. Required to match ca.json in the agent layout;
   * the Istio layouts do not name one, so it defaults to cluster.local there.
   */
  trustDomain?: string;
}

/** A certificate signed from a request: everything of an IssuedCertificate except the key, which the requester holds. */
export type SignedCertificate = Omit<IssuedCertificate, "keyPem">;

/**
 * A CA loaded from a folder: the agent layout written by initCa, or an Istio CA Secret mounted as a
 * folder (ca-folder.ts describes the layouts). Issues through a CSR, as a remote CA would.
 */
export class EmbeddedCa implements CertificateIssuer {
  readonly trustDomain: string;
  /** Every root, PEM: the trust bundle that peers need. Several while a root rotates. */
  readonly rootPem: string;
  readonly format: CaFolderFormat;
  readonly dir: string;
  readonly #material: CaMaterial;
  readonly #trustDomainOption: string | undefined;

  private constructor(material: CaMaterial, trustDomainOption: string | undefined) {
    this.#material = material;
    this.#trustDomainOption = trustDomainOption;
    this.trustDomain = material.trustDomain;
    this.rootPem = material.rootsPem;
    this.format = material.format;
    this.dir = material.dir;
  }

  /** Loads and checks the CA in `dir`; the error names the file that is missing or invalid. */
  static async load(dir: string, options: EmbeddedCaOptions = {}): Promise<EmbeddedCa> {
    if (options.trustDomain !== undefined) checkTrustDomain(options.trustDomain);
    return new EmbeddedCa(await readCaFolder(dir, options.trustDomain), options.trustDomain);
  }

  /**
   * Reads the folder again. Returns this CA when its files are unchanged (a read and a hash, no parsing),
   * else the newly loaded CA; throws when the new files are invalid, so the caller can keep this one.
   */
  async reload(): Promise<EmbeddedCa> {
    if ((await digestCaFolder(this.dir, this.#trustDomainOption)) === this.#material.digest) return this;
    return EmbeddedCa.load(this.dir, { trustDomain: this.#trustDomainOption });
  }

  /** Issues a leaf for `identity`: a new P-256 key, a CSR, then sign(). Valid ttlSeconds (default 24 h), capped by the CA. */
  async issue(identity: Identity, ttlSeconds: number = DEFAULT_LEAF_TTL_SECONDS): Promise<IssuedCertificate> {
    this.checkIssuable(identity, ttlSeconds);
    const request = await createCertificateRequest(identity);
    const signed = await this.sign(request.csrPem, ttlSeconds);
    return { ...signed, keyPem: request.keyPem };
  }

  /**
   * Verifies a PEM CSR (self-signature, ECDSA P-256 key, a SPIFFE URI SAN as its only name, this
   * trust domain) and signs a leaf for it, valid ttlSeconds (default 24 h) and never beyond the CA's chain.
   */
  async sign(csrPem: string, ttlSeconds: number = DEFAULT_LEAF_TTL_SECONDS): Promise<SignedCertificate> {
    const request = await verifyCertificateRequest(csrPem);
    this.checkIssuable(request.identity, ttlSeconds);
    const ca = this.#material;
    const now = Date.now();
    const notBefore = new Date(Math.max(now - CLOCK_SKEW_MS, ca.notBefore.getTime()));
    const notAfter = new Date(Math.min(now + ttlSeconds * 1000, ca.notAfter.getTime()));
    const leafDer = buildLeafCertificate(
      {
        serialNumber: randomSerialNumber(),
        issuerName: ca.issuerName,
        authorityKeyId: ca.authorityKeyId,
        // X.509 times have whole seconds; rounding here keeps notBefore and notAfter equal to the certificate's.
        notBefore: wholeSeconds(notBefore),
        notAfter: wholeSeconds(notAfter),
        spki: Buffer.from(request.publicKey.rawData),
        uri: formatSpiffeId(request.identity),
      },
      ca.signingKey,
    );
    const certPem = x509.PemConverter.encode(leafDer, "CERTIFICATE") + "\n";
    return {
      identity: request.identity,
      certPem,
      chainPem: certPem + ca.caChainPem,
      caRootsPem: ca.rootsPem,
      notBefore: wholeSeconds(notBefore),
      notAfter: wholeSeconds(notAfter),
    };
  }

  private checkIssuable(identity: Identity, ttlSeconds: number): void {
    if (identity.trustDomain !== this.trustDomain) {
      throw new AgentError(
        "IDENTITY_ERROR",
        `cannot issue a certificate for ${formatSpiffeId(identity)}: the embedded CA serves trust domain ${this.trustDomain}`,
      );
    }
    if (!Number.isFinite(ttlSeconds) || ttlSeconds <= 0) {
      throw new AgentError("IDENTITY_ERROR", `invalid certificate lifetime ${ttlSeconds} s: expected a positive number of seconds`);
    }
  }
}

/** Tells whether a certificate was issued for `identity`; for callers holding several certificates. */
export function isCertificateFor(certificate: IssuedCertificate, identity: Identity): boolean {
  return sameIdentity(certificate.identity, identity);
}

function checkTrustDomain(trustDomain: string): void {
  if (!/^[a-z0-9._-]+$/.test(trustDomain)) {
    throw new AgentError(
      "CA_ERROR",
      `invalid trust domain ${JSON.stringify(trustDomain)}: use lowercase letters, digits, '.', '-' and '_' only`,
    );
  }
}

async function assertNoCa(dir: string): Promise<void> {
  for (const file of [ROOT_CERT_FILE, ROOT_KEY_FILE, CA_CONFIG_FILE]) {
    const existing = path.join(dir, file);
    if (await fileExists(existing)) {
      throw new AgentError(
        "CA_ERROR",
        `${existing} already exists: the folder already contains a CA; pass --force to replace it (existing workload certificates stop verifying)`,
      );
    }
  }
}

async function fileExists(file: string): Promise<boolean> {
  try {
    await fs.access(file);
    return true;
  } catch {
    return false;
  }
}

async function exportPrivateKeyPem(key: CryptoKey): Promise<string> {
  const der = await crypto.webcrypto.subtle.exportKey("pkcs8", key);
  return x509.PemConverter.encode(der, "PRIVATE KEY") + "\n";
}

/** Writes through a temporary file and a rename, so a crash never leaves a half-written file. */
async function writeFileAtomic(file: string, content: string, mode: number): Promise<void> {
  const temporary = `${file}.tmp-${process.pid}`;
  await fs.writeFile(temporary, content, { mode });
  await fs.chmod(temporary, mode);
  await fs.rename(temporary, file);
}

function wholeSeconds(date: Date): Date {
  return new Date(Math.floor(date.getTime() / 1000) * 1000);
}
