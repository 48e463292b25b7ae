// The limits of the inbound plaintext server (15006), on loopback addresses: each refusal resets
// the client before a connection record exists and writes a connection.refused record.

import test, { type ExecutionContext } from "ava";
import net from "node:net";
import type { AuditEvent, ConnectionRefusedRecord } from "../../agent/audit/record";
import { silentLogger } from "../../agent/log";
import { InboundPlaintextServer } from "../../agent/proxy/inbound-plaintext";
import { LimitTracker } from "../../agent/proxy/limit-tracker";
import { DEFAULT_LIMITS, type ProxyLimits } from "../../agent/proxy/limits";
import type { PodNetwork } from "../../agent/proxy/pod-network";
import { RefusalLog } from "../../agent/proxy/refusal-log";
import { ALLOW_ALL, identity, startApp, waitForOpen, workload } from "./proxy-fixtures";

/** The port the application listens on; the server's listener takes `listenPort` in its place. */
const APP_PORT = 18232;

interface Pod {
  server: InboundPlaintextServer;
  tracker: LimitTracker;
  refused: ConnectionRefusedRecord[];
  completed: AuditEvent[];
}

/**
 * Starts a 15006 server for a pod at `podIp` whose listener takes `listenPort` on that address,
 * in front of an application that reads and never replies.
 */
async function startPod(t: ExecutionContext, podIp: string, listenPort: number, limits: Partial<ProxyLimits>): Promise<Pod> {
  const network: PodNetwork = {
    listen: (server) => new Promise((resolve) => server.listen({ port: listenPort, host: podIp }, () => resolve())),
    connect: (host) => net.connect({ host, port: APP_PORT, localAddress: podIp }),
  };
  const refused: ConnectionRefusedRecord[] = [];
  const completed: AuditEvent[] = [];
  const audit = { write: (record: AuditEvent) => (record.type === "connection.refused" ? refused.push(record) : completed.push(record)) };
  const tracker = new LimitTracker({ ...DEFAULT_LIMITS, ...limits });
  const refusals = new RefusalLog({ node: "aalim-n2", audit, logger: silentLogger() });
  const server = new InboundPlaintextServer({
    node: "aalim-n2",
    workload: workload("server", "lim", "server", podIp),
    identity: identity("lim", "server"),
    network,
    authorize: () => ALLOW_ALL,
    lookupSource: () => undefined,
    audit,
    logger: silentLogger(),
    limitTracker: tracker,
    refusals,
  });
  await startApp(t, podIp, APP_PORT, (socket) => socket.resume());
  await server.start();
  t.teardown(() => server.stop());
  return { server, tracker, refused, completed };
}

/** Opens a client connection that stays open until the test ends or the server resets it. */
function openClient(t: ExecutionContext, host: string, port: number, localAddress: string): { closed: Promise<string> } {
  const socket = net.connect({ host, port, localAddress });
  t.teardown(() => socket.destroy());
  let code = "closed";
  socket.on("error", (error: NodeJS.ErrnoException) => (code = error.code ?? error.message));
  return { closed: new Promise((resolve) => socket.once("close", () => resolve(code))) };
}

test("peer over its limit is reset and recorded", async (t) => {
  const pod = await startPod(t, "127.77.232.2", 8080, { maxConnectionsPerPeer: 2 });
  const first = openClient(t, "127.77.232.2", 8080, "127.77.232.10");
  openClient(t, "127.77.232.2", 8080, "127.77.232.10");
  await waitForOpen(pod.server, 2);

  t.is(await openClient(t, "127.77.232.2", 8080, "127.77.232.10").closed, "ECONNRESET");
  t.is(pod.refused.length, 1);
  const record = pod.refused[0];
  t.is(record.listener, "inbound_plaintext");
  t.is(record.port, 15006);
  t.is(record.reason, "connections_per_peer");
  t.is(record.limit, 2);
  t.true(record.src.addr.startsWith("127.77.232.10:"));
  t.is(record.dst?.addr, "127.77.232.2:8080");
  t.regex(record.message, /--max-connections-per-peer/);
  t.is(pod.completed.filter((entry) => entry.type === "connection.completed").length, 0, "a connection ended or got a record of its refusal");

  // Another address is not limited by this one's connections.
  openClient(t, "127.77.232.2", 8080, "127.77.232.11");
  await waitForOpen(pod.server, 3);
  t.is(pod.refused.length, 1);
});

test("freed slot takes a new connection", async (t) => {
  const pod = await startPod(t, "127.77.232.3", 8080, { maxConnectionsPerPeer: 1 });
  const socket = net.connect({ host: "127.77.232.3", port: 8080, localAddress: "127.77.232.10" });
  socket.on("error", () => undefined);
  await waitForOpen(pod.server, 1);
  socket.resetAndDestroy();
  for (let waited = 0; pod.server.openConnections > 0; waited += 10) {
    if (waited > 5_000) throw new Error("the reset connection was still open after 5 s");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }

  openClient(t, "127.77.232.3", 8080, "127.77.232.10");
  await waitForOpen(pod.server, 1);
  t.is(pod.refused.length, 0);
  t.is(pod.tracker.podCount("lim/server", "inbound"), 1);
});

test("pod over its limit is reset and recorded", async (t) => {
  const pod = await startPod(t, "127.77.232.4", 8080, { maxConnectionsPerPod: 2 });
  openClient(t, "127.77.232.4", 8080, "127.77.232.10");
  openClient(t, "127.77.232.4", 8080, "127.77.232.11");
  await waitForOpen(pod.server, 2);

  t.is(await openClient(t, "127.77.232.4", 8080, "127.77.232.12").closed, "ECONNRESET");
  t.is(pod.refused[0]?.reason, "connections_per_pod");
  t.is(pod.refused[0]?.limit, 2);
  t.regex(pod.refused[0]?.message ?? "", /pod lim\/server has 2 open inbound connections/);
});

test("buffered bytes over the limit refuse new connections", async (t) => {
  const pod = await startPod(t, "127.77.232.5", 8080, { maxBufferedBytes: 1000 });
  pod.tracker.buffered.add(1001);
  t.is(await openClient(t, "127.77.232.5", 8080, "127.77.232.10").closed, "ECONNRESET");
  t.is(pod.refused[0]?.reason, "buffered_bytes");
  t.is(pod.refused[0]?.limit, 1000);

  pod.tracker.buffered.subtract(1001);
  openClient(t, "127.77.232.5", 8080, "127.77.232.10");
  await waitForOpen(pod.server, 1);
  t.is(pod.refused.length, 1);
});

test("proxy port as destination is refused", async (t) => {
  const pod = await startPod(t, "127.77.232.6", 15006, {});
  t.is(await openClient(t, "127.77.232.6", 15006, "127.77.232.10").closed, "ECONNRESET");
  t.is(pod.refused[0]?.reason, "proxy_port_target");
  t.is(pod.refused[0]?.dst?.addr, "127.77.232.6:15006");
  t.is(pod.refused[0]?.limit, undefined);
  t.deepEqual(pod.completed, []);
});
