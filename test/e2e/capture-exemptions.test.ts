// Capture exemptions on the real kernel. The sk_lookup program runs through BPF_PROG_TEST_RUN on a
// table of made-up lookups, against maps filled as the agent fills them (a real 15006 listener in
// namespace B). Then real connections check the same exemptions end to end: kubelet probe sources
// and excluded inbound ports reach B's application, and an excluded outbound port leaves enrolled
// namespace A unchanged. Needs root, bpffs and cgroup v2, and fails without them.
import test from "ava";
import { execFileSync } from "node:child_process";
import net from "node:net";
import path from "node:path";

import { Capture } from "../../agent/capture/ebpf/capture";
import { DEFAULT_PROBE_SOURCES } from "../../agent/capture/ebpf/exemptions";
import {
  COOKIE_SIZE,
  INBOUND_PLAINTEXT_PORT,
  INBOUND_PROGRAM_NAME,
  IPV4_KEY_SIZE,
  LISTENER_VALUE_SIZE,
  MAP_ENROLLED,
  MAP_EXCLUDED_PORTS,
  MAP_INBOUND_LISTENERS,
  MAP_INBOUND_PODS,
  MAP_ORIGINAL_DESTINATION,
  MAP_OWN_CONNECTIONS,
  MAP_PROBE_SOURCES,
  MAX_EXCLUDED_PORTS,
  MAX_PROBE_SOURCES,
  STRUCT_LAYOUTS,
  decodeCookie,
  encodeCookie,
  encodeInboundKey,
  encodeInboundPod,
  encodeIpv4Key,
  encodeOwnConnectionKey,
} from "../../agent/capture/layout";
import { closeFd, netnsCookie, netnsSocket } from "../../agent/capture/native";
import { mapDelete, mapLookup, mapOpen, mapUpdate, skLookupTestRun, type SkLookupTestInput } from "../../agent/capture/ebpf/native-bpf";
import { createEnrolledPair, PIN_PARENT, type EnrolledPair } from "../harness/netns-pair";
import { listenOn, readAll } from "../harness/netns-sockets";

const PREFIX = "aaexm";
const SUBNET = 20;
const PIN_ROOT = path.join(PIN_PARENT, `${PREFIX}-${process.pid}`);
const PROGRAM_PIN = path.join(PIN_ROOT, "progs", INBOUND_PROGRAM_NAME);

const SK_PASS = 1;
const SK_DROP = 0;
const AF_INET = 2;
const AF_INET6 = 10;
const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;

const APP_PORT = 8080;
const EXCLUDED_INBOUND_PORT = 9090;
const EXCLUDED_OUTBOUND_PORT = 5432;
/** An address in B's subnet that sk_lookup guards but that has no 15006 listener. */
const UNSERVED_POD_IP = `10.${SUBNET}.0.3`;
/** An address in B's subnet that no map mentions. */
const OTHER_IP = `10.${SUBNET}.0.99`;
const PROBE_SOURCE_IP4 = DEFAULT_PROBE_SOURCES[0];
const PROBE_SOURCE_IP6 = DEFAULT_PROBE_SOURCES[1];
/** The agent's own connection to B's application, as sockops records it. */
const OWN_SOURCE_PORT = 41000;
/** How long a client in these tests waits for the server to reply and close. */
const WAIT_MS = 3000;

interface Extra {
  listenerFd: number;
  listenerCookie: bigint;
  servers: net.Server[];
}

let fixture: EnrolledPair<Extra> | undefined;

function fx(): EnrolledPair<Extra> {
  if (!fixture) throw new Error("the test fixture failed to start. Fix the before hook's error and rerun.");
  return fixture;
}

/** Creates a server that replies `<name>` and closes each connection. */
function namedServer(name: string): net.Server {
  return net.createServer((socket) => {
    socket.on("error", () => undefined);
    socket.end(name);
  });
}

/** Returns the socket cookie of B's 15006 listener: a user-space lookup in the sockhash returns it. */
function listenerCookie(podIp: string): bigint {
  const mapFd = mapOpen(path.join(PIN_ROOT, "maps", MAP_INBOUND_LISTENERS));
  try {
    const value = Buffer.alloc(LISTENER_VALUE_SIZE);
    if (!mapLookup(mapFd, encodeInboundKey(podIp, INBOUND_PLAINTEXT_PORT), value)) throw new Error(`no 15006 listener of ${podIp} in aa_inbound`);
    return decodeCookie(value);
  } finally {
    closeFd(mapFd);
  }
}

function withMap(name: string, action: (mapFd: number) => void): void {
  const mapFd = mapOpen(path.join(PIN_ROOT, "maps", name));
  try {
    action(mapFd);
  } finally {
    closeFd(mapFd);
  }
}

function ip(netnsName: string, args: string[]): void {
  execFileSync("ip", ["-n", netnsName, ...args], { stdio: ["ignore", "ignore", "pipe"] });
}

/**
 * Starts B's servers: the 15006 listener (in capture, as the agent does), the application on
 * APP_PORT and on the excluded ports. Gives A the IPv4 probe source address, routed back from B.
 */
async function startServers(pair: EnrolledPair<Extra>["pair"], capture: Capture): Promise<Extra> {
  const servers: net.Server[] = [];
  const listenerFd = netnsSocket(pair.b.path, { bindIp: "0.0.0.0", port: INBOUND_PLAINTEXT_PORT, backlog: 64 });
  const inbound = namedServer("inbound");
  servers.push(inbound);
  capture.attachInbound(pair.b.path, netnsCookie(pair.b.path), pair.b.ip, listenerFd);
  await listenOn(inbound, listenerFd);

  for (const port of [APP_PORT, EXCLUDED_INBOUND_PORT, EXCLUDED_OUTBOUND_PORT]) {
    const app = namedServer(`app:${port}`);
    servers.push(app);
    await listenOn(app, netnsSocket(pair.b.path, { agentSocket: false, bindIp: "0.0.0.0", port, backlog: 16 }));
  }

  ip(pair.a.name, ["addr", "add", `${PROBE_SOURCE_IP4}/32`, "dev", pair.a.device]);
  ip(pair.b.name, ["route", "add", `${PROBE_SOURCE_IP4}/32`, "dev", pair.b.device]);
  return { listenerFd, listenerCookie: listenerCookie(pair.b.ip), servers };
}

test.before(async () => {
  fixture = await createEnrolledPair(PREFIX, SUBNET, PIN_ROOT, startServers);
  const { pair, capture } = fixture;
  capture.exemptions.setProbeSources(DEFAULT_PROBE_SOURCES);
  capture.exemptions.setExcludedPorts(pair.b.ip, { inbound: [EXCLUDED_INBOUND_PORT], outbound: [] });
  capture.exemptions.setExcludedPorts(UNSERVED_POD_IP, { inbound: [EXCLUDED_INBOUND_PORT], outbound: [] });
  withMap(MAP_INBOUND_PODS, (mapFd) => mapUpdate(mapFd, encodeIpv4Key(UNSERVED_POD_IP), encodeInboundPod(0n)));
  withMap(MAP_OWN_CONNECTIONS, (mapFd) =>
    mapUpdate(mapFd, encodeOwnConnectionKey(pair.a.ip, OWN_SOURCE_PORT, pair.b.ip, APP_PORT), encodeCookie(0n)),
  );
});

test.after.always(async () => {
  if (!fixture) return;
  const { pair, capture, extra } = fixture;
  fixture = undefined;
  await Promise.all(extra.servers.map((server) => new Promise((resolve) => server.close(resolve))));
  capture.close();
  Capture.remove(PIN_ROOT);
  pair.destroy();
});

interface LookupRow {
  name: string;
  input: Partial<SkLookupTestInput> & Pick<SkLookupTestInput, "localIp" | "localPort">;
  verdict: number;
  /** Whether the program must assign B's 15006 listener. When false, it must assign no socket. */
  assigned: boolean;
}

/** Runs one row, filling in a TCP/IPv4 lookup from A's address. */
function runRow(row: LookupRow): { verdict: number; cookie: bigint } {
  return skLookupTestRun(PROGRAM_PIN, {
    family: AF_INET,
    protocol: IPPROTO_TCP,
    remoteIp: fx().pair.a.ip,
    remotePort: 40000,
    ...row.input,
  });
}

function ipv4Rows(): LookupRow[] {
  const { a, b } = fx().pair;
  return [
    { name: "pod port assigned to 15006", input: { localIp: b.ip, localPort: APP_PORT }, verdict: SK_PASS, assigned: true },
    { name: "agent port 15006 passes", input: { localIp: b.ip, localPort: 15006 }, verdict: SK_PASS, assigned: false },
    { name: "agent port 15008 passes", input: { localIp: b.ip, localPort: 15008 }, verdict: SK_PASS, assigned: false },
    { name: "15001 from outside dropped", input: { localIp: b.ip, localPort: 15001 }, verdict: SK_DROP, assigned: false },
    { name: "pod's own IP passes", input: { remoteIp: b.ip, localIp: b.ip, localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
    { name: "loopback source passes", input: { remoteIp: "127.0.0.1", localIp: b.ip, localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
    {
      name: "own connection passes",
      input: { remoteIp: a.ip, remotePort: OWN_SOURCE_PORT, localIp: b.ip, localPort: APP_PORT },
      verdict: SK_PASS,
      assigned: false,
    },
    {
      name: "own tuple other port assigned",
      input: { remoteIp: a.ip, remotePort: OWN_SOURCE_PORT + 1, localIp: b.ip, localPort: APP_PORT },
      verdict: SK_PASS,
      assigned: true,
    },
    { name: "probe source passes", input: { remoteIp: PROBE_SOURCE_IP4, localIp: b.ip, localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
    { name: "probe source to 15001 dropped", input: { remoteIp: PROBE_SOURCE_IP4, localIp: b.ip, localPort: 15001 }, verdict: SK_DROP, assigned: false },
    { name: "excluded inbound port passes", input: { localIp: b.ip, localPort: EXCLUDED_INBOUND_PORT }, verdict: SK_PASS, assigned: false },
    { name: "other pod's exclusion ignored", input: { localIp: b.ip, localPort: EXCLUDED_OUTBOUND_PORT }, verdict: SK_PASS, assigned: true },
    { name: "missing listener drops", input: { localIp: UNSERVED_POD_IP, localPort: APP_PORT }, verdict: SK_DROP, assigned: false },
    { name: "missing listener 15006 drops", input: { localIp: UNSERVED_POD_IP, localPort: 15006 }, verdict: SK_DROP, assigned: false },
    {
      name: "missing listener probe passes",
      input: { remoteIp: PROBE_SOURCE_IP4, localIp: UNSERVED_POD_IP, localPort: APP_PORT },
      verdict: SK_PASS,
      assigned: false,
    },
    {
      name: "missing listener excluded passes",
      input: { localIp: UNSERVED_POD_IP, localPort: EXCLUDED_INBOUND_PORT },
      verdict: SK_PASS,
      assigned: false,
    },
    { name: "second pod address drops", input: { localIp: OTHER_IP, localPort: APP_PORT }, verdict: SK_DROP, assigned: false },
    { name: "loopback destination passes", input: { remoteIp: "127.0.0.1", localIp: "127.0.0.1", localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
    { name: "pod to itself passes", input: { remoteIp: OTHER_IP, localIp: OTHER_IP, localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
    { name: "UDP passes", input: { protocol: IPPROTO_UDP, localIp: b.ip, localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
  ];
}

/**
 * IPv6 lookups. B has no IPv6 capture entries, so these follow the rules for a pod without IPv6
 * capture: only ::1 passes. An IPv4-mapped destination arrives as AF_INET6 and gets the same
 * verdict as any other IPv6 address. Update these rows when the IPv6 rules change.
 */
function ipv6Rows(): LookupRow[] {
  const { a, b } = fx().pair;
  return [
    { name: "IPv6 to pod dropped", input: { family: AF_INET6, remoteIp: a.ip6, localIp: b.ip6, localPort: APP_PORT }, verdict: SK_DROP, assigned: false },
    { name: "IPv6 to ::1 passes", input: { family: AF_INET6, remoteIp: "::1", localIp: "::1", localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
    {
      name: "IPv4-mapped to pod dropped",
      input: { family: AF_INET6, remoteIp: `::ffff:${a.ip}`, localIp: `::ffff:${b.ip}`, localPort: APP_PORT },
      verdict: SK_DROP,
      assigned: false,
    },
    {
      name: "IPv6 probe source dropped",
      input: { family: AF_INET6, remoteIp: PROBE_SOURCE_IP6, localIp: b.ip6, localPort: APP_PORT },
      verdict: SK_DROP,
      assigned: false,
    },
    { name: "IPv6 UDP passes", input: { family: AF_INET6, protocol: IPPROTO_UDP, remoteIp: a.ip6, localIp: b.ip6, localPort: APP_PORT }, verdict: SK_PASS, assigned: false },
  ];
}

test.serial("sk_lookup table IPv4", (t) => {
  for (const row of ipv4Rows()) {
    const result = runRow(row);
    t.is(result.verdict, row.verdict, `${row.name}: verdict`);
    t.is(result.cookie, row.assigned ? fx().extra.listenerCookie : 0n, `${row.name}: assigned socket`);
  }
  t.not(fx().extra.listenerCookie, 0n);
});

test.serial("sk_lookup table IPv6", (t) => {
  for (const row of ipv6Rows()) {
    const result = runRow(row);
    t.is(result.verdict, row.verdict, `${row.name}: verdict`);
    t.is(result.cookie, 0n, `${row.name}: assigned socket`);
  }
});

test.serial("probe source removed is captured", (t) => {
  const { b } = fx().pair;
  const row: LookupRow = { name: "probe", input: { remoteIp: PROBE_SOURCE_IP4, localIp: b.ip, localPort: APP_PORT }, verdict: SK_PASS, assigned: true };
  try {
    fx().capture.exemptions.setProbeSources([PROBE_SOURCE_IP6]);
    t.deepEqual(fx().capture.exemptions.probeSources(), [PROBE_SOURCE_IP6]);
    t.is(runRow(row).cookie, fx().extra.listenerCookie);
  } finally {
    fx().capture.exemptions.setProbeSources(DEFAULT_PROBE_SOURCES);
  }
  t.deepEqual(fx().capture.exemptions.probeSources().sort(), [...DEFAULT_PROBE_SOURCES].sort());
  t.is(runRow(row).cookie, 0n);
});

test.serial("excluded port update and removal", (t) => {
  const { b } = fx().pair;
  const exemptions = fx().capture.exemptions;
  const to = (port: number): LookupRow => ({ name: `port ${port}`, input: { localIp: b.ip, localPort: port }, verdict: SK_PASS, assigned: false });
  try {
    exemptions.setExcludedPorts(b.ip, { inbound: [APP_PORT], outbound: [] });
    t.is(runRow(to(APP_PORT)).cookie, 0n, "newly excluded port passes");
    t.is(runRow(to(EXCLUDED_INBOUND_PORT)).cookie, fx().extra.listenerCookie, "port no longer excluded is assigned");
    exemptions.clearExcludedPorts(b.ip);
    t.false(exemptions.excludedPorts().has(b.ip));
    t.is(runRow(to(APP_PORT)).cookie, fx().extra.listenerCookie, "cleared port is assigned");
  } finally {
    exemptions.setExcludedPorts(b.ip, { inbound: [EXCLUDED_INBOUND_PORT], outbound: [] });
  }
  t.deepEqual(exemptions.excludedPorts().get(b.ip), { inbound: [EXCLUDED_INBOUND_PORT], outbound: [] });
});

test.serial("proxy ports cannot be excluded", (t) => {
  const exemptions = fx().capture.exemptions;
  t.throws(() => exemptions.setExcludedPorts(fx().pair.b.ip, { inbound: [15006], outbound: [] }), { message: /proxy port/ });
  t.throws(() => exemptions.setExcludedPorts(fx().pair.b.ip, { inbound: [], outbound: [15001] }), { message: /proxy port/ });
  t.deepEqual(exemptions.excludedPorts().get(fx().pair.b.ip), { inbound: [EXCLUDED_INBOUND_PORT], outbound: [] });
});

test.serial("real inbound connections", async (t) => {
  const { a, b } = fx().pair;
  const agentClient = (bindIp?: string): net.Socket => new net.Socket({ fd: netnsSocket(a.path, bindIp ? { bindIp } : {}) });
  t.is(await readAll(agentClient().connect(APP_PORT, b.ip), WAIT_MS), "inbound", "a captured port reaches the 15006 listener");
  t.is(await readAll(agentClient().connect(EXCLUDED_INBOUND_PORT, b.ip), WAIT_MS), `app:${EXCLUDED_INBOUND_PORT}`, "an excluded port reaches the app");
  t.is(await readAll(agentClient(PROBE_SOURCE_IP4).connect(APP_PORT, b.ip), WAIT_MS), `app:${APP_PORT}`, "a probe reaches the app");
});

test.serial("real outbound excluded port", async (t) => {
  const { a, b } = fx().pair;
  const appClient = (): net.Socket => new net.Socket({ fd: netnsSocket(a.path, { agentSocket: false }) });
  // Without the exclusion, connect4 steers A's connection to A:15001, where nothing listens.
  await t.throwsAsync(readAll(appClient().connect(EXCLUDED_OUTBOUND_PORT, b.ip), WAIT_MS), { code: "ECONNREFUSED" });
  try {
    fx().capture.exemptions.setExcludedPorts(a.ip, { inbound: [], outbound: [EXCLUDED_OUTBOUND_PORT] });
    // The connection leaves A unchanged and reaches B, whose own inbound capture takes it.
    t.is(await readAll(appClient().connect(EXCLUDED_OUTBOUND_PORT, b.ip), WAIT_MS), "inbound");
    await t.throwsAsync(readAll(appClient().connect(APP_PORT, b.ip), WAIT_MS), { code: "ECONNREFUSED" }, "other ports stay captured");
  } finally {
    fx().capture.exemptions.clearExcludedPorts(a.ip);
  }
});

/** Key size, value size and maximum entries of each pinned map, from the encoders in layout.ts and exemptions.ts. */
function expectedMapSizes(): Record<string, { key: number; value: number; maxEntries?: number }> {
  return {
    [MAP_ENROLLED]: { key: COOKIE_SIZE, value: STRUCT_LAYOUTS.aa_pod_info.size },
    [MAP_ORIGINAL_DESTINATION]: { key: STRUCT_LAYOUTS.aa_orig_dst_key.size, value: STRUCT_LAYOUTS.aa_orig_dst.size },
    [MAP_INBOUND_PODS]: { key: IPV4_KEY_SIZE, value: STRUCT_LAYOUTS.aa_inbound_pod.size },
    [MAP_INBOUND_LISTENERS]: { key: STRUCT_LAYOUTS.aa_inbound_key.size, value: LISTENER_VALUE_SIZE },
    [MAP_OWN_CONNECTIONS]: { key: STRUCT_LAYOUTS.aa_conn_key.size, value: COOKIE_SIZE },
    [MAP_PROBE_SOURCES]: { key: STRUCT_LAYOUTS.aa_probe_source_key.size, value: 4, maxEntries: MAX_PROBE_SOURCES },
    [MAP_EXCLUDED_PORTS]: { key: STRUCT_LAYOUTS.aa_excluded_port_key.size, value: 4, maxEntries: MAX_EXCLUDED_PORTS },
  };
}

test.serial("pinned map sizes match layout", (t) => {
  for (const [name, expected] of Object.entries(expectedMapSizes())) {
    const output = execFileSync("bpftool", ["-j", "map", "show", "pinned", path.join(PIN_ROOT, "maps", name)], { encoding: "utf8" });
    const shown = JSON.parse(output) as { bytes_key: number; bytes_value: number; max_entries: number };
    t.is(shown.bytes_key, expected.key, `${name}: key size`);
    t.is(shown.bytes_value, expected.value, `${name}: value size`);
    if (expected.maxEntries !== undefined) t.is(shown.max_entries, expected.maxEntries, `${name}: max entries`);
  }
});

test.serial("map entries removed by test", (t) => {
  withMap(MAP_INBOUND_PODS, (mapFd) => t.true(mapDelete(mapFd, encodeIpv4Key(UNSERVED_POD_IP))));
  fx().capture.exemptions.clearExcludedPorts(UNSERVED_POD_IP);
  t.false(fx().capture.exemptions.excludedPorts().has(UNSERVED_POD_IP));
});
