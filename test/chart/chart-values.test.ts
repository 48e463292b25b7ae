// Values that charts/ambient-agent must reject, each with a message that names the value: rejected
// by values.schema.json (unknown keys, wrong types, values out of range or not in the allowed set)
// or by the templates' checks of combinations.

import test from "ava";
import { RUN_OPTIONS } from "../../agent/cli/ambient-agent";
import { renderChartError, type ChartValues, type RenderOptions } from "../harness/helm";

interface RejectedCase {
  name: string;
  values: ChartValues;
  /** Each value path the message must name, dotted (ca.address); the JSON pointer form (/ca/address) counts too. */
  names: string[];
  /** More text the message must contain, such as the accepted choices or the offending key. */
  mentions?: RegExp[];
  options?: RenderOptions;
}

function namesValue(message: string, dotted: string): boolean {
  return message.includes(dotted) || message.includes(`/${dotted.replace(/\./g, "/")}`);
}

const REJECTED: RejectedCase[] = [
  // The templates' messages, which name the values and the fix, and not a schema message.
  {
    name: "both CA modes",
    values: { ca: { address: "istiod.istio-system.svc:15012", secretName: "ambient-agent-ca" } },
    names: ["ca.address", "ca.secretName"],
    mentions: [/"istiod\.istio-system\.svc:15012"/, /"ambient-agent-ca"/, /set ca\.address for istiod's CA, or ca\.secretName for the embedded CA/],
  },
  {
    name: "neither CA mode",
    values: { ca: { address: "", secretName: "" } },
    names: ["ca.address", "ca.secretName"],
    mentions: [/are both empty/, /agentctl ca init/],
  },
  { name: "server name with embedded CA", values: { ca: { address: "", secretName: "ambient-agent-ca", serverName: "istiod" } }, names: ["ca.serverName"] },
  { name: "unknown capture mode", values: { capture: { mode: "iptables" } }, names: ["capture.mode"], mentions: [/ebpf/, /nftables/] },
  { name: "bad log format", values: { logging: { format: "xml" } }, names: ["logging.format"], mentions: [/json/, /text/] },
  { name: "bad log level", values: { logging: { level: "loud" } }, names: ["logging.level"], mentions: [/loud/] },
  { name: "unknown log component", values: { logging: { level: "info,bogus=debug" } }, names: ["logging.level"], mentions: [/bogus/] },
  { name: "bad level of a component", values: { logging: { level: "info,hbone-pool=verbose" } }, names: ["logging.level"] },
  { name: "component without a level", values: { logging: { level: "info,cni" } }, names: ["logging.level"] },
  { name: "two levels in one entry", values: { logging: { level: "info debug" } }, names: ["logging.level"] },
  { name: "log level of commas only", values: { logging: { level: " , ," } }, names: ["logging.level"] },
  { name: "unknown update strategy", values: { updateStrategy: { type: "Recreate" } }, names: ["updateStrategy.type"], mentions: [/OnDelete/] },
  { name: "surge without a percent sign", values: { updateStrategy: { rollingUpdate: { maxSurge: "25" } } }, names: ["updateStrategy.rollingUpdate.maxSurge"] },
  {
    name: "rolling update of zero pods",
    values: { updateStrategy: { rollingUpdate: { maxSurge: 0, maxUnavailable: 0 } } },
    names: ["updateStrategy.rollingUpdate.maxSurge", "updateStrategy.rollingUpdate.maxUnavailable"],
    mentions: [/Kubernetes rejects/],
  },
  {
    name: "rolling update of zero percent",
    values: { updateStrategy: { rollingUpdate: { maxSurge: "0%", maxUnavailable: "0%" } } },
    names: ["updateStrategy.rollingUpdate.maxSurge", "updateStrategy.rollingUpdate.maxUnavailable"],
  },
  {
    // null removes the default, and Kubernetes defaults an absent maxSurge to 0.
    name: "rolling update without surge",
    values: { updateStrategy: { rollingUpdate: { maxSurge: null, maxUnavailable: 0 } } },
    names: ["updateStrategy.rollingUpdate.maxSurge", "updateStrategy.rollingUpdate.maxUnavailable"],
  },
  { name: "unknown top-level key", values: { capturee: { mode: "ebpf" } }, names: [], mentions: [/'capturee'/] },
  { name: "unknown nested key", values: { cni: { enbled: false } }, names: ["cni"], mentions: [/'enbled'/] },
  { name: "unknown key two levels down", values: { audit: { file: { maxsize: "1MiB" } } }, names: ["audit.file"], mentions: [/'maxsize'/] },
  { name: "unknown security context key", values: { securityContext: { privileged: true } }, names: ["securityContext"], mentions: [/'privileged'/] },
  { name: "string for a switch", values: { cni: { enabled: "yes" } }, names: ["cni.enabled"], mentions: [/boolean/] },
  { name: "string for a number", values: { cni: { timeoutSeconds: "30" } }, names: ["cni.timeoutSeconds"], mentions: [/integer/] },
  { name: "string for a list", values: { excludedNamespaces: "kube-system" }, names: ["excludedNamespaces"], mentions: [/array/] },
  { name: "map for a list", values: { tolerations: { operator: "Exists" } }, names: ["tolerations"], mentions: [/array/] },
  { name: "number out of range", values: { certTtlSeconds: 5 }, names: ["certTtlSeconds"] },
  { name: "CNI timeout out of range", values: { cni: { timeoutSeconds: 601 } }, names: ["cni.timeoutSeconds"] },
  { name: "malformed digest", values: { image: { digest: "latest" } }, names: ["image.digest"] },
  { name: "invalid namespace name", values: { excludedNamespaces: ["Kube_System"] }, names: ["excludedNamespaces"], mentions: [/Kube_System/] },
  { name: "none among excluded namespaces", values: { excludedNamespaces: ["none"] }, names: ["excludedNamespaces"] },
  { name: "unknown audit sink scheme", values: { audit: { sinks: ["http://collector:4318"] } }, names: ["audit.sinks"] },
  { name: "no audit destination", values: { audit: { file: { enabled: false }, sinks: [] } }, names: ["audit.file.enabled", "audit.sinks"] },
  { name: "relative host path", values: { hostPaths: { bpffs: "sys/fs/bpf" } }, names: ["hostPaths.bpffs"] },
  { name: "capability with CAP_ prefix", values: { securityContext: { extraCapabilities: ["CAP_NET_RAW"] } }, names: ["securityContext.extraCapabilities"], mentions: [/NET_RAW/] },
  { name: "per-pod limit of zero", values: { limits: { maxConnectionsPerPod: 0 } }, names: ["limits.maxConnectionsPerPod"] },
  { name: "fractional stream limit", values: { limits: { maxStreamsPerPeer: 1.5 } }, names: ["limits.maxStreamsPerPeer"] },
  { name: "buffered bytes with an unknown unit", values: { limits: { maxBufferedBytes: "256MB" } }, names: ["limits.maxBufferedBytes"] },
  { name: "negative idle timeout", values: { limits: { idleTimeoutSeconds: -1 } }, names: ["limits.idleTimeoutSeconds"] },
  { name: "zero handshake timeout", values: { limits: { handshakeTimeoutSeconds: 0 } }, names: ["limits.handshakeTimeoutSeconds"] },
  { name: "header list size above 32 bits", values: { limits: { maxHeaderListSize: 2 ** 32 } }, names: ["limits.maxHeaderListSize"] },
  {
    name: "header list size of 8192MiB",
    values: { limits: { maxHeaderListSize: "8192MiB" } },
    names: ["limits.maxHeaderListSize"],
    mentions: [/"8192MiB"/, /8589934592 bytes/, /maximum of 4294967295 bytes/],
  },
  { name: "header list size of 4GiB", values: { limits: { maxHeaderListSize: "4GiB" } }, names: ["limits.maxHeaderListSize"], mentions: [/"4GiB"/] },
  { name: "header list size of 11 digits", values: { limits: { maxHeaderListSize: "10000000000" } }, names: ["limits.maxHeaderListSize"] },
  { name: "buffered bytes above 2^53", values: { limits: { maxBufferedBytes: 1e20 } }, names: ["limits.maxBufferedBytes"] },
  { name: "buffered bytes of 17 digits", values: { limits: { maxBufferedBytes: "99999999999999999999" } }, names: ["limits.maxBufferedBytes"] },
  {
    name: "buffered bytes of 8388608GiB",
    values: { limits: { maxBufferedBytes: "8388608GiB" } },
    names: ["limits.maxBufferedBytes"],
    mentions: [/"8388608GiB"/, /maximum of 9007199254740991 bytes/],
  },
  { name: "idle timeout below a millisecond", values: { limits: { idleTimeoutSeconds: 0.0001 } }, names: ["limits.idleTimeoutSeconds"] },
  { name: "handshake timeout past the timer", values: { limits: { handshakeTimeoutSeconds: 2147484 } }, names: ["limits.handshakeTimeoutSeconds"] },
  { name: "grace period shorter than the stop", values: { terminationGracePeriodSeconds: 10 }, names: ["terminationGracePeriodSeconds", "drainTimeoutSeconds"] },
  {
    name: "none with probe addresses",
    values: { probeSource: ["169.254.7.127", "none"] },
    names: ["probeSource"],
    mentions: [/\["169\.254\.7\.127","none"\]/, /give \["none"\] alone to exempt no address, or addresses only/],
  },
];

/**
 * The options that extraArgs may not give, each with what the message must point to instead. On the
 * command line they would replace the value the chart writes into config.yaml or the path it mounts.
 */
const CHART_OPTIONS: Record<string, RegExp> = {
  config: /set the chart's values instead/,
  node: /spec\.nodeName/,
  daemonset: /chart's own DaemonSet/,
  "excluded-namespaces": /set excludedNamespaces instead.*release namespace/,
  "host-proc": /hostPaths\.proc/,
  cgroup: /hostPaths\.cgroup/,
  "cni-conf-dir": /cni\.confDir/,
  "cni-bin-dir": /cni\.binDir/,
  "cni-socket": /hostPaths\.run/,
  "audit-file": /audit\.file\.enabled/,
  "ca-dir": /ca\.secretName/,
  "ca-root-cert": /ca\.rootCertConfigMap/,
  "ca-token-file": /ca\.tokenAudience/,
  "probe-source": /set probeSource instead/,
  "probe-snat": /set probeSnat: true instead/,
  "no-probe-snat": /set probeSnat: false instead/,
  "host-netns": /set hostPaths\.proc instead/,
};

/** Chart options that the agent does not have, rejected anyway so that the message points to the chart's value. */
const NOT_AGENT_OPTIONS = new Set(["no-probe-snat"]);

for (const [option, pointer] of Object.entries(CHART_OPTIONS)) {
  REJECTED.push(
    { name: `extra arg --${option}`, values: { extraArgs: ["--audit-queue", "100", `--${option}`, "x"] }, names: ["extraArgs"], mentions: [new RegExp(`"--${option}"`), pointer] },
    { name: `extra arg --${option}=VALUE`, values: { extraArgs: [`--${option}=x`] }, names: ["extraArgs"], mentions: [new RegExp(`"--${option}=x"`), pointer] },
  );
}
REJECTED.push(
  { name: "extra arg excluding no namespace", values: { extraArgs: ["--excluded-namespaces=none"] }, names: ["extraArgs", "excludedNamespaces"] },
  { name: "extra arg value across lines", values: { extraArgs: ["--config=/tmp/a\nb"] }, names: ["extraArgs"], mentions: [/--config/] },
);

test("chart options are agent options", (t) => {
  for (const option of Object.keys(CHART_OPTIONS)) {
    t.is(Object.hasOwn(RUN_OPTIONS, option), !NOT_AGENT_OPTIONS.has(option), `--${option}: whether it is an option of ambient-agent run`);
  }
});

for (const rejected of REJECTED) {
  test(`rejects ${rejected.name}`, async (t) => {
    const message = await renderChartError(rejected.values, rejected.options);
    for (const dotted of rejected.names) t.true(namesValue(message, dotted), `the message does not name ${dotted}:\n${message}`);
    for (const pattern of rejected.mentions ?? []) t.regex(message, pattern);
  });
}
