// The resources the fake Kubernetes API server serves, how request paths map to them, and the
// v1 Status bodies it returns for errors.

import type { FieldReader, KubeObject } from "./fake-kube-selectors";

/** Plural resource names, as they appear in request paths. */
export type ResourceName = "namespaces" | "pods" | "services" | "endpointslices" | "authorizationpolicies" | "peerauthentications" | "daemonsets";

export interface ResourceType {
  name: ResourceName;
  /** API group; "" is the core group served under /api. */
  group: string;
  version: string;
  kind: string;
  namespaced: boolean;
  /** Field labels that fieldSelector accepts for this resource. */
  fields: ReadonlyMap<string, FieldReader>;
}

function text(value: unknown): string {
  if (value === undefined || value === null) return "";
  return String(value);
}

function spec(object: KubeObject): Record<string, unknown> {
  return (object.spec as Record<string, unknown> | undefined) ?? {};
}

function status(object: KubeObject): Record<string, unknown> {
  return (object.status as Record<string, unknown> | undefined) ?? {};
}

const METADATA_FIELDS: [string, FieldReader][] = [
  ["metadata.name", (object) => text(object.metadata?.name)],
  ["metadata.namespace", (object) => text(object.metadata?.namespace)],
];

// The pod field labels the real API server accepts for fieldSelector.
const POD_FIELDS: [string, FieldReader][] = [
  ...METADATA_FIELDS,
  ["spec.nodeName", (object) => text(spec(object).nodeName)],
  ["spec.restartPolicy", (object) => text(spec(object).restartPolicy)],
  ["spec.schedulerName", (object) => text(spec(object).schedulerName)],
  ["spec.serviceAccountName", (object) => text(spec(object).serviceAccountName)],
  ["spec.hostNetwork", (object) => text(spec(object).hostNetwork ?? false)],
  ["status.phase", (object) => text(status(object).phase)],
  ["status.podIP", (object) => text(status(object).podIP)],
  ["status.nominatedNodeName", (object) => text(status(object).nominatedNodeName)],
];

const NAMESPACE_FIELDS: [string, FieldReader][] = [...METADATA_FIELDS, ["status.phase", (object) => text(status(object).phase)]];

function resource(name: ResourceName, group: string, kind: string, namespaced: boolean, fields = METADATA_FIELDS): ResourceType {
  return { name, group, version: "v1", kind, namespaced, fields: new Map(fields) };
}

export const RESOURCES: readonly ResourceType[] = [
  resource("namespaces", "", "Namespace", false, NAMESPACE_FIELDS),
  resource("pods", "", "Pod", true, POD_FIELDS),
  resource("services", "", "Service", true),
  resource("endpointslices", "discovery.k8s.io", "EndpointSlice", true),
  resource("authorizationpolicies", "security.istio.io", "AuthorizationPolicy", true),
  resource("peerauthentications", "security.istio.io", "PeerAuthentication", true),
  // Read by an agent with --daemonset, to tell an uninstall from a restart.
  resource("daemonsets", "apps", "DaemonSet", true),
];

/** Returns "v1" for the core group and "group/version" otherwise. */
export function apiVersionOf(type: ResourceType): string {
  return type.group === "" ? type.version : `${type.group}/${type.version}`;
}

/** Finds the resource of an object by its apiVersion and kind. */
export function resourceOfObject(object: KubeObject): ResourceType | undefined {
  return RESOURCES.find((type) => type.kind === object.kind && apiVersionOf(type) === object.apiVersion);
}

export function resourceByName(name: string): ResourceType | undefined {
  return RESOURCES.find((type) => type.name === name);
}

/** A request path resolved to a resource: a collection (no name) or one object, and its subresource. */
export interface Route {
  type: ResourceType;
  /** Namespace of a namespaced request; undefined for a cluster-wide list or watch. */
  namespace?: string;
  name?: string;
  subresource?: string;
  /** The path used the old /watch/ prefix, which makes the request a watch. */
  watchPrefix: boolean;
}

/**
 * Resolves a request path, for example /api/v1/namespaces/ns1/pods/p1/status or
 * /apis/security.istio.io/v1/authorizationpolicies. Returns undefined for a path that names no
 * served resource.
 */
export function routeOf(pathname: string): Route | undefined {
  const segments = pathname.split("/").filter((segment) => segment !== "").map(decodeURIComponent);
  let group: string;
  let rest: string[];
  if (segments[0] === "api" && segments[1] === "v1") {
    group = "";
    rest = segments.slice(2);
  } else if (segments[0] === "apis" && segments.length >= 3) {
    group = segments[1];
    if (!RESOURCES.some((type) => type.group === group && type.version === segments[2])) return undefined;
    rest = segments.slice(3);
  } else {
    return undefined;
  }
  const watchPrefix = rest[0] === "watch";
  if (watchPrefix) rest = rest.slice(1);
  return routeInGroup(group, rest, watchPrefix);
}

function routeInGroup(group: string, rest: string[], watchPrefix: boolean): Route | undefined {
  const inGroup = (name: string | undefined): ResourceType | undefined =>
    RESOURCES.find((type) => type.group === group && type.name === name);

  // /namespaces/{ns}/{resource}[/{name}[/{subresource}]] for namespaced resources.
  if (rest[0] === "namespaces" && rest.length >= 3) {
    const type = inGroup(rest[2]);
    if (!type?.namespaced || rest.length > 5) return undefined;
    return { type, namespace: rest[1], name: rest[3], subresource: rest[4], watchPrefix };
  }

  // /{resource}[/{name}[/{subresource}]]: a cluster-wide collection, or one cluster-scoped object.
  const type = inGroup(rest[0]);
  if (!type || rest.length > 3 || (type.namespaced && rest.length > 1)) return undefined;
  return { type, name: rest[1], subresource: rest[2], watchPrefix };
}

/** A meta/v1 Status object, the body of every error response and of a watch ERROR event. */
export interface KubeStatus {
  kind: "Status";
  apiVersion: "v1";
  metadata: Record<string, never>;
  status: "Failure";
  message: string;
  reason: string;
  code: number;
  details?: { name?: string; kind?: string; group?: string };
}

export function statusOf(code: number, reason: string, message: string, details?: KubeStatus["details"]): KubeStatus {
  const body: KubeStatus = { kind: "Status", apiVersion: "v1", metadata: {}, status: "Failure", message, reason, code };
  if (details) body.details = details;
  return body;
}

export function notFoundStatus(type: ResourceType, name: string): KubeStatus {
  const details = { name, kind: type.name, ...(type.group ? { group: type.group } : {}) };
  const qualified = type.group ? `${type.name}.${type.group}` : type.name;
  return statusOf(404, "NotFound", `${qualified} "${name}" not found`, details);
}

/** Builds the "too old resource version" Status of a watch that starts before the retained history. */
export function tooOldStatus(requested: number, oldest: number): KubeStatus {
  return statusOf(410, "Expired", `too old resource version: ${requested} (${oldest})`);
}
