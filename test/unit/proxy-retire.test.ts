// HBONE connections that the destination retires all at once, as when its trusted roots change.
// The client has two pooled connections, and new tunnels must neither fail nor land on the second
// retired connection. Real outbound proxy, inbound server, TLS and HTTP/2 on loopback.

import net from "node:net";
import test from "ava";
import { CertManager, type CertificateProvider, type RotationListener } from "../../agent/identity/cert-manager";
import { silentLogger } from "../../agent/log";
import { InboundHboneServer } from "../../agent/proxy/inbound";
import { OutboundProxy } from "../../agent/proxy/outbound";
import { ALLOW_ALL, LoopbackPodNetwork, MemorySink, TRUST_DOMAIN, createCa, echo, identity, startApp, workload } from "./proxy-fixtures";

/** Writes `text` and resolves with its echo; rejects when the connection closes first or after 5 s. */
function echoOf(socket: net.Socket, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let received = "";
    const timer = setTimeout(() => reject(new Error(`no echo of ${text} within 5 s`)), 5_000);
    const onClose = (): void => {
      clearTimeout(timer);
      reject(new Error(`closed after ${received.length} bytes`));
    };
    const onData = (chunk: Buffer): void => {
      received += chunk.toString();
      if (received.length < text.length) return;
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("close", onClose);
      resolve(received);
    };
    socket.once("close", onClose);
    socket.on("data", onData);
    socket.write(text);
  });
}

/** Connects to the outbound proxy on ip:15001 from ip, as the pod's application would. */
async function openTunnel(ip: string): Promise<net.Socket> {
  const socket = net.connect({ host: ip, port: 15001, localAddress: ip });
  socket.on("error", () => undefined);
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  return socket;
}

for (const [name, concurrent, subnet] of [
  ["new tunnels one by one", false, 201],
  ["new tunnels at once", true, 202],
] as const) {
  test(`${name} succeed after the destination retires every connection`, async (t) => {
    const clientIp = `127.77.${subnet}.1`;
    const serverIp = `127.77.${subnet}.2`;
    const ca = await createCa(t);
    const certs = new CertManager(ca, silentLogger());
    t.teardown(() => certs.close());
    const serverIdentity = identity("apps", "echo");
    let rotateServer: RotationListener | undefined;
    const serverCerts: CertificateProvider = {
      get: (id) => certs.get(id),
      onRotation: (_id, listener) => {
        rotateServer = listener;
        return () => undefined;
      },
    };
    const client = workload("sleep", "default", "sleep", clientIp);
    const server = workload("echo", "apps", "echo", serverIp);
    const inbound = new InboundHboneServer({
      node: "node-2",
      workload: server,
      identity: serverIdentity,
      network: new LoopbackPodNetwork(serverIp),
      certs: serverCerts,
      trustDomain: TRUST_DOMAIN,
      authorize: () => ALLOW_ALL,
      lookupSource: (ip) => (ip === clientIp ? client : undefined),
      audit: new MemorySink(),
      logger: silentLogger(),
    });
    const outbound = new OutboundProxy({
      node: "node-1",
      workload: client,
      identity: identity("default", "sleep"),
      network: new LoopbackPodNetwork(clientIp),
      certs,
      originalDestination: () => ({ ip: serverIp, port: 8080 }),
      resolveDestination: (ip, port) => ({ kind: "hbone", workload: server, identity: serverIdentity, address: { ip, port } }),
      audit: new MemorySink(),
      logger: silentLogger(),
    });
    await inbound.start();
    t.teardown(() => inbound.stop());
    await outbound.start();
    t.teardown(() => outbound.stop().then(() => undefined));
    await startApp(t, serverIp, 8080, echo);

    // 150 long-lived tunnels make two pooled connections (100 and 50 streams); closing 20 leaves room on both.
    const longLived = await Promise.all(Array.from({ length: 150 }, () => openTunnel(clientIp)));
    t.teardown(() => longLived.forEach((socket) => socket.destroy()));
    await Promise.all(longLived.map((socket, index) => echoOf(socket, `long-lived ${index}`)));
    t.is(outbound.poolStats().keys[0]?.connections, 2);
    longLived.slice(0, 20).forEach((socket) => socket.destroy());
    await new Promise((resolve) => setTimeout(resolve, 300));

    // Same certificate, new trusted roots: the server retires both connections at once.
    rotateServer!({ ...(await certs.get(serverIdentity)) });
    const outcomes: string[] = [];
    const tunnel = async (index: number): Promise<void> => {
      const socket = await openTunnel(clientIp);
      try {
        outcomes.push((await echoOf(socket, `new ${index}`)) === `new ${index}` ? "ok" : "wrong echo");
      } catch (error) {
        outcomes.push((error as Error).message);
      } finally {
        socket.destroy();
      }
    };
    if (concurrent) {
      await Promise.all(Array.from({ length: 20 }, (_, index) => tunnel(index)));
    } else {
      for (let index = 0; index < 20; index += 1) await tunnel(index);
    }

    t.deepEqual(outcomes.filter((outcome) => outcome !== "ok"), []);
    const stillOpen = await Promise.allSettled(longLived.slice(20).map((socket, index) => echoOf(socket, `still ${index}`)));
    t.is(stillOpen.filter((result) => result.status === "fulfilled").length, 130, "the long-lived tunnels keep flowing on their retired connections");
  });
}
