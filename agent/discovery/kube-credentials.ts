// The API server's address and credentials, resolved once by @kubernetes/client-node in a worker
// thread (see kube-credentials-worker.ts), and the request options built from them. A token file
// (the in-cluster service account) is read again once a minute, so a rotated token is used.

import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import path from "node:path";
import { Worker } from "node:worker_threads";
import type { KubeConfig } from "@kubernetes/client-node";
import { AgentError } from "../errors";

/** The source of the agent's API server credentials: a kubeconfig file or the pod's service account. */
export type KubeCredentials = { kind: "kubeconfig"; path: string } | { kind: "in-cluster"; pathPrefix?: string };

/** Credentials as plain data: the server, the TLS material and the headers to send. */
export interface ResolvedCredentials {
  server: string;
  ca?: string;
  cert?: string;
  key?: string;
  rejectUnauthorized?: boolean;
  servername?: string;
  headers: Record<string, string>;
  /** A file whose content is the bearer token, read again when it is older than a minute. */
  tokenFile?: string;
  /** Credentials that the library must produce before each request (exec plugins, auth providers). */
  dynamic: boolean;
}

/** The agent and headers of one request. */
export interface RequestAuth {
  agent: http.Agent;
  headers: Record<string, string>;
}

/** How often a token file is read again; client-go and client-node use the same period. */
const TOKEN_FILE_MAX_AGE_MS = 60_000;
/** How long resolving the credentials may take, which includes loading the library. */
const RESOLVE_TIMEOUT_MS = 30_000;

/** Resolves the credentials in a worker thread. Throws AgentError INVALID_KUBECONFIG naming what to fix. */
export async function resolveCredentials(credentials: KubeCredentials): Promise<ResolvedCredentials> {
  if (credentials.kind === "in-cluster" && (!process.env.KUBERNETES_SERVICE_HOST || !process.env.KUBERNETES_SERVICE_PORT)) {
    throw new AgentError(
      "INVALID_KUBECONFIG",
      "--kubernetes without --kubeconfig reads the in-cluster configuration, but KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set; run the agent in a pod or pass --kubeconfig FILE",
    );
  }
  const reply = await runWorker(credentials);
  const where = credentials.kind === "kubeconfig" ? `the kubeconfig ${credentials.path}` : "the in-cluster configuration";
  if ("error" in reply) {
    const fix = credentials.kind === "kubeconfig" ? "fix the file or pass another with --kubeconfig" : "check the service account files mounted in the pod";
    throw new AgentError("INVALID_KUBECONFIG", `cannot read ${where}: ${reply.error}; ${fix}`);
  }
  const resolved = reply.resolved;
  if (resolved.server === "") {
    throw new AgentError("INVALID_KUBECONFIG", `${where} names no current cluster with a server address; set current-context to a context whose cluster has a server`);
  }
  let url: URL;
  try {
    url = new URL(resolved.server);
  } catch {
    throw new AgentError("INVALID_KUBECONFIG", `invalid API server address "${resolved.server}" in ${where}; write it as https://HOST:PORT`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new AgentError("INVALID_KUBECONFIG", `API server address "${resolved.server}" in ${where} is neither https nor http; write it as https://HOST:PORT`);
  }
  return { ...resolved, server: resolved.server.replace(/\/+$/, "") };
}

function runWorker(credentials: KubeCredentials): Promise<{ resolved: ResolvedCredentials } | { error: string }> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(path.join(__dirname, "kube-credentials-worker.js"), { workerData: credentials });
    const timer = setTimeout(() => {
      void worker.terminate();
      reject(new AgentError("INVALID_KUBECONFIG", `reading the API server credentials took more than ${RESOLVE_TIMEOUT_MS / 1000} s`));
    }, RESOLVE_TIMEOUT_MS);
    worker.once("message", (message: { resolved: ResolvedCredentials } | { error: string }) => {
      clearTimeout(timer);
      void worker.terminate();
      resolve(message);
    });
    worker.once("error", (error) => {
      clearTimeout(timer);
      reject(new AgentError("INTERNAL", `the worker that reads the API server credentials failed: ${error.message}`, { cause: error }));
    });
  });
}

/** Builds the agent and headers of each request from resolved credentials. */
export class CredentialSource {
  private readonly agent: http.Agent;
  private token: { value: string; readAt: number } | undefined;
  private library: KubeConfig | undefined;

  constructor(
    private readonly resolved: ResolvedCredentials,
    private readonly credentials: KubeCredentials,
  ) {
    const secure = resolved.server.startsWith("https:");
    const tls = { ca: resolved.ca, cert: resolved.cert, key: resolved.key, servername: resolved.servername, ...(resolved.rejectUnauthorized === false && { rejectUnauthorized: false }) };
    this.agent = secure ? new https.Agent({ keepAlive: true, ...tls }) : new http.Agent({ keepAlive: true });
  }

  /** Returns the agent and headers for the next request. */
  async requestAuth(): Promise<RequestAuth> {
    if (this.resolved.dynamic) return this.fromLibrary();
    const headers = { ...this.resolved.headers };
    if (this.resolved.tokenFile !== undefined) headers.Authorization = `Bearer ${this.readToken(this.resolved.tokenFile)}`;
    return { agent: this.agent, headers };
  }

  close(): void {
    this.agent.destroy();
  }

  private readToken(file: string): string {
    const now = Date.now();
    if (this.token === undefined || now - this.token.readAt > TOKEN_FILE_MAX_AGE_MS) {
      try {
        this.token = { value: fs.readFileSync(file, "utf8").trim(), readAt: now };
      } catch (error) {
        // A token that cannot be read again keeps the last one, which may still be valid.
        if (this.token === undefined) throw new AgentError("INVALID_KUBECONFIG", `cannot read the token file ${file}: ${(error as Error).message}`, { cause: error });
      }
    }
    return this.token!.value;
  }

  /** Asks the library for the credentials of a request, for exec plugins and auth providers. */
  private async fromLibrary(): Promise<RequestAuth> {
    if (this.library === undefined) {
      const { KubeConfig: ConfigClass } = require("@kubernetes/client-node") as typeof import("@kubernetes/client-node");
      const config = new ConfigClass();
      if (this.credentials.kind === "kubeconfig") config.loadFromFile(this.credentials.path);
      else config.loadFromCluster(this.credentials.pathPrefix);
      this.library = config;
    }
    const init = await this.library.applyToFetchOptions({});
    const headers: Record<string, string> = {};
    (init.headers as unknown as { forEach(callback: (value: string, key: string) => void): void }).forEach((value, key) => {
      headers[key] = value;
    });
    return { agent: init.agent as http.Agent, headers };
  }
}
