// A unix-socket server for the agent's local protocols (the hand-over and the CNI plugin): the
// socket file is readable and writable by its owner only, and errors after start are logged.

import fs from "node:fs";
import net from "node:net";
import type { Logger } from "./log";

/**
 * Listens on `socketPath`, which must not exist, with mode 0600. Returns the server and the
 * socket file's inode, by which a closing server tells its own file from a successor's.
 */
export async function listenUnixSocket(
  socketPath: string,
  onConnection: (connection: net.Socket) => void,
  logger: Logger,
  what: string,
): Promise<{ server: net.Server; inode: number }> {
  const server = net.createServer(onConnection);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, () => {
      server.off("error", reject);
      resolve();
    });
  });
  fs.chmodSync(socketPath, 0o600);
  server.on("error", (error) => logger.error({ err: error, socket: socketPath }, `${what} failed`));
  return { server, inode: fs.statSync(socketPath).ino };
}
