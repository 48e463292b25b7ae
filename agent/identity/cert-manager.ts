// Workload certificates for the identities that run on this node. Each is fetched when a workload
// with the identity arrives and re-issued at half its lifetime. A failed request is retried with
// backoff while the old certificate serves, and the certificate is dropped with its last workload.
//
// Invariants:
// - At most maxInFlight requests reach the CA at once. Waiting requests go in priority order: a
//   connection waiting for a certificate first, then a workload that just arrived, then refreshes.
// - An identity has at most one request queued or in flight.
// - A stored certificate is for the identity requested (its leaf's SPIFFE id was checked).
// - Each stored certificate has one secure context, built when it is stored and rebuilt only when the
//   trusted roots change. Rotation listeners hear of each new context once.

import { EventEmitter } from "node:events";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { Identity } from "../state/types";
import { withSecureContext, type CertificateIssuer, type IssuedCertificate, type WorkloadCertificate } from "./certificate";
import { leafIdentity } from "./csr";
import { formatSpiffeId, sameIdentity } from "./spiffe";

export type { CertificateIssuer, WorkloadCertificate } from "./certificate";

/** Called with an identity's new certificate: a rotation, or the same key with rebuilt trusted roots. */
export type RotationListener = (certificate: WorkloadCertificate) => void;

/**
 * A certificate stored for an identity: the first one it holds (rotated false; again after the
 * identity was dropped with its last workload), or one that replaced a held certificate.
 */
export interface CertificateIssuedEvent {
  identity: Identity;
  rotated: boolean;
  certificate: IssuedCertificate;
}

/** Called with each certificate the manager stores; an error it throws is logged. */
export type IssuedListener = (event: CertificateIssuedEvent) => void;

/** The part of a certificate manager that the proxies use. */
export interface CertificateProvider {
  /** Returns a valid certificate for `identity`, waiting for the CA when none is held. */
  get(identity: Identity): Promise<WorkloadCertificate>;
  /** Calls `listener` with each new certificate of `identity` until the returned function is called. */
  onRotation?(identity: Identity, listener: RotationListener): () => void;
}

/** The roots peers must chain to. The manager passes it the roots that each CA response named. */
export interface TrustRoots {
  /** Every trusted root, PEM. */
  pem(): string;
  /** Records the roots the CA named with its latest certificate; emits "change" when the trusted set changed. */
  setCaRoots(pem: string): void;
  on(event: "change", listener: () => void): unknown;
  off(event: "change", listener: () => void): unknown;
}

export interface CertManagerOptions {
  /** Lifetime requested for each certificate; the issuer's default when absent. */
  ttlSeconds?: number;
  /** Roots that peers' certificates must chain to. Without it, each certificate trusts the roots its CA named. */
  trust?: TrustRoots;
  /** Requests to the CA at once. Default MAX_IN_FLIGHT. */
  maxInFlight?: number;
  /** How long get() waits for a certificate when none is valid, in ms. Default GET_TIMEOUT_MS. */
  getTimeoutMs?: number;
  /** Clock in milliseconds, for tests. */
  now?: () => number;
  /** Random number in [0, 1), for the backoff jitter; for tests. */
  random?: () => number;
  /** Listener for each stored certificate, as onIssued() adds. */
  onIssued?: IssuedListener;
}

/** Requests to the CA at once, as ztunnel allows. */
export const MAX_IN_FLIGHT = 8;
/** First delay after a failed request; it doubles up to MAX_RETRY_MS. */
export const FIRST_RETRY_MS = 1_000;
export const MAX_RETRY_MS = 150_000;
/** Each retry delay is moved by up to this fraction either way, so identities that failed together spread out. */
export const RETRY_JITTER = 0.2;
/** A connection waits this long for a certificate before it fails; the HBONE connect limit. */
export const GET_TIMEOUT_MS = 10_000;

/** Order of waiting requests: a connection waits, a workload arrived, a certificate is half-way through its life. */
export enum Priority {
  Connection = 0,
  Workload = 1,
  Refresh = 2,
}

/** One identity's certificate as diagnostics show it; no key material. */
export interface CertificateStatus {
  identity: string;
  state: "valid" | "refreshing" | "pending" | "failing" | "expired";
  notBefore?: string;
  notAfter?: string;
  refreshAt?: string;
  /** Failed requests since the last success. */
  failures: number;
  nextRetryAt?: string;
  lastError?: string;
  /** Workloads on this node with the identity. */
  workloads: string[];
  chainPem?: string;
}

interface Waiter {
  resolve(certificate: WorkloadCertificate): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

interface Entry {
  key: string;
  identity: Identity;
  current?: WorkloadCertificate;
  /** When the current certificate is re-issued: half-way through the part of its life after it arrived. */
  refreshAt: number;
  /** Priority of the queued request, or "running" once it reached the CA. */
  request?: Priority | "running";
  failures: number;
  /** No request before this time after a failure. */
  retryAt: number;
  lastError?: Error;
  timer?: NodeJS.Timeout;
  owners: Set<string>;
  /** The pods expected to run with the identity (see expectPods), by uid. */
  expected: Set<string>;
  waiters: Set<Waiter>;
}

export class CertManager implements CertificateProvider {
  /** The identity key of each expected pod, by uid. */
  readonly #expectedPods = new Map<string, string>();
  readonly #issuer: CertificateIssuer;
  readonly #logger: Logger;
  readonly #ttlSeconds: number | undefined;
  readonly #trust: TrustRoots | undefined;
  readonly #maxInFlight: number;
  readonly #getTimeoutMs: number;
  readonly #now: () => number;
  readonly #random: () => number;
  readonly #entries = new Map<string, Entry>();
  /** Waiting requests per priority, oldest first. Entries whose request moved or ended are skipped. */
  readonly #queues: Entry[][] = [[], [], []];
  readonly #rotations = new EventEmitter();
  readonly #issuedListeners = new Set<IssuedListener>();
  readonly #onTrustChange = (): void => this.#rebuildContexts();
  #inFlight = 0;
  #closed = false;

  constructor(issuer: CertificateIssuer, logger: Logger, options: CertManagerOptions = {}) {
    this.#issuer = issuer;
    this.#logger = logger;
    this.#ttlSeconds = options.ttlSeconds;
    this.#trust = options.trust;
    this.#maxInFlight = options.maxInFlight ?? MAX_IN_FLIGHT;
    this.#getTimeoutMs = options.getTimeoutMs ?? GET_TIMEOUT_MS;
    this.#now = options.now ?? Date.now;
    this.#random = options.random ?? Math.random;
    this.#rotations.setMaxListeners(0);
    if (options.onIssued) this.#issuedListeners.add(options.onIssued);
    this.#trust?.on("change", this.#onTrustChange);
  }

  /**
   * Returns a valid certificate for `identity`. Past half its lifetime the held certificate is
   * returned while a new one is requested in the background. Without a valid one, the caller waits
   * for the CA up to getTimeoutMs. The wait does not cut a backoff short, so a failing CA gets no
   * request per connection. Throws AgentError NO_CERTIFICATE when no certificate comes in time.
   */
  get(identity: Identity): Promise<WorkloadCertificate> {
    const entry = this.#entryFor(identity);
    const current = entry.current;
    if (current && this.#now() < current.notAfter.getTime()) {
      this.#refreshIfDue(entry);
      return Promise.resolve(current);
    }
    const waiting = this.#wait(entry);
    const now = this.#now();
    if (now >= entry.retryAt) this.#request(entry, Priority.Connection);
    else this.#scheduleRetry(entry, entry.retryAt - now);
    return waiting;
  }

  /**
   * Records that workload `owner` runs as `identity` on this node, and fetches the identity's
   * certificate now if it has none, before a connection needs it.
   */
  retain(identity: Identity, owner: string): void {
    const entry = this.#entryFor(identity);
    entry.owners.add(owner);
    if (!entry.current && this.#now() >= entry.retryAt) this.#request(entry, Priority.Workload);
  }

  /** Records that `owner` left; the identity's certificate is dropped with its last workload. */
  release(identity: Identity, owner: string): void {
    const entry = this.#entries.get(formatSpiffeId(identity));
    if (!entry) return;
    entry.owners.delete(owner);
    if (entry.owners.size === 0 && entry.expected.size === 0) this.forget(identity);
  }

  /**
   * Sets the pods of this node that are to be enrolled, by uid, with their identities. Their
   * certificates are requested and kept like a workload's, before and while the pods' listeners
   * start, so that a pod whose enrolment is retried still has its certificate's state reported.
   */
  expectPods(pods: ReadonlyMap<string, Identity>): void {
    for (const [uid, key] of this.#expectedPods) {
      const pod = pods.get(uid);
      // A pod whose identity is unchanged stays, unless forget() dropped its entry meanwhile.
      if (pod !== undefined && formatSpiffeId(pod) === key && this.#entries.has(key)) continue;
      this.#expectedPods.delete(uid);
      const entry = this.#entries.get(key);
      if (!entry) continue;
      entry.expected.delete(uid);
      if (entry.owners.size === 0 && entry.expected.size === 0) this.forget(entry.identity);
    }
    for (const [uid, identity] of pods) {
      if (this.#expectedPods.has(uid)) continue;
      const entry = this.#entryFor(identity);
      this.#expectedPods.set(uid, entry.key);
      entry.expected.add(uid);
      if (!entry.current && this.#now() >= entry.retryAt) this.#request(entry, Priority.Workload);
    }
  }

  /** Drops the certificate of an identity and stops refreshing it. Waiting callers fail. */
  forget(identity: Identity): void {
    const key = formatSpiffeId(identity);
    const entry = this.#entries.get(key);
    if (!entry) return;
    clearTimeout(entry.timer);
    this.#entries.delete(key);
    this.#failWaiters(entry, new AgentError("NO_CERTIFICATE", `the certificate of ${key} was dropped: no workload on this node runs as it any more`));
    this.#logger.info({ identity: key }, "workload certificate dropped: its last workload left the node");
  }

  onRotation(identity: Identity, listener: RotationListener): () => void {
    const event = formatSpiffeId(identity);
    this.#rotations.on(event, listener);
    return () => this.#rotations.off(event, listener);
  }

  /** Calls `listener` with each certificate stored from now on, until the returned function is called. */
  onIssued(listener: IssuedListener): () => void {
    this.#issuedListeners.add(listener);
    return () => this.#issuedListeners.delete(listener);
  }

  /** Held certificates, for diagnostics. */
  list(): WorkloadCertificate[] {
    return [...this.#entries.values()].flatMap((entry) => (entry.current ? [entry.current] : []));
  }

  /** Returns every identity's state, for diagnostics, without any key. */
  status(): CertificateStatus[] {
    return [...this.#entries.values()].map((entry) => this.#statusOf(entry));
  }

  /** Requests waiting for a free slot and requests at the CA now. */
  get queue(): { waiting: number; inFlight: number } {
    const waiting = [...this.#entries.values()].filter((entry) => typeof entry.request === "number").length;
    return { waiting, inFlight: this.#inFlight };
  }

  /** Stops every timer and fails every waiting caller. */
  close(): void {
    this.#closed = true;
    this.#trust?.off("change", this.#onTrustChange);
    for (const entry of this.#entries.values()) {
      clearTimeout(entry.timer);
      this.#failWaiters(entry, new AgentError("NO_CERTIFICATE", "the certificate manager stopped"));
    }
    this.#entries.clear();
    this.#rotations.removeAllListeners();
    this.#issuedListeners.clear();
  }

  #entryFor(identity: Identity): Entry {
    const key = formatSpiffeId(identity);
    let entry = this.#entries.get(key);
    if (!entry) {
      entry = { key, identity: { ...identity }, refreshAt: 0, failures: 0, retryAt: 0, owners: new Set(), expected: new Set(), waiters: new Set() };
      this.#entries.set(key, entry);
    }
    return entry;
  }

  #refreshIfDue(entry: Entry): void {
    const current = entry.current!;
    if (this.#now() >= entry.refreshAt && this.#now() >= entry.retryAt) this.#request(entry, Priority.Refresh);
  }

  /** Resolves with the next certificate stored for the entry, or fails after getTimeoutMs. */
  #wait(entry: Entry): Promise<WorkloadCertificate> {
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        timer: setTimeout(() => {
          entry.waiters.delete(waiter);
          reject(this.#noCertificate(entry));
        }, this.#getTimeoutMs),
      };
      entry.waiters.add(waiter);
    });
  }

  #noCertificate(entry: Entry): AgentError {
    const cause = entry.lastError
      ? `the CA failed ${entry.failures} time(s), last: ${entry.lastError.message}`
      : "the CA has not answered yet";
    return new AgentError(
      "NO_CERTIFICATE",
      `no valid certificate for ${entry.key} within ${this.#getTimeoutMs} ms: ${cause}; check the CA address and credentials (agentctl config shows each certificate's state)`,
      { cause: entry.lastError },
    );
  }

  /** Queues a request unless one is queued or running; a more urgent caller moves a queued request up. */
  #request(entry: Entry, priority: Priority): void {
    if (this.#closed || entry.request === "running") return;
    if (entry.request !== undefined && entry.request <= priority) return;
    entry.request = priority;
    this.#queues[priority].push(entry);
    this.#pump();
  }

  #pump(): void {
    while (this.#inFlight < this.#maxInFlight) {
      const entry = this.#nextQueued();
      if (!entry) return;
      entry.request = "running";
      this.#inFlight += 1;
      void this.#issue(entry)
        .catch((error: unknown) => this.#logger.error({ err: error, identity: entry.key }, "workload certificate request failed unexpectedly"))
        .finally(() => {
          this.#inFlight -= 1;
          this.#pump();
        });
    }
  }

  #nextQueued(): Entry | undefined {
    for (const [priority, queue] of this.#queues.entries()) {
      while (queue.length > 0) {
        const entry = queue.shift()!;
        // Skipped: a request that moved to a more urgent queue, or an identity dropped meanwhile.
        if (entry.request === priority && this.#entries.get(entry.key) === entry) return entry;
      }
    }
    return undefined;
  }

  async #issue(entry: Entry): Promise<void> {
    let issued: IssuedCertificate;
    try {
      issued = await this.#issuer.issue(entry.identity, this.#ttlSeconds);
      checkIssuedFor(issued, entry.identity);
    } catch (error) {
      entry.request = undefined;
      if (this.#entries.get(entry.key) === entry) this.#recordFailure(entry, error);
      return;
    }
    // Cleared before the waiters run, so that a caller they wake can queue the next request.
    entry.request = undefined;
    if (this.#entries.get(entry.key) !== entry) return;
    try {
      this.#store(entry, issued);
    } catch (error) {
      // Roots the trust bundle refuses, or a key and chain TLS cannot load: a failed request like any other.
      this.#recordFailure(entry, error);
    }
  }

  #store(entry: Entry, issued: IssuedCertificate): void {
    const rotated = entry.current !== undefined;
    // A change of the CA's roots rebuilds every other identity's context through the "change" event.
    this.#trust?.setCaRoots(issued.caRootsPem);
    const certificate = withSecureContext(issued, this.#trust?.pem() ?? issued.caRootsPem);
    entry.current = certificate;
    entry.refreshAt = refreshTime(certificate, this.#now());
    entry.failures = 0;
    entry.retryAt = 0;
    entry.lastError = undefined;
    this.#scheduleRefresh(entry, entry.refreshAt - this.#now());
    this.#logger.info(
      { identity: entry.key, notAfter: certificate.notAfter.toISOString(), refreshAt: new Date(entry.refreshAt).toISOString() },
      rotated ? "workload certificate rotated" : "workload certificate issued",
    );
    for (const waiter of entry.waiters) {
      clearTimeout(waiter.timer);
      waiter.resolve(certificate);
    }
    entry.waiters.clear();
    this.#rotations.emit(entry.key, certificate);
    this.#notifyIssued({ identity: entry.identity, rotated, certificate: issued });
  }

  #notifyIssued(event: CertificateIssuedEvent): void {
    for (const listener of this.#issuedListeners) {
      try {
        listener(event);
      } catch (error) {
        this.#logger.error({ err: error, identity: formatSpiffeId(event.identity) }, "certificate issued listener failed");
      }
    }
  }

  #recordFailure(entry: Entry, error: unknown): void {
    entry.failures += 1;
    entry.lastError = error instanceof Error ? error : new Error(String(error));
    const delay = retryDelay(entry.failures, this.#random());
    entry.retryAt = this.#now() + delay;
    const current = entry.current;
    const keepingCurrent = current !== undefined && this.#now() < current.notAfter.getTime();
    this.#logger.error(
      { identity: entry.key, error: entry.lastError.message, code: (error as AgentError).code, failures: entry.failures, retryInMs: delay, keepingCurrent },
      keepingCurrent ? "workload certificate refresh failed; the current certificate serves until it expires" : "workload certificate request failed",
    );
    // Retried in the background while a workload needs it or a caller waits.
    if (entry.owners.size > 0 || entry.expected.size > 0 || entry.waiters.size > 0 || keepingCurrent) this.#scheduleRetry(entry, delay);
  }

  #scheduleRetry(entry: Entry, delayMs: number): void {
    this.#schedule(entry, delayMs, () => this.#request(entry, retryPriority(entry)));
  }

  /** Refreshes in the background, so that idle identities rotate too. */
  #scheduleRefresh(entry: Entry, delayMs: number): void {
    this.#schedule(entry, delayMs, () => {
      const current = entry.current;
      if (current && this.#now() < entry.refreshAt) {
        this.#scheduleRefresh(entry, entry.refreshAt - this.#now());
        return;
      }
      this.#request(entry, Priority.Refresh);
    });
  }

  /** One timer per entry; the timer never keeps the process alive. */
  #schedule(entry: Entry, delayMs: number, action: () => void): void {
    clearTimeout(entry.timer);
    // setTimeout fires at once for delays above 2^31-1 ms, so long waits are chained.
    const step = Math.min(Math.max(delayMs, 0), 2 ** 31 - 1);
    entry.timer = setTimeout(() => {
      if (this.#entries.get(entry.key) !== entry) return;
      if (step < delayMs) this.#schedule(entry, delayMs - step, action);
      else action();
    }, step);
    entry.timer.unref();
  }

  /** The trusted roots changed: every held certificate gets one new secure context. */
  #rebuildContexts(): void {
    const rootPem = this.#trust!.pem();
    for (const entry of this.#entries.values()) {
      const current = entry.current;
      if (!current || current.rootPem === rootPem) continue;
      entry.current = withSecureContext(current, rootPem);
      this.#rotations.emit(entry.key, entry.current);
    }
    this.#logger.info({ identities: this.#entries.size }, "trusted roots changed: secure contexts rebuilt");
  }

  #failWaiters(entry: Entry, error: Error): void {
    for (const waiter of entry.waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(error);
    }
    entry.waiters.clear();
  }

  #statusOf(entry: Entry): CertificateStatus {
    const current = entry.current;
    const now = this.#now();
    const valid = current !== undefined && now < current.notAfter.getTime();
    let state: CertificateStatus["state"];
    if (!current) state = entry.failures > 0 ? "failing" : "pending";
    else if (!valid) state = "expired";
    else if (entry.failures > 0) state = "failing";
    else state = now >= entry.refreshAt ? "refreshing" : "valid";
    return {
      identity: entry.key,
      state,
      notBefore: current?.notBefore.toISOString(),
      notAfter: current?.notAfter.toISOString(),
      refreshAt: current ? new Date(entry.refreshAt).toISOString() : undefined,
      failures: entry.failures,
      nextRetryAt: entry.failures > 0 ? new Date(entry.retryAt).toISOString() : undefined,
      lastError: entry.lastError?.message,
      workloads: [...new Set([...entry.owners, ...entry.expected])].sort(),
      chainPem: current?.chainPem,
    };
  }
}

/** Returns the priority of a retry: a waiting connection's, a held certificate's refresh, or a new workload's. */
function retryPriority(entry: Entry): Priority {
  if (entry.waiters.size > 0) return Priority.Connection;
  return entry.current ? Priority.Refresh : Priority.Workload;
}

/**
 * Returns when a certificate received at `receivedAt` is re-issued: half-way between notBefore and
 * notAfter. CAs date notBefore back to allow for clock skew, so the half-way point starts from the
 * arrival when that is later. A short-lived certificate is then not re-issued the moment it arrives.
 */
export function refreshTime(certificate: Pick<IssuedCertificate, "notBefore" | "notAfter">, receivedAt: number): number {
  const start = Math.max(certificate.notBefore.getTime(), receivedAt);
  return start + (certificate.notAfter.getTime() - start) / 2;
}

/** Delay before retry number `failures` (1 for the first): doubling from FIRST_RETRY_MS, capped, with jitter. */
export function retryDelay(failures: number, random: number): number {
  const base = Math.min(FIRST_RETRY_MS * 2 ** (failures - 1), MAX_RETRY_MS);
  return Math.round(Math.min(base * (1 + RETRY_JITTER * (2 * random - 1)), MAX_RETRY_MS));
}

/** Rejects a CA response whose leaf does not carry the identity that was asked for. */
function checkIssuedFor(issued: IssuedCertificate, identity: Identity): void {
  let presented: Identity | undefined;
  try {
    presented = leafIdentity(issued.certPem);
  } catch (error) {
    throw new AgentError("IDENTITY_ERROR", `the CA returned a leaf that does not parse for ${formatSpiffeId(identity)}; rejected`, { cause: error });
  }
  if (!presented || !sameIdentity(presented, identity)) {
    throw new AgentError(
      "IDENTITY_ERROR",
      `the CA returned a certificate for ${presented ? formatSpiffeId(presented) : "no SPIFFE identity"} when ${formatSpiffeId(identity)} was requested; rejected`,
    );
  }
}
