// A server and a client with exact byte counts, for tests that compare bytes with metrics, audit
// records and the admin API. The client sends a request of A bytes whose first line is "A R\n",
// and the server replies with R bytes. A connection carries any number of such rounds until the
// client closes it. Both are python3 scripts that run inside pod namespaces.

import type { ChildProcess } from "node:child_process";
import readline from "node:readline";
import type { Topology } from "./topology";

/** Serves rounds on the port in argv[1], one thread per connection, until the client closes. */
const ROUND_SERVER = `
import socketserver, sys
class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        stream = self.request.makefile("rb")
        while True:
            header = stream.readline()
            if not header:
                return
            request, reply = (int(word) for word in header.split())
            rest = request - len(header)
            if rest > 0 and len(stream.read(rest)) < rest:
                return
            self.request.sendall(b"r" * reply)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
`;

/**
 * Connects to argv[1]:argv[2], prints "connected PORT" with its own port, then runs one round per
 * stdin line "A R" and prints "done A R" once the whole reply arrived. Closes on "close" or at
 * the end of stdin and prints "closed".
 */
const ROUND_CLIENT = `
import socket, sys
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", connection.getsockname()[1], flush=True)
for line in sys.stdin:
    words = line.split()
    if not words or words[0] == "close":
        break
    request, reply = int(words[0]), int(words[1])
    header = ("%d %d\\n" % (request, reply)).encode()
    connection.sendall(header + b"q" * (request - len(header)))
    received = 0
    while received < reply:
        chunk = connection.recv(min(65536, reply - received))
        if not chunk:
            sys.exit("the connection closed after %d of %d reply bytes" % (received, reply))
        received += len(chunk)
    print("done", request, reply, flush=True)
connection.close()
print("closed", flush=True)
`;

/** Starts the round server in a pod and waits until it listens on `port`; Topology.destroy() ends it. */
export async function startRoundServer(topology: Topology, pod: string, port: number): Promise<void> {
  const netns = topology.pod(pod).netns;
  const server = topology.spawn(netns, "python3", ["-c", ROUND_SERVER, String(port)], { stdio: ["ignore", "ignore", "ignore"] });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (topology.exec(netns, "ss", ["-Hltn", `sport = :${port}`], { allowFail: true }).trim() !== "") return;
    if (server.exitCode !== null) throw new Error(`the round server in ${pod} exited with code ${server.exitCode}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`the round server in ${pod} did not listen on ${port} within 10 s`);
}

/** A round client in a pod, driven line by line. */
export class RoundClient {
  private readonly lines: string[] = [];
  private readonly waiters = new Set<() => void>();
  private stderr = "";

  private constructor(private readonly child: ChildProcess) {
    readline.createInterface({ input: child.stdout! }).on("line", (line) => {
      this.lines.push(line);
      for (const wake of this.waiters) wake();
    });
    child.stderr!.on("data", (chunk: Buffer) => (this.stderr += chunk.toString()));
    child.once("exit", () => {
      for (const wake of this.waiters) wake();
    });
  }

  /** Connects from `pod` to host:port; resolves with the client and its source port once connect() returned. */
  static async connect(topology: Topology, pod: string, host: string, port: number): Promise<{ client: RoundClient; port: number }> {
    const child = topology.spawn(topology.pod(pod).netns, "python3", ["-c", ROUND_CLIENT, host, String(port)], { stdio: ["pipe", "pipe", "pipe"] });
    const client = new RoundClient(child);
    const connected = await client.waitLine((line) => line.startsWith("connected "), `the connection from ${pod} to ${host}:${port}`);
    return { client, port: Number(connected.split(" ")[1]) };
  }

  /** Runs one round: sends `request` bytes and waits for the whole reply of `reply` bytes. */
  async round(request: number, reply: number): Promise<void> {
    this.child.stdin!.write(`${request} ${reply}\n`);
    await this.waitLine((line) => line === `done ${request} ${reply}`, `round ${request} ${reply}`);
  }

  /** Closes the connection and waits until the client did. */
  async close(): Promise<void> {
    this.child.stdin!.end("close\n");
    await this.waitLine((line) => line === "closed", "the close");
  }

  /** Resolves with the client's exit code once it exits. */
  exited(): Promise<number | null> {
    if (this.child.exitCode !== null) return Promise.resolve(this.child.exitCode);
    return new Promise((resolve) => this.child.once("exit", (code) => resolve(code)));
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill("SIGKILL");
  }

  private waitLine(predicate: (line: string) => boolean, description: string, timeoutMs = 10_000): Promise<string> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => finish(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${description}; stderr: ${this.stderr.trim()}`))), timeoutMs);
      const finish = (settle: () => void): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        settle();
      };
      const check = (): void => {
        const found = this.lines.find(predicate);
        if (found !== undefined) finish(() => resolve(found));
        else if (this.child.exitCode !== null) finish(() => reject(new Error(`the round client exited with code ${this.child.exitCode} before ${description}; stderr: ${this.stderr.trim()}`)));
      };
      this.waiters.add(check);
      check();
    });
  }
}

/** Opens one connection from `pod` to host:port, runs `rounds` ([request, reply] bytes) and closes it; returns the client's source port. */
export async function roundTrips(topology: Topology, pod: string, host: string, port: number, rounds: [number, number][]): Promise<number> {
  const { client, port: sourcePort } = await RoundClient.connect(topology, pod, host, port);
  try {
    for (const [request, reply] of rounds) await client.round(request, reply);
    await client.close();
  } finally {
    client.kill();
  }
  return sourcePort;
}
