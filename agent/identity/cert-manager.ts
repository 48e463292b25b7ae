// Workload certificates on demand: one per identity, cached, re-issued at half its lifetime,
// with at most one issuance in flight per identity.

import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { Identity } from "../state/types";
import type { WorkloadCertificate } from "./certificate";
import { formatSpiffeId } from "./spiffe";

export type { WorkloadCertificate } from "./certificate";

/** Anything that issues workload certificates: the embedded CA today, the Istio CA client later. */
export interface CertificateIssuer {
  issue(identity: Identity, ttlSeconds?: number): Promise<WorkloadCertificate>;
}

/** The part of a certificate manager that the proxies use. */
export interface CertificateProvider {
  get(identity: Identity): Promise<WorkloadCertificate>;
}

export interface CertManagerOptions {
  /** Lifetime requested for each certificate; the issuer's default when absent. */
  ttlSeconds?: number;
  /** Clock in milliseconds, for tests. */
  now?: () => number;
}

/** First delay after a failed refresh; it doubles up to MAX_RETRY_MS. */
const FIRST_RETRY_MS = 1_000;
const MAX_RETRY_MS = 150_000;

interface Entry {
  identity: Identity;
  current?: WorkloadCertificate;
  inFlight?: Promise<WorkloadCertificate>;
  failures: number;
  /** Earliest time of the next background refresh attempt after a failure. */
  retryAt: number;
  timer?: NodeJS.Timeout;
}

export class CertManager implements CertificateProvider {
  readonly #issuer: CertificateIssuer;
  readonly #logger: Logger;
  readonly #ttlSeconds: number | undefined;
  readonly #now: () => number;
  readonly #entries = new Map<string, Entry>();

  constructor(issuer: CertificateIssuer, logger: Logger, options: CertManagerOptions = {}) {
    this.#issuer = issuer;
    this.#logger = logger;
    this.#ttlSeconds = options.ttlSeconds;
    this.#now = options.now ?? Date.now;
  }

  /**
   * Returns a valid certificate for `identity`. Past half its lifetime the cached certificate is still
   * returned while a new one is issued in the background. An expired or missing one is awaited.
   * Throws AgentError NO_CERTIFICATE when issuance fails and no valid certificate is cached.
   */
  async get(identity: Identity): Promise<WorkloadCertificate> {
    const entry = this.#entryFor(identity);
    const now = this.#now();
    const current = entry.current;
    if (current && now < current.notAfter.getTime()) {
      if (now >= refreshTime(current) && now >= entry.retryAt) {
        void this.#issue(entry).catch(() => undefined);
      }
      return current;
    }
    return this.#issue(entry);
  }

  /** Cached certificates, for diagnostics. */
  list(): WorkloadCertificate[] {
    return [...this.#entries.values()].flatMap((entry) => (entry.current ? [entry.current] : []));
  }

  /** Drops the certificate of an identity, once the last workload with it has left the node. */
  forget(identity: Identity): void {
    const key = formatSpiffeId(identity);
    const entry = this.#entries.get(key);
    if (entry) {
      clearTimeout(entry.timer);
      this.#entries.delete(key);
    }
  }

  /** Stops every refresh timer. */
  close(): void {
    for (const entry of this.#entries.values()) {
      clearTimeout(entry.timer);
    }
    this.#entries.clear();
  }

  #entryFor(identity: Identity): Entry {
    const key = formatSpiffeId(identity);
    let entry = this.#entries.get(key);
    if (!entry) {
      entry = { identity: { ...identity }, failures: 0, retryAt: 0 };
      this.#entries.set(key, entry);
    }
    return entry;
  }

  /** Starts an issuance unless one is in flight, and returns the in-flight one. */
  #issue(entry: Entry): Promise<WorkloadCertificate> {
    entry.inFlight ??= this.#issueOnce(entry).finally(() => {
      entry.inFlight = undefined;
    });
    return entry.inFlight;
  }

  async #issueOnce(entry: Entry): Promise<WorkloadCertificate> {
    const spiffeId = formatSpiffeId(entry.identity);
    try {
      const certificate = await this.#issuer.issue(entry.identity, this.#ttlSeconds);
      this.#store(entry, certificate);
      this.#logger.info({ identity: spiffeId, notAfter: certificate.notAfter.toISOString() }, "workload certificate issued");
      return certificate;
    } catch (error) {
      return this.#recordFailure(entry, spiffeId, error);
    }
  }

  #store(entry: Entry, certificate: WorkloadCertificate): void {
    entry.current = certificate;
    entry.failures = 0;
    entry.retryAt = 0;
    this.#scheduleRefresh(entry, refreshTime(certificate) - this.#now());
  }

  #recordFailure(entry: Entry, spiffeId: string, error: unknown): never {
    entry.failures += 1;
    const delay = Math.min(FIRST_RETRY_MS * 2 ** (entry.failures - 1), MAX_RETRY_MS);
    entry.retryAt = this.#now() + delay;
    const stillValid = entry.current !== undefined && this.#now() < entry.current.notAfter.getTime();
    this.#logger.error({ identity: spiffeId, err: error, retryInMs: delay, keepingCurrent: stillValid }, "workload certificate issuance failed");
    if (stillValid) {
      this.#scheduleRefresh(entry, delay);
    }
    throw new AgentError("NO_CERTIFICATE", `issuing a certificate for ${spiffeId} failed: ${(error as Error).message ?? String(error)}`, {
      cause: error,
    });
  }

  /** Refreshes in the background so that long-idle identities rotate too. The timer never keeps the process alive. */
  #scheduleRefresh(entry: Entry, delayMs: number): void {
    clearTimeout(entry.timer);
    // setTimeout fires at once for delays above 2^31-1 ms, so long waits are chained.
    const step = Math.min(Math.max(delayMs, 0), 2 ** 31 - 1);
    entry.timer = setTimeout(() => {
      if (this.#entries.get(formatSpiffeId(entry.identity)) !== entry) {
        return;
      }
      if (entry.current && this.#now() < refreshTime(entry.current)) {
        this.#scheduleRefresh(entry, refreshTime(entry.current) - this.#now());
        return;
      }
      void this.#issue(entry).catch(() => undefined);
    }, step);
    entry.timer.unref();
  }
}

/** Half-way between notBefore and notAfter, when a certificate is re-issued. */
function refreshTime(certificate: WorkloadCertificate): number {
  const start = certificate.notBefore.getTime();
  return start + (certificate.notAfter.getTime() - start) / 2;
}
