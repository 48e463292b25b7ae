// Certificate rotation at node scale: 1,000 identities held by one certificate manager, all
// re-issued while mutual-TLS connections between them keep opening and long-lived ones keep
// echoing. Every connection must succeed across the rotation.
//
// The TLS sockets are real: node:tls on loopback, TLS 1.3, the agent's secure contexts and its
// peer checks. The pods are not. Each identity is a client, and a few servers stand for pods.
// Run alone: node dist/test/bench/cert-rotation.js [--identities N] [--ttl SECONDS]

import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import tls from "node:tls";
import { EmbeddedCa, initCa } from "../../agent/identity/ca";
import { CertManager } from "../../agent/identity/cert-manager";
import { hboneTlsOptions, type CertificateIssuer, type WorkloadCertificate } from "../../agent/identity/certificate";
import { formatSpiffeId } from "../../agent/identity/spiffe";
import { silentLogger } from "../../agent/log";
import type { Identity } from "../../agent/state/types";
import { nearestRank, round } from "./stats";

export interface RotationSettings {
  identities: number;
  /** Lifetime of each certificate; all are re-issued once, half-way through it. */
  ttlSeconds: number;
  servers: number;
  /** Connections opened at once by the client loop. */
  concurrency: number;
  longLived: number;
}

export const ROTATION_FULL: RotationSettings = { identities: 1000, ttlSeconds: 40, servers: 10, concurrency: 4, longLived: 10 };
export const ROTATION_QUICK: RotationSettings = { identities: 200, ttlSeconds: 16, servers: 4, concurrency: 2, longLived: 4 };

export interface RotationFigures {
  identities: number;
  ttlSeconds: number;
  /** Seconds to issue every identity's first certificate, at most 8 CA requests at once. */
  initialIssueSeconds: number;
  /** Seconds from the first to the last re-issued certificate. */
  rotationSpreadSeconds: number;
  rotations: number;
  /** New mutual-TLS connections made while certificates rotated, and how many failed. */
  connections: number;
  failedConnections: number;
  /** Median handshake plus one echo, in ms. */
  connectionMedianMs: number;
  longLived: number;
  /** Long-lived connections that still echoed after every certificate had rotated. */
  longLivedSurvived: number;
  firstErrors: string[];
}

const TRUST_DOMAIN = "cluster.local";

export async function measureRotation(settings: RotationSettings, issuer?: CertificateIssuer): Promise<RotationFigures> {
  const caDir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-rotation-"));
  const servers: tls.Server[] = [];
  const manager = await newManager(caDir, settings, issuer);
  try {
    const identities = Array.from({ length: settings.identities }, (_, index) => identityOf(index));
    const issueStart = performance.now();
    for (const identity of identities) manager.retain(identity, `bench/${identity.serviceAccount}`);
    await Promise.all(identities.map((identity) => manager.get(identity)));
    const initialIssueSeconds = (performance.now() - issueStart) / 1000;

    const rotated = trackRotations(manager, identities);
    for (let index = 0; index < settings.servers; index += 1) servers.push(await startServer(manager, identities[index]));
    const longLived = await Promise.all(
      Array.from({ length: settings.longLived }, (_, index) => openLongLived(manager, identities[settings.servers + index], servers[index % servers.length], identities[index % servers.length])),
    );

    const traffic = await connectUntil(manager, identities, servers, settings, () => rotated.count >= identities.length);
    const survived = await Promise.all(longLived.map((connection) => connection.echo().then(() => true, () => false)));
    for (const connection of longLived) connection.socket.destroy();
    return {
      identities: settings.identities,
      ttlSeconds: settings.ttlSeconds,
      initialIssueSeconds: round(initialIssueSeconds, 2),
      rotationSpreadSeconds: round((rotated.last - rotated.first) / 1000, 2),
      rotations: rotated.count,
      connections: traffic.ok + traffic.failed,
      failedConnections: traffic.failed,
      connectionMedianMs: round(nearestRank([...traffic.durations].sort((a, b) => a - b), 0.5), 2),
      longLived: longLived.length,
      longLivedSurvived: survived.filter(Boolean).length,
      firstErrors: traffic.errors.slice(0, 5),
    };
  } finally {
    for (const server of servers) server.close();
    manager.close();
    fs.rmSync(caDir, { recursive: true, force: true });
  }
}

async function newManager(caDir: string, settings: RotationSettings, issuer?: CertificateIssuer): Promise<CertManager> {
  if (!issuer) {
    await initCa(caDir, { trustDomain: TRUST_DOMAIN });
    issuer = await EmbeddedCa.load(caDir);
  }
  return new CertManager(issuer, silentLogger(), { ttlSeconds: settings.ttlSeconds, getTimeoutMs: 60_000 });
}

function identityOf(index: number): Identity {
  return { trustDomain: TRUST_DOMAIN, namespace: `ns-${index % 50}`, serviceAccount: `sa-${index}` };
}

/** Counts the first re-issue of each identity, with the times of the first and the last. */
function trackRotations(manager: CertManager, identities: Identity[]): { count: number; first: number; last: number } {
  const state = { count: 0, first: 0, last: 0 };
  for (const identity of identities) {
    const stop = manager.onRotation(identity, () => {
      stop();
      const now = performance.now();
      if (state.count === 0) state.first = now;
      state.last = now;
      state.count += 1;
    });
  }
  return state;
}

/** Starts an echo server presenting `identity` that installs each rotated certificate once, as the inbound proxy does. */
async function startServer(manager: CertManager, identity: Identity): Promise<tls.Server> {
  const certificate = await manager.get(identity);
  const server = tls.createServer({ ...hboneTlsOptions(certificate), requestCert: true, rejectUnauthorized: true }, (socket) => {
    socket.on("error", () => undefined);
    socket.pipe(socket);
  });
  manager.onRotation(identity, (rotated) => server.setSecureContext(hboneTlsOptions(rotated)));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return server;
}

function portOf(server: net.Server): number {
  return (server.address() as net.AddressInfo).port;
}

/** Connects as `client` to a server that must present `expected`, as the outbound proxy does. */
function connect(certificate: WorkloadCertificate, server: tls.Server, expected: Identity): Promise<tls.TLSSocket> {
  const expectedUri = formatSpiffeId(expected);
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host: "127.0.0.1",
      port: portOf(server),
      secureContext: certificate.secureContext,
      servername: "",
      rejectUnauthorized: true,
      checkServerIdentity: (_host, peer) => (peer.subjectaltname === `URI:${expectedUri}` ? undefined : new Error(`server presented ${peer.subjectaltname}`)),
    });
    const timer = setTimeout(() => socket.destroy(new Error("no handshake within 5 s")), 5_000);
    socket.once("secureConnect", () => {
      clearTimeout(timer);
      resolve(socket);
    });
    socket.once("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

/** Sends one byte and waits for its echo; rejects when the connection fails or stays silent for 5 s. */
function echoOnce(socket: tls.TLSSocket): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => finish(new Error("no echo within 5 s")), 5_000);
    const finish = (error?: Error): void => {
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("error", finish);
      socket.off("close", onClose);
      if (error) reject(error);
      else resolve();
    };
    const onData = (): void => finish();
    const onClose = (): void => finish(new Error("the connection closed"));
    socket.on("data", onData);
    socket.once("error", finish);
    socket.once("close", onClose);
    socket.write("x");
  });
}

async function openLongLived(manager: CertManager, client: Identity, server: tls.Server, serverIdentity: Identity) {
  const socket = await connect(await manager.get(client), server, serverIdentity);
  socket.on("error", () => undefined);
  await echoOnce(socket);
  return { socket, echo: () => echoOnce(socket) };
}

/** Opens, echoes over and closes connections between random identities until `done` holds, at most 3 TTLs. */
async function connectUntil(
  manager: CertManager,
  identities: Identity[],
  servers: tls.Server[],
  settings: RotationSettings,
  done: () => boolean,
): Promise<{ ok: number; failed: number; durations: number[]; errors: string[] }> {
  const result = { ok: 0, failed: 0, durations: [] as number[], errors: [] as string[] };
  const deadline = performance.now() + settings.ttlSeconds * 3000;
  let next = 0;
  const worker = async (): Promise<void> => {
    // One more second after the last rotation, so that connections with the newest certificates are made too.
    let doneAt: number | undefined;
    while (performance.now() < deadline && (doneAt === undefined || performance.now() < doneAt + 1000)) {
      if (doneAt === undefined && done()) doneAt = performance.now();
      const client = identities[next % identities.length];
      const serverIndex = next % servers.length;
      next += 1;
      const started = performance.now();
      try {
        const socket = await connect(await manager.get(client), servers[serverIndex], identities[serverIndex]);
        await echoOnce(socket);
        socket.destroy();
        result.ok += 1;
        result.durations.push(performance.now() - started);
      } catch (error) {
        result.failed += 1;
        result.errors.push(`${formatSpiffeId(client)} -> ${formatSpiffeId(identities[serverIndex])}: ${(error as Error).message}`);
      }
    }
  };
  await Promise.all(Array.from({ length: settings.concurrency }, worker));
  return result;
}

function parseArgs(argv: string[]): RotationSettings {
  const settings = { ...(argv.includes("--quick") ? ROTATION_QUICK : ROTATION_FULL) };
  const valueOf = (flag: string): number | undefined => {
    const index = argv.indexOf(flag);
    return index >= 0 ? Number(argv[index + 1]) : undefined;
  };
  settings.identities = valueOf("--identities") ?? settings.identities;
  settings.ttlSeconds = valueOf("--ttl") ?? settings.ttlSeconds;
  return settings;
}

if (require.main === module) {
  measureRotation(parseArgs(process.argv.slice(2))).then(
    (figures) => {
      console.log(JSON.stringify(figures, null, 2));
      process.exitCode = figures.failedConnections === 0 && figures.longLivedSurvived === figures.longLived ? 0 : 1;
    },
    (error) => {
      console.error(error);
      process.exitCode = 1;
    },
  );
}
