// Reading the embedded CA from a folder in one of three layouts, recognized by the files present:
//
//   agent             root-cert.pem, root-key.pem, ca.json   written by `agentctl ca init`
//   istio-cacerts     ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem
//                                                            Istio's plugged-in CA Secret `cacerts`
//   istio-ca-secret   ca-cert.pem, ca-key.pem                Istio's self-signed `istio-ca-secret`
//
// A Secret mounted by the kubelet is a folder of symlinks into ..data/, itself a symlink to a
// timestamped folder. Files are read through the symlinks, and names starting with ".." are skipped
// when the folder's files are listed. An empty file counts as absent.

import crypto from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { AgentError } from "../errors";
import { issuerKeyIdentifier, keyUsageFlags, signatureScheme, subjectNameDer } from "./x509-der";

export const ROOT_CERT_FILE = "root-cert.pem";
export const ROOT_KEY_FILE = "root-key.pem";
export const CA_CONFIG_FILE = "ca.json";
export const CA_CERT_FILE = "ca-cert.pem";
export const CA_KEY_FILE = "ca-key.pem";
export const CERT_CHAIN_FILE = "cert-chain.pem";

export type CaFolderFormat = "agent" | "istio-cacerts" | "istio-ca-secret";

const FORMAT_FILES: Record<CaFolderFormat, string[]> = {
  agent: [ROOT_CERT_FILE, ROOT_KEY_FILE, CA_CONFIG_FILE],
  "istio-cacerts": [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE],
  "istio-ca-secret": [CA_CERT_FILE, CA_KEY_FILE],
};
const KNOWN_FILES = [ROOT_CERT_FILE, ROOT_KEY_FILE, CA_CONFIG_FILE, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE];

/** keyCertSign in the KeyUsage bit string, as @peculiar/asn1-x509 numbers the flags. */
const KEY_CERT_SIGN = 32;
/** Maximum number of intermediates followed from the signing certificate to a root. */
const MAX_CHAIN_DEPTH = 8;

export const DEFAULT_TRUST_DOMAIN = "cluster.local";

/** Everything the CA signs with, checked. */
export interface CaMaterial {
  format: CaFolderFormat;
  dir: string;
  trustDomain: string;
  signingKey: crypto.KeyObject;
  signingCert: crypto.X509Certificate;
  /** The signing certificate's subject, DER, used as the issuer of every leaf. */
  issuerName: Buffer;
  /** The signing certificate's key identifier, used as the authority key identifier of every leaf. */
  authorityKeyId: Buffer;
  /** The signing certificate and the intermediates up to (not including) the root, PEM, signing certificate first. */
  caChainPem: string;
  /** Every root, PEM: all of root-cert.pem, or the self-signed ca-cert.pem. */
  rootsPem: string;
  /** Latest notBefore and earliest notAfter along the chain: the window a leaf can be valid in. */
  notBefore: Date;
  notAfter: Date;
  /** SHA-256 over the files read, to tell whether a reload found anything new. */
  digest: string;
}

/** The contents of the known files of a folder (absent or empty files are left out) and every file name listed. */
interface FolderFiles {
  dir: string;
  contents: Map<string, string>;
  listed: string[];
}

/** Reads and checks the CA in `dir`; `trustDomain` applies to the Istio layouts, whose folders do not name one. */
export async function readCaFolder(dir: string, trustDomain?: string): Promise<CaMaterial> {
  const files = await readFolderFiles(dir);
  const read = readers[detectFormat(files)];
  return { ...read(files, trustDomain), digest: digestFiles(files, trustDomain) };
}

const readers: Record<CaFolderFormat, (files: FolderFiles, trustDomain: string | undefined) => Omit<CaMaterial, "digest">> = {
  agent: readAgentFormat,
  "istio-cacerts": (files, trustDomain) => readIstioCacerts(files, trustDomain ?? DEFAULT_TRUST_DOMAIN),
  "istio-ca-secret": (files, trustDomain) => readIstioCaSecret(files, trustDomain ?? DEFAULT_TRUST_DOMAIN),
};

/** Returns the SHA-256 of the known files of `dir` as readCaFolder computes it, to skip a reload when nothing changed. */
export async function digestCaFolder(dir: string, trustDomain?: string): Promise<string> {
  return digestFiles(await readFolderFiles(dir), trustDomain);
}

async function readFolderFiles(dir: string): Promise<FolderFiles> {
  let listed: string[];
  try {
    listed = (await fs.readdir(dir)).filter((name) => !name.startsWith("..")).sort();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new AgentError(
      "CA_ERROR",
      `embedded CA folder ${dir} cannot be read (${code}); run \`agentctl ca init --dir ${dir}\` or mount a CA Secret there`,
      { cause: error },
    );
  }
  const contents = new Map<string, string>();
  for (const file of KNOWN_FILES) {
    const text = await readOptionalFile(dir, file);
    if (text !== undefined && text.trim() !== "") contents.set(file, text);
  }
  return { dir, contents, listed };
}

async function readOptionalFile(dir: string, file: string): Promise<string | undefined> {
  try {
    return await fs.readFile(path.join(dir, file), "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return undefined;
    throw caFileError(dir, file, `cannot be read (${code ?? String(error)})`, error);
  }
}

/** Picks the layout from the files present; a partial layout is reported with its missing files. */
function detectFormat(files: FolderFiles): CaFolderFormat {
  const has = (file: string): boolean => files.contents.has(file);
  let format: CaFolderFormat | undefined;
  if (has(CA_CONFIG_FILE) || has(ROOT_KEY_FILE)) {
    format = "agent";
  } else if (has(CA_CERT_FILE) || has(CA_KEY_FILE)) {
    format = has(ROOT_CERT_FILE) || has(CERT_CHAIN_FILE) ? "istio-cacerts" : "istio-ca-secret";
  } else if (has(ROOT_CERT_FILE)) {
    format = "agent";
  }
  if (format === undefined) throw layoutError(files, "contains no CA");
  const missing = FORMAT_FILES[format].filter((file) => !has(file));
  if (missing.length > 0) {
    throw layoutError(files, `is missing ${missing.map((file) => path.join(files.dir, file)).join(", ")} for the ${format} layout`);
  }
  return format;
}

function layoutError(files: FolderFiles, problem: string): AgentError {
  const found = files.listed.length > 0 ? files.listed.join(", ") : "no files";
  const expected = Object.entries(FORMAT_FILES)
    .map(([format, names]) => `${format}: ${names.join(" + ")}`)
    .join("; ");
  return new AgentError(
    "CA_ERROR",
    `embedded CA folder ${files.dir} ${problem} (found: ${found}); expected one of ${expected}. ` +
      `Run \`agentctl ca init --dir ${files.dir}\` to create a CA there, or mount Istio's cacerts Secret`,
  );
}

function readAgentFormat(files: FolderFiles, trustDomainOption: string | undefined): Omit<CaMaterial, "digest"> {
  const trustDomain = parseCaConfig(files.dir, files.contents.get(CA_CONFIG_FILE)!);
  if (trustDomainOption !== undefined && trustDomainOption !== trustDomain) {
    throw caFileError(files.dir, CA_CONFIG_FILE, `names trust domain ${trustDomain}, not the requested ${trustDomainOption}`);
  }
  const roots = parseCertificates(files, ROOT_CERT_FILE);
  const key = parsePrivateKey(files, ROOT_KEY_FILE);
  const signingCert = roots.find((root) => keyMatches(key, root));
  if (signingCert === undefined) {
    throw caFileError(files.dir, ROOT_KEY_FILE, `does not belong to the certificate in ${ROOT_CERT_FILE}`);
  }
  checkSigningCertificate(files.dir, ROOT_CERT_FILE, signingCert);
  return material(files, "agent", trustDomain, key, [signingCert], roots);
}

function readIstioCacerts(files: FolderFiles, trustDomain: string): Omit<CaMaterial, "digest"> {
  const signingCert = parseCertificates(files, CA_CERT_FILE)[0];
  const key = parsePrivateKey(files, CA_KEY_FILE);
  checkKeyMatches(files.dir, key, signingCert);
  checkSigningCertificate(files.dir, CA_CERT_FILE, signingCert);
  const roots = parseCertificates(files, ROOT_CERT_FILE);
  const chain = parseCertificates(files, CERT_CHAIN_FILE);
  const intermediates = chain.filter((cert) => !cert.raw.equals(signingCert.raw) && !roots.some((root) => root.raw.equals(cert.raw)));
  const path = chainToRoot(files.dir, signingCert, intermediates, roots);
  return material(files, "istio-cacerts", trustDomain, key, path, roots);
}

function readIstioCaSecret(files: FolderFiles, trustDomain: string): Omit<CaMaterial, "digest"> {
  const signingCert = parseCertificates(files, CA_CERT_FILE)[0];
  const key = parsePrivateKey(files, CA_KEY_FILE);
  checkKeyMatches(files.dir, key, signingCert);
  checkSigningCertificate(files.dir, CA_CERT_FILE, signingCert);
  if (!isSelfSigned(signingCert)) {
    throw caFileError(
      files.dir,
      CA_CERT_FILE,
      `is not self-signed; an intermediate CA needs ${ROOT_CERT_FILE} and ${CERT_CHAIN_FILE} next to it (Istio cacerts layout)`,
    );
  }
  return material(files, "istio-ca-secret", trustDomain, key, [signingCert], [signingCert]);
}

/** Assembles the checked material; `chain` runs from the signing certificate to the last certificate below the root. */
function material(
  files: FolderFiles,
  format: CaFolderFormat,
  trustDomain: string,
  signingKey: crypto.KeyObject,
  chain: crypto.X509Certificate[],
  roots: crypto.X509Certificate[],
): Omit<CaMaterial, "digest"> {
  const signingCert = chain[0];
  const window = chain.concat(rootsOf(chain, roots));
  return {
    format,
    dir: files.dir,
    trustDomain,
    signingKey,
    signingCert,
    issuerName: subjectNameDer(signingCert.raw),
    authorityKeyId: issuerKeyIdentifier(signingCert.raw),
    caChainPem: chain.filter((cert) => !isOneOf(cert, roots)).map((cert) => cert.toString()).join(""),
    rootsPem: roots.map((root) => root.toString()).join(""),
    notBefore: new Date(Math.max(...window.map((cert) => Date.parse(cert.validFrom)))),
    notAfter: new Date(Math.min(...window.map((cert) => Date.parse(cert.validTo)))),
  };
}

/** Returns the roots that issued the last certificate of `chain` (the last one itself when it is a root). */
function rootsOf(chain: crypto.X509Certificate[], roots: crypto.X509Certificate[]): crypto.X509Certificate[] {
  const last = chain[chain.length - 1];
  return roots.filter((root) => root.raw.equals(last.raw) || issuedBy(last, root));
}

/**
 * Follows issuers from `signingCert` through `intermediates` to one of `roots`. Returns the path,
 * signing certificate first, without the root. Every intermediate on the path must be a valid CA.
 */
function chainToRoot(
  dir: string,
  signingCert: crypto.X509Certificate,
  intermediates: crypto.X509Certificate[],
  roots: crypto.X509Certificate[],
): crypto.X509Certificate[] {
  const chain = [signingCert];
  for (let depth = 0; depth <= MAX_CHAIN_DEPTH; depth++) {
    const current = chain[chain.length - 1];
    const root = roots.find((candidate) => candidate.raw.equals(current.raw) || issuedBy(current, candidate));
    if (root !== undefined) {
      checkValidity(dir, ROOT_CERT_FILE, root);
      return chain;
    }
    const next = intermediates.find((candidate) => !chain.includes(candidate) && issuedBy(current, candidate));
    if (next === undefined) break;
    checkSigningCertificate(dir, CERT_CHAIN_FILE, next);
    chain.push(next);
  }
  throw caFileError(
    dir,
    CA_CERT_FILE,
    `does not chain to any root in ${ROOT_CERT_FILE} through the intermediates of ${CERT_CHAIN_FILE} ` +
      `(stopped at "${chain[chain.length - 1].issuer.replace(/\n/g, ", ")}")`,
  );
}

function isOneOf(certificate: crypto.X509Certificate, list: crypto.X509Certificate[]): boolean {
  return list.some((item) => item.raw.equals(certificate.raw));
}

function issuedBy(certificate: crypto.X509Certificate, issuer: crypto.X509Certificate): boolean {
  return certificate.checkIssued(issuer) && certificate.verify(issuer.publicKey);
}

function isSelfSigned(certificate: crypto.X509Certificate): boolean {
  return issuedBy(certificate, certificate);
}

function parseCaConfig(dir: string, text: string): string {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw caFileError(dir, CA_CONFIG_FILE, "is not valid JSON", error);
  }
  const trustDomain = (value as { trustDomain?: unknown } | null)?.trustDomain;
  if (typeof trustDomain !== "string" || trustDomain === "") {
    throw caFileError(dir, CA_CONFIG_FILE, "has no trustDomain string");
  }
  return trustDomain;
}

/** Parses every PEM certificate of a file, in order. */
function parseCertificates(files: FolderFiles, file: string): crypto.X509Certificate[] {
  const blocks = files.contents.get(file)!.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw caFileError(files.dir, file, "contains no PEM certificate");
  return blocks.map((block, index) => {
    try {
      return new crypto.X509Certificate(block);
    } catch (error) {
      throw caFileError(files.dir, file, `has an invalid certificate at position ${index + 1}`, error);
    }
  });
}

/** Parses a PEM private key (PKCS#8, SEC1 or PKCS#1) of a type the CA can sign with: ECDSA or RSA. */
function parsePrivateKey(files: FolderFiles, file: string): crypto.KeyObject {
  let key: crypto.KeyObject;
  try {
    key = crypto.createPrivateKey(files.contents.get(file)!);
  } catch (error) {
    throw caFileError(files.dir, file, "is not a PEM private key", error);
  }
  try {
    signatureScheme(key);
  } catch (error) {
    throw caFileError(files.dir, file, `contains a key the CA cannot sign with (${(error as Error).message}); use ECDSA or RSA`, error);
  }
  return key;
}

function keyMatches(key: crypto.KeyObject, certificate: crypto.X509Certificate): boolean {
  const fromKey = crypto.createPublicKey(key).export({ type: "spki", format: "der" });
  return fromKey.equals(certificate.publicKey.export({ type: "spki", format: "der" }));
}

function checkKeyMatches(dir: string, key: crypto.KeyObject, certificate: crypto.X509Certificate): void {
  if (!keyMatches(key, certificate)) {
    throw caFileError(dir, CA_KEY_FILE, `does not belong to the certificate in ${CA_CERT_FILE}`);
  }
}

/**
 * Checks that a certificate can issue others: basicConstraints CA:true, keyCertSign when the key
 * usage extension is present (RFC 5280 path validation checks key usage only when present), and valid now.
 */
function checkSigningCertificate(dir: string, file: string, certificate: crypto.X509Certificate): void {
  const name = describe(certificate);
  // Checked before CA:true because OpenSSL, behind X509Certificate.ca, also reports false without keyCertSign.
  const usage = keyUsageFlags(certificate.raw);
  if (usage !== undefined && (usage & KEY_CERT_SIGN) === 0) {
    throw caFileError(dir, file, `contains ${name}, whose key usage lacks keyCertSign`);
  }
  if (!certificate.ca) {
    throw caFileError(dir, file, `contains ${name}, which is not a CA certificate (basicConstraints CA:true is missing)`);
  }
  checkValidity(dir, file, certificate);
}

function checkValidity(dir: string, file: string, certificate: crypto.X509Certificate): void {
  const now = Date.now();
  const name = describe(certificate);
  if (Date.parse(certificate.validFrom) > now) {
    throw caFileError(dir, file, `contains ${name}, which is not valid before ${certificate.validFrom}`);
  }
  if (Date.parse(certificate.validTo) <= now) {
    throw caFileError(dir, file, `contains ${name}, which expired on ${certificate.validTo}`);
  }
}

function describe(certificate: crypto.X509Certificate): string {
  return `"${certificate.subject.replace(/\n/g, ", ")}"`;
}

function digestFiles(files: FolderFiles, trustDomain: string | undefined): string {
  const hash = crypto.createHash("sha256").update(trustDomain ?? "").update("\0");
  for (const [file, text] of [...files.contents].sort(([a], [b]) => a.localeCompare(b))) {
    hash.update(file).update("\0").update(text).update("\0");
  }
  return hash.digest("hex");
}

function caFileError(dir: string, file: string, problem: string, cause?: unknown): AgentError {
  return new AgentError(
    "CA_ERROR",
    `embedded CA file ${path.join(dir, file)} ${problem}; fix the file, or run \`agentctl ca init --dir ${dir}\` to create a new CA`,
    { cause },
  );
}
