// The embedded CA: a self-signed root kept in a folder, issuing short-lived workload certificates
// whose only name is the workload's SPIFFE URI SAN. For clusters without istiod, and for demos.

// @peculiar/x509 resolves its ASN.1 providers through tsyringe, which needs a Reflect metadata polyfill
// loaded before it.
import "reflect-metadata";
import crypto from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import * as x509 from "@peculiar/x509";
import { AgentError } from "../errors";
import type { Identity } from "../state/types";
import { buildSecureContext, type WorkloadCertificate } from "./certificate";
import { formatSpiffeId, sameIdentity } from "./spiffe";

type CryptoKey = crypto.webcrypto.CryptoKey;
type CryptoKeyPair = crypto.webcrypto.CryptoKeyPair;

// @peculiar/x509 signs and hashes through WebCrypto; Node provides it as crypto.webcrypto.
x509.cryptoProvider.set(crypto.webcrypto as never);

export const ROOT_CERT_FILE = "root-cert.pem";
export const ROOT_KEY_FILE = "root-key.pem";
export const CA_CONFIG_FILE = "ca.json";

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
    serialNumber: randomSerialNumber(),
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

/** A CA loaded from a folder written by initCa. */
export class EmbeddedCa {
  readonly trustDomain: string;
  readonly rootPem: string;
  readonly #root: x509.X509Certificate;
  readonly #rootKey: CryptoKey;

  private constructor(trustDomain: string, root: x509.X509Certificate, rootKey: CryptoKey) {
    this.trustDomain = trustDomain;
    this.#root = root;
    this.#rootKey = rootKey;
    this.rootPem = root.toString("pem") + "\n";
  }

  /** Loads the CA in `dir`; the error names the file that is missing or invalid. */
  static async load(dir: string): Promise<EmbeddedCa> {
    const config = parseCaConfig(dir, await readCaFile(dir, CA_CONFIG_FILE));
    const root = parseRootCertificate(dir, await readCaFile(dir, ROOT_CERT_FILE));
    const rootKey = await importRootKey(dir, await readCaFile(dir, ROOT_KEY_FILE));
    await assertKeyMatchesCertificate(dir, root, rootKey);
    return new EmbeddedCa(config.trustDomain, root, rootKey);
  }

  /** Issues a leaf for `identity`: a new P-256 key, the SPIFFE URI SAN only, valid ttlSeconds (default 24 h). */
  async issue(identity: Identity, ttlSeconds: number = DEFAULT_LEAF_TTL_SECONDS): Promise<WorkloadCertificate> {
    this.checkIssuable(identity, ttlSeconds);
    const keys = (await crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"])) as CryptoKeyPair;
    const now = Date.now();
    const notBefore = new Date(now - CLOCK_SKEW_MS);
    const notAfter = new Date(Math.min(now + ttlSeconds * 1000, this.#root.notAfter.getTime()));
    const spiffeId = formatSpiffeId(identity);

    const leaf = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerialNumber(),
      // The subject is empty, so RFC 5280 requires the subjectAltName extension to be critical.
      subject: "",
      issuer: this.#root.subject,
      notBefore,
      notAfter,
      publicKey: keys.publicKey,
      signingKey: this.#rootKey,
      signingAlgorithm: SIGNING,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
        new x509.SubjectAlternativeNameExtension([{ type: "url", value: spiffeId }], true),
        await x509.AuthorityKeyIdentifierExtension.create(this.#root.publicKey),
      ],
    });

    const certPem = leaf.toString("pem") + "\n";
    const keyPem = await exportPrivateKeyPem(keys.privateKey);
    const material = { keyPem, chainPem: certPem, rootPem: this.rootPem };
    return {
      identity: { ...identity },
      certPem,
      ...material,
      caRootsPem: this.rootPem,
      notBefore: leaf.notBefore,
      notAfter: leaf.notAfter,
      secureContext: buildSecureContext(material),
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
export function isCertificateFor(certificate: WorkloadCertificate, identity: Identity): boolean {
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

async function readCaFile(dir: string, file: string): Promise<string> {
  const fullPath = path.join(dir, file);
  try {
    return await fs.readFile(fullPath, "utf8");
  } catch (error) {
    throw caFileError(dir, file, `cannot be read (${(error as NodeJS.ErrnoException).code ?? String(error)})`, error);
  }
}

function parseCaConfig(dir: string, text: string): CaConfig {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw caFileError(dir, CA_CONFIG_FILE, "is not valid JSON", error);
  }
  const config = value as Partial<CaConfig> | null;
  if (typeof config?.trustDomain !== "string" || config.trustDomain === "") {
    throw caFileError(dir, CA_CONFIG_FILE, "has no trustDomain string");
  }
  return { trustDomain: config.trustDomain, created: String(config.created ?? "") };
}

function parseRootCertificate(dir: string, pem: string): x509.X509Certificate {
  let root: x509.X509Certificate;
  try {
    root = new x509.X509Certificate(pem);
  } catch (error) {
    throw caFileError(dir, ROOT_CERT_FILE, "is not a PEM certificate", error);
  }
  const constraints = root.getExtension(x509.BasicConstraintsExtension);
  if (!constraints?.ca) {
    throw caFileError(dir, ROOT_CERT_FILE, "is not a CA certificate (basicConstraints CA:true is missing)");
  }
  return root;
}

async function importRootKey(dir: string, pem: string): Promise<CryptoKey> {
  try {
    const der = x509.PemConverter.decodeFirst(pem);
    return await crypto.webcrypto.subtle.importKey("pkcs8", der, EC_KEY, false, ["sign"]);
  } catch (error) {
    throw caFileError(dir, ROOT_KEY_FILE, "is not a PKCS#8 PEM ECDSA P-256 private key", error);
  }
}

/** Signs a probe with the key and verifies it with the certificate, so a mixed-up folder fails at load. */
async function assertKeyMatchesCertificate(dir: string, root: x509.X509Certificate, rootKey: CryptoKey): Promise<void> {
  const probe = crypto.randomBytes(32);
  const signature = await crypto.webcrypto.subtle.sign(SIGNING, rootKey, probe);
  const publicKey = await root.publicKey.export(EC_KEY, ["verify"]);
  if (!(await crypto.webcrypto.subtle.verify(SIGNING, publicKey, signature, probe))) {
    throw caFileError(dir, ROOT_KEY_FILE, `does not belong to the certificate in ${ROOT_CERT_FILE}`);
  }
}

function caFileError(dir: string, file: string, problem: string, cause?: unknown): AgentError {
  return new AgentError(
    "CA_ERROR",
    `embedded CA file ${path.join(dir, file)} ${problem}; run \`agentctl ca init --dir ${dir}\` to create a CA there`,
    { cause },
  );
}

async function exportPrivateKeyPem(key: CryptoKey): Promise<string> {
  const der = await crypto.webcrypto.subtle.exportKey("pkcs8", key);
  return x509.PemConverter.encode(der, "PRIVATE KEY") + "\n";
}

/** Returns a random positive 128-bit serial number in hex. */
function randomSerialNumber(): string {
  const bytes = crypto.randomBytes(16);
  bytes[0] &= 0x7f;
  bytes[0] |= 0x01;
  return bytes.toString("hex");
}

/** Writes through a temporary file and a rename, so a crash never leaves a half-written file. */
async function writeFileAtomic(file: string, content: string, mode: number): Promise<void> {
  const temporary = `${file}.tmp-${process.pid}`;
  await fs.writeFile(temporary, content, { mode });
  await fs.chmod(temporary, mode);
  await fs.rename(temporary, file);
}
