import test from "ava";
import net from "node:net";
import { resetSocket } from "../../agent/proxy/copy";

/** Connects a client to a server that reads and never writes back, so the client's end() stays pending briefly. */
async function connectedPair(): Promise<{ client: net.Socket; server: net.Server }> {
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    socket.on("error", () => undefined);
    socket.resume();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  const client = net.connect(port, "127.0.0.1");
  client.on("error", () => undefined);
  await new Promise<void>((resolve) => client.once("connect", () => resolve()));
  return { client, server };
}

test("reset during a pending end closes the socket", async (t) => {
  const { client, server } = await connectedPair();
  const closed = new Promise<boolean>((resolve) => {
    client.once("close", () => resolve(true));
    setTimeout(() => resolve(false), 2_000).unref();
  });
  client.end();
  resetSocket(client);
  t.true(await closed, "the socket never emitted close, so its descriptor leaked");
  server.close();
});

test("reset of an open socket closes it", async (t) => {
  const { client, server } = await connectedPair();
  const closed = new Promise<void>((resolve) => client.once("close", () => resolve()));
  resetSocket(client);
  await closed;
  t.true(client.destroyed);
  server.close();
});
