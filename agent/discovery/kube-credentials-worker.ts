// Runs in a worker thread: loads the API server credentials with @kubernetes/client-node and posts
// them back as plain data. Once loaded, the library's generated API modules take about 50 MiB of
// memory. A worker that exits gives most of that back, so the agent keeps only what it uses.

import { parentPort, workerData } from "node:worker_threads";
import type { KubeCredentials, ResolvedCredentials } from "./kube-credentials";

async function resolve(credentials: KubeCredentials): Promise<ResolvedCredentials> {
  const { KubeConfig } = require("@kubernetes/client-node") as typeof import("@kubernetes/client-node");
  const config = new KubeConfig();
  if (credentials.kind === "kubeconfig") config.loadFromFile(credentials.path);
  else config.loadFromCluster(credentials.pathPrefix);
  const cluster = config.getCurrentCluster();
  const user = config.getCurrentUser();
  const tokenFile = (user?.authProvider?.config as { tokenFile?: unknown } | undefined)?.tokenFile;
  // Exec plugins and auth providers other than a token file make credentials that expire, so the
  // agent then loads the library itself and gets credentials from it before each request. It
  // does the same for a cluster reached through a proxy.
  // A proxy-url is honoured by the library's own HTTP agent only.
  const dynamic = user?.exec !== undefined || (user?.authProvider !== undefined && typeof tokenFile !== "string") || Boolean(cluster?.proxyUrl);
  const options: { headers: Record<string, string>; ca?: Buffer; cert?: Buffer; key?: Buffer; rejectUnauthorized?: boolean; servername?: string; auth?: string } = { headers: {} };
  if (!dynamic) await config.applyToHTTPSOptions(options as never);
  return {
    server: cluster?.server ?? "",
    ca: options.ca?.toString(),
    cert: options.cert?.toString(),
    key: options.key?.toString(),
    rejectUnauthorized: options.rejectUnauthorized,
    servername: options.servername,
    headers: { ...options.headers, ...(options.auth ? { authorization: `Basic ${Buffer.from(options.auth).toString("base64")}` } : {}) },
    tokenFile: typeof tokenFile === "string" ? tokenFile : undefined,
    dynamic,
  };
}

resolve(workerData as KubeCredentials).then(
  (resolved) => parentPort!.postMessage({ resolved }),
  (error: unknown) => parentPort!.postMessage({ error: (error as Error)?.message ?? String(error) }),
);
