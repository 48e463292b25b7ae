// End to end with the configuration from a Kubernetes API server (the fake one of the harness):
// agents list and watch it from inside their node namespaces, enrol pods by label, and mark them.

import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { curl, startHttpServer } from "../harness/clients";
import { testPrefixFamily } from "../harness/agent-process";
import { assertHostCapable, Cluster, removeLeftovers } from "../harness/cluster";
import type { NodeSpec } from "../harness/topology";

const PREFIX_FAMILY = testPrefixFamily("aakube");
const PREFIX = `${PREFIX_FAMILY}${process.pid}`;
const CLIENT_NODE = "kube-n1";
const SERVER_NODE = "kube-n2";

const NODES: NodeSpec[] = [
  { name: CLIENT_NODE, pods: [{ name: "client", namespace: "shop", serviceAccount: "client" }] },
  { name: SERVER_NODE, pods: [{ name: "api", namespace: "shop", serviceAccount: "api" }] },
];

let cluster: Cluster | undefined;

function theCluster(): Cluster {
  if (!cluster) throw new Error("the cluster was not created; see the first failure");
  return cluster;
}

test.before(async () => {
  assertHostCapable();
  removeLeftovers(PREFIX_FAMILY);
  cluster = await Cluster.createWithApi({ prefix: PREFIX, nodes: NODES, namespaces: [{ name: "shop", ambient: true }] });
  const site = path.join(cluster.workDir, "site-api");
  fs.mkdirSync(site, { recursive: true });
  fs.writeFileSync(path.join(site, "index.html"), "api\n");
  await startHttpServer(cluster.topology, "api", site, 8080);
  await cluster.startAgents(["client", "api"]);
});

test.after.always(async () => {
  await cluster?.destroy({ removeWorkDir: true });
});

test.serial("pods listed from the API server are enrolled and talk over HBONE", async (t) => {
  const c = theCluster();
  const api = c.topology.pod("api");
  const result = await curl(c.topology, "client", `http://${api.ip}:8080/`);
  t.is(result.exitCode, 0, result.stderr);
  t.is(result.body.toString(), "api\n");
  const record = await c.waitForAudit(SERVER_NODE, (r) => r.direction === "inbound" && r.src?.workload === "client", 5_000);
  t.is(record.transport, "hbone");
  t.is(record.src.identity, "spiffe://cluster.local/ns/shop/sa/client");
});
