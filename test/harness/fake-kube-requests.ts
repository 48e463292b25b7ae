// The read and write requests of the fake Kubernetes API server: GET of one object, paginated
// lists with continue tokens, and PATCH with JSON merge patch (RFC 7386). Each handler returns the
// status code and body to send; watches are in fake-kube-watch.ts.

import { apiVersionOf, notFoundStatus, statusOf, type ResourceType, type Route } from "./fake-kube-resources";
import { parseSelector, SelectorError, type KubeObject, type Selector } from "./fake-kube-selectors";
import { ExpiredError, type KubeStore } from "./fake-kube-store";

export interface Reply {
  code: number;
  body: unknown;
}

/** Thrown by a request check; the server sends its Status. */
export class RequestError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
    message: string,
  ) {
    super(message);
    this.name = "RequestError";
  }
}

export function errorReply(code: number, reason: string, message: string): Reply {
  return { code, body: statusOf(code, reason, message) };
}

/** Parses the selectors of a list or watch; a named route (GET .../pods/p1?watch=1) also selects by name. */
export function selectorOf(route: Route, query: URLSearchParams): Selector {
  let fieldSelector = query.get("fieldSelector") ?? "";
  if (route.name !== undefined) {
    const byName = `metadata.name=${route.name.replace(/[\\,=!]/g, "\\$&")}`;
    fieldSelector = fieldSelector ? `${fieldSelector},${byName}` : byName;
  }
  try {
    return parseSelector(query.get("labelSelector") ?? "", fieldSelector, route.type.fields);
  } catch (error) {
    if (error instanceof SelectorError) throw new RequestError(400, "BadRequest", error.message);
    throw error;
  }
}

/** Parses a resourceVersion query value: undefined when absent or empty, else a non-negative integer. */
export function resourceVersionParam(query: URLSearchParams, name = "resourceVersion"): number | undefined {
  const value = query.get(name);
  if (value === null || value === "") return undefined;
  if (!/^\d+$/.test(value)) throw new RequestError(400, "BadRequest", `invalid ${name} "${value}": expected a decimal resourceVersion`);
  return Number(value);
}

// The real API server sends list items of the built-in kinds without apiVersion and kind, so this
// one does too. Custom resources (the security.istio.io kinds) keep both.
function listItem(type: ResourceType, object: KubeObject): KubeObject {
  if (type.group.endsWith(".istio.io")) return object;
  const { apiVersion: _apiVersion, kind: _kind, ...rest } = object;
  return rest;
}

/** Returns the object that a GET of one object names, or a NotFound Status. */
export function getOne(store: KubeStore, route: Route): Reply {
  const object = store.get(route.type.name, route.namespace, route.name!);
  if (!object) return { code: 404, body: notFoundStatus(route.type, route.name!) };
  return { code: 200, body: object };
}

/** Position of a paginated list: the snapshot it reads and the last key already returned. */
interface ContinueToken {
  v: "meta.k8s.io/v1";
  rv: number;
  start: string;
}

function encodeContinue(token: ContinueToken): string {
  return Buffer.from(JSON.stringify(token)).toString("base64url");
}

function decodeContinue(text: string): ContinueToken {
  try {
    const token = JSON.parse(Buffer.from(text, "base64url").toString("utf8")) as ContinueToken;
    if (token.v === "meta.k8s.io/v1" && Number.isInteger(token.rv) && typeof token.start === "string") return token;
  } catch {
    // Falls through to the error below.
  }
  throw new RequestError(400, "BadRequest", `invalid continue token "${text}": pass the metadata.continue value of the previous page unchanged`);
}

function limitParam(query: URLSearchParams): number | undefined {
  const value = query.get("limit");
  if (value === null || value === "" || value === "0") return undefined;
  if (!/^\d+$/.test(value)) throw new RequestError(400, "BadRequest", `invalid limit "${value}": expected a non-negative integer`);
  return Number(value);
}

/**
 * Lists one page. Without `continue` the page reads the current state, or the state at
 * resourceVersion when resourceVersionMatch=Exact. With `continue` it reads the snapshot the
 * first page read; a snapshot older than the retained history gives 410 Expired.
 */
export function list(store: KubeStore, route: Route, query: URLSearchParams): Reply {
  const selector = selectorOf(route, query);
  const limit = limitParam(query);
  const continueText = query.get("continue");
  const token = continueText ? decodeContinue(continueText) : undefined;
  const snapshotVersion = token?.rv ?? exactVersion(store, query) ?? store.resourceVersion;

  let entries: [string, KubeObject][];
  try {
    entries = store.snapshot(route.type.name, snapshotVersion);
  } catch (error) {
    if (!(error instanceof ExpiredError)) throw error;
    const what = token ? "continue token" : "resourceVersion";
    return errorReply(410, "Expired", `the ${what} refers to resourceVersion ${snapshotVersion}, which is older than the retained history: start a new list without it`);
  }
  return page(route, selector, entries, { limit, token, snapshotVersion, selected: query.has("labelSelector") || query.has("fieldSelector") });
}

function exactVersion(store: KubeStore, query: URLSearchParams): number | undefined {
  const requested = resourceVersionParam(query);
  if (query.get("resourceVersionMatch") !== "Exact") return undefined;
  if (requested === undefined) throw new RequestError(400, "BadRequest", "resourceVersionMatch=Exact needs a resourceVersion");
  if (requested > store.resourceVersion) throw new RequestError(504, "Timeout", `Too large resource version: ${requested}, current: ${store.resourceVersion}`);
  return requested;
}

interface PageOptions {
  limit?: number;
  token?: ContinueToken;
  snapshotVersion: number;
  /** The request has a selector, so remainingItemCount is unknown and left out, as the real server does. */
  selected: boolean;
}

function page(route: Route, selector: Selector, entries: [string, KubeObject][], options: PageOptions): Reply {
  const prefix = route.namespace !== undefined ? `${route.namespace}/` : "";
  const items: KubeObject[] = [];
  let lastKey = "";
  let remaining = 0;
  for (const [key, object] of entries) {
    if (!key.startsWith(prefix) || (options.token && key <= options.token.start) || !selector.matches(object)) continue;
    if (options.limit !== undefined && items.length >= options.limit) {
      remaining++;
      continue;
    }
    items.push(listItem(route.type, object));
    lastKey = key;
  }

  const metadata: Record<string, unknown> = { resourceVersion: String(options.snapshotVersion) };
  if (remaining > 0) {
    metadata.continue = encodeContinue({ v: "meta.k8s.io/v1", rv: options.snapshotVersion, start: lastKey });
    if (!options.selected) metadata.remainingItemCount = remaining;
  }
  return { code: 200, body: { kind: `${route.type.kind}List`, apiVersion: apiVersionOf(route.type), metadata, items } };
}

/** Applies an RFC 7386 JSON merge patch: objects merge key by key, null deletes a key, anything else replaces. */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return structuredClone(patch);
  const result: Record<string, unknown> =
    target !== null && typeof target === "object" && !Array.isArray(target) ? { ...(target as Record<string, unknown>) } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = mergePatch(result[key], value);
  }
  return result;
}

const PATCH_TYPES = ["application/merge-patch+json", "application/strategic-merge-patch+json"];

/**
 * Patches one object. Both accepted content types are applied as a JSON merge patch, which is
 * what a strategic merge patch does to metadata maps. A patch of the main resource keeps the
 * stored status, a patch of the status subresource keeps the stored spec.
 */
export function patch(store: KubeStore, route: Route, contentType: string, body: string): Reply {
  const mediaType = contentType.split(";")[0].trim().toLowerCase();
  if (!PATCH_TYPES.includes(mediaType)) {
    return errorReply(415, "UnsupportedMediaType", `unsupported patch content type "${contentType}": use one of ${PATCH_TYPES.join(", ")}`);
  }
  if (route.subresource !== undefined && route.subresource !== "status") {
    return errorReply(404, "NotFound", `the server could not find the requested resource: no subresource ${route.subresource} of ${route.type.name}`);
  }
  const existing = store.get(route.type.name, route.namespace, route.name!);
  if (!existing) return { code: 404, body: notFoundStatus(route.type, route.name!) };

  const patchObject = parsePatchBody(body);
  const precondition = (patchObject.metadata as Record<string, unknown> | undefined)?.resourceVersion;
  if (precondition !== undefined && precondition !== existing.metadata?.resourceVersion) {
    return errorReply(409, "Conflict", `cannot patch ${route.type.name} "${route.name}": resourceVersion ${String(precondition)} in the patch is not the current ${existing.metadata?.resourceVersion}; read the object again and retry`);
  }
  return applyPatch(store, route, existing, patchObject);
}

function parsePatchBody(body: string): Record<string, unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch (error) {
    throw new RequestError(400, "BadRequest", `invalid patch body: ${(error as Error).message}`);
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new RequestError(400, "BadRequest", "invalid patch body: a merge patch must be a JSON object");
  }
  return parsed as Record<string, unknown>;
}

function applyPatch(store: KubeStore, route: Route, existing: KubeObject, patchObject: Record<string, unknown>): Reply {
  const merged = mergePatch(existing, patchObject) as KubeObject & { metadata: Record<string, unknown> };
  if (!merged.metadata || typeof merged.metadata !== "object") merged.metadata = {};
  if (merged.metadata.name !== undefined && merged.metadata.name !== existing.metadata?.name) {
    return errorReply(400, "BadRequest", `the patch changes metadata.name to ${String(merged.metadata.name)}, but the request path names ${existing.metadata?.name}`);
  }
  merged.apiVersion = existing.apiVersion;
  merged.kind = existing.kind;
  if (route.subresource === "status") merged.spec = existing.spec;
  else merged.status = existing.status;
  if (merged.spec === undefined) delete merged.spec;
  if (merged.status === undefined) delete merged.status;

  // A patch that changes nothing is no write: the real server keeps the resourceVersion and sends no event.
  merged.metadata.resourceVersion = existing.metadata?.resourceVersion;
  if (JSON.stringify(merged) === JSON.stringify(existing)) return { code: 200, body: existing };
  return { code: 200, body: store.replace(route.type, merged, existing) };
}
