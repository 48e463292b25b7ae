// Reads Kubernetes manifests (multi-document YAML or JSON, also `kind: List`) into the mesh
// vocabulary. Kinds the mesh does not use are skipped. Objects of known kinds are checked field
// by field, and an invalid object is rejected alone with a problem naming the file and line.

import { LineCounter, parseAllDocuments, type Document } from "yaml";
import type { Logger } from "../log";
import type { ObjectSource } from "../state/types";
import { objectKey, type ManifestProblem, type ParsedObject, type ParseResult } from "./manifest-problem";
import { ENDPOINT_SLICE_FIELDS, readEndpointSlice } from "./manifest-endpointslices";
import { readAuthorizationPolicy, readPeerAuthentication } from "./manifest-policies";
import { describeValue, isMapping, ObjectReader, type DocumentContext, type FieldPath } from "./manifest-reader";
import { readNamespace, readPod, readService } from "./manifest-workloads";
import { findTooDeepNesting, MAX_YAML_NESTING, type TooDeepNesting } from "./yaml-nesting";

const CORE_API = ["v1"];
const SECURITY_API = ["security.istio.io/v1", "security.istio.io/v1beta1"];
const DISCOVERY_API = ["discovery.k8s.io/v1"];

/** Aliases allowed per document, to stop "billion laughs" expansion. */
const MAX_ALIAS_COUNT = 100;

/**
 * Parses one manifest file. A syntax error anywhere rejects the whole file (syntaxError is
 * true and no object is returned); otherwise each invalid object is rejected alone.
 * `firstDocument` numbers the documents from that index, for text that is part of a file.
 */
export function parseManifests(file: string, text: string, logger?: Logger, firstDocument = 0): ParseResult {
  const tooDeep = findTooDeepNesting(text);
  if (tooDeep !== undefined) return { objects: [], problems: [tooDeepProblem(file, tooDeep, firstDocument)], syntaxError: true };

  const lineCounter = new LineCounter();
  // logLevel "error": the package would print a process warning to stderr for each key that is a
  // collection, so that a file of such keys floods the log. The key is stringified either way.
  const documents = parseAllDocuments(text, { lineCounter, logLevel: "error" });
  const problems: ManifestProblem[] = [];
  const objects: ParsedObject[] = [];

  const syntaxProblems = findSyntaxErrors(file, documents as Document[], firstDocument);
  if (syntaxProblems.length > 0) return { objects, problems: syntaxProblems, syntaxError: true };

  let unreadable = false;
  (documents as Document[]).forEach((yaml, index) => {
    const context: DocumentContext = { file, document: firstDocument + index, yaml, lineCounter, problems };
    let value: unknown;
    try {
      value = yaml.toJS({ maxAliasCount: MAX_ALIAS_COUNT });
    } catch (error) {
      unreadable = true;
      problems.push({ ...documentProblem(context, `cannot be read: ${(error as Error).message}`), wholeFile: true });
      return;
    }
    readDocument(context, value, objects, logger);
  });
  return unreadable ? { objects: [], problems, syntaxError: true } : { objects, problems, syntaxError: false };
}

/**
 * Reads one object as the Kubernetes API returned it (already decoded JSON), with the same field
 * checks as a manifest. `source` names where it came from, such as "kubernetes:pods". Objects of
 * kinds the mesh does not use give no object and no problem.
 */
export function parseApiObject(value: unknown, source: ObjectSource, logger?: Logger): { object?: ParsedObject; problems: ManifestProblem[] } {
  const problems: ManifestProblem[] = [];
  const objects: ParsedObject[] = [];
  const context: DocumentContext = { file: source.file, document: source.document, problems };
  readObject(context, value, [], labelOf(String((value as { kind?: unknown })?.kind ?? "object"), (value as { metadata?: unknown })?.metadata) ?? "object", objects, logger);
  return { object: objects[0], problems };
}

function tooDeepProblem(file: string, tooDeep: TooDeepNesting, firstDocument: number): ManifestProblem {
  const index = firstDocument + tooDeep.document;
  return {
    file,
    document: index,
    line: tooDeep.line,
    object: `document ${index + 1}`,
    field: "",
    message: `invalid YAML: collections nest deeper than ${MAX_YAML_NESTING} levels (in flow style, or opened on one line); flatten the document (the file's last valid version stays in use)`,
    wholeFile: true,
  };
}

function findSyntaxErrors(file: string, documents: Document[], firstDocument: number): ManifestProblem[] {
  const problems: ManifestProblem[] = [];
  documents.forEach((yaml, position) => {
    const index = firstDocument + position;
    for (const error of yaml.errors) {
      problems.push({
        file,
        document: index,
        line: error.linePos?.[0].line,
        object: `document ${index + 1}`,
        field: "",
        message: `invalid YAML: ${error.message.split("\n")[0]}; fix the syntax (the file's last valid version stays in use)`,
        wholeFile: true,
      });
    }
  });
  return problems;
}

function readDocument(context: DocumentContext, value: unknown, objects: ParsedObject[], logger?: Logger): void {
  if (value === null || value === undefined) return;
  if (!isMapping(value)) {
    context.problems.push(documentProblem(context, `expected a Kubernetes object (a mapping with apiVersion and kind), found ${describeValue(value)}`));
    return;
  }
  if (value.kind !== "List") {
    readObject(context, value, [], `document ${context.document + 1}`, objects, logger);
    return;
  }
  const items = value.items;
  if (items === undefined || items === null) return;
  if (!Array.isArray(items)) {
    context.problems.push(documentProblem(context, `kind List needs a list in items, found ${describeValue(items)}`));
    return;
  }
  items.forEach((item, index) => {
    readObject(context, item, ["items", index], `document ${context.document + 1} item ${index + 1}`, objects, logger);
  });
}

function readObject(
  context: DocumentContext,
  value: unknown,
  basePath: FieldPath,
  label: string,
  objects: ParsedObject[],
  logger?: Logger,
): void {
  const reader = new ObjectReader(context, value, basePath, label);
  if (!isMapping(value)) {
    reader.reject([], `expected a Kubernetes object (a mapping with apiVersion and kind), found ${describeValue(value)}`);
    return;
  }
  const kind = reader.requiredString(["kind"]);
  const apiVersion = reader.requiredString(["apiVersion"]);
  if (kind === undefined || apiVersion === undefined) return;
  // Problems found before the metadata is checked still name the object, so that the last valid
  // version of an object whose apiVersion or kind was mistyped keeps serving.
  reader.label = labelOf(kind, value.metadata) ?? reader.label;

  const source: ObjectSource = { file: context.file, document: context.document };
  const parsed = readKnownKind(reader, kind, apiVersion, source);
  if (parsed === "unknown") {
    logger?.debug({ file: context.file, document: context.document, kind, apiVersion }, "skipped manifest of a kind the mesh does not use");
    return;
  }
  if (parsed !== undefined && !reader.failed) objects.push(parsed);
}

/** Reads an object of a kind the mesh uses; "unknown" for other kinds, undefined when rejected. */
function readKnownKind(reader: ObjectReader, kind: string, apiVersion: string, source: ObjectSource): ParsedObject | undefined | "unknown" {
  if (KNOWN_KINDS.includes(kind)) {
    // A misspelt "spec" would otherwise read as an empty spec: a policy without rules, or UNSET mTLS.
    reader.knownFields([], kind === "EndpointSlice" ? ENDPOINT_SLICE_FIELDS : ["apiVersion", "kind", "metadata", "spec", "status"]);
  } else {
    const meant = KNOWN_KINDS.find((known) => known.toLowerCase() === kind.toLowerCase());
    if (meant !== undefined) {
      reader.reject(["kind"], `invalid kind ${describeValue(kind)}; kinds are case-sensitive, write ${meant}`);
      return undefined;
    }
  }
  switch (kind) {
    case "Namespace":
    case "Pod":
    case "Service":
      if (!CORE_API.includes(apiVersion)) return "unknown";
      return readCoreKind(reader, kind, source);
    case "EndpointSlice": {
      if (!DISCOVERY_API.includes(apiVersion)) return "unknown";
      const value = readEndpointSlice(reader, source);
      return value && { kind, key: objectKey(kind, value.namespace, value.name), value };
    }
    case "AuthorizationPolicy":
    case "PeerAuthentication":
      // Any other group is rejected, not skipped: a mistyped group such as "security.isito.io/v1"
      // must not make a policy vanish unnoticed. Another project's kind of the same name (Linkerd's
      // policy.linkerd.io AuthorizationPolicy) is then reported too, which is harmless.
      if (!SECURITY_API.includes(apiVersion)) {
        reader.reject(["apiVersion"], `unsupported apiVersion ${describeValue(apiVersion)}; use ${SECURITY_API.join(" or ")}`);
        return undefined;
      }
      return readSecurityKind(reader, kind, source);
    default:
      // A misspelt policy kind would otherwise vanish without a word and take its policy away.
      if (apiVersion.startsWith("security.istio.io/") && !OTHER_SECURITY_KINDS.includes(kind)) {
        reader.reject(["kind"], `unknown kind ${describeValue(kind)} in security.istio.io; the agent reads AuthorizationPolicy and PeerAuthentication`);
        return undefined;
      }
      return "unknown";
  }
}

/** The kinds the agent reads; List documents are unpacked before. */
const KNOWN_KINDS: readonly string[] = ["Namespace", "Pod", "Service", "EndpointSlice", "AuthorizationPolicy", "PeerAuthentication", "List"];

/** Kinds of security.istio.io that apply to waypoints or gateways, which the agent skips. */
const OTHER_SECURITY_KINDS: readonly string[] = ["RequestAuthentication"];

/** Returns "Kind namespace/name" (or "Kind name" without a namespace) from raw metadata, when it has a name. */
function labelOf(kind: string, metadata: unknown): string | undefined {
  if (!isMapping(metadata) || typeof metadata.name !== "string") return undefined;
  if (kind === "Namespace") return `${kind} ${metadata.name}`;
  const namespace = typeof metadata.namespace === "string" && metadata.namespace !== "" ? metadata.namespace : "default";
  return `${kind} ${namespace}/${metadata.name}`;
}

function readCoreKind(reader: ObjectReader, kind: "Namespace" | "Pod" | "Service", source: ObjectSource): ParsedObject | undefined {
  if (kind === "Namespace") {
    const value = readNamespace(reader, source);
    return value && { kind, key: objectKey(kind, undefined, value.name), value };
  }
  if (kind === "Pod") {
    const value = readPod(reader, source);
    return value && { kind, key: objectKey(kind, value.namespace, value.name), value };
  }
  const value = readService(reader, source);
  return value && { kind, key: objectKey(kind, value.namespace, value.name), value };
}

function readSecurityKind(
  reader: ObjectReader,
  kind: "AuthorizationPolicy" | "PeerAuthentication",
  source: ObjectSource,
): ParsedObject | undefined {
  if (kind === "AuthorizationPolicy") {
    const value = readAuthorizationPolicy(reader, source);
    return value && { kind, key: objectKey(kind, value.namespace, value.name), value };
  }
  const value = readPeerAuthentication(reader, source);
  return value && { kind, key: objectKey(kind, value.namespace, value.name), value };
}

function documentProblem(context: DocumentContext, message: string): ManifestProblem {
  const range = context.yaml?.contents?.range;
  return {
    file: context.file,
    document: context.document,
    line: range && context.lineCounter ? context.lineCounter.linePos(range[0]).line : undefined,
    object: `document ${context.document + 1}`,
    field: "",
    message,
  };
}
