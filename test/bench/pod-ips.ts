// Agents find a pod's network namespace by its IP address and refuse to enroll a pod whose IP is on
// more than one namespace. The harness gives the pods of every cluster the same addresses
// (10.244.<node>.<10 + pod index>), so an end-to-end test running at the same time as the benchmark
// would block enrollment on both sides. The benchmark therefore moves its pods to host addresses
// that the tests do not use, before any agent reads the manifests.

import type { Cluster } from "../harness/cluster";
import { writeManifest, podsYaml } from "../harness/manifests";

/** Host byte of the first benchmark pod on each node; the tests' pods start at 10. */
const FIRST_HOST_BYTE = 240;

/** Moves each pod of `cluster` to 10.244.<node>.<240 + index> and rewrites the pods manifest. */
export function moveToBenchAddresses(cluster: Cluster): void {
  const { topology } = cluster;
  [...topology.pods.values()].forEach((pod, index) => {
    const [a, b, c] = pod.ip.split(".");
    const address = `${a}.${b}.${c}.${FIRST_HOST_BYTE + index}`;
    // Deleting the address also removes the default route through it: add both back.
    topology.exec(pod.netns, "ip", ["addr", "del", `${pod.ip}/24`, "dev", "eth0"]);
    topology.exec(pod.netns, "ip", ["addr", "add", `${address}/24`, "dev", "eth0"]);
    topology.exec(pod.netns, "ip", ["route", "replace", "default", "via", `${a}.${b}.${c}.1`]);
    pod.ip = address;
  });
  writeManifest(cluster.manifestsDir, "pods.yaml", podsYaml(topology));
}
