// End-to-end test of IPv6 capture on the real kernel: two network namespaces on a veth, the
// capture programs attached to the cgroup v2 root. Namespace A is enrolled with its IPv6 address,
// so connect6 steers its native IPv6 connections to a stub proxy on [A]:15001. Namespace B has
// inbound capture on both families, so sk_lookup assigns IPv6 connections to its IPv6 15006
// listener. Needs root, bpffs and cgroup v2, and fails without them.
import test from "ava";
import { execFile } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";

import { Capture } from "../../agent/capture/ebpf/capture";
import { closeFd, netnsCookie, netnsIpv6Addresses, netnsSocket, netnsSocket6 } from "../../agent/capture/native";
import { NetnsPodNetwork } from "../../agent/capture/netns-network";
import { EbpfCaptureBackend } from "../../agent/capture/backend";
import { podIpv6ToCapture } from "../../agent/enroll/dual-stack";
import { silentLogger } from "../../agent/log";
import type { Workload } from "../../agent/state/types";
import { connectIpv6, startIpv6Server, type Ipv6Server } from "../harness/ipv6-probe";
import { createEnrolledPair, createNetnsPair, linkLocalAddress, PIN_PARENT, removePinParentIfEmpty, type NetnsPair } from "../harness/netns-pair";
import { listenOn } from "../harness/netns-sockets";

const execFileAsync = promisify(execFile);
const PREFIX = "aav6";
const SUBNET = 30;
const PIN_ROOT = path.join(PIN_PARENT, `${PREFIX}-${process.pid}`);
const APP_PORT = 8080;
const APP6_PORT = 8086;
const WAIT_MS = 5000;

interface Fixture {
  pair: NetnsPair;
  capture: Capture;
  cookieA: bigint;
  cookieB: bigint;
  /** Peer addresses of the connections A's stub proxy accepted, with the destination it looked up. */
  proxied: Array<{ peer: string; original: { ip: string; port: number } | undefined }>;
  /** Local addresses of the connections B's 15006 listeners accepted. */
  inboundB: string[];
  app6: Ipv6Server;
  servers: net.Server[];
  /** B's IPv6 15006 listener, closed by the last test. */
  inbound6: net.Server;
}

let fixture: Fixture | undefined;

function fx(): Fixture {
  if (!fixture) throw new Error("the test fixture failed to start; see the before hook's error");
  return fixture;
}

function formatPeer(ip: string | undefined, port: number | undefined): string {
  return net.isIPv6(ip ?? "") ? `[${ip}]:${port}` : `${ip}:${port}`;
}

/** Python client: connects from inside the namespace and prints the peer address getpeername() returns and the reply. */
const PEERNAME_SCRIPT = `
import errno, socket, sys
try:
    conn = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    conn.settimeout(3)
    conn.connect((sys.argv[1], int(sys.argv[2])))
    peer = conn.getpeername()
    print(peer[0], peer[1], conn.recv(64).decode())
except OSError as error:
    print(errno.errorcode.get(error.errno, str(error)))
`;

async function peernameIn(netnsPath: string, host: string, port: number): Promise<string> {
  const { stdout } = await execFileAsync("nsenter", [`--net=${netnsPath}`, "python3", "-c", PEERNAME_SCRIPT, host, String(port)], {
    timeout: WAIT_MS,
    encoding: "utf8",
  });
  return stdout.trim();
}

/** Connects an agent socket (flagged, so connect6 lets it through) from inside the namespace and reads the reply. */
function agentConnect6(netnsPath: string, host: string, port: number): Promise<string> {
  return new Promise((resolve) => {
    const socket = new net.Socket({ fd: netnsSocket6(netnsPath, {}) });
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      resolve("timeout");
    }, WAIT_MS);
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve(error.code ?? error.message);
    });
    socket.on("close", (hadError) => {
      clearTimeout(timer);
      if (!hadError) resolve(Buffer.concat(chunks).toString());
    });
    socket.connect(port, host);
  });
}

async function startServers(pair: NetnsPair, capture: Capture, cookieA: bigint): Promise<Fixture> {
  const app6 = await startIpv6Server(pair.b.path, APP6_PORT);
  const cookieB = netnsCookie(pair.b.path);
  const partial: Partial<Fixture> & Pick<Fixture, "servers" | "proxied" | "inboundB"> = {
    pair,
    capture,
    cookieA,
    cookieB,
    app6,
    servers: [],
    proxied: [],
    inboundB: [],
  };
  try {
    capture.enrollIpv6(cookieA, pair.a.ip6);
    const proxy = net.createServer((socket) => {
      socket.on("error", () => undefined);
      const original = capture.takeOriginalDestination(cookieA, socket.remoteAddress ?? "", socket.remotePort ?? 0);
      partial.proxied.push({ peer: formatPeer(socket.remoteAddress, socket.remotePort), original });
      socket.end(original ? `proxy ${formatPeer(original.ip, original.port)}` : "proxy none");
    });
    partial.servers.push(proxy);
    await new NetnsPodNetwork(pair.a.path, pair.a.ip, pair.a.ip6).listen(proxy, 15001);

    const inbound = (socket: net.Socket): void => {
      socket.on("error", () => undefined);
      const local = formatPeer(socket.localAddress, socket.localPort);
      partial.inboundB.push(local);
      socket.end(`inbound ${local}`);
    };
    const inbound4 = net.createServer(inbound);
    const inbound6 = net.createServer(inbound);
    partial.servers.push(inbound4, inbound6);
    partial.inbound6 = inbound6;
    const fd4 = netnsSocket(pair.b.path, { port: 15006, backlog: 64 });
    capture.attachInbound(pair.b.path, cookieB, pair.b.ip, fd4);
    await listenOn(inbound4, fd4);
    const fd6 = netnsSocket6(pair.b.path, { port: 15006, backlog: 64 });
    capture.attachInbound6(cookieB, pair.b.ip6, pair.b.ip, fd6);
    await listenOn(inbound6, fd6);
    return partial as Fixture;
  } catch (error) {
    for (const server of partial.servers) server.close();
    app6.stop();
    throw error;
  }
}

test.before(async () => {
  const enrolled = await createEnrolledPair(PREFIX, SUBNET, PIN_ROOT, startServers);
  fixture = enrolled.extra;
});

function removeTestState(): void {
  fixture?.app6.stop();
  fixture?.pair.destroy();
  Capture.remove(PIN_ROOT);
  removePinParentIfEmpty();
}

test.after.always(() => {
  for (const server of fixture?.servers ?? []) server.close();
  fixture?.capture.close();
  removeTestState();
});
process.once("exit", removeTestState);

test.serial("connect6 steers native IPv6 to the pod's proxy", async (t) => {
  const { pair, proxied } = fx();
  const before = proxied.length;
  t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), `connected proxy [${pair.b.ip6}]:${APP6_PORT}`);
  t.is(proxied.length, before + 1);
  t.true(proxied.at(-1)!.peer.startsWith(`[${pair.a.ip6}]:`), proxied.at(-1)!.peer);
  t.is(fx().app6.accepted.length, 0);
});

test.serial("getpeername6 returns the dialled IPv6 address", async (t) => {
  const { pair } = fx();
  t.is(await peernameIn(pair.a.path, pair.b.ip6, APP6_PORT), `${pair.b.ip6} ${APP6_PORT} proxy [${pair.b.ip6}]:${APP6_PORT}`);
});

test.serial("IPv4-mapped address goes to the IPv4 proxy", async (t) => {
  const { pair } = fx();
  const mapped = `::ffff:${pair.b.ip}`;
  t.is(await peernameIn(pair.a.path, mapped, APP_PORT), `${mapped} ${APP_PORT} proxy ${pair.b.ip}:${APP_PORT}`);
});

test.serial("IPv6 loopback in the pod is not captured", async (t) => {
  const { pair } = fx();
  const local = await startIpv6Server(pair.a.path, APP6_PORT);
  try {
    t.is(await connectIpv6(pair.a.path, "::1", APP6_PORT), "connected app6");
  } finally {
    local.stop();
  }
});

test.serial("link-local destination is rejected", async (t) => {
  const { pair } = fx();
  const linkLocal = await linkLocalAddress(pair.b);
  t.is(await connectIpv6(pair.a.path, `${linkLocal}%${pair.a.device}`, APP6_PORT), "EPERM");
});

test.serial("pod without IPv6 enrollment is rejected", async (t) => {
  const { pair, capture, cookieA } = fx();
  capture.enrollIpv6(cookieA, undefined);
  try {
    t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), "EPERM");
  } finally {
    capture.enrollIpv6(cookieA, pair.a.ip6);
  }
  t.is(fx().app6.accepted.length, 0);
});

test.serial("sk_lookup assigns IPv6 to the 15006 listener", async (t) => {
  const { pair, inboundB, app6 } = fx();
  const before = inboundB.length;
  t.is(await agentConnect6(pair.a.path, pair.b.ip6, APP6_PORT), `inbound [${pair.b.ip6}]:${APP6_PORT}`);
  t.is(inboundB.length, before + 1);
  t.is(app6.accepted.length, 0);
});

test.serial("IPv6 from the pod's own address passes", async (t) => {
  const { pair, app6 } = fx();
  const before = app6.accepted.length;
  t.is(await agentConnect6(pair.b.path, pair.b.ip6, APP6_PORT), "app6");
  t.is(app6.accepted.length, before + 1);
});

test.serial("link-local to the guarded pod is dropped", async (t) => {
  const { pair, app6, capture, cookieA } = fx();
  const linkLocal = await linkLocalAddress(pair.b);
  const before = app6.accepted.length;
  // A's own capture rejects link-local destinations, so A dials unenrolled here.
  capture.unenroll(cookieA);
  try {
    t.is(await connectIpv6(pair.a.path, `${linkLocal}%${pair.a.device}`, APP6_PORT), "ECONNREFUSED");
  } finally {
    capture.enroll(cookieA, pair.a.ip);
    capture.enrollIpv6(cookieA, pair.a.ip6);
  }
  t.is(app6.accepted.length, before);
});

test.serial("IPv6-disabled namespace stays closed", async (t) => {
  const { capture } = fx();
  const pair = createNetnsPair(`${PREFIX}d`, SUBNET + 1);
  try {
    await execFileAsync("nsenter", [`--net=${pair.a.path}`, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    t.false(netnsIpv6Addresses(pair.a.path).includes(pair.a.ip6));
    const workload = { uid: "demo/v6off", ip: pair.a.ip, ips: [pair.a.ip, pair.a.ip6] } as unknown as Workload;
    const backend = new EbpfCaptureBackend(capture);
    t.is(podIpv6ToCapture(backend, pair.a.path, workload, silentLogger()), undefined);
    t.is(podIpv6ToCapture(backend, pair.b.path, { ...workload, ip: pair.b.ip, ips: [pair.b.ip, pair.b.ip6] }, silentLogger()), pair.b.ip6);

    const cookie = netnsCookie(pair.a.path);
    capture.enroll(cookie, pair.a.ip);
    try {
      t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), "EPERM");
    } finally {
      capture.unenroll(cookie);
    }
  } finally {
    pair.destroy();
  }
});

test.serial("IPv6 without the 15006 listener is dropped", async (t) => {
  const { pair, inbound6, inboundB, app6 } = fx();
  await new Promise<void>((resolve) => inbound6.close(() => resolve()));
  const before = { inbound: inboundB.length, app: app6.accepted.length };
  t.is(await agentConnect6(pair.a.path, pair.b.ip6, APP6_PORT), "ECONNREFUSED");
  t.is(inboundB.length, before.inbound);
  t.is(app6.accepted.length, before.app);
});

test.serial("unenroll removes the IPv6 entries", (t) => {
  const { capture, cookieA, cookieB, pair } = fx();
  capture.unenroll(cookieA);
  capture.detachInbound(cookieB, pair.b.ip);
  t.false(capture.inboundPods().some((pod) => pod.cookie === cookieB));
  t.notThrows(() => closeFd(netnsSocket6(pair.a.path, {})));
});
