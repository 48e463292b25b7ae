// Starts the agent's CNI integration: the plugin binary in the CNI bin folder, the socket that the
// plugin sends each pod's ADD and DEL to, and the plugin's entry in the node's CNI configuration.

import path from "node:path";
import type { Logger } from "../log";
import { CniChain, installPluginBinary } from "./chain";
import { CniServer, type CniHandler } from "./server";

export type { CniPodEvent } from "./protocol";
export type { CniHandler } from "./server";

export const DEFAULT_CNI_SOCKET = "/var/run/ambient-agent/cni.sock";
export const DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d";
export const DEFAULT_CNI_BIN_DIR = "/opt/cni/bin";
export const DEFAULT_CNI_TIMEOUT_SECONDS = 30;

export interface CniSettings {
  /** Folder of the node's CNI configuration files (the runtime's conf dir). */
  confDir: string;
  /** Folder of the node's CNI plugin binaries. */
  binDir: string;
  /** Unix socket for the plugin's requests. */
  socketPath: string;
  /** The built plugin, copied into binDir. */
  pluginBinary: string;
  /** Namespaces whose pods start without waiting for the agent. */
  excludeNamespaces: string[];
  /** Seconds the plugin waits for the agent to accept its connection, and again for the reply. */
  timeoutSeconds: number;
  /** Interval of the configuration check that backs up fs.watch; 5000 ms when unset. */
  pollIntervalMs?: number;
}

export interface CniRuntime {
  readonly server: CniServer;
  readonly chain: CniChain;
  /** Closes the socket and stops watching the configuration. The plugin stays installed and chained. */
  close(): Promise<void>;
}

/** Returns the built plugin binary of this checkout: native/cni/ambient-agent-cni. */
export function builtPluginBinary(): string {
  return path.resolve(__dirname, "../../../native/cni/ambient-agent-cni");
}

/**
 * Installs the plugin binary, listens on the socket and then chains the plugin, in that order. The
 * runtime may run the plugin as soon as the configuration names it, so the binary and the agent
 * must be ready first.
 */
export async function startCni(options: CniSettings, handler: CniHandler, logger: Logger): Promise<CniRuntime> {
  // NOTE: the binary is installed once, here. A binary that something removes later is put back at the agent's next start.
  if (installPluginBinary(options.pluginBinary, options.binDir)) {
    logger.info({ binDir: options.binDir }, "installed the CNI plugin binary");
  }
  const server = await CniServer.listen(options.socketPath, handler, logger);
  let chain: CniChain;
  try {
    chain = CniChain.start(
      {
        confDir: options.confDir,
        agentSocket: options.socketPath,
        excludeNamespaces: options.excludeNamespaces,
        timeoutSeconds: options.timeoutSeconds,
        pollIntervalMs: options.pollIntervalMs,
      },
      logger,
    );
  } catch (error) {
    await server.close();
    throw error;
  }
  return {
    server,
    chain,
    async close() {
      chain.close();
      await server.close();
    },
  };
}
