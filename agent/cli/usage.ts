// Usage errors of agentctl: node:util parseArgs errors reworded to name the option and the fix, and
// the short text printed with a usage error in place of the whole help.

import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "./admin-client";

export const HELP_HINT = "run agentctl --help for every command and option";

/** Column where the description of a command starts in the help text. */
const DESCRIPTION_COLUMN = 21;

/**
 * Runs parseArgs with `config`. An unknown option, a missing or misplaced value or a stray argument
 * becomes a UsageError that names the option and what to write instead.
 */
export function parseOptions<T extends ParseArgsConfig>(config: T): ReturnType<typeof parseArgs<T>> {
  try {
    return parseArgs(config);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (typeof code !== "string" || !code.startsWith("ERR_PARSE_ARGS_")) throw error;
    throw new UsageError(parseErrorMessage(error as NodeJS.ErrnoException, config));
  }
}

/** Rewords a parseArgs error, whose message names the option in quotes, such as "Unknown option '--bogus'". */
function parseErrorMessage(error: NodeJS.ErrnoException, config: ParseArgsConfig): string {
  const options = config.options ?? {};
  const known = optionList(options);
  const quoted = /'([^']*)'/.exec(error.message)?.[1] ?? "";
  // "-o, --output <value>" names the short and the long form: the one written on the command line comes first.
  const option = quoted.split(/[ ,]/)[0];
  const args = config.args ?? [];
  if (error.code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") {
    return known === "" ? `unknown option ${option}; this command takes no options` : `unknown option ${option}; the options are ${known}`;
  }
  if (error.code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL") {
    return `unexpected argument ${JSON.stringify(option)}; this command takes ${known === "" ? "no arguments" : `options only: ${known}`}`;
  }
  if (/does not take an argument/.test(error.message)) {
    const written = args.find((arg) => arg.startsWith(`${option}=`)) ?? option;
    return `${option} takes no value, but got ${JSON.stringify(written)}; write ${option} alone`;
  }
  if (/argument is ambiguous/.test(error.message)) {
    const value = args[args.indexOf(option) + 1] ?? "";
    const long = longName(option, options);
    return `the value ${JSON.stringify(value)} of ${option} starts with "-" and reads as an option; write ${long}=${value} to pass it as the value`;
  }
  if (/argument missing/.test(error.message)) {
    return `missing value of ${option}; write ${option} VALUE`;
  }
  return error.message;
}

/** Lists the options as the help writes them: -o for an option with a short form, --name otherwise. */
function optionList(options: NonNullable<ParseArgsConfig["options"]>): string {
  return Object.entries(options)
    .map(([name, option]) => (option.short === undefined ? `--${name}` : `-${option.short}`))
    .join(", ");
}

/** Returns --output for -o, or `option` itself when it is a long form already. */
function longName(option: string, options: NonNullable<ParseArgsConfig["options"]>): string {
  if (option.startsWith("--")) return option;
  const entry = Object.entries(options).find(([, config]) => `-${config.short}` === option);
  return entry === undefined ? option : `--${entry[0]}`;
}

/**
 * Returns the synopsis lines of the commands in `usage` whose name starts with `words`, such as
 * ["ca"] or ["authz", "check"], each prefixed by "usage: agentctl". The descriptions are left out.
 */
export function synopsisOf(usage: string, words: readonly string[]): string[] {
  if (words.length === 0) return [];
  const lines = usage.split("\n");
  const start = new RegExp(`^  ${words.map(escapeRegExp).join(" ")}(?= |$)`);
  const synopsis: string[] = [];
  for (let index = 0; index < lines.length; index++) {
    if (!start.test(lines[index])) continue;
    synopsis.push(`usage: agentctl ${lines[index].trim()}`);
    // A long synopsis continues on lines indented less than the description.
    for (let next = index + 1; next < lines.length; next++) {
      const indent = lines[next].length - lines[next].trimStart().length;
      if (indent <= 2 || indent >= DESCRIPTION_COLUMN) break;
      synopsis.push(`       ${lines[next].trim()}`);
    }
  }
  return synopsis;
}

/** Formats a usage error: the message prefixed by the command, its synopsis, and where the full help is. */
export function usageErrorText(usage: string, words: readonly string[], message: string): string {
  const prefix = words.length === 0 ? "agentctl" : `agentctl ${words.join(" ")}`;
  return [`${prefix}: ${message}`, ...synopsisOf(usage, words), HELP_HINT].join("\n") + "\n";
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
