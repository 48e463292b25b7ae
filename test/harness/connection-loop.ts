// A steady client for tests, run inside a pod's network namespace: opens one short HTTP/1.0
// connection to HOST:PORT every INTERVAL ms for DURATION ms, and prints a JSON summary with each
// connection's local port, start and end time, and outcome. Both the rate and the run time are
// bounded by the arguments; a connection that does not finish in 5 s is counted as failed.
//   node connection-loop.js HOST PORT INTERVAL_MS DURATION_MS

import net from "node:net";

export interface LoopConnection {
  localPort: number;
  startMs: number;
  endMs: number;
  ok: boolean;
  error?: string;
}

export interface LoopSummary {
  connections: LoopConnection[];
}

const CONNECTION_TIMEOUT_MS = 5_000;

function once(host: string, port: number): Promise<LoopConnection> {
  return new Promise((resolve) => {
    const startMs = Date.now();
    let localPort = 0;
    let received = "";
    let settled = false;
    const socket = net.connect({ host, port });
    const finish = (ok: boolean, error?: string): void => {
      if (settled) return;
      settled = true;
      socket.destroy();
      resolve({ localPort, startMs, endMs: Date.now(), ok, error });
    };
    socket.setTimeout(CONNECTION_TIMEOUT_MS, () => finish(false, "timeout"));
    socket.on("connect", () => {
      localPort = socket.localPort ?? 0;
      socket.write("GET / HTTP/1.0\r\nHost: test\r\n\r\n");
    });
    socket.on("data", (chunk: Buffer) => (received += chunk.toString("latin1")));
    socket.on("end", () => finish(/^HTTP\/1\.[01] 200/.test(received), received === "" ? "empty reply" : undefined));
    socket.on("error", (error: NodeJS.ErrnoException) => finish(false, error.code ?? error.message));
  });
}

async function main(): Promise<void> {
  const [host, portText, intervalText, durationText] = process.argv.slice(2);
  const port = Number(portText);
  const intervalMs = Number(intervalText);
  const durationMs = Number(durationText);
  if (!host || !(port > 0) || !(intervalMs >= 1) || !(durationMs > 0) || durationMs > 600_000) {
    process.stderr.write("usage: connection-loop HOST PORT INTERVAL_MS DURATION_MS (DURATION_MS at most 600000)\n");
    process.exit(2);
  }
  const deadline = Date.now() + durationMs;
  const pending: Promise<LoopConnection>[] = [];
  for (let next = Date.now(); next < deadline; next += intervalMs) {
    const wait = next - Date.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    pending.push(once(host, port));
  }
  const summary: LoopSummary = { connections: await Promise.all(pending) };
  process.stdout.write(JSON.stringify(summary) + "\n");
}

if (require.main === module) void main();
