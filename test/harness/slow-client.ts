// Hostile TCP clients for the end-to-end tests, run inside a pod's or a node's network namespace
// with `node slow-client.js RUN_PREFIX MODE ...`. RUN_PREFIX, the test run's prefix, only puts it in
// the command line, so that removeLeftovers() can end the client after a crashed run. Every mode is bounded in connections, bytes and time, and
// prints one JSON summary line on standard output when it ends.
//
//   hold HOST PORT CONNECTIONS INTERVAL_MS DURATION_MS [PAYLOAD] [LOCAL_ADDRESS]
//     Opens CONNECTIONS connections at once. On each it writes PAYLOAD one byte every INTERVAL_MS
//     (nothing when PAYLOAD is empty), and keeps it open until the server closes it or DURATION_MS
//     passes. PAYLOAD may contain \r, \n and \xHH escapes. LOCAL_ADDRESS binds the clients' source.
//   flood HOST PORT MAX_BYTES DURATION_MS
//     Opens one connection and writes up to MAX_BYTES as fast as it takes them, never reading,
//     until the server closes it or DURATION_MS passes.
//   garbage HOST PORT CONNECTIONS BYTES
//     Opens CONNECTIONS connections one after the other; each writes BYTES random bytes and waits
//     up to 3 s for the server to close it.
//
// It prints "connected" on standard error once every connection of a run is established or failed.

import crypto from "node:crypto";
import net from "node:net";
import type { Topology } from "./topology";

/** The outcome of one connection of a run. */
export interface HeldConnection {
  /** Time of the connect, in ms from the start; null when the connect failed. */
  connectedMs: number | null;
  /** Time the connection closed, in ms from the start; null when it was still open at the end. */
  closedMs: number | null;
  /** Bytes the kernel took from this client. */
  written: number;
  received: number;
  /** The first received bytes, as latin1 text. */
  head: string;
  /** The socket error code, when the connection ended with one (ECONNRESET, ECONNREFUSED). */
  error?: string;
}

export interface SlowClientSummary {
  connections: HeldConnection[];
}

/** The maximum duration of a run in any mode, in ms. */
const MAX_DURATION_MS = 600_000;
const MAX_CONNECTIONS = 512;
const FLOOD_CHUNK = Buffer.alloc(64 * 1024, 0x66);
const HEAD_BYTES = 64;

interface Connection {
  socket: net.Socket;
  outcome: HeldConnection;
  settled: Promise<void>;
}

function open(host: string, port: number, startMs: number, localAddress?: string): Connection {
  const outcome: HeldConnection = { connectedMs: null, closedMs: null, written: 0, received: 0, head: "" };
  const socket = net.connect({ host, port, ...(localAddress ? { localAddress } : {}) });
  const settled = new Promise<void>((resolve) => {
    socket.on("connect", () => {
      outcome.connectedMs = Date.now() - startMs;
      resolve();
    });
    socket.on("data", (chunk: Buffer) => {
      if (outcome.head.length < HEAD_BYTES) outcome.head += chunk.subarray(0, HEAD_BYTES - outcome.head.length).toString("latin1");
      outcome.received += chunk.length;
    });
    socket.on("error", (error: NodeJS.ErrnoException) => (outcome.error ??= error.code ?? error.message));
    socket.on("close", () => {
      outcome.closedMs = Date.now() - startMs;
      outcome.written = socket.bytesWritten - socket.writableLength;
      resolve();
    });
  });
  return { socket, outcome, settled };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits until every connection closed or `deadline` (ms since the epoch) passed. */
async function untilClosedOr(connections: Connection[], deadline: number): Promise<void> {
  while (Date.now() < deadline && connections.some((connection) => connection.outcome.closedMs === null)) await sleep(20);
}

async function hold(host: string, port: number, count: number, intervalMs: number, durationMs: number, payload: string, localAddress?: string): Promise<SlowClientSummary> {
  const startMs = Date.now();
  const deadline = startMs + durationMs;
  const connections = Array.from({ length: count }, () => open(host, port, startMs, localAddress));
  await Promise.all(connections.map((connection) => connection.settled));
  process.stderr.write("connected\n");
  for (let index = 0; index < payload.length && Date.now() < deadline; index += 1) {
    const open = connections.filter((connection) => connection.outcome.closedMs === null);
    if (open.length === 0) break;
    for (const { socket } of open) socket.write(payload[index], "latin1");
    await sleep(intervalMs);
  }
  await untilClosedOr(connections, deadline);
  return finish(connections);
}

async function flood(host: string, port: number, maxBytes: number, durationMs: number): Promise<SlowClientSummary> {
  const startMs = Date.now();
  const deadline = startMs + durationMs;
  const connection = open(host, port, startMs);
  await connection.settled;
  process.stderr.write("connected\n");
  const { socket } = connection;
  let queued = 0;
  while (queued < maxBytes && !socket.destroyed && Date.now() < deadline) {
    queued += FLOOD_CHUNK.length;
    if (socket.write(FLOOD_CHUNK)) continue;
    // Stalled: wait for the destination to take more, for the close, or for the deadline.
    // `connection.settled` resolved at the connect already, so it cannot signal the close.
    await new Promise<void>((resolve) => {
      const resume = (): void => {
        clearTimeout(timer);
        socket.off("drain", resume);
        socket.off("close", resume);
        resolve();
      };
      const timer = setTimeout(resume, Math.max(0, deadline - Date.now()));
      socket.once("drain", resume);
      socket.once("close", resume);
    });
  }
  await untilClosedOr([connection], deadline);
  return finish([connection]);
}

/** How long a garbage connection waits for the server to close it, in ms. */
const GARBAGE_WAIT_MS = 3_000;

async function garbage(host: string, port: number, count: number, bytes: number): Promise<SlowClientSummary> {
  const startMs = Date.now();
  const outcomes: HeldConnection[] = [];
  for (let index = 0; index < count; index += 1) {
    const connection = open(host, port, startMs);
    await connection.settled;
    if (index === 0) process.stderr.write("connected\n");
    connection.socket.write(crypto.randomBytes(bytes));
    await untilClosedOr([connection], Date.now() + GARBAGE_WAIT_MS);
    outcomes.push(...finish([connection]).connections);
  }
  return { connections: outcomes };
}

function finish(connections: Connection[]): SlowClientSummary {
  for (const { socket, outcome } of connections) {
    if (outcome.closedMs === null) outcome.written = socket.bytesWritten - socket.writableLength;
    socket.destroy();
  }
  return { connections: connections.map((connection) => connection.outcome) };
}

function usage(message: string): never {
  process.stderr.write(
    `${message}\nusage: slow-client RUN_PREFIX hold HOST PORT CONNECTIONS INTERVAL_MS DURATION_MS [PAYLOAD] [LOCAL_ADDRESS]\n` +
      `       slow-client RUN_PREFIX flood HOST PORT MAX_BYTES DURATION_MS\n` +
      `       slow-client RUN_PREFIX garbage HOST PORT CONNECTIONS BYTES\n` +
      `(CONNECTIONS at most ${MAX_CONNECTIONS}, DURATION_MS at most ${MAX_DURATION_MS})\n`,
  );
  process.exit(2);
}

/** Turns the \r, \n and \xHH escapes of a PAYLOAD argument into their characters; argv cannot carry a NUL byte itself. */
function unescapePayload(text: string): string {
  return text.replace(/\\(r|n|x[0-9a-fA-F]{2})/g, (_match, escape: string) => {
    if (escape === "r") return "\r";
    if (escape === "n") return "\n";
    return String.fromCharCode(parseInt(escape.slice(1), 16));
  });
}

function boundedInteger(text: string | undefined, name: string, max: number): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1 || value > max) usage(`invalid ${name} ${JSON.stringify(text)}: expected an integer from 1 to ${max}`);
  return value;
}

async function main(): Promise<void> {
  const [, mode, host, portText, ...rest] = process.argv.slice(2);
  const port = boundedInteger(portText, "PORT", 65535);
  if (!host) usage("missing HOST");
  let summary: SlowClientSummary;
  if (mode === "hold") {
    const count = boundedInteger(rest[0], "CONNECTIONS", MAX_CONNECTIONS);
    const intervalMs = boundedInteger(rest[1], "INTERVAL_MS", MAX_DURATION_MS);
    const durationMs = boundedInteger(rest[2], "DURATION_MS", MAX_DURATION_MS);
    const payload = unescapePayload(rest[3] ?? "");
    summary = await hold(host, port, count, intervalMs, durationMs, payload, rest[4] || undefined);
  } else if (mode === "flood") {
    summary = await flood(host, port, boundedInteger(rest[0], "MAX_BYTES", 2 ** 40), boundedInteger(rest[1], "DURATION_MS", MAX_DURATION_MS));
  } else if (mode === "garbage") {
    summary = await garbage(host, port, boundedInteger(rest[0], "CONNECTIONS", MAX_CONNECTIONS), boundedInteger(rest[1], "BYTES", 16 * 1024 * 1024));
  } else {
    usage(`unknown mode ${JSON.stringify(mode)}: use hold, flood or garbage`);
  }
  process.stdout.write(JSON.stringify(summary) + "\n");
}

/** A run of this script in a namespace: `connected` settles once its connections are up, `done` with the summary. */
export interface SlowClientRun {
  connected: Promise<void>;
  done: Promise<SlowClientSummary>;
}

/** Starts this script with `args` inside `netns`; Topology.destroy() ends it if it still runs. */
export function startSlowClient(topology: Topology, netns: string, args: string[]): SlowClientRun {
  const child = topology.spawn(netns, process.execPath, [__filename, topology.prefix, ...args]);
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  const connected = new Promise<void>((resolve, reject) => {
    child.stderr!.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
      if (stderr.includes("connected\n")) resolve();
    });
    child.once("exit", () => reject(new Error(`slow-client ${args.join(" ")} exited before it connected: ${stderr.trim()}`)));
  });
  // "close", not "exit": only "close" comes after the last byte of standard output.
  const done = new Promise<SlowClientSummary>((resolve, reject) => {
    child.once("close", (code) => {
      try {
        if (code !== 0) throw new Error(`exited with code ${code}`);
        resolve(JSON.parse(stdout) as SlowClientSummary);
      } catch (error) {
        reject(new Error(`slow-client ${args.join(" ")} failed: ${(error as Error).message}; output ${JSON.stringify(stdout.slice(0, 200))}, stderr: ${stderr.trim()}`));
      }
    });
  });
  // A run that fails after its connect is reported through `done`.
  connected.catch(() => undefined);
  return { connected, done };
}

if (require.main === module) void main();
