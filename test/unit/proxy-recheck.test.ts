import test, { type ExecutionContext } from "ava";
import net from "node:net";
import type { AuditRecord } from "../../agent/audit/record";
import { silentLogger } from "../../agent/log";
import { InboundPlaintextServer } from "../../agent/proxy/inbound-plaintext";
import { OutboundProxy } from "../../agent/proxy/outbound";
import type { AuthorizationResult } from "../../agent/rbac/types";
import { ALLOW_ALL, LoopbackPodNetwork, MemorySink, identity, startApp, startMesh, waitForOpen, workload } from "./proxy-fixtures";

const DENY_INTRUDER: AuthorizationResult = {
  decision: "deny",
  reason: "denied_by_policy",
  policy: "apps/deny-intruder",
  policyKind: "AuthorizationPolicy",
  rule: 0,
  dryRun: [],
};

const STRICT_MTLS: AuthorizationResult = {
  decision: "deny",
  reason: "mtls_required",
  policy: "istio-system/strict",
  policyKind: "PeerAuthentication",
  dryRun: [],
};

/** A client connection that stays open: it writes a line, waits for its echo, and repeats on demand. */
interface EchoClient {
  /** Writes `text` and resolves with the echo of the same length; rejects when none comes within 3 s. */
  roundTrip(text: string): Promise<string>;
  /** Resolves when the connection closes, with its error code (ECONNRESET for a reset) or "closed" for a normal end. */
  closed: Promise<string>;
  socket: net.Socket;
}

async function openEchoClient(host: string, port: number, localAddress: string): Promise<EchoClient> {
  const socket = net.connect({ host, port, localAddress });
  let errorCode: string | undefined;
  socket.on("error", (error: NodeJS.ErrnoException) => (errorCode ??= error.code ?? error.message));
  const closed = new Promise<string>((resolve) => socket.once("close", () => resolve(errorCode ?? "closed")));
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  let buffered = "";
  socket.on("data", (chunk: Buffer) => (buffered += chunk.toString()));
  const roundTrip = async (text: string): Promise<string> => {
    socket.write(text);
    const deadline = Date.now() + 3_000;
    while (buffered.length < text.length) {
      if (Date.now() > deadline || socket.destroyed) throw new Error(`no echo of ${JSON.stringify(text)}; received ${JSON.stringify(buffered)}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const reply = buffered.slice(0, text.length);
    buffered = buffered.slice(text.length);
    return reply;
  };
  return { roundTrip, closed, socket };
}

/** Waits until the sink has a record that `matches`, and returns it; fails after 5 s. */
async function waitForRecord(sink: MemorySink, matches: (record: AuditRecord) => boolean): Promise<AuditRecord> {
  const deadline = Date.now() + 5_000;
  for (;;) {
    const found = sink.records.find(matches);
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`no matching record within 5 s; records: ${JSON.stringify(sink.records)}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Checks the record of the intruder's connection that a recheck closed after it echoed "intruder-1". */
function assertPolicyChangeRecord(t: ExecutionContext, record: AuditRecord, messagePrefix: string): void {
  t.is(record.decision, "deny");
  t.is(record.reason, "policy_change");
  t.is(record.policy, "apps/deny-intruder");
  t.is(record.policy_kind, "AuthorizationPolicy");
  t.is(record.rule, 0);
  t.is(record.error?.code, "POLICY_CHANGED");
  t.true(record.error?.message.startsWith(messagePrefix), record.error?.message);
  t.true(record.error?.message.includes("apps/deny-intruder"), record.error?.message);
  t.is(record.bytes_sent, "intruder-1".length);
  t.is(record.bytes_recv, "intruder-1".length);
}

/** Waits until `count()` returns `expected`; fails after 5 s. */
async function waitForCount(count: () => number, expected: number, what: string): Promise<void> {
  const deadline = Date.now() + 5_000;
  while (count() !== expected) {
    if (Date.now() > deadline) throw new Error(`${what}: ${count()} after 5 s, expected ${expected}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** The open connections of an echo application, and the error codes its closed connections ended with. */
interface EchoApp extends Set<net.Socket> {
  endings: string[];
}

/** Starts an echo application and returns the set of its open connections. */
async function startEchoApp(t: Parameters<typeof startApp>[0], ip: string, port: number): Promise<EchoApp> {
  const open = Object.assign(new Set<net.Socket>(), { endings: [] as string[] });
  await startApp(t, ip, port, (socket) => {
    open.add(socket);
    let errorCode: string | undefined;
    socket.on("error", (error: NodeJS.ErrnoException) => (errorCode ??= error.code ?? error.message));
    socket.once("close", () => {
      open.delete(socket);
      open.endings.push(errorCode ?? "closed");
    });
    socket.pipe(socket);
  });
  return open;
}

/**
 * A pod network for the plaintext server on loopback. No sk_lookup steers port 8080 to the 15006
 * listener here, so the listener itself takes port 8080, and the server's connect to the
 * application at 8080 goes to `appPort` instead.
 */
class SteeredPodNetwork extends LoopbackPodNetwork {
  constructor(
    ip: string,
    private readonly appPort: number,
  ) {
    super(ip);
  }

  override listen(server: net.Server): Promise<void> {
    return super.listen(server, 8080);
  }

  override connect(host: string): net.Socket {
    return net.connect({ host, port: this.appPort, localAddress: this.ip });
  }
}

/** Starts a plaintext server for pod 127.77.<subnet>.2 whose decision per source IP the test sets in `denied`. */
async function startPlaintext(t: Parameters<typeof startApp>[0], subnet: number, denied: Map<string, AuthorizationResult>) {
  const podIp = `127.77.${subnet}.2`;
  const audit = new MemorySink();
  const server = new InboundPlaintextServer({
    node: "node-2",
    workload: workload("echo", "apps", "echo", podIp),
    identity: identity("apps", "echo"),
    network: new SteeredPodNetwork(podIp, 18080),
    authorize: (connection) => denied.get(connection.sourceIp) ?? ALLOW_ALL,
    lookupSource: () => undefined,
    audit,
    logger: silentLogger(),
  });
  const appConnections = await startEchoApp(t, podIp, 18080);
  await server.start();
  t.teardown(() => server.stop());
  return { podIp, audit, server, appConnections };
}

test("plaintext recheck resets only denied connections", async (t) => {
  const denied = new Map<string, AuthorizationResult>();
  const { podIp, audit, server, appConnections } = await startPlaintext(t, 210, denied);
  const friendIp = "127.77.210.1";
  const intruderIp = "127.77.210.3";
  const friend = await openEchoClient(podIp, 8080, friendIp);
  const intruder = await openEchoClient(podIp, 8080, intruderIp);
  t.teardown(() => {
    friend.socket.destroy();
    intruder.socket.destroy();
  });
  t.is(await friend.roundTrip("hello"), "hello");
  t.is(await intruder.roundTrip("intruder-1"), "intruder-1");
  await waitForOpen(server, 2);

  t.is(server.recheck(), 0, "recheck closed a connection that every policy still allows");
  denied.set(intruderIp, DENY_INTRUDER);
  const closed = server.recheck();

  t.is(closed, 1);
  t.is(await intruder.closed, "ECONNRESET", "the denied client did not see a reset");
  const record = await waitForRecord(audit, (candidate) => candidate.src.addr.startsWith(`${intruderIp}:`));
  assertPolicyChangeRecord(t, record, "closed: policy change:");
  await waitForCount(() => appConnections.size, 1, "open application connections");
  t.deepEqual(appConnections.endings, ["ECONNRESET"], "the application side of the closed connection was not reset");

  t.is(await friend.roundTrip("still here"), "still here");
  t.is(audit.records.length, 1, "the allowed connection wrote a record while still open");
  t.is(server.recheck(), 0, "a second recheck closed the allowed connection");
});

test("plaintext recheck closes on STRICT mTLS", async (t) => {
  const denied = new Map<string, AuthorizationResult>();
  const { podIp, audit, server } = await startPlaintext(t, 212, denied);
  const clientIp = "127.77.212.1";
  const client = await openEchoClient(podIp, 8080, clientIp);
  t.teardown(() => client.socket.destroy());
  t.is(await client.roundTrip("before"), "before");
  await waitForOpen(server, 1);

  denied.set(clientIp, STRICT_MTLS);

  t.is(server.recheck(), 1);
  t.is(await client.closed, "ECONNRESET");
  const record = await waitForRecord(audit, () => true);
  t.is(record.reason, "policy_change");
  t.is(record.policy, "istio-system/strict");
  t.is(record.policy_kind, "PeerAuthentication");
  t.is(record.error?.code, "POLICY_CHANGED");
  t.regex(record.error?.message ?? "", /^closed: policy change: plaintext client 127\.77\.212\.1:\d+ may not connect to .*PeerAuthentication istio-system\/strict requires mutual TLS/);
});

test("hbone recheck resets only denied streams", async (t) => {
  const deniedAccounts = new Map<string, AuthorizationResult>();
  const mesh = await startMesh(t, {
    subnet: 211,
    authorize: (connection) => deniedAccounts.get(connection.sourceIdentity?.serviceAccount ?? "") ?? ALLOW_ALL,
  });
  const appConnections = await startEchoApp(t, mesh.serverIp, 8080);
  // A second client pod, with its own identity and outbound proxy, to the same server pod.
  const intruderIp = "127.77.211.3";
  const intruderProxy = new OutboundProxy({
    node: "node-1",
    workload: workload("intruder", "default", "intruder", intruderIp),
    identity: identity("default", "intruder"),
    network: new LoopbackPodNetwork(intruderIp),
    certs: mesh.certs,
    originalDestination: () => ({ ip: mesh.serverIp, port: 8080 }),
    resolveDestination: (ip, port) => ({
      kind: "hbone",
      workload: workload("echo", "apps", "echo", mesh.serverIp),
      identity: mesh.serverIdentity,
      address: { ip, port },
    }),
    audit: new MemorySink(),
    logger: silentLogger(),
  });
  await intruderProxy.start();
  t.teardown(() => intruderProxy.stop());
  const friend = await openEchoClient(mesh.clientIp, 15001, mesh.clientIp);
  const intruder = await openEchoClient(intruderIp, 15001, intruderIp);
  t.teardown(() => {
    friend.socket.destroy();
    intruder.socket.destroy();
  });
  t.is(await friend.roundTrip("hello"), "hello");
  t.is(await intruder.roundTrip("intruder-1"), "intruder-1");
  await waitForOpen(mesh.inbound, 2);

  t.is(mesh.inbound.recheck(), 0, "recheck closed a stream that every policy still allows");
  deniedAccounts.set("intruder", DENY_INTRUDER);
  const closed = mesh.inbound.recheck();

  t.is(closed, 1);
  t.is(await intruder.closed, "ECONNRESET", "the denied client did not see a reset");
  const record = await waitForRecord(mesh.destinationAudit, (candidate) => candidate.src.identity === "spiffe://cluster.local/ns/default/sa/intruder");
  assertPolicyChangeRecord(t, record, "closed: policy change: spiffe://cluster.local/ns/default/sa/intruder");
  await waitForCount(() => appConnections.size, 1, "open application connections");
  t.deepEqual(appConnections.endings, ["ECONNRESET"], "the application side of the closed connection was not reset");

  t.is(await friend.roundTrip("still here"), "still here");
  t.is(mesh.destinationAudit.records.length, 1, "the allowed stream wrote a record while still open");
  t.is(mesh.inbound.recheck(), 0, "a second recheck closed the allowed stream");
});
