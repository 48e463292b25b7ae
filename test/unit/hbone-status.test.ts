// Every response status of the inbound HBONE server, driven by a raw HTTP/2 client with a valid
// client certificate, and the single audit record each CONNECT leaves behind.

import { spawn } from "node:child_process";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import test, { type ExecutionContext } from "ava";
import type { AuditRecord } from "../../agent/audit/record";
import { CertManager } from "../../agent/identity/cert-manager";
import { hboneTlsOptions } from "../../agent/identity/certificate";
import { silentLogger } from "../../agent/log";
import { CONNECT_TIMEOUT_MS, HBONE_PORT } from "../../agent/proxy/hbone";
import type { InboundHboneServerOptions } from "../../agent/proxy/inbound";
import { LogCapture, delay, openClientSession, startInboundPod, type InboundPod } from "./hbone-fixtures";
import { connectStatus, createCa, echo, startApp, workload } from "./proxy-fixtures";

interface StatusCase {
  name: string;
  subnet: number;
  /** Server options that replace the fixture's for this case. */
  options?: () => Partial<InboundHboneServerOptions>;
  /** Prepares the target, for example a listener that drops SYNs, and returns its port. */
  prepare?: (t: ExecutionContext, pod: InboundPod) => Promise<number>;
  headers: (pod: InboundPod, port: number) => http2.OutgoingHttpHeaders;
  status: number;
  code?: string;
  decision: "allow" | "deny";
  reason?: string;
  policy?: string;
  message?: RegExp;
}

const connect = (authority: string): http2.OutgoingHttpHeaders => ({ ":method": "CONNECT", ":authority": authority });

/** Connect deadline used by the timeout case, so that it does not wait the real 10 s. */
const SHORT_CONNECT_TIMEOUT_MS = 500;

const cases: StatusCase[] = [
  {
    name: "valid CONNECT gets 200",
    subnet: 140,
    headers: (pod) => connect(`${pod.serverIp}:8080`),
    status: 200,
    decision: "allow",
    reason: "no_policy",
  },
  {
    name: "GET gets 400",
    subnet: 141,
    headers: (pod) => ({ ":method": "GET", ":path": "/", ":authority": `${pod.serverIp}:8080` }),
    status: 400,
    code: "BAD_REQUEST",
    decision: "deny",
    reason: "bad_request",
    message: /method GET is not CONNECT/,
  },
  {
    name: "host name authority gets 400",
    subnet: 142,
    headers: () => connect("echo.apps:8080"),
    status: 400,
    code: "BAD_REQUEST",
    decision: "deny",
    reason: "bad_request",
    message: /invalid CONNECT authority "echo\.apps:8080"/,
  },
  {
    name: "authority without port gets 400",
    subnet: 143,
    headers: (pod) => connect(pod.serverIp),
    status: 400,
    code: "BAD_REQUEST",
    decision: "deny",
    reason: "bad_request",
  },
  {
    name: "authority of another IP gets 400",
    subnet: 144,
    headers: () => connect("127.77.144.9:8080"),
    status: 400,
    code: "AUTHORITY_MISMATCH",
    decision: "deny",
    reason: "authority_mismatch",
    message: /127\.77\.144\.9:8080 names another address than 127\.77\.144\.2/,
  },
  {
    name: "policy denial gets 401",
    subnet: 145,
    options: () => ({ authorize: () => ({ decision: "deny", policy: "apps/only-admin", reason: "no_allow_match", dryRun: [] }) }),
    headers: (pod) => connect(`${pod.serverIp}:8080`),
    status: 401,
    code: "POLICY_DENIED",
    decision: "deny",
    reason: "no_allow_match",
    policy: "apps/only-admin",
    message: /may not connect to 127\.77\.145\.2:8080: AuthorizationPolicy apps\/only-admin/,
  },
  {
    name: "departed workload gets 503",
    subnet: 146,
    options: () => ({ currentWorkload: () => undefined }),
    headers: (pod) => connect(`${pod.serverIp}:8080`),
    status: 503,
    code: "UNKNOWN_DESTINATION",
    decision: "deny",
    reason: "unknown_destination",
    message: /no workload is known at 127\.77\.146\.2:8080/,
  },
  {
    name: "workload with a new IP gets 503",
    subnet: 147,
    options: () => ({ currentWorkload: () => workload("echo", "apps", "echo", "127.77.147.9") }),
    headers: (pod) => connect(`${pod.serverIp}:8080`),
    status: 503,
    code: "UNKNOWN_DESTINATION",
    decision: "deny",
    reason: "unknown_destination",
  },
  ...[15001, 15006, 15008].map(
    (port, index): StatusCase => ({
      name: `proxy port ${port} gets 503`,
      subnet: 148 + index,
      headers: (pod) => connect(`${pod.serverIp}:${port}`),
      status: 503,
      code: "PROXY_PORT",
      decision: "deny",
      reason: "proxy_port",
    }),
  ),
  {
    name: "refused connect gets 503",
    subnet: 151,
    headers: (pod) => connect(`${pod.serverIp}:8099`),
    status: 503,
    code: "UPSTREAM_CONNECT_FAILED",
    decision: "allow",
    reason: "no_policy",
    message: /connect to the application at 127\.77\.151\.2:8099 failed: .*ECONNREFUSED/,
  },
  {
    name: "connect timeout gets 503",
    subnet: 152,
    options: () => ({ connectTimeoutMs: SHORT_CONNECT_TIMEOUT_MS }),
    prepare: startSynDroppingListener,
    headers: (pod, port) => connect(`${pod.serverIp}:${port}`),
    status: 503,
    code: "UPSTREAM_CONNECT_FAILED",
    decision: "allow",
    reason: "no_policy",
    message: new RegExp(`timed out after ${SHORT_CONNECT_TIMEOUT_MS} ms`),
  },
];

for (const item of cases) {
  test(`inbound ${item.name}`, async (t) => {
    const pod = await startInboundPod(t, item.subnet, item.options?.() ?? {});
    let appConnections = 0;
    await startApp(t, pod.serverIp, 8080, (socket) => {
      appConnections += 1;
      echo(socket);
    });
    const port = item.prepare ? await item.prepare(t, pod) : 8080;
    const session = await openClientSession(t, pod);

    const started = Date.now();
    const outcome = await connectStatus(session, item.headers(pod, port));
    const elapsed = Date.now() - started;

    t.is(outcome.status, item.status, `outcome: ${JSON.stringify(outcome)}`);
    const record = await pod.audit.next("inbound");
    await delay(200);
    t.is(pod.audit.records.length, 1, `records: ${JSON.stringify(pod.audit.records)}`);
    assertRecord(t, record, item, pod);
    t.is(appConnections, item.status === 200 ? 1 : 0);
    if (item.prepare) {
      t.true(elapsed >= SHORT_CONNECT_TIMEOUT_MS - 20, `answered after ${elapsed} ms`);
      t.true(elapsed < SHORT_CONNECT_TIMEOUT_MS + 2_000, `answered after ${elapsed} ms`);
    }
  });
}

function assertRecord(t: ExecutionContext, record: AuditRecord, item: StatusCase, pod: InboundPod): void {
  t.is(record.direction, "inbound");
  t.is(record.transport, "hbone");
  t.is(record.error?.code, item.code);
  t.is(record.decision, item.decision);
  if (item.reason !== undefined) t.is(record.reason, item.reason);
  t.is(record.policy, item.policy);
  if (item.message) t.regex(record.error?.message ?? "", item.message);
  t.is(record.src.identity, "spiffe://cluster.local/ns/default/sa/sleep");
  t.is(record.src.workload, "sleep");
  t.is(record.dst.hbone_addr, `${pod.serverIp}:15008`);
  t.is(record.dst.identity, "spiffe://cluster.local/ns/apps/sa/echo");
}

test("inbound connect timeout defaults to 10 s", (t) => {
  t.is(CONNECT_TIMEOUT_MS, 10_000);
});

test("inbound answers each stream of one connection", async (t) => {
  const pod = await startInboundPod(t, 153);
  await startApp(t, pod.serverIp, 8080, echo);
  const session = await openClientSession(t, pod);

  const statuses = await Promise.all([
    connectStatus(session, connect(`${pod.serverIp}:8080`)),
    connectStatus(session, connect(`${pod.serverIp}:15008`)),
    connectStatus(session, connect("127.77.153.9:8080")),
    connectStatus(session, connect(`${pod.serverIp}:8099`)),
  ]);

  t.deepEqual(
    statuses.map((outcome) => outcome.status),
    [200, 503, 400, 503],
  );
  await delay(300);
  const codes = pod.audit.records.map((record) => record.error?.code ?? "none").sort();
  t.deepEqual(codes, ["AUTHORITY_MISMATCH", "PROXY_PORT", "UPSTREAM_CONNECT_FAILED", "none"]);
});

test("inbound client reset aborts a pending connect", async (t) => {
  const pod = await startInboundPod(t, 154, { connectTimeoutMs: 5_000 });
  const port = await startSynDroppingListener(t, pod);
  const session = await openClientSession(t, pod);

  const started = Date.now();
  const stream = session.request(connect(`${pod.serverIp}:${port}`), { endStream: false });
  stream.on("error", () => undefined);
  await delay(200);
  stream.close(http2.constants.NGHTTP2_CANCEL);
  const record = await pod.audit.next("inbound", 3_000);
  const elapsed = Date.now() - started;

  t.is(record.error?.code, "STREAM_RESET");
  t.regex(record.error?.message ?? "", /client reset the CONNECT stream to 127\.77\.154\.2:\d+ before the connect/);
  t.true(elapsed < 2_000, `recorded after ${elapsed} ms`);
  await delay(200);
  t.is(pod.audit.records.length, 1);
});

/**
 * Starts a listener that never accepts, with an accept queue of one, and fills the queue: Linux then
 * drops every further SYN to it, so a connect hangs until its deadline. Node accepts at once, so a
 * Python child process owns the listener. Returns its port.
 */
async function startSynDroppingListener(t: ExecutionContext, pod: InboundPod): Promise<number> {
  const script = [
    "import socket, sys, time",
    "s = socket.socket()",
    `s.bind(("${pod.serverIp}", 0))`,
    "s.listen(0)",
    "print(s.getsockname()[1], flush=True)",
    "time.sleep(60)",
  ].join("\n");
  const child = spawn("python3", ["-c", script], { stdio: ["ignore", "pipe", "inherit"] });
  t.teardown(() => {
    if (child.exitCode === null) child.kill("SIGKILL");
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout.once("data", (chunk: Buffer) => resolve(Number(chunk.toString().trim())));
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`python3 exited with ${code} before listening`)));
  });
  const filler = net.connect({ host: pod.serverIp, port, localAddress: pod.clientIp });
  filler.on("error", () => undefined);
  t.teardown(() => filler.destroy());
  await new Promise<void>((resolve, reject) => {
    filler.once("connect", () => resolve());
    filler.once("error", reject);
  });
  return port;
}

test("a rejected client certificate is logged with the client's address and the reason", async (t) => {
  const log = new LogCapture();
  const pod = await startInboundPod(t, 209, { logger: log.logger });
  // A certificate from another CA: the server rejects it after the client's side of the handshake.
  const otherCa = await createCa(t);
  const otherCerts = new CertManager(otherCa, silentLogger());
  t.teardown(() => otherCerts.close());
  const certificate = await otherCerts.get(pod.clientIdentity);
  const options: tls.ConnectionOptions = {
    ...hboneTlsOptions(certificate),
    socket: net.connect({ host: pod.serverIp, port: HBONE_PORT, localAddress: pod.clientIp }),
    ALPNProtocols: ["h2"],
    servername: "",
    rejectUnauthorized: false,
  };
  const socket = tls.connect(options);
  socket.on("error", () => undefined);
  t.teardown(() => socket.destroy());
  const deadline = Date.now() + 5_000;
  const rejected = () => log.withMessage("connection failed").filter((entry) => entry.reason === "unknown_root");
  while (rejected().length === 0 && Date.now() < deadline) await delay(20);
  const [line] = rejected();
  t.truthy(line, "no log line for the failed handshake");
  t.regex(String(line["src.addr"]), new RegExp(`^${pod.clientIp.replaceAll(".", "\\.")}:\\d+$`));
});
