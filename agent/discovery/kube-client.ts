// The connection to the Kubernetes API server: credentials from a kubeconfig file or from the
// pod's service account (in-cluster), plain requests for lists and patches, and watch streams.
// @kubernetes/client-node reads the configuration (kube-credentials.ts). Requests go through
// node:http, for two reasons. Objects stay plain decoded JSON, which the manifest readers check
// field by field. And every event of a watch stream is handled before its end is reported.

import http from "node:http";
import https from "node:https";
import { CredentialSource, resolveCredentials, type KubeCredentials } from "./kube-credentials";

export type { KubeCredentials } from "./kube-credentials";

/** The `details` of a meta/v1 Status: the object that a failed request names. */
export interface KubeStatusDetails {
  name?: string;
  group?: string;
  kind?: string;
}

/** A response whose status is not 2xx, with the Status message the server sent. */
export class KubeApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly reason?: string,
    /** The server's Retry-After, in seconds, when it sent one. */
    readonly retryAfterSeconds?: number,
    /** The string fields of the body's `details`, set only when the body is a meta/v1 Status (kind "Status"). */
    readonly details?: KubeStatusDetails,
  ) {
    super(message);
    this.name = "KubeApiError";
  }
}

/** The largest response body read, so that a broken server cannot fill the agent's memory. */
const MAX_RESPONSE_BYTES = 256 * 1024 * 1024;
/** The maximum length of one watch event; Kubernetes objects are at most a few megabytes. */
const MAX_WATCH_LINE_BYTES = 16 * 1024 * 1024;
/** TCP keep-alive on watch connections, so that a dead server is noticed. */
const WATCH_KEEPALIVE_MS = 30_000;
/** How long a list page or a patch may take. */
const REQUEST_TIMEOUT_MS = 60_000;

export interface RequestOptions {
  query?: Record<string, string | number | boolean | undefined>;
  body?: unknown;
  contentType?: string;
  timeoutMs?: number;
}

/** Called once the server accepted the watch (status 200), with each event, and once the stream ended. */
export interface WatchHandlers {
  opened?(): void;
  event(type: string, object: unknown): void;
  done(error: unknown): void;
}

export class KubeClient {
  private constructor(
    private readonly auth: CredentialSource,
    readonly server: string,
  ) {}

  /** Loads the credentials. Throws an AgentError that names the file or variable to fix. */
  static async load(credentials: KubeCredentials): Promise<KubeClient> {
    const resolved = await resolveCredentials(credentials);
    return new KubeClient(new CredentialSource(resolved, credentials), resolved.server);
  }

  /** Closes the idle connections of lists and patches; open watches end with their own end function. */
  close(): void {
    this.auth.close();
  }

  /** Sends one request and returns the decoded JSON body. Throws KubeApiError for a non-2xx status. */
  async request(method: string, path: string, options: RequestOptions = {}): Promise<unknown> {
    const url = new URL(this.server + path);
    for (const [key, value] of Object.entries(options.query ?? {})) if (value !== undefined) url.searchParams.set(key, String(value));
    const auth = await this.auth.requestAuth();
    const headers: Record<string, string> = { accept: "application/json", ...auth.headers };
    let payload: Buffer | undefined;
    if (options.body !== undefined) {
      payload = Buffer.from(JSON.stringify(options.body));
      headers["content-type"] = options.contentType ?? "application/json";
      headers["content-length"] = String(payload.length);
    }
    const transport = url.protocol === "https:" ? https : http;
    return new Promise((resolve, reject) => {
      const request = transport.request(url, { method, headers, agent: auth.agent }, (response) => {
        const chunks: Buffer[] = [];
        let size = 0;
        response.on("data", (chunk: Buffer) => {
          size += chunk.length;
          if (size > MAX_RESPONSE_BYTES) {
            request.destroy(new Error(`the response to ${method} ${url.pathname} is larger than ${MAX_RESPONSE_BYTES} bytes`));
            return;
          }
          chunks.push(chunk);
        });
        response.on("error", reject);
        response.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          const status = response.statusCode ?? 0;
          let body: unknown;
          try {
            body = text === "" ? undefined : JSON.parse(text);
          } catch {
            body = undefined;
          }
          if (status < 200 || status > 299) {
            reject(apiError(status, body, `${method} ${url.pathname}`, response.headers["retry-after"]));
            return;
          }
          if (body === undefined) {
            reject(new KubeApiError(status, `${method} ${url.pathname} returned a body that is not JSON`));
            return;
          }
          resolve(body);
        });
      });
      request.setTimeout(options.timeoutMs ?? REQUEST_TIMEOUT_MS, () => request.destroy(new Error(`${method} ${url.pathname} timed out after ${(options.timeoutMs ?? REQUEST_TIMEOUT_MS) / 1000} s`)));
      request.on("error", reject);
      request.end(payload);
    });
  }

  /**
   * Opens a watch stream: one JSON event per line. Every event of the stream reaches
   * `handlers.event` before `handlers.done`, which is called once: with undefined when the server
   * ended the stream, with the error otherwise. The returned function ends the stream.
   */
  async watch(path: string, query: Record<string, string | number | boolean | undefined>, handlers: WatchHandlers): Promise<() => void> {
    const url = new URL(this.server + path);
    url.searchParams.set("watch", "true");
    for (const [key, value] of Object.entries(query)) if (value !== undefined && value !== "") url.searchParams.set(key, String(value));
    const auth = await this.auth.requestAuth();
    const headers: Record<string, string> = { accept: "application/json", ...auth.headers };
    const transport = url.protocol === "https:" ? https : http;
    let ended = false;
    const done = (error: unknown): void => {
      if (ended) return;
      ended = true;
      handlers.done(error);
    };
    const request = transport.request(url, { method: "GET", headers, agent: auth.agent }, (response) => {
      const status = response.statusCode ?? 0;
      if (status !== 200) {
        const chunks: Buffer[] = [];
        response.on("data", (chunk: Buffer) => chunks.length < 64 && chunks.push(chunk));
        response.on("end", () => {
          let body: unknown;
          try {
            body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
          } catch {
            body = undefined;
          }
          done(apiError(status, body, `watch ${url.pathname}`, response.headers["retry-after"]));
        });
        response.on("error", done);
        return;
      }
      response.socket?.setKeepAlive(true, WATCH_KEEPALIVE_MS);
      handlers.opened?.();
      let pending = "";
      response.setEncoding("utf8");
      response.on("data", (chunk: string) => {
        if (ended) return;
        pending += chunk;
        if (pending.length > MAX_WATCH_LINE_BYTES) {
          request.destroy();
          done(new KubeApiError(200, `watch ${url.pathname}: an event is longer than ${MAX_WATCH_LINE_BYTES} bytes`));
          return;
        }
        let newline: number;
        while (!ended && (newline = pending.indexOf("\n")) >= 0) {
          const line = pending.slice(0, newline).trim();
          pending = pending.slice(newline + 1);
          if (line === "") continue;
          let event: { type?: unknown; object?: unknown };
          try {
            event = JSON.parse(line) as { type?: unknown; object?: unknown };
          } catch {
            request.destroy();
            done(new KubeApiError(200, `watch ${url.pathname}: the server sent a line that is not JSON`));
            return;
          }
          handlers.event(typeof event.type === "string" ? event.type : "", event.object);
        }
      });
      response.on("end", () => done(undefined));
      response.on("aborted", () => done(new Error(`watch ${url.pathname}: the connection closed in the middle of the stream`)));
      response.on("error", done);
    });
    request.on("error", done);
    request.end();
    return () => {
      done(undefined);
      request.destroy();
    };
  }
}

/** Builds the error of a failed request from the Status object the API server sent, when it sent one. */
function apiError(status: number, body: unknown, what: string, retryAfter?: string): KubeApiError {
  const statusObject = body as { kind?: unknown; message?: unknown; reason?: unknown; details?: unknown } | undefined;
  const message = typeof statusObject?.message === "string" ? statusObject.message : http.STATUS_CODES[status] ?? "unknown status";
  const reason = typeof statusObject?.reason === "string" ? statusObject.reason : undefined;
  const seconds = retryAfter !== undefined && /^\d{1,5}$/.test(retryAfter.trim()) ? Number(retryAfter.trim()) : undefined;
  const details = statusObject?.kind === "Status" ? statusDetailsOf(statusObject.details) : undefined;
  return new KubeApiError(status, `${what}: ${status} ${message}`, reason, seconds, details);
}

/** Extracts the string fields name, group and kind of a Status's `details`. Returns {} for an absent or malformed one. */
function statusDetailsOf(details: unknown): KubeStatusDetails {
  const fields = (typeof details === "object" && details !== null ? details : {}) as Record<string, unknown>;
  const kept: KubeStatusDetails = {};
  for (const key of ["name", "group", "kind"] as const) {
    const value = fields[key];
    if (typeof value === "string") kept[key] = value;
  }
  return kept;
}

/** Tells the status code of an error from a request or a watch, when it has one. */
export function statusOf(error: unknown): number | undefined {
  if (error instanceof KubeApiError) return error.status;
  const value = (error as { statusCode?: unknown; code?: unknown } | undefined)?.statusCode;
  return typeof value === "number" ? value : undefined;
}
