// `agentctl doctor --config FILE`: the options doctor takes from the agent's config file, read as
// `ambient-agent run` reads it, and the command-line options that replace them. Then the checks
// that --probe-snat adds: nftables whatever the capture mode, and the host network namespace.

import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { UsageError } from "../../agent/cli/admin-client";
import { cgroupV2Root } from "../../agent/cli/ambient-agent";
import { hostNetnsCheck, nftablesCheck, parseDoctorOptions } from "../../agent/cli/doctor";
import { useTempFolder } from "../harness/temp-files";

const temp = useTempFolder(test, "aadoctor-");
const configFile = (text: string): string => temp.configFile(text);

/** Writes a config file as the Helm chart does, with options that doctor does not use among the ones it does. */
function agentConfig(): string {
  const cgroup = path.join(temp.path, "cgroup");
  const pinRoot = path.join(temp.path, "pins", "worker-1");
  return configFile(
    [
      "kubernetes: true",
      "host-proc: /host/proc",
      `cgroup: ${cgroup}`,
      `pin-root: ${pinRoot}`,
      "bpf-object: /opt/ambient-agent/bpf/capture.bpf.o",
      "capture: nftables",
      "admin: 127.0.0.1:15099",
      "excluded-namespaces: [kube-system, ambient-agent]",
      "log-level: [info, cni=debug]",
      "transparent-source: true",
      "probe-snat: true",
      "",
    ].join("\n"),
  );
}

test("options come from the config file", async (t) => {
  const { options, format } = await parseDoctorOptions(["--config", agentConfig()]);
  t.is(options.cgroupPath, path.join(temp.path, "cgroup"));
  t.is(options.pinRoot, path.join(temp.path, "pins", "worker-1"));
  t.is(options.objectPath, "/opt/ambient-agent/bpf/capture.bpf.o");
  t.is(options.capture, "nftables");
  t.is(options.admin, "127.0.0.1:15099");
  t.true(options.probeSnat);
  t.is(options.hostNetns, "/host/proc/1/ns/net");
  t.is(format, "table");
});

test("command line replaces the file", async (t) => {
  const { options, format } = await parseDoctorOptions([
    "--config", agentConfig(),
    "--cgroup", "/elsewhere/cgroup",
    "--pin-root", "/elsewhere/pins",
    "--capture", "ebpf",
    "--admin", "127.0.0.1:15000",
    "--host-proc", "/elsewhere/proc",
    "-o", "json",
  ]);
  t.is(options.cgroupPath, "/elsewhere/cgroup");
  t.is(options.pinRoot, "/elsewhere/pins");
  t.is(options.capture, "ebpf");
  t.is(options.admin, "127.0.0.1:15000");
  t.is(options.objectPath, "/opt/ambient-agent/bpf/capture.bpf.o");
  t.is(options.hostNetns, "/elsewhere/proc/1/ns/net");
  t.is(format, "json");
});

test("host netns from file and flags", async (t) => {
  const file = configFile("host-proc: /host/proc\nhost-netns: /run/netns/host\nprobe-snat: true\n");
  t.is((await parseDoctorOptions(["--config", file])).options.hostNetns, "/run/netns/host");
  t.is((await parseDoctorOptions(["--config", file, "--host-netns", "/elsewhere/net"])).options.hostNetns, "/elsewhere/net");
  // A relative path is resolved, as the agent resolves it.
  t.is((await parseDoctorOptions(["--host-netns", "host-net"])).options.hostNetns, path.resolve("host-net"));
  const flag = await parseDoctorOptions(["--probe-snat", "--host-proc", "/host/proc"]);
  t.true(flag.options.probeSnat);
  t.is(flag.options.hostNetns, "/host/proc/1/ns/net");
});

test("node names the pin root", async (t) => {
  const file = configFile("kubernetes: true\ncapture: auto\n");
  const { options } = await parseDoctorOptions(["--config", file, "--node", "worker-1"]);
  t.is(options.pinRoot, "/sys/fs/bpf/ambient-agent/worker-1");
  const fromFile = await parseDoctorOptions(["--config", configFile("node: worker-2\n")]);
  t.is(fromFile.options.pinRoot, "/sys/fs/bpf/ambient-agent/worker-2");
  // The agent's own rule: --pin-root wins over the default of --node.
  const both = await parseDoctorOptions(["--node", "worker-1", "--pin-root", "/elsewhere/pins"]);
  t.is(both.options.pinRoot, "/elsewhere/pins");
});

test("defaults without a config file", async (t) => {
  const { options } = await parseDoctorOptions([]);
  t.is(options.capture, "auto");
  t.is(options.admin, "127.0.0.1:15000");
  t.is(options.pinRoot, `/sys/fs/bpf/ambient-agent/${os.hostname().toLowerCase()}`);
  t.is(options.cgroupPath, cgroupV2Root("/sys/fs/cgroup"));
  t.false(options.probeSnat);
  t.is(options.hostNetns, "/proc/1/ns/net");
});

test("bad config file is a usage error", async (t) => {
  const cases: [string, RegExp][] = [
    [path.join(temp.path, "missing.yaml"), /cannot read the config file .*missing\.yaml/],
    [configFile("cgroupp: /sys/fs/cgroup\n"), /unknown key "cgroupp" in the config file/],
    [configFile("capture: [ebpf, nftables]\n"), /invalid value of "capture" in the config file .*: a list/],
    [configFile("capture: iptables\n"), /invalid --capture "iptables"/],
  ];
  for (const [file, message] of cases) {
    const error = await t.throwsAsync(parseDoctorOptions(["--config", file]), { instanceOf: UsageError });
    t.regex(error?.message ?? "", message, file);
  }
});

test("invalid node is a usage error", async (t) => {
  const error = await t.throwsAsync(parseDoctorOptions(["--node", "Worker_1"]), { instanceOf: UsageError });
  t.regex(error?.message ?? "", /invalid --node "Worker_1": use a Kubernetes node name/);
});

const NFT_MISSING = "nft is not installed or not on PATH (spawnSync nft ENOENT): install the nftables package (libnftables1 or nft), or run with --capture ebpf";

test("nftables check with probe-snat", (t) => {
  for (const capture of ["ebpf", "nftables", "auto"] as const) {
    const check = nftablesCheck(capture, [NFT_MISSING], true, true);
    t.is(check.result, "FAIL", capture);
    t.true(check.message.startsWith(NFT_MISSING), check.message);
    t.regex(check.message, /--probe-snat writes its table with nftables whatever the capture mode$/);
  }
  t.regex(nftablesCheck("ebpf", [], true, true).message, /available for nftables capture and for --probe-snat$/);
  t.is(nftablesCheck("ebpf", [], true, true).result, "PASS");
});

test("nftables check without probe-snat", (t) => {
  t.is(nftablesCheck("ebpf", [NFT_MISSING], true, false).result, "WARN");
  t.is(nftablesCheck("auto", [NFT_MISSING], true, false).result, "WARN");
  t.is(nftablesCheck("auto", [NFT_MISSING], false, false).result, "FAIL");
  t.is(nftablesCheck("nftables", [NFT_MISSING], true, false).result, "FAIL");
  t.false(nftablesCheck("ebpf", [], true, false).message.includes("probe-snat"));
});

test("host netns check", (t) => {
  const missing = path.join(temp.path, "no-such-netns");
  const unopened = hostNetnsCheck(missing, () => t.fail("listed the tables of a namespace that did not open"));
  t.is(unopened.result, "FAIL");
  t.true(unopened.message.startsWith(`cannot open the host network namespace ${missing}, where --probe-snat writes its table (ENOENT`), unopened.message);
  t.regex(unopened.message, /pass --host-netns with the host's network namespace, or --host-proc with the host's \/proc \(in the Helm chart, hostPaths\.proc\)$/);

  const file = configFile("");
  const unlisted = hostNetnsCheck(file, () => {
    throw new Error(`listing the nftables tables in network namespace ${file} failed: setns into network namespace ${file}: Invalid argument (EINVAL).`);
  });
  t.is(unlisted.result, "FAIL");
  t.true(unlisted.message.startsWith(`listing the nftables tables in network namespace ${file} failed: setns into network namespace ${file}: Invalid argument (EINVAL); --probe-snat writes its table there: `), unlisted.message);

  const present = hostNetnsCheck(file, () => true);
  t.deepEqual(present, { result: "PASS", message: `nftables reads the host network namespace ${file}, which has the table inet ambient_agent_probes` });
  t.is(hostNetnsCheck(file, () => false).message, `nftables reads the host network namespace ${file}, which does not have the table inet ambient_agent_probes`);
});
