// The output of manifest parsing: accepted objects and the problems that rejected others. It is
// kept apart from the parser so that diagnostics can format problems without parsing.

import type {
  AuthorizationPolicy,
  EndpointSlice,
  Namespace,
  PeerAuthentication,
  Service,
  Workload,
} from "../state/types";

/** One rejected object, field or file, with enough context to find and fix it. */
export interface ManifestProblem {
  file: string;
  /** Zero-based index of the YAML document inside the file. */
  document: number;
  /** One-based line of the field (or of the nearest enclosing node that exists). */
  line?: number;
  /** The object, e.g. "Pod demo/web", or "document 3" when its kind or name is unknown. */
  object: string;
  /** Dotted path of the field, e.g. "status.podIP"; empty when the whole document or file is at fault. */
  field: string;
  message: string;
  /** Set when the problem rejects the whole file (a syntax error), whose last valid objects then keep serving. */
  wholeFile?: true;
}

/** An accepted object; `key` ("Pod demo/web", "Namespace demo") identifies it across files and reads. */
export type ParsedObject =
  | { kind: "Namespace"; key: string; value: Namespace }
  | { kind: "Pod"; key: string; value: Workload }
  | { kind: "Service"; key: string; value: Service }
  | { kind: "AuthorizationPolicy"; key: string; value: AuthorizationPolicy }
  | { kind: "PeerAuthentication"; key: string; value: PeerAuthentication }
  | { kind: "EndpointSlice"; key: string; value: EndpointSlice };

export type ObjectKind = ParsedObject["kind"];

export interface ParseResult {
  objects: ParsedObject[];
  problems: ManifestProblem[];
  /** True when the file is not valid YAML or JSON: then no object of it is returned. */
  syntaxError: boolean;
}

/** Returns the key of an object: "Namespace demo" for cluster-scoped kinds, "Pod demo/web" otherwise. */
export function objectKey(kind: ObjectKind, namespace: string | undefined, name: string): string {
  return namespace === undefined ? `${kind} ${name}` : `${kind} ${namespace}/${name}`;
}

/** Formats a problem as one line: "file:line: object: field: message". */
export function formatManifestProblem(problem: ManifestProblem): string {
  const location = problem.line === undefined ? problem.file : `${problem.file}:${problem.line}`;
  const field = problem.field === "" ? "" : ` ${problem.field}:`;
  return `${location}: ${problem.object}:${field} ${problem.message}`;
}
