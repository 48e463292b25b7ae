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
import { DEFAULT_PREPARED_TIMEOUT_MS, HandoverServer, preparedTimeoutFromEnvironment, PREPARED_TIMEOUT_VARIABLE, type HandoverHandlers } from "../../agent/handover/server";
import { handoverHandlers, takeLocksWhenFree, takeOver } from "../../agent/handover/takeover";
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

/** Starts a hand-over server with counting handlers in a new folder; both end with the test. */
async function countingServer(t: ExecutionContext, preparedTimeoutMs?: number): Promise<{ socketPath: string; handlers: ReturnType<typeof countingHandlers> }> {
  const directory = socketDirectory();
  t.teardown(() => fs.rmSync(directory, { recursive: true, force: true }));
  const socketPath = path.join(directory, "node-n.sock");
  const handlers = countingHandlers();
  const server = await HandoverServer.listen(socketPath, handlers, silentLogger(), preparedTimeoutMs);
  t.teardown(() => server.close());
  return { socketPath, handlers };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Listens on a socket as a running agent that replies with `replies`, one line per request, and
 * closes the connection once they are used up. Returns the socket path; the test's teardown closes the server.
 */
async function scriptedAgent(t: ExecutionContext, replies: string[]): Promise<string> {
  const directory = socketDirectory();
  const socketPath = path.join(directory, "node-n.sock");
  const connections: net.Socket[] = [];
  const server = net.createServer((connection) => {
    connections.push(connection);
    const splitter = new LineSplitter();
    let next = 0;
    connection.on("data", (chunk: Buffer) => {
      for (const _line of splitter.push(chunk)) {
        if (next < replies.length) connection.write(replies[next++]);
        if (next >= replies.length) connection.end();
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  t.teardown(async () => {
    for (const connection of connections) connection.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    fs.rmSync(directory, { recursive: true, force: true });
  });
  return socketPath;
}

const PREPARED_LINE = formatHandoverMessage({ type: "prepared", pid: 4242, enrolled: ["shop/web"], drainTimeoutMs: 0 });

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
    takeOver({
      predecessor: predecessor!,
      reconciler: replacementReconciler,
      capture: failingCapture(t),
      wanted: ["shop/web"],
      drainTimeoutMs: 500,
      takeLocks: () => t.fail("the aborted replacement took the locks"),
      logger: silentLogger(),
    }),
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
    handOver: async () => {
      steps.push("handed over");
      return true;
    },
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

  const takeLocks = (): void => void steps.push("locked");
  await takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, takeLocks, logger: silentLogger() });

  const attachments = ["4 /var/run/netns/web 7 10.1.0.5 42", "6 7 fd00::5 10.1.0.5 62"];
  t.deepEqual(steps, ["handed over", ...attachments, "exited", ...attachments, "locked"]);
});

test("probe connects without preparing", async (t) => {
  const directory = socketDirectory();
  t.teardown(() => fs.rmSync(directory, { recursive: true, force: true }));
  const socketPath = path.join(directory, "node-n.sock");
  t.false(await Predecessor.probe(socketPath, 2_000));

  const handlers = countingHandlers();
  const server = await HandoverServer.listen(socketPath, handlers, silentLogger());
  t.teardown(() => server.close());
  t.true(await Predecessor.probe(socketPath, 2_000));
  t.deepEqual(handlers.calls, []);
  // The probe left no session behind, so a hand-over can start at once.
  const predecessor = await Predecessor.contact(socketPath, 2_000, silentLogger());
  t.truthy(predecessor);
  t.deepEqual(handlers.calls, ["prepare"]);
  predecessor!.close();
});

test("prepared state expires without handover", async (t) => {
  const { socketPath, handlers } = await countingServer(t, 100);

  const stalled = await Predecessor.contact(socketPath, 2_000, silentLogger());
  await waitFor(() => handlers.calls.length === 2);
  t.deepEqual(handlers.calls, ["prepare", "resume"]);
  // The replacement learns why once it sends its request, and the running agent ignores it.
  const error = await t.throwsAsync(stalled!.handOver(2_000));
  t.regex(error!.message, /the hand-over timed out: no handover or abort request within 0.1 s of prepare, so the running agent \(PID \d+\) serves the node alone again/);
  t.deepEqual(handlers.calls, ["prepare", "resume"]);

  // The running agent serves the next replacement.
  const next = await Predecessor.contact(socketPath, 2_000, silentLogger());
  t.true(await next!.handOver(2_000));
  t.deepEqual(handlers.calls, ["prepare", "resume", "prepare", "release"]);
  next!.close();
});

test("handover or abort ends the deadline", async (t) => {
  const { socketPath, handlers } = await countingServer(t, 100);

  const aborting = await Predecessor.contact(socketPath, 2_000, silentLogger());
  t.true(await aborting!.abort(2_000));
  const predecessor = await Predecessor.contact(socketPath, 2_000, silentLogger());
  t.true(await predecessor!.handOver(2_000));
  await sleep(300);
  t.deepEqual(handlers.calls, ["prepare", "resume", "prepare", "release"]);
  predecessor!.close();
});

test("stopping agent no longer expires", async (t) => {
  const directory = socketDirectory();
  t.teardown(() => fs.rmSync(directory, { recursive: true, force: true }));
  const socketPath = path.join(directory, "node-n.sock");
  const handlers = countingHandlers();
  const server = await HandoverServer.listen(socketPath, handlers, silentLogger(), 100);
  const predecessor = await Predecessor.contact(socketPath, 2_000, silentLogger());
  // As on SIGTERM: the running agent stops while prepared, and must not tell the replacement that it serves alone again.
  server.close();
  await sleep(300);
  t.deepEqual(handlers.calls, ["prepare"]);
  predecessor!.close();
});

test("closed connection reads as a stopped agent", async (t) => {
  // Closed before the prepare reply: the agent is gone, as if no agent ran.
  t.is(await Predecessor.contact(await scriptedAgent(t, []), 2_000, silentLogger()), undefined);

  // Closed after prepared, before the handover or abort reply.
  const handingOver = await Predecessor.contact(await scriptedAgent(t, [PREPARED_LINE]), 2_000, silentLogger());
  t.is(handingOver!.pid, 4242);
  t.false(await handingOver!.handOver(2_000));
  const aborting = await Predecessor.contact(await scriptedAgent(t, [PREPARED_LINE]), 2_000, silentLogger());
  t.false(await aborting!.abort(2_000));
});

test("invalid reply is an error", async (t) => {
  const socketPath = await scriptedAgent(t, ['{"type":"reboot"}\n']);
  const error = await t.throwsAsync(Predecessor.contact(socketPath, 2_000, silentLogger()));
  t.regex(error!.message, /invalid hand-over message .*unknown type "reboot"/);
});

/** Returns a predecessor whose connection closed after prepared, as one stopped by SIGTERM. */
function stoppedPredecessor(t: ExecutionContext, steps: string[]): Predecessor {
  return {
    pid: 4242,
    enrolled: ["shop/web"],
    drainTimeoutMs: 0,
    handOver: async () => {
      steps.push("handover unanswered");
      return false;
    },
    abort: async () => {
      steps.push("abort unanswered");
      return false;
    },
    waitExit: async () => t.fail("waited for the exit of an agent that never released the node"),
  } as unknown as Predecessor;
}

/** Returns the replacement's reconciler, which enrolled shop/web unless `enrolled` is false, and a capture that records each attachment in `steps`. */
function replacementSide(steps: string[], enrolled = true) {
  const entries = [
    {
      workload: { uid: "shop/web", ip: "10.1.0.5" },
      netnsPath: "/var/run/netns/web",
      cookie: 7n,
      network: { podIp6: undefined, listenerFd: () => 42 },
    },
  ];
  return {
    reconciler: { list: () => (enrolled ? entries : []), stop: async () => void steps.push("stopped") } as unknown as EnrollmentReconciler,
    capture: {
      attachInbound: (netnsPath: string, cookie: bigint, podIp: string, fd: number) => void steps.push(`4 ${netnsPath} ${cookie} ${podIp} ${fd}`),
    },
  };
}

/** Returns a takeLocks that fails `held` times, as while the stopped agent drains, and then succeeds. */
function locksFreeAfter(held: number, steps: string[]): () => void {
  let attempts = 0;
  return () => {
    if (attempts++ < held) {
      steps.push("held");
      throw new Error("another agent (PID 4242) already serves the node n");
    }
    steps.push("locked");
  };
}

test("takeover from a stopped agent waits for its locks", async (t) => {
  const steps: string[] = [];
  const { reconciler, capture } = replacementSide(steps);
  const predecessor = stoppedPredecessor(t, steps);
  await takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, takeLocks: locksFreeAfter(2, steps), logger: silentLogger() });
  t.deepEqual(steps, ["handover unanswered", "held", "held", "locked", "4 /var/run/netns/web 7 10.1.0.5 42"]);
});

test("takeover retries locks after exit", async (t) => {
  // A killed agent's lock files close as the kernel closes its files, possibly after its hand-over connection.
  const steps: string[] = [];
  const { reconciler, capture } = replacementSide(steps);
  const predecessor = {
    pid: 4242,
    enrolled: ["shop/web"],
    drainTimeoutMs: 0,
    handOver: async () => true,
    waitExit: async () => void steps.push("exited"),
    abort: async () => t.fail("the hand-over was aborted"),
  } as unknown as Predecessor;
  await takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, takeLocks: locksFreeAfter(1, steps), logger: silentLogger() });
  const attachment = "4 /var/run/netns/web 7 10.1.0.5 42";
  t.deepEqual(steps, [attachment, "exited", attachment, "held", "locked"]);
});

test("abort to a stopped agent continues", async (t) => {
  // The replacement could not start shop/web, and the running agent stopped before it confirmed the abort.
  const steps: string[] = [];
  const { reconciler, capture } = replacementSide(steps, false);
  const predecessor = stoppedPredecessor(t, steps);
  await takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, takeLocks: locksFreeAfter(0, steps), logger: silentLogger() });
  t.deepEqual(steps, ["abort unanswered", "locked"]);
});

test("lock wait names the agent and the lock", async (t) => {
  const steps: string[] = [];
  const error = await t.throwsAsync(takeLocksWhenFree(locksFreeAfter(Infinity, steps), 300, "the agent being replaced (PID 4242) closed the hand-over connection"));
  t.regex(error!.message, /^the agent being replaced \(PID 4242\) closed the hand-over connection, and its locks were still taken after 0.3 s: another agent \(PID 4242\) already serves the node n\. Check that agent's log/);
  t.false(steps.includes("locked"));
});

test("prepared deadline comes from the environment", (t) => {
  t.is(preparedTimeoutFromEnvironment({}), DEFAULT_PREPARED_TIMEOUT_MS);
  t.is(preparedTimeoutFromEnvironment({ [PREPARED_TIMEOUT_VARIABLE]: "" }), DEFAULT_PREPARED_TIMEOUT_MS);
  t.is(preparedTimeoutFromEnvironment({ [PREPARED_TIMEOUT_VARIABLE]: "2500" }), 2_500);
  for (const text of ["0", "-1", "1.5", "1e3", "soon", " 5"]) {
    const error = t.throws(() => preparedTimeoutFromEnvironment({ [PREPARED_TIMEOUT_VARIABLE]: text }), undefined, text);
    t.is(error!.message, `invalid ${PREPARED_TIMEOUT_VARIABLE}=${JSON.stringify(text)}: expected a positive number of milliseconds; unset it to use 60000`, text);
  }
});

/** Starts a hand-over server with counting handlers in a new folder, and returns the server too; both end with the test. */
async function stoppableServer(t: ExecutionContext): Promise<{ server: HandoverServer; socketPath: string; handlers: ReturnType<typeof countingHandlers> }> {
  const directory = socketDirectory();
  t.teardown(() => fs.rmSync(directory, { recursive: true, force: true }));
  const socketPath = path.join(directory, "node-n.sock");
  const handlers = countingHandlers();
  const server = await HandoverServer.listen(socketPath, handlers, silentLogger());
  t.teardown(() => server.close());
  return { server, socketPath, handlers };
}

/** Connects to a hand-over socket as a replacement and collects the messages the running agent sends. */
async function rawReplacement(socketPath: string): Promise<{ connection: net.Socket; messages: HandoverMessage[]; closed: Promise<void> }> {
  const connection = net.createConnection(socketPath);
  const messages: HandoverMessage[] = [];
  const splitter = new LineSplitter();
  connection.on("data", (chunk: Buffer) => messages.push(...splitter.push(chunk).map(parseHandoverMessage)));
  connection.on("error", () => undefined);
  const closed = new Promise<void>((resolve) => connection.once("close", () => resolve()));
  await new Promise<void>((resolve, reject) => {
    connection.once("connect", resolve);
    connection.once("error", reject);
  });
  return { connection, messages, closed };
}

/** Returns the message of the error that a stopping agent sends, or undefined for any other message. */
function stoppingMessage(message: HandoverMessage | undefined): string | undefined {
  return message?.type === "error" && message.stopping === true ? message.message : undefined;
}

const STOPPING = /^the running agent is stopping \(PID \d+\) and hands the node over to no one: take the node once its locks are free$/;

test("stopping flag survives a round trip", (t) => {
  const message: HandoverMessage = { type: "error", message: "the running agent is stopping", stopping: true };
  t.deepEqual(parseHandoverMessage(formatHandoverMessage(message).trim()), message);
  t.deepEqual(parseHandoverMessage('{"type":"error","message":"busy","stopping":false}'), { type: "error", message: "busy" });
  t.throws(() => parseHandoverMessage('{"type":"error","message":"busy","stopping":"yes"}'), { message: /stopping must be true or false/ });
});

test("stop ends a prepared session", async (t) => {
  const { server, handlers } = await stoppableServer(t);
  const replacement = await rawReplacement(server.socketPath);
  replacement.connection.write(formatHandoverMessage({ type: "prepare", pid: process.pid }));
  await waitFor(() => replacement.messages.length === 1);
  t.is(replacement.messages[0]?.type, "prepared");

  // As at SIGTERM: the stop begins before the replacement sends handover, which then comes too late.
  server.close();
  replacement.connection.write(formatHandoverMessage({ type: "handover" }));
  await replacement.closed;
  t.is(replacement.messages.length, 2, JSON.stringify(replacement.messages));
  t.regex(stoppingMessage(replacement.messages[1]) ?? "", STOPPING);
  // Neither released nor resumed: the stopping agent closes its listeners itself.
  t.deepEqual(handlers.calls, ["prepare"]);
  t.false(server.handedOver);
});

test("stop ends an idle connection", async (t) => {
  const { server, handlers } = await stoppableServer(t);
  const replacement = await rawReplacement(server.socketPath);
  server.close();
  await replacement.closed;
  t.is(replacement.messages.length, 1);
  t.regex(stoppingMessage(replacement.messages[0]) ?? "", STOPPING);
  t.deepEqual(handlers.calls, []);
});

test("stopped server refuses new replacements", async (t) => {
  const { server, handlers } = await stoppableServer(t);
  server.close();
  t.false(fs.existsSync(server.socketPath));
  t.is(await Predecessor.contact(server.socketPath, 2_000, silentLogger()), undefined);
  t.false(await Predecessor.probe(server.socketPath, 2_000));
  t.deepEqual(handlers.calls, []);
});

test("stopping reply reads as stopped", async (t) => {
  const { server, handlers } = await stoppableServer(t);
  const handingOver = await Predecessor.contact(server.socketPath, 2_000, silentLogger());
  t.truthy(handingOver);
  server.close();
  t.false(await handingOver!.handOver(2_000));
  await handingOver!.waitExit(2_000);
  t.deepEqual(handlers.calls, ["prepare"]);

  // The same reply to prepare and to abort, from an agent that sends it in place of the reply.
  const stopping = formatHandoverMessage({ type: "error", message: "the running agent is stopping", stopping: true });
  t.is(await Predecessor.contact(await scriptedAgent(t, [stopping]), 2_000, silentLogger()), undefined);
  const aborting = await Predecessor.contact(await scriptedAgent(t, [PREPARED_LINE, stopping]), 2_000, silentLogger());
  t.false(await aborting!.abort(2_000));
});

test("stop keeps the released session open", async (t) => {
  const { server, handlers } = await stoppableServer(t);
  const replacement = await Predecessor.contact(server.socketPath, 2_000, silentLogger());
  t.true(await replacement!.handOver(2_000));
  t.true(server.handedOver);
  let closed = false;
  const exited = replacement!.waitExit(2_000).then(() => (closed = true));
  server.close();
  await sleep(100);
  t.false(closed, "the stop closed the connection of the replacement that took the node");
  // The replacement learns that the node is free once this agent released its locks.
  server.closeReleased();
  await exited;
  t.deepEqual(handlers.calls, ["prepare", "release"]);
});

test("takeover stops on removed capture", async (t) => {
  const steps: string[] = [];
  const { reconciler, capture } = replacementSide(steps);
  const predecessor = stoppedPredecessor(t, steps);
  const missingCapture = (): string[] => ["/sys/fs/bpf/ambient-agent/n/maps/aa_enrolled", "/sys/fs/bpf/ambient-agent/n/links/aa_connect4"];
  const error = await t.throwsAsync(
    takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, takeLocks: locksFreeAfter(1, steps), missingCapture, logger: silentLogger() }),
  );
  t.is(
    error!.message,
    "the agent being replaced (PID 4242) removed this node's capture as it stopped, as an uninstall does (2 gone, such as /sys/fs/bpf/ambient-agent/n/maps/aa_enrolled), " +
      "so this agent does not serve the node. Start it again to attach capture anew",
  );
  // Inbound capture is not pointed here, which would pin a link under the removed pin root.
  t.deepEqual(steps, ["handover unanswered", "held", "locked"]);
});

test("takeover keeps intact capture", async (t) => {
  const steps: string[] = [];
  const { reconciler, capture } = replacementSide(steps);
  const predecessor = stoppedPredecessor(t, steps);
  await takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, takeLocks: locksFreeAfter(0, steps), missingCapture: () => [], logger: silentLogger() });
  t.deepEqual(steps, ["handover unanswered", "locked", "4 /var/run/netns/web 7 10.1.0.5 42"]);
});

test("lock wait ends on abort", async (t) => {
  const steps: string[] = [];
  const controller = new AbortController();
  const reason = new Error("the agent was asked to stop while it was starting");
  const takeLocks = (): void => {
    steps.push("held");
    if (steps.length === 2) controller.abort(reason);
    throw new Error("another agent (PID 4242) already serves the node n");
  };
  // The timeout is far beyond the test's, so only the abort can end the wait.
  const error = await t.throwsAsync(takeLocksWhenFree(takeLocks, 600_000, "the agent that served the node stopped before the hand-over", controller.signal));
  t.is(error, reason);
  t.deepEqual(steps, ["held", "held"]);

  // Aborted before the wait: no attempt at all.
  const attempts: string[] = [];
  await t.throwsAsync(takeLocksWhenFree(() => void attempts.push("locked"), 600_000, "stopped", controller.signal), { is: reason });
  t.deepEqual(attempts, []);
});

test("stopped-agent takeover ends on abort", async (t) => {
  const steps: string[] = [];
  const { reconciler, capture } = replacementSide(steps);
  const predecessor = stoppedPredecessor(t, steps);
  const controller = new AbortController();
  controller.abort(new Error("the agent was asked to stop while it was starting"));
  await t.throwsAsync(
    takeOver({ predecessor, reconciler, capture, wanted: ["shop/web"], drainTimeoutMs: 500, takeLocks: locksFreeAfter(0, steps), signal: controller.signal, logger: silentLogger() }),
    { message: "the agent was asked to stop while it was starting" },
  );
  t.deepEqual(steps, ["handover unanswered"]);
});
