// The node-local admin API: readiness, a dump of what the agent serves, and the authorization
// diagnostics behind `agentctl authz` and `agentctl policies`. Bound to localhost by default.

import http from "node:http";
import type { ManifestProblem } from "../discovery/manifest-problem";
import { AgentError } from "../errors";
import type { Logger } from "../log";
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

/** The JSON routes by path, such as "/config_dump". /healthz/ready is always served. */
export type AdminRoutes = Readonly<Record<string, AdminRoute>>;

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

/** Builds /authz/check?from=&to=, /authz/explain?pod= and /policies over the agent's current state. */
export function authorizationRoutes(diagnostics: AuthorizationDiagnostics): AdminRoutes {
  const currentState = (): MeshState => {
    const state = diagnostics.state();
    if (state === undefined) throw new AdminUnavailableError("the agent has not read its manifests yet; retry in a few seconds");
    return state;
  };
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

export class AdminServer {
  private readonly server: http.Server;

  constructor(
    private readonly address: string,
    private readonly routes: AdminRoutes,
    private readonly logger: Logger,
  ) {
    this.server = http.createServer((request, response) => this.handle(request, response));
  }

  async start(): Promise<void> {
    const { host, port } = parseAddress(this.address);
    await new Promise<void>((resolve, reject) => {
      this.server.once("error", (error: NodeJS.ErrnoException) => {
        reject(new Error(`admin API could not listen on ${this.address}: ${error.code ?? error.message}; pass --admin with a free address`));
      });
      this.server.listen(port, host, () => resolve());
    });
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
    const url = new URL(request.url ?? "/", "http://admin.invalid");
    const path = url.pathname;
    if (path === "/healthz/ready" && !Object.hasOwn(this.routes, path)) {
      response.writeHead(200, { "content-type": "text/plain" }).end("ready\n");
    } else if (request.method !== "GET" && request.method !== "HEAD") {
      sendJson(response, 405, { error: `method ${request.method} is not allowed; the admin API serves GET only` });
    } else if (Object.hasOwn(this.routes, path)) {
      this.serveRoute(path, url.searchParams, response);
    } else {
      const known = [...new Set(["/healthz/ready", ...Object.keys(this.routes)])].join(", ");
      response.writeHead(404, { "content-type": "text/plain" }).end(`not found: ${path}; try ${known}\n`);
    }
    this.logger.debug({ path, status: response.statusCode }, "admin request");
  }

  private serveRoute(path: string, query: URLSearchParams, response: http.ServerResponse): void {
    const failed = (error: unknown): void => {
      const { status, code } = statusOf(error);
      if (status === 500) this.logger.error({ err: error, path }, "admin request failed");
      sendJson(response, status, { error: (error as Error).message, code });
    };
    let body: unknown;
    try {
      body = this.routes[path](query);
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

function statusOf(error: unknown): { status: number; code: string } {
  if (error instanceof AdminUnavailableError) return { status: 503, code: "UNAVAILABLE" };
  if (error instanceof AgentError && error.code === "INVALID_QUERY") return { status: 400, code: error.code };
  if (error instanceof AgentError && error.code === "UNKNOWN_WORKLOAD") return { status: 404, code: error.code };
  return { status: 500, code: error instanceof AgentError ? error.code : "INTERNAL" };
}

function sendJson(response: http.ServerResponse, status: number, body: unknown): void {
  response.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body, null, 2) + "\n");
}
