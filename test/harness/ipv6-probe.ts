// IPv6 servers and clients inside a network namespace, for the capture tests of IPv6: these are
// an application's sockets, not flagged as the agent's, so they run python3 under nsenter. Every
// process is bounded in time and stopped by its PID.
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { promisify } from "node:util";

const execFileAsync = promisify(execFile);

/** The server exits by itself after this long, in case the test never stops it. */
const SERVER_LIFETIME_S = 600;
const START_TIMEOUT_MS = 5000;
const CLIENT_TIMEOUT_S = 3;

const SERVER_SCRIPT = `
import select, socket, sys, time
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
server.bind(("::", int(sys.argv[1])))
server.listen(16)
print("ready", flush=True)
deadline = time.monotonic() + ${SERVER_LIFETIME_S}
while time.monotonic() < deadline:
    readable, _, _ = select.select([server], [], [], 1)
    if not readable:
        continue
    conn, peer = server.accept()
    print("accepted", peer[0], peer[1], flush=True)
    conn.sendall(b"app6")
    conn.close()
`;

const CLIENT_SCRIPT = `
import errno, socket, sys
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=${CLIENT_TIMEOUT_S})
    print("connected", conn.recv(64).decode())
except socket.timeout:
    print("timeout")
except OSError as error:
    print(errno.errorcode.get(error.errno, str(error)))
`;

export interface Ipv6Server {
  /** Peer addresses of the accepted connections, in order. */
  accepted: string[];
  stop(): void;
}

/** Starts a TCP server on [::]:port (IPv6 only) inside the namespace; resolves once it listens. */
export function startIpv6Server(netnsPath: string, port: number): Promise<Ipv6Server> {
  const child: ChildProcess = spawn("nsenter", [`--net=${netnsPath}`, "python3", "-u", "-c", SERVER_SCRIPT, String(port)], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  const server: Ipv6Server = {
    accepted: [],
    stop: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    },
  };
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));

  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      server.stop();
      reject(new Error(`IPv6 server on port ${port} in ${netnsPath} did not start within ${START_TIMEOUT_MS} ms: ${stderr}`));
    }, START_TIMEOUT_MS);
    let pending = "";
    child.stdout?.on("data", (chunk: Buffer) => {
      pending += chunk.toString();
      const lines = pending.split("\n");
      pending = lines.pop() ?? "";
      for (const line of lines) {
        if (line === "ready") {
          clearTimeout(timer);
          resolve(server);
        } else if (line.startsWith("accepted ")) {
          server.accepted.push(line.slice("accepted ".length));
        }
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`IPv6 server on port ${port} in ${netnsPath} exited with code ${code}: ${stderr}`));
    });
  });
}

/**
 * Connects from inside the namespace to host:port (host may carry a %scope) and returns
 * "connected <reply>", "timeout", or the errno name of the failure (EPERM, ECONNREFUSED...).
 */
export async function connectIpv6(netnsPath: string, host: string, port: number): Promise<string> {
  const { stdout } = await execFileAsync("nsenter", [`--net=${netnsPath}`, "python3", "-c", CLIENT_SCRIPT, host, String(port)], {
    timeout: (CLIENT_TIMEOUT_S + 2) * 1000,
    encoding: "utf8",
  });
  return stdout.trim();
}

/** Waits 300 ms for a server's output to arrive, then returns how many connections it accepted. */
export async function acceptedAfterSettling(server: Ipv6Server): Promise<number> {
  await new Promise((resolve) => setTimeout(resolve, 300));
  return server.accepted.length;
}
