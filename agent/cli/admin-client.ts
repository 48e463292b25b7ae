// The agentctl side of the agent's admin API: the --admin option, HTTP requests with a timeout, and
// the usage error that makes agentctl exit with status 2.

import http from "node:http";

export const DEFAULT_ADMIN = "127.0.0.1:15000";
export const ADMIN_TIMEOUT_MS = 5_000;

/** A missing or malformed option: agentctl prints the usage text and exits with status 2. */
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
    request.on("error", (error) =>
      reject(new Error(`cannot reach the agent's admin API at ${address}: ${error.message}; is the agent running (and in this network namespace)?`)),
    );
    request.end();
  });
}

/**
 * Requests a JSON body from the admin API. A 400 response is a usage error, a 404 a
 * RouteNotFoundError, and any other status but 200 an error with the agent's message.
 */
export async function adminJson(address: string, requestPath: string, method: "GET" | "POST" = "GET"): Promise<unknown> {
  const { status, text } = await adminRequest(address, method, requestPath);
  let body: { error?: string } | undefined;
  try {
    body = JSON.parse(text) as { error?: string };
  } catch {
    if (status === 404) throw new RouteNotFoundError(`the agent at ${address} does not serve ${method} ${requestPath} (status 404); upgrade the agent to the version of agentctl`);
    throw new Error(`the admin API at ${address} responded to ${requestPath} with status ${status} and no JSON: ${text.trim().slice(0, 200)}; is this agent older than agentctl?`);
  }
  const message = body !== null && typeof body === "object" && typeof body.error === "string" ? body.error : undefined;
  if (status === 400) throw new UsageError(message ?? `the agent rejected ${requestPath}`);
  if (status === 404) throw new RouteNotFoundError(message ?? `the agent at ${address} does not serve ${method} ${requestPath} (status 404); upgrade the agent to the version of agentctl`);
  if (status !== 200) throw new Error(message ?? `the admin API responded to ${requestPath} with status ${status}`);
  return body;
}

/**
 * Returns the list in a body that is either the list itself or an object with the list under
 * `key`, such as [..] or {"workloads": [..]} for GET /workloads.
 */
export function listIn<T>(body: unknown, key: string, address: string, requestPath: string): T[] {
  if (Array.isArray(body)) return body as T[];
  const list = body !== null && typeof body === "object" ? (body as Record<string, unknown>)[key] : undefined;
  if (Array.isArray(list)) return list as T[];
  throw new Error(`the admin API at ${address} responded to ${requestPath} with JSON that is neither a list nor an object with a "${key}" list; is this agent older than agentctl?`);
}
