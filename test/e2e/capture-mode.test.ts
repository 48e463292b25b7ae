// Capture modes on the real kernel: the feature probe's report, and one node whose agent runs
// with --capture nftables, checked through its admin API, the pods' nftables tables and a client.

import test from "ava";
import fs from "node:fs";
import { startHttpServer, curl } from "../harness/clients";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { nftBinary } from "../../agent/capture/nft/capture";
import { NATIVE_FEATURES, probeCaptureFeatures } from "../../agent/capture/probe";

const PREFIX_FAMILY = "aanft";
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CGROUP_ROOT = "/sys/fs/cgroup/unified";

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created. Fix the first failure above and rerun.");
  return cluster;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: [
      {
        name: "nft1",
        pods: [
          { name: "client", namespace: "mesh", serviceAccount: "client" },
          { name: "server", namespace: "mesh", serviceAccount: "server" },
        ],
      },
    ],
    namespaces: [{ name: "mesh", ambient: true }],
    agentArgs: ["--capture", "nftables"],
  });
  const site = `${cluster.workDir}/site`;
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(`${site}/index.html`, "served\n");
  await startHttpServer(cluster.topology, "server", site, 8080);
  await cluster.startAgents(["client", "server"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("probe reports every eBPF feature", (t) => {
  const features = probeCaptureFeatures({ pinRoot: `/sys/fs/bpf/ambient-agent/${PREFIX}-probe`, cgroupPath: CGROUP_ROOT, objectPath: "bpf/capture.bpf.o" });
  const names = features.map((probe) => probe.feature);
  t.deepEqual(names, ["bpffs", "cgroup2", "object", ...NATIVE_FEATURES]);
  for (const probe of features) {
    if (probe.ok) t.is(probe.error, undefined, `${probe.feature} works but carries an error`);
    else t.true((probe.error ?? "").length > 0, `${probe.feature} failed without a message`);
  }
  t.true(features.find((probe) => probe.feature === "map:lru_hash")?.ok, "this kernel has LRU hash maps");
  t.deepEqual(probeCgroupsOf(process.pid), [], "the probe left its cgroup behind");
  t.false(fs.existsSync(`/sys/fs/bpf/ambient-agent/${PREFIX}-probe`), "the probe created the pin root");
});

test.serial("probe removes probe cgroups older than ten minutes and keeps newer ones", (t) => {
  // Age decides, not the pid in the name: agents in containers see other pid namespaces.
  const stale = `${CGROUP_ROOT}/aa-probe-1-${PREFIX}old`;
  const recent = `${CGROUP_ROOT}/aa-probe-1-${PREFIX}new`;
  fs.mkdirSync(stale);
  fs.mkdirSync(recent);
  try {
    const elevenMinutesAgo = new Date(Date.now() - 11 * 60_000);
    fs.utimesSync(stale, elevenMinutesAgo, elevenMinutesAgo);
    probeCaptureFeatures({ pinRoot: "/sys/fs/bpf", cgroupPath: CGROUP_ROOT, objectPath: "bpf/capture.bpf.o" });
    t.false(fs.existsSync(stale), "a probe cgroup left eleven minutes ago is still there");
    t.true(fs.existsSync(recent), "a probe cgroup made just now was removed, although its agent may still be probing");
  } finally {
    for (const dir of [stale, recent]) if (fs.existsSync(dir)) fs.rmdirSync(dir);
  }
});

/** Probe cgroups named after `pid` (aa-probe-PID-RANDOM) under the cgroup root. */
function probeCgroupsOf(pid: number): string[] {
  return fs.readdirSync(CGROUP_ROOT).filter((name) => name.startsWith(`aa-probe-${pid}-`));
}

test.serial("probe names a missing object", (t) => {
  const features = probeCaptureFeatures({ pinRoot: "/sys/fs/bpf", cgroupPath: CGROUP_ROOT, objectPath: "/nonexistent/capture.bpf.o" });
  t.deepEqual(features.find((probe) => probe.feature === "object"), { feature: "object", ok: false, error: "eBPF object /nonexistent/capture.bpf.o not found" });
  t.regex(features.find((probe) => probe.feature === "sk_lookup")?.error ?? "", /^not probed: eBPF object/);
});

test.serial("admin API reports nftables capture", async (t) => {
  const c = theCluster();
  const dump = JSON.parse(c.topology.exec(c.topology.node("nft1").netns, "curl", ["-sS", "--max-time", "5", "http://127.0.0.1:15000/config_dump"]));
  t.is(dump.captureMode.mode, "nftables");
  t.is(dump.captureMode.requested, "nftables");
  t.is(dump.captureMode.reason, "requested with --capture nftables");
  t.deepEqual(dump.captureMode.features, []);
  const logged = c.agent("nft1").lines.find((line) => line.msg === "capture mode nftables: requested with --capture nftables");
  t.truthy(logged, "the chosen mode was not logged at start");
});

test.serial("enrolled pod has its nftables table", (t) => {
  const c = theCluster();
  const ruleset = c.topology.exec(c.topology.pod("client").netns, nftBinary(), ["list", "table", "inet", "ambient_agent"]);
  t.regex(ruleset, /redirect to :15001/);
  t.regex(ruleset, /redirect to :15006/);
});

test.serial("application sees the address it dialled", async (t) => {
  const c = theCluster();
  const server = c.topology.pod("server");
  // getpeername() on the application's socket: conntrack reverses the REDIRECT to 15001.
  const script = `import socket; s=socket.create_connection(("${server.ip}", 8080), timeout=5); print("%s:%d" % s.getpeername()); s.close()`;
  const peer = c.topology.exec(c.topology.pod("client").netns, "python3", ["-c", script]).trim();
  t.is(peer, `${server.ip}:8080`);
  const record = await c.waitForAudit("nft1", (entry) => entry.direction === "outbound" && entry.src.workload === "client");
  t.is(record.dst.addr, `${server.ip}:8080`);
  t.is(record.transport, "hbone");
});

test.serial("pods stay captured while the agent is down", async (t) => {
  const c = theCluster();
  const url = `http://${c.topology.pod("server").ip}:8080/index.html`;
  const served = await curl(c.topology, "client", url);
  t.is(served.exitCode, 0, served.stderr);
  await c.agent("nft1").stop();
  const refused = await curl(c.topology, "client", url, 3);
  t.is(refused.exitCode, 7, `an enrolled pod's connection was not refused while its agent was down: ${refused.stderr}`);
  const ruleset = c.topology.exec(c.topology.pod("server").netns, nftBinary(), ["list", "tables"]);
  t.regex(ruleset, /table inet ambient_agent/, "the table was removed when the agent stopped");
});
