// End-to-end test of inbound capture on the real kernel: two network namespaces joined by a
// veth, B enrolled for inbound capture with a stub 15006 listener, clients in A and in B.
// Needs root, bpffs and cgroup v2 (sockops records the agent's own connections), and fails
// without them.
import test from "ava";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";

import { Capture } from "../../agent/capture/ebpf/capture";
import {
  INBOUND_PROGRAM_NAME,
  MAP_OWN_CONNECTIONS,
  encodeOwnConnectionKey,
  inboundLinkName,
} from "../../agent/capture/layout";
import { closeFd, netnsCookie, netnsSocket } from "../../agent/capture/native";
import { mapLookup, mapOpen } from "../../agent/capture/ebpf/native-bpf";
import { NetnsPodNetwork } from "../../agent/capture/netns-network";
import { silentLogger } from "../../agent/log";
import { acceptedAfterSettling, connectIpv6, startIpv6Server, type Ipv6Server } from "../harness/ipv6-probe";
import {
  assertCaptureHost,
  BPFFS,
  CGROUP_ROOT,
  createNetnsPair,
  OBJECT_PATH,
  PIN_PARENT,
  deleteNetns,
  linkLocalAddress,
  removePinParentIfEmpty,
  removeStaleCaptureState,
  type NetnsPair,
} from "../harness/netns-pair";
import { appConnect, listenOn, readAll, socatIn } from "../harness/netns-sockets";

const PREFIX = "aainb";
const PIN_ROOT = path.join(PIN_PARENT, `${PREFIX}-${process.pid}`);
const APP_PORT = 8080;
/** Port of the IPv6-only application server in B. */
const APP6_PORT = 8086;
/** A port where nothing in B listens. */
const CLOSED_PORT = 9099;
const WAIT_MS = 5000;
/** How long a client waits for a connection that capture must drop. */
const DROP_WAIT_MS = 2000;
/** A third namespace, deleted while its link is pinned. */
const GONE_NETNS = `${PREFIX}-${process.pid}-c`;
/** Mark and routing table of the inbound proxy's transparent sockets, as the agent sets them up in a pod. */
const TRANSPARENT_MARK = 0x1539;
const TRANSPARENT_TABLE = "100";

interface Accepted {
  local: string;
  remote: string;
}

interface Fixture {
  pair: NetnsPair;
  capture: Capture;
  cookieB: bigint;
  /** Connections accepted by the stub 15006 listener in B. */
  inbound: Accepted[];
  /** Connections accepted by the application in B. */
  app: Accepted[];
  /** Connections accepted by the stub 15001 listener in B. */
  outbound: Accepted[];
  inboundServer: net.Server;
  /** File descriptor of inboundServer's listening socket. */
  inboundFd: number;
  servers: net.Server[];
  /** IPv6-only application server in B. */
  app6: Ipv6Server;
}

let fixture: Fixture | undefined;

function fx(): Fixture {
  if (!fixture) throw new Error("the test fixture failed to start; see the before hook's error");
  return fixture;
}


function run(command: string, args: string[]): void {
  execFileSync(command, args, { stdio: ["ignore", "ignore", "pipe"] });
}

/** Routes replies to the transparent sockets' spoofed source addresses back into the pod. */
function enableTransparentReplies(netns: NetnsPair["b"]): void {
  run("ip", ["-n", netns.name, "rule", "add", "fwmark", `${TRANSPARENT_MARK}/0xffff`, "lookup", TRANSPARENT_TABLE]);
  run("ip", ["-n", netns.name, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", TRANSPARENT_TABLE]);
  run("nsenter", [`--net=${netns.path}`, "sysctl", "-q", "-w", "net.ipv4.tcp_fwmark_accept=1"]);
}

/** Creates a server that records each accepted connection's addresses and replies `<name> <local address>`. */
function recordingServer(name: string, accepted: Accepted[]): net.Server {
  return net.createServer((socket) => {
    // Clients may close before reading the reply; a reset must not fail the test run.
    socket.on("error", () => undefined);
    const local = `${socket.localAddress}:${socket.localPort}`;
    accepted.push({ local, remote: `${socket.remoteAddress}:${socket.remotePort}` });
    socket.end(`${name} ${local}`);
  });
}

/** Creates B's 15006 listener, puts it into capture, then hands it to Node: the agent's order. */
async function startInboundListener(
  state: Pick<Fixture, "pair" | "capture" | "cookieB" | "inbound">,
): Promise<{ inboundServer: net.Server; inboundFd: number }> {
  const fd = netnsSocket(state.pair.b.path, { bindIp: "0.0.0.0", port: 15006, backlog: 511 });
  const server = recordingServer("inbound", state.inbound);
  try {
    state.capture.attachInbound(state.pair.b.path, state.cookieB, state.pair.b.ip, fd);
  } catch (error) {
    closeFd(fd);
    throw error;
  }
  await listenOn(server, fd);
  return { inboundServer: server, inboundFd: fd };
}

async function startServers(pair: NetnsPair, capture: Capture, cookieB: bigint, app6: Ipv6Server): Promise<Fixture> {
  const state = { pair, capture, cookieB, inbound: [] as Accepted[], app: [] as Accepted[], outbound: [] as Accepted[], app6 };
  const servers: net.Server[] = [];

  const app = recordingServer("app", state.app);
  servers.push(app);
  await listenOn(app, netnsSocket(pair.b.path, { agentSocket: false, bindIp: "0.0.0.0", port: APP_PORT, backlog: 64 }));

  const hbone = recordingServer("hbone", []);
  servers.push(hbone);
  await listenOn(hbone, netnsSocket(pair.b.path, { bindIp: "0.0.0.0", port: 15008, backlog: 64 }));

  const outbound = recordingServer("outbound", state.outbound);
  servers.push(outbound);
  await listenOn(outbound, netnsSocket(pair.b.path, { bindIp: "0.0.0.0", port: 15001, backlog: 64 }));

  // The listener is not IP_TRANSPARENT: sk_assign does not need it.
  const listener = await startInboundListener(state);
  return { ...state, ...listener, servers };
}

/** Waits for a socket to connect and returns "connected", the error code, or "timeout" after DROP_WAIT_MS. */
function connectOutcome(socket: net.Socket): Promise<string> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      socket.destroy();
      resolve("timeout");
    }, DROP_WAIT_MS);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.destroy();
      resolve("connected");
    });
    socket.once("error", (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve(error.code ?? error.message);
    });
  });
}

function waitConnect(socket: net.Socket): Promise<void> {
  return new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
}

function inboundLinkPath(cookie: bigint): string {
  return path.join(PIN_ROOT, "links", inboundLinkName(cookie));
}

function pinnedId(kind: "link" | "prog", pinPath: string): { id: number; prog_id?: number } {
  const output = execFileSync("bpftool", ["-j", kind, "show", "pinned", pinPath], { encoding: "utf8" });
  return JSON.parse(output) as { id: number; prog_id?: number };
}

function liveLinkIds(): number[] {
  const output = execFileSync("bpftool", ["-j", "link", "show"], { encoding: "utf8" }).trim();
  if (output === "") return [];
  return (JSON.parse(output) as Array<{ id: number }>).map((link) => link.id);
}

/** Polls until check() is true or WAIT_MS passes; returns its last result. */
async function eventually(check: () => boolean): Promise<boolean> {
  const deadline = Date.now() + WAIT_MS;
  while (Date.now() < deadline) {
    if (check()) return true;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return check();
}

function closeServer(server: net.Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

test.before(async () => {
  assertCaptureHost(BPFFS, CGROUP_ROOT);
  removeStaleCaptureState(PREFIX, PIN_PARENT);
  const pair = createNetnsPair(PREFIX, 150 + (process.pid % 50));
  let capture: Capture | undefined;
  let app6: Ipv6Server | undefined;
  try {
    enableTransparentReplies(pair.b);
    capture = Capture.attach({ pinRoot: PIN_ROOT, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger());
    app6 = await startIpv6Server(pair.b.path, APP6_PORT);
    fixture = await startServers(pair, capture, netnsCookie(pair.b.path), app6);
  } catch (error) {
    app6?.stop();
    capture?.close();
    Capture.remove(PIN_ROOT);
    pair.destroy();
    throw error;
  }
});

/** Removes the namespaces and pins; synchronous, so it also runs from the process "exit" event. */
function removeTestState(): void {
  fixture?.app6.stop();
  fixture?.pair.destroy();
  deleteNetns([GONE_NETNS]);
  Capture.remove(PIN_ROOT);
  removePinParentIfEmpty();
}

// ava skips after.always hooks when a test throws an uncaught exception: clean up on exit too.
process.once("exit", removeTestState);

test.after.always(() => {
  if (fixture) {
    for (const server of [...fixture.servers, fixture.inboundServer]) server.close();
    fixture.capture.close();
  }
  removeTestState();
});

test.serial("outside client lands on 15006", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };

  const socket = appConnect(pair.a.path, pair.b.ip, APP_PORT);
  await waitConnect(socket);
  const clientPort = socket.localPort;
  const reply = await readAll(socket);

  t.is(reply, `inbound ${pair.b.ip}:${APP_PORT}`);
  t.is(inbound.length, before.inbound + 1);
  t.deepEqual(inbound.at(-1), { local: `${pair.b.ip}:${APP_PORT}`, remote: `${pair.a.ip}:${clientPort}` });
  t.is(app.length, before.app);
});

test.serial("socat client lands on 15006", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };
  t.is(await socatIn(pair.a.path, `TCP4:${pair.b.ip}:${APP_PORT}`), `inbound ${pair.b.ip}:${APP_PORT}`);
  t.is(inbound.length, before.inbound + 1);
  t.is(app.length, before.app);
});

test.serial("port without a listener lands on 15006", async (t) => {
  const { pair, inbound } = fx();
  t.is(await readAll(appConnect(pair.a.path, pair.b.ip, CLOSED_PORT)), `inbound ${pair.b.ip}:${CLOSED_PORT}`);
  t.is(inbound.at(-1)?.local, `${pair.b.ip}:${CLOSED_PORT}`);
});

test.serial("HBONE port passes untouched", async (t) => {
  const { pair, inbound } = fx();
  const before = inbound.length;
  t.is(await readAll(appConnect(pair.a.path, pair.b.ip, 15008)), `hbone ${pair.b.ip}:15008`);
  t.is(inbound.length, before);
});

test.serial("outbound port is dropped from outside", async (t) => {
  const { pair, inbound, outbound } = fx();
  const before = { inbound: inbound.length, outbound: outbound.length };
  const outcome = await connectOutcome(appConnect(pair.a.path, pair.b.ip, 15001));
  t.log(`client outcome: ${outcome}`);
  t.not(outcome, "connected");
  t.is(outbound.length, before.outbound);
  t.is(inbound.length, before.inbound);
});

test.serial("second address of the pod is dropped", async (t) => {
  // An address added inside an enrolled pod is not in aa_inbound_pods. The app listens on
  // 0.0.0.0, so without the drop a client would reach it there around the agent.
  const { pair, inbound, app } = fx();
  const second = pair.b.ip.replace(/\.\d+$/, ".77");
  execFileSync("nsenter", [`--net=${pair.b.path}`, "ip", "addr", "add", `${second}/32`, "dev", pair.b.device]);
  try {
    const before = { inbound: inbound.length, app: app.length };
    const outcome = await connectOutcome(appConnect(pair.a.path, second, APP_PORT));
    t.not(outcome, "connected", `a client reached ${second}:${APP_PORT} in the pod`);
    t.is(app.length, before.app);
    t.is(inbound.length, before.inbound);
  } finally {
    execFileSync("nsenter", [`--net=${pair.b.path}`, "ip", "addr", "del", `${second}/32`, "dev", pair.b.device]);
  }
});

test.serial("outbound port is reachable from the pod", async (t) => {
  const { pair, outbound } = fx();
  const before = outbound.length;
  t.is(await readAll(appConnect(pair.b.path, pair.b.ip, 15001)), `outbound ${pair.b.ip}:15001`);
  t.is(outbound.length, before + 1);
});

test.serial("pod's own IP reaches the app", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };
  t.is(await readAll(appConnect(pair.b.path, pair.b.ip, APP_PORT)), `app ${pair.b.ip}:${APP_PORT}`);
  t.is(app.length, before.app + 1);
  t.is(inbound.length, before.inbound);
});

test.serial("loopback reaches the app", async (t) => {
  const { pair, inbound } = fx();
  const before = inbound.length;
  t.is(await readAll(appConnect(pair.b.path, "127.0.0.1", APP_PORT)), `app 127.0.0.1:${APP_PORT}`);
  t.is(inbound.length, before);
});

test.serial("agent socket in the pod reaches the app", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };
  const socket = new NetnsPodNetwork(pair.b.path, pair.b.ip).connect(pair.b.ip, APP_PORT);
  // The socket allows half-open connections: end the sending side so that it closes.
  socket.end();
  t.is(await readAll(socket), `app ${pair.b.ip}:${APP_PORT}`);
  t.is(app.length, before.app + 1);
  t.true(app.at(-1)!.remote.startsWith(`${pair.b.ip}:`));
  t.is(inbound.length, before.inbound);
});

test.serial("transparent agent socket keeps client IP", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };
  // The inbound proxy's connection to the application: source IP of the client in A, made in B.
  const fd = netnsSocket(pair.b.path, { mark: TRANSPARENT_MARK, transparent: true, bindIp: pair.a.ip, port: 0 });
  const socket = new net.Socket({ fd });
  socket.connect(APP_PORT, pair.b.ip);
  await waitConnect(socket);
  const sourcePort = socket.localPort!;
  const key = encodeOwnConnectionKey(pair.a.ip, sourcePort, pair.b.ip, APP_PORT);
  const ownConnections = mapOpen(path.join(PIN_ROOT, "maps", MAP_OWN_CONNECTIONS));
  try {
    const value = Buffer.alloc(8);
    const recorded = mapLookup(ownConnections, key, value);
    const reply = await readAll(socket);
    t.true(recorded, "sockops recorded the connection before it was accepted");
    t.is(reply, `app ${pair.b.ip}:${APP_PORT}`);
    t.is(app.length, before.app + 1);
    t.is(app.at(-1)?.remote, `${pair.a.ip}:${sourcePort}`);
    t.is(inbound.length, before.inbound);
    t.true(await eventually(() => !mapLookup(ownConnections, key, value)), "sockops deleted the entry on close");
  } finally {
    closeFd(ownConnections);
  }
});

test.serial("marked app socket is not exempt", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };
  // A second local address in B: the connection comes neither from the pod IP nor from loopback,
  // like the inbound proxy's transparent connections, and replies to it stay in B.
  const sourceIp = pair.b.ip.replace(/\.2$/, ".3");
  run("ip", ["-n", pair.b.name, "addr", "add", `${sourceIp}/32`, "dev", "lo"]);
  const ownConnections = mapOpen(path.join(PIN_ROOT, "maps", MAP_OWN_CONNECTIONS));
  try {
    // The inbound proxy's mark, set by an application: the socket is not flagged as the agent's.
    const fd = netnsSocket(pair.b.path, { agentSocket: false, mark: TRANSPARENT_MARK, bindIp: sourceIp, port: 0 });
    const socket = new net.Socket({ fd });
    socket.connect(APP_PORT, pair.b.ip);
    await waitConnect(socket);
    const sourcePort = socket.localPort!;
    const key = encodeOwnConnectionKey(sourceIp, sourcePort, pair.b.ip, APP_PORT);
    // Looked up while the connection is open; asserted after reading, so a failure leaves no socket open.
    const recorded = mapLookup(ownConnections, key, Buffer.alloc(8));
    const reply = await readAll(socket);
    t.false(recorded, "sockops did not record the connection");
    t.is(reply, `inbound ${pair.b.ip}:${APP_PORT}`);
    t.is(inbound.length, before.inbound + 1);
    t.is(inbound.at(-1)?.remote, `${sourceIp}:${sourcePort}`);
    t.is(app.length, before.app);
  } finally {
    closeFd(ownConnections);
    run("ip", ["-n", pair.b.name, "addr", "del", `${sourceIp}/32`, "dev", "lo"]);
  }
});

test.serial("agent socket from a second address is exempt", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };
  const sourceIp = pair.b.ip.replace(/\.2$/, ".3");
  run("ip", ["-n", pair.b.name, "addr", "add", `${sourceIp}/32`, "dev", "lo"]);
  try {
    const socket = new net.Socket({ fd: netnsSocket(pair.b.path, { bindIp: sourceIp, port: 0 }) });
    socket.connect(APP_PORT, pair.b.ip);
    t.is(await readAll(socket), `app ${pair.b.ip}:${APP_PORT}`);
    t.is(app.length, before.app + 1);
    t.true(app.at(-1)!.remote.startsWith(`${sourceIp}:`));
    t.is(inbound.length, before.inbound);
  } finally {
    run("ip", ["-n", pair.b.name, "addr", "del", `${sourceIp}/32`, "dev", "lo"]);
  }
});

test.serial("IPv6 to pod without IPv6 capture is dropped", async (t) => {
  const { pair, app6, inbound } = fx();
  const before = { app6: app6.accepted.length, inbound: inbound.length };
  const linkLocal = `${await linkLocalAddress(pair.b)}%${pair.a.device}`;
  await linkLocalAddress(pair.a);
  // sk_lookup drops the SYN, so the kernel replies with a reset.
  t.is(await connectIpv6(pair.a.path, linkLocal, APP6_PORT), "ECONNREFUSED", `connect to ${linkLocal}`);
  t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), "ECONNREFUSED", `connect to ${pair.b.ip6}`);
  t.is(await acceptedAfterSettling(app6), before.app6);
  t.is(inbound.length, before.inbound);
});

test.serial("IPv6 loopback in the pod works", async (t) => {
  const { pair, app6 } = fx();
  const before = app6.accepted.length;
  t.is(await connectIpv6(pair.b.path, "::1", APP6_PORT), "connected app6");
  t.is(app6.accepted.length, before + 1);
  t.true(app6.accepted.at(-1)?.startsWith("::1 "), `peer ${app6.accepted.at(-1)}`);
});

test.serial("agent socket in another pod is captured", async (t) => {
  const { pair, inbound, app } = fx();
  const before = { inbound: inbound.length, app: app.length };
  const socket = new NetnsPodNetwork(pair.a.path, pair.a.ip).connect(pair.b.ip, APP_PORT);
  socket.end();
  t.is(await readAll(socket), `inbound ${pair.b.ip}:${APP_PORT}`);
  t.is(inbound.length, before.inbound + 1);
  t.is(app.length, before.app);
});

test.serial("inbound pod and link are listed", (t) => {
  const { capture, cookieB, pair } = fx();
  t.deepEqual(capture.inboundPods(), [{ podIp: pair.b.ip, cookie: cookieB }]);
  t.deepEqual(capture.inboundLinkCookies(), [cookieB]);
  const link = pinnedId("link", inboundLinkPath(cookieB));
  const program = pinnedId("prog", path.join(PIN_ROOT, "progs", INBOUND_PROGRAM_NAME));
  t.is(link.prog_id, program.id);
});

test.serial("attaching again replaces the listener", async (t) => {
  const state = fx();
  const before = pinnedId("link", inboundLinkPath(state.cookieB)).id;
  const replacementAccepted: Accepted[] = [];
  const replacement = recordingServer("replacement", replacementAccepted);
  // Any listening socket can be inserted; port 15006 is taken by the served listener.
  const fd = netnsSocket(state.pair.b.path, { bindIp: "0.0.0.0", port: 0, backlog: 16 });
  try {
    state.capture.attachInbound(state.pair.b.path, state.cookieB, state.pair.b.ip, fd);
    await listenOn(replacement, fd);
    t.is(pinnedId("link", inboundLinkPath(state.cookieB)).id, before);
    t.is(await readAll(appConnect(state.pair.a.path, state.pair.b.ip, APP_PORT)), `replacement ${state.pair.b.ip}:${APP_PORT}`);
    t.is(replacementAccepted.length, 1);
  } finally {
    // Closing the replacement deletes its sockhash entry, so put the served listener back.
    await closeServer(replacement);
    state.capture.attachInbound(state.pair.b.path, state.cookieB, state.pair.b.ip, state.inboundFd);
  }
  const inboundBefore = state.inbound.length;
  t.is(await readAll(appConnect(state.pair.a.path, state.pair.b.ip, APP_PORT)), `inbound ${state.pair.b.ip}:${APP_PORT}`);
  t.is(state.inbound.length, inboundBefore + 1);
});

test.serial("capture attach moves the link to the new program", async (t) => {
  const state = fx();
  const linkPath = inboundLinkPath(state.cookieB);
  const before = pinnedId("link", linkPath);
  const again = Capture.attach({ pinRoot: PIN_ROOT, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger());
  try {
    const after = pinnedId("link", linkPath);
    t.is(after.id, before.id);
    t.not(after.prog_id, before.prog_id);
    t.is(after.prog_id, pinnedId("prog", path.join(PIN_ROOT, "progs", INBOUND_PROGRAM_NAME)).id);
    t.is(await readAll(appConnect(state.pair.a.path, state.pair.b.ip, APP_PORT)), `inbound ${state.pair.b.ip}:${APP_PORT}`);
  } finally {
    again.close();
  }
});

test.serial("link of a deleted namespace is unpinned", async (t) => {
  const state = fx();
  run("ip", ["netns", "add", GONE_NETNS]);
  const gonePath = `/var/run/netns/${GONE_NETNS}`;
  const goneCookie = netnsCookie(gonePath);
  const goneIp = "192.0.2.3";
  const fd = netnsSocket(gonePath, { bindIp: "0.0.0.0", port: 15006, backlog: 16 });
  try {
    state.capture.attachInbound(gonePath, goneCookie, goneIp, fd);
  } finally {
    closeFd(fd);
  }
  t.true(fs.existsSync(inboundLinkPath(goneCookie)));
  deleteNetns([GONE_NETNS]);

  // The kernel detaches the link once the namespace is dismantled, which happens in the background.
  const unpinned = await eventually(() => {
    Capture.attach({ pinRoot: PIN_ROOT, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger()).close();
    return !fs.existsSync(inboundLinkPath(goneCookie));
  });
  t.true(unpinned, "attach removed the pin of the detached link");
  t.deepEqual(state.capture.inboundLinkCookies(), [state.cookieB]);

  // Its map entries stay until the agent detaches the pod.
  t.true(state.capture.inboundPods().some((pod) => pod.cookie === goneCookie));
  state.capture.detachInbound(goneCookie, goneIp);
  t.deepEqual(state.capture.inboundPods(), [{ podIp: state.pair.b.ip, cookie: state.cookieB }]);
});

test.serial("closed listener drops inbound connections", async (t) => {
  const state = fx();
  const before = { inbound: state.inbound.length, app: state.app.length };
  await closeServer(state.inboundServer);

  const outcome = await connectOutcome(appConnect(state.pair.a.path, state.pair.b.ip, APP_PORT));
  t.log(`client outcome: ${outcome}`);
  t.not(outcome, "connected");
  t.is(state.app.length, before.app);
  t.is(state.inbound.length, before.inbound);
});

test.serial("new listener restores inbound capture", async (t) => {
  const state = fx();
  Object.assign(state, await startInboundListener(state));
  const before = state.app.length;
  t.is(await readAll(appConnect(state.pair.a.path, state.pair.b.ip, APP_PORT)), `inbound ${state.pair.b.ip}:${APP_PORT}`);
  t.is(state.app.length, before);
});

test.serial("detach makes the app reachable directly", async (t) => {
  const { capture, cookieB, pair, inbound, app } = fx();
  const linkId = pinnedId("link", inboundLinkPath(cookieB)).id;
  capture.detachInbound(cookieB, pair.b.ip);

  t.false(fs.existsSync(inboundLinkPath(cookieB)));
  t.deepEqual(capture.inboundPods(), []);
  t.deepEqual(capture.inboundLinkCookies(), []);
  const before = { inbound: inbound.length, app: app.length };
  t.is(await readAll(appConnect(pair.a.path, pair.b.ip, APP_PORT)), `app ${pair.b.ip}:${APP_PORT}`);
  t.is(app.length, before.app + 1);
  t.is(inbound.length, before.inbound);
  t.true(await eventually(() => !liveLinkIds().includes(linkId)), `link ${linkId} detached`);
});

test.serial("detached pod is reachable over IPv6", async (t) => {
  // The control for the IPv6 drop: without the pod's sk_lookup link the same connections succeed.
  const { pair, app6 } = fx();
  const before = app6.accepted.length;
  const linkLocal = `${await linkLocalAddress(pair.b)}%${pair.a.device}`;
  t.is(await connectIpv6(pair.a.path, linkLocal, APP6_PORT), "connected app6");
  t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), "connected app6");
  t.is(app6.accepted.length, before + 2);
});

test.serial("guard drops inbound connections", async (t) => {
  const { capture, cookieB, pair, inbound, app, app6 } = fx();
  capture.guardInbound(pair.b.path, cookieB, pair.b.ip);
  t.true(fs.existsSync(inboundLinkPath(cookieB)));
  t.deepEqual(capture.inboundPods(), [{ podIp: pair.b.ip, cookie: cookieB }]);

  const before = { inbound: inbound.length, app: app.length, app6: app6.accepted.length };
  for (const port of [APP_PORT, CLOSED_PORT]) {
    const outcome = await connectOutcome(appConnect(pair.a.path, pair.b.ip, port));
    t.log(`client outcome on port ${port}: ${outcome}`);
    t.not(outcome, "connected");
  }
  t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), "ECONNREFUSED");
  t.is(app.length, before.app);
  t.is(inbound.length, before.inbound);
  t.is(await acceptedAfterSettling(app6), before.app6);
  // The pod still reaches its own application.
  t.is(await readAll(appConnect(pair.b.path, "127.0.0.1", APP_PORT)), `app 127.0.0.1:${APP_PORT}`);
});

test.serial("attach after guard lands on the listener", async (t) => {
  const { capture, cookieB, pair, inbound, app, inboundFd } = fx();
  const linkId = pinnedId("link", inboundLinkPath(cookieB)).id;
  capture.attachInbound(pair.b.path, cookieB, pair.b.ip, inboundFd);
  t.is(pinnedId("link", inboundLinkPath(cookieB)).id, linkId);

  const before = { inbound: inbound.length, app: app.length };
  t.is(await readAll(appConnect(pair.a.path, pair.b.ip, APP_PORT)), `inbound ${pair.b.ip}:${APP_PORT}`);
  t.is(inbound.length, before.inbound + 1);
  t.is(app.length, before.app);
});

test.serial("guard removes an existing listener", async (t) => {
  const { capture, cookieB, pair, inbound, app, inboundFd } = fx();
  capture.guardInbound(pair.b.path, cookieB, pair.b.ip);
  const before = { inbound: inbound.length, app: app.length };
  try {
    const outcome = await connectOutcome(appConnect(pair.a.path, pair.b.ip, APP_PORT));
    t.log(`client outcome: ${outcome}`);
    t.not(outcome, "connected");
    t.is(inbound.length, before.inbound);
    t.is(app.length, before.app);
  } finally {
    capture.attachInbound(pair.b.path, cookieB, pair.b.ip, inboundFd);
  }
});

test.serial("remove leaves no pins", async (t) => {
  const state = fx();
  // Attach again so that a namespace link is pinned when the pins are removed.
  state.capture.attachInbound(state.pair.b.path, state.cookieB, state.pair.b.ip, state.inboundFd);
  const linkId = pinnedId("link", inboundLinkPath(state.cookieB)).id;
  state.capture.close();
  Capture.remove(PIN_ROOT);

  t.false(fs.existsSync(PIN_ROOT));
  t.true(await eventually(() => !liveLinkIds().includes(linkId)), `link ${linkId} detached`);
  t.is(await readAll(appConnect(state.pair.a.path, state.pair.b.ip, APP_PORT)), `app ${state.pair.b.ip}:${APP_PORT}`);
});
