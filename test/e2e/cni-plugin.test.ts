// End-to-end test of the chained CNI plugin: the built binary runs as a container runtime runs it
// (CNI_* variables, the network configuration with a prevResult on stdin) against a CniServer in
// this process. Each test has its own socket folder; the pod's network namespace is a real one.
// Needs root (ip netns) and a `make build`.

import test from "ava";
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import { PLUGIN_TYPE } from "../../agent/cni/chain";
import { CniServer, type CniHandler } from "../../agent/cni/server";
import { startCni } from "../../agent/cni/setup";
import type { CniPodEvent } from "../../agent/cni/protocol";
import { silentLogger } from "../../agent/log";
import { endLeftoverProcesses, forgetRun, registerPid } from "../harness/pid-registry";

const PREFIX = `aacni-${process.pid}`;
const PLUGIN = path.resolve(__dirname, "../../../native/cni/ambient-agent-cni");
const NETNS_NAME = `${PREFIX}-1`;
const NETNS_PATH = `/var/run/netns/${NETNS_NAME}`;
/** Bounds a plugin run, so that a plugin that hangs fails its test instead of ava's timeout. */
const PLUGIN_KILL_MS = 15_000;

const PREV_RESULT = {
  cniVersion: "1.0.0",
  interfaces: [{ name: "eth0", sandbox: NETNS_PATH }],
  ips: [
    { address: "10.237.0.5/24", interface: 0, gateway: "10.237.0.1" },
    { address: "fd00:237::5/64", interface: 0 },
  ],
};

interface PluginRun {
  status: number | null;
  stdout: string;
  stderr: string;
  elapsedMs: number;
  exitedAt: number;
}

interface Fixture {
  dir: string;
  socketPath: string;
}

/** Deletes the namespaces that earlier runs of this file left when their process died before cleaning up. */
function deleteLeftoverNamespaces(): void {
  const names = fs.existsSync("/var/run/netns") ? fs.readdirSync("/var/run/netns") : [];
  for (const name of names) {
    const owner = /^aacni-(\d+)-\d+$/.exec(name)?.[1];
    if (!owner || Number(owner) === process.pid || fs.existsSync(`/proc/${owner}`)) continue;
    execFileSync("ip", ["netns", "del", name], { stdio: ["ignore", "ignore", "ignore"] });
  }
}

test.before(() => {
  endLeftoverProcesses("aacni-");
  deleteLeftoverNamespaces();
  if (!fs.existsSync(PLUGIN)) throw new Error(`the CNI plugin binary ${PLUGIN} is missing: run make build`);
  execFileSync("ip", ["netns", "add", NETNS_NAME], { stdio: ["ignore", "ignore", "pipe"] });
});

test.after.always(() => {
  try {
    execFileSync("ip", ["netns", "del", NETNS_NAME], { stdio: ["ignore", "ignore", "ignore"] });
  } catch {
    // The namespace was not made.
  }
  forgetRun(PREFIX);
});

function fixture(t: { teardown(fn: () => void): void }): Fixture {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `${PREFIX}-`));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return { dir, socketPath: path.join(dir, "run", "cni.sock") };
}

/** Builds a network configuration as a runtime passes it to a chained plugin. */
function networkConfig(socketPath: string, extra: Record<string, unknown> = {}): string {
  return JSON.stringify({
    cniVersion: "1.0.0",
    name: "aacni-net",
    type: "ambient-agent-cni",
    // Members the plugin does not read, with brackets and escapes in strings that its scanner must skip.
    runtimeConfig: { portMappings: [{ hostPort: 8080, note: "]}\"{[" }] },
    "odd \"key\"": [true, false, null, -1.5e3, { "}": "\\" }],
    agent_socket: socketPath,
    exclude_namespaces: ["kube-system", "aacni-excluded"],
    timeout_seconds: 2,
    prevResult: PREV_RESULT,
    ...extra,
  });
}

function podEnv(command: string, namespace = "shop"): Record<string, string> {
  return {
    CNI_COMMAND: command,
    CNI_CONTAINERID: "c0ffee01",
    CNI_NETNS: NETNS_PATH,
    CNI_IFNAME: "eth0",
    CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=${namespace};K8S_POD_NAME=cart-0;K8S_POD_UID=uid-7`,
    CNI_PATH: "/opt/cni/bin",
  };
}

/** Runs the plugin binary with env and stdin, as a runtime does. */
function runPlugin(env: Record<string, string>, stdin: string): Promise<PluginRun> {
  const started = Date.now();
  const child = spawn(PLUGIN, [], { env, stdio: ["pipe", "pipe", "pipe"] });
  registerPid(PREFIX, child.pid);
  const killer = setTimeout(() => child.kill("SIGKILL"), PLUGIN_KILL_MS);
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  // A plugin that does not read its stdin (VERSION, CHECK) closes the pipe first, as Go's os/exec allows.
  child.stdin.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code !== "EPIPE") throw error;
  });
  child.stdin.end(stdin);
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (status) => {
      clearTimeout(killer);
      resolve({ status, stdout, stderr, elapsedMs: Date.now() - started, exitedAt: Date.now() });
    });
  });
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function listen(t: { teardown(fn: () => Promise<void>): void }, socketPath: string, handler: CniHandler): Promise<CniServer> {
  const server = await CniServer.listen(socketPath, handler, silentLogger());
  t.teardown(() => server.close());
  return server;
}

const NO_PODS: CniHandler = {
  add: async () => undefined,
  del: async () => undefined,
};

test.serial("VERSION lists supported versions", async (t) => {
  const run = await runPlugin({ CNI_COMMAND: "VERSION" }, '{"cniVersion":"1.0.0"}');
  t.is(run.status, 0);
  const output = JSON.parse(run.stdout);
  t.is(output.cniVersion, "1.0.0");
  t.true(output.supportedVersions.includes("1.0.0"));
  t.true(output.supportedVersions.includes("0.4.0"));
});

test.serial("ADD in excluded namespace skips agent", async (t) => {
  const { socketPath } = fixture(t);
  const config = networkConfig(socketPath);
  const run = await runPlugin(podEnv("ADD", "aacni-excluded"), config);
  t.is(run.status, 0, run.stdout);
  t.is(run.stdout.trim(), JSON.stringify(PREV_RESULT));
  t.true(run.elapsedMs < 1000, `took ${run.elapsedMs} ms`);
  t.false(fs.existsSync(socketPath));
});

test.serial("ADD waits for the agent to start", async (t) => {
  const { socketPath } = fixture(t);
  const order: string[] = [];
  const events: CniPodEvent[] = [];
  const netnsInode = fs.statSync(NETNS_PATH).ino;
  let serverStartedAt = 0;
  let addResolvedAt = 0;

  const plugin = runPlugin(podEnv("ADD"), networkConfig(socketPath)).then((run) => {
    order.push("plugin exited");
    return run;
  });
  await delay(700);
  order.push("server starting");
  serverStartedAt = Date.now();
  await listen(t, socketPath, {
    add: async (event) => {
      order.push("add called");
      events.push(event);
      t.is(fs.statSync(event.netns).ino, netnsInode, "the netns path does not open the test's namespace");
      await delay(300);
      addResolvedAt = Date.now();
      order.push("add resolved");
    },
    del: async () => undefined,
  });
  const run = await plugin;

  t.is(run.status, 0, run.stdout);
  t.deepEqual(JSON.parse(run.stdout), PREV_RESULT);
  t.deepEqual(order, ["server starting", "add called", "add resolved", "plugin exited"]);
  t.true(run.exitedAt >= addResolvedAt);
  t.true(run.elapsedMs >= Date.now() - serverStartedAt, "the plugin exited before the server started");
  t.is(events.length, 1);
  t.deepEqual(events[0], {
    command: "ADD",
    containerId: "c0ffee01",
    netns: NETNS_PATH,
    ifName: "eth0",
    podNamespace: "shop",
    podName: "cart-0",
    podUid: "uid-7",
    ips: ["10.237.0.5", "fd00:237::5"],
    cniVersion: "1.0.0",
  });
});

test.serial("ADD without prevResult prints the version", async (t) => {
  const { socketPath } = fixture(t);
  await listen(t, socketPath, NO_PODS);
  const run = await runPlugin(podEnv("ADD"), networkConfig(socketPath, { prevResult: undefined, cniVersion: "0.4.0" }));
  t.is(run.status, 0, run.stdout);
  t.deepEqual(JSON.parse(run.stdout), { cniVersion: "0.4.0" });
});

test.serial("ADD times out with code 11", async (t) => {
  const { socketPath } = fixture(t);
  const run = await runPlugin(podEnv("ADD"), networkConfig(socketPath));
  t.not(run.status, 0);
  const error = JSON.parse(run.stdout);
  t.is(error.code, 11);
  t.is(error.cniVersion, "1.0.0");
  t.regex(error.msg, /did not accept a connection on .*cni\.sock within 2\.0 s/);
  t.true(run.elapsedMs >= 1900 && run.elapsedMs < 5000, `took ${run.elapsedMs} ms`);
});

test.serial("ADD times out waiting for the reply", async (t) => {
  const { socketPath } = fixture(t);
  let release: () => void = () => undefined;
  await listen(t, socketPath, { add: () => new Promise((resolve) => (release = resolve)), del: async () => undefined });
  const run = await runPlugin(podEnv("ADD"), networkConfig(socketPath));
  release();
  t.not(run.status, 0);
  const error = JSON.parse(run.stdout);
  t.is(error.code, 11);
  t.regex(error.msg, /did not reply within 2\.0 s/);
});

test.serial("handler error fails the ADD", async (t) => {
  const { socketPath } = fixture(t);
  await listen(t, socketPath, {
    add: async () => {
      throw new Error("capture of pod shop/cart-0 is not in place yet");
    },
    del: async () => undefined,
  });
  const run = await runPlugin(podEnv("ADD"), networkConfig(socketPath));
  t.is(run.status, 1);
  const error = JSON.parse(run.stdout);
  t.is(error.msg, "capture of pod shop/cart-0 is not in place yet");
  t.is(error.code, 100);
});

test.serial("invalid request gets the agent's error", async (t) => {
  const { socketPath } = fixture(t);
  await listen(t, socketPath, NO_PODS);
  const env = { ...podEnv("ADD"), CNI_NETNS: "relative/netns" };
  const run = await runPlugin(env, networkConfig(socketPath));
  t.is(run.status, 1);
  const error = JSON.parse(run.stdout);
  t.is(error.code, 4);
  t.regex(error.msg, /CNI_NETNS "relative\/netns" is not a normalized absolute path/);
});

test.serial("invalid config fails before the agent", async (t) => {
  const { socketPath } = fixture(t);
  const cases: Array<[string, number, RegExp]> = [
    ['{"cniVersion":"1.0.0",', 6, /failed to decode/],
    ['{"cniVersion":"1.0.0","x":"\\q"}', 6, /invalid value of x/],
    ['{"cniVersion":"1.0.0"} {}', 6, /text follows/],
    ['{"cniVersion":"9.9.9"}', 1, /unsupported cniVersion 9\.9\.9/],
    ['{"cniVersion":"1.0.0","timeout_seconds":"2"}', 7, /timeout_seconds must be a number/],
    ['{"cniVersion":"1.0.0","timeout_seconds":0}', 7, /timeout_seconds is 0/],
    ['{"cniVersion":"1.0.0","exclude_namespaces":"kube-system"}', 7, /exclude_namespaces must be an array of strings/],
    ['{"cniVersion":"1.0.0","agent_socket":"run/cni.sock"}', 7, /agent_socket run\/cni\.sock is not an absolute path/],
    ['{"cniVersion":"1.0.0","prevResult":[]}', 7, /prevResult must be an object/],
    [`{"cniVersion":"1.0.0","agent_socket":"/${"a".repeat(120)}"}`, 7, /agent_socket is longer than 107 bytes/],
  ];
  for (const [config, code, message] of cases) {
    const run = await runPlugin(podEnv("ADD"), config);
    t.is(run.status, 1, config);
    const error = JSON.parse(run.stdout);
    t.is(error.code, code, config);
    t.regex(error.msg, message, config);
  }
  t.false(fs.existsSync(socketPath));
});

test.serial("DEL exits 0 without agent", async (t) => {
  const { socketPath } = fixture(t);
  const run = await runPlugin(podEnv("DEL"), networkConfig(socketPath));
  t.is(run.status, 0);
  t.is(run.stdout, "");
  t.true(run.elapsedMs < 4000, `took ${run.elapsedMs} ms`);
  const broken = await runPlugin(podEnv("DEL"), "{not json");
  t.is(broken.status, 0);
});

test.serial("DEL reaches the agent", async (t) => {
  const { socketPath } = fixture(t);
  const removed: CniPodEvent[] = [];
  await listen(t, socketPath, { add: async () => undefined, del: async (event) => void removed.push(event) });
  const env = { ...podEnv("DEL"), CNI_NETNS: "" };
  const run = await runPlugin(env, networkConfig(socketPath));
  t.is(run.status, 0);
  t.is(removed.length, 1);
  t.is(removed[0].containerId, "c0ffee01");
  t.is(removed[0].netns, "");
  t.is(removed[0].podName, "cart-0");
});

test.serial("CHECK, GC and STATUS succeed", async (t) => {
  for (const command of ["CHECK", "GC", "STATUS"]) {
    const run = await runPlugin({ CNI_COMMAND: command }, '{"cniVersion":"1.1.0"}');
    t.is(run.status, 0, command);
  }
  const unknown = await runPlugin({ CNI_COMMAND: "RESET" }, "{}");
  t.is(unknown.status, 1);
  t.is(JSON.parse(unknown.stdout).code, 4);
});

test.serial("server replaces a stale socket", async (t) => {
  const { socketPath } = fixture(t);
  const first = await CniServer.listen(socketPath, NO_PODS, silentLogger());
  // A crashed agent leaves its socket file: keep the file but stop the listener behind it.
  const stale = `${socketPath}.kept`;
  fs.linkSync(socketPath, stale);
  await first.close();
  fs.renameSync(stale, socketPath);
  t.true(fs.lstatSync(socketPath).isSocket());

  const second = await listen(t, socketPath, NO_PODS);
  t.is(fs.statSync(socketPath).mode & 0o777, 0o600);
  t.is(fs.statSync(path.dirname(socketPath)).mode & 0o777, 0o700);
  const run = await runPlugin(podEnv("ADD"), networkConfig(socketPath));
  t.is(run.status, 0, run.stdout);
  t.truthy(second);
});

test.serial("server rejects a live socket", async (t) => {
  const { socketPath } = fixture(t);
  await listen(t, socketPath, NO_PODS);
  const error = await t.throwsAsync(CniServer.listen(socketPath, NO_PODS, silentLogger()));
  t.is((error as { code?: string }).code, "CNI_SETUP_FAILED");
  t.regex(error?.message ?? "", /another process serves the CNI socket/);
});

test.serial("server rejects a shared folder", async (t) => {
  const { dir } = fixture(t);
  const shared = path.join(dir, "shared");
  fs.mkdirSync(shared, { mode: 0o777 });
  fs.chmodSync(shared, 0o777);
  const error = await t.throwsAsync(CniServer.listen(path.join(shared, "cni.sock"), NO_PODS, silentLogger()));
  t.is((error as { code?: string }).code, "CNI_SETUP_FAILED");
  t.regex(error?.message ?? "", /must be owned by uid 0 and not writable by group or others/);
});

test.serial("startCni installs, chains and serves", async (t) => {
  const { dir, socketPath } = fixture(t);
  const confDir = path.join(dir, "net.d");
  const binDir = path.join(dir, "bin");
  fs.mkdirSync(confDir);
  fs.writeFileSync(path.join(confDir, "10-bridge.conf"), JSON.stringify({ cniVersion: "1.0.0", name: "aacni-net", type: "bridge" }));
  const added: CniPodEvent[] = [];
  const cni = await startCni(
    { confDir, binDir, socketPath, pluginBinary: PLUGIN, excludeNamespaces: ["kube-system"], timeoutSeconds: 2 },
    { add: async (event) => void added.push(event), del: async () => undefined },
    silentLogger(),
  );
  t.teardown(() => cni.close());

  // Run the installed binary with its entry from the conflist, as libcni builds a chained plugin's configuration.
  const conflist = JSON.parse(fs.readFileSync(path.join(confDir, "10-bridge.conflist"), "utf8"));
  const entry = conflist.plugins.find((plugin: { type: string }) => plugin.type === PLUGIN_TYPE);
  t.deepEqual(entry, { type: PLUGIN_TYPE, agent_socket: socketPath, exclude_namespaces: ["kube-system"], timeout_seconds: 2 });
  const config = JSON.stringify({ cniVersion: conflist.cniVersion, name: conflist.name, ...entry, prevResult: PREV_RESULT });
  const child = spawn(path.join(binDir, PLUGIN_TYPE), [], { env: podEnv("ADD"), stdio: ["pipe", "pipe", "ignore"] });
  registerPid(PREFIX, child.pid);
  let stdout = "";
  child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stdin.end(config);
  const status = await new Promise((resolve) => child.once("close", resolve));
  t.is(status, 0, stdout);
  t.deepEqual(JSON.parse(stdout), PREV_RESULT);
  t.is(added.length, 1);
  t.is(added[0].netns, NETNS_PATH);

  await cni.close();
  t.false(fs.existsSync(socketPath));
  t.true(fs.existsSync(path.join(confDir, "10-bridge.conflist")), "closing must leave the plugin chained");
});
