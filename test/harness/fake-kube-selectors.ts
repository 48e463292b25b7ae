// Label and field selectors of the fake Kubernetes API server, parsed from the labelSelector and
// fieldSelector query parameters with the grammar and matching rules of the real API server.

/** A selector that the request wrote badly, or a field label the resource does not support; the server returns 400. */
export class SelectorError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SelectorError";
  }
}

type LabelOperator = "=" | "!=" | "in" | "notin" | "exists" | "!" | "gt" | "lt";

interface LabelRequirement {
  key: string;
  operator: LabelOperator;
  values: string[];
}

interface FieldRequirement {
  field: string;
  operator: "=" | "!=";
  value: string;
}

/** Reads one object's value for a field label, "" when the object has no such field. */
export type FieldReader = (object: KubeObject) => string;

/** An API object as JSON: apiVersion, kind, metadata and whatever else the kind carries. */
export interface KubeObject {
  apiVersion?: string;
  kind?: string;
  metadata?: {
    name?: string;
    namespace?: string;
    labels?: Record<string, string>;
    [key: string]: unknown;
  };
  [key: string]: unknown;
}

/** A parsed labelSelector plus fieldSelector; the empty selector matches every object. */
export interface Selector {
  matches(object: KubeObject): boolean;
}

// A label key is an optional DNS subdomain prefix and "/", then a name of at most 63 characters.
// A label value is empty or follows the same name rule.
const NAME = /^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$/;
const PREFIX = /^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/;

function checkLabelKey(key: string): void {
  const slash = key.indexOf("/");
  const prefix = slash >= 0 ? key.slice(0, slash) : undefined;
  const name = slash >= 0 ? key.slice(slash + 1) : key;
  if ((prefix !== undefined && !PREFIX.test(prefix)) || !NAME.test(name)) {
    throw new SelectorError(`invalid label key "${key}": a key is an optional DNS subdomain and "/", then 1 to 63 letters, digits, "-", "_" or "."`);
  }
}

function checkLabelValue(value: string): void {
  if (value !== "" && !NAME.test(value)) {
    throw new SelectorError(`invalid label value "${value}": a value is empty or 1 to 63 letters, digits, "-", "_" or "."`);
  }
}

/** Splits at commas that are outside parentheses, so that "a in (x,y),b" gives two requirements. */
function splitRequirements(text: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < text.length; i++) {
    if (text[i] === "(") depth++;
    if (text[i] === ")") depth--;
    if (text[i] === "," && depth === 0) {
      parts.push(text.slice(start, i));
      start = i + 1;
    }
  }
  parts.push(text.slice(start));
  return parts.map((part) => part.trim());
}

const SET_REQUIREMENT = /^(\S+)\s+(in|notin)\s*\((.*)\)$/;
const COMPARISON = /^([^=!<>\s]+)\s*(==|=|!=|>|<)\s*(.*)$/;

function parseLabelRequirement(text: string): LabelRequirement {
  if (text === "") throw new SelectorError("invalid label selector: empty requirement between commas");

  const set = SET_REQUIREMENT.exec(text);
  if (set) {
    const values = set[3].split(",").map((value) => value.trim());
    if (values.length === 1 && values[0] === "") throw new SelectorError(`invalid label selector "${text}": "${set[2]}" needs at least one value`);
    checkLabelKey(set[1]);
    values.forEach(checkLabelValue);
    return { key: set[1], operator: set[2] as "in" | "notin", values };
  }

  const comparison = COMPARISON.exec(text);
  if (comparison) return parseComparison(text, comparison);

  const negated = text.startsWith("!");
  const key = negated ? text.slice(1).trim() : text;
  checkLabelKey(key);
  return { key, operator: negated ? "!" : "exists", values: [] };
}

function parseComparison(text: string, match: RegExpExecArray): LabelRequirement {
  const [, key, operator, rawValue] = match;
  const value = rawValue.trim();
  checkLabelKey(key);
  if (operator === ">" || operator === "<") {
    if (!/^-?\d+$/.test(value)) throw new SelectorError(`invalid label selector "${text}": "${operator}" needs an integer value`);
    return { key, operator: operator === ">" ? "gt" : "lt", values: [value] };
  }
  checkLabelValue(value);
  return { key, operator: operator === "!=" ? "!=" : "=", values: [value] };
}

function labelMatches(requirement: LabelRequirement, labels: Record<string, string>): boolean {
  const present = Object.prototype.hasOwnProperty.call(labels, requirement.key);
  const value = labels[requirement.key];
  switch (requirement.operator) {
    case "=":
    case "in":
      return present && requirement.values.includes(value);
    case "!=":
    case "notin":
      return !present || !requirement.values.includes(value);
    case "exists":
      return present;
    case "!":
      return !present;
    case "gt":
    case "lt":
      return present && /^-?\d+$/.test(value) && compareIntegers(requirement.operator, Number(value), Number(requirement.values[0]));
  }
}

function compareIntegers(operator: "gt" | "lt", actual: number, limit: number): boolean {
  return operator === "gt" ? actual > limit : actual < limit;
}

/** Parses a labelSelector query value. Throws SelectorError when it is malformed. */
export function parseLabelSelector(text: string): LabelRequirement[] {
  if (text.trim() === "") return [];
  return splitRequirements(text).map(parseLabelRequirement);
}

/** Splits a field selector at commas that no backslash escapes, and undoes the escapes later. */
function splitEscaped(text: string, separator: string): string[] {
  const parts: string[] = [];
  let current = "";
  for (let i = 0; i < text.length; i++) {
    if (text[i] === "\\" && i + 1 < text.length) {
      current += text[i] + text[i + 1];
      i++;
    } else if (text[i] === separator) {
      parts.push(current);
      current = "";
    } else {
      current += text[i];
    }
  }
  parts.push(current);
  return parts;
}

function unescapeFieldValue(value: string): string {
  return value.replace(/\\(.)/g, "$1");
}

function parseFieldRequirement(text: string): FieldRequirement {
  // The first unescaped "!=", "==" or "=" separates the field label from the value.
  for (let i = 0; i < text.length; i++) {
    if (text[i] === "\\") {
      i++;
      continue;
    }
    if (text.startsWith("!=", i)) return fieldRequirement(text.slice(0, i), "!=", text.slice(i + 2));
    if (text.startsWith("==", i)) return fieldRequirement(text.slice(0, i), "=", text.slice(i + 2));
    if (text[i] === "=") return fieldRequirement(text.slice(0, i), "=", text.slice(i + 1));
  }
  throw new SelectorError(`invalid field selector "${text}": expected field=value, field==value or field!=value`);
}

function fieldRequirement(field: string, operator: "=" | "!=", value: string): FieldRequirement {
  if (field.trim() === "") throw new SelectorError(`invalid field selector: empty field label before "${operator}"`);
  return { field: field.trim(), operator, value: unescapeFieldValue(value) };
}

/**
 * Parses a fieldSelector query value against the field labels a resource supports. Throws
 * SelectorError for a malformed selector or an unsupported field label.
 */
export function parseFieldSelector(text: string, fields: ReadonlyMap<string, FieldReader>): FieldRequirement[] {
  if (text.trim() === "") return [];
  const requirements = splitEscaped(text, ",").map(parseFieldRequirement);
  for (const requirement of requirements) {
    if (!fields.has(requirement.field)) throw new SelectorError(`field label not supported: ${requirement.field}`);
  }
  return requirements;
}

/** Builds the selector of a list or watch request from its query parameters; throws SelectorError. */
export function parseSelector(labelSelector: string, fieldSelector: string, fields: ReadonlyMap<string, FieldReader>): Selector {
  const labelRequirements = parseLabelSelector(labelSelector);
  const fieldRequirements = parseFieldSelector(fieldSelector, fields);
  return {
    matches(object: KubeObject): boolean {
      const labels = object.metadata?.labels ?? {};
      if (!labelRequirements.every((requirement) => labelMatches(requirement, labels))) return false;
      return fieldRequirements.every((requirement) => {
        const actual = fields.get(requirement.field)!(object);
        return requirement.operator === "=" ? actual === requirement.value : actual !== requirement.value;
      });
    },
  };
}
