// The agent's identity parts put together: the CA chosen by the options (embedded or Istio's), the
// trust bundle, and the certificate manager that the proxies ask for certificates.

import fs from "node:fs";
import type { Logger } from "../log";
import { EmbeddedCa } from "./ca";
import { CertManager } from "./cert-manager";
import type { CertificateIssuer, IssuedCertificate } from "./certificate";
import { IstioCaClient } from "./istio-ca";
import type { Identity } from "../state/types";
import { TrustBundle } from "./trust-bundle";

export type CaOptions =
  | { kind: "embedded"; dir: string }
  | { kind: "istio"; address: string; rootCertFile: string; tokenFile: string; clusterId: string; serverName?: string };

export interface IdentityOptions {
  ca: CaOptions;
  /** Trust domain of the workloads; default the embedded CA's, else cluster.local. */
  trustDomain?: string;
  trustDomainAliases: readonly string[];
  /** PEM file of more trusted roots, followed as it changes. */
  trustBundleFile?: string;
  /** Lifetime asked for each certificate; default 24 h. */
  certTtlSeconds?: number;
}

const DEFAULT_TRUST_DOMAIN = "cluster.local";
/** How often the embedded CA's folder is checked for new files (a root rotation, a new signing key). */
const CA_FOLDER_CHECK_MS = 30_000;

/** The running identity parts; close() stops their timers and connections. */
export interface IdentityRuntime {
  trustDomain: string;
  trust: TrustBundle;
  certs: CertManager;
  /** "embedded DIR" or "istio ADDRESS", for diagnostics. */
  caDescription: string;
  /** Reads the embedded CA's folder again now (SIGHUP); a no-op for Istio's CA. */
  reload(): Promise<void>;
  close(): void;
}

export async function startIdentity(options: IdentityOptions, logger: Logger): Promise<IdentityRuntime> {
  const log = logger.child({ component: "certs" });
  const issuer = options.ca.kind === "embedded" ? await EmbeddedIssuer.load(options.ca.dir, options.trustDomain, log) : istioIssuer(options.ca, log);
  const trustDomain = issuer instanceof EmbeddedIssuer ? issuer.ca.trustDomain : (options.trustDomain ?? DEFAULT_TRUST_DOMAIN);
  const trust = new TrustBundle({ trustDomain, aliases: options.trustDomainAliases, extraRootsFile: options.trustBundleFile, logger: log });
  await trust.start();
  if (issuer instanceof EmbeddedIssuer) {
    trust.setCaRoots(issuer.ca.rootPem);
    issuer.onRoots = (pem) => trust.setCaRoots(pem);
  }
  const certs = new CertManager(issuer, log, { ttlSeconds: options.certTtlSeconds, trust });
  log.info(
    { ca: describeCa(options.ca), trustDomain, aliases: trust.aliases, trustBundle: options.trustBundleFile, certTtlSeconds: options.certTtlSeconds },
    "workload identity ready",
  );
  return {
    trustDomain,
    trust,
    certs,
    caDescription: describeCa(options.ca),
    reload: async () => {
      if (issuer instanceof EmbeddedIssuer) await issuer.reload();
    },
    close: () => {
      certs.close();
      trust.stop();
      if (issuer instanceof EmbeddedIssuer) issuer.close();
      else issuer.close();
    },
  };
}

function describeCa(ca: CaOptions): string {
  return ca.kind === "embedded" ? `embedded ${ca.dir}` : `istio ${ca.address}`;
}

function istioIssuer(ca: Extract<CaOptions, { kind: "istio" }>, logger: Logger): IstioCaClient {
  // The token may be mounted after the agent starts, so a missing one is a warning here and an error per request.
  if (!fs.existsSync(ca.tokenFile)) {
    logger.warn(
      { tokenFile: ca.tokenFile },
      `the service-account token file ${ca.tokenFile} does not exist: certificate requests fail until it does; mount a projected token with audience istio-ca there or pass --ca-token-file`,
    );
  }
  return new IstioCaClient({
    address: ca.address,
    rootCertFile: ca.rootCertFile,
    tokenFile: ca.tokenFile,
    clusterId: ca.clusterId,
    tlsServerName: ca.serverName,
    logger,
  });
}

/**
 * The embedded CA, with its folder checked for changes every 30 s and on reload(). A changed folder
 * that loads replaces the CA and hands its roots to the trust bundle, so a root added for a rotation
 * is trusted, and a root removed from root-cert.pem stops being trusted, without a restart. A folder
 * that does not load is logged and the last good CA keeps issuing.
 */
class EmbeddedIssuer implements CertificateIssuer {
  onRoots: ((pem: string) => void) | undefined;
  readonly #timer: NodeJS.Timeout;

  private constructor(
    public ca: EmbeddedCa,
    private readonly logger: Logger,
  ) {
    this.#timer = setInterval(() => void this.reload(), CA_FOLDER_CHECK_MS);
    this.#timer.unref();
  }

  static async load(dir: string, trustDomain: string | undefined, logger: Logger): Promise<EmbeddedIssuer> {
    return new EmbeddedIssuer(await EmbeddedCa.load(dir, { trustDomain }), logger);
  }

  issue(identity: Identity, ttlSeconds?: number): Promise<IssuedCertificate> {
    return this.ca.issue(identity, ttlSeconds);
  }

  async reload(): Promise<void> {
    try {
      const next = await this.ca.reload();
      if (next === this.ca) return;
      this.ca = next;
      this.logger.info({ dir: next.dir, format: next.format }, "embedded CA folder changed: new certificates come from its new files");
      this.onRoots?.(next.rootPem);
    } catch (error) {
      this.logger.error({ err: error, dir: this.ca.dir }, "embedded CA folder changed but does not load; the last good CA keeps issuing");
    }
  }

  close(): void {
    clearInterval(this.#timer);
  }
}
