// Typed access to the fields of one Kubernetes object inside a parsed YAML document. Every
// failed check records a ManifestProblem with the field's line and marks the object rejected,
// so a parser reads on and reports every problem of an object at once.

import type { Document, LineCounter } from "yaml";
import { isNode } from "yaml";
import type { ManifestProblem } from "./manifest-problem";

export { parseCidr } from "../state/ip";

export type FieldPath = readonly (string | number)[];

/** The file and document an object comes from, and where its problems go. */
export interface DocumentContext {
  file: string;
  document: number;
  /** The YAML document and its line counter, for line numbers; absent for objects read from the Kubernetes API. */
  yaml?: Document;
  lineCounter?: LineCounter;
  problems: ManifestProblem[];
}

/** Formats a path as Kubernetes does in its messages: spec.containers[0].ports[1].name. */
export function formatPath(path: FieldPath): string {
  let text = "";
  for (const part of path) {
    if (typeof part === "number") text += `[${part}]`;
    else text += text === "" ? part : `.${part}`;
  }
  return text;
}

/** Returns a short, quoted rendering of a value for messages. */
export function describeValue(value: unknown): string {
  if (value === null || value === undefined) return "null";
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "a mapping";
  return String(value);
}

export function isMapping(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Parses a port given as a decimal string ("8080"); returns undefined unless it is 1-65535. */
export function parsePortString(text: string): number | undefined {
  if (!/^[0-9]{1,5}$/.test(text)) return undefined;
  const port = Number(text);
  return port >= 1 && port <= 65535 ? port : undefined;
}

export class ObjectReader {
  /** True once any check on this object failed: the object must not be served. */
  failed = false;
  /** The object's name in messages, e.g. "Pod demo/web"; set once the name is known. */
  label: string;

  constructor(
    private readonly context: DocumentContext,
    private readonly root: unknown,
    private readonly basePath: FieldPath,
    label: string,
  ) {
    this.label = label;
  }

  /** Returns the value at `path`, or undefined when any step is missing. */
  value(path: FieldPath): unknown {
    let current: unknown = this.root;
    for (const part of path) {
      if (typeof part === "number") {
        if (!Array.isArray(current)) return undefined;
        current = current[part];
      } else {
        if (!isMapping(current)) return undefined;
        current = current[part];
      }
    }
    return current;
  }

  /** Records a problem on `path` and marks the object rejected. */
  reject(path: FieldPath, message: string): void {
    this.failed = true;
    this.context.problems.push({
      file: this.context.file,
      document: this.context.document,
      line: this.lineOf(path),
      object: this.label,
      field: formatPath(path),
      message,
    });
  }

  /** Reads an optional string; rejects other types. */
  string(path: FieldPath): string | undefined {
    const value = this.value(path);
    if (value === undefined || value === null) return undefined;
    if (typeof value === "string") return value;
    this.reject(path, `expected a string, found ${describeValue(value)}; quote the value`);
    return undefined;
  }

  /** Reads a string that must be present and non-empty. */
  requiredString(path: FieldPath): string | undefined {
    const value = this.value(path);
    if (value === undefined || value === null || value === "") {
      this.reject(path, "missing value; set it to a non-empty string");
      return undefined;
    }
    return this.string(path);
  }

  /** Reads an optional boolean, `fallback` when absent. */
  boolean(path: FieldPath, fallback: boolean): boolean {
    const value = this.value(path);
    if (value === undefined || value === null) return fallback;
    if (typeof value === "boolean") return value;
    this.reject(path, `expected true or false, found ${describeValue(value)}`);
    return fallback;
  }

  /** Reads a port given as an integer 1-65535. */
  port(path: FieldPath): number | undefined {
    const value = this.value(path);
    if (typeof value === "number" && Number.isInteger(value) && value >= 1 && value <= 65535) return value;
    if (value === undefined || value === null) {
      this.reject(path, "missing port; set an integer from 1 to 65535");
    } else {
      this.reject(path, `invalid port ${describeValue(value)}; use an integer from 1 to 65535`);
    }
    return undefined;
  }

  /** Reads an optional list; rejects other types. */
  list(path: FieldPath): unknown[] | undefined {
    const value = this.value(path);
    if (value === undefined || value === null) return undefined;
    if (Array.isArray(value)) return value;
    this.reject(path, `expected a list, found ${describeValue(value)}`);
    return undefined;
  }

  /** Reads an optional mapping; rejects other types. */
  mapping(path: FieldPath): Record<string, unknown> | undefined {
    const value = this.value(path);
    if (value === undefined || value === null) return undefined;
    if (isMapping(value)) return value;
    this.reject(path, `expected a mapping, found ${describeValue(value)}`);
    return undefined;
  }

  /** Reads an optional list of strings. */
  stringList(path: FieldPath): string[] | undefined {
    const items = this.list(path);
    if (items === undefined) return undefined;
    const strings: string[] = [];
    items.forEach((item, index) => {
      if (typeof item === "string") strings.push(item);
      else this.reject([...path, index], `expected a string, found ${describeValue(item)}; quote the value`);
    });
    return strings;
  }

  /** Reads a string-to-string mapping such as labels or a selector; absent means empty. */
  stringMap(path: FieldPath): Record<string, string> {
    const mapping = this.mapping(path);
    const result: Record<string, string> = {};
    if (mapping === undefined) return result;
    for (const [key, value] of Object.entries(mapping)) {
      if (typeof value === "string") {
        result[key] = value;
      } else {
        this.reject([...path, key], `expected a string value, found ${describeValue(value)}; quote the value`);
      }
    }
    return result;
  }

  /** Rejects every key of the mapping at `path` that is not in `known`, so a misspelt field is not silently ignored. */
  knownFields(path: FieldPath, known: readonly string[]): void {
    const mapping = this.value(path);
    if (!isMapping(mapping)) return;
    for (const key of Object.keys(mapping)) {
      if (!known.includes(key)) {
        this.reject([...path, key], `unknown field; expected one of ${known.join(", ")}`);
      }
    }
  }

  /** Returns the one-based line of `path`, or of its nearest existing parent. */
  private lineOf(path: FieldPath): number | undefined {
    const full = [...this.basePath, ...path];
    for (let length = full.length; length >= 0; length -= 1) {
      const node = this.context.yaml?.getIn(full.slice(0, length), true);
      if (isNode(node) && node.range && this.context.lineCounter) return this.context.lineCounter.linePos(node.range[0]).line;
    }
    return undefined;
  }
}
