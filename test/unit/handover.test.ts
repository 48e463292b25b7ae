import test, { type ExecutionContext } from "ava";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { Predecessor } from "../../agent/handover/client";
import {
  formatHandoverMessage,
  handoverBlockers,
  handoverSocketPath,
  LineSplitter,
  MAX_MESSAGE_BYTES,
  parseHandoverMessage,
  type HandoverMessage,
} from "../../agent/handover/protocol";
import { HandoverServer, type HandoverHandlers } from "../../agent/handover/server";
import { handoverHandlers, takeOver } from "../../agent/handover/takeover";
import type { EnrollmentReconciler } from "../../agent/enroll/reconciler";
import { silentLogger } from "../../agent/log";

function socketDirectory(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "aa-handover-"));
}

/** Handlers that count their calls. */
function countingHandlers(enrolled = ["shop/web"]): HandoverHandlers & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    prepare: () => {
      calls.push("prepare");
      return { enrolled, drainTimeoutMs: 2_000 };
    },
    resume: () => void calls.push("resume"),
    release: () => void calls.push("release"),
  };
}

async function waitFor(condition: () => boolean): Promise<void> {
  const deadline = Date.now() + 2_000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("condition not met within 2 s");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test("socket path is named after the node", (t) => {
  t.is(handoverSocketPath("node-1.example", "/run/x"), "/run/x/node-node-1.example.sock");
  t.is(handoverSocketPath("a/b", "/run/x"), "/run/x/node-a_b.sock");
});

test("messages survive a format and parse round trip", (t) => {
  const messages: HandoverMessage[] = [
    { type: "prepare", pid: 42 },
    { type: "prepared", pid: 7, enrolled: ["shop/web", "shop/db"], drainTimeoutMs: 5_000 },
    { type: "handover" },
    { type: "released" },
    { type: "abort" },
    { type: "resumed" },
    { type: "error", message: "busy" },
  ];
  for (const message of messages) {
    const line = formatHandoverMessage(message);
    t.true(line.endsWith("\n"));
    t.deepEqual(parseHandoverMessage(line.trim()), message);
  }
});

test("invalid messages are rejected with the reason", (t) => {
  const cases: [string, RegExp][] = [
    ["not json", /not JSON/],
    ["[1]", /not a JSON object/],
    ['{"type":"prepare"}', /pid must be a positive integer/],
    ['{"type":"prepare","pid":0}', /pid must be a positive integer/],
    ['{"type":"prepared","pid":1,"enrolled":[1],"drainTimeoutMs":0}', /enrolled must be a list/],
    ['{"type":"prepared","pid":1,"enrolled":[],"drainTimeoutMs":-1}', /drainTimeoutMs must be/],
    ['{"type":"error"}', /message must be a string/],
    ['{"type":"reboot"}', /unknown type "reboot"/],
  ];
  for (const [line, reason] of cases) {
    const error = t.throws(() => parseHandoverMessage(line), undefined, line);
    t.regex(error!.message, reason, line);
  }
});

test("line splitter joins chunks and bounds a line", (t) => {
  const splitter = new LineSplitter();
  t.deepEqual(splitter.push('{"type":"hand'), []);
  t.deepEqual(splitter.push('over"}\n\n{"type":"abort"}\n{"ty'), ['{"type":"handover"}', '{"type":"abort"}']);
  t.deepEqual(splitter.push('pe":"resumed"}\n'), ['{"type":"resumed"}']);
  t.throws(() => new LineSplitter().push("x".repeat(MAX_MESSAGE_BYTES + 1)), { message: /longer than/ });
});

test("blockers are served pods the replacement could not start", (t) => {
  t.deepEqual(handoverBlockers(["a/x", "a/y"], ["a/x", "a/y"], ["a/x", "a/y"]), []);
  t.deepEqual(handoverBlockers(["a/y", "a/x"], ["a/x", "a/y"], []), ["a/x", "a/y"]);
  // A pod that left the node does not block, and one only the replacement serves is fine.
  t.deepEqual(handoverBlockers(["a/x", "a/gone"], ["a/x", "a/new"], ["a/x", "a/new"]), []);
  t.deepEqual(handoverBlockers([], ["a/x"], []), []);
});

test("hand-over runs prepare then release", async (t) => {
  const directory = socketDirectory();
  const socketPath = path.join(directory, "node-n.sock");
  const handlers = countingHandlers();
  const server = await HandoverServer.listen(socketPath, handlers, silentLogger());
  t.is(fs.statSync(socketPath).mode & 0o777, 0o600);

  const predecessor = await Predecessor.contact(socketPath, 2_000, silentLogger());
  t.truthy(predecessor);
  t.deepEqual(predecessor!.enrolled, ["shop/web"]);
  t.is(predecessor!.drainTimeoutMs, 2_000);
  t.is(predecessor!.pid, process.pid);
  await predecessor!.handOver(2_000);
  t.deepEqual(handlers.calls, ["prepare", "release"]);

  // A second replacement is turned away once the node was handed over.
  await t.throwsAsync(Predecessor.contact(socketPath, 2_000, silentLogger()), { message: /already handed the node over/ });
  server.close();
  t.false(fs.existsSync(socketPath));
  predecessor!.close();
  await predecessor!.waitExit(2_000);
  fs.rmSync(directory, { recursive: true, force: true });
});

test("abort and a lost replacement both resume", async (t) => {
  const directory = socketDirectory();
  const socketPath = path.join(directory, "node-n.sock");
  const handlers = countingHandlers();
  const server = await HandoverServer.listen(socketPath, handlers, silentLogger());

  const aborting = await Predecessor.contact(socketPath, 2_000, silentLogger());
  await aborting!.abort(2_000);
  t.deepEqual(handlers.calls, ["prepare", "resume"]);

  const lost = await Predecessor.contact(socketPath, 2_000, silentLogger());
  lost!.close();
  await waitFor(() => handlers.calls.length === 4);
  t.deepEqual(handlers.calls, ["prepare", "resume", "prepare", "resume"]);
  server.close();
  fs.rmSync(directory, { recursive: true, force: true });
});

test("second replacement waits for the first", async (t) => {
  const directory = socketDirectory();
  const socketPath = path.join(directory, "node-n.sock");
  const server = await HandoverServer.listen(socketPath, countingHandlers(), silentLogger());
  const first = await Predecessor.contact(socketPath, 2_000, silentLogger());
  await t.throwsAsync(Predecessor.contact(socketPath, 2_000, silentLogger()), { message: /another hand-over is in progress/ });
  first!.close();
  server.close();
  fs.rmSync(directory, { recursive: true, force: true });
});

test("contact without a running agent returns undefined", async (t) => {
  const directory = socketDirectory();
  t.is(await Predecessor.contact(path.join(directory, "missing.sock"), 2_000, silentLogger()), undefined);
  // A socket file that a killed agent left: no process accepts. Node removes its own socket file on
  // close, so a second name of the file serves as the one a killed agent leaves behind.
  const listening = path.join(directory, "listening.sock");
  const stale = path.join(directory, "stale.sock");
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(listening, resolve));
  fs.linkSync(listening, stale);
  await new Promise<void>((resolve) => server.close(() => resolve()));
  t.true(fs.existsSync(stale));
  t.is(await Predecessor.contact(stale, 2_000, silentLogger()), undefined);
  fs.rmSync(directory, { recursive: true, force: true });
});

test("contact times out on a silent agent", async (t) => {
  const directory = socketDirectory();
  const socketPath = path.join(directory, "silent.sock");
  const connections: net.Socket[] = [];
  const server = net.createServer((connection) => void connections.push(connection));
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  const error = await t.throwsAsync(Predecessor.contact(socketPath, 300, silentLogger()));
  t.regex(error!.message, /did not reply to the prepare request on .* within 0.3 s; it keeps serving the node/);
  for (const connection of connections) connection.destroy();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  fs.rmSync(directory, { recursive: true, force: true });
});

test("takeover aborts and restores both families", async (t) => {
  const directory = socketDirectory();
  t.teardown(() => fs.rmSync(directory, { recursive: true, force: true }));
  const socketPath = path.join(directory, "node-n.sock");

  // The running agent serves shop/web, whose listeners have an IPv4 and an IPv6 descriptor.
  const listenerFds: Record<4 | 6, number> = { 4: 41, 6: 61 };
  const running = [
    {
      workload: { uid: "shop/web", ip: "10.1.0.5" },
      netnsPath: "/var/run/netns/web",
      cookie: 7n,
      network: { podIp6: "fd00::5", shareListeners: () => undefined, listenerFd: (_port: number, family: 4 | 6 = 4) => listenerFds[family] },
    },
  ];
  const attached: string[] = [];
  const capture = {
    attachInbound: (netnsPath: string, cookie: bigint, podIp: string, fd: number) => void attached.push(`4 ${netnsPath} ${cookie} ${podIp} ${fd}`),
    attachInbound6: (cookie: bigint, podIp6: string, podIp4: string, fd: number) => void attached.push(`6 ${cookie} ${podIp6} ${podIp4} ${fd}`),
  };
  // The running agent stops reconciling while it prepares, and starts again when the hand-over is aborted.
  const reconcilerSteps: string[] = [];
  const runningReconciler = {
    list: () => running,
    freeze: () => void reconcilerSteps.push("freeze"),
    thaw: async () => void reconcilerSteps.push("thaw"),
  } as unknown as EnrollmentReconciler;
  const server = await HandoverServer.listen(socketPath, handoverHandlers(runningReconciler, capture, 2_000, () => t.fail("released"), silentLogger()), silentLogger());
  t.teardown(() => server.close());

  // The replacement wants shop/web but could not start its listeners, so it enrolled nothing.
  const stops: number[] = [];
  const replacementReconciler = { list: () => [], stop: async (graceMs: number) => void stops.push(graceMs) } as unknown as EnrollmentReconciler;
  const predecessor = await Predecessor.contact(socketPath, 2_000, silentLogger());
  t.truthy(predecessor);
  const error = await t.throwsAsync(
    takeOver({ predecessor: predecessor!, reconciler: replacementReconciler, capture: failingCapture(t), wanted: ["shop/web"], drainTimeoutMs: 500, logger: silentLogger() }),
  );

  t.regex(error!.message, /could not start the listeners of shop\/web, which that agent serves; it keeps serving the node/);
  t.deepEqual(attached, ["4 /var/run/netns/web 7 10.1.0.5 41", "6 7 fd00::5 10.1.0.5 61"]);
  t.deepEqual(reconcilerSteps, ["freeze", "thaw"]);
  t.deepEqual(stops, [500]);
  // The running agent accepts the next replacement, because the aborted one ended its hand-over session.
  const next = await Predecessor.contact(socketPath, 2_000, silentLogger());
  t.truthy(next);
  next!.close();
});

/** Creates a capture whose calls fail the test, because the replacement of an aborted hand-over attaches nothing. */
function failingCapture(t: ExecutionContext) {
  return {
    attachInbound: () => t.fail("the aborted replacement attached inbound capture"),
    attachInbound6: () => t.fail("the aborted replacement attached inbound IPv6 capture"),
  };
}

test("takeover reattaches after release and exit", async (t) => {
  // Every step lands in one list, so that the order of the hand-over and the attachments shows.
  const steps: string[] = [];
  const predecessor = {
    pid: 4242,
    enrolled: ["shop/web"],
    drainTimeoutMs: 0,
    handOver: async () => void steps.push("handed over"),
    waitExit: async () => void steps.push("exited"),
    abort: async () => t.fail("the hand-over was aborted"),
  } as unknown as Predecessor;
  const listenerFds: Record<4 | 6, number> = { 4: 42, 6: 62 };
  const enrolled = [
    {
      workload: { uid: "shop/web", ip: "10.1.0.5" },
      netnsPath: "/var/run/netns/web",
      cookie: 7n,
      network: { podIp6: "fd00::5", listenerFd: (_port: number, family: 4 | 6 = 4) => listenerFds[family] },
    },
  ];
  const reconciler = { list: () => enrolled } as unknown as EnrollmentReconciler;
  const capture = {
    attachInbound: (netnsPath: string, cookie: bigint, podIp: string, fd: number) => void steps.push(`4 ${netnsPath} ${cookie} ${podIp} ${fd}`),
    attachInbound6: (cookie: bigint, podIp6: string, podIp4: string, fd: number) => void steps.push(`6 ${cookie} ${podIp6} ${podIp4} ${fd}`),
  };

  await takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, logger: silentLogger() });

  const attachments = ["4 /var/run/netns/web 7 10.1.0.5 42", "6 7 fd00::5 10.1.0.5 62"];
  t.deepEqual(steps, ["handed over", ...attachments, "exited", ...attachments]);
});
