// `helm template` of charts/ambient-agent with each value set of chart-cases.ts. Every object must
// pass the Kubernetes schema with no unknown field. The ConfigMap's config.yaml may hold only options
// of `ambient-agent run`, with values of the right shape, and each value must reach its option.
// Every file or folder the configuration names must be mounted from the right volume.

import test, { type ExecutionContext } from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import YAML from "yaml";
import { cgroupV2Root, RUN_OPTIONS } from "../../agent/cli/ambient-agent";
import { withConfigFile } from "../../agent/cli/config-file";
import { parseDoctorOptions } from "../../agent/cli/doctor";
import { LOG_COMPONENTS, parseLogLevels } from "../../agent/log";
import { parseLimitFlags } from "../../agent/proxy/limits";
import { REPO_ROOT } from "../harness/agent-process";
import { CHART_DIR, DEFAULT_NAMESPACE, findObject, renderChart, type RenderedObject } from "../harness/helm";
import { validateObject } from "../harness/kube-schema";
import { CHART_CASES, TEST_DIGEST, type ChartCase } from "./chart-cases";

type Config = Record<string, unknown>;

interface VolumeMount {
  name: string;
  mountPath: string;
  subPath?: string;
  readOnly?: boolean;
}

interface Volume {
  name: string;
  [source: string]: unknown;
}

interface Container {
  name: string;
  image: string;
  imagePullPolicy: string;
  args: string[];
  env: { name: string; valueFrom?: { fieldRef?: { fieldPath: string } } }[];
  volumeMounts: VolumeMount[];
  securityContext: { capabilities: { add: string[]; drop: string[] }; appArmorProfile?: { type: string }; seLinuxOptions?: Record<string, string> };
}

interface PodTemplate {
  metadata: { labels: Record<string, string>; annotations: Record<string, string> };
  spec: { serviceAccountName: string; containers: Container[]; volumes: Volume[] };
}

/** The kinds the chart renders, one object each. */
const KINDS = ["ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "DaemonSet"];
const CLUSTER_SCOPED = new Set(["ClusterRole", "ClusterRoleBinding"]);

function caseNamed(name: string): ChartCase {
  const found = CHART_CASES.find((chartCase) => chartCase.name === name);
  if (found === undefined) throw new Error(`chart-cases.ts has no case "${name}"`);
  return found;
}

async function render(chartCase: ChartCase): Promise<RenderedObject[]> {
  return renderChart(chartCase.values, chartCase.options);
}

function podTemplate(objects: RenderedObject[]): PodTemplate {
  return (findObject(objects, "DaemonSet").spec as { template: PodTemplate }).template;
}

function agentContainer(objects: RenderedObject[]): Container {
  const containers = podTemplate(objects).spec.containers;
  const container = containers.find((candidate) => candidate.name === "ambient-agent");
  if (container === undefined) throw new Error(`no container named ambient-agent: ${containers.map((candidate) => candidate.name).join(", ")}`);
  return container;
}

function agentConfig(objects: RenderedObject[]): Config {
  const data = findObject(objects, "ConfigMap").data as Record<string, string> | undefined;
  const text = data?.["config.yaml"];
  if (text === undefined) throw new Error("the ConfigMap has no config.yaml");
  const config = YAML.parse(text) as unknown;
  if (config === null || typeof config !== "object" || Array.isArray(config)) throw new Error(`config.yaml is not a mapping: ${text}`);
  return config as Config;
}

/** Returns the volume mounted at `file` or a folder above it, and the mount; the deepest mount wins, as in the container. */
function volumeAt(objects: RenderedObject[], file: string): { mount: VolumeMount; volume: Volume } | undefined {
  const mounts = agentContainer(objects).volumeMounts.filter((mount) => file === mount.mountPath || file.startsWith(`${mount.mountPath.replace(/\/$/, "")}/`));
  const mount = mounts.sort((a, b) => b.mountPath.length - a.mountPath.length)[0];
  if (mount === undefined) return undefined;
  const volume = podTemplate(objects).spec.volumes.find((candidate) => candidate.name === mount.name);
  if (volume === undefined) throw new Error(`volume mount ${mount.name} at ${mount.mountPath} has no volume`);
  return { mount, volume };
}

/** Checks each key of config.yaml against the option table of `ambient-agent run` and the value's shape against the option's. */
function assertRunOptions(t: ExecutionContext, config: Config): void {
  const options = RUN_OPTIONS as Record<string, { type: "string" | "boolean"; multiple?: boolean }>;
  t.false("config" in config, "config.yaml sets config, which only the command line may give");
  for (const [key, value] of Object.entries(config)) {
    const option = options[key];
    t.truthy(option, `config.yaml key "${key}" is not an option of ambient-agent run`);
    if (option === undefined) continue;
    if (option.type === "boolean") {
      // false means "not given", so the chart leaves a switch out instead of writing false.
      t.is(value, true, `switch ${key} is ${JSON.stringify(value)}`);
    } else if (Array.isArray(value)) {
      t.true(option.multiple === true, `${key} is a list, but --${key} does not repeat`);
      t.true(value.length > 0, `${key} is an empty list`);
      for (const item of value) t.is(typeof item, "string", `${key} lists ${JSON.stringify(item)}, not a string`);
    } else {
      t.true(typeof value === "string" || typeof value === "number", `${key} is ${JSON.stringify(value)}, not a string or number`);
    }
  }
}

for (const chartCase of CHART_CASES) {
  test(`schema-valid objects: ${chartCase.name}`, async (t) => {
    const objects = await render(chartCase);
    t.deepEqual(objects.map((object) => object.kind).sort(), [...KINDS].sort());
    for (const object of objects) {
      const problems = validateObject(object);
      t.deepEqual(problems, [], `${object.kind}/${object.metadata.name}: ${problems.map((problem) => `${problem.path}: ${problem.message}`).join("; ")}`);
      const namespace = chartCase.options?.namespace ?? DEFAULT_NAMESPACE;
      t.is(object.metadata.namespace, CLUSTER_SCOPED.has(object.kind) ? undefined : namespace, `${object.kind} namespace`);
    }
  });

  test(`config keys are run options: ${chartCase.name}`, async (t) => {
    const objects = await render(chartCase);
    assertRunOptions(t, agentConfig(objects));

    // The agent's own reading of the file, as `run --config` does it, with the container's arguments after it.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-chart-config-"));
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, "config.yaml");
    fs.writeFileSync(file, (findObject(objects, "ConfigMap").data as Record<string, string>)["config.yaml"]);
    const args = agentContainer(objects).args.slice(1).map((arg) => (arg === "/etc/ambient-agent/config.yaml" ? file : arg));
    const argv = withConfigFile(args, RUN_OPTIONS);
    t.notThrows(() => parseArgs({ args: argv, options: RUN_OPTIONS, strict: true }));
    // The limits that the schema accepted must start the agent, which checks them only at start.
    const { values } = parseArgs({ args: argv, options: RUN_OPTIONS, strict: true });
    t.notThrows(() => parseLimitFlags(values));
  });

  test(`configured paths are mounted: ${chartCase.name}`, async (t) => {
    const objects = await render(chartCase);
    const config = agentConfig(objects);
    // Each option that names a path in the container, and the volume that must provide it.
    const expected: Record<string, (volume: Volume) => boolean> = {
      "host-proc": (volume) => (volume.hostPath as { path: string } | undefined)?.path === "/proc",
      cgroup: (volume) => (volume.hostPath as { path: string } | undefined)?.path === "/sys/fs/cgroup",
      "cni-conf-dir": (volume) => (volume.hostPath as { path: string } | undefined)?.path === "/etc/cni/net.d",
      "cni-bin-dir": (volume) => (volume.hostPath as { path: string } | undefined)?.path === "/opt/cni/bin",
      "audit-file": (volume) => (volume.hostPath as { path: string } | undefined)?.path === "/var/log/ambient-agent",
      "ca-dir": (volume) => (volume.secret as { secretName: string } | undefined)?.secretName === "ambient-agent-ca",
      "ca-root-cert": (volume) => (volume.configMap as { name: string } | undefined)?.name === "istio-ca-root-cert",
      "ca-token-file": (volume) => JSON.stringify(volume.projected ?? {}).includes('"serviceAccountToken"'),
    };
    for (const [option, fromVolume] of Object.entries(expected)) {
      const file = config[option];
      if (file === undefined || file === "none") continue;
      const found = volumeAt(objects, file as string);
      t.truthy(found, `${option} ${file} is not under any volume mount`);
      if (found !== undefined) t.true(fromVolume(found.volume), `${option} ${file} is on volume ${JSON.stringify(found.volume)}`);
    }
    const configMount = volumeAt(objects, "/etc/ambient-agent/config.yaml");
    t.is((configMount?.volume.configMap as { name: string } | undefined)?.name, findObject(objects, "ConfigMap").metadata.name);
  });
}

test("default configuration", async (t) => {
  const config = agentConfig(await render(caseNamed("default values")));
  t.deepEqual(config, {
    kubernetes: true,
    "host-proc": "/host/proc",
    cgroup: "/host/sys/fs/cgroup",
    replace: true,
    "idle-after-handover": true,
    daemonset: "ambient-agent/ambient-agent",
    "excluded-namespaces": ["kube-system", "ambient-agent"],
    "root-namespace": "istio-system",
    "trust-domain": "cluster.local",
    capture: "auto",
    "transparent-source": true,
    "probe-snat": true,
    "cert-ttl": 86400,
    "drain-timeout": 5,
    "max-connections-per-pod": 4096,
    "max-connections-per-peer": 512,
    "max-streams-per-connection": 200,
    "max-streams-per-peer": 2048,
    "max-header-list-size": "16KiB",
    "handshake-timeout": 10,
    "idle-timeout": 3600,
    "max-buffered-bytes": "256MiB",
    "log-level": "info",
    "log-format": "json",
    "cni-conf-dir": "/host/etc/cni/net.d",
    "cni-bin-dir": "/host/opt/cni/bin",
    "cni-timeout": 30,
    "ca-address": "istiod.istio-system.svc:15012",
    "ca-root-cert": "/var/run/secrets/istio/root-cert.pem",
    "ca-token-file": "/var/run/secrets/tokens/istio-token",
    "cluster-id": "Kubernetes",
    "audit-file": "/var/log/ambient-agent/audit.log",
    "audit-file-max-size": "100MiB",
    "audit-file-max-age": "24h",
    "audit-file-max-files": 10,
    "audit-fsync": "1s",
  });
});

test("large limits render as whole numbers", async (t) => {
  const config = agentConfig(await render(caseNamed("large limits")));
  const values = Object.fromEntries(Object.entries(config).map(([key, value]) => [key, String(value)]));
  const limits = parseLimitFlags(values);
  t.is(limits.maxConnectionsPerPod, 1_000_000);
  t.is(limits.maxBufferedBytes, 4 * 1024 ** 3);
  t.is(limits.idleTimeoutMs, 0);
  t.is(limits.handshakeTimeoutMs, 2500);
});

test("default container and pod", async (t) => {
  const objects = await render(caseNamed("default values"));
  const container = agentContainer(objects);
  t.is(container.image, "ambient-agent:0.1.0");
  t.is(container.imagePullPolicy, "IfNotPresent");
  t.deepEqual(container.args, ["run", "--config", "/etc/ambient-agent/config.yaml", "--node", "$(NODE_NAME)"]);
  const fieldOf = (name: string): string | undefined => container.env.find((variable) => variable.name === name)?.valueFrom?.fieldRef?.fieldPath;
  t.is(fieldOf("NODE_NAME"), "spec.nodeName");
  t.is(fieldOf("POD_NAME"), "metadata.name");
  t.is(fieldOf("POD_NAMESPACE"), "metadata.namespace");
  t.deepEqual(container.securityContext.appArmorProfile, { type: "Unconfined" });

  const template = podTemplate(objects);
  t.is(template.metadata.annotations["sidecar.istio.io/inject"], "false");
  t.regex(template.metadata.annotations["checksum/config"], /^[0-9a-f]{64}$/);
  t.false("container.apparmor.security.beta.kubernetes.io/ambient-agent" in template.metadata.annotations);
  t.is(template.spec.serviceAccountName, "ambient-agent");
  t.false(template.spec.volumes.some((volume) => volume.name === "ca-secret"));
  const token = JSON.stringify(template.spec.volumes.find((volume) => volume.name === "istio-token"));
  t.regex(token, /"audience":"istio-ca"/);
  t.regex(token, /"expirationSeconds":43200/);
});

test("labels on every object", async (t) => {
  const objects = await render(caseNamed("custom namespace"));
  for (const object of objects) {
    t.like(object.metadata.labels, {
      "app.kubernetes.io/name": "ambient-agent",
      "app.kubernetes.io/instance": "mesh",
      "app.kubernetes.io/version": "0.1.0",
      "app.kubernetes.io/managed-by": "Helm",
      "app.kubernetes.io/part-of": "ambient-agent",
      "helm.sh/chart": "ambient-agent-0.1.0",
    }, `${object.kind} labels`);
    t.is(object.metadata.name, "mesh-ambient-agent", `${object.kind} name`);
  }
  const daemonSet = findObject(objects, "DaemonSet");
  const spec = daemonSet.spec as { selector: { matchLabels: Record<string, string> } };
  t.deepEqual(spec.selector.matchLabels, { "app.kubernetes.io/name": "ambient-agent", "app.kubernetes.io/instance": "mesh" });
  t.like(podTemplate(objects).metadata.labels, spec.selector.matchLabels);
});

test("custom namespace reaches config and RBAC", async (t) => {
  const objects = await render(caseNamed("custom namespace"));
  const config = agentConfig(objects);
  t.is(config.daemonset, "mesh-system/mesh-ambient-agent");
  t.deepEqual(config["excluded-namespaces"], ["kube-system", "monitoring", "mesh-system"]);
  t.is(config["trust-domain"], "mesh.example.com");
  t.deepEqual(config["trust-domain-alias"], ["cluster.local"]);
  t.is(config["root-namespace"], "mesh-root");
  t.is(podTemplate(objects).spec.serviceAccountName, "mesh-ambient-agent");
  for (const kind of ["ClusterRoleBinding", "RoleBinding"]) {
    const binding = findObject(objects, kind) as RenderedObject & { subjects: unknown[]; roleRef: unknown };
    t.deepEqual(binding.subjects, [{ kind: "ServiceAccount", name: "mesh-ambient-agent", namespace: "mesh-system" }], `${kind} subjects`);
    t.deepEqual(binding.roleRef, { apiGroup: "rbac.authorization.k8s.io", kind: kind.replace("Binding", ""), name: "mesh-ambient-agent" }, `${kind} roleRef`);
  }
});

test("embedded CA replaces istiod", async (t) => {
  const objects = await render(caseNamed("embedded CA"));
  const config = agentConfig(objects);
  t.is(config["ca-dir"], "/etc/ambient-agent/ca");
  for (const key of ["ca-address", "ca-root-cert", "ca-token-file", "cluster-id", "ca-server-name"]) t.false(key in config, `${key} is set`);
  const volumes = podTemplate(objects).spec.volumes;
  t.false(volumes.some((volume) => volume.name === "istio-ca-root-cert"));
  t.deepEqual(volumes.find((volume) => volume.name === "ca-secret")?.secret, { secretName: "ambient-agent-ca" });
});

test("CNI disabled drops the plugin", async (t) => {
  const objects = await render(caseNamed("CNI disabled"));
  const config = agentConfig(objects);
  for (const key of ["cni-conf-dir", "cni-bin-dir", "cni-timeout"]) t.false(key in config, `${key} is set`);
  const names = podTemplate(objects).spec.volumes.map((volume) => volume.name);
  t.false(names.includes("cni-bin"));
  t.false(names.includes("cni-conf"));
});

test("nftables capture options", async (t) => {
  const config = agentConfig(await render(caseNamed("nftables capture")));
  t.is(config.capture, "nftables");
  t.is(config["no-transparent-source"], true);
  t.false("transparent-source" in config);
  t.deepEqual(config["probe-source"], ["none"]);
  t.false("probe-snat" in config, "probe-snat without a probe source");
});

test("audit sinks without file", async (t) => {
  const objects = await render(caseNamed("audit sinks without file"));
  const config = agentConfig(objects);
  t.is(config["audit-file"], "none");
  for (const key of ["audit-file-max-size", "audit-file-max-age", "audit-file-max-files"]) t.false(key in config, `${key} is set`);
  t.deepEqual(config["audit-sink"], ["stdout", "otlp://otel-collector.observability.svc:4317"]);
  t.is(config["audit-fsync"], "always");
  t.deepEqual(config["audit-redact"], ["src.addr:hash", "dst.addr"]);
  t.false(podTemplate(objects).spec.volumes.some((volume) => volume.name === "audit-log"));
});

test("text logs at debug", async (t) => {
  const config = agentConfig(await render(caseNamed("text logs at debug")));
  t.is(config["log-level"], "debug,access=warn");
  t.is(config["log-format"], "text");
});

test("config change rolls the pods", async (t) => {
  const annotation = async (name: string): Promise<string> => podTemplate(await render(caseNamed(name))).metadata.annotations["checksum/config"];
  const defaults = await annotation("default values");
  t.is(await annotation("default values"), defaults);
  t.not(await annotation("text logs at debug"), defaults);
  t.not(await annotation("nftables capture"), defaults);
});

test("extra capabilities and SELinux", async (t) => {
  const context = agentContainer(await render(caseNamed("extra capabilities"))).securityContext;
  t.deepEqual(context.capabilities.add, ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "DAC_OVERRIDE", "NET_RAW"]);
  t.deepEqual(context.capabilities.drop, ["ALL"]);
  t.deepEqual(context.seLinuxOptions, { type: "spc_t" });
});

test("image by digest", async (t) => {
  const container = agentContainer(await render(caseNamed("image digest")));
  t.is(container.image, `registry.example.com/mesh/ambient-agent@${TEST_DIGEST}`);
  t.is(container.imagePullPolicy, "Always");
});

test("AppArmor annotation before Kubernetes 1.30", async (t) => {
  const objects = await render(caseNamed("Kubernetes 1.29"));
  t.is(podTemplate(objects).metadata.annotations["container.apparmor.security.beta.kubernetes.io/ambient-agent"], "unconfined");
  t.is(agentContainer(objects).securityContext.appArmorProfile, undefined);
});

test("extra args follow the chart's", async (t) => {
  const container = agentContainer(await renderChart({ extraArgs: ["--audit-queue", "100000"] }));
  t.deepEqual(container.args, ["run", "--config", "/etc/ambient-agent/config.yaml", "--node", "$(NODE_NAME)", "--audit-queue", "100000"]);
  // Options backed by a value, switches that only repeat the file's true, options the chart leaves alone, and a
  // name that only starts like a rejected one (--audit-file).
  const allowed = ["--log-level=debug", "--capture", "nftables", "--replace", "--idle-after-handover", "--kubernetes", "--pin-root=/sys/fs/bpf/agent", "--audit-file-max-size=1MiB"];
  const others = agentContainer(await renderChart({ extraArgs: allowed }));
  t.deepEqual(others.args.slice(5), allowed);
});

test("OnDelete renders no rolling update", async (t) => {
  const spec = findObject(await render(caseNamed("OnDelete updates")), "DaemonSet").spec as { updateStrategy: unknown };
  t.deepEqual(spec.updateStrategy, { type: "OnDelete" });
});

test("rolling update by percentages", async (t) => {
  const objects = await renderChart({ updateStrategy: { rollingUpdate: { maxSurge: "25%", maxUnavailable: 0 } } });
  const spec = findObject(objects, "DaemonSet").spec as { updateStrategy: unknown };
  t.deepEqual(spec.updateStrategy, { type: "RollingUpdate", rollingUpdate: { maxSurge: "25%", maxUnavailable: 0 } });
  t.deepEqual(validateObject(findObject(objects, "DaemonSet")), []);
});

test("every log component passes the schema", async (t) => {
  const levels = [...LOG_COMPONENTS.map((component) => `info,${component}=debug`), "info, trust-bundle : warn", " debug ,,hbone-pool=trace, ", "istio-ca:error", "inbound-plaintext=silent,warn"];
  const rendered = await Promise.all(levels.map(async (level) => agentConfig(await renderChart({ logging: { level } }))["log-level"]));
  levels.forEach((level, index) => {
    t.is(rendered[index], level, `logging.level ${JSON.stringify(level)}`);
    t.notThrows(() => parseLogLevels(level), `the agent rejects ${JSON.stringify(level)}`);
  });
});

test("log level pattern agrees with the agent", (t) => {
  // Go's \s, which Helm uses, lacks \v and the Unicode spaces that JavaScript's has, so the samples use tab, newline and space only.
  const schema = JSON.parse(fs.readFileSync(path.join(CHART_DIR, "values.schema.json"), "utf8")) as { properties: { logging: { properties: { level: { pattern: string } } } } };
  const pattern = new RegExp(schema.properties.logging.properties.level.pattern);
  const entries = ["", " ", "info", "\tdebug\n", "cni=debug", "hbone-pool:warn", "trust-bundle = trace", "loud", "bogus=info", "cni=loud", "cni", "=info", "info debug", "cni==debug", "Info", "inbound-plaintext"];
  let samples = 0;
  for (const first of entries) {
    for (const second of [undefined, ...entries]) {
      for (const third of second === undefined ? [undefined] : [undefined, ...entries]) {
        const text = [first, second, third].filter((entry) => entry !== undefined).join(",");
        t.is(pattern.test(text), acceptsLogLevel(text), `logging.level ${JSON.stringify(text)}`);
        samples++;
      }
    }
  }
  t.true(samples > 4000);
});

function acceptsLogLevel(text: string): boolean {
  try {
    parseLogLevels(text);
    return true;
  } catch {
    return false;
  }
}

test("doctor reads the pod's config file", async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-chart-doctor-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  for (const name of ["default values", "nftables capture"]) {
    const objects = await render(caseNamed(name));
    const file = path.join(dir, "config.yaml");
    fs.writeFileSync(file, (findObject(objects, "ConfigMap").data as Record<string, string>)["config.yaml"]);
    const { options } = await parseDoctorOptions(["--config", file, "--node", "worker-1"]);
    t.is(options.cgroupPath, cgroupV2Root("/host/sys/fs/cgroup"), name);
    t.is(options.pinRoot, "/sys/fs/bpf/ambient-agent/worker-1", name);
    t.is(options.capture, agentConfig(objects).capture as typeof options.capture, name);
    t.is(options.probeSnat, agentConfig(objects)["probe-snat"] === true, name);
    t.is(options.hostNetns, "/host/proc/1/ns/net", name);
  }
});

test("docs run doctor with the pod's settings", (t) => {
  const files = ["docs/install.md", "docs/diagnostics.md", "charts/ambient-agent/README.md", "charts/ambient-agent/templates/NOTES.txt"];
  let commands = 0;
  for (const file of files) {
    for (const line of fs.readFileSync(path.join(REPO_ROOT, file), "utf8").split("\n")) {
      if (!/exec .*agentctl doctor/.test(line)) continue;
      commands++;
      t.regex(line, /agentctl doctor --config \/etc\/ambient-agent\/config\.yaml --node \$NODE\b/, `${file}: ${line}`);
    }
  }
  t.true(commands >= files.length, `${commands} doctor commands in ${files.join(", ")}`);
});

test("pod annotations and labels cannot replace the chart's", async (t) => {
  const objects = await renderChart({
    podAnnotations: { "sidecar.istio.io/inject": "true", "example.com/team": "mesh" },
    podLabels: { "istio.io/dataplane-mode": "ambient", "app.kubernetes.io/name": "other", team: "mesh" },
  });
  const metadata = podTemplate(objects).metadata;
  t.is(metadata.annotations["sidecar.istio.io/inject"], "false");
  t.is(metadata.annotations["example.com/team"], "mesh");
  t.is(metadata.labels["istio.io/dataplane-mode"], "none");
  t.is(metadata.labels["app.kubernetes.io/name"], "ambient-agent");
  t.is(metadata.labels.team, "mesh");
});
