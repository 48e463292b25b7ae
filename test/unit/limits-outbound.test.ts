// The limits of the outbound proxy (15001), on loopback addresses: the pod's connection limit,
// proxy ports as destinations, and the idle timeout.

import test, { type ExecutionContext } from "ava";
import net from "node:net";
import type { AuditEvent, AuditRecord, ConnectionRefusedRecord } from "../../agent/audit/record";
import type { CertificateProvider } from "../../agent/identity/cert-manager";
import { silentLogger } from "../../agent/log";
import { LimitTracker } from "../../agent/proxy/limit-tracker";
import { DEFAULT_LIMITS, type ProxyLimits } from "../../agent/proxy/limits";
import { OutboundProxy, type DestinationTarget } from "../../agent/proxy/outbound";
import { RefusalLog } from "../../agent/proxy/refusal-log";
import { identity, LoopbackPodNetwork, startApp, waitForOpen, workload } from "./proxy-fixtures";

const APP_PORT = 18233;

interface Pod {
  proxy: OutboundProxy;
  refusals: RefusalLog;
  refused: ConnectionRefusedRecord[];
  completed: AuditRecord[];
}

/**
 * Starts the outbound proxy of a pod at `podIp`, listening on its 15001. Every connection's
 * original destination is `destination`, routed by `route` (passthrough by default).
 */
async function startPod(
  t: ExecutionContext,
  podIp: string,
  destination: { ip: string; port: number },
  limits: Partial<ProxyLimits>,
  route?: (ip: string, port: number) => DestinationTarget,
): Promise<Pod> {
  const refused: ConnectionRefusedRecord[] = [];
  const completed: AuditRecord[] = [];
  const audit = {
    write: (record: AuditEvent) => {
      if (record.type === "connection.refused") refused.push(record);
      else if (record.type === "connection.completed") completed.push(record);
    },
  };
  const refusals = new RefusalLog({ node: "aalim-n1", audit, logger: silentLogger() });
  const proxy = new OutboundProxy({
    node: "aalim-n1",
    workload: workload("hog", "lim", "hog", podIp),
    identity: identity("lim", "hog"),
    network: new LoopbackPodNetwork(podIp),
    // Passthrough connections never ask for a certificate.
    certs: {} as CertificateProvider,
    originalDestination: () => destination,
    resolveDestination: route ?? ((ip, port) => ({ kind: "passthrough", address: { ip, port } })),
    audit,
    logger: silentLogger(),
    limitTracker: new LimitTracker({ ...DEFAULT_LIMITS, ...limits }),
    refusals,
  });
  await proxy.start();
  t.teardown(() => proxy.stop());
  return { proxy, refusals, refused, completed };
}

/** Connects to the proxy as the pod's application; resolves with the error code once it closes. */
function dial(t: ExecutionContext, podIp: string): Promise<string> {
  const socket = net.connect({ host: podIp, port: 15001, localAddress: podIp });
  t.teardown(() => socket.destroy());
  let code = "closed";
  socket.on("error", (error: NodeJS.ErrnoException) => (code = error.code ?? error.message));
  socket.write("hello");
  return new Promise((resolve) => socket.once("close", () => resolve(code)));
}

/** Starts an application at ip:APP_PORT that reads and never replies, and returns its address. */
async function startSink(t: ExecutionContext, ip: string): Promise<{ ip: string; port: number }> {
  await startApp(t, ip, APP_PORT, (socket) => socket.resume());
  return { ip, port: APP_PORT };
}

test("pod over its outbound limit is refused", async (t) => {
  const app = await startSink(t, "127.77.233.100");
  const pod = await startPod(t, "127.77.233.2", app, { maxConnectionsPerPod: 1 });
  void dial(t, "127.77.233.2");
  await waitForOpen(pod.proxy, 1);

  t.is(await dial(t, "127.77.233.2"), "ECONNRESET");
  t.is(pod.refused.length, 1);
  const record = pod.refused[0];
  t.is(record.listener, "outbound");
  t.is(record.port, 15001);
  t.is(record.reason, "connections_per_pod");
  t.is(record.limit, 1);
  t.is(record.src.workload, "hog");
  t.is(record.dst?.addr, `${app.ip}:${app.port}`);
  t.is(pod.completed.length, 0);
});

/** Cases of a proxy port as the original destination or the routed endpoint, and the owner the message names. */
const PROXY_PORT_CASES: Array<{ name: string; destination: { ip: string; port: number }; route?: (ip: string, port: number) => DestinationTarget; addr: string; owner: RegExp }> = [
  { name: "loopback 15001", destination: { ip: "127.0.0.1", port: 15001 }, addr: "127.0.0.1:15001", owner: /a loopback address/ },
  { name: "own 15006", destination: { ip: "127.77.233.3", port: 15006 }, addr: "127.77.233.3:15006", owner: /the pod itself/ },
  {
    name: "mesh pod 15008",
    destination: { ip: "10.232.9.9", port: 15008 },
    route: (ip, port) => ({ kind: "hbone", workload: workload("server", "lim", "server", ip), identity: identity("lim", "server"), address: { ip, port } }),
    addr: "10.232.9.9:15008",
    owner: /a pod in the mesh/,
  },
  {
    name: "service endpoint 15008",
    destination: { ip: "10.96.0.10", port: 80 },
    route: () => ({ kind: "hbone", workload: workload("server", "lim", "server", "10.232.9.9"), identity: identity("lim", "server"), address: { ip: "10.232.9.9", port: 15008 }, service: "lim/server" }),
    addr: "10.232.9.9:15008",
    owner: /a pod in the mesh/,
  },
  { name: "unspecified 15006", destination: { ip: "0.0.0.0", port: 15006 }, addr: "0.0.0.0:15006", owner: /the unspecified address/ },
];

for (const [index, testCase] of PROXY_PORT_CASES.entries()) {
  test(`proxy port target refused: ${testCase.name}`, async (t) => {
    const podIp = index === 1 ? testCase.destination.ip : `127.77.233.${10 + index}`;
    const pod = await startPod(t, podIp, testCase.destination, {}, testCase.route);
    t.is(await dial(t, podIp), "ECONNRESET");
    t.is(pod.refused[0]?.reason, "proxy_port_target");
    t.is(pod.refused[0]?.dst?.addr, testCase.addr);
    t.regex(pod.refused[0]?.message ?? "", testCase.owner);
    t.is(pod.completed.length, 0);
  });
}

test("proxy port of a host outside the mesh passes", async (t) => {
  // A passthrough destination that is neither loopback nor the pod: its 15008 is an ordinary port.
  // The route sends it to the loopback application, whose port is not a proxy port.
  const app = await startSink(t, "127.77.233.101");
  const pod = await startPod(t, "127.77.233.20", { ip: "10.232.9.9", port: 15008 }, {}, () => ({ kind: "passthrough", address: app }));
  void dial(t, "127.77.233.20");
  await waitForOpen(pod.proxy, 1);
  t.is(pod.refused.length, 0);
});

test("idle outbound connection ends with IDLE_TIMEOUT", async (t) => {
  const app = await startSink(t, "127.77.233.102");
  const pod = await startPod(t, "127.77.233.21", app, { idleTimeoutMs: 100 });
  t.is(await dial(t, "127.77.233.21"), "ECONNRESET");
  for (let waited = 0; pod.completed.length === 0; waited += 10) {
    if (waited > 5_000) throw new Error("no connection.completed record after 5 s");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  t.is(pod.completed[0].error?.code, "IDLE_TIMEOUT");
  t.is(pod.completed[0].bytes_sent, 5);
  t.deepEqual(pod.refusals.totals(), [{ listener: "outbound", reason: "idle_timeout", count: 1 }]);
  t.is(pod.refused.length, 0);
});
