// What the chart grants the agent, checked against what the agent uses. The ClusterRole must match
// the resources that the agent's Kubernetes source lists and watches, and the Role the uninstall
// check. The container's privileges and host folders are fixed. The pod settings keep the agent out
// of the mesh and let a rolling update hand a node over without a failed connection.

import test from "ava";
import YAML from "yaml";
import { kubeResources } from "../../agent/discovery/kube-source";
import { daemonSetResource, parseDaemonSetRef } from "../../agent/uninstall";
import { findObject, renderChart, type ChartValues, type RenderedObject, type RenderOptions } from "../harness/helm";

interface PolicyRule {
  apiGroups?: string[];
  resources?: string[];
  verbs?: string[];
  resourceNames?: string[];
  nonResourceURLs?: string[];
}

interface VolumeMount {
  name: string;
  mountPath: string;
  readOnly?: boolean;
  mountPropagation?: string;
}

interface ContainerPort {
  name?: string;
  containerPort: number;
  protocol?: string;
}

interface Container {
  name: string;
  ports: ContainerPort[];
  volumeMounts: VolumeMount[];
  securityContext: Record<string, unknown>;
  readinessProbe?: { httpGet?: { path: string; port: number | string; scheme?: string }; periodSeconds?: number; failureThreshold?: number; initialDelaySeconds?: number };
  livenessProbe?: unknown;
  startupProbe?: unknown;
}

interface PodSpec {
  hostNetwork?: boolean;
  hostPID?: boolean;
  hostIPC?: boolean;
  securityContext?: unknown;
  priorityClassName?: string;
  terminationGracePeriodSeconds?: number;
  automountServiceAccountToken?: boolean;
  tolerations?: unknown[];
  nodeSelector?: Record<string, string>;
  initContainers?: unknown[];
  containers: Container[];
  volumes: { name: string; hostPath?: { path: string; type?: string } }[];
}

interface DaemonSetSpec {
  updateStrategy: unknown;
  template: { metadata: { labels: Record<string, string>; annotations: Record<string, string> }; spec: PodSpec };
}

/** One permission that a rule grants, as "GROUP RESOURCE VERB" with "core" for the core group. */
type Grant = string;

function grants(rules: PolicyRule[]): Grant[] {
  return rules.flatMap((rule) => (rule.apiGroups ?? []).flatMap((group) => (rule.resources ?? []).flatMap((resource) => (rule.verbs ?? []).map((verb) => `${group || "core"} ${resource} ${verb}`)))).sort();
}

/** Returns the API group and resource of an API path such as /api/v1/pods or /apis/discovery.k8s.io/v1/endpointslices. */
function groupAndResource(apiPath: string): { group: string; resource: string } {
  const core = /^\/api\/v1\/([a-z]+)$/.exec(apiPath);
  if (core !== null) return { group: "", resource: core[1] };
  const named = /^\/apis\/([^/]+)\/[^/]+\/([a-z]+)$/.exec(apiPath);
  if (named !== null) return { group: named[1], resource: named[2] };
  throw new Error(`unreadable API path ${apiPath} in kubeResources()`);
}

/** The grants the agent needs: list and watch of each resource its Kubernetes source follows, and the pod status patch. */
function neededClusterGrants(): Grant[] {
  const needed = new Set<Grant>();
  for (const resource of kubeResources("node-a")) {
    for (const apiPath of [resource.path, ...(resource.olderPaths ?? [])]) {
      const { group, resource: name } = groupAndResource(apiPath);
      for (const verb of ["list", "watch"]) needed.add(`${group || "core"} ${name} ${verb}`);
    }
  }
  // The agent sets and removes the ambient.istio.io/redirection annotation of the pods it enrols.
  needed.add("core pods/status patch");
  return [...needed].sort();
}

async function daemonSetOf(values: ChartValues = {}, options: RenderOptions = {}): Promise<{ objects: RenderedObject[]; spec: DaemonSetSpec; pod: PodSpec; container: Container }> {
  const objects = await renderChart(values, options);
  const spec = findObject(objects, "DaemonSet").spec as DaemonSetSpec;
  const pod = spec.template.spec;
  assertOneContainer(pod);
  return { objects, spec, pod, container: pod.containers[0] };
}

function assertOneContainer(pod: PodSpec): void {
  if (pod.containers.length !== 1 || pod.initContainers !== undefined) {
    throw new Error(`the pod should run the agent's container alone, but has containers ${pod.containers.map((container) => container.name).join(", ")} and init containers ${JSON.stringify(pod.initContainers ?? [])}`);
  }
}

test("ClusterRole grants what the Kubernetes source uses", async (t) => {
  const objects = await renderChart();
  const rules = (findObject(objects, "ClusterRole") as RenderedObject & { rules: PolicyRule[] }).rules;
  t.deepEqual(grants(rules), neededClusterGrants());
  for (const rule of rules) {
    t.is(rule.resourceNames, undefined);
    t.is(rule.nonResourceURLs, undefined);
  }
  t.notRegex(JSON.stringify(rules), /\*/);
  t.false(grants(rules).some((grant) => grant.includes("secrets")));
  t.is(objects.filter((object) => object.kind === "ClusterRole").length, 1);
});

test("Role reads only the chart's DaemonSet", async (t) => {
  const objects = await renderChart({}, { release: "mesh", namespace: "mesh-system" });
  const role = findObject(objects, "Role") as RenderedObject & { rules: PolicyRule[] };
  const daemonSet = findObject(objects, "DaemonSet");
  t.is(role.metadata.namespace, daemonSet.metadata.namespace);
  t.deepEqual(role.rules, [{ apiGroups: ["apps"], resources: ["daemonsets"], resourceNames: [daemonSet.metadata.name], verbs: ["get", "list", "watch"] }]);
  const config = YAML.parse((findObject(objects, "ConfigMap").data as Record<string, string>)["config.yaml"]) as Record<string, unknown>;
  t.is(config.daemonset, `${daemonSet.metadata.namespace}/${daemonSet.metadata.name}`);
  // resourceNames authorizes a list or watch only when it selects metadata.name.
  t.is(daemonSetResource(parseDaemonSetRef(String(config.daemonset))).fieldSelector, `metadata.name=${daemonSet.metadata.name}`);
});

test("bindings name the chart's ServiceAccount", async (t) => {
  const objects = await renderChart();
  const account = findObject(objects, "ServiceAccount");
  for (const kind of ["ClusterRoleBinding", "RoleBinding"]) {
    const binding = findObject(objects, kind) as RenderedObject & { subjects: unknown[] };
    t.deepEqual(binding.subjects, [{ kind: "ServiceAccount", name: account.metadata.name, namespace: account.metadata.namespace }], kind);
  }
});

test("container privileges", async (t) => {
  const { container } = await daemonSetOf();
  t.deepEqual(container.securityContext, {
    runAsUser: 0,
    runAsGroup: 0,
    runAsNonRoot: false,
    privileged: false,
    allowPrivilegeEscalation: false,
    readOnlyRootFilesystem: true,
    capabilities: { drop: ["ALL"], add: ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "DAC_OVERRIDE"] },
    seccompProfile: { type: "RuntimeDefault" },
    appArmorProfile: { type: "Unconfined" },
  });
});

test("pod stays off the host's namespaces", async (t) => {
  const { pod } = await daemonSetOf();
  t.not(pod.hostNetwork, true);
  t.not(pod.hostPID, true);
  t.not(pod.hostIPC, true);
  t.is(pod.securityContext, undefined);
  t.true(pod.automountServiceAccountToken);
});

/** One hostPath volume as the contract states it: host path, type, and where and how the container mounts it. */
interface HostMount {
  name: string;
  hostPath: string;
  type: string;
  mountPath: string;
  readOnly?: boolean;
  mountPropagation?: string;
}

const HOST_MOUNTS: HostMount[] = [
  { name: "bpffs", hostPath: "/sys/fs/bpf", type: "Directory", mountPath: "/sys/fs/bpf" },
  { name: "cgroup", hostPath: "/sys/fs/cgroup", type: "Directory", mountPath: "/host/sys/fs/cgroup" },
  // The agent writes per-namespace sysctls through the host's procfs.
  { name: "proc", hostPath: "/proc", type: "Directory", mountPath: "/host/proc", readOnly: false },
  { name: "netns", hostPath: "/var/run/netns", type: "DirectoryOrCreate", mountPath: "/var/run/netns", mountPropagation: "HostToContainer" },
  { name: "run", hostPath: "/run/ambient-agent", type: "DirectoryOrCreate", mountPath: "/run/ambient-agent" },
  { name: "spool", hostPath: "/var/lib/ambient-agent", type: "DirectoryOrCreate", mountPath: "/var/lib/ambient-agent" },
  { name: "audit-log", hostPath: "/var/log/ambient-agent", type: "DirectoryOrCreate", mountPath: "/var/log/ambient-agent" },
  { name: "cni-bin", hostPath: "/opt/cni/bin", type: "DirectoryOrCreate", mountPath: "/host/opt/cni/bin" },
  { name: "cni-conf", hostPath: "/etc/cni/net.d", type: "DirectoryOrCreate", mountPath: "/host/etc/cni/net.d" },
];

function hostMounts(pod: PodSpec): HostMount[] {
  const mounts: HostMount[] = [];
  for (const volume of pod.volumes) {
    if (volume.hostPath === undefined) continue;
    for (const mount of pod.containers[0].volumeMounts.filter((candidate) => candidate.name === volume.name)) {
      const entry: HostMount = { name: volume.name, hostPath: volume.hostPath.path, type: volume.hostPath.type ?? "", mountPath: mount.mountPath };
      if (mount.readOnly !== undefined) entry.readOnly = mount.readOnly;
      if (mount.mountPropagation !== undefined) entry.mountPropagation = mount.mountPropagation;
      mounts.push(entry);
    }
  }
  return mounts.sort((a, b) => a.name.localeCompare(b.name));
}

function expectedHostMounts(leaveOut: string[]): HostMount[] {
  return HOST_MOUNTS.filter((mount) => !leaveOut.includes(mount.name)).sort((a, b) => a.name.localeCompare(b.name));
}

test("host folders with defaults", async (t) => {
  const { pod } = await daemonSetOf();
  t.deepEqual(hostMounts(pod), expectedHostMounts([]));
});

test("host folders without CNI and audit file", async (t) => {
  const { pod } = await daemonSetOf({ cni: { enabled: false }, audit: { file: { enabled: false }, sinks: ["stdout"] } });
  t.deepEqual(hostMounts(pod), expectedHostMounts(["cni-bin", "cni-conf", "audit-log"]));
});

test("release namespace always excluded", async (t) => {
  for (const [values, namespace] of [[{}, "ambient-agent"], [{ excludedNamespaces: [] }, "mesh-system"], [{ excludedNamespaces: ["kube-system", "mesh-system"] }, "mesh-system"]] as const) {
    const objects = await renderChart(values, { release: "mesh", namespace });
    const config = YAML.parse((findObject(objects, "ConfigMap").data as Record<string, string>)["config.yaml"]) as Record<string, unknown>;
    const excluded = config["excluded-namespaces"] as string[];
    t.true(excluded.includes(namespace), `excluded-namespaces ${JSON.stringify(excluded)} lacks ${namespace}`);
    t.is(new Set(excluded).size, excluded.length, `excluded-namespaces ${JSON.stringify(excluded)} repeats a name`);
  }
});

test("pod opts out of the mesh", async (t) => {
  const { spec } = await daemonSetOf();
  t.is(spec.template.metadata.labels["istio.io/dataplane-mode"], "none");
  t.is(spec.template.metadata.annotations["sidecar.istio.io/inject"], "false");
});

test("readiness probe and no liveness probe", async (t) => {
  const { container } = await daemonSetOf();
  const probe = container.readinessProbe;
  t.truthy(probe?.httpGet);
  const port = probe?.httpGet?.port;
  const portNumber = typeof port === "number" ? port : container.ports.find((candidate) => candidate.name === port)?.containerPort;
  t.is(portNumber, 15021);
  t.is(probe?.httpGet?.path, "/healthz/ready");
  t.not(probe?.httpGet?.scheme, "HTTPS");
  t.is(probe?.periodSeconds, 5);
  t.is(probe?.failureThreshold, 3);
  t.is(probe?.initialDelaySeconds ?? 0, 0);
  t.is(container.livenessProbe, undefined);
  t.is(container.startupProbe, undefined);
});

test("metrics port and Prometheus annotations", async (t) => {
  const { spec, container } = await daemonSetOf();
  t.deepEqual(
    container.ports.map((port) => ({ name: port.name, containerPort: port.containerPort })).sort((a, b) => a.containerPort - b.containerPort),
    [{ name: "http-metrics", containerPort: 15020 }, { name: "http-readiness", containerPort: 15021 }],
  );
  t.like(spec.template.metadata.annotations, { "prometheus.io/scrape": "true", "prometheus.io/port": "15020", "prometheus.io/path": "/stats/prometheus" });
});

test("scheduling on every node", async (t) => {
  const { pod } = await daemonSetOf();
  t.deepEqual(pod.tolerations, [{ operator: "Exists" }]);
  t.is(pod.priorityClassName, "system-node-critical");
  t.deepEqual(pod.nodeSelector, { "kubernetes.io/os": "linux" });
});

test("rolling update surges without a gap", async (t) => {
  const { spec, pod } = await daemonSetOf();
  t.deepEqual(spec.updateStrategy, { type: "RollingUpdate", rollingUpdate: { maxSurge: 1, maxUnavailable: 0 } });
  t.is(pod.terminationGracePeriodSeconds, 30);
});
