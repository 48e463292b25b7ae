// End-to-end test of capture on the real kernel: two network namespaces joined by a veth,
// the capture programs attached to the cgroup v2 root, the enrolled namespace's connections
// steered to a stub proxy on 15001. Needs root, bpffs and cgroup v2, and fails without them.
import test from "ava";
import { execFile, execFileSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

import { Capture } from "../../agent/capture/ebpf/capture";
import { AGENT_MARK, PROGRAM_NAMES } from "../../agent/capture/layout";
import { NativeError, closeFd, netnsIpv4Addresses, netnsSocket } from "../../agent/capture/native";
import { NetnsPodNetwork } from "../../agent/capture/netns-network";
import { checkHost } from "../../agent/capture/preflight";
import { findNetnsByIp } from "../../agent/enroll/netns";
import { silentLogger } from "../../agent/log";
import { acceptedAfterSettling, connectIpv6, startIpv6Server, type Ipv6Server } from "../harness/ipv6-probe";
import { CGROUP_ROOT, createEnrolledPair, linkLocalAddress, OBJECT_PATH, PIN_PARENT, removePinParentIfEmpty, type NetnsPair } from "../harness/netns-pair";
import { appConnect, listenOn, readAll, socatIn } from "../harness/netns-sockets";

const execFileAsync = promisify(execFile);
const PREFIX = "aacap";
const PIN_ROOT = path.join(PIN_PARENT, `${PREFIX}-${process.pid}`);
const APP_PORT = 8080;
/** Port of the IPv6-only servers in A and B. */
const APP6_PORT = 8086;
/** Mark of the inbound proxy's transparent sockets. */
const TRANSPARENT_MARK = 0x1539;
const WAIT_MS = 5000;

interface Fixture {
  pair: NetnsPair;
  capture: Capture;
  cookieA: bigint;
  /** Connections the stub proxy in A accepted, with the original destination it looked up. */
  proxied: Array<{ peer: string; original: { ip: string; port: number } | undefined }>;
  /** Peers of the connections that reached the application server in B. */
  reachedB: string[];
  servers: net.Server[];
  /** IPv6-only servers in A and B. */
  ipv6: { a: Ipv6Server; b: Ipv6Server };
}

let fixture: Fixture | undefined;

function fx(): Fixture {
  if (!fixture) throw new Error("the test fixture failed to start; see the before hook's error");
  return fixture;
}

function linkedProgramIds(): number[] {
  return PROGRAM_NAMES.map((name) => {
    const output = execFileSync("bpftool", ["-j", "link", "show", "pinned", path.join(PIN_ROOT, "links", name)], {
      encoding: "utf8",
    });
    return (JSON.parse(output) as { prog_id: number }).prog_id;
  });
}

function cgroupRootProgramIds(): number[] {
  const output = execFileSync("bpftool", ["-j", "cgroup", "show", CGROUP_ROOT], { encoding: "utf8" }).trim();
  if (output === "") return [];
  return (JSON.parse(output) as Array<{ id: number }>).map((entry) => entry.id);
}

async function startServers(pair: NetnsPair, capture: Capture, cookieA: bigint): Promise<Fixture> {
  const ipv6a = await startIpv6Server(pair.a.path, APP6_PORT);
  let ipv6b: Ipv6Server;
  try {
    ipv6b = await startIpv6Server(pair.b.path, APP6_PORT);
  } catch (error) {
    ipv6a.stop();
    throw error;
  }
  const partial: Fixture = { pair, capture, cookieA, proxied: [], reachedB: [], servers: [], ipv6: { a: ipv6a, b: ipv6b } };

  const proxy = net.createServer((socket) => {
    // Clients may close before reading the reply; a reset must not fail the test run.
    socket.on("error", () => undefined);
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    // partial.capture, not capture: a test replaces it with a newly attached instance.
    const original = partial.capture.takeOriginalDestination(cookieA, socket.remoteAddress ?? "", socket.remotePort ?? 0);
    partial.proxied.push({ peer, original });
    socket.end(original ? `proxy ${original.ip}:${original.port}` : "proxy none");
  });
  partial.servers.push(proxy);
  await new NetnsPodNetwork(pair.a.path, pair.a.ip).listen(proxy, 15001);

  const appB = net.createServer((socket) => {
    socket.on("error", () => undefined);
    partial.reachedB.push(`${socket.remoteAddress}:${socket.remotePort}`);
    socket.end("app-b");
  });
  partial.servers.push(appB);
  await listenOn(appB, netnsSocket(pair.b.path, { bindIp: pair.b.ip, port: APP_PORT, backlog: 64 }));

  const appA = net.createServer((socket) => {
    socket.on("error", () => undefined);
    socket.end("app-a");
  });
  partial.servers.push(appA);
  await listenOn(appA, netnsSocket(pair.a.path, { bindIp: "0.0.0.0", port: APP_PORT, backlog: 64 }));
  return partial;
}

test.before(async () => {
  const enrolled = await createEnrolledPair(PREFIX, 200 + (process.pid % 50), PIN_ROOT, startServers);
  fixture = enrolled.extra;
});

/** Removes the namespaces and pins; synchronous, so it also runs from the process "exit" event. */
function removeTestState(): void {
  fixture?.ipv6.a.stop();
  fixture?.ipv6.b.stop();
  fixture?.pair.destroy();
  Capture.remove(PIN_ROOT);
  removePinParentIfEmpty();
}

// ava skips after.always hooks when a test throws an uncaught exception: clean up on exit too.
process.once("exit", removeTestState);

test.after.always(() => {
  if (fixture) {
    for (const server of fixture.servers) server.close();
    fixture.capture.close();
  }
  removeTestState();
});

test.serial("enrolled netns cookie is listed", (t) => {
  const { capture, cookieA } = fx();
  t.true(cookieA > 0n);
  t.deepEqual(capture.enrolledCookies(), [cookieA]);
});

test.serial("netns helpers read addresses and find the pod", (t) => {
  const { pair } = fx();
  t.true(netnsIpv4Addresses(pair.a.path).includes(pair.a.ip));
  const found = findNetnsByIp(pair.b.ip, silentLogger());
  t.is(found?.inode, fs.statSync(pair.b.path).ino);
});

test.serial("preflight passes on this host", (t) => {
  t.deepEqual(checkHost({ pinRoot: PIN_ROOT, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }), []);
});

test.serial("preflight reports a bad cgroup and object", (t) => {
  const problems = checkHost({ pinRoot: PIN_ROOT, cgroupPath: "/tmp", objectPath: "/nonexistent/capture.bpf.o" });
  t.is(problems.length, 2);
  t.regex(problems[0]?.what ?? "", /\/tmp is not a cgroup v2 directory/);
  t.regex(problems[1]?.what ?? "", /\/nonexistent\/capture\.bpf\.o not found/);
});

test.serial("missing netns gives a clear error", (t) => {
  const error = t.throws(() => netnsSocket("/var/run/netns/aacap-missing", {}), { instanceOf: NativeError });
  t.is(error?.errno, os.constants.errno.ENOENT);
  t.regex(error?.message ?? "", /network namespace \/var\/run\/netns\/aacap-missing/);
  t.regex(error?.message ?? "", /ENOENT/);
});

test.serial("enrolled app connection reaches the proxy", async (t) => {
  const { pair, proxied, reachedB } = fx();
  const before = { proxied: proxied.length, reachedB: reachedB.length };

  const socket = appConnect(pair.a.path, pair.b.ip, APP_PORT);
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  // getpeername4 returns the address the application dialled, not podIP:15001.
  t.is(socket.remoteAddress, pair.b.ip);
  t.is(socket.remotePort, APP_PORT);
  const localPort = socket.localPort;
  const reply = await readAll(socket);

  t.is(reply, `proxy ${pair.b.ip}:${APP_PORT}`);
  t.is(proxied.length, before.proxied + 1);
  t.is(proxied.at(-1)?.peer, `${pair.a.ip}:${localPort}`);
  t.deepEqual(proxied.at(-1)?.original, { ip: pair.b.ip, port: APP_PORT });
  t.is(reachedB.length, before.reachedB);
});

test.serial("original destination is taken once", (t) => {
  const { capture, cookieA, pair } = fx();
  const last = fx().proxied.at(-1);
  t.truthy(last);
  const port = Number(last!.peer.split(":")[1]);
  t.is(capture.takeOriginalDestination(cookieA, pair.a.ip, port), undefined);
});

test.serial("socat in enrolled netns is captured", async (t) => {
  const { pair, proxied } = fx();
  const before = proxied.length;
  t.is(await socatIn(pair.a.path, `TCP4:${pair.b.ip}:${APP_PORT}`), `proxy ${pair.b.ip}:${APP_PORT}`);
  t.is(proxied.length, before + 1);
});

test.serial("IPv4-mapped IPv6 connection is captured", async (t) => {
  const { pair, proxied } = fx();
  const before = proxied.length;
  t.is(await socatIn(pair.a.path, `TCP6:[::ffff:${pair.b.ip}]:${APP_PORT}`), `proxy ${pair.b.ip}:${APP_PORT}`);
  t.is(proxied.length, before + 1);
});

test.serial("IPv4-mapped peer name is the dialled address", async (t) => {
  const { pair } = fx();
  const script = [
    "import socket",
    "s = socket.create_connection(('::ffff:" + pair.b.ip + "', " + APP_PORT + "), timeout=3)",
    "print(s.getpeername()[0], s.getpeername()[1])",
    "s.close()",
  ].join("\n");
  const { stdout } = await execFileAsync("nsenter", [`--net=${pair.a.path}`, "python3", "-c", script], {
    timeout: WAIT_MS,
    encoding: "utf8",
  });
  t.is(stdout.trim(), `::ffff:${pair.b.ip} ${APP_PORT}`);
});

test.serial("loopback in enrolled netns is not captured", async (t) => {
  const { pair, proxied } = fx();
  const before = proxied.length;
  t.is(await readAll(appConnect(pair.a.path, "127.0.0.1", APP_PORT)), "app-a");
  t.is(proxied.length, before);
});

test.serial("non-enrolled netns is not captured", async (t) => {
  const { pair, proxied } = fx();
  const before = proxied.length;
  t.is(await readAll(appConnect(pair.b.path, pair.a.ip, APP_PORT)), "app-a");
  t.is(proxied.length, before);
});

test.serial("agent socket is not captured", async (t) => {
  const { pair, proxied, reachedB } = fx();
  const before = { proxied: proxied.length, reachedB: reachedB.length };
  const socket = new NetnsPodNetwork(pair.a.path, pair.a.ip).connect(pair.b.ip, APP_PORT);
  t.is(await readAll(socket), "app-b");
  t.is(proxied.length, before.proxied);
  t.is(reachedB.length, before.reachedB + 1);
  t.true(reachedB.at(-1)!.startsWith(`${pair.a.ip}:`));
});

/** Binds a TCP socket of family `family` to `host`:`port` in the namespace, as an application would; returns "bound" or the errno name. */
async function bindAsApplication(netnsPath: string, family: "inet" | "inet6", host: string, port: number): Promise<string> {
  const script = [
    "import errno, socket, sys",
    `s = socket.socket(socket.AF_${family.toUpperCase()}, socket.SOCK_STREAM)`,
    "try:",
    `    s.bind((${JSON.stringify(host)}, ${port}))`,
    "    print('bound')",
    "except OSError as e:",
    "    print(errno.errorcode.get(e.errno, str(e.errno)))",
  ].join("\n");
  const { stdout } = await execFileAsync("nsenter", [`--net=${netnsPath}`, "python3", "-c", script], { timeout: WAIT_MS });
  return stdout.trim();
}

test.serial("application cannot bind a proxy port in an enrolled pod", async (t) => {
  const { pair } = fx();
  for (const port of [15001, 15006, 15008]) {
    t.is(await bindAsApplication(pair.a.path, "inet", pair.a.ip, port), "EPERM", `bind ${pair.a.ip}:${port}`);
    t.is(await bindAsApplication(pair.a.path, "inet6", "::", port), "EPERM", `bind [::]:${port}`);
  }
  t.is(await bindAsApplication(pair.a.path, "inet", pair.a.ip, 15009), "bound", "a port next to the proxy ports");
});

test.serial("application binds proxy ports outside the mesh", async (t) => {
  // The control for the rejection above: namespace b is not enrolled.
  const { pair } = fx();
  t.is(await bindAsApplication(pair.b.path, "inet", pair.b.ip, 15008), "bound");
});

test.serial("agent flag without a mark is not captured", async (t) => {
  const { pair, proxied, reachedB } = fx();
  const before = { proxied: proxied.length, reachedB: reachedB.length };
  const socket = new net.Socket({ fd: netnsSocket(pair.a.path, { mark: 0 }) });
  socket.connect(APP_PORT, pair.b.ip);
  t.is(await readAll(socket), "app-b");
  t.is(proxied.length, before.proxied);
  t.is(reachedB.length, before.reachedB + 1);
});

for (const mark of [AGENT_MARK, TRANSPARENT_MARK]) {
  test.serial(`app socket marked ${mark.toString(16)} is captured`, async (t) => {
    const { pair, proxied, reachedB } = fx();
    const before = { proxied: proxied.length, reachedB: reachedB.length };
    t.is(await readAll(appConnect(pair.a.path, pair.b.ip, APP_PORT, mark)), `proxy ${pair.b.ip}:${APP_PORT}`);
    t.is(proxied.length, before.proxied + 1);
    t.is(reachedB.length, before.reachedB);
  });
}

test.serial("native IPv6 from pod without IPv6 is rejected", async (t) => {
  const { pair, ipv6 } = fx();
  const before = ipv6.b.accepted.length;
  const linkLocal = `${await linkLocalAddress(pair.b)}%${pair.a.device}`;
  await linkLocalAddress(pair.a);
  t.is(await connectIpv6(pair.a.path, linkLocal, APP6_PORT), "EPERM", `connect to ${linkLocal}`);
  t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), "EPERM", `connect to ${pair.b.ip6}`);
  t.is(await acceptedAfterSettling(ipv6.b), before);
});

test.serial("IPv6 loopback in enrolled pod works", async (t) => {
  const { pair, ipv6, proxied } = fx();
  const before = { accepted: ipv6.a.accepted.length, proxied: proxied.length };
  t.is(await connectIpv6(pair.a.path, "::1", APP6_PORT), "connected app6");
  t.is(ipv6.a.accepted.length, before.accepted + 1);
  t.true(ipv6.a.accepted.at(-1)?.startsWith("::1 "), `peer ${ipv6.a.accepted.at(-1)}`);
  t.is(proxied.length, before.proxied);
});

test.serial("unenrolled pod reaches IPv6 peer", async (t) => {
  // The control for the rejection above: the same connections work once the pod is not enrolled.
  const { capture, cookieA, pair, ipv6 } = fx();
  const before = ipv6.b.accepted.length;
  const linkLocal = `${await linkLocalAddress(pair.b)}%${pair.a.device}`;
  await linkLocalAddress(pair.a);
  capture.unenroll(cookieA);
  try {
    t.is(await connectIpv6(pair.a.path, linkLocal, APP6_PORT), "connected app6");
    t.is(await connectIpv6(pair.a.path, pair.b.ip6, APP6_PORT), "connected app6");
  } finally {
    capture.enroll(cookieA, pair.a.ip);
  }
  t.is(ipv6.b.accepted.length, before + 2);
});

test.serial("enroll replaces the pod entry", async (t) => {
  const { capture, cookieA, pair, proxied } = fx();
  // A wrong IP first: connections would go to 192.0.2.1:15001 if the second call did not replace it.
  capture.enroll(cookieA, "192.0.2.1");
  capture.enroll(cookieA, pair.a.ip);
  t.deepEqual(capture.enrolledCookies(), [cookieA]);
  const before = proxied.length;
  t.is(await readAll(appConnect(pair.a.path, pair.b.ip, APP_PORT)), `proxy ${pair.b.ip}:${APP_PORT}`);
  t.is(proxied.length, before + 1);
});

test.serial("unenrolled netns is no longer captured", async (t) => {
  const { capture, cookieA, pair, proxied } = fx();
  const before = proxied.length;
  capture.unenroll(cookieA);
  try {
    t.deepEqual(capture.enrolledCookies(), []);
    t.is(await readAll(appConnect(pair.a.path, pair.b.ip, APP_PORT)), "app-b");
    t.is(proxied.length, before);
  } finally {
    capture.enroll(cookieA, pair.a.ip);
  }
});

test.serial("close keeps capture attached", async (t) => {
  const state = fx();
  const ids = linkedProgramIds();
  state.capture.close();
  const attached = cgroupRootProgramIds();
  for (const id of ids) t.true(attached.includes(id), `program ${id} stays attached without this process's descriptors`);

  state.capture = Capture.attach({ pinRoot: PIN_ROOT, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger());
  t.deepEqual(state.capture.enrolledCookies(), [state.cookieA]);
  const before = state.proxied.length;
  t.is(await readAll(appConnect(state.pair.a.path, state.pair.b.ip, APP_PORT)), `proxy ${state.pair.b.ip}:${APP_PORT}`);
  t.is(state.proxied.length, before + 1);
});

test.serial("attach again updates links in place", (t) => {
  const { capture, cookieA } = fx();
  const before = linkedProgramIds();
  const again = Capture.attach({ pinRoot: PIN_ROOT, cgroupPath: CGROUP_ROOT, objectPath: OBJECT_PATH }, silentLogger());
  try {
    const after = linkedProgramIds();
    t.is(after.length, PROGRAM_NAMES.length);
    t.notDeepEqual(after, before);
    // The pinned maps were reused, so the enrolled pod is still there.
    t.deepEqual(again.enrolledCookies(), [cookieA]);
    const attached = cgroupRootProgramIds();
    for (const id of after) t.true(attached.includes(id), `program ${id} is attached to the cgroup root`);
    for (const id of before) t.false(attached.includes(id), `old program ${id} was replaced`);
  } finally {
    again.close();
  }
  t.deepEqual(capture.enrolledCookies(), [cookieA]);
});

test.serial("remove detaches programs and unpins", async (t) => {
  const { capture } = fx();
  const ids = linkedProgramIds();
  capture.close();
  Capture.remove(PIN_ROOT);
  t.false(fs.existsSync(PIN_ROOT));

  // A link detaches when its last reference goes; allow the kernel a moment to release it.
  const deadline = Date.now() + WAIT_MS;
  let remaining = ids;
  while (Date.now() < deadline) {
    const attached = cgroupRootProgramIds();
    remaining = ids.filter((id) => attached.includes(id));
    if (remaining.length === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  t.deepEqual(remaining, []);
  t.notThrows(() => Capture.remove(PIN_ROOT));
});

test.serial("agent socket needs an attached capture", (t) => {
  // The previous test closed the last Capture of this process.
  const { pair } = fx();
  const error = t.throws(() => netnsSocket(pair.a.path, {}));
  t.regex(error?.message ?? "", /no capture is attached in this process/);
  t.notThrows(() => closeFd(netnsSocket(pair.a.path, { agentSocket: false })));
});
