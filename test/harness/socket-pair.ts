// A connected pair of TCP sockets on loopback, for tests that put the proxy copy between real sockets.

import net from "node:net";
import { once } from "node:events";

/** Returns both ends of a TCP connection on loopback, each with allowHalfOpen so that a FIN reaches the copy. */
export async function socketPair(): Promise<{ near: net.Socket; far: net.Socket }> {
  const server = net.createServer({ allowHalfOpen: true });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as net.AddressInfo;
  const accepted = once(server, "connection");
  const near = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true });
  const [far] = (await accepted) as [net.Socket];
  await once(near, "connect");
  server.close();
  return { near, far };
}
