// Sockets inside test network namespaces, for the capture tests: servers listening on a socket
// made in a namespace, application clients, reading a reply, and counting this process's sockets
// per namespace through getsockopt(2).
import { execFile } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import { promisify } from "node:util";
import { DataType, load, open } from "ffi-rs";

import { netnsSocket } from "../../agent/capture/native";

const execFileAsync = promisify(execFile);

/** How long readAll, socatIn and settledSocketsInNetns wait by default. */
export const SOCKET_WAIT_MS = 5000;

const LIBC = "aa-test-harness-libc";
let libcOpen = false;

const SOL_SOCKET = 1;
export const SO_MARK = 36;
export const SO_DOMAIN = 39;
export const SO_NETNS_COOKIE = 71;

/** Makes `server` listen on the listening socket `fd`, made inside a namespace. Rejects when listen fails. */
export function listenOn(server: net.Server, fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen({ fd }, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

/**
 * Connects a socket made inside the namespace but not flagged as the agent's, which is what an
 * application in the pod does. `mark` is its SO_MARK, 0 for none.
 */
export function appConnect(netnsPath: string, host: string, port: number, mark = 0): net.Socket {
  const socket = new net.Socket({ fd: netnsSocket(netnsPath, { agentSocket: false, mark }) });
  socket.connect(port, host);
  return socket;
}

/** Reads everything the peer sends until the socket closes, and rejects after timeoutMs. */
export function readAll(socket: net.Socket, timeoutMs = SOCKET_WAIT_MS): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no end of stream within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    // A socket that allows half-open connections (as NetnsPodNetwork's do) sends its own FIN after the peer's.
    socket.on("end", () => socket.end());
    socket.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString());
    });
  });
}

/**
 * Runs socat inside a namespace and returns what it printed. socat gives up after 3 s of silence
 * and the process is killed after SOCKET_WAIT_MS. It runs asynchronously because the server that
 * replies to it may run in this process.
 */
export async function socatIn(netnsPath: string, address: string): Promise<string> {
  const { stdout } = await execFileAsync("nsenter", [`--net=${netnsPath}`, "socat", "-T", "3", "-u", address, "-"], {
    timeout: SOCKET_WAIT_MS,
    encoding: "utf8",
  });
  return stdout;
}

/** Calls getsockopt(2) at SOL_SOCKET for an 8-byte or 4-byte option. Returns undefined when it fails, as on an fd that is no socket. */
export function getsockopt(fd: number, name: number, size: 4 | 8): bigint | undefined {
  if (!libcOpen) {
    open({ library: LIBC, path: "" });
    libcOpen = true;
  }
  const value = Buffer.alloc(size);
  const length = Buffer.alloc(4);
  length.writeUInt32LE(size);
  const result = load({
    library: LIBC,
    funcName: "getsockopt",
    retType: DataType.I32,
    paramsType: [DataType.I32, DataType.I32, DataType.I32, DataType.U8Array, DataType.U8Array],
    paramsValue: [fd, SOL_SOCKET, name, value, length],
  }) as number;
  if (result !== 0) return undefined;
  return size === 8 ? value.readBigUInt64LE() : BigInt(value.readUInt32LE());
}

/** Counts this process's sockets that live in the network namespace with this cookie. */
export function socketsInNetns(cookie: bigint): number {
  let count = 0;
  for (const entry of fs.readdirSync("/proc/self/fd")) {
    if (getsockopt(Number(entry), SO_NETNS_COOKIE, 8) === cookie) count++;
  }
  return count;
}

/**
 * Waits up to SOCKET_WAIT_MS for the count of sockets in a namespace to reach `expected` and
 * returns the last count. A server in this process closes its side of a connection only after
 * the client does.
 */
export async function settledSocketsInNetns(cookie: bigint, expected: number): Promise<number> {
  const deadline = Date.now() + SOCKET_WAIT_MS;
  let count = socketsInNetns(cookie);
  while (count !== expected && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
    count = socketsInNetns(cookie);
  }
  return count;
}
