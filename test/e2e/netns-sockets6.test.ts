// End-to-end test of the IPv6 spare-socket reserve on the real kernel. Two network namespaces are
// joined by a veth, and capture is attached to the cgroup v2 root with namespace A enrolled for
// IPv4 and IPv6, so that A's native IPv6 connections are steered to a stub proxy on [::]:15001.
// Needs root, bpffs and cgroup v2.
import test from "ava";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";

import { Capture } from "../../agent/capture/ebpf/capture";
import { AGENT_MARK } from "../../agent/capture/layout";
import { netnsSocket6, netnsSockets6 } from "../../agent/capture/native";
import { NetnsPodNetwork, SPARE_SOCKET_BATCH } from "../../agent/capture/netns-network";
import { createEnrolledPair, PIN_PARENT, removePinParentIfEmpty, type NetnsPair } from "../harness/netns-pair";
import {
  getsockopt,
  listenOn,
  readAll,
  settledSocketsInNetns,
  SO_DOMAIN,
  SO_MARK,
  SO_NETNS_COOKIE,
} from "../harness/netns-sockets";

const PREFIX = "aatpxs";
const SUBNET = 235;
const PIN_ROOT = path.join(PIN_PARENT, `${PREFIX}-${process.pid}`);
const APP_PORT = 8080;
const AF_INET6 = 10;

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

async function startServers(pair: NetnsPair, capture: Capture, cookieA: bigint): Promise<Fixture> {
  const partial: Fixture = { pair, capture, cookieA, proxied: 0, reachedB: [], servers: [] };
  capture.enrollIpv6(cookieA, pair.a.ip6);

  const proxy = net.createServer((socket) => {
    socket.on("error", () => undefined);
    partial.proxied++;
    socket.end("proxy");
  });
  partial.servers.push(proxy);
  await listenOn(proxy, netnsSocket6(pair.a.path, { port: 15001, backlog: 64 }));

  const appB = net.createServer((socket) => {
    socket.on("error", () => undefined);
    partial.reachedB.push(`[${socket.remoteAddress}]:${socket.remotePort}`);
    socket.end("app-b");
  });
  partial.servers.push(appB);
  await listenOn(appB, netnsSocket6(pair.b.path, { bindIp: pair.b.ip6, port: APP_PORT, backlog: 64, agentSocket: false }));
  return partial;
}

test.before(async () => {
  const enrolled = await createEnrolledPair(PREFIX, SUBNET, PIN_ROOT, startServers);
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

test.serial("IPv6 batch sockets are in the pod", (t) => {
  const { pair, cookieA } = fx();
  const fds = netnsSockets6(pair.a.path, 4);
  try {
    t.is(fds.length, 4);
    t.is(new Set(fds).size, 4);
    for (const fd of fds) {
      t.is(getsockopt(fd, SO_NETNS_COOKIE, 8), cookieA);
      t.is(getsockopt(fd, SO_MARK, 4), BigInt(AGENT_MARK));
      t.is(getsockopt(fd, SO_DOMAIN, 4), BigInt(AF_INET6));
    }
  } finally {
    for (const fd of fds) fs.closeSync(fd);
  }
});

test.serial("unflagged IPv6 socket is captured", async (t) => {
  // The pool checks below mean something only if capture steers A's other IPv6 sockets.
  const { pair } = fx();
  const before = fx().proxied;
  const socket = new net.Socket({ fd: netnsSocket6(pair.a.path, { agentSocket: false }), allowHalfOpen: true });
  t.is(await readAll(socket.connect(APP_PORT, pair.b.ip6)), "proxy");
  t.is(fx().proxied, before + 1);
});

test.serial("pod network connects over IPv6 past one batch", async (t) => {
  const { pair, cookieA } = fx();
  const network = new NetnsPodNetwork(pair.a.path, pair.a.ip, pair.a.ip6);
  // The proxy's listener on 15001 is the one socket of this process left in A once earlier
  // connections have closed.
  const socketsBefore = await settledSocketsInNetns(cookieA, 1);
  const count = SPARE_SOCKET_BATCH + 2;
  const before = { proxied: fx().proxied, reachedB: fx().reachedB.length };
  try {
    const replies: string[] = [];
    for (let index = 0; index < count; index++) replies.push(await readAll(network.connect(pair.b.ip6, APP_PORT)));
    t.deepEqual(replies, Array<string>(count).fill("app-b"));
    t.is(fx().proxied, before.proxied, "a pooled IPv6 socket was steered to the proxy");
    t.is(fx().reachedB.length, before.reachedB + count);
    for (const peer of fx().reachedB.slice(-count)) t.true(peer.startsWith(`[${pair.a.ip6}]:`), peer);
    t.is(network.spareCount6, 2 * SPARE_SOCKET_BATCH - count);
    t.is(network.spareCount, 0, "an IPv6 connect took from the IPv4 reserve");
  } finally {
    network.close();
  }
  t.is(network.spareCount6, 0);
  t.is(socketsBefore, 1);
  t.is(await settledSocketsInNetns(cookieA, socketsBefore), socketsBefore);
});
