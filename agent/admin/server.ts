// The node-local admin API: readiness, a dump of what the agent serves, and the authorization
// diagnostics behind `agentctl authz` and `agentctl policies`. Bound to localhost by default.

import http from "node:http";
import net from "node:net";
import type { ManifestProblem } from "../discovery/manifest-problem";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { RefusalLog } from "../proxy/refusal-log";
import { formatAddress, normalizeIp } from "../proxy/tcp";
import { checkAccess, explainWorkload, findWorkload, policyStatuses } from "../rbac/explain";
import type { AuthorizationSettings } from "../rbac/authorize";
import type { MeshState } from "../state/mesh-state";

/** Splits "host:port" (IPv6 in brackets) and checks the port. */
export function parseAddress(address: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(address);
  const port = match ? Number(match[3]) : NaN;
  if (!match || port < 0 || port > 65535) {
    throw new Error(`invalid admin address "${address}": expected HOST:PORT, for example 127.0.0.1:15000`);
  }
  return { host: match[1] ?? match[2], port };
}

/** A route result sent as it is, not as JSON, such as Prometheus' text format. */
export class TextResponse {
  constructor(
    readonly contentType: string,
    readonly text: string,
    /** HTTP status of the response; 200 unless given. */
    readonly status = 200,
  ) {}
}

/**
 * Handles a GET of one path: returns the JSON body, a TextResponse, or a promise of either. Throwing AgentError INVALID_QUERY returns 400,
 * UNKNOWN_WORKLOAD 404, AdminUnavailableError 503, and any other error 500.
 */
export type AdminRoute = (query: URLSearchParams) => unknown;

/** The JSON routes by path, such as "/config_dump". */
export type AdminRoutes = Readonly<Record<string, AdminRoute>>;

/** Handles a POST of one path, as AdminRoute does a GET; `remoteAddress` is the client's, for the log. */
export type AdminPostRoute = (query: URLSearchParams, remoteAddress: string | undefined) => unknown;

/**
 * Content types a browser sends in a cross-site request without asking the server first (a CORS
 * "simple request"), such as an HTML form's POST.
 */
const BROWSER_FORM_TYPES = ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"];

/** Thrown by a route whose data does not exist yet, such as the mesh state while the agent starts. */
export class AdminUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "AdminUnavailableError";
  }
}

/** Sources of the authorization routes: the current mesh state, the settings the proxies use, and the manifest problems. */
export interface AuthorizationDiagnostics {
  state(): MeshState | undefined;
  settings(): AuthorizationSettings;
  problems(): readonly ManifestProblem[];
}

/** Returns the mesh state that `state` returns, or throws AdminUnavailableError (503) before the configuration is read. */
export function requireState(state: () => MeshState | undefined): MeshState {
  const current = state();
  if (current === undefined) throw new AdminUnavailableError("the agent has not read its configuration yet; retry in a few seconds");
  return current;
}

/** Builds /authz/check?from=&to=, /authz/explain?pod= and /policies over the agent's current state. */
export function authorizationRoutes(diagnostics: AuthorizationDiagnostics): AdminRoutes {
  const currentState = (): MeshState => requireState(() => diagnostics.state());
  return {
    "/authz/check": (query) => {
      const from = requiredParameter(query, "from", "/authz/check?from=SOURCE&to=DESTINATION, for example from=shop/web&to=backend/api:8080");
      const to = requiredParameter(query, "to", "/authz/check?from=SOURCE&to=DESTINATION, for example from=shop/web&to=backend/api:8080");
      return checkAccess(currentState(), diagnostics.settings(), from, to);
    },
    "/authz/explain": (query) => {
      const pod = requiredParameter(query, "pod", "/authz/explain?pod=NAMESPACE/NAME");
      const state = currentState();
      return explainWorkload(state, diagnostics.settings(), findWorkload(state, pod));
    },
    "/policies": () => policyStatuses(currentState(), diagnostics.problems(), diagnostics.settings().rootNamespace),
  };
}

function requiredParameter(query: URLSearchParams, name: string, usage: string): string {
  const value = query.get(name);
  if (value === null || value.trim() === "") throw new AgentError("INVALID_QUERY", `missing query parameter "${name}"; request ${usage}`);
  return value;
}

/** Connections from other hosts and pods that each server keeps open at most; further ones are closed at once. */
const MAX_CONNECTIONS = 64;
/** Connections one remote address may keep open to one server. */
const MAX_CONNECTIONS_PER_SOURCE = 8;
/** How long a client may take to send a request's headers, and the whole request, in ms. */
const HEADERS_TIMEOUT_MS = 5_000;
const REQUEST_TIMEOUT_MS = 10_000;
/** How long an idle keep-alive connection stays open, in ms. */
const KEEP_ALIVE_TIMEOUT_MS = 5_000;
/** How often Node checks the headers and request timeouts, in ms (30 s by default). */
const CONNECTION_CHECK_MS = 1_000;
/**
 * How long a connection may go without a byte read or written, in ms. It ends a client that sends
 * requests and never reads the responses, which the other timeouts do not cover once the headers
 * have arrived.
 */
const SOCKET_IDLE_TIMEOUT_MS = 30_000;

/**
 * The responses that Node's HTTP server without a 'clientError' listener writes to a client whose
 * request failed to parse or timed out, before it closes the connection. A server with that
 * listener writes them itself.
 */
const CLIENT_ERROR_RESPONSES: Readonly<Record<string, string>> = {
  ERR_HTTP_REQUEST_TIMEOUT: "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n",
  HPE_HEADER_OVERFLOW: "HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n",
  HPE_CHUNK_EXTENSIONS_OVERFLOW: "HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n\r\n",
};
const BAD_REQUEST_RESPONSE = "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n";

/** The refusal log and listener name with which a server records the connections it drops at its limits. */
export interface AdminRefusals {
  log: Pick<RefusalLog, "refuse">;
  /** The server's listener name in connection.refused records. */
  listener: "admin" | "metrics" | "readiness";
}

export class AdminServer {
  private readonly server: http.Server;

  constructor(
    private readonly address: string,
    private readonly routes: AdminRoutes,
    private readonly logger: Logger,
    /** The only paths that accept POST, such as "/logging". */
    private readonly postRoutes: Readonly<Record<string, AdminPostRoute>> = {},
    /**
     * The server's name and the flag that sets its address, for the error when it cannot listen.
     * `ipHostsOnly` rejects requests addressed to a host name other than localhost.
     */
    private readonly listener: { name: string; flag: string; ipHostsOnly?: boolean } = { name: "admin API", flag: "--admin", ipHostsOnly: true },
    /** Records each connection dropped at a limit. Without it, drops are only logged, once a minute. */
    private readonly refusals?: AdminRefusals,
  ) {
    this.server = http.createServer({ connectionsCheckingInterval: CONNECTION_CHECK_MS }, (request, response) => {
      this.#responses.set(request.socket, response);
      response.once("finish", () => this.#responses.delete(request.socket));
      // A request that the routes do not expect must cost one 500, never the process.
      try {
        this.handle(request, response);
      } catch (error) {
        this.logger.error({ err: error, url: request.url?.slice(0, 256) }, `${this.listener.name} request failed`);
        if (!response.headersSent) sendJson(response, 500, { error: `internal error: ${(error as Error).message}`, code: "INTERNAL" });
        else response.destroy();
      }
    });
    // The metrics and readiness servers listen on every address, so a pod can open connections
    // to them: they are bounded in number and in how long they may stay idle.
    this.server.headersTimeout = HEADERS_TIMEOUT_MS;
    this.server.requestTimeout = REQUEST_TIMEOUT_MS;
    this.server.keepAliveTimeout = KEEP_ALIVE_TIMEOUT_MS;
    this.server.timeout = SOCKET_IDLE_TIMEOUT_MS;
    this.server.on("connection", (socket: net.Socket) => this.#admit(socket));
    this.server.on("clientError", (error: NodeJS.ErrnoException, socket: net.Socket) => this.#clientError(error, socket));
    this.server.on("timeout", (socket: net.Socket) => this.#socketIdle(socket));
    // Node does not pass CONNECT to the request handler: without this listener it closes the
    // connection without a response.
    this.server.on("connect", (request: http.IncomingMessage, socket: import("node:stream").Duplex) => {
      socket.on("error", () => undefined);
      socket.end(`HTTP/1.1 405 Method Not Allowed\r\nallow: GET, HEAD\r\ncontent-length: 0\r\nconnection: close\r\n\r\n`);
      this.logger.debug({ target: request.url?.slice(0, 256) }, `${this.listener.name} rejected a CONNECT request`);
    });
  }

  /** The response in progress on each connection, from its request's headers until it is written. */
  readonly #responses = new WeakMap<net.Socket, http.ServerResponse>();
  #droppedSince = 0;
  /** Open connections from other hosts and pods, in all and by remote address. */
  #remoteConnections = 0;
  readonly #perSource = new Map<string, number>();

  /**
   * Closes a connection from another host or pod beyond MAX_CONNECTIONS, or beyond
   * MAX_CONNECTIONS_PER_SOURCE from its address. A connection from the node to its own address
   * (the kubelet's probe of a host-network pod, agentctl on 127.0.0.1) is not counted, so that
   * pods holding connections open cannot turn the node's probe away.
   */
  #admit(socket: net.Socket): void {
    const source = socket.remoteAddress ?? "";
    if (source !== "" && source === socket.localAddress) return;
    const fromSource = (this.#perSource.get(source) ?? 0) + 1;
    if (fromSource > MAX_CONNECTIONS_PER_SOURCE || this.#remoteConnections >= MAX_CONNECTIONS) {
      // Recorded before the destroy, which clears the socket's addresses.
      if (this.refusals) this.#recordDrop(socket, source, fromSource - 1);
      else this.#logDrop(source);
      socket.destroy();
      return;
    }
    this.#perSource.set(source, fromSource);
    this.#remoteConnections += 1;
    socket.once("close", () => {
      this.#remoteConnections -= 1;
      const left = (this.#perSource.get(source) ?? 1) - 1;
      if (left > 0) this.#perSource.set(source, left);
      else this.#perSource.delete(source);
    });
  }

  /** Records a connection dropped at a connection limit as a connection.refused record of reason admin_connections. */
  #recordDrop(socket: net.Socket, source: string, openFromSource: number): void {
    const perSource = openFromSource >= MAX_CONNECTIONS_PER_SOURCE;
    const message = perSource
      ? `${normalizeIp(source)} has ${openFromSource} open connections to the ${this.listener.name}, the limit per remote address`
      : `other hosts and pods have ${this.#remoteConnections} open connections to the ${this.listener.name}, the limit`;
    this.#refuse(socket, "admin_connections", message, perSource ? MAX_CONNECTIONS_PER_SOURCE : MAX_CONNECTIONS);
  }

  /**
   * Handles a request that failed to parse or timed out, as Node does without this listener: it
   * sends an error response when no response has started, then closes the connection. A timeout,
   * for the headers (HEADERS_TIMEOUT_MS) or the whole request (REQUEST_TIMEOUT_MS), is recorded
   * with reason request_timeout.
   */
  #clientError(error: NodeJS.ErrnoException, socket: net.Socket): void {
    if (error.code === "ERR_HTTP_REQUEST_TIMEOUT") {
      // A request whose headers arrived has a response in progress: its body came too slowly.
      const headersArrived = this.#responses.has(socket);
      const seconds = (headersArrived ? REQUEST_TIMEOUT_MS : HEADERS_TIMEOUT_MS) / 1000;
      const missing = headersArrived ? "its whole request" : "its request headers";
      this.#recordTimeout(socket, `client ${this.#clientOf(socket)} did not send ${missing} within ${seconds} s, the limit of the ${this.listener.name}`, seconds);
    }
    if (socket.writable && !this.#responses.get(socket)?.headersSent) socket.write(CLIENT_ERROR_RESPONSES[error.code ?? ""] ?? BAD_REQUEST_RESPONSE);
    socket.destroy();
  }

  /**
   * Closes a connection whose socket timeout fired, which Node does without this listener. The
   * timeout is either KEEP_ALIVE_TIMEOUT_MS between requests, an ordinary close, or
   * SOCKET_IDLE_TIMEOUT_MS, which is recorded with reason request_timeout.
   */
  #socketIdle(socket: net.Socket): void {
    if (socket.timeout === SOCKET_IDLE_TIMEOUT_MS) {
      const seconds = SOCKET_IDLE_TIMEOUT_MS / 1000;
      this.#recordTimeout(socket, `no byte moved on the connection of client ${this.#clientOf(socket)} for ${seconds} s, the limit of the ${this.listener.name}`, seconds);
    }
    socket.destroy();
  }

  /** Records a connection closed at a timeout, or logs it at debug level without a refusal log. */
  #recordTimeout(socket: net.Socket, message: string, seconds: number): void {
    if (this.refusals) this.#refuse(socket, "request_timeout", message, seconds);
    else this.logger.debug({ remoteAddress: socket.remoteAddress }, `${this.listener.name} closed a connection: ${message}`);
  }

  #clientOf(socket: net.Socket): string {
    return formatAddress(normalizeIp(socket.remoteAddress ?? ""), socket.remotePort ?? 0);
  }

  /** Writes a connection.refused record through the refusal log. Call it before the socket is destroyed, which clears its addresses. */
  #refuse(socket: net.Socket, reason: "admin_connections" | "request_timeout", message: string, limit: number): void {
    const port = socket.localPort ?? 0;
    this.refusals!.log.refuse({
      listener: this.refusals!.listener,
      port,
      src: { addr: this.#clientOf(socket) },
      dst: { addr: formatAddress(normalizeIp(socket.localAddress ?? ""), port) },
      reason,
      message,
      limit,
    });
  }

  /** Logs a connection dropped at a connection limit, with the address that has the most open, at most once a minute. */
  #logDrop(remoteAddress: string): void {
    const now = Date.now();
    if (now - this.#droppedSince < 60_000) return;
    this.#droppedSince = now;
    let busiest: [string, number] = ["", 0];
    for (const entry of this.#perSource) if (entry[1] > busiest[1]) busiest = entry;
    this.logger.warn(
      { remoteAddress, busiestAddress: busiest[0], busiestConnections: busiest[1], remoteConnections: this.#remoteConnections },
      `${this.listener.name} dropped a connection from ${remoteAddress || "an unknown address"}: other hosts and pods may keep ${MAX_CONNECTIONS} connections open, ${MAX_CONNECTIONS_PER_SOURCE} per address; ${busiest[0] || "no address"} has ${busiest[1]} open`,
    );
  }

  /**
   * Listens on the configured address. "::" takes IPv4 connections too; on a kernel without IPv6
   * it falls back to 0.0.0.0, so that the all-addresses default works on every node.
   */
  async start(): Promise<void> {
    const { host, port } = parseAddress(this.address);
    try {
      await this.listen(host, port);
    } catch (error) {
      if (host !== "::" || (error as NodeJS.ErrnoException).code !== "EAFNOSUPPORT") throw this.listenError(error as NodeJS.ErrnoException);
      this.logger.info({ address: this.address }, `${this.listener.name}: this kernel has no IPv6, listening on 0.0.0.0:${port}`);
      await this.listen("0.0.0.0", port).catch((fallback: NodeJS.ErrnoException) => {
        throw this.listenError(fallback);
      });
    }
  }

  private listen(host: string, port: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const failed = (error: Error): void => reject(error);
      this.server.once("error", failed);
      this.server.listen(port, host, () => {
        this.server.off("error", failed);
        resolve();
      });
    });
  }

  private listenError(error: NodeJS.ErrnoException): Error {
    return new Error(`${this.listener.name} could not listen on ${this.address}: ${error.code ?? error.message}; pass ${this.listener.flag} with a free address`);
  }

  /** Returns the address the server listens on, with the port the kernel chose when the configured port is 0. */
  listeningAddress(): { host: string; port: number } | undefined {
    const address = this.server.address();
    return address !== null && typeof address === "object" ? { host: address.address, port: address.port } : undefined;
  }

  async stop(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private handle(request: http.IncomingMessage, response: http.ServerResponse): void {
    const target = request.url ?? "/";
    // An absolute-form target (GET http://host/path) names its host itself. Any other target is a
    // path, also one that starts with "//", which new URL() would otherwise read as a host.
    const absolute = /^[a-z][a-z0-9+.-]*:\/\//i.test(target);
    let url: URL;
    try {
      url = absolute ? new URL(target) : new URL(`http://admin.invalid${target.startsWith("/") ? "" : "/"}${target}`);
    } catch {
      sendJson(response, 400, {
        error: `invalid request target ${JSON.stringify(target.slice(0, 256))}; request a path such as ${Object.keys(this.routes)[0] ?? "/"}`,
        code: "INVALID_TARGET",
      });
      return;
    }
    const path = url.pathname;
    const host = absolute ? url.host : request.headers.host;
    if (this.listener.ipHostsOnly && !(addressedByIpOrLocalhost(host) && addressedByIpOrLocalhost(request.headers.host))) {
      this.logger.warn({ path, host, remoteAddress: request.socket.remoteAddress }, "rejected an admin request addressed to a host name");
      sendJson(response, 403, {
        error: `requests to the ${this.listener.name} must name an IP address or localhost as their host, not ${JSON.stringify(host)}; connect to ${this.address}`,
        code: "FORBIDDEN",
      });
      return;
    }
    const hasGet = Object.hasOwn(this.routes, path);
    const hasPost = Object.hasOwn(this.postRoutes, path);
    if (request.method === "POST" && hasPost) {
      request.resume();
      this.servePost(path, url.searchParams, request, response);
    } else if (request.method !== "GET" && request.method !== "HEAD" && (hasGet || hasPost)) {
      const allow = [...(hasGet ? ["GET", "HEAD"] : []), ...(hasPost ? ["POST"] : [])].join(", ");
      response.setHeader("allow", allow);
      sendJson(response, 405, { error: `method ${request.method} is not allowed on ${path}; use ${allow}`, code: "METHOD_NOT_ALLOWED" });
    } else if (request.method !== "GET" && request.method !== "HEAD") {
      response.setHeader("allow", "GET, HEAD");
      sendJson(response, 405, {
        error: `method ${request.method} is not allowed; the ${this.listener.name} serves GET and HEAD${Object.keys(this.postRoutes).length > 0 ? `, and POST on ${Object.keys(this.postRoutes).join(", ")}` : ""}`,
        code: "METHOD_NOT_ALLOWED",
      });
    } else if (Object.hasOwn(this.routes, path)) {
      this.serveRoute(path, url.searchParams, response);
    } else if (hasPost) {
      response.setHeader("allow", "POST");
      sendJson(response, 405, { error: `method ${request.method} is not allowed on ${path}; use POST`, code: "METHOD_NOT_ALLOWED" });
    } else {
      const known = Object.keys(this.routes).join(", ");
      sendJson(response, 404, { error: `not found: ${path}; try ${known}`, code: "NOT_FOUND", server: this.listener.name });
    }
    this.logger.debug({ path, status: response.statusCode }, "admin request");
  }

  /**
   * Serves a POST, which changes the agent's state. A web page open in a browser on the node can
   * send a POST to 127.0.0.1 from another site. So a request with an Origin header, which browsers
   * add to every cross-origin POST, is rejected with 403, and so is one with a content type that
   * an HTML form can send. curl and agentctl send neither.
   */
  private servePost(path: string, query: URLSearchParams, request: http.IncomingMessage, response: http.ServerResponse): void {
    const origin = request.headers.origin;
    const contentType = (request.headers["content-type"] ?? "").split(";")[0].trim().toLowerCase();
    if (origin !== undefined) {
      this.logger.warn({ path, origin, remoteAddress: request.socket.remoteAddress }, "rejected an admin POST with an Origin header");
      sendJson(response, 403, {
        error: `POST ${path} with an Origin header (${origin}) is rejected, because browsers send it on cross-site requests; send the request without it, for example with curl -X POST`,
        code: "FORBIDDEN",
      });
      return;
    }
    if (BROWSER_FORM_TYPES.includes(contentType)) {
      this.logger.warn({ path, contentType, remoteAddress: request.socket.remoteAddress }, "rejected an admin POST with a form content type");
      sendJson(response, 403, {
        error: `POST ${path} with content type ${contentType} is rejected, because HTML forms can send it; send no Content-Type header, as curl -X POST does, or application/json`,
        code: "FORBIDDEN",
      });
      return;
    }
    this.serveRoute(path, query, response, () => this.postRoutes[path](query, request.socket.remoteAddress));
  }

  private serveRoute(path: string, query: URLSearchParams, response: http.ServerResponse, route: () => unknown = () => this.routes[path](query)): void {
    const failed = (error: unknown): void => {
      const { status, code } = statusOf(error);
      if (status === 500) this.logger.error({ err: error, path }, "admin request failed");
      sendJson(response, status, { error: (error as Error).message, code });
    };
    let body: unknown;
    try {
      body = route();
    } catch (error) {
      failed(error);
      return;
    }
    Promise.resolve(body).then((resolved) => {
      if (resolved instanceof TextResponse) response.writeHead(resolved.status, { "content-type": resolved.contentType }).end(resolved.text);
      else sendJson(response, 200, resolved);
    }, failed);
  }
}

/**
 * Tells whether a Host header names an IP address or localhost, or is absent. A web page in a
 * browser on the node can make a host name of its own site resolve to 127.0.0.1 (DNS rebinding),
 * so that it reads the admin API as same-origin. Its requests carry that host name.
 */
export function addressedByIpOrLocalhost(host: string | undefined): boolean {
  if (host === undefined) return true;
  const name = /^\[([^\]]*)\](?::\d*)?$/.exec(host)?.[1] ?? host.replace(/:\d*$/, "");
  return name.toLowerCase() === "localhost" || net.isIP(name) !== 0;
}

function statusOf(error: unknown): { status: number; code: string } {
  if (error instanceof AdminUnavailableError) return { status: 503, code: "UNAVAILABLE" };
  if (error instanceof AgentError && error.code === "INVALID_QUERY") return { status: 400, code: error.code };
  if (error instanceof AgentError && error.code === "UNKNOWN_WORKLOAD") return { status: 404, code: error.code };
  return { status: 500, code: error instanceof AgentError ? error.code : "INTERNAL" };
}

function sendJson(response: http.ServerResponse, status: number, body: unknown): void {
  response.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body, null, 2) + "\n");
}
