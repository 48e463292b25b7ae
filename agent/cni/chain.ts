// Installs the agent's plugin into the node's CNI configuration, after the network plugin that
// gives pods their addresses, and keeps it there while other installers rewrite the file.
//
// The plugin is chained into the first file by name among *.conf, *.conflist and *.json in the
// CNI configuration folder. NOTE: that containerd and CRI-O load this file when no network is
// named is not checked against their code. A .conflist runs its plugins in order, each receiving
// the previous one's result as prevResult. A single-plugin .conf cannot chain, so it is rewritten
// as a .conflist. A .json file with a "plugins" array is chained into as it is.

import fs from "node:fs";
import path from "node:path";
import { AgentError } from "../errors";
import type { Logger } from "../log";

/** The plugin's "type", which is also the name of its binary in the CNI bin folder. */
export const PLUGIN_TYPE = "ambient-agent-cni";

const CONFIG_EXTENSIONS = [".conf", ".conflist", ".json"];
const DEFAULT_POLL_INTERVAL_MS = 5000;
/** Delay after a change event, so that several events of one rewrite cause one check. */
const WATCH_SETTLE_MS = 100;

/** The settings written into the plugin's entry of the CNI configuration. */
export interface CniPluginSettings {
  /** Unix socket on which the agent receives the plugin's requests. */
  agentSocket: string;
  /** Namespaces whose pods the plugin lets start without asking the agent. */
  excludeNamespaces: string[];
  /** Seconds the plugin waits for the agent to accept its connection, and again for the reply. */
  timeoutSeconds: number;
}

/** Result of chainInto() on the configuration folder. */
export type ChainOutcome = "chained" | "unchanged" | "no-config" | "invalid";

/** Returns the plugin's entry for a conflist's plugins array. */
export function pluginEntry(settings: CniPluginSettings): Record<string, unknown> {
  return {
    type: PLUGIN_TYPE,
    agent_socket: settings.agentSocket,
    exclude_namespaces: [...settings.excludeNamespaces],
    timeout_seconds: settings.timeoutSeconds,
  };
}

/** Returns the configuration files of a folder in the order the runtime considers them. */
export function listConfigFiles(confDir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(confDir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw error;
  }
  return names
    .filter((name) => CONFIG_EXTENSIONS.includes(path.extname(name)))
    .sort()
    .map((name) => path.join(confDir, name))
    .filter((file) => isRegularFile(file));
}

/** Returns the file that the runtime uses: the first configuration file by name. */
export function findRuntimeConfig(confDir: string): string | undefined {
  return listConfigFiles(confDir)[0];
}

function isRegularFile(file: string): boolean {
  try {
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** Decodes a configuration file; returns undefined when it is not a JSON object. */
function readConfig(file: string): Record<string, unknown> | undefined {
  let value: unknown;
  try {
    value = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return undefined;
  return value as Record<string, unknown>;
}

function isPluginEntry(plugin: unknown): boolean {
  return typeof plugin === "object" && plugin !== null && (plugin as { type?: unknown }).type === PLUGIN_TYPE;
}

/**
 * Returns the plugins with the entry in place: an existing entry is replaced at its position and
 * any second copy dropped. Otherwise the entry is appended.
 */
function withEntry(plugins: unknown[], entry: Record<string, unknown>): unknown[] {
  const index = plugins.findIndex(isPluginEntry);
  if (index < 0) return [...plugins, entry];
  return plugins.filter((plugin, at) => at === index || !isPluginEntry(plugin)).map((plugin, at) => (at === index ? entry : plugin));
}

/**
 * Writes text to file atomically: to a temporary file in the same folder, flushed, then renamed
 * over the target. The temporary name has no configuration extension, so the runtime never loads it.
 */
export function writeFileAtomic(file: string, content: string | Buffer, mode: number): void {
  const temporary = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    const fd = fs.openSync(temporary, "w", mode);
    try {
      fs.writeFileSync(fd, content);
      fs.fchmodSync(fd, mode);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(temporary, file);
  } catch (error) {
    fs.rmSync(temporary, { force: true });
    throw error;
  }
}

function formatConfig(config: Record<string, unknown>): string {
  return JSON.stringify(config, null, 2) + "\n";
}

/**
 * Puts the plugin's entry at the end of the runtime's configuration file, or updates it in place.
 * A single-plugin file becomes a .conflist next to it and the old file is removed. A file that is
 * not a JSON object, or whose "plugins" is not an array, is left alone and reported as "invalid".
 */
export function chainInto(confDir: string, settings: CniPluginSettings): { outcome: ChainOutcome; file?: string } {
  const file = findRuntimeConfig(confDir);
  if (!file) return { outcome: "no-config" };
  const config = readConfig(file);
  if (!config || (config.plugins !== undefined && !Array.isArray(config.plugins))) return { outcome: "invalid", file };

  const entry = pluginEntry(settings);
  const mode = fs.statSync(file).mode & 0o777;
  if (Array.isArray(config.plugins)) {
    const plugins = withEntry(config.plugins, entry);
    if (JSON.stringify(plugins) === JSON.stringify(config.plugins)) return { outcome: "unchanged", file };
    writeFileAtomic(file, formatConfig({ ...config, plugins }), mode);
    return { outcome: "chained", file };
  }
  return { outcome: "chained", file: convertToConflist(file, config, entry, mode) };
}

/** Writes a single-plugin configuration as a .conflist that runs the plugin and then the entry. */
function convertToConflist(file: string, config: Record<string, unknown>, entry: Record<string, unknown>, mode: number): string {
  const conflist: Record<string, unknown> = { cniVersion: config.cniVersion, name: config.name, plugins: [config, entry] };
  const target = path.join(path.dirname(file), `${path.basename(file, path.extname(file))}.conflist`);
  writeFileAtomic(target, formatConfig(conflist), mode);
  if (target !== file) fs.rmSync(file, { force: true });
  return target;
}

/**
 * Removes the plugin's entry from every configuration file in the folder that has one, for
 * uninstalling. Returns the files changed. A file converted from a single-plugin .conf stays a
 * .conflist, which the runtime loads the same way.
 */
export function unchain(confDir: string): string[] {
  const changed: string[] = [];
  for (const file of listConfigFiles(confDir)) {
    const config = readConfig(file);
    if (!config || !Array.isArray(config.plugins) || !config.plugins.some(isPluginEntry)) continue;
    const plugins = config.plugins.filter((plugin) => !isPluginEntry(plugin));
    writeFileAtomic(file, formatConfig({ ...config, plugins }), fs.statSync(file).mode & 0o777);
    changed.push(file);
  }
  return changed;
}

/** Lists the agent sockets that the plugin entries in `confDir` name, once each. */
export function chainedSockets(confDir: string): string[] {
  const sockets = new Set<string>();
  for (const file of listConfigFiles(confDir)) {
    const plugins = readConfig(file)?.plugins;
    if (!Array.isArray(plugins)) continue;
    for (const plugin of plugins.filter(isPluginEntry)) {
      const socket = (plugin as { agent_socket?: unknown }).agent_socket;
      if (typeof socket === "string" && socket !== "") sockets.add(socket);
    }
  }
  return [...sockets];
}

/**
 * Copies the plugin binary into the CNI bin folder as ambient-agent-cni with mode 0755, unless an
 * identical file is there. Returns whether it copied. The copy is atomic, so a runtime that runs
 * the plugin at that moment runs the old or the new binary, never a partial one.
 */
export function installPluginBinary(source: string, binDir: string): boolean {
  let binary: Buffer;
  try {
    binary = fs.readFileSync(source);
  } catch (error) {
    throw new AgentError("CNI_SETUP_FAILED", `failed to read the CNI plugin binary ${source}: ${(error as Error).message}. Build it with make build`, { cause: error });
  }
  const target = path.join(binDir, PLUGIN_TYPE);
  try {
    const installed = fs.readFileSync(target);
    if (installed.equals(binary) && (fs.statSync(target).mode & 0o777) === 0o755) return false;
  } catch {
    // Not installed yet.
  }
  try {
    fs.mkdirSync(binDir, { recursive: true, mode: 0o755 });
    writeFileAtomic(target, binary, 0o755);
  } catch (error) {
    throw new AgentError("CNI_SETUP_FAILED", `failed to install the CNI plugin into ${binDir}: ${(error as Error).message}. Check that the CNI bin folder is mounted writable`, { cause: error });
  }
  return true;
}

export interface CniChainOptions extends CniPluginSettings {
  confDir: string;
  /** Interval of the check that backs up fs.watch, which can miss events (for example on some network or overlay mounts). */
  pollIntervalMs?: number;
}

/**
 * Keeps the plugin chained into the runtime's configuration file: checks at start, on every change
 * in the folder and every pollIntervalMs, and puts the entry back when another installer (such as
 * the network plugin's own) rewrote the file without it.
 */
export class CniChain {
  #watcher: fs.FSWatcher | undefined;
  #settleTimer: NodeJS.Timeout | undefined;
  #pollTimer: NodeJS.Timeout | undefined;
  /** Last outcome reported per file, so that a repeated state is logged once. */
  #lastReport = "";
  #closed = false;
  #watchFailureLogged = false;
  /** The outcome of the last check, and the file it concerned. */
  #state: { outcome: ChainOutcome; file?: string } = { outcome: "no-config" };

  private constructor(
    private readonly options: CniChainOptions,
    private readonly logger: Logger,
  ) {}

  /** Chains the plugin now and starts watching the folder. */
  static start(options: CniChainOptions, logger: Logger): CniChain {
    const chain = new CniChain(options, logger.child({ confDir: options.confDir }));
    chain.ensure();
    chain.watch();
    chain.#pollTimer = setInterval(() => {
      if (!chain.#watcher) chain.watch();
      chain.ensure();
    }, options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS);
    chain.#pollTimer.unref();
    return chain;
  }

  /** Checks the configuration once and chains the plugin when its entry is missing or outdated. */
  ensure(): ChainOutcome {
    let result: { outcome: ChainOutcome; file?: string };
    try {
      result = chainInto(this.options.confDir, this.options);
    } catch (error) {
      this.logger.error({ err: error }, "failed to chain the CNI plugin into the node's CNI configuration; retrying at the next change or poll");
      this.#lastReport = "";
      this.#state = { outcome: "invalid" };
      return "invalid";
    }
    this.report(result.outcome, result.file);
    this.#state = result;
    return result.outcome;
  }

  /** Tells whether the entry is in the runtime's configuration file now, and which file that is. */
  status(): { chained: boolean; file?: string; outcome: ChainOutcome } {
    const { outcome, file } = this.#state;
    return { chained: outcome === "chained" || outcome === "unchanged", file, outcome };
  }

  /** Stops watching. The entry stays, so that new pods wait for the next agent instead of starting uncaptured. */
  close(): void {
    this.#closed = true;
    this.#watcher?.close();
    this.#watcher = undefined;
    clearTimeout(this.#settleTimer);
    clearInterval(this.#pollTimer);
  }

  private report(outcome: ChainOutcome, file: string | undefined): void {
    const key = `${outcome}:${file ?? ""}`;
    if (outcome === "chained") {
      this.logger.info({ file }, "chained the CNI plugin into the node's CNI configuration");
    } else if (key !== this.#lastReport && outcome === "invalid") {
      this.logger.warn({ file }, "the node's CNI configuration file is not a valid JSON object or its plugins is not an array, so it was left unchanged");
    } else if (key !== this.#lastReport && outcome === "no-config") {
      this.logger.warn("no CNI configuration file yet, so new pods start without waiting for their capture; the plugin is chained once the network plugin writes one");
    }
    this.#lastReport = outcome === "chained" ? `unchanged:${file ?? ""}` : key;
  }

  private watch(): void {
    if (this.#closed) return;
    try {
      this.#watcher = fs.watch(this.options.confDir, () => this.scheduleCheck());
      this.#watcher.on("error", (error) => {
        this.logger.warn({ err: error }, "watching the CNI configuration folder failed; polling until the watch is back");
        this.#watcher?.close();
        this.#watcher = undefined;
      });
      this.#watchFailureLogged = false;
    } catch (error) {
      // Logged once until a watch works: a missing folder is retried at every poll.
      if (!this.#watchFailureLogged) this.logger.warn({ err: error }, "failed to watch the CNI configuration folder; polling instead");
      this.#watchFailureLogged = true;
    }
  }

  private scheduleCheck(): void {
    if (this.#closed || this.#settleTimer) return;
    this.#settleTimer = setTimeout(() => {
      this.#settleTimer = undefined;
      if (!this.#closed) this.ensure();
    }, WATCH_SETTLE_MS);
  }
}
