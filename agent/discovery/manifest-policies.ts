// Readers for security.istio.io AuthorizationPolicy and PeerAuthentication. Unknown fields are
// rejected rather than ignored: a misspelt field in an ALLOW rule would otherwise widen it.

import type {
  AuthorizationPolicy,
  Labels,
  MtlsMode,
  ObjectSource,
  PeerAuthentication,
  PolicyAction,
  PolicyCondition,
  PolicyOperation,
  PolicyRule,
  PolicySource,
} from "../state/types";
import { describeValue, parseCidr, parsePortString, type FieldPath, type ObjectReader } from "./manifest-reader";
import { readMetadata } from "./manifest-workloads";

export const DRY_RUN_ANNOTATION = "istio.io/dry-run";

const ACTIONS: readonly PolicyAction[] = ["ALLOW", "DENY", "AUDIT", "CUSTOM"];
const MTLS_MODES: readonly MtlsMode[] = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];

const SOURCE_FIELDS = [
  "principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts",
  "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals",
  "trustDomains", "notTrustDomains",
] as const satisfies readonly (keyof PolicySource)[];

const OPERATION_FIELDS = [
  "ports", "notPorts", "hosts", "notHosts", "methods", "notMethods", "paths", "notPaths",
] as const satisfies readonly (keyof PolicyOperation)[];

const CIDR_FIELDS: readonly string[] = ["ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"];
const PORT_FIELDS: readonly string[] = ["ports", "notPorts"];

export function readAuthorizationPolicy(reader: ObjectReader, source: ObjectSource): AuthorizationPolicy | undefined {
  const metadata = readMetadata(reader, "AuthorizationPolicy", true);
  if (metadata === undefined || metadata.namespace === undefined) return undefined;
  reader.mapping(["spec"]);
  reader.knownFields(["spec"], ["selector", "action", "rules", "provider", "targetRef", "targetRefs"]);
  for (const field of ["targetRef", "targetRefs"]) {
    if (reader.value(["spec", field]) !== undefined) {
      reader.reject(["spec", field], "policies attached with targetRef apply to waypoint proxies, which this agent does not run; use spec.selector");
    }
  }

  const action = (reader.string(["spec", "action"]) ?? "ALLOW") as PolicyAction;
  if (!ACTIONS.includes(action)) {
    reader.reject(["spec", "action"], `invalid action ${describeValue(action)}; use ALLOW, DENY, AUDIT or CUSTOM`);
  }

  const rules = reader.list(["spec", "rules"]);
  return {
    uid: `${metadata.namespace}/${metadata.name}`,
    name: metadata.name,
    namespace: metadata.namespace,
    selector: readSelector(reader),
    action,
    rules: rules?.map((_, index) => readRule(reader, ["spec", "rules", index])),
    dryRun: readDryRun(reader, metadata.annotations),
    source,
  };
}

export function readPeerAuthentication(reader: ObjectReader, source: ObjectSource): PeerAuthentication | undefined {
  const metadata = readMetadata(reader, "PeerAuthentication", true);
  if (metadata === undefined || metadata.namespace === undefined) return undefined;
  reader.mapping(["spec"]);
  reader.knownFields(["spec"], ["selector", "mtls", "portLevelMtls"]);
  const selector = readSelector(reader);
  const mode = readMtlsMode(reader, ["spec", "mtls"]);

  const portLevelMtls: Record<number, MtlsMode> = {};
  const ports = reader.mapping(["spec", "portLevelMtls"]) ?? {};
  for (const key of Object.keys(ports)) {
    const port = parsePortString(key);
    if (port === undefined) {
      reader.reject(["spec", "portLevelMtls", key], `invalid port ${describeValue(key)}; use a workload port from 1 to 65535`);
      continue;
    }
    portLevelMtls[port] = readMtlsMode(reader, ["spec", "portLevelMtls", key]);
  }
  if (Object.keys(portLevelMtls).length > 0 && (selector === undefined || Object.keys(selector).length === 0)) {
    reader.reject(["spec", "portLevelMtls"], "portLevelMtls requires spec.selector.matchLabels; add a selector or remove portLevelMtls");
  }

  return {
    uid: `${metadata.namespace}/${metadata.name}`,
    name: metadata.name,
    namespace: metadata.namespace,
    selector,
    mode,
    portLevelMtls,
    source,
  };
}

/** Reads spec.selector.matchLabels; undefined when spec.selector is absent. */
function readSelector(reader: ObjectReader): Labels | undefined {
  if (reader.mapping(["spec", "selector"]) === undefined) return undefined;
  reader.knownFields(["spec", "selector"], ["matchLabels"]);
  const labels = reader.stringMap(["spec", "selector", "matchLabels"]);
  // As in Istio, a wildcard is no pattern here: it would select no pod while looking like it selects all.
  for (const [key, value] of Object.entries(labels)) {
    if (key.includes("*") || value.includes("*")) {
      reader.reject(["spec", "selector", "matchLabels", key], `wildcards are not supported in a selector (${describeValue(`${key}: ${value}`)}); name the label value, or remove the selector to select every pod of the namespace`);
    }
  }
  return labels;
}

/** The spellings of true and false that Istio accepts for istio.io/dry-run (Go's strconv.ParseBool). */
const DRY_RUN_TRUE = ["1", "t", "T", "TRUE", "true", "True"];
const DRY_RUN_FALSE = ["0", "f", "F", "FALSE", "false", "False"];

function readDryRun(reader: ObjectReader, annotations: Record<string, string>): boolean {
  const value = annotations[DRY_RUN_ANNOTATION];
  if (value === undefined || DRY_RUN_FALSE.includes(value)) return false;
  if (DRY_RUN_TRUE.includes(value)) return true;
  reader.reject(["metadata", "annotations", DRY_RUN_ANNOTATION], `invalid value ${describeValue(value)}; use "true" or "false"`);
  return false;
}

/** Reads `{ mode }` at `path`; an absent mapping or mode is UNSET (inherit from the parent scope). */
function readMtlsMode(reader: ObjectReader, path: FieldPath): MtlsMode {
  if (reader.mapping(path) === undefined) return "UNSET";
  reader.knownFields(path, ["mode"]);
  const mode = (reader.string([...path, "mode"]) ?? "UNSET") as MtlsMode;
  if (MTLS_MODES.includes(mode)) return mode;
  reader.reject([...path, "mode"], `invalid mode ${describeValue(mode)}; use UNSET, DISABLE, PERMISSIVE or STRICT`);
  return "UNSET";
}

function readRule(reader: ObjectReader, path: FieldPath): PolicyRule {
  const rule: PolicyRule = {};
  if (reader.mapping(path) === undefined) {
    if (reader.value(path) === null || reader.value(path) === undefined) {
      reader.reject(path, "empty rule entry; write {} for a rule that matches every connection");
    }
    return rule;
  }
  reader.knownFields(path, ["from", "to", "when"]);

  const from = reader.list([...path, "from"]);
  if (from !== undefined) rule.from = from.map((_, index) => ({ source: readSource(reader, [...path, "from", index]) }));

  const to = reader.list([...path, "to"]);
  if (to !== undefined) rule.to = to.map((_, index) => ({ operation: readOperation(reader, [...path, "to", index]) }));

  const when = reader.list([...path, "when"]);
  if (when !== undefined) rule.when = when.map((_, index) => readCondition(reader, [...path, "when", index]));
  return rule;
}

function readSource(reader: ObjectReader, entryPath: FieldPath): PolicySource {
  const path = [...entryPath, "source"];
  reader.knownFields(entryPath, ["source"]);
  const source: PolicySource = {};
  if (!readNonEmptyMapping(reader, path, "from entry", "source")) return source;
  reader.knownFields(path, SOURCE_FIELDS);

  for (const field of SOURCE_FIELDS) {
    const values = reader.stringList([...path, field]);
    if (values === undefined) continue;
    if (CIDR_FIELDS.includes(field)) checkCidrs(reader, [...path, field]);
    source[field] = values;
  }
  rejectAllEmpty(reader, path, "from entry", "source");
  if ((source.serviceAccounts ?? source.notServiceAccounts) !== undefined && (source.principals ?? source.namespaces) !== undefined) {
    reader.reject(path, "serviceAccounts cannot be combined with principals or namespaces in one source; split them into two from entries");
  }
  return source;
}

function readOperation(reader: ObjectReader, entryPath: FieldPath): PolicyOperation {
  const path = [...entryPath, "operation"];
  reader.knownFields(entryPath, ["operation"]);
  const operation: PolicyOperation = {};
  if (!readNonEmptyMapping(reader, path, "to entry", "operation")) return operation;
  reader.knownFields(path, OPERATION_FIELDS);

  for (const field of OPERATION_FIELDS) {
    const values = reader.stringList([...path, field]);
    if (values === undefined) continue;
    if (PORT_FIELDS.includes(field)) checkPorts(reader, [...path, field]);
    operation[field] = values;
  }
  rejectAllEmpty(reader, path, "to entry", "operation");
  return operation;
}

function readCondition(reader: ObjectReader, path: FieldPath): PolicyCondition {
  reader.knownFields(path, ["key", "values", "notValues"]);
  const key = reader.requiredString([...path, "key"]) ?? "";
  if (key !== "" && !isConditionKey(key)) {
    reader.reject(
      [...path, "key"],
      `unknown condition key ${describeValue(key)}; use source.ip, source.namespace, source.principal, destination.ip or destination.port (checked at L4), or an HTTP key such as request.headers[NAME]`,
    );
  }
  const values = reader.stringList([...path, "values"]);
  const notValues = reader.stringList([...path, "notValues"]);
  // An empty list is the same as no list, as in Istio's protobuf API.
  if ((values ?? []).length === 0 && (notValues ?? []).length === 0) {
    reader.reject(path, "a condition needs a non-empty values or notValues; add one of them");
  }
  for (const [field, list] of [["values", values], ["notValues", notValues]] as const) {
    if (list === undefined) continue;
    if (key === "source.ip" || key === "destination.ip" || key === "remote.ip") checkCidrs(reader, [...path, field]);
    if (key === "destination.port") checkPorts(reader, [...path, field]);
  }
  const condition: PolicyCondition = { key };
  if (values !== undefined) condition.values = values;
  if (notValues !== undefined) condition.notValues = notValues;
  return condition;
}

/** Condition keys that Istio accepts: exact keys, and the prefixes of keys that take a name in brackets. */
const CONDITION_KEYS: readonly string[] = [
  "source.ip", "remote.ip", "source.namespace", "source.principal", "source.serviceAccount", "destination.ip",
  "destination.port", "request.auth.principal", "request.auth.audiences", "request.auth.presenter", "connection.sni",
];
const CONDITION_KEY_FORMS = [
  /^request\.headers\[[^\]]+\]$/,
  /^request\.experimental\.inline\.headers\[[^\]]+\]$/,
  /^request\.auth\.claims(\[[^\]]+\])+$/,
  /^experimental\.envoy\.filters\.[^\s[\]]+\[[^\]]+\]$/,
];

/** Tells whether `key` is a condition key that Istio defines; a misspelt key is no HTTP attribute. */
function isConditionKey(key: string): boolean {
  return CONDITION_KEYS.includes(key) || CONDITION_KEY_FORMS.some((form) => form.test(key));
}

/**
 * Rejects a source or operation whose fields are all empty lists: Istio reads an empty list as an
 * absent field, and rejects an empty source or operation.
 */
function rejectAllEmpty(reader: ObjectReader, path: FieldPath, entry: string, field: string): void {
  const raw = reader.value(path);
  const lists = raw !== null && typeof raw === "object" ? Object.values(raw) : [];
  if (lists.length > 0 && lists.every((list) => Array.isArray(list) && list.length === 0)) {
    reader.reject(path, `a ${entry} needs a non-empty ${field}, and every list in it is empty; add values or remove the entry`);
  }
}

/** Checks that `path` is a mapping with at least one field; an empty source or operation is invalid in Istio. */
function readNonEmptyMapping(reader: ObjectReader, path: FieldPath, entry: string, field: string): boolean {
  const mapping = reader.mapping(path);
  if (mapping === undefined || Object.keys(mapping).length === 0) {
    reader.reject(path, `a ${entry} needs a non-empty ${field}; set at least one field or remove the entry`);
    return false;
  }
  return true;
}

/** Checks the string items of the list at `path`; items of other types were already rejected. */
function checkCidrs(reader: ObjectReader, path: FieldPath): void {
  rawItems(reader, path).forEach((value, index) => {
    if (typeof value === "string" && parseCidr(value) === undefined) {
      reader.reject([...path, index], `invalid IP address or CIDR ${describeValue(value)}; use a form like 10.0.0.0/8 or 10.1.2.3`);
    }
  });
}

function checkPorts(reader: ObjectReader, path: FieldPath): void {
  rawItems(reader, path).forEach((value, index) => {
    if (typeof value === "string" && parsePortString(value) === undefined) {
      reader.reject([...path, index], `invalid port ${describeValue(value)}; use a port from "1" to "65535" written as a string`);
    }
  });
}

function rawItems(reader: ObjectReader, path: FieldPath): unknown[] {
  const value = reader.value(path);
  return Array.isArray(value) ? value : [];
}
