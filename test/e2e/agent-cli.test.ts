// The agent's start-up errors: each missing piece of the host or the configuration gets one
// message that names it and the fix, and the agent exits with status 1 before touching the kernel.

import test from "ava";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { AGENT_BIN, AGENTCTL_BIN } from "../harness/agent-process";
import { assertHostCapable } from "../harness/cluster";

let workDir = "";

test.before(() => {
  assertHostCapable();
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), "aacli-"));
  fs.mkdirSync(path.join(workDir, "manifests"));
  const init = spawnSync(process.execPath, [AGENTCTL_BIN, "ca", "init", "--dir", path.join(workDir, "ca")], { encoding: "utf8" });
  if (init.status !== 0) throw new Error(`agentctl ca init failed: ${init.stderr}`);
});

test.after.always(() => {
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
});

/** Runs `ambient-agent run` with the given options (plus defaults) and returns its exit status and stderr. */
function runAgent(extra: Record<string, string>, prefix: string[] = []): { status: number | null; stderr: string } {
  const options: Record<string, string> = {
    node: "cli-node",
    manifests: path.join(workDir, "manifests"),
    "ca-dir": path.join(workDir, "ca"),
    "audit-file": path.join(workDir, "audit.jsonl"),
    "audit-spool": path.join(workDir, "spool"),
    "pin-root": "/sys/fs/bpf/ambient-agent/aacli-node",
    admin: "127.0.0.1:0",
    ...extra,
  };
  const args = ["run", ...Object.entries(options).flatMap(([name, value]) => [`--${name}`, value])];
  const command = prefix.length > 0 ? prefix[0] : process.execPath;
  const commandArgs = prefix.length > 0 ? [...prefix.slice(1), process.execPath, AGENT_BIN, ...args] : [AGENT_BIN, ...args];
  const result = spawnSync(command, commandArgs, { encoding: "utf8", timeout: 20_000 });
  return { status: result.status, stderr: result.stderr };
}

test.serial("agent without bpffs names the mount", (t) => {
  const result = runAgent({ "pin-root": path.join(workDir, "not-bpffs", "pins") });
  t.is(result.status, 1);
  t.regex(result.stderr, /no bpffs/);
  t.regex(result.stderr, /mount -t bpf/);
  t.false(fs.existsSync("/sys/fs/bpf/ambient-agent/aacli-node"));
});

test.serial("agent without cgroup v2 names the path", (t) => {
  const result = runAgent({ cgroup: workDir });
  t.is(result.status, 1);
  t.regex(result.stderr, /not a cgroup v2 directory/);
  t.true(result.stderr.includes(workDir));
});

test.serial("agent as non-root says to run as root", (t) => {
  const result = runAgent({}, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]);
  t.is(result.status, 1);
  t.regex(result.stderr, /not root/);
});

test.serial("agent without a CA names agentctl ca init", (t) => {
  const result = runAgent({ "ca-dir": path.join(workDir, "no-such-ca") });
  t.is(result.status, 1);
  t.regex(result.stderr, /agentctl ca init --dir/);
  t.false(fs.existsSync("/sys/fs/bpf/ambient-agent/aacli-node"), "capture was attached before the configuration was checked");
});

test.serial("agent with missing options prints usage", (t) => {
  const result = spawnSync(process.execPath, [AGENT_BIN, "run", "--node", "n1"], { encoding: "utf8" });
  t.is(result.status, 2);
  t.regex(result.stderr, /missing required options: --manifests, --ca-dir or --ca-address/);
  t.regex(result.stderr, /usage: ambient-agent run/);
});

test.serial("ca init refuses to overwrite a CA", (t) => {
  const result = spawnSync(process.execPath, [AGENTCTL_BIN, "ca", "init", "--dir", path.join(workDir, "ca")], { encoding: "utf8" });
  t.is(result.status, 1);
  t.regex(result.stderr, /already/);
  t.regex(result.stderr, /--force/);
});
