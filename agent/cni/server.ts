// The agent's side of the chained CNI plugin: a unix socket server that receives each pod's ADD
// and DEL and replies once the handler has put the pod's capture in place (or removed it).
// The plugin makes the pod's sandbox wait for the reply, so a pod never starts uncaptured.

import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { AgentError } from "../errors";
import { listenUnixSocket } from "../unix-socket";
import type { Logger } from "../log";
import {
  CNI_ERROR_CODES,
  CniRequestReader,
  errorOutput,
  formatCniReply,
  InvalidCniRequestError,
  successOutput,
  toPodEvent,
  type CniPodEvent,
  type CniRequest,
} from "./protocol";

/** Callbacks that the agent runs for each pod. add() resolves once capture is in place, and a rejection fails the pod's ADD. */
export interface CniHandler {
  add(event: CniPodEvent): Promise<void>;
  del(event: CniPodEvent): Promise<void>;
}

export interface CniServerOptions {
  /** Maximum requests handled at once. The server rejects more with CNI error 11, so that the runtime retries them. */
  maxConcurrentRequests?: number;
  /** Time a connection has to send its whole request. */
  requestReadTimeoutMs?: number;
}

const DEFAULT_MAX_CONCURRENT_REQUESTS = 32;
const DEFAULT_REQUEST_READ_TIMEOUT_MS = 10_000;
/** How long listen() waits for an existing socket to accept a connection before calling it stale. */
const LIVE_SOCKET_PROBE_MS = 1000;

export class CniServer {
  readonly #connections = new Set<net.Socket>();
  #inFlight = 0;
  #closed = false;

  private constructor(
    readonly socketPath: string,
    private readonly server: net.Server,
    private readonly socketInode: number,
    private readonly handler: CniHandler,
    private readonly logger: Logger,
    private readonly maxConcurrentRequests: number,
    private readonly requestReadTimeoutMs: number,
  ) {}

  /**
   * Listens on socketPath. Creates its folder with mode 0700 when missing, replaces a socket file
   * that a stopped agent left, and fails when another agent still accepts connections on it. The socket file
   * gets mode 0600, so only root can send requests.
   */
  static async listen(socketPath: string, handler: CniHandler, logger: Logger, options: CniServerOptions = {}): Promise<CniServer> {
    if (!path.isAbsolute(socketPath)) throw setupFailed(`the CNI socket path ${socketPath} is not absolute. Pass an absolute path`);
    prepareSocketFolder(path.dirname(socketPath));
    await removeStaleSocket(socketPath);

    let self: CniServer | undefined;
    const { server, inode } = await listenUnixSocket(socketPath, (connection) => self?.accept(connection), logger, "CNI socket");
    self = new CniServer(
      socketPath,
      server,
      inode,
      handler,
      logger,
      options.maxConcurrentRequests ?? DEFAULT_MAX_CONCURRENT_REQUESTS,
      options.requestReadTimeoutMs ?? DEFAULT_REQUEST_READ_TIMEOUT_MS,
    );
    logger.info({ socket: socketPath }, "CNI socket listening");
    return self;
  }

  /**
   * Stops accepting requests, closes open connections and removes the socket file if it is still
   * this server's. A plugin whose request was open fails with error 11 and the runtime retries it.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const connection of this.#connections) connection.destroy();
    try {
      if (fs.statSync(this.socketPath).ino === this.socketInode) fs.rmSync(this.socketPath, { force: true });
    } catch {
      // The file is gone already.
    }
    await closed;
    this.logger.info({ socket: this.socketPath }, "CNI socket closed");
  }

  private accept(connection: net.Socket): void {
    const reader = new CniRequestReader();
    this.#connections.add(connection);
    connection.setTimeout(this.requestReadTimeoutMs);
    connection.on("timeout", () => {
      this.logger.warn({ timeoutMs: this.requestReadTimeoutMs }, "a CNI plugin connection sent no complete request in time, so it was closed");
      connection.destroy();
    });
    connection.on("error", (error) => this.logger.debug({ err: error }, "CNI plugin connection failed"));
    connection.on("close", () => this.#connections.delete(connection));

    const onData = (chunk: Buffer): void => {
      let request: CniRequest | undefined;
      try {
        request = reader.push(chunk);
      } catch (error) {
        connection.off("data", onData);
        this.rejectRequest(connection, error as InvalidCniRequestError);
        return;
      }
      if (!request) return;
      connection.off("data", onData);
      connection.setTimeout(0);
      void this.serve(connection, request);
    };
    connection.on("data", onData);
  }

  private rejectRequest(connection: net.Socket, error: InvalidCniRequestError): void {
    this.logger.warn({ err: error }, "rejected an invalid CNI request");
    connection.setTimeout(0);
    connection.end(formatCniReply(1, errorOutput("1.0.0", error.cniCode, error.message)));
  }

  /** Runs the handler for one request and sends the reply. */
  private async serve(connection: net.Socket, request: CniRequest): Promise<void> {
    const cniVersion = request.config.cniVersion as string;
    let event: CniPodEvent;
    try {
      event = toPodEvent(request);
    } catch (error) {
      this.rejectRequest(connection, error as InvalidCniRequestError);
      return;
    }
    const logger = this.logger.child({ command: event.command, containerId: event.containerId, pod: podName(event) });
    if (this.#inFlight >= this.maxConcurrentRequests) {
      logger.warn({ inFlight: this.#inFlight }, "too many CNI requests at once, so the runtime must retry this one");
      const message = `the ambient agent is handling ${this.#inFlight} CNI requests already. The runtime retries the pod`;
      connection.end(formatCniReply(1, errorOutput(cniVersion, CNI_ERROR_CODES.TRY_AGAIN_LATER, message)));
      return;
    }

    // NOTE: a request keeps its slot until the handler settles, even after the plugin gave up waiting.
    this.#inFlight++;
    const started = Date.now();
    try {
      if (event.command === "ADD") await this.handler.add(event);
      else await this.handler.del(event);
      logger.info({ netns: event.netns, ips: event.ips, durationMs: Date.now() - started }, event.command === "ADD" ? "CNI ADD succeeded: the sandbox may start" : "CNI DEL succeeded");
      connection.end(formatCniReply(0, event.command === "ADD" ? successOutput(request.config) : ""));
    } catch (error) {
      logger.error({ err: error, netns: event.netns, durationMs: Date.now() - started }, `CNI ${event.command} failed`);
      const message = error instanceof Error ? error.message : String(error);
      connection.end(formatCniReply(1, errorOutput(cniVersion, CNI_ERROR_CODES.CAPTURE_FAILED, message)));
    } finally {
      this.#inFlight--;
    }
  }
}

function podName(event: CniPodEvent): string | undefined {
  return event.podNamespace && event.podName ? `${event.podNamespace}/${event.podName}` : undefined;
}

function setupFailed(message: string, cause?: unknown): AgentError {
  return new AgentError("CNI_SETUP_FAILED", message, { cause });
}

/**
 * Creates the socket's folder with mode 0700, or checks that an existing one is a folder owned by
 * this user that no one else can write to. Anyone who could replace the socket could reply to the
 * plugin in the agent's place.
 */
function prepareSocketFolder(folder: string): void {
  if (!fs.existsSync(folder)) {
    fs.mkdirSync(folder, { recursive: true, mode: 0o700 });
    fs.chmodSync(folder, 0o700);
    return;
  }
  const stat = fs.statSync(folder);
  if (!stat.isDirectory()) throw setupFailed(`the CNI socket's folder ${folder} is not a folder. Remove it or choose another socket path`);
  const uid = process.getuid?.() ?? 0;
  if (stat.uid !== uid || (stat.mode & 0o022) !== 0) {
    throw setupFailed(
      `the CNI socket's folder ${folder} is owned by uid ${stat.uid} with mode ${(stat.mode & 0o777).toString(8)}, ` +
        `but it must be owned by uid ${uid} and not writable by group or others. Fix its owner and mode`,
    );
  }
}

/** Removes a socket file whose agent is gone, and fails when an agent still accepts connections on it. */
async function removeStaleSocket(socketPath: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(socketPath);
  } catch {
    return;
  }
  if (!stat.isSocket()) throw setupFailed(`${socketPath} exists and is not a socket. Remove it or choose another CNI socket path`);
  if (await acceptsConnections(socketPath)) {
    throw setupFailed(`another process serves the CNI socket ${socketPath}. Stop the other agent on this node first`);
  }
  fs.rmSync(socketPath, { force: true });
}

function acceptsConnections(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect(socketPath);
    const finish = (live: boolean): void => {
      probe.destroy();
      resolve(live);
    };
    probe.setTimeout(LIVE_SOCKET_PROBE_MS, () => finish(true));
    probe.once("connect", () => finish(true));
    probe.once("error", () => finish(false));
  });
}
