// The agent's start-up errors: each missing piece of the host or the configuration gets one
// message that names it and the fix, and the agent exits with status 1 before touching the kernel.

import test from "ava";
import { spawn, spawnSync } from "node:child_process";
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
    metrics: "127.0.0.1:0",
    readiness: "127.0.0.1:0",
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
  t.regex(result.stderr, /hostPaths\.cgroup/);
  t.regex(result.stderr, /cgroup v1 only, run with --capture nftables/);
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
  t.regex(result.stderr, /missing required options: --manifests or --kubernetes, --ca-dir or --ca-address/);
  t.regex(result.stderr, /usage: ambient-agent run/);
});

/** Runs `ambient-agent run` with exactly these arguments after `run`. */
function runAgentArgs(args: string[], env: NodeJS.ProcessEnv = process.env): { status: number | null; stderr: string } {
  const result = spawnSync(process.execPath, [AGENT_BIN, "run", ...args], { encoding: "utf8", timeout: 20_000, env });
  return { status: result.status, stderr: result.stderr };
}

test.serial("configuration source and CNI options are checked before anything starts", (t) => {
  const base = ["--node", "n1", "--ca-dir", path.join(workDir, "ca"), "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0"];
  const both = runAgentArgs([...base, "--manifests", workDir, "--kubernetes"]);
  t.is(both.status, 2);
  t.regex(both.stderr, /--manifests and --kubernetes \(or --kubeconfig\) both name where the configuration comes from/);
  const badNamespace = runAgentArgs([...base, "--manifests", workDir, "--excluded-namespaces", "kube-system,Bad_NS"]);
  t.is(badNamespace.status, 2);
  t.regex(badNamespace.stderr, /invalid namespace "Bad_NS" in --excluded-namespaces/);
  const many = Array.from({ length: 257 }, (_, index) => `ns${index}`).join(",");
  const tooMany = runAgentArgs([...base, "--manifests", workDir, "--excluded-namespaces", many]);
  t.is(tooMany.status, 2);
  t.regex(tooMany.stderr, /--excluded-namespaces lists 257 namespaces; at most 256 are allowed/);
  const lonelyTimeout = runAgentArgs([...base, "--manifests", workDir, "--cni-timeout", "5"]);
  t.is(lonelyTimeout.status, 2);
  t.regex(lonelyTimeout.stderr, /--cni-timeout needs --cni-conf-dir/);
  const badTimeout = runAgentArgs([...base, "--manifests", workDir, "--cni-conf-dir", workDir, "--cni-timeout", "0.5"]);
  t.is(badTimeout.status, 2);
  t.regex(badTimeout.stderr, /invalid --cni-timeout "0.5": give whole seconds from 1 to 600/);
});

test.serial("agent in Kubernetes mode without credentials says what to pass", (t) => {
  const env = { ...process.env };
  delete env.KUBERNETES_SERVICE_HOST;
  delete env.KUBERNETES_SERVICE_PORT;
  const common = {
    "ca-dir": path.join(workDir, "ca"),
    "audit-file": path.join(workDir, "audit.jsonl"),
    "audit-spool": path.join(workDir, "spool"),
    "pin-root": "/sys/fs/bpf/ambient-agent/aacli-node",
    admin: "127.0.0.1:0",
    metrics: "127.0.0.1:0",
    readiness: "127.0.0.1:0",
  };
  const flags = Object.entries(common).flatMap(([name, value]) => [`--${name}`, value]);
  const inCluster = runAgentArgs(["--node", "cli-node", "--kubernetes", ...flags], env);
  t.is(inCluster.status, 1);
  t.regex(inCluster.stderr, /KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set; run the agent in a pod or pass --kubeconfig FILE/);
  const missing = path.join(workDir, "no-such-kubeconfig");
  const noFile = runAgentArgs(["--node", "cli-node", "--kubeconfig", missing, ...flags], env);
  t.is(noFile.status, 1);
  t.true(noFile.stderr.includes(`cannot read the kubeconfig ${missing}`), noFile.stderr);
  t.false(fs.existsSync("/sys/fs/bpf/ambient-agent/aacli-node"), "capture was attached before the configuration source was checked");
});

test.serial("agent waits for an unreachable API server and reports it", async (t) => {
  // Port 1 on loopback: nothing listens, so every list is refused.
  const kubeconfig = path.join(workDir, "kubeconfig-unreachable");
  fs.writeFileSync(
    kubeconfig,
    "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n",
  );
  const admin = `127.0.0.1:${20_000 + (process.pid % 10_000)}`;
  const args = [
    AGENT_BIN, "run", "--node", "cli-node", "--kubeconfig", kubeconfig, "--ca-dir", path.join(workDir, "ca"),
    "--audit-file", path.join(workDir, "audit-wait.jsonl"), "--audit-spool", path.join(workDir, "spool-wait"),
    "--pin-root", "/sys/fs/bpf/ambient-agent/aacli-node", "--admin", admin, "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0",
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
  const outcome = await Promise.race([exited.then((code) => `exited with ${code}`), new Promise<string>((resolve) => setTimeout(() => resolve("running"), 3_000))]);
  t.is(outcome, "running", stderr.slice(-2_000));
  const ready = spawnSync("curl", ["-sS", "--max-time", "5", "-w", "\n%{http_code}", `http://${admin}/healthz/ready`], { encoding: "utf8" });
  const [body, status] = [ready.stdout.slice(0, ready.stdout.lastIndexOf("\n")), ready.stdout.slice(ready.stdout.lastIndexOf("\n") + 1)];
  t.is(status, "503", ready.stdout + ready.stderr);
  const readiness = JSON.parse(body) as { ready: boolean; checks: { configuration: boolean }; kubernetes: { synced: boolean; resources: { lastError?: string }[] } };
  t.false(readiness.ready);
  t.false(readiness.checks.configuration);
  t.false(readiness.kubernetes.synced);
  t.true(readiness.kubernetes.resources.every((resource) => resource.lastError !== undefined));
  t.false(fs.existsSync("/sys/fs/bpf/ambient-agent/aacli-node"), "capture was attached before the configuration was read");
  // A stop signal during the wait stops the agent cleanly.
  child.kill("SIGTERM");
  const code = await Promise.race([exited, new Promise<string>((resolve) => setTimeout(() => resolve("still running"), 10_000))]);
  t.is(code, 0, stderr.slice(-2_000));
  t.regex(stderr, /signal received while starting, stopping/);
  const records = fs.readFileSync(path.join(workDir, "audit-wait.jsonl"), "utf8").trim().split("\n").map((line) => JSON.parse(line) as { type: string; reason?: string });
  t.is(records.at(-1)?.type, "agent.stopped");
});

test.serial("agent stopped at its first log line exits cleanly", async (t) => {
  const kubeconfig = path.join(workDir, "kubeconfig-early");
  fs.writeFileSync(
    kubeconfig,
    "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n",
  );
  const args = [
    AGENT_BIN, "run", "--node", "cli-node", "--kubeconfig", kubeconfig, "--ca-dir", path.join(workDir, "ca"),
    "--audit-file", path.join(workDir, "audit-early.jsonl"), "--audit-spool", path.join(workDir, "spool-early"),
    "--pin-root", "/sys/fs/bpf/ambient-agent/aacli-node", "--admin", `127.0.0.1:${21_000 + (process.pid % 9_000)}`,
    "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0",
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "ignore", "pipe"] });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
  let stderr = "";
  let signalled = false;
  child.stderr!.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
    if (!signalled) {
      signalled = true;
      child.kill("SIGTERM");
    }
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  const code = await Promise.race([exited, new Promise<string>((resolve) => setTimeout(() => resolve("still running"), 10_000))]);
  t.is(code, 0, stderr.slice(-2_000));
  t.false(fs.existsSync("/sys/fs/bpf/ambient-agent/aacli-node"), "capture was attached after the stop");
});

test.serial("ca init refuses to overwrite a CA", (t) => {
  const result = spawnSync(process.execPath, [AGENTCTL_BIN, "ca", "init", "--dir", path.join(workDir, "ca")], { encoding: "utf8" });
  t.is(result.status, 1);
  t.regex(result.stderr, /already/);
  t.regex(result.stderr, /--force/);
});
