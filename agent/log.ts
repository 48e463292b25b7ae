import pino from "pino";

import type { LogLevelsView } from "./admin/views";
import { TextDestination, type LogFormat } from "./log-format";
import { LOG_LEVELS, type LogLevel } from "./log-level";

export type Logger = pino.Logger;

/** Bytes of log lines collected before one write(2) to stderr. */
const LOG_BATCH_BYTES = 4096;
/** A line waits at most this long in the batch when fewer than LOG_BATCH_BYTES are logged. */
const LOG_FLUSH_INTERVAL_MS = 100;

export { LOG_LEVELS, type LogLevel } from "./log-level";

/**
 * The values of the `component` binding of the agent's child loggers. "agent" is the process
 * logger itself, whose lines carry no component. "proxy" is the per-workload logger that the
 * inbound, outbound and pool loggers are children of, and "access" carries the connection
 * complete and connection failed lines.
 */
export const LOG_COMPONENTS: readonly string[] = [
  "access",
  "admin",
  "agent",
  "annotations",
  "audit",
  "capture",
  "certs",
  "cni",
  "enroll",
  "handover",
  "hbone-pool",
  "inbound",
  "inbound-plaintext",
  "istio-ca",
  "kubernetes",
  "limits",
  "manifests",
  "metrics",
  "netns",
  "outbound",
  "proxy",
  "readiness",
  "trust-bundle",
];

/** The component of the process logger, whose lines carry no `component` binding. */
const ROOT_COMPONENT = "agent";

/** A parsed level setting: an optional level for every component, and levels of single components. */
export interface LogLevelSpec {
  default?: LogLevel;
  components: Record<string, LogLevel>;
}

export class InvalidLogLevelError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "InvalidLogLevelError";
  }
}

/**
 * Parses "info", "cni=debug,access=warn" or "info,cni:debug": comma-separated entries, each a level
 * for every component or COMPONENT=LEVEL (COMPONENT:LEVEL is the same). `components` lists the
 * valid component names.
 */
export function parseLogLevels(text: string, components: readonly string[] = LOG_COMPONENTS): LogLevelSpec {
  const spec: LogLevelSpec = { components: {} };
  const entries = text.split(",").map((entry) => entry.trim());
  if (entries.every((entry) => entry === "")) {
    throw new InvalidLogLevelError(`empty log level "${text}"; pass a level (${LOG_LEVELS.join(", ")}) or COMPONENT=LEVEL pairs, for example info,cni=debug`);
  }
  for (const entry of entries) {
    if (entry === "") continue;
    const separator = entry.search(/[=:]/);
    if (separator === -1) {
      spec.default = checkLevel(entry);
      continue;
    }
    const component = entry.slice(0, separator).trim();
    if (!components.includes(component)) {
      throw new InvalidLogLevelError(`unknown log component "${component}" in "${entry}"; valid components: ${[...components].sort().join(", ")}`);
    }
    spec.components[component] = checkLevel(entry.slice(separator + 1).trim());
  }
  return spec;
}

function checkLevel(level: string): LogLevel {
  if ((LOG_LEVELS as readonly string[]).includes(level)) return level as LogLevel;
  throw new InvalidLogLevelError(`unknown log level "${level}"; valid levels: ${LOG_LEVELS.join(", ")}`);
}

/** The LogLevels of each root logger made by createLevelledLogger. */
const levelsOfRoot = new WeakMap<Logger, LogLevels>();

/** The last `component` binding in a piece of pino's serialized bindings (",\"key\":value,..."). */
const COMPONENT_BINDING = /"component":"([^"\\]*)"/g;

/**
 * The log level of each component of one logger tree. A pino child is created with
 * Object.create(parent) and, without a level option, keeps no level of its own, so it follows its
 * parent's level through the prototype chain. The tree's onChild hook therefore registers only
 * the children that bind a new `component` (held by WeakRef, so a logger no longer used is
 * collected), and a change sets pino's level on those and the root. A disabled level's method
 * stays pino's shared no-op function, and no property is added to pino's objects, so a log call
 * costs what it did before. A disabled debug() call took 1.3 ns with and without this hook (5e7
 * calls, Node.js 20, a 2-vCPU Xeon VM). The hook adds about 0.1 us to each child(), and about
 * 2.5 us to a child() that binds a component. Dropping the parent's component from such a child's
 * bindings took about 0.4 us more (withLastComponentOnly on 90 bytes of bindings, 2e5 calls, the
 * same VM type).
 */
export class LogLevels {
  readonly #startup: LogLevelSpec;
  #defaultLevel: LogLevel;
  #components = new Map<string, LogLevel>();
  /** The root and every component logger, parents before their children. */
  readonly #loggers = new Set<WeakRef<Logger>>();
  readonly #finalizer = new FinalizationRegistry<WeakRef<Logger>>((ref) => this.#loggers.delete(ref));
  /** The components of each registered logger, outermost first. The innermost one that has a level set decides. */
  readonly #chainOf = new WeakMap<Logger, readonly string[]>();
  /** Every known component with the longest chain met for it, so that view() reports inherited levels. */
  readonly #knownChains = new Map<string, readonly string[]>(
    LOG_COMPONENTS.map((component) => [component, component === ROOT_COMPONENT ? [ROOT_COMPONENT] : [ROOT_COMPONENT, component]]),
  );

  constructor(startup: LogLevelSpec = { components: {} }) {
    this.#startup = { default: startup.default ?? "info", components: { ...startup.components } };
    this.#defaultLevel = this.#startup.default!;
    this.#components = new Map(Object.entries(this.#startup.components));
  }

  /** Lists every valid component name, sorted. */
  components(): string[] {
    return [...this.#knownChains.keys()].sort();
  }

  /** Returns the level that applies to a logger of these components, outermost first. */
  levelOf(chain: readonly string[]): LogLevel {
    for (let index = chain.length - 1; index >= 0; index--) {
      const level = this.#components.get(chain[index]);
      if (level !== undefined) return level;
    }
    return this.#defaultLevel;
  }

  /** Registers the root logger of the tree; pass onChild as pino's onChild option. */
  attach(root: Logger): void {
    levelsOfRoot.set(root, this);
    this.#register(root, [ROOT_COMPONENT]);
  }

  /**
   * The hook for pino's onChild option. A child that binds a component also gets its bindings
   * rewritten to keep only that component, so each line has one `component` key, the innermost.
   */
  readonly onChild = (child: Logger): void => {
    const parent = Object.getPrototypeOf(child) as Logger;
    const added = chindingsOf(child).slice(chindingsOf(parent).length);
    let component: string | undefined;
    for (const match of added.matchAll(COMPONENT_BINDING)) component = match[1];
    if (component === undefined) return;
    setChindings(child, withLastComponentOnly(chindingsOf(child)));
    // The access log has its own level, whichever proxy logger writes it, as ztunnel's access target does.
    const parentChain = INDEPENDENT_COMPONENTS.has(component) ? [ROOT_COMPONENT] : this.#chainAbove(parent);
    if (component === parentChain[parentChain.length - 1]) return;
    const chain = [...parentChain, component];
    const known = this.#knownChains.get(component);
    if (known === undefined || known.length < chain.length) this.#knownChains.set(component, chain);
    this.#register(child, chain);
  };

  /**
   * Applies a parsed setting: a level for every component first clears the levels of single
   * components. Returns the changes as "component: before -> after" lines.
   */
  set(spec: LogLevelSpec): string[] {
    const before = this.view();
    if (spec.default !== undefined) {
      this.#defaultLevel = spec.default;
      this.#components.clear();
    }
    for (const [component, level] of Object.entries(spec.components)) this.#components.set(component, level);
    return this.#apply(before);
  }

  /** Returns to the start-up levels, and returns the changes as set() does. */
  reset(): string[] {
    const before = this.view();
    this.#defaultLevel = this.#startup.default!;
    this.#components = new Map(Object.entries(this.#startup.components));
    return this.#apply(before);
  }

  view(): LogLevelsView {
    const components: Record<string, string> = {};
    for (const component of this.components()) components[component] = this.levelOf(this.#knownChains.get(component)!);
    return { default: this.#defaultLevel, components };
  }

  /** Counts the registered loggers not yet collected. */
  liveLoggers(): number {
    let live = 0;
    for (const ref of this.#loggers) if (ref.deref() !== undefined) live++;
    return live;
  }

  /** Returns the chain of the nearest registered logger at or above `logger`. */
  #chainAbove(logger: Logger): readonly string[] {
    for (let current: Logger | null = logger; current !== null; current = Object.getPrototypeOf(current) as Logger | null) {
      const chain = this.#chainOf.get(current);
      if (chain !== undefined) return chain;
    }
    return [ROOT_COMPONENT];
  }

  #register(logger: Logger, chain: readonly string[]): void {
    this.#chainOf.set(logger, chain);
    const level = this.levelOf(chain);
    if (logger.level !== level) logger.level = level;
    const ref = new WeakRef(logger);
    this.#loggers.add(ref);
    this.#finalizer.register(logger, ref);
  }

  #apply(before: LogLevelsView): string[] {
    // A Set iterates in insertion order, so a parent is set before the children that inherit from it.
    for (const ref of this.#loggers) {
      const logger = ref.deref();
      if (logger === undefined) {
        this.#loggers.delete(ref);
        continue;
      }
      const level = this.levelOf(this.#chainOf.get(logger)!);
      if (logger.level !== level) logger.level = level;
    }
    const after = this.view();
    return Object.keys(after.components)
      .filter((component) => before.components[component] !== after.components[component])
      .map((component) => `${component}: ${before.components[component]} -> ${after.components[component]}`);
  }
}

/** Returns pino's serialized bindings of a logger, which a child extends at the end. */
function chindingsOf(logger: Logger): string {
  return (logger as unknown as Record<symbol, string | undefined>)[pino.symbols.chindingsSym] ?? "";
}

function setChindings(logger: Logger, chindings: string): void {
  (logger as unknown as Record<symbol, string>)[pino.symbols.chindingsSym] = chindings;
}

const COMPONENT_KEY = ',"component":';

/**
 * Removes every top-level `component` binding but the last from pino's serialized bindings
 * (",\"key\":value,..."). JSON.parse keeps the last of duplicate keys, so a line parses to the same
 * object, but strict parsers reject duplicates. Only commas outside strings, objects and arrays
 * start a binding, so a nested "component" key is kept.
 */
export function withLastComponentOnly(chindings: string): string {
  const starts: number[] = [];
  let depth = 0;
  let inString = false;
  for (let index = 0; index < chindings.length; index++) {
    const character = chindings[index];
    if (inString) {
      if (character === "\\") index++;
      else if (character === '"') inString = false;
    } else if (character === '"') {
      inString = true;
    } else if (character === "{" || character === "[") {
      depth++;
    } else if (character === "}" || character === "]") {
      depth--;
    } else if (character === "," && depth === 0) {
      starts.push(index);
    }
  }
  const components = starts.filter((start) => chindings.startsWith(COMPONENT_KEY, start));
  if (components.length < 2) return chindings;
  let result = "";
  let from = 0;
  for (const start of components.slice(0, -1)) {
    const end = starts.find((next) => next > start) ?? chindings.length;
    result += chindings.slice(from, start);
    from = end;
  }
  return result + chindings.slice(from);
}

/** Returns the LogLevels of the tree a logger belongs to, or undefined for a logger made without one. */
export function logLevelsOf(logger: Logger): LogLevels | undefined {
  for (let current: Logger | null = logger; current !== null; current = Object.getPrototypeOf(current) as Logger | null) {
    const levels = levelsOfRoot.get(current);
    if (levels !== undefined) return levels;
  }
  return undefined;
}

/** Makes a logger tree whose levels `levels` sets, writing to `destination`. */
export function createLevelledLogger(levels: LogLevels, bindings: Record<string, unknown>, destination?: pino.DestinationStream): Logger {
  const options: pino.LoggerOptions = { level: levels.levelOf([ROOT_COMPONENT]), base: { pid: process.pid, ...bindings }, onChild: levels.onChild };
  const root = destination === undefined ? pino(options) : pino(options, destination);
  levels.attach(root);
  return root;
}

const accessLoggers = new WeakMap<Logger, Logger>();

/** Components whose level does not follow the logger they are made from. */
const INDEPENDENT_COMPONENTS: ReadonlySet<string> = new Set(["access"]);

/**
 * Returns the child of `logger` with component "access", for the lines that end a connection. The
 * child is made once per parent, so a connection costs a WeakMap lookup and no new logger.
 */
export function accessLogger(logger: Logger): Logger {
  let access = accessLoggers.get(logger);
  if (access === undefined) {
    access = logger.child({ component: "access" });
    accessLoggers.set(logger, access);
  }
  return access;
}

/**
 * Creates the process logger: JSON lines on stderr, or text lines with `format` "text"
 * (TextDestination). `levelText` (the --log-level flag) or else
 * AMBIENT_AGENT_LOG_LEVEL sets the levels, as parseLogLevels reads them: default info.
 * Lines are collected and written with one synchronous write(2) per LOG_BATCH_BYTES, or every
 * LOG_FLUSH_INTERVAL_MS, so a busy proxy makes no write(2) per connection. The batch is also written
 * on fatal() and when the process exits; a SIGKILL loses what is still collected. The audit file,
 * not this log, is the record of each connection. Synchronous writes cost less than handing each
 * batch to libuv's thread pool, and keep the lines in order with what the process prints on exit.
 * Throws InvalidLogLevelError for an invalid level setting.
 */
export function createLogger(bindings: Record<string, unknown> = {}, levelText?: string, format: LogFormat = "json"): Logger {
  const text = levelText ?? process.env.AMBIENT_AGENT_LOG_LEVEL ?? "info";
  const levels = new LogLevels(parseLogLevels(text));
  const destination = pino.destination({ dest: 2, sync: true, minLength: LOG_BATCH_BYTES, periodicFlush: LOG_FLUSH_INTERVAL_MS });
  // Pino registers an exit flush only for asynchronous destinations.
  process.once("exit", () => flushOnExit(destination));
  return createLevelledLogger(levels, bindings, format === "text" ? new TextDestination(destination) : destination);
}

function flushOnExit(destination: ReturnType<typeof pino.destination>): void {
  try {
    destination.flushSync();
  } catch {
    // stderr is closed or full: nothing is left to report the loss to.
  }
}

/** Creates a logger that discards everything, for unit tests. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
