// A fake Kubernetes API server for the tests, because no real one can run on the test machine. It
// serves list, watch, GET and PATCH for namespaces, pods, services, endpointslices, the
// security.istio.io policies and apps/v1 daemonsets over HTTP or HTTPS with the wire format of the
// real server, so @kubernetes/client-node, client-go and kubectl can all talk to it. The test changes
// the objects directly (put, remove, patchLabels) and can simulate compaction, restarts, outages,
// revoked permissions and responses of something else in front of the server (respondFirst).

import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import { netnsSocket } from "../../agent/capture/native";
import { discoveryDocument } from "./fake-kube-discovery";
import { resourceByName, routeOf, type ResourceType, type Route } from "./fake-kube-resources";
import { errorReply, getOne, list, patch, RequestError, resourceVersionParam, selectorOf, type Reply } from "./fake-kube-requests";
import type { KubeObject } from "./fake-kube-selectors";
import { DEFAULT_HISTORY_LIMIT, KubeStore } from "./fake-kube-store";
import { createFakeKubeCa, issueServerCredentials, writeKubeconfigFile, type FakeKubeCa } from "./fake-kube-tls";
import { WatchStream } from "./fake-kube-watch";
import { listenOn } from "./netns-sockets";

export type { KubeObject } from "./fake-kube-selectors";
export type { ResourceName } from "./fake-kube-resources";

export interface FakeKubeApiOptions {
  /** Serve HTTPS with a CA and server certificate made at start; caPem is then set. Default false. */
  tls?: boolean;
  /** When set, every request without `Authorization: Bearer <token>` gets 401. */
  token?: string;
  /** Address to listen on in this process's namespace; default 127.0.0.1. */
  host?: string;
  /** Port; default 0, an ephemeral port. */
  port?: number;
  /** Interval of BOOKMARK events on watches that allow them, in ms; default 1000. */
  bookmarkIntervalMs?: number;
  /** Number of changes kept for watches and continue tokens; default 50,000. */
  historyLimit?: number;
}

/** One request as the server received it. */
export interface RequestRecord {
  method: string;
  path: string;
  query: Record<string, string>;
}

/** A response that a test sends in place of the server's own (see respondFirst). */
export interface ResponseOverride {
  code: number;
  /** The body as sent; JSON.stringify it for a JSON body. */
  body: string;
  /** Default application/json. */
  contentType?: string;
}

/** Returns the response to send in place of the server's own, or undefined to let the server respond. */
export type RequestInterceptor = (request: RequestRecord) => ResponseOverride | undefined;

/** Number of requests kept in `requests`; older ones are dropped. */
export const REQUEST_LOG_LIMIT = 1000;
const MAX_BODY_BYTES = 3 * 1024 * 1024;
const DEFAULT_BOOKMARK_INTERVAL_MS = 1000;

/** A listener inside another network namespace that hands its connections to the main server. */
interface NetnsListener {
  server: net.Server;
  url: string;
}

export class FakeKubeApi {
  /** Base URL in this process's namespace, such as https://127.0.0.1:41234. */
  url = "";
  /** PEM of the CA that signed the server certificate; undefined without TLS. */
  readonly caPem: string | undefined;
  readonly token: string | undefined;
  /** The newest requests, oldest first, at most REQUEST_LOG_LIMIT. */
  readonly requests: RequestRecord[] = [];

  readonly #store: KubeStore;
  readonly #server: http.Server;
  readonly #ca: FakeKubeCa | undefined;
  #tlsIps: string[];
  readonly #bookmarkIntervalMs: number;
  readonly #watches = new Set<WatchStream>();
  readonly #sockets = new Set<net.Socket>();
  readonly #netnsListeners: NetnsListener[] = [];
  #outage = false;
  #refusal: 401 | 403 | undefined;
  #interceptor: RequestInterceptor | undefined;

  private constructor(options: FakeKubeApiOptions, ca: FakeKubeCa | undefined, server: (handler: http.RequestListener) => http.Server) {
    this.token = options.token;
    this.#ca = ca;
    this.caPem = ca?.certPem;
    this.#tlsIps = [];
    this.#bookmarkIntervalMs = options.bookmarkIntervalMs ?? DEFAULT_BOOKMARK_INTERVAL_MS;
    this.#store = new KubeStore(options.historyLimit ?? DEFAULT_HISTORY_LIMIT);
    this.#server = server((request, response) => this.#handle(request, response));
    this.#server.prependListener("connection", (socket: net.Socket) => this.#track(socket));
  }

  /** Starts a server and resolves once it listens. */
  static async start(options: FakeKubeApiOptions = {}): Promise<FakeKubeApi> {
    const host = options.host ?? "127.0.0.1";
    let api: FakeKubeApi;
    if (options.tls) {
      const ca = await createFakeKubeCa();
      const credentials = await issueServerCredentials(ca, ipSans([host]));
      api = new FakeKubeApi(options, ca, (handler) => https.createServer({ ...credentials, minVersion: "TLSv1.2" }, handler));
      api.#tlsIps = ipSans([host]);
    } else {
      api = new FakeKubeApi(options, undefined, (handler) => http.createServer(handler));
    }
    await new Promise<void>((resolve, reject) => {
      api.#server.once("error", reject);
      api.#server.listen(options.port ?? 0, host, () => resolve());
    });
    api.url = api.#urlOf(host, (api.#server.address() as net.AddressInfo).port);
    return api;
  }

  #urlOf(host: string, port: number): string {
    const scheme = this.#ca ? "https" : "http";
    return `${scheme}://${net.isIPv6(host) ? `[${host}]` : host}:${port}`;
  }

  // --- Test controls -------------------------------------------------------------------------

  /** The current resourceVersion, as the server reports it. */
  get resourceVersion(): string {
    return String(this.#store.resourceVersion);
  }

  /** Creates or replaces an object (ADDED or MODIFIED on watches) and returns a copy of the stored object. */
  put(object: KubeObject): KubeObject {
    return structuredClone(this.#store.put(object));
  }

  /** Returns a copy of a stored object; `namespace` is ignored for namespaces. */
  get(resource: string, namespace: string | undefined, name: string): KubeObject | undefined {
    const type = this.#resource(resource);
    const object = this.#store.get(type.name, type.namespaced ? namespace || "default" : undefined, name);
    return object && structuredClone(object);
  }

  /** Deletes an object (DELETED on watches); returns its last state, or undefined when it did not exist. */
  remove(resource: string, namespace: string | undefined, name: string): KubeObject | undefined {
    const removed = this.#store.remove(this.#resource(resource), namespace, name);
    return removed && structuredClone(removed);
  }

  /** Sets labels of a stored object, a null value removes the label. Throws when the object does not exist. */
  patchLabels(resource: string, namespace: string | undefined, name: string, labels: Record<string, string | null>): KubeObject {
    const object = this.get(resource, namespace, name);
    if (!object) throw new Error(`cannot patch labels of ${resource} ${namespace ?? ""}/${name}: no such object; put it first`);
    const merged = { ...(object.metadata?.labels ?? {}) } as Record<string, string>;
    for (const [key, value] of Object.entries(labels)) {
      if (value === null) delete merged[key];
      else merged[key] = value;
    }
    return this.put({ ...object, metadata: { ...object.metadata, labels: merged } });
  }

  /** Drops the change history: watches and continue tokens from an older resourceVersion then get 410. */
  compact(): void {
    this.#store.compact();
  }

  /** Ends every open watch stream cleanly, as an API server restart does; the clients then watch again. */
  closeWatches(): void {
    for (const watch of [...this.#watches]) watch.end();
  }

  /**
   * Starts or ends an outage. While it lasts, every open connection is reset and every new one is
   * reset as soon as it is accepted. The listening sockets stay open, so clients see resets, not refusals.
   */
  setOutage(on: boolean): void {
    this.#outage = on;
    if (!on) return;
    for (const socket of [...this.#sockets]) socket.resetAndDestroy();
    // The streams' "close" events come a tick later; ending them here makes openWatches() exact at once.
    for (const watch of [...this.#watches]) watch.end();
  }

  /**
   * Refuses every new request with `status` until called with undefined, as the real API server
   * does once a client's ServiceAccount (401) or RBAC objects (403) are deleted. Open watch streams
   * go on, because the real server authorizes a watch only when it opens.
   */
  refuseRequests(status: 401 | 403 | undefined): void {
    this.#refusal = status;
  }

  /**
   * Lets `interceptor` respond to each new request before the token and refusal checks, as a proxy
   * in front of the API server or an API server that is still starting does. Requests for which it
   * returns undefined reach the server as before; undefined removes the interceptor. The request is
   * recorded in `requests` either way.
   */
  respondFirst(interceptor: RequestInterceptor | undefined): void {
    this.#interceptor = interceptor;
  }

  /** Number of watch streams open now. */
  openWatches(): number {
    return this.#watches.size;
  }

  /**
   * Makes the server accept connections on ip:port inside the network namespace at netnsPath as
   * well, and returns the URL that reaches it from there. The listening socket is made in that
   * namespace by libagent on a helper thread; it is a plain socket, not flagged as the agent's,
   * because the agents connect to the API server from the node namespace, where capture does not act.
   * With TLS the server certificate is reissued to cover `ip`.
   */
  async listenInNetns(netnsPath: string, ip: string, port = 0): Promise<string> {
    if (this.#ca && !this.#tlsIps.includes(ip)) {
      this.#tlsIps = [...this.#tlsIps, ip];
      const credentials = await issueServerCredentials(this.#ca, this.#tlsIps);
      (this.#server as https.Server).setSecureContext({ ...credentials, minVersion: "TLSv1.2" });
    }
    const fd = netnsSocket(netnsPath, { agentSocket: false, bindIp: ip, port, backlog: 511 });
    const server = net.createServer({ allowHalfOpen: true }, (socket) => this.#server.emit("connection", socket));
    try {
      await listenOn(server, fd);
    } catch (error) {
      fs.closeSync(fd);
      throw error;
    }
    const url = this.#urlOf(ip, (server.address() as net.AddressInfo).port);
    this.#netnsListeners.push({ server, url });
    return url;
  }

  /** Writes a kubeconfig for this server: the URL (default `url`), the token and, with TLS, the CA. */
  writeKubeconfig(filePath: string, serverUrl: string = this.url): void {
    writeKubeconfigFile(filePath, { serverUrl, token: this.token, caPem: this.caPem });
  }

  /** Ends every watch, resets every connection and closes every listener. */
  async stop(): Promise<void> {
    this.closeWatches();
    for (const socket of [...this.#sockets]) socket.destroy();
    const servers = [this.#server, ...this.#netnsListeners.map((listener) => listener.server)];
    await Promise.all(servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
  }

  // --- Connections ---------------------------------------------------------------------------

  #track(socket: net.Socket): void {
    if (this.#outage) {
      socket.resetAndDestroy();
      return;
    }
    this.#sockets.add(socket);
    socket.once("close", () => this.#sockets.delete(socket));
  }

  #resource(name: string): ResourceType {
    const type = resourceByName(name);
    if (!type) throw new Error(`unknown resource "${name}": use namespaces, pods, services, endpointslices, authorizationpolicies, peerauthentications or daemonsets`);
    return type;
  }

  // --- Requests ------------------------------------------------------------------------------

  #handle(request: http.IncomingMessage, response: http.ServerResponse): void {
    const url = new URL(request.url ?? "/", "http://fake-kube-api");
    const record = this.#record(request.method ?? "", url);
    const override = this.#interceptor?.(record);
    if (override !== undefined) {
      response.writeHead(override.code, { "Content-Type": override.contentType ?? "application/json", "Content-Length": Buffer.byteLength(override.body) });
      response.end(override.body);
      return;
    }
    const badToken = this.token !== undefined && request.headers.authorization !== `Bearer ${this.token}`;
    if (badToken || this.#refusal === 401) {
      send(response, errorReply(401, "Unauthorized", "Unauthorized"));
      return;
    }
    if (this.#refusal === 403) {
      send(response, errorReply(403, "Forbidden", `${request.method} ${url.pathname} is forbidden: the client's RBAC objects were deleted`));
      return;
    }
    try {
      this.#dispatch(request, response, url);
    } catch (error) {
      if (error instanceof RequestError) send(response, errorReply(error.code, error.reason, error.message));
      else send(response, errorReply(500, "InternalError", `the fake API server failed: ${(error as Error).message}`));
    }
  }

  #record(method: string, url: URL): RequestRecord {
    const record = { method, path: url.pathname, query: Object.fromEntries(url.searchParams) };
    this.requests.push(record);
    if (this.requests.length > REQUEST_LOG_LIMIT) this.requests.splice(0, this.requests.length - REQUEST_LOG_LIMIT);
    return record;
  }

  #dispatch(request: http.IncomingMessage, response: http.ServerResponse, url: URL): void {
    if (request.method === "GET" && /^\/(healthz|readyz|livez)\/?$/.test(url.pathname)) {
      response.writeHead(200, { "Content-Type": "text/plain" }).end("ok");
      return;
    }
    const discovery = request.method === "GET" ? discoveryDocument(url.pathname, request.socket.localAddress ?? "") : undefined;
    if (discovery !== undefined) {
      send(response, { code: 200, body: discovery });
      return;
    }
    const route = safeRoute(url.pathname);
    if (!route) {
      send(response, errorReply(404, "NotFound", `the server could not find the requested resource (${request.method} ${url.pathname})`));
      return;
    }
    if (request.method === "GET") this.#read(route, url.searchParams, response);
    else if (request.method === "PATCH" && route.name !== undefined) this.#patch(route, request, response);
    else send(response, errorReply(405, "MethodNotAllowed", `${request.method} is not supported on ${url.pathname}: the fake API server serves GET, and PATCH of one object`));
  }

  #read(route: Route, query: URLSearchParams, response: http.ServerResponse): void {
    const watch = route.watchPrefix || query.get("watch") === "true" || query.get("watch") === "1";
    if (watch) this.#watch(route, query, response);
    else if (route.name !== undefined) send(response, getOne(this.#store, route));
    else send(response, list(this.#store, route, query));
  }

  #watch(route: Route, query: URLSearchParams, response: http.ServerResponse): void {
    const selector = selectorOf(route, query);
    resourceVersionParam(query);
    const timeout = query.get("timeoutSeconds");
    const stream = new WatchStream(
      this.#store,
      {
        type: route.type,
        namespace: route.namespace,
        selector,
        resourceVersion: query.get("resourceVersion") ?? undefined,
        allowBookmarks: query.get("allowWatchBookmarks") === "true",
        sendInitialEvents: query.get("sendInitialEvents") === "true",
        bookmarkIntervalMs: this.#bookmarkIntervalMs,
        timeoutSeconds: timeout !== null && /^\d+$/.test(timeout) ? Number(timeout) : undefined,
      },
      response,
      (ended) => this.#watches.delete(ended),
    );
    this.#watches.add(stream);
    stream.start();
  }

  #patch(route: Route, request: http.IncomingMessage, response: http.ServerResponse): void {
    readBody(request)
      .then((body) => send(response, patch(this.#store, route, request.headers["content-type"] ?? "", body)))
      .catch((error: unknown) => {
        if (error instanceof RequestError) send(response, errorReply(error.code, error.reason, error.message));
        else send(response, errorReply(500, "InternalError", `the fake API server failed: ${(error as Error).message}`));
      });
  }
}

/** IP addresses among the listen hosts, for the server certificate; 127.0.0.1 is always included. */
function ipSans(hosts: string[]): string[] {
  return [...new Set(["127.0.0.1", ...hosts.filter((host) => net.isIP(host) !== 0 && host !== "0.0.0.0" && host !== "::")])];
}

function safeRoute(pathname: string): Route | undefined {
  try {
    return routeOf(pathname);
  } catch {
    // decodeURIComponent rejects a malformed escape, and no resource has such a path.
    return undefined;
  }
}

function send(response: http.ServerResponse, reply: Reply): void {
  if (response.headersSent || response.destroyed) return;
  const body = JSON.stringify(reply.body);
  response.writeHead(reply.code, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  response.end(body);
}

function readBody(request: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    request.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    request.on("end", () => {
      if (size > MAX_BODY_BYTES) reject(new RequestError(413, "RequestEntityTooLarge", `request body of ${size} bytes is larger than the limit of ${MAX_BODY_BYTES}`));
      else resolve(Buffer.concat(chunks).toString("utf8"));
    });
    request.on("error", reject);
  });
}
