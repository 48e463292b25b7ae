// Minimal shape checks of the admin API's JSON bodies: the fields agentctl's formatters read, with
// their JSON types. A body that fails them comes from some other HTTP server at the --admin address,
// and agentctl reports that instead of failing inside a formatter.

type FieldKind = "string" | "number" | "boolean" | "array" | "object";

/**
 * The fields of an object: a kind (a trailing "?" makes the field optional), a nested Shape for an
 * object, or [Shape] for a list whose every item has that shape.
 */
export interface Shape {
  readonly [field: string]: FieldKind | `${FieldKind}?` | Shape | readonly [Shape];
}

export const WORKLOAD_SHAPE: Shape = { namespace: "string", name: "string", ips: "array", node: "string?", protocol: "string", state: "string", local: "boolean" };

export const SERVICE_SHAPE: Shape = { namespace: "string", name: "string", vips: "array", ports: "array", endpoints: { total: "number", healthy: "number" } };

export const CERTIFICATE_SHAPE: Shape = {
  identity: "string",
  state: "string",
  failures: "number",
  lastError: "string?",
  chain: [{ type: "string", serialNumber: "string", notBefore: "string", notAfter: "string" }],
};

export const CONNECTION_SHAPE: Shape = {
  workload: "string",
  direction: "string",
  local: "string",
  remote: "string",
  protocol: "string",
  bytesSent: "number",
  bytesRecv: "number",
  durationMs: "number",
};

export const LOG_LEVELS_SHAPE: Shape = { default: "string", components: "object" };

export const STATUS_SHAPE: Shape = {
  version: "string",
  node: "string",
  pid: "number",
  uptimeSeconds: "number",
  ready: "boolean",
  checks: "object",
  capture: "object?",
  configuration: { source: "string", workloads: "number", services: "number", policies: "number", rejected: "number" },
  enrolled: "number",
  pending: "number",
  isolated: "number",
  connections: { inbound: "number", outbound: "number" },
  certificates: { total: "number", valid: "number", refreshing: "number", pending: "number", failing: "number", expired: "number" },
  stopping: "boolean?",
};

/** The capture part of /status, when present. */
export const STATUS_CAPTURE_SHAPE: Shape = { mode: "string", requested: "string", reason: "string", programs: "array", maps: "array" };

export const READINESS_SHAPE: Shape = { ready: "boolean", checks: "object", enrolled: "number", kubernetes: "object?", cni: "object?", probeSnat: "object?", pending: "array?", stopping: "boolean?" };

export const READINESS_KUBERNETES_SHAPE: Shape = { server: "string", synced: "boolean", watching: "boolean", resources: "array" };

/** /config_dump has many fields; these two tell an agent's dump from other JSON. */
export const CONFIG_DUMP_SHAPE: Shape = { node: "string", workloads: "array" };

export const POLICY_REPORT_SHAPE: Shape = { authorizationPolicies: "array", peerAuthentications: "array", rejected: "array" };

export const ACCESS_CHECK_SHAPE: Shape = { source: "object", destination: "string", results: "array", notes: "array" };

export const EXPLANATION_SHAPE: Shape = { workload: "string", enrolled: "boolean", policies: "array", excludedInboundPorts: "array", peerAuthentication: { ports: "array" } };

/**
 * Returns what in `value` does not fit `shape`, such as `JSON in which "checks" is missing, expected
 * an object`, or undefined when it fits. `path` locates `value` in the body, such as "[0].chain".
 */
export function shapeProblem(value: unknown, shape: Shape, path = ""): string | undefined {
  if (!isObject(value)) return mismatch(path, value, "object");
  for (const [field, spec] of Object.entries(shape)) {
    const fieldPath = path === "" ? field : `${path}.${field}`;
    const fieldValue = value[field];
    if (typeof spec === "string") {
      const optional = spec.endsWith("?");
      const kind = (optional ? spec.slice(0, -1) : spec) as FieldKind;
      if (fieldValue === undefined && optional) continue;
      if (!hasKind(fieldValue, kind)) return mismatch(fieldPath, fieldValue, kind);
    } else if (isItemShape(spec)) {
      const problem = listProblem(fieldValue, spec[0], fieldPath);
      if (problem !== undefined) return problem;
    } else {
      const problem = shapeProblem(fieldValue, spec, fieldPath);
      if (problem !== undefined) return problem;
    }
  }
  return undefined;
}

/** Returns what in a list does not fit: a value that is no list, or the first item that does not fit `itemShape`. */
export function listProblem(value: unknown, itemShape: Shape, path = ""): string | undefined {
  if (!Array.isArray(value)) return mismatch(path, value, "array");
  for (const [index, item] of value.entries()) {
    const problem = shapeProblem(item, itemShape, `${path}[${index}]`);
    if (problem !== undefined) return problem;
  }
  return undefined;
}

function mismatch(path: string, value: unknown, expected: FieldKind): string {
  const noun = { string: "a string", number: "a number", boolean: "a boolean", array: "a list", object: "an object" }[expected];
  if (path === "") return `JSON that is ${describe(value)}, expected ${noun}`;
  return `JSON in which "${path}" is ${describe(value)}, expected ${noun}`;
}

function isItemShape(spec: Shape | readonly [Shape]): spec is readonly [Shape] {
  return Array.isArray(spec);
}

function isObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function hasKind(value: unknown, kind: FieldKind): boolean {
  if (kind === "array") return Array.isArray(value);
  if (kind === "object") return isObject(value);
  if (kind === "number") return typeof value === "number" && Number.isFinite(value);
  return typeof value === kind;
}

/** Names a JSON value's type for a message: "a string", "a list", "null", "missing". */
function describe(value: unknown): string {
  if (value === undefined) return "missing";
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "an object";
  return `a ${typeof value}`;
}
