// Loopback fixtures for the proxy tests: two "pods" on 127.77.<subnet>.1 and .2, an embedded CA,
// the outbound proxy of the first pod, the inbound HBONE server of the second, and test applications.

import crypto from "node:crypto";
import fs from "node:fs";
import http2 from "node:http2";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import tls from "node:tls";
import type { ExecutionContext } from "ava";
import type { AuditEvent, AuditRecord, AuditRecorder, ConnectionOpenedRecord } from "../../agent/audit/record";
import { EmbeddedCa, initCa } from "../../agent/identity/ca";
import { CertManager, type CertificateProvider } from "../../agent/identity/cert-manager";
import { silentLogger } from "../../agent/log";
import type { PodNetwork } from "../../agent/proxy/pod-network";
import { InboundHboneServer } from "../../agent/proxy/inbound";
import { OutboundProxy, type DestinationTarget } from "../../agent/proxy/outbound";
import type { AuthorizationResult, RbacConnection } from "../../agent/rbac/types";
import type { Identity, Workload } from "../../agent/state/types";

export const TRUST_DOMAIN = "cluster.local";

/** A pod emulated on one loopback address: it listens there and connects from there. */
export class LoopbackPodNetwork implements PodNetwork {
  constructor(readonly ip: string) {}

  listen(server: net.Server, port: number): Promise<void> {
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen({ port, host: this.ip }, () => {
        server.off("error", reject);
        resolve();
      });
    });
  }

  connect(host: string, port: number): net.Socket {
    return net.connect({ host, port, localAddress: this.ip });
  }
}

/** An audit recorder that keeps records in memory: completion records in `records`, the others in `opened`. */
export class MemorySink implements AuditRecorder {
  readonly records: AuditRecord[] = [];
  readonly opened: ConnectionOpenedRecord[] = [];
  #waiters: (() => void)[] = [];

  write(record: AuditEvent): void {
    if (record.type === "connection.completed") this.records.push(record);
    else if (record.type === "connection.opened") this.opened.push(record);
    for (const wake of this.#waiters.splice(0)) {
      wake();
    }
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}

  /** Waits until a record of the given direction exists, and returns the first one. */
  async next(direction: "inbound" | "outbound", timeoutMs = 5_000): Promise<AuditRecord> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.records.find((record) => record.direction === direction);
      if (found) {
        return found;
      }
      if (Date.now() > deadline) {
        throw new Error(`no ${direction} record within ${timeoutMs} ms; records: ${JSON.stringify(this.records)}`);
      }
      await new Promise<void>((resolve) => {
        this.#waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
  }
}

export function workload(name: string, namespace: string, serviceAccount: string, ip: string): Workload {
  return {
    uid: `${namespace}/${name}`,
    name,
    namespace,
    serviceAccount,
    nodeName: "node-1",
    ip,
    labels: { app: name },
    namedPorts: {},
    hostNetwork: false,
    ready: true,
    source: { file: "test", document: 0 },
  };
}

export function identity(namespace: string, serviceAccount: string, trustDomain = TRUST_DOMAIN): Identity {
  return { trustDomain, namespace, serviceAccount };
}

/** Creates a CA in a temporary folder that the test removes. */
export async function createCa(t: ExecutionContext, trustDomain = TRUST_DOMAIN): Promise<EmbeddedCa> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ambient-ca-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  await initCa(dir, { trustDomain });
  return EmbeddedCa.load(dir);
}

export const ALLOW_ALL: AuthorizationResult = { decision: "allow", reason: "no_policy", dryRun: [] };

export interface MeshOptions {
  /** Third octet of the 127.77.x.0 addresses, unique per test so tests can run concurrently. */
  subnet: number;
  authorize?: (connection: RbacConnection) => AuthorizationResult;
  /** Expected identity of the destination; the server's real identity when absent. */
  expectedIdentity?: Identity;
  destination?: { ip: string; port: number } | null;
  passthrough?: boolean;
  /** The trust domain the inbound server accepts. */
  serverTrustDomain?: string;
}

export interface Mesh {
  clientIp: string;
  serverIp: string;
  ca: EmbeddedCa;
  certs: CertManager;
  clientIdentity: Identity;
  serverIdentity: Identity;
  sourceAudit: MemorySink;
  destinationAudit: MemorySink;
  outbound: OutboundProxy;
  inbound: InboundHboneServer;
  authorizations: RbacConnection[];
  /** Where the next captured connection was headed; tests change it per connection. */
  destination: { ip: string; port: number } | null;
}

/** Starts a client pod with its outbound proxy and a server pod with its inbound HBONE server. */
export async function startMesh(t: ExecutionContext, options: MeshOptions): Promise<Mesh> {
  const clientIp = `127.77.${options.subnet}.1`;
  const serverIp = `127.77.${options.subnet}.2`;
  const ca = await createCa(t);
  const certs = new CertManager(ca, silentLogger());
  t.teardown(() => certs.close());
  const clientWorkload = workload("sleep", "default", "sleep", clientIp);
  const serverWorkload = workload("echo", "apps", "echo", serverIp);
  const clientIdentity = identity("default", "sleep");
  const serverIdentity = identity("apps", "echo");
  const sourceAudit = new MemorySink();
  const destinationAudit = new MemorySink();
  const authorizations: RbacConnection[] = [];

  const inbound = new InboundHboneServer({
    node: "node-2",
    workload: serverWorkload,
    identity: serverIdentity,
    network: new LoopbackPodNetwork(serverIp),
    certs,
    trustDomain: options.serverTrustDomain ?? TRUST_DOMAIN,
    authorize: (connection) => {
      authorizations.push(connection);
      return options.authorize ? options.authorize(connection) : ALLOW_ALL;
    },
    lookupSource: (ip) => (ip === clientIp ? clientWorkload : undefined),
    audit: destinationAudit,
    logger: silentLogger(),
  });
  const mesh: Mesh = {
    clientIp,
    serverIp,
    ca,
    certs,
    clientIdentity,
    serverIdentity,
    sourceAudit,
    destinationAudit,
    inbound,
    authorizations,
    destination: options.destination === undefined ? { ip: serverIp, port: 8080 } : options.destination,
    outbound: undefined as unknown as OutboundProxy,
  };
  mesh.outbound = new OutboundProxy({
    node: "node-1",
    workload: clientWorkload,
    identity: clientIdentity,
    network: new LoopbackPodNetwork(clientIp),
    certs,
    originalDestination: () => mesh.destination ?? undefined,
    resolveDestination: (ip, port): DestinationTarget =>
      options.passthrough || ip !== serverIp
        ? { kind: "passthrough", address: { ip, port } }
        : { kind: "hbone", workload: serverWorkload, identity: options.expectedIdentity ?? serverIdentity, address: { ip, port } },
    audit: sourceAudit,
    logger: silentLogger(),
  });
  await inbound.start();
  t.teardown(() => inbound.stop());
  await mesh.outbound.start();
  t.teardown(() => mesh.outbound.stop());
  return mesh;
}

/** Starts a TCP server on ip:port; `handle` gets each accepted socket (half-open allowed). */
export async function startApp(
  t: ExecutionContext,
  ip: string,
  port: number,
  handle: (socket: net.Socket) => void,
): Promise<net.Server> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => undefined);
    handle(socket);
  });
  await new LoopbackPodNetwork(ip).listen(server, port);
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  );
  return server;
}

/** Echoes every byte and closes its side after the client's FIN. */
export function echo(socket: net.Socket): void {
  socket.pipe(socket);
}

export interface Exchange {
  received: Buffer;
  /** The client socket's error code, when it failed (ECONNRESET for a reset). */
  errorCode?: string;
}

/**
 * Connects through the client pod's outbound proxy, writes `payload`, half-closes, and collects what
 * comes back until the connection ends or fails.
 */
export function exchange(mesh: Mesh, payload: Buffer, timeoutMs = 20_000): Promise<Exchange> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const socket = net.connect({ host: mesh.clientIp, port: 15001, localAddress: mesh.clientIp });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`exchange did not finish within ${timeoutMs} ms after ${Buffer.concat(chunks).length} bytes`));
    }, timeoutMs);
    let errorCode: string | undefined;
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", (error: NodeJS.ErrnoException) => (errorCode ??= error.code ?? error.message));
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ received: Buffer.concat(chunks), errorCode });
    });
    socket.end(payload);
  });
}

export function sha256(data: Buffer): string {
  return crypto.createHash("sha256").update(data).digest("hex");
}

/** Opens an HBONE connection to the server pod by hand, with any certificate, for malformed requests. */
export async function rawHboneSession(
  mesh: Mesh,
  tlsOptions: tls.ConnectionOptions,
): Promise<http2.ClientHttp2Session> {
  const options: tls.ConnectionOptions = {
    socket: net.connect({ host: mesh.serverIp, port: 15008, localAddress: mesh.clientIp }),
    ALPNProtocols: ["h2"],
    servername: "",
    checkServerIdentity: () => undefined,
    ...tlsOptions,
  };
  const socket = tls.connect(options);
  await new Promise<void>((resolve, reject) => {
    socket.once("secureConnect", resolve);
    socket.once("error", reject);
  });
  const session = http2.connect(`https://${mesh.serverIp}:15008`, { createConnection: () => socket });
  session.on("error", () => undefined);
  return session;
}

/** Sends one CONNECT and returns the response status, or the error that ended the stream first. */
export function connectStatus(
  session: http2.ClientHttp2Session,
  headers: http2.OutgoingHttpHeaders,
): Promise<{ status?: number; error?: string }> {
  return new Promise((resolve) => {
    const stream = session.request(headers, { endStream: false });
    stream.on("response", (response) => {
      resolve({ status: Number(response[":status"]) });
      stream.close();
    });
    stream.on("error", (error: NodeJS.ErrnoException) => resolve({ error: error.code ?? error.message }));
    stream.on("close", () => resolve({ error: `closed with RST_STREAM code ${stream.rstCode}` }));
  });
}

/** Waits until `server` counts at least `count` open connections, so a test acts on a tunnel that exists; fails after timeoutMs. */
export async function waitForOpen(server: { openConnections: number }, count = 1, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (server.openConnections < count) {
    if (Date.now() > deadline) throw new Error(`${server.openConnections} of ${count} connections open after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
