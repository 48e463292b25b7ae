// End to end on the real kernel: a client pod dials Service VIPs, and its node's agent sends each
// connection to one of the Service's ready endpoints on the other node.

import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { curl, curlWasReset, startHttpServer } from "../harness/clients";
import { NFTABLES_CAPTURE, testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import { podsYaml, serviceYaml, writeManifest } from "../harness/manifests";
import { listNetns, POD_NETWORK, type NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aasvc");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "svc-n1";
const SERVER_NODE = "svc-n2";
const ENDPOINTS = ["api-a", "api-b", "api-c"];

// VIPs lie outside the harness's pod ranges (10.244.N.0/24) and node link (10.200.0.0/30).
const API_VIP = "10.96.77.10";
const EMPTY_VIP = "10.96.77.11";
const PLAIN_VIP = "10.96.77.12";

const NODES: NodeSpec[] = [
  { name: CLIENT_NODE, pods: [{ name: "client", namespace: "shop", serviceAccount: "client" }] },
  {
    name: SERVER_NODE,
    pods: [
      ...ENDPOINTS.map((name) => ({ name, namespace: "shop", serviceAccount: "api", labels: { app: "api" }, namedPorts: { http: 8080 } })),
      { name: "plain", namespace: "outside", serviceAccount: "default", namedPorts: { http: 8080 } },
    ],
  },
];

const SERVICES = [
  serviceYaml({ name: "api", namespace: "shop", vip: API_VIP, selector: { app: "api" }, ports: [{ port: 80, targetPort: "http" }] }),
  serviceYaml({ name: "empty", namespace: "shop", vip: EMPTY_VIP, selector: { app: "nothing" }, ports: [{ port: 80, targetPort: "http" }] }),
  serviceYaml({ name: "plain", namespace: "outside", vip: PLAIN_VIP, selector: { app: "plain" }, ports: [{ port: 80, targetPort: "http" }] }),
].join("---\n");

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = Cluster.create({
    prefix: PREFIX,
    nodes: NODES,
    namespaces: [
      { name: "shop", ambient: true },
      { name: "outside", ambient: false },
    ],
    extraManifests: { "services.yaml": SERVICES },
  });
  for (const name of [...ENDPOINTS, "plain"]) {
    const site = path.join(cluster.workDir, `site-${name}`);
    fs.mkdirSync(site, { recursive: true });
    fs.writeFileSync(path.join(site, "index.html"), `${name}\n`);
    await startHttpServer(cluster.topology, name, site, 8080);
  }
  await cluster.startAgents(["client", ...ENDPOINTS]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

/** Curls `url` from the client pod `count` times in a row and returns how often each body came back. */
async function countAnswers(url: string, count: number): Promise<Map<string, number>> {
  const answers = new Map<string, number>();
  for (let i = 0; i < count; i++) {
    const result = await curl(theCluster().topology, "client", url);
    if (result.exitCode !== 0) throw new Error(`request ${i + 1} to ${url} failed with curl exit code ${result.exitCode}: ${result.stderr}`);
    const body = result.body.toString().trim();
    answers.set(body, (answers.get(body) ?? 0) + 1);
  }
  return answers;
}

/** Waits until the client node's agent has written at least `count` outbound records that match `predicate`. */
async function outboundRecords(predicate: (record: Record<string, any>) => boolean, count: number): Promise<Record<string, any>[]> {
  return nodeRecords(CLIENT_NODE, (record) => record.direction === "outbound" && predicate(record), count);
}

/** Waits up to 10 s until `count` completion records of `node` match, because the agent writes them a few milliseconds after the connection ends. */
async function nodeRecords(node: string, predicate: (record: Record<string, any>) => boolean, count: number): Promise<Record<string, any>[]> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const records = theCluster().auditRecords(node).filter(predicate);
    if (records.length >= count || Date.now() > deadline) return records;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function sorted(answers: Map<string, number>): [string, number][] {
  return [...answers].sort(([a], [b]) => (a < b ? -1 : 1));
}

test.serial("VIP connections spread evenly over endpoints", async (t) => {
  const c = theCluster();
  const rounds = 4;
  const answers = await countAnswers(`http://${API_VIP}/`, rounds * ENDPOINTS.length);
  t.deepEqual(sorted(answers), ENDPOINTS.map((name) => [name, rounds]));

  const records = await outboundRecords((record) => record.dst.service === "shop/api", rounds * ENDPOINTS.length);
  t.is(records.length, rounds * ENDPOINTS.length);
  const byAddress = new Map<string, number>();
  for (const record of records) {
    t.is(record.decision, "allow");
    t.is(record.transport, "hbone");
    t.is(record.dst.identity, "spiffe://cluster.local/ns/shop/sa/api");
    t.is(record.dst.addr, `${c.topology.pod(record.dst.workload).ip}:8080`, `record ${record.connection_id} names another address than its workload's`);
    byAddress.set(record.dst.addr, (byAddress.get(record.dst.addr) ?? 0) + 1);
  }
  t.deepEqual(
    [...byAddress].sort(([a], [b]) => (a < b ? -1 : 1)),
    ENDPOINTS.map((name) => [`${c.topology.pod(name).ip}:8080`, rounds]),
  );
  const fromClient = (record: Record<string, any>): boolean => record.direction === "inbound" && String(record.src.addr).startsWith(`${c.topology.pod("client").ip}:`);
  const inbound = await nodeRecords(SERVER_NODE, fromClient, rounds * ENDPOINTS.length);
  t.is(inbound.length, rounds * ENDPOINTS.length);
});

test.serial("Service without endpoint resets at once", async (t) => {
  const started = Date.now();
  const result = await curl(theCluster().topology, "client", `http://${EMPTY_VIP}/`);
  const elapsed = Date.now() - started;
  // The agent resets the connection right after accepting it.
  t.true(curlWasReset(result), `expected a reset: curl exit code ${result.exitCode} ${result.stderr}`);
  // Far below the 10 s an upstream connect may take: the refusal does not wait for anything.
  t.true(elapsed < 5_000, `the refusal took ${elapsed} ms`);

  const [record] = await outboundRecords((entry) => entry.dst.service === "shop/empty", 1);
  t.truthy(record, "no audit record for the connection to the empty Service");
  t.is(record.decision, "deny");
  t.is(record.reason, "no_healthy_endpoint");
  t.is(record.dst.addr, `${EMPTY_VIP}:80`);
  t.is(record.error?.code, "NO_HEALTHY_ENDPOINT");
  t.regex(record.error?.message ?? "", /^Service shop\/empty port 80 has no ready endpoint: no pod matches its selector app=nothing/);
});

test.serial("port the Service lacks is refused", async (t) => {
  const result = await curl(theCluster().topology, "client", `http://${API_VIP}:81/`);
  t.true(curlWasReset(result), `expected a reset: curl exit code ${result.exitCode} ${result.stderr}`);
  const [record] = await outboundRecords((entry) => entry.reason === "no_service_port", 1);
  t.truthy(record, "no audit record with reason no_service_port");
  t.is(record.dst.service, "shop/api");
  t.is(record.dst.addr, `${API_VIP}:81`);
  t.regex(record.error?.message ?? "", /Service shop\/api has no TCP port 81: it exposes TCP 80/);
});

test.serial("VIP of pods outside the mesh passes through", async (t) => {
  const c = theCluster();
  const answers = await countAnswers(`http://${PLAIN_VIP}/`, 2);
  t.deepEqual(sorted(answers), [["plain", 2]]);
  const records = await outboundRecords((entry) => entry.dst.service === "outside/plain", 2);
  t.is(records.length, 2);
  for (const record of records) {
    t.is(record.transport, "plaintext");
    t.is(record.dst.addr, `${c.topology.pod("plain").ip}:8080`);
    t.is(record.dst.workload, "plain");
  }
});

/**
 * Replaces the client pod's default route with a route to the pod network only, runs `check`,
 * and puts the default route back.
 */
async function withoutDefaultRoute(check: () => Promise<void>): Promise<void> {
  const c = theCluster();
  const client = c.topology.pod("client");
  const gateway = c.topology.exec(client.netns, "ip", ["-4", "route", "show", "default"]).match(/via (\S+)/)?.[1];
  if (gateway === undefined) throw new Error(`the client pod has no default route to replace`);
  c.topology.exec(client.netns, "ip", ["route", "del", "default"]);
  try {
    c.topology.exec(client.netns, "ip", ["route", "add", `${POD_NETWORK}.0.0/16`, "via", gateway]);
    await check();
  } finally {
    c.topology.exec(client.netns, "ip", ["route", "del", `${POD_NETWORK}.0.0/16`], { allowFail: true });
    c.topology.exec(client.netns, "ip", ["route", "add", "default", "via", gateway]);
  }
}

if (NFTABLES_CAPTURE) {
  // nftables REDIRECT runs after the kernel's route lookup, so a pod without a route to the VIP
  // fails at connect() before capture gets the connection. Nothing leaves the pod uncaptured.
  test.serial("VIP without a route fails in the pod", async (t) => {
    const c = theCluster();
    const client = c.topology.pod("client");
    const serverRecordsBefore = c.auditRecords(SERVER_NODE).length;
    await withoutDefaultRoute(async () => {
      const lookup = c.topology.exec(client.netns, "ip", ["route", "get", API_VIP], { allowFail: true });
      t.is(lookup, "", `the pod still has a route to ${API_VIP}: ${lookup}`);
      const unrouted = await curl(c.topology, "client", `http://${API_VIP}/`);
      t.is(unrouted.exitCode, 7, unrouted.stderr);
      const connect = `import errno, socket\ntry:\n    socket.create_connection(("${API_VIP}", 80), timeout=5)\n    print("connected")\nexcept OSError as error:\n    print(errno.errorcode.get(error.errno, str(error)))`;
      t.is(c.topology.exec(client.netns, "python3", ["-c", connect]).trim(), "ENETUNREACH");
    });
    const unroutedRecords = await outboundRecords((entry) => entry.dst.addr === `${API_VIP}:80` && entry.dst.service === undefined, 0);
    t.deepEqual(unroutedRecords, [], "the unrouted connection reached the agent");
    t.is(c.auditRecords(SERVER_NODE).length, serverRecordsBefore, "the unrouted connection reached an endpoint's agent");

    // With the default route back, the same VIP is captured and tunnelled.
    const routedBefore = (await outboundRecords((entry) => entry.dst.service === "shop/api", 0)).length;
    const answers = await countAnswers(`http://${API_VIP}/`, 1);
    t.is([...answers.values()].reduce((sum, count) => sum + count, 0), 1);
    const routed = await outboundRecords((entry) => entry.dst.service === "shop/api", routedBefore + 1);
    t.is(routed.length, routedBefore + 1);
    t.is(routed.at(-1)?.transport, "hbone");
  });
} else {
  test.serial("VIP needs no route in the pod", async (t) => {
    // eBPF capture rewrites the destination in connect() before the kernel looks up a route, so a
    // pod whose routes cover only the pod network still reaches a VIP.
    const c = theCluster();
    await withoutDefaultRoute(async () => {
      const lookup = c.topology.exec(c.topology.pod("client").netns, "ip", ["route", "get", API_VIP], { allowFail: true });
      t.is(lookup, "", `the pod still has a route to ${API_VIP}: ${lookup}`);
      const answers = await countAnswers(`http://${API_VIP}/`, ENDPOINTS.length);
      t.deepEqual(sorted(answers), ENDPOINTS.map((name) => [name, 1]));
    });
  });
}

test.serial("Service cannot take over a pod's IP", async (t) => {
  const c = theCluster();
  const agent = c.agent(CLIENT_NODE);
  const victim = c.topology.pod("api-a");
  const mark = agent.lines.length;
  // A Service of another namespace claims api-a's IP as its cluster IP and selects the plain pod.
  const hijack = serviceYaml({ name: "hijack", namespace: "outside", vip: victim.ip, selector: { app: "plain" }, ports: [{ port: 8080, targetPort: 8080 }] });
  writeManifest(c.manifestsDir, "hijack.yaml", hijack);
  try {
    const warning = await agent.waitForLog((line) => line.service === "outside/hijack" && line.vip === victim.ip, 10_000, "the cluster IP warning", mark);
    t.regex(String(warning.msg), /is the IP of pod shop\/api-a; the Service is not routed at that address/);
    const answers = await countAnswers(`http://${victim.ip}:8080/`, 2);
    t.deepEqual(sorted(answers), [["api-a", 2]]);
    // Earlier tests reached api-a through the api Service; these two records are the ones without a Service.
    const records = await outboundRecords((entry) => entry.dst.addr === `${victim.ip}:8080` && entry.dst.service === undefined, 2);
    t.is(records.length, 2);
    for (const record of records) t.is(record.transport, "hbone");
    const hijacked = await outboundRecords((entry) => entry.dst.service === "outside/hijack", 0);
    t.deepEqual(hijacked, []);
  } finally {
    fs.rmSync(path.join(c.manifestsDir, "hijack.yaml"), { force: true });
  }
});

test.serial("Service cannot take another Service's cluster IP", async (t) => {
  const c = theCluster();
  const agent = c.agent(CLIENT_NODE);
  const mark = agent.lines.length;
  // "aaa" sorts before "shop": without the rule, the newcomer would win the address by name.
  const duplicate = serviceYaml({ name: "dup", namespace: "aaa", vip: API_VIP, selector: { app: "plain" }, ports: [{ port: 80, targetPort: "http" }] });
  writeManifest(c.manifestsDir, "duplicate.yaml", duplicate);
  try {
    const warning = await agent.waitForLog((line) => line.service === "aaa/dup" && line.vip === API_VIP, 10_000, "the duplicate cluster IP warning", mark);
    t.regex(String(warning.msg), /which Service shop\/api already uses; shop\/api keeps it/);
    const answers = await countAnswers(`http://${API_VIP}/`, ENDPOINTS.length);
    t.deepEqual(sorted(answers), ENDPOINTS.map((name) => [name, 1]));
  } finally {
    fs.rmSync(path.join(c.manifestsDir, "duplicate.yaml"), { force: true });
  }
});

test.serial("unready pod leaves the rotation", async (t) => {
  const c = theCluster();
  const agent = c.agent(CLIENT_NODE);
  const unready = c.topology.pod("api-c");
  const mark = agent.lines.length;
  // podsYaml writes no phase. A Pending phase marks api-c unready while it keeps its IP and labels.
  const pods = podsYaml(c.topology).replace(`  podIP: ${unready.ip}\n`, `  podIP: ${unready.ip}\n  phase: Pending\n`);
  t.true(pods.includes("phase: Pending"), "the pod manifest was not changed");
  writeManifest(c.manifestsDir, "pods.yaml", pods);
  await agent.waitForLog((line) => line.msg === "configuration updated", 10_000, "the pod update", mark);

  try {
    const answers = await countAnswers(`http://${API_VIP}/`, 6);
    t.deepEqual(sorted(answers), [["api-a", 3], ["api-b", 3]]);
  } finally {
    writeManifest(c.manifestsDir, "pods.yaml", podsYaml(c.topology));
  }
});

test.serial("teardown leaves no namespace", async (t) => {
  await theCluster().destroy();
  t.deepEqual(listNetns().filter((name) => name.startsWith(PREFIX)), []);
});
