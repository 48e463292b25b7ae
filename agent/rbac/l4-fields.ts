// The AuthorizationPolicy fields an L4 proxy can check. Istio's ambient control plane sends
// ztunnel only these, and everything else needs an HTTP-aware (waypoint) proxy.

import type { PolicyCondition, PolicyOperation, PolicySource } from "../state/types";

/** Source fields checked at L4. */
export const L4_SOURCE_FIELDS = [
  "principals", "notPrincipals", "namespaces", "notNamespaces",
  "serviceAccounts", "notServiceAccounts", "ipBlocks", "notIpBlocks", "trustDomains", "notTrustDomains",
] as const satisfies readonly (keyof PolicySource)[];

/**
 * Source fields that need HTTP. remoteIpBlocks is among them because Istio derives the remote
 * address from X-Forwarded-For; its ambient control plane does not send it to ztunnel.
 */
export const HTTP_SOURCE_FIELDS = [
  "remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals",
] as const satisfies readonly (keyof PolicySource)[];

export const L4_OPERATION_FIELDS = ["ports", "notPorts"] as const satisfies readonly (keyof PolicyOperation)[];

export const HTTP_OPERATION_FIELDS = [
  "hosts", "notHosts", "methods", "notMethods", "paths", "notPaths",
] as const satisfies readonly (keyof PolicyOperation)[];

/** `when` keys checked at L4; any other key (request.*, remote.ip, connection.sni...) needs HTTP or is unsupported. */
export const L4_CONDITION_KEYS: readonly string[] = [
  "source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port",
];

function present(list: readonly string[] | undefined): boolean {
  return list !== undefined && list.length > 0;
}

/** Returns the HTTP-only fields set in a source. */
export function httpSourceFields(source: PolicySource): string[] {
  return HTTP_SOURCE_FIELDS.filter((field) => present(source[field]));
}

/** Returns the HTTP-only fields set in an operation. */
export function httpOperationFields(operation: PolicyOperation): string[] {
  return HTTP_OPERATION_FIELDS.filter((field) => present(operation[field]));
}

export function hasL4SourceField(source: PolicySource): boolean {
  return L4_SOURCE_FIELDS.some((field) => present(source[field]));
}

export function hasL4OperationField(operation: PolicyOperation): boolean {
  return L4_OPERATION_FIELDS.some((field) => present(operation[field]));
}

export function isL4Condition(condition: PolicyCondition): boolean {
  return L4_CONDITION_KEYS.includes(condition.key);
}
