import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import { chainInto, CniChain, findRuntimeConfig, installPluginBinary, PLUGIN_TYPE, unchain, type CniPluginSettings } from "../../agent/cni/chain";
import { silentLogger } from "../../agent/log";

const SETTINGS: CniPluginSettings = { agentSocket: "/var/run/ambient-agent/cni.sock", excludeNamespaces: ["kube-system"], timeoutSeconds: 30 };

const CALICO_CONFLIST = {
  name: "k8s-pod-network",
  cniVersion: "0.3.1",
  plugins: [
    { type: "calico", ipam: { type: "calico-ipam" } },
    { type: "portmap", capabilities: { portMappings: true } },
  ],
};

const BRIDGE_CONF = { cniVersion: "1.0.0", name: "bridge-net", type: "bridge", bridge: "cni0", ipam: { type: "host-local", subnet: "10.244.0.0/24" } };

const EXPECTED_ENTRY = { type: PLUGIN_TYPE, agent_socket: "/var/run/ambient-agent/cni.sock", exclude_namespaces: ["kube-system"], timeout_seconds: 30 };

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aacni-chain-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function writeJson(file: string, value: unknown, mode = 0o644): void {
  fs.writeFileSync(file, JSON.stringify(value), { mode });
  fs.chmodSync(file, mode);
}

function readJson(file: string): { plugins: Array<Record<string, unknown>> } & Record<string, unknown> {
  return JSON.parse(fs.readFileSync(file, "utf8"));
}

async function until(condition: () => boolean, timeoutMs = 3000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (condition()) return true;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return condition();
}

test("runtime config is the first by name", (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, "99-loopback.conf"), "{}");
  fs.writeFileSync(path.join(dir, "10-calico.conflist"), "{}");
  fs.writeFileSync(path.join(dir, "05-notes.txt"), "{}");
  fs.mkdirSync(path.join(dir, "01-dir.conf"));
  t.is(findRuntimeConfig(dir), path.join(dir, "10-calico.conflist"));
  t.is(findRuntimeConfig(path.join(dir, "missing")), undefined);
});

test("conflist gets the entry last", (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-calico.conflist");
  writeJson(file, CALICO_CONFLIST, 0o600);
  t.deepEqual(chainInto(dir, SETTINGS), { outcome: "chained", file });
  const config = readJson(file);
  t.is(config.name, "k8s-pod-network");
  t.deepEqual(config.plugins.slice(0, 2), CALICO_CONFLIST.plugins);
  t.deepEqual(config.plugins[2], EXPECTED_ENTRY);
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  t.deepEqual(fs.readdirSync(dir), ["10-calico.conflist"]);
});

test("chaining twice is unchanged", (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-calico.conflist");
  writeJson(file, CALICO_CONFLIST);
  chainInto(dir, SETTINGS);
  const before = fs.readFileSync(file, "utf8");
  const inode = fs.statSync(file).ino;
  t.is(chainInto(dir, SETTINGS).outcome, "unchanged");
  t.is(fs.readFileSync(file, "utf8"), before);
  t.is(fs.statSync(file).ino, inode);
});

test("changed settings update in place", (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-calico.conflist");
  const withOldEntry = { ...CALICO_CONFLIST, plugins: [CALICO_CONFLIST.plugins[0], { ...EXPECTED_ENTRY, timeout_seconds: 5 }, CALICO_CONFLIST.plugins[1], { type: PLUGIN_TYPE }] };
  writeJson(file, withOldEntry);
  t.is(chainInto(dir, { ...SETTINGS, excludeNamespaces: ["kube-system", "istio-system"] }).outcome, "chained");
  const plugins = readJson(file).plugins;
  t.is(plugins.length, 3);
  t.deepEqual(plugins[1], { ...EXPECTED_ENTRY, exclude_namespaces: ["kube-system", "istio-system"] });
  t.is(plugins[2].type, "portmap");
});

test("single-plugin conf becomes a conflist", (t) => {
  const dir = tempDir(t);
  const conf = path.join(dir, "10-bridge.conf");
  writeJson(conf, BRIDGE_CONF, 0o640);
  const result = chainInto(dir, SETTINGS);
  const conflist = path.join(dir, "10-bridge.conflist");
  t.deepEqual(result, { outcome: "chained", file: conflist });
  t.false(fs.existsSync(conf));
  const config = readJson(conflist);
  t.is(config.cniVersion, "1.0.0");
  t.is(config.name, "bridge-net");
  t.deepEqual(config.plugins, [BRIDGE_CONF, EXPECTED_ENTRY]);
  t.is(fs.statSync(conflist).mode & 0o777, 0o640);
  t.is(chainInto(dir, SETTINGS).outcome, "unchanged");
});

test("json with plugins is a conflist", (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-net.json");
  writeJson(file, CALICO_CONFLIST);
  t.deepEqual(chainInto(dir, SETTINGS), { outcome: "chained", file });
  t.deepEqual(readJson(file).plugins[2], EXPECTED_ENTRY);
});

test("invalid JSON is left alone", (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-calico.conflist");
  fs.writeFileSync(file, '{"plugins": [');
  t.deepEqual(chainInto(dir, SETTINGS), { outcome: "invalid", file });
  t.is(fs.readFileSync(file, "utf8"), '{"plugins": [');
  writeJson(file, { name: "x", plugins: "calico" });
  t.is(chainInto(dir, SETTINGS).outcome, "invalid");
  t.deepEqual(readJson(file), { name: "x", plugins: "calico" });
});

test("empty folder has no config", (t) => {
  t.deepEqual(chainInto(tempDir(t), SETTINGS), { outcome: "no-config" });
});

test("unchain removes the entry", (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-calico.conflist");
  writeJson(file, CALICO_CONFLIST);
  chainInto(dir, SETTINGS);
  fs.writeFileSync(path.join(dir, "20-broken.conf"), "not json");
  t.deepEqual(unchain(dir), [file]);
  t.deepEqual(readJson(file).plugins, CALICO_CONFLIST.plugins);
  t.deepEqual(unchain(dir), []);
  t.is(fs.readFileSync(path.join(dir, "20-broken.conf"), "utf8"), "not json");
});

test("watch re-chains after an overwrite", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-calico.conflist");
  writeJson(file, CALICO_CONFLIST);
  const chain = CniChain.start({ ...SETTINGS, confDir: dir, pollIntervalMs: 60_000 }, silentLogger());
  t.teardown(() => chain.close());
  t.is(readJson(file).plugins.length, 3);

  // Another installer rewrites the file without the entry.
  writeJson(path.join(dir, ".calico.tmp"), CALICO_CONFLIST);
  fs.renameSync(path.join(dir, ".calico.tmp"), file);
  t.true(await until(() => readJson(file).plugins.length === 3), "the entry was not put back");
  t.deepEqual(readJson(file).plugins[2], EXPECTED_ENTRY);
});

test("watch chains a config written later", async (t) => {
  const dir = tempDir(t);
  const chain = CniChain.start({ ...SETTINGS, confDir: dir, pollIntervalMs: 60_000 }, silentLogger());
  t.teardown(() => chain.close());
  const conf = path.join(dir, "10-bridge.conf");
  writeJson(conf, BRIDGE_CONF);
  const conflist = path.join(dir, "10-bridge.conflist");
  t.true(await until(() => fs.existsSync(conflist) && !fs.existsSync(conf)), "the conf was not converted");
  t.deepEqual(readJson(conflist).plugins, [BRIDGE_CONF, EXPECTED_ENTRY]);
});

test("closed chain writes nothing", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "10-calico.conflist");
  writeJson(file, CALICO_CONFLIST);
  const chain = CniChain.start({ ...SETTINGS, confDir: dir, pollIntervalMs: 50 }, silentLogger());
  t.teardown(() => chain.close());
  t.is(readJson(file).plugins.length, 3);
  chain.close();
  writeJson(file, CALICO_CONFLIST);
  await new Promise((resolve) => setTimeout(resolve, 300));
  t.is(readJson(file).plugins.length, 2);
});

test("plugin binary installs when it differs", (t) => {
  const dir = tempDir(t);
  const source = path.join(dir, "built");
  const binDir = path.join(dir, "bin");
  fs.writeFileSync(source, "binary v1");
  t.true(installPluginBinary(source, binDir));
  const target = path.join(binDir, PLUGIN_TYPE);
  t.is(fs.readFileSync(target, "utf8"), "binary v1");
  t.is(fs.statSync(target).mode & 0o777, 0o755);
  t.false(installPluginBinary(source, binDir));
  fs.writeFileSync(source, "binary v2");
  t.true(installPluginBinary(source, binDir));
  t.is(fs.readFileSync(target, "utf8"), "binary v2");
  t.deepEqual(fs.readdirSync(binDir), [PLUGIN_TYPE]);
});

test("missing plugin binary fails clearly", (t) => {
  const dir = tempDir(t);
  const error = t.throws(() => installPluginBinary(path.join(dir, "none"), dir));
  t.is((error as { code?: string }).code, "CNI_SETUP_FAILED");
  t.regex(error?.message ?? "", /failed to read the CNI plugin binary .*none/);
});
