// The options file of `ambient-agent run --config FILE`: a YAML mapping whose keys are the long
// option names without the leading dashes, for example
//
//   kubernetes: true
//   excluded-namespaces: [kube-system, ambient-agent]
//   cni-timeout: 30
//
// Each entry becomes command-line tokens (`--cni-timeout=30`) placed before the real command
// line, so the file's values go through the same parser and checks as the command line's. A
// switch set to false gives its `no-` twin when the table has one (`transparent-source: false`
// gives `--no-transparent-source`), and nothing otherwise, so the option's default applies.

import fs from "node:fs";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { parseDocument } from "yaml";
import { findTooDeepNesting, MAX_YAML_NESTING } from "../discovery/yaml-nesting";

/** The option table of node:util parseArgs. */
export type OptionTable = NonNullable<ParseArgsConfig["options"]>;

/** The option that names the file, which the file itself may not set. */
export const CONFIG_OPTION = "config";

/** A problem with the options file; its message names the file and, where there is one, the key. */
export class ConfigFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigFileError";
  }
}

/**
 * Returns argv with the tokens of the `--config` file in front of it, or argv unchanged without
 * `--config`. An option given on the command line replaces the file's value entirely, even for
 * an option that repeats. A switch and its `no-` form (transparent-source, no-transparent-source)
 * count as one option, which the file may set only once. `commaLists` names the options that take
 * one comma-separated value, which the file may give as a list. Throws ConfigFileError for a file
 * that cannot be read or contains a key or value that `table` does not accept, and parseArgs' own
 * error for an invalid command line.
 */
export function withConfigFile(argv: string[], table: OptionTable, commaLists: ReadonlySet<string> = new Set()): string[] {
  const { values, tokens } = parseArgs({ args: argv, options: table, strict: true, tokens: true });
  const file = values[CONFIG_OPTION];
  if (typeof file !== "string") return argv;
  if (tokens.filter((token) => token.kind === "option" && token.name === CONFIG_OPTION).length > 1) {
    throw new ConfigFileError(`--${CONFIG_OPTION} is given more than once: give one config file`);
  }
  const given = new Set(tokens.flatMap((token) => (token.kind === "option" ? [token.name] : [])));
  const fileArgs: string[] = [];
  const entries = readConfigFile(file);
  for (const [key, value] of Object.entries(entries)) {
    if (key === CONFIG_OPTION) throw new ConfigFileError(`the config file ${file} sets "${CONFIG_OPTION}": a config file cannot name another one; remove the key`);
    const option = optionOf(file, key, table);
    const twin = twinOf(key, table);
    if (twin !== undefined && Object.hasOwn(entries, twin) && key.startsWith("no-")) {
      throw new ConfigFileError(`the config file ${file} sets both "${twin}" and "${key}", which are one switch: keep one of them`);
    }
    if (isGiven(key, given)) continue;
    // A loop, not push(...): a list of many thousand entries would overflow the call's arguments.
    for (const token of optionTokens(file, key, option, value, table, commaLists)) fileArgs.push(token);
  }
  return [...fileArgs, ...argv];
}

/** Tells whether the command line gave `key`, or the other form of a switch with a `no-` twin. */
function isGiven(key: string, given: ReadonlySet<string>): boolean {
  if (given.has(key) || given.has(`no-${key}`)) return true;
  return key.startsWith("no-") && given.has(key.slice("no-".length));
}

/**
 * Returns the other form of a switch that has a `no-` twin in `table` (transparent-source and
 * no-transparent-source), or undefined for any other key.
 */
function twinOf(key: string, table: OptionTable): string | undefined {
  const twin = key.startsWith("no-") ? key.slice("no-".length) : `no-${key}`;
  const isSwitch = (name: string): boolean => Object.hasOwn(table, name) && table[name].type === "boolean";
  return isSwitch(key) && isSwitch(twin) ? twin : undefined;
}

/** Reads the file as one YAML document holding a mapping; an empty file is an empty mapping. */
function readConfigFile(file: string): Record<string, unknown> {
  const text = readText(file);
  const tooDeep = findTooDeepNesting(text);
  if (tooDeep !== undefined) {
    throw new ConfigFileError(`invalid YAML in the config file ${file}: line ${tooDeep.line}: collections nest deeper than ${MAX_YAML_NESTING} levels (in flow style, or opened on one line); an option's value is a string, a number, true, false or a list`);
  }
  // merge: the YAML 1.1 merge key "<<", which Kubernetes users write in their manifests.
  // logLevel "error": no process warning on stderr for a key that is a collection (it is stringified, then rejected as unknown).
  const document = parseDocument(text, { prettyErrors: true, merge: true, logLevel: "error" });
  const problem = document.errors[0] ?? document.warnings[0];
  if (problem !== undefined) throw new ConfigFileError(`invalid YAML in the config file ${file}: ${problem.message}`);
  let content: unknown;
  try {
    // toJS refuses documents whose aliases would expand without bound ("billion laughs").
    content = document.toJS();
  } catch (error) {
    throw new ConfigFileError(`invalid YAML in the config file ${file}: ${(error as Error).message}`);
  }
  if (content === null || content === undefined) return {};
  if (typeof content !== "object" || Array.isArray(content)) {
    throw new ConfigFileError(`the config file ${file} contains ${describe(content)}, not a mapping: write a mapping of option names to values, for example "log-level: info"`);
  }
  return content as Record<string, unknown>;
}

/** The maximum config file size in bytes, because a ConfigMap contains at most 1 MiB of data. */
const MAX_CONFIG_BYTES = 1024 * 1024;

/** Reads the file as UTF-8, at most MAX_CONFIG_BYTES, reading no further (a device such as /dev/zero has no size). */
function readText(file: string): string {
  const buffer = Buffer.alloc(MAX_CONFIG_BYTES + 1);
  let length = 0;
  try {
    const fd = fs.openSync(file, "r");
    try {
      for (let read = -1; read !== 0 && length < buffer.length; length += read) {
        read = fs.readSync(fd, buffer, length, buffer.length - length, null);
      }
    } finally {
      fs.closeSync(fd);
    }
  } catch (error) {
    throw new ConfigFileError(`cannot read the config file ${file}: ${(error as Error).message}`);
  }
  if (length > MAX_CONFIG_BYTES) throw new ConfigFileError(`the config file ${file} is larger than ${MAX_CONFIG_BYTES} bytes: a config file contains options, not data`);
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(buffer.subarray(0, length));
  } catch {
    throw new ConfigFileError(`the config file ${file} is not valid UTF-8: save it as UTF-8`);
  }
}

/** Returns the option that a key of the file names. Throws ConfigFileError for an unknown key. */
function optionOf(file: string, key: string, table: OptionTable): OptionTable[string] {
  // Object.hasOwn, so that keys such as __proto__ or toString are unknown rather than inherited.
  if (!Object.hasOwn(table, key)) {
    throw new ConfigFileError(`unknown key "${key}" in the config file ${file}: keys are the long option names of ambient-agent run without the leading "--" (see ambient-agent run --help)`);
  }
  return table[key];
}

/** Converts one entry of the file into the tokens that the command line would carry. */
function optionTokens(file: string, key: string, option: OptionTable[string], value: unknown, table: OptionTable, commaLists: ReadonlySet<string>): string[] {
  if (option.type === "boolean") {
    if (typeof value !== "boolean") throw new ConfigFileError(`invalid value of "${key}" in the config file ${file}: ${describe(value)}, where the switch takes true or false`);
    if (value) return [`--${key}`];
    const twin = twinOf(key, table);
    return twin === undefined ? [] : [`--${twin}`];
  }
  const items = Array.isArray(value) ? value : [value];
  if (Array.isArray(value) && !option.multiple && !commaLists.has(key)) {
    throw new ConfigFileError(`invalid value of "${key}" in the config file ${file}: a list, where the option takes one value`);
  }
  const texts = items.map((item) => scalarText(file, key, item));
  if (option.multiple) return texts.map((text) => `--${key}=${text}`);
  // An empty list gives nothing, as false does for a switch: the option's default applies.
  return texts.length === 0 ? [] : [`--${key}=${texts.join(",")}`];
}

/** Returns a string or number value as the command line would carry it. */
function scalarText(file: string, key: string, value: unknown): string {
  if (typeof value === "string" && value !== "") return value;
  if (typeof value === "number" && Number.isFinite(value)) return String(value);
  throw new ConfigFileError(`invalid value of "${key}" in the config file ${file}: ${describe(value)}, where the option takes a string or a number`);
}

/** Describes a YAML value by its kind, for error messages. */
function describe(value: unknown): string {
  if (value === null || value === undefined) return "an empty value";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "a mapping";
  if (value === "") return "an empty string";
  if (typeof value === "string") return `the string ${JSON.stringify(value)}`;
  return `${typeof value === "number" ? "the number" : "the value"} ${String(value)}`;
}
