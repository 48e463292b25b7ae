// End-to-end test of the batched agent sockets on the real kernel: two network namespaces
// joined by a veth, capture attached to the cgroup v2 root with namespace A enrolled and its
// connections steered to a stub proxy on 15001. Needs root, bpffs and cgroup v2.
import test from "ava";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { DataType, load, open } from "ffi-rs";

import { EbpfCaptureBackend } from "../../agent/capture/backend";
import { Capture } from "../../agent/capture/ebpf/capture";
import { AGENT_MARK } from "../../agent/capture/layout";
import { MAX_SOCKET_BATCH, NativeError, netnsSocket, netnsSockets } from "../../agent/capture/native";
import { NetnsPodNetwork, SPARE_SOCKET_BATCH } from "../../agent/capture/netns-network";
import { EnrollmentReconciler } from "../../agent/enroll/reconciler";
import { silentLogger } from "../../agent/log";
import { EMPTY_DRAIN } from "../../agent/proxy/drain";
import type { Workload } from "../../agent/state/types";
import { CGROUP_ROOT, createEnrolledPair, OBJECT_PATH, PIN_PARENT, removePinParentIfEmpty, type NetnsPair } from "../harness/netns-pair";
import { getsockopt, listenOn, readAll, settledSocketsInNetns, SO_MARK, SO_NETNS_COOKIE, socketsInNetns } from "../harness/netns-sockets";

const PREFIX = "aasock";
const PIN_ROOT = path.join(PIN_PARENT, `${PREFIX}-${process.pid}`);
const APP_PORT = 8080;

const LIBC = "aasock-libc";
const F_GETFD = 1;
const FD_CLOEXEC = 1;

interface Fixture {
  pair: NetnsPair;
  capture: Capture;
  cookieA: bigint;
  /** Connections that capture steered to the stub proxy in A. */
  proxied: number;
  /** Peers of the connections that reached the application server in B. */
  reachedB: string[];
  servers: net.Server[];
}

let fixture: Fixture | undefined;

function fx(): Fixture {
  if (!fixture) throw new Error("the test fixture failed to start; see the before hook's error");
  return fixture;
}

function fdFlags(fd: number): number {
  return load({
    library: LIBC,
    funcName: "fcntl",
    retType: DataType.I32,
    paramsType: [DataType.I32, DataType.I32],
    paramsValue: [fd, F_GETFD],
  }) as number;
}

/** Returns a file limit that leaves exactly `free` descriptor numbers unused below it. */
function limitLeavingFree(free: number): number {
  const used = new Set(fs.readdirSync("/proc/self/fd").map(Number));
  let left = free;
  let limit = 0;
  for (; left > 0 || used.has(limit); limit++) {
    if (!used.has(limit)) left--;
  }
  return limit;
}

/** Connects an fd made by netnsSockets to host:port and reads the reply until the peer closes. */
function connectFd(fd: number, host: string, port: number): Promise<string> {
  return readAll(new net.Socket({ fd, allowHalfOpen: true }).connect(port, host));
}

/** Sets this process's soft limit of open files with setrlimit(2); returns the previous one. */
function setOpenFileLimit(soft: number): number {
  const RLIMIT_NOFILE = 7;
  const limit = Buffer.alloc(16);
  const call = (funcName: string) =>
    load({
      library: LIBC,
      funcName,
      retType: DataType.I32,
      paramsType: [DataType.I32, DataType.U8Array],
      paramsValue: [RLIMIT_NOFILE, limit],
    }) as number;
  if (call("getrlimit") !== 0) throw new Error("getrlimit(RLIMIT_NOFILE) failed");
  const previous = Number(limit.readBigUInt64LE(0));
  limit.writeBigUInt64LE(BigInt(soft), 0);
  if (call("setrlimit") !== 0) throw new Error(`setrlimit(RLIMIT_NOFILE) to ${soft} failed`);
  return previous;
}

async function startServers(pair: NetnsPair, capture: Capture, cookieA: bigint): Promise<Fixture> {
  const partial: Fixture = { pair, capture, cookieA, proxied: 0, reachedB: [], servers: [] };

  const proxy = net.createServer((socket) => {
    socket.on("error", () => undefined);
    partial.proxied++;
    socket.end("proxy");
  });
  partial.servers.push(proxy);
  await listenOn(proxy, netnsSocket(pair.a.path, { bindIp: "0.0.0.0", port: 15001, backlog: 64 }));

  const appB = net.createServer((socket) => {
    socket.on("error", () => undefined);
    partial.reachedB.push(`${socket.remoteAddress}:${socket.remotePort}`);
    socket.end("app-b");
  });
  partial.servers.push(appB);
  await listenOn(appB, netnsSocket(pair.b.path, { bindIp: pair.b.ip, port: APP_PORT, backlog: 64 }));
  return partial;
}

test.before(async () => {
  open({ library: LIBC, path: "" });
  const enrolled = await createEnrolledPair(PREFIX, 100 + (process.pid % 50), PIN_ROOT, startServers);
  fixture = enrolled.extra;
});

/** Removes the namespaces and pins; synchronous, so it also runs from the process "exit" event. */
function removeTestState(): void {
  fixture?.pair.destroy();
  Capture.remove(PIN_ROOT);
  removePinParentIfEmpty();
}

process.once("exit", removeTestState);

test.after.always(() => {
  if (fixture) {
    for (const server of fixture.servers) server.close();
    fixture.capture.close();
  }
  removeTestState();
});

test.serial("batch sockets are in the pod netns", (t) => {
  const { pair, cookieA } = fx();
  const fds = netnsSockets(pair.a.path, 8);
  try {
    t.is(fds.length, 8);
    t.is(new Set(fds).size, 8);
    for (const fd of fds) {
      t.is(getsockopt(fd, SO_NETNS_COOKIE, 8), cookieA);
      t.is(getsockopt(fd, SO_MARK, 4), BigInt(AGENT_MARK));
      t.is(fdFlags(fd) & FD_CLOEXEC, FD_CLOEXEC);
    }
  } finally {
    for (const fd of fds) fs.closeSync(fd);
  }
});

test.serial("batch sockets are not captured", async (t) => {
  const { pair } = fx();
  const before = { proxied: fx().proxied, reachedB: fx().reachedB.length };
  const fds = netnsSockets(pair.a.path, 4);
  const replies = await Promise.all(fds.map((fd) => connectFd(fd, pair.b.ip, APP_PORT)));
  t.deepEqual(replies, ["app-b", "app-b", "app-b", "app-b"]);
  t.is(fx().proxied, before.proxied);
  t.is(fx().reachedB.length, before.reachedB + 4);
  for (const peer of fx().reachedB.slice(-4)) t.true(peer.startsWith(`${pair.a.ip}:`), peer);
});

test.serial("app socket in enrolled netns is captured", async (t) => {
  // The check above means something only if capture steers this namespace's other sockets.
  const { pair } = fx();
  const before = fx().proxied;
  const socket = new net.Socket({ fd: netnsSocket(pair.a.path, { agentSocket: false }) });
  t.is(await readAll(socket.connect(APP_PORT, pair.b.ip)), "proxy");
  t.is(fx().proxied, before + 1);
});

test.serial("pod network connects past one batch", async (t) => {
  const { pair } = fx();
  const network = new NetnsPodNetwork(pair.a.path, pair.a.ip);
  const count = SPARE_SOCKET_BATCH + 8;
  const before = { proxied: fx().proxied, reachedB: fx().reachedB.length };
  try {
    const replies: string[] = [];
    for (let index = 0; index < count; index++) replies.push(await readAll(network.connect(pair.b.ip, APP_PORT)));
    t.deepEqual(replies, Array<string>(count).fill("app-b"));
    t.is(fx().proxied, before.proxied);
    t.is(fx().reachedB.length, before.reachedB + count);
    t.is(network.spareCount, 2 * SPARE_SOCKET_BATCH - count);
  } finally {
    network.close();
  }
});

test.serial("close releases the spares", async (t) => {
  const { pair, cookieA } = fx();
  const before = socketsInNetns(cookieA);
  const network = new NetnsPodNetwork(pair.a.path, pair.a.ip);
  t.is(await readAll(network.connect(pair.b.ip, APP_PORT)), "app-b");
  t.is(network.spareCount, SPARE_SOCKET_BATCH - 1);
  t.is(socketsInNetns(cookieA), before + SPARE_SOCKET_BATCH - 1);

  network.close();
  t.is(network.spareCount, 0);
  t.is(socketsInNetns(cookieA), before);

  // A draining proxy may still connect after close: one socket per call, no reserve.
  t.is(await readAll(network.connect(pair.b.ip, APP_PORT)), "app-b");
  t.is(network.spareCount, 0);
  t.is(socketsInNetns(cookieA), before);
  t.notThrows(() => network.close());
});

test.serial("failed batch leaves no socket open", async (t) => {
  const { pair, cookieA } = fx();
  const network = new NetnsPodNetwork(pair.a.path, pair.a.ip);
  const before = socketsInNetns(cookieA);
  // Room for a few sockets but not a whole batch, so the batch fails part way with EMFILE.
  const previous = setOpenFileLimit(limitLeavingFree(4));
  let batchError: unknown;
  let socket: net.Socket | undefined;
  try {
    try {
      netnsSockets(pair.a.path, SPARE_SOCKET_BATCH);
    } catch (error) {
      batchError = error;
    }
    t.is(socketsInNetns(cookieA), before);
    // The pod network falls back to a single socket when the batch fails.
    socket = network.connect(pair.b.ip, APP_PORT);
    t.is(network.spareCount, 0);
  } finally {
    setOpenFileLimit(previous);
  }
  t.true(batchError instanceof NativeError, String(batchError));
  t.is((batchError as NativeError).errno, os.constants.errno.EMFILE);
  t.is(await readAll(socket!), "app-b");
  network.close();
  t.is(socketsInNetns(cookieA), before);
});

test.serial("missing netns batch error", (t) => {
  const missing = `/var/run/netns/${PREFIX}-missing`;
  const error = t.throws(() => netnsSockets(missing, 4), { instanceOf: NativeError });
  t.is((error as NativeError).errno, os.constants.errno.ENOENT);
  t.regex(error?.message ?? "", new RegExp(`creating 4 TCP sockets in network namespace ${missing} failed`));
});

test.serial("batch size is checked", (t) => {
  const { pair } = fx();
  for (const count of [0, -1, 1.5, MAX_SOCKET_BATCH + 1]) {
    const error = t.throws(() => netnsSockets(pair.a.path, count));
    t.regex(error?.message ?? "", /socket batch size .* is invalid/);
  }
  const fds = netnsSockets(pair.a.path, 1);
  t.is(fds.length, 1);
  fs.closeSync(fds[0]);
});

test.serial("new capture maps drop old spares", async (t) => {
  const { pair, cookieA } = fx();
  const network = new NetnsPodNetwork(pair.a.path, pair.a.ip);
  t.is(await readAll(network.connect(pair.b.ip, APP_PORT)), "app-b");
  t.is(network.spareCount, SPARE_SOCKET_BATCH - 1);
  const [stale] = netnsSockets(pair.a.path, 1);
  const socketsBefore = socketsInNetns(cookieA);

  // Removing the pins and attaching again makes a new, empty aa_agent_socks map.
  fx().capture.close();
  Capture.remove(PIN_ROOT);
  fx().capture = Capture.attach({ pinRoot: PIN_ROOT, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger());
  fx().capture.enroll(cookieA, pair.a.ip);

  const before = { proxied: fx().proxied, reachedB: fx().reachedB.length };
  // A socket flagged only in the old map is steered like an application's.
  t.is(await connectFd(stale, pair.b.ip, APP_PORT), "proxy");
  t.is(fx().proxied, before.proxied + 1);

  // The pod network notices the new map, drops its spares and makes new ones.
  t.is(await readAll(network.connect(pair.b.ip, APP_PORT)), "app-b");
  t.is(fx().proxied, before.proxied + 1);
  t.is(fx().reachedB.length, before.reachedB + 1);
  t.is(network.spareCount, SPARE_SOCKET_BATCH - 1);
  t.is(await settledSocketsInNetns(cookieA, socketsBefore - 1), socketsBefore - 1);
  network.close();
});

test.serial("unenroll closes the pod's spares", async (t) => {
  const { pair, cookieA } = fx();
  const before = socketsInNetns(cookieA);
  const replies: string[] = [];
  const reconciler = new EnrollmentReconciler({
    trustDomain: "cluster.local",
    capture: new EbpfCaptureBackend(fx().capture),
    logger: silentLogger(),
    createProxies: (_workload, _identity, network) => ({
      // One connection fills the pod network's reserve, as a proxy's first connection does.
      start: async () => void replies.push(await readAll(network.connect(pair.b.ip, APP_PORT))),
      stop: async () => EMPTY_DRAIN,
      openConnections: () => 0,
      recheck: () => 0,
    }),
  });
  const workload: Workload = {
    uid: "default/aasock-a",
    name: "aasock-a",
    namespace: "default",
    serviceAccount: "default",
    nodeName: "aasock-node",
    ip: pair.a.ip,
    labels: {},
    namedPorts: {},
    hostNetwork: false,
    ready: true,
    source: { file: "netns-sockets.test", document: 0 },
  };
  try {
    await reconciler.update([workload]);
    t.deepEqual(reconciler.list().map((entry) => entry.netnsPath), [pair.a.path]);
    t.deepEqual(replies, ["app-b"]);
    t.is(socketsInNetns(cookieA), before + SPARE_SOCKET_BATCH - 1);

    await reconciler.update([]);
    t.deepEqual(reconciler.list(), []);
    t.is(socketsInNetns(cookieA), before);
  } finally {
    await reconciler.stop();
    // Unenrolling removed the namespace's capture entry; later tests expect it.
    fx().capture.enroll(cookieA, pair.a.ip);
  }
});

test.serial("batch needs an attached capture", (t) => {
  const { pair } = fx();
  fx().capture.close();
  const error = t.throws(() => netnsSockets(pair.a.path, 4));
  t.regex(error?.message ?? "", /no capture is attached in this process/);
  const network = new NetnsPodNetwork(pair.a.path, pair.a.ip);
  t.throws(() => network.connect(pair.b.ip, APP_PORT), { message: /no capture is attached in this process/ });
  t.is(network.spareCount, 0);
});
