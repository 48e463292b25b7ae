// The identity options of `ambient-agent run`: which CA issues workload certificates, the trust
// domain and its aliases, extra trusted roots, and the certificate lifetime.

import path from "node:path";
import { DEFAULT_CLUSTER_ID, DEFAULT_TOKEN_FILE } from "../identity/istio-ca";
import type { IdentityOptions } from "../identity/setup";

export const IDENTITY_USAGE = `  --ca-dir DIR         embedded CA: a folder made by \`agentctl ca init --dir DIR\`, or an Istio
                       CA Secret (cacerts or istio-ca-secret) mounted as a folder; re-read every
                       30 s and on SIGHUP
  --ca-address HOST:PORT
                       Istio's CA (istiod, usually istiod.istio-system.svc:15012) instead of an
                       embedded CA; needs --ca-root-cert
  --ca-root-cert FILE  PEM root(s) that the CA's TLS certificate must chain to (with --ca-address)
  --ca-server-name NAME
                       name checked on the CA's TLS certificate (default the host of --ca-address)
  --ca-token-file FILE service-account token (audience istio-ca) sent as a bearer token, re-read
                       for every request (default ${DEFAULT_TOKEN_FILE})
  --cluster-id ID      sent to the CA as clusterid metadata (default ${DEFAULT_CLUSTER_ID})
  --trust-domain TD    trust domain of the workloads' SPIFFE ids (default the embedded CA's, else
                       cluster.local)
  --trust-domain-alias TD
                       another trust domain accepted as this one's, for example a former name or a
                       peer cluster's; repeatable
  --trust-bundle FILE  PEM file of more trusted roots, for the alias trust domains only (they never
                       vouch for --trust-domain); re-read when it changes and every 30 s
  --cert-ttl SECONDS   lifetime asked for each workload certificate (default 86400); each is
                       re-issued half-way through its life
`;

/** The parsed values these options come from (node:util parseArgs). */
export interface IdentityFlagValues {
  "ca-dir"?: string;
  "ca-address"?: string;
  "ca-root-cert"?: string;
  "ca-server-name"?: string;
  "ca-token-file"?: string;
  "cluster-id"?: string;
  "trust-domain"?: string;
  "trust-domain-alias"?: string[];
  "trust-bundle"?: string;
  "cert-ttl"?: string;
}

export const IDENTITY_FLAGS = {
  "ca-dir": { type: "string" },
  "ca-address": { type: "string" },
  "ca-root-cert": { type: "string" },
  "ca-server-name": { type: "string" },
  "ca-token-file": { type: "string" },
  "cluster-id": { type: "string" },
  "trust-domain": { type: "string" },
  "trust-domain-alias": { type: "string", multiple: true },
  "trust-bundle": { type: "string" },
  "cert-ttl": { type: "string" },
} as const;

/** Shortest --cert-ttl accepted: below it, re-issuing every few seconds would load the CA for nothing. */
const MIN_CERT_TTL_SECONDS = 10;

/** Reads the identity options; throws an Error whose message names the option and the fix. */
export function parseIdentityFlags(values: IdentityFlagValues): IdentityOptions {
  const caDir = values["ca-dir"];
  const address = values["ca-address"];
  if (caDir !== undefined && address !== undefined) {
    throw new Error("--ca-dir and --ca-address both name a CA: give --ca-dir for the embedded CA or --ca-address for Istio's CA");
  }
  if (caDir === undefined && address === undefined) {
    throw new Error("no CA given: pass --ca-dir DIR (embedded CA) or --ca-address HOST:PORT with --ca-root-cert FILE (Istio's CA)");
  }
  const common = {
    trustDomain: values["trust-domain"],
    trustDomainAliases: values["trust-domain-alias"] ?? [],
    trustBundleFile: values["trust-bundle"] === undefined ? undefined : path.resolve(values["trust-bundle"]),
    certTtlSeconds: parseCertTtl(values["cert-ttl"]),
  };
  if (address === undefined) {
    for (const flag of ["ca-root-cert", "ca-server-name", "ca-token-file", "cluster-id"] as const) {
      if (values[flag] !== undefined) throw new Error(`--${flag} applies to Istio's CA only: add --ca-address, or drop --${flag}`);
    }
    return { ...common, ca: { kind: "embedded", dir: path.resolve(caDir!) } };
  }
  const port = Number(/:(\d{1,5})$/.exec(address)?.[1]);
  if (!/^(\[[0-9a-fA-F:.]+\]|[^\s:[\]]+):\d{1,5}$/.test(address) || port < 1 || port > 65535) {
    throw new Error(`invalid --ca-address "${address}": give host:port, for example istiod.istio-system.svc:15012`);
  }
  const rootCertFile = values["ca-root-cert"];
  if (rootCertFile === undefined) {
    throw new Error("--ca-address needs --ca-root-cert FILE: the PEM root that istiod's TLS certificate chains to (istio-ca-root-cert ConfigMap)");
  }
  return {
    ...common,
    ca: {
      kind: "istio",
      address,
      rootCertFile: path.resolve(rootCertFile),
      tokenFile: path.resolve(values["ca-token-file"] ?? DEFAULT_TOKEN_FILE),
      clusterId: values["cluster-id"] ?? DEFAULT_CLUSTER_ID,
      serverName: values["ca-server-name"],
    },
  };
}

function parseCertTtl(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const seconds = Number(value);
  if (!/^\d+$/.test(value) || seconds < MIN_CERT_TTL_SECONDS) {
    throw new Error(`invalid --cert-ttl "${value}": give a whole number of seconds, at least ${MIN_CERT_TTL_SECONDS} (default 86400)`);
  }
  return seconds;
}
