// The trust bundle: the roots that peers' certificates must chain to, gathered from the CA (the
// embedded CA's folder or Istio's CA response) and an optional extra roots file. It also carries
// the trust domain and the aliases that the HBONE server accepts from clients.

import crypto from "node:crypto";
import { EventEmitter } from "node:events";
import fs from "node:fs";
import path from "node:path";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { AcceptedTrustDomains } from "./verify";

/** Source name of the roots set by setCaRoots(). */
export const CA_SOURCE = "ca";

/** One trusted root, for diagnostics. */
export interface TrustRootInfo {
  subject: string;
  serialNumber: string;
  notAfter: Date;
  /** SHA-256 of the DER certificate, colon-separated hex as Node's X509Certificate.fingerprint256. */
  fingerprint: string;
  /** The sources that contain this root: "ca" and/or the extra roots file's path. */
  sources: string[];
}

export interface TrustBundleOptions {
  trustDomain: string;
  /** Other trust domains that the HBONE server accepts from clients, and that count as the same on the client side. */
  aliases?: readonly string[];
  /** A PEM file with extra roots (`--trust-bundle`), re-read when it changes. */
  extraRootsFile?: string;
  logger: Logger;
  /** How often the extra roots file is re-read even without a file system event, in ms. Defaults to 30 s. */
  pollIntervalMs?: number;
}

/** One parsed root and its PEM. */
interface Root {
  certificate: crypto.X509Certificate;
  pem: string;
}

const DEFAULT_POLL_INTERVAL_MS = 30_000;
/** File system events come in bursts while a file is written; one re-read follows the last of a burst. */
const WATCH_DEBOUNCE_MS = 100;
const TRUST_DOMAIN_PATTERN = /^[a-z0-9._-]+$/;
const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

/**
 * The set of trusted roots, deduplicated by SHA-256 fingerprint. Each source is replaced as a whole,
 * so during a root rotation the old and new roots are both trusted until the old one leaves its
 * source. Emits "change" once per change of the set, and never when a source is set again unchanged.
 */
export class TrustBundle extends EventEmitter<{ change: [] }> implements AcceptedTrustDomains {
  readonly trustDomain: string;
  readonly aliases: readonly string[];
  readonly #logger: Logger;
  readonly #extraRootsFile: string | undefined;
  readonly #pollIntervalMs: number;
  /** Roots by source, in the order sources were first set: the CA first when both exist. */
  readonly #sources = new Map<string, Root[]>();
  /** The text of the extra roots file as last read, so that an unchanged file is not parsed again. */
  #extraRootsText: string | undefined;
  #watcher: fs.FSWatcher | undefined;
  #pollTimer: NodeJS.Timeout | undefined;
  #debounceTimer: NodeJS.Timeout | undefined;
  /** The reload in progress, or the last one's outcome. */
  #reloading: Promise<boolean> = Promise.resolve(false);
  /** The fingerprints of the current set. */
  #fingerprints: string[] = [];

  constructor(options: TrustBundleOptions) {
    super();
    checkTrustDomain(options.trustDomain, "trust domain");
    for (const alias of options.aliases ?? []) {
      checkTrustDomain(alias, "trust domain alias");
    }
    this.trustDomain = options.trustDomain;
    this.aliases = [...new Set(options.aliases ?? [])].filter((alias) => alias !== options.trustDomain);
    this.#logger = options.logger.child({ component: "trust-bundle" });
    this.#extraRootsFile = options.extraRootsFile;
    this.#pollIntervalMs = options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS;
  }

  /** Tells whether a client's trust domain is accepted: the bundle's own trust domain or one of its aliases. */
  accepts(trustDomain: string): boolean {
    return trustDomain === this.trustDomain || this.aliases.includes(trustDomain);
  }

  /**
   * Replaces the CA's roots with `pem` (one or more PEM certificates). Throws AgentError
   * TRUST_BUNDLE_ERROR on an invalid certificate and keeps the previous roots.
   */
  setCaRoots(pem: string): void {
    this.#replaceSource(CA_SOURCE, parseRoots(pem, "the CA's roots"));
  }

  /**
   * Reads the extra roots file, when one is configured, and starts following its changes. It watches
   * the file's folder, which also catches a Kubernetes ConfigMap's symlink swap, and polls as a fallback.
   * Throws AgentError TRUST_BUNDLE_ERROR naming the file when it is missing or invalid.
   */
  async start(): Promise<void> {
    const file = this.#extraRootsFile;
    if (file === undefined) {
      return;
    }
    await this.reloadExtraRoots({ throwOnError: true });
    try {
      this.#watcher = fs.watch(path.dirname(file), () => this.#scheduleReload());
      this.#watcher.on("error", (error) => this.#logger.warn({ err: error, file }, "watching the trust bundle folder failed; polling only"));
    } catch (error) {
      this.#logger.warn({ err: error, file }, "watching the trust bundle folder failed; polling only");
    }
    this.#pollTimer = setInterval(() => void this.reloadExtraRoots(), this.#pollIntervalMs);
    this.#pollTimer.unref();
  }

  /**
   * Re-reads the extra roots file and replaces its roots when the set changed. A missing or invalid
   * file is logged (or thrown with `throwOnError`) and the last good roots stay. Resolves with
   * whether the set of roots changed.
   */
  reloadExtraRoots(options: { throwOnError?: boolean } = {}): Promise<boolean> {
    // One read at a time, so that a slow read of older contents never replaces newer ones.
    const reload = this.#reloading.then(() => this.#reloadExtraRoots(options));
    this.#reloading = reload.catch(() => false);
    return reload;
  }

  async #reloadExtraRoots(options: { throwOnError?: boolean }): Promise<boolean> {
    const file = this.#extraRootsFile;
    if (file === undefined) {
      return false;
    }
    try {
      const text = await readRootsFile(file);
      if (text === this.#extraRootsText) {
        return false;
      }
      const changed = this.#replaceSource(file, parseRoots(text, `trust bundle file ${file}`));
      this.#extraRootsText = text;
      return changed;
    } catch (error) {
      if (options.throwOnError) {
        throw error;
      }
      this.#logger.error({ err: error, file }, "reading the trust bundle file failed; keeping the last good roots");
      return false;
    }
  }

  /** Stops following the extra roots file. */
  stop(): void {
    this.#watcher?.close();
    this.#watcher = undefined;
    clearInterval(this.#pollTimer);
    clearTimeout(this.#debounceTimer);
  }

  /**
   * Tells whether `leaf`, whose chain TLS already verified against the whole bundle, may carry an
   * identity of `trustDomain`. Roots only in the extra roots file vouch only for trust domains other
   * than the mesh's own, so a peer cluster's root cannot issue this mesh's identities. An identity of
   * the mesh's own trust domain must reach one of the CA's roots through `intermediates`, each link
   * checked by its signature and validity here: the chain Node reports is linked by names only.
   */
  vouchesFor(leaf: crypto.X509Certificate, intermediates: readonly crypto.X509Certificate[], trustDomain: string): boolean {
    if (trustDomain !== this.trustDomain) return true;
    const roots = this.#uniqueRoots();
    // Every trusted root is a CA root, so the chain TLS verified ended at one.
    if (roots.every(({ sources }) => sources.includes(CA_SOURCE))) return true;
    const caRoots = roots.filter(({ sources }) => sources.includes(CA_SOURCE)).map(({ root }) => root.certificate);
    // NOTE: Node reports only the intermediates it linked by name, in the order the peer sent them.
    // So a valid chain sent out of order, with a same-named certificate in front of the right one, or
    // with more than 8 intermediates is rejected here although TLS accepted it.
    return reachesRoot(leaf, intermediates, caRoots, Date.now(), 0);
  }

  /** Returns every trusted root as PEM, one after the other: the `ca` of a TLS secure context. */
  pem(): string {
    return this.#uniqueRoots()
      .map(({ root }) => root.pem)
      .join("");
  }

  /** Describes every trusted root, for diagnostics. */
  roots(): TrustRootInfo[] {
    return this.#uniqueRoots().map(({ root, sources }) => ({
      subject: root.certificate.subject,
      serialNumber: root.certificate.serialNumber,
      notAfter: new Date(root.certificate.validTo),
      fingerprint: root.certificate.fingerprint256,
      sources,
    }));
  }

  #scheduleReload(): void {
    clearTimeout(this.#debounceTimer);
    this.#debounceTimer = setTimeout(() => void this.reloadExtraRoots(), WATCH_DEBOUNCE_MS);
    this.#debounceTimer.unref();
  }

  /** Replaces one source's roots and emits "change" when the set of fingerprints changed; returns whether it did. */
  #replaceSource(source: string, roots: Root[]): boolean {
    this.#sources.set(source, roots);
    const fingerprints = this.#uniqueRoots().map(({ root }) => root.certificate.fingerprint256);
    if (sameSet(fingerprints, this.#fingerprints)) {
      return false;
    }
    this.#fingerprints = fingerprints;
    this.#logger.info({ source, roots: fingerprints.length, sourceRoots: roots.length }, "trust bundle changed");
    this.emit("change");
    return true;
  }

  #uniqueRoots(): { root: Root; sources: string[] }[] {
    const byFingerprint = new Map<string, { root: Root; sources: string[] }>();
    for (const [source, roots] of this.#sources) {
      for (const root of roots) {
        const entry = byFingerprint.get(root.certificate.fingerprint256);
        if (entry) {
          if (!entry.sources.includes(source)) entry.sources.push(source);
        } else {
          byFingerprint.set(root.certificate.fingerprint256, { root, sources: [source] });
        }
      }
    }
    return [...byFingerprint.values()];
  }
}

/**
 * Parses PEM text into CA certificates. Text outside the PEM blocks, such as comments, is ignored.
 * Throws AgentError TRUST_BUNDLE_ERROR naming `origin` when there is no certificate, a block does
 * not parse, or a certificate is not a CA.
 */
function parseRoots(text: string, origin: string): Root[] {
  const blocks = text.match(PEM_CERTIFICATE) ?? [];
  if (blocks.length === 0) {
    throw new AgentError("TRUST_BUNDLE_ERROR", `${origin} contains no PEM certificate; expected one or more -----BEGIN CERTIFICATE----- blocks`);
  }
  return blocks.map((block, index) => {
    let certificate: crypto.X509Certificate;
    try {
      certificate = new crypto.X509Certificate(block);
    } catch (error) {
      throw new AgentError("TRUST_BUNDLE_ERROR", `certificate ${index + 1} of ${origin} does not parse: ${(error as Error).message}`, {
        cause: error,
      });
    }
    if (!certificate.ca) {
      throw new AgentError(
        "TRUST_BUNDLE_ERROR",
        `certificate ${index + 1} of ${origin} (${certificate.subject.replace(/\n/g, ", ")}) is not a CA certificate (basicConstraints CA:true is missing)`,
      );
    }
    return { certificate, pem: block + "\n" };
  });
}

async function readRootsFile(file: string): Promise<string> {
  try {
    return await fs.promises.readFile(file, "utf8");
  } catch (error) {
    throw new AgentError(
      "TRUST_BUNDLE_ERROR",
      `trust bundle file ${file} cannot be read (${(error as NodeJS.ErrnoException).code ?? String(error)}); check the --trust-bundle path`,
      { cause: error },
    );
  }
}

function checkTrustDomain(trustDomain: string, label: string): void {
  if (!TRUST_DOMAIN_PATTERN.test(trustDomain)) {
    throw new AgentError(
      "TRUST_BUNDLE_ERROR",
      `invalid ${label} ${JSON.stringify(trustDomain)}: use lowercase letters, digits, '.', '-' and '_' only`,
    );
  }
}

function sameSet(a: readonly string[], b: readonly string[]): boolean {
  const other = new Set(b);
  return a.length === b.length && a.every((value) => other.has(value));
}

/** Maximum number of intermediates searched between a leaf and a root. */
const MAX_CHAIN_DEPTH = 8;

/**
 * Tells whether `certificate` is one of `roots` or is signed by one of them, directly or through
 * `intermediates` that are valid CA certificates, each link checked by name and signature.
 */
function reachesRoot(
  certificate: crypto.X509Certificate,
  intermediates: readonly crypto.X509Certificate[],
  roots: readonly crypto.X509Certificate[],
  now: number,
  depth: number,
): boolean {
  if (roots.some((root) => root.fingerprint256 === certificate.fingerprint256 || signedBy(certificate, root))) return true;
  if (depth >= MAX_CHAIN_DEPTH) return false;
  return intermediates.some(
    (issuer) =>
      issuer.fingerprint256 !== certificate.fingerprint256 &&
      issuer.ca &&
      Date.parse(issuer.validFrom) <= now &&
      now < Date.parse(issuer.validTo) &&
      signedBy(certificate, issuer) &&
      reachesRoot(issuer, intermediates, roots, now, depth + 1),
  );
}

function signedBy(certificate: crypto.X509Certificate, issuer: crypto.X509Certificate): boolean {
  return certificate.checkIssued(issuer) && certificate.verify(issuer.publicKey);
}
