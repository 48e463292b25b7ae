// The agentctl side of the agent's admin API: the --admin option, HTTP requests with a timeout, and
// the usage error that makes agentctl exit with status 2.

import http from "node:http";
import { listProblem, shapeProblem, type Shape } from "./view-shapes";

export const DEFAULT_ADMIN = "127.0.0.1:15000";
export const ADMIN_TIMEOUT_MS = 5_000;

/** A missing or malformed option: agentctl prints the message with the command's synopsis and exits with status 2. */
export class UsageError extends Error {}

/** A route that the agent does not serve (status 404), such as a route newer than the agent. */
export class RouteNotFoundError extends Error {}

/** Runs an option parser; an unknown option or a missing value becomes a usage error. */
export function asUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/** Returns the --admin address, or the default; anything but HOST:PORT is a usage error. */
export function validAdmin(value: string | undefined): string {
  const address = value ?? DEFAULT_ADMIN;
  const match = /^(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d{1,5})$/.exec(address);
  if (match === null || Number(match[2]) < 1 || Number(match[2]) > 65535) {
    throw new UsageError(`invalid --admin ${JSON.stringify(address)}: write HOST:PORT with a port from 1 to 65535, for example ${DEFAULT_ADMIN}`);
  }
  return address;
}

/** Sends one request to the admin API and returns the status and the body as text. */
export function adminRequest(address: string, method: "GET" | "POST", requestPath: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const request = http.request(`http://${address}${requestPath}`, { method, timeout: ADMIN_TIMEOUT_MS }, (response) => {
      let body = "";
      response.setEncoding("utf8");
      response.on("data", (chunk) => (body += chunk));
      response.on("end", () => resolve({ status: response.statusCode ?? 0, text: body }));
    });
    request.on("timeout", () => request.destroy(new Error(`no response within ${ADMIN_TIMEOUT_MS / 1000} s`)));
    request.on("error", (error: NodeJS.ErrnoException) => {
      // Node's HTTP parser codes start with HPE_: a server responded, but not in HTTP.
      if (error.code?.startsWith("HPE_")) reject(notAnAgentError(address, method, requestPath, `a response that is not HTTP: ${error.message}`));
      else reject(new Error(`cannot reach the agent's admin API at ${address}: ${error.message}; is the agent running (and in this network namespace)?`));
    });
    request.end();
  });
}

/**
 * The agent's own response to a path it does not serve: status 404 with {"error": "not found: PATH;
 * try ...", "code": "NOT_FOUND"}, or with that text alone from older agents. Any other response
 * without JSON comes from a server that is no agent.
 */
const AGENT_NOT_FOUND_TEXT = /^not found: \//;

/** Returns the error for a response that no ambient-agent admin API sends; `returned` describes it. */
export function notAnAgentError(address: string, method: string, requestPath: string, returned: string): Error {
  return new Error(
    `the server at ${address} is not an ambient-agent admin API (${method} ${requestPath} returned ${returned}); pass the agent's admin API address with --admin (default ${DEFAULT_ADMIN})`,
  );
}

/** Returns the first `max` characters of a response body on one line, for an error message. */
export function bodyExcerpt(text: string, max = 120): string {
  const line = text.replace(/\s+/g, " ").trim();
  if (line === "") return "an empty body";
  return JSON.stringify(line.length > max ? `${line.slice(0, max)}...` : line);
}

/**
 * Requests a JSON body from the admin API. A 400 response is a usage error, a 404 a
 * RouteNotFoundError, and any other status but 200 an error with the agent's message. A response
 * that the agent does not send, such as HTML or JSON without an "error" field on an error status,
 * is an error saying that the server is no agent.
 */
export async function adminJson(address: string, requestPath: string, method: "GET" | "POST" = "GET"): Promise<unknown> {
  const { status, text } = await adminRequest(address, method, requestPath);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    if (status === 404 && AGENT_NOT_FOUND_TEXT.test(text)) throw routeNotFound(address, method, requestPath);
    throw notAnAgentError(address, method, requestPath, `status ${status} and no JSON: ${bodyExcerpt(text)}`);
  }
  const fields: { error?: unknown; code?: unknown; server?: unknown } = body !== null && typeof body === "object" ? body : {};
  const message = typeof fields.error === "string" ? fields.error : undefined;
  if (status === 200) return body;
  // The agent's metrics and readiness servers name themselves in their errors.
  if (typeof fields.server === "string" && fields.server !== "admin API") {
    throw new Error(`the server at ${address} is the agent's ${fields.server}, not its admin API; pass the admin API address with --admin (default ${DEFAULT_ADMIN})`);
  }
  if (message === undefined) throw notAnAgentError(address, method, requestPath, `status ${status} and JSON without an "error" field`);
  if (status === 400) throw new UsageError(message);
  if (status === 404 && (fields.code === "NOT_FOUND" || AGENT_NOT_FOUND_TEXT.test(message))) throw routeNotFound(address, method, requestPath);
  if (status === 404) throw new RouteNotFoundError(message);
  throw new Error(message);
}

function routeNotFound(address: string, method: string, requestPath: string): RouteNotFoundError {
  return new RouteNotFoundError(`the agent at ${address} does not serve ${method} ${requestPath} (status 404); upgrade the agent to the version of agentctl`);
}

/** Requests a JSON object from the admin API and checks it against `shape` (see adminJson for the errors). */
export async function adminView<T>(address: string, requestPath: string, shape: Shape, method: "GET" | "POST" = "GET"): Promise<T> {
  const body = await adminJson(address, requestPath, method);
  const problem = shapeProblem(body, shape);
  if (problem !== undefined) throw notAnAgentError(address, method, requestPath, problem);
  return body as T;
}

/**
 * Requests a list from the admin API: the body is either the list itself or an object with the
 * list under `key`, such as [..] or {"workloads": [..]} for GET /workloads. Every item must fit
 * `itemShape`.
 */
export async function adminList<T>(address: string, requestPath: string, key: string, itemShape: Shape): Promise<T[]> {
  const body = await adminJson(address, requestPath);
  const wrapped = body !== null && typeof body === "object" && !Array.isArray(body) ? (body as Record<string, unknown>)[key] : undefined;
  const list = Array.isArray(wrapped) ? wrapped : body;
  const problem = listProblem(list, itemShape);
  if (problem !== undefined) throw notAnAgentError(address, "GET", requestPath, problem);
  return list as T[];
}
