// End to end on the real kernel: hostile clients against a pod's inbound HBONE port (15008). The
// attackers are pods outside the mesh on node aahb-n1; some hold a valid mesh certificate from the
// cluster's CA. Each case checks that the agent of aahb-n2 stays alive and ready, that a legitimate
// HBONE download between two other pods arrives byte-exact while the abuse runs, and that the
// refusal is recorded: an audit record with its reason and the counter
// ambient_agent_refused_connections_total{listener="inbound",reason}.

import test, { type ExecutionContext } from "ava";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import { loadNative } from "../../agent/capture/native";
import { EmbeddedCa } from "../../agent/identity/ca";
import { AbuseCluster, assertBlobReceived, type ServedBlob } from "../harness/abuse";
import { testPrefixFamily } from "../harness/agent-process";
import {
  FrameType,
  RawH2Connection,
  Setting,
  connectHeaderBlock,
  continuationFrame,
  encodeHeaderBlock,
  errorCodeOf,
  headersFrame,
  openSocket,
  pingFrame,
  rstStreamFrame,
  settingsFrame,
  windowUpdateFrame,
  H2Error,
  type RawH2Target,
} from "../harness/h2-raw";
import type { NamespaceSpec } from "../harness/manifests";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aahb");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const BLOB_SIZE = 4 * 1024 * 1024;
const MAX_CONNECTIONS_PER_PEER = 8;
const MAX_STREAMS_PER_CONNECTION = 20;
const HANDSHAKE_TIMEOUT_SECONDS = 1.5;
const APP_PORT = 8080;
const HBONE_PORT = 15008;
/** The identity the attackers' certificates carry: valid in the mesh, allowed by the absence of any policy. */
const ATTACKER_IDENTITY = { trustDomain: "cluster.local", namespace: "aahb-evil", serviceAccount: "mallory" };

// Each attacker pod is the source of at most one case per refusal reason, so that every case's
// first refusal is written at once instead of being folded into an earlier case's record.
const ATTACKERS = ["mallory-a", "mallory-b", "mallory-c", "mallory-d"];
const NODES: NodeSpec[] = [
  {
    name: "aahb-n1",
    pods: [{ name: "client", namespace: "aahb-shop", serviceAccount: "client" }, ...ATTACKERS.map((name) => ({ name, namespace: "aahb-evil", serviceAccount: "mallory" }))],
  },
  {
    name: "aahb-n2",
    pods: [
      { name: "server", namespace: "aahb-backend", serviceAccount: "server" },
      { name: "target", namespace: "aahb-backend", serviceAccount: "target" },
    ],
  },
];
const NAMESPACES: NamespaceSpec[] = [
  { name: "aahb-shop", ambient: true },
  { name: "aahb-backend", ambient: true },
  { name: "aahb-evil", ambient: false },
];

const abuse = new AbuseCluster();
let blob: ServedBlob;
let attackerTls: RawH2Target["tls"];
let clientHello: Buffer = Buffer.alloc(0);

test.before(async () => {
  loadNative();
  const options = {
    prefix: PREFIX,
    nodes: NODES,
    namespaces: NAMESPACES,
    agentArgs: [
      "--handshake-timeout", String(HANDSHAKE_TIMEOUT_SECONDS),
      "--max-connections-per-peer", String(MAX_CONNECTIONS_PER_PEER),
      "--max-streams-per-connection", String(MAX_STREAMS_PER_CONNECTION),
    ],
    agentLogLevel: "info",
  };
  await abuse.start(PREFIX_FAMILY, options, async (cluster) => {
    blob = await abuse.serveBlob(["server", "target"], APP_PORT, BLOB_SIZE);
    await cluster.startAgents(["client", "server", "target"]);
    const issued = await (await EmbeddedCa.load(cluster.caDir)).issue(ATTACKER_IDENTITY);
    attackerTls = { certPem: issued.chainPem, keyPem: issued.keyPem, caPem: issued.caRootsPem };
    clientHello = await captureClientHello();
  });
});

test.after.always(async () => {
  await abuse.destroy();
});

/** Returns the first flight of a real TLS 1.3 client, captured by a local server that reads it and closes. */
async function captureClientHello(): Promise<Buffer> {
  const capture = net.createServer();
  const hello = new Promise<Buffer>((resolve) => capture.once("connection", (socket) => socket.once("data", (data: Buffer) => {
    resolve(data);
    socket.destroy();
  })));
  await new Promise<void>((resolve) => capture.listen(0, "127.0.0.1", resolve));
  const client = tls.connect({ port: (capture.address() as net.AddressInfo).port, host: "127.0.0.1", ALPNProtocols: ["h2"], minVersion: "TLSv1.3" });
  client.on("error", () => undefined);
  const data = await hello;
  client.destroy();
  capture.close();
  return data;
}

/** Returns the target pod's HBONE port as reached from an attacker pod, with the mesh certificate or without TLS. */
function targetOf(attacker: string, withTls = true): RawH2Target {
  return {
    host: abuse.ipOf("target"),
    port: HBONE_PORT,
    netnsPath: `/var/run/netns/${abuse.netnsOf(attacker)}`,
    tls: withTls ? attackerTls : undefined,
  };
}

/** Reads the refusal counter of the inbound listener for `reason` from aahb-n2's metrics server. */
function refusedTotal(reason: string): Promise<number> {
  return abuse.refusedTotal("aahb-n2", "inbound", reason);
}

/** Waits until a connection.refused record of aahb-n2 from `attacker` has `reason`, and returns it. */
function waitForRefusal(attacker: string, reason: string): Promise<Record<string, any>> {
  const ip = abuse.ipOf(attacker);
  return abuse.cluster.waitForAudit("aahb-n2", (record) => record.reason === reason && String(record.src?.addr).startsWith(`${ip}:`), 10_000, "connection.refused");
}

interface AbuseCase {
  attacker: string;
  /** The reason of the refusal that the abuse must cause. */
  reason: string;
  /** Runs the abuse and resolves when it is over. */
  abuse(): Promise<void>;
  /** Checks the audit trail. By default it expects a connection.refused record with `reason` from the attacker. */
  recorded?(t: ExecutionContext): Promise<void>;
}

/** Runs an abuse next to a legitimate download and checks the three outcomes every case must have. */
async function checkAbuse(t: ExecutionContext, abuseCase: AbuseCase): Promise<void> {
  const before = await refusedTotal(abuseCase.reason);
  const [transfer] = await Promise.all([abuse.fetchBlob("client", "server", blob), abuseCase.abuse()]);

  await abuse.assertAgentsServe(t, ["aahb-n2"]);
  assertBlobReceived(t, transfer, blob, "the legitimate download");
  if (abuseCase.recorded) {
    await abuseCase.recorded(t);
  } else {
    const record = await waitForRefusal(abuseCase.attacker, abuseCase.reason);
    t.is(record.listener, "inbound");
    t.is(record.port, HBONE_PORT);
    t.is(record.dst?.workload, "target");
  }
  t.true((await refusedTotal(abuseCase.reason)) > before, `ambient_agent_refused_connections_total{reason="${abuseCase.reason}"} did not increase`);
}

/** Opens an HBONE connection from `attacker` with the mesh certificate and sends the client preface. */
async function hboneConnection(attacker: string, parameters: ReadonlyArray<readonly [number, number]> = []): Promise<RawH2Connection> {
  const connection = await RawH2Connection.open(targetOf(attacker));
  connection.start(parameters);
  return connection;
}

/** Waits until the server closes the connection or `timeoutMs` pass, then destroys it. Resolves with whether the server closed it. */
async function serverClosed(connection: RawH2Connection, timeoutMs = 10_000): Promise<boolean> {
  const closed = await Promise.race([connection.closed.then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), timeoutMs))]);
  connection.destroy();
  return closed;
}

function targetAuthority(port = APP_PORT): string {
  return `${abuse.ipOf("target")}:${port}`;
}

test.serial("TLS garbage bytes", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-a",
    reason: "tls_handshake",
    abuse: async () => {
      const connection = await RawH2Connection.openTcp(targetOf("mallory-a", false));
      connection.write(Buffer.alloc(512, 0x41));
      t.true(await serverClosed(connection), "the agent kept a connection that sent garbage");
    },
  });
});

test.serial("truncated ClientHello", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-b",
    reason: "tls_handshake",
    abuse: async () => {
      const connection = await RawH2Connection.openTcp(targetOf("mallory-b", false));
      connection.write(clientHello.subarray(0, Math.floor(clientHello.length / 2)));
      connection.socket.end();
      t.true(await serverClosed(connection), "the agent kept a half-closed connection");
    },
  });
});

test.serial("TLS handshake never finished", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-c",
    reason: "handshake_timeout",
    abuse: async () => {
      const connection = await RawH2Connection.openTcp(targetOf("mallory-c", false));
      connection.write(clientHello.subarray(0, Math.floor(clientHello.length / 2)));
      t.true(await serverClosed(connection), "the agent kept a stalled handshake past the handshake timeout");
    },
  });
});

test.serial("SETTINGS flood", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-a",
    reason: "http2_flood",
    abuse: async () => {
      const connection = await hboneConnection("mallory-a");
      const frame = settingsFrame([[Setting.INITIAL_WINDOW_SIZE, 65_535]]);
      connection.write(...Array.from({ length: 20_000 }, () => frame));
      t.true(await serverClosed(connection), "the agent kept a connection that flooded SETTINGS");
    },
  });
});

test.serial("PING flood", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-b",
    reason: "http2_flood",
    abuse: async () => {
      const connection = await hboneConnection("mallory-b");
      const frame = pingFrame();
      connection.write(...Array.from({ length: 20_000 }, () => frame));
      t.true(await serverClosed(connection), "the agent kept a connection that flooded PING");
    },
  });
});

test.serial("RST_STREAM rapid reset", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-c",
    reason: "http2_flood",
    abuse: async () => {
      const connection = await hboneConnection("mallory-c");
      const block = connectHeaderBlock(targetAuthority());
      for (let i = 0; i < 600; i++) {
        const stream = 1 + 2 * i;
        connection.write(headersFrame(stream, block), rstStreamFrame(stream, H2Error.CANCEL));
      }
      const goaway = await connection.waitForGoaway(10_000);
      t.is(errorCodeOf(goaway), H2Error.ENHANCE_YOUR_CALM);
      t.true(await serverClosed(connection));
    },
  });
  // A reset stream's connect to the application is aborted or never starts, so no tunnel opens.
  const attackerIp = abuse.ipOf("mallory-c");
  const opened = abuse.cluster.auditRecords("aahb-n2", "connection.opened").filter((record) => String(record.src?.addr).startsWith(`${attackerIp}:`));
  t.deepEqual(opened, [], "a reset stream opened a tunnel");
});

test.serial("CONTINUATION without END_HEADERS", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-d",
    reason: "http2_flood",
    abuse: async () => {
      const connection = await hboneConnection("mallory-d");
      connection.write(headersFrame(1, connectHeaderBlock(targetAuthority()), { endHeaders: false }));
      const piece = continuationFrame(1, encodeHeaderBlock([["x-pad", "a"]]));
      // Endless from the client's side: it stops only when the agent closes the connection.
      for (let round = 0; round < 200 && !connection.isClosed; round++) {
        connection.write(...Array.from({ length: 100 }, () => piece));
        await new Promise((resolve) => setImmediate(resolve));
      }
      t.true(await serverClosed(connection), "the agent kept reading CONTINUATION frames");
    },
  });
});

test.serial("oversized header list", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-a",
    reason: "header_list_size",
    abuse: async () => {
      // 40 headers of 500 bytes: under Node's 128 header pairs, over the 16 KiB limit.
      const padding = Array.from({ length: 40 }, (_, index) => [`x-pad-${index}`, "p".repeat(500)] as const);
      const block = connectHeaderBlock(targetAuthority(), padding);
      const connection = await hboneConnection("mallory-a");
      connection.write(headersFrame(1, block.subarray(0, 16_000), { endHeaders: false }), continuationFrame(1, block.subarray(16_000), true));
      const answer = await connection.waitForFrame((frame) => frame.streamId === 1 && (frame.type === FrameType.HEADERS || frame.type === FrameType.RST_STREAM), 5_000, "an answer on stream 1");
      t.is(answer.type, FrameType.HEADERS, "the agent answers 431");
      connection.destroy();
    },
  });
});

test.serial("WINDOW_UPDATE overflow on stream and connection", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-a",
    reason: "http2_protocol",
    abuse: async () => {
      const onStream = await hboneConnection("mallory-a");
      onStream.write(headersFrame(1, connectHeaderBlock(targetAuthority())));
      await onStream.waitForFrame((frame) => frame.streamId === 1 && frame.type === FrameType.HEADERS, 5_000, "the CONNECT response");
      onStream.write(windowUpdateFrame(1, 0x7fffffff), windowUpdateFrame(1, 0x7fffffff));
      t.true(await serverClosed(onStream), "the agent kept a connection whose stream window overflowed");

      const onConnection = await hboneConnection("mallory-a");
      onConnection.write(windowUpdateFrame(0, 0x7fffffff), windowUpdateFrame(0, 0x7fffffff));
      t.true(await serverClosed(onConnection), "the agent kept a connection whose window overflowed");
    },
  });
});

test.serial("more streams than advertised", async (t) => {
  await checkAbuse(t, {
    attacker: "mallory-b",
    reason: "streams_per_connection",
    abuse: async () => {
      const connection = await hboneConnection("mallory-b");
      const settings = await connection.waitForFrame((frame) => frame.type === FrameType.SETTINGS && frame.flags === 0, 5_000, "the server's SETTINGS");
      t.true(settings.payload.includes(Buffer.from([0x00, Setting.MAX_CONCURRENT_STREAMS, 0, 0, 0, MAX_STREAMS_PER_CONNECTION])), "SETTINGS_MAX_CONCURRENT_STREAMS is the limit");
      connection.write(settingsFrame([], true));
      const block = connectHeaderBlock(targetAuthority());
      for (let i = 0; i < MAX_STREAMS_PER_CONNECTION; i++) connection.write(headersFrame(1 + 2 * i, block));
      const lastStream = 2 * MAX_STREAMS_PER_CONNECTION - 1;
      await connection.waitForFrame((frame) => frame.streamId === lastStream && frame.type === FrameType.HEADERS, 10_000, "the response of the last allowed stream");
      connection.write(headersFrame(lastStream + 2, block));
      t.true(await serverClosed(connection), "the agent kept a connection that exceeded its stream limit");
    },
  });
});

test.serial("CONNECT to proxy ports and agent addresses", async (t) => {
  const c = abuse.cluster;
  const targets = [
    { authority: targetAuthority(15001), status: 503, code: "PROXY_PORT" },
    { authority: targetAuthority(15006), status: 503, code: "PROXY_PORT" },
    { authority: targetAuthority(15008), status: 503, code: "PROXY_PORT" },
    { authority: `${abuse.nodeAddress("aahb-n2")}:15000`, status: 400, code: "AUTHORITY_MISMATCH" },
    { authority: `${c.topology.node("aahb-n2").linkIp}:15020`, status: 400, code: "AUTHORITY_MISMATCH" },
    { authority: "127.0.0.1:15000", status: 400, code: "AUTHORITY_MISMATCH" },
  ];
  const statuses: number[] = [];
  await checkAbuse(t, {
    attacker: "mallory-d",
    reason: "proxy_port_target",
    abuse: async () => {
      const socket = await openSocket(targetOf("mallory-d"));
      const session = http2.connect(`https://${targetAuthority(HBONE_PORT)}`, { createConnection: () => socket });
      session.on("error", () => undefined);
      for (const target of targets) {
        const stream = session.request({ ":method": "CONNECT", ":authority": target.authority }, { endStream: false });
        stream.on("error", () => undefined);
        statuses.push(await new Promise<number>((resolve) => {
          stream.once("response", (headers) => resolve(Number(headers[":status"])));
          stream.once("close", () => resolve(0));
        }));
      }
      session.destroy();
    },
    recorded: async (t) => {
      t.deepEqual(statuses, targets.map((target) => target.status));
      for (const target of targets) {
        const record = await c.waitForAudit("aahb-n2", (entry) => entry.direction === "inbound" && entry.dst?.addr === target.authority);
        t.is(record.decision, "deny", target.authority);
        t.is(record.error?.code, target.code, target.authority);
        t.is(record.src.identity, "spiffe://cluster.local/ns/aahb-evil/sa/mallory");
      }
    },
  });
});

test.serial("more connections from one peer than allowed", async (t) => {
  const connections: RawH2Connection[] = [];
  await checkAbuse(t, {
    attacker: "mallory-d",
    reason: "connections_per_peer",
    abuse: async () => {
      for (let i = 0; i < MAX_CONNECTIONS_PER_PEER + 4; i++) connections.push(await RawH2Connection.openTcp(targetOf("mallory-d", false)));
      const excess = connections.slice(MAX_CONNECTIONS_PER_PEER);
      const closed = await Promise.all(excess.map((connection) => serverClosed(connection, 5_000)));
      t.deepEqual(closed, excess.map(() => true), "the agent kept connections past --max-connections-per-peer");
      for (const connection of connections) connection.destroy();
    },
    recorded: async (t) => {
      const record = await waitForRefusal("mallory-d", "connections_per_peer");
      t.is(record.limit, MAX_CONNECTIONS_PER_PEER);
      t.regex(record.message, /--max-connections-per-peer/);
    },
  });
});
