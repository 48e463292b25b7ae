// Values that charts/ambient-agent must reject, each with a message that names the value: rejected
// by values.schema.json (unknown keys, wrong types, values out of range or not in the allowed set)
// or by the templates' checks of combinations.

import test from "ava";
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
  { name: "both CA modes", values: { ca: { address: "istiod.istio-system.svc:15012", secretName: "ambient-agent-ca" } }, names: ["ca.address", "ca.secretName"] },
  { name: "neither CA mode", values: { ca: { address: "", secretName: "" } }, names: ["ca.address", "ca.secretName"] },
  {
    name: "both CA modes, template check",
    values: { ca: { address: "istiod.istio-system.svc:15012", secretName: "ambient-agent-ca" } },
    names: ["ca.address", "ca.secretName"],
    mentions: [/"istiod\.istio-system\.svc:15012"/, /"ambient-agent-ca"/],
    options: { skipSchemaValidation: true },
  },
  { name: "neither CA mode, template check", values: { ca: { address: "", secretName: "" } }, names: ["ca.address", "ca.secretName"], options: { skipSchemaValidation: true } },
  { name: "server name with embedded CA", values: { ca: { address: "", secretName: "ambient-agent-ca", serverName: "istiod" } }, names: ["ca.serverName"] },
  { name: "unknown capture mode", values: { capture: { mode: "iptables" } }, names: ["capture.mode"], mentions: [/ebpf/, /nftables/] },
  { name: "bad log format", values: { logging: { format: "xml" } }, names: ["logging.format"], mentions: [/json/, /text/] },
  { name: "bad log level", values: { logging: { level: "loud" } }, names: ["logging.level"], mentions: [/loud/] },
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
  { name: "grace period shorter than the stop", values: { terminationGracePeriodSeconds: 10 }, names: ["terminationGracePeriodSeconds", "drainTimeoutSeconds"] },
];

for (const rejected of REJECTED) {
  test(`rejects ${rejected.name}`, async (t) => {
    const message = await renderChartError(rejected.values, rejected.options);
    for (const dotted of rejected.names) t.true(namesValue(message, dotted), `the message does not name ${dotted}:\n${message}`);
    for (const pattern of rejected.mentions ?? []) t.regex(message, pattern);
  });
}
