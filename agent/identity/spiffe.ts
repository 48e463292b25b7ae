// SPIFFE identities of workloads: spiffe://<trust domain>/ns/<namespace>/sa/<service account>.

import { AgentError } from "../errors";
import type { Identity, Workload } from "../state/types";

const SCHEME = "spiffe://";

/** Trust domain characters allowed by the SPIFFE ID specification: lowercase letters, digits, '.', '-', '_'. */
const TRUST_DOMAIN = /^[a-z0-9._-]+$/;

/** Path segment characters allowed by the SPIFFE ID specification: letters, digits, '.', '-', '_'. */
const PATH_SEGMENT = /^[A-Za-z0-9._-]+$/;

/** Formats an identity as its SPIFFE URI. */
export function formatSpiffeId(identity: Identity): string {
  return `${SCHEME}${identity.trustDomain}/ns/${identity.namespace}/sa/${identity.serviceAccount}`;
}

/**
 * Parses a SPIFFE URI of the form spiffe://<td>/ns/<ns>/sa/<sa>.
 * Throws AgentError IDENTITY_ERROR for any other form, including extra path segments,
 * query strings, fragments and empty or "."/".." segments.
 */
export function parseSpiffeId(uri: string): Identity {
  if (!uri.startsWith(SCHEME)) {
    throw invalidSpiffeId(uri, "it does not start with spiffe://");
  }
  const [trustDomain, ...path] = uri.slice(SCHEME.length).split("/");
  if (!TRUST_DOMAIN.test(trustDomain)) {
    throw invalidSpiffeId(uri, "the trust domain is empty or has characters other than a-z 0-9 . - _");
  }
  if (path.length !== 4 || path[0] !== "ns" || path[2] !== "sa") {
    throw invalidSpiffeId(uri, "the path is not /ns/<namespace>/sa/<service account>");
  }
  const [, namespace, , serviceAccount] = path;
  for (const segment of [namespace, serviceAccount]) {
    if (!PATH_SEGMENT.test(segment) || segment === "." || segment === "..") {
      throw invalidSpiffeId(uri, `the path segment "${segment}" is empty or has characters other than A-Z a-z 0-9 . - _`);
    }
  }
  return { trustDomain, namespace, serviceAccount };
}

/** Returns the identity a workload runs as in the given trust domain. */
export function identityOf(workload: Workload, trustDomain: string): Identity {
  return {
    trustDomain,
    namespace: workload.namespace,
    serviceAccount: workload.serviceAccount === "" ? "default" : workload.serviceAccount,
  };
}

/** Tells whether two identities are the same. */
export function sameIdentity(a: Identity, b: Identity): boolean {
  return a.trustDomain === b.trustDomain && a.namespace === b.namespace && a.serviceAccount === b.serviceAccount;
}

function invalidSpiffeId(uri: string, reason: string): AgentError {
  return new AgentError(
    "IDENTITY_ERROR",
    `invalid SPIFFE id ${JSON.stringify(uri)}: ${reason}; expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>`,
  );
}
