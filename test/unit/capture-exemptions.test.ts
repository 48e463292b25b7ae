// Capture exemptions without the kernel: annotation and option parsing, map key encoding, and
// the writer that keeps the excluded-port entries in step with the workloads.
import test from "ava";
import os from "node:os";
import { Writable } from "node:stream";
import pino from "pino";

import { parseProbeSources } from "../../agent/cli/probe-sources";
import type { CaptureExemptionStore } from "../../agent/capture/backend";
import {
  DEFAULT_PROBE_SOURCES,
  decodeExcludedPortKey,
  decodeProbeSourceKey,
  encodeExcludedPortKey,
  encodeProbeSourceKey,
  type ExcludedPorts,
} from "../../agent/capture/ebpf/exemptions";
import { formatIpBytes, ipBytes, ipv6OrMappedBytes } from "../../agent/capture/ip-bytes";
import { DIRECTION_CODES, STRUCT_LAYOUTS } from "../../agent/capture/layout";
import { parseManifests } from "../../agent/discovery/manifests";
import {
  EXCLUDE_INBOUND_PORTS_ANNOTATION,
  EXCLUDE_OUTBOUND_PORTS_ANNOTATION,
  ExcludedPortsWriter,
  excludedPortsOf,
  parsePortList,
} from "../../agent/enroll/excluded-ports";
import { AgentError } from "../../agent/errors";
import type { Workload } from "../../agent/state/types";

function workload(annotations: Record<string, string>, ip = "10.1.0.5"): Workload {
  return {
    uid: "shop/cart",
    name: "cart",
    namespace: "shop",
    serviceAccount: "default",
    nodeName: "exm1",
    ip,
    labels: {},
    annotations,
    namedPorts: {},
    hostNetwork: false,
    ready: true,
    source: { file: "capture-exemptions.test", document: 0 },
  };
}

test("port list parses with whitespace", (t) => {
  t.deepEqual(parsePortList("8080, 9090 ,80"), [80, 8080, 9090]);
  t.deepEqual(parsePortList(" 443 "), [443]);
  t.deepEqual(parsePortList("8080,8080"), [8080]);
  t.deepEqual(parsePortList(""), []);
  t.deepEqual(parsePortList("  "), []);
});

test("port list rejects bad entries", (t) => {
  const cases: [string, RegExp][] = [
    ["http", /"http" is not a port number/],
    ["80,,81", /empty entry/],
    ["80,", /empty entry/],
    ["0", /outside 1-65535/],
    ["65536", /outside 1-65535/],
    ["-1", /not a port number/],
    ["80;81", /not a port number/],
    ["8080-8090", /not a port number/],
    ["15001", /proxy ports/],
    ["80, 15006", /proxy ports/],
    ["15008", /proxy ports/],
  ];
  for (const [value, message] of cases) {
    t.throws(() => parsePortList(value), { message }, value);
  }
});

test("annotations give excluded ports", (t) => {
  const ports = excludedPortsOf(
    workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090, 8081", [EXCLUDE_OUTBOUND_PORTS_ANNOTATION]: "5432" }),
  );
  t.deepEqual(ports, { inbound: [8081, 9090], outbound: [5432] });
  t.deepEqual(excludedPortsOf(workload({})), { inbound: [], outbound: [] });
  t.deepEqual(excludedPortsOf({ ...workload({}), annotations: undefined }), { inbound: [], outbound: [] });
});

test("bad annotation names pod and value", (t) => {
  const error = t.throws(() => excludedPortsOf(workload({ [EXCLUDE_OUTBOUND_PORTS_ANNOTATION]: "5432,abc" })), {
    instanceOf: AgentError,
  });
  t.is(error?.code, "INVALID_ANNOTATION");
  t.regex(error?.message ?? "", /shop\/cart/);
  t.regex(error?.message ?? "", /traffic\.sidecar\.istio\.io\/excludeOutboundPorts/);
  t.regex(error?.message ?? "", /"5432,abc"/);
  t.regex(error?.message ?? "", /no port of the pod is excluded/);
});

test("manifest pod keeps its annotations", (t) => {
  const result = parseManifests(
    "pods.yaml",
    `apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  annotations:
    traffic.sidecar.istio.io/excludeInboundPorts: "9090"
spec: {nodeName: exm1}
status: {podIP: 10.1.0.5}
`,
  );
  t.deepEqual(result.problems, []);
  const pod = result.objects.find((object) => object.kind === "Pod");
  if (pod?.kind !== "Pod") return t.fail("the manifest gave no Pod");
  const parsed = pod.value;
  t.deepEqual(parsed.annotations, { [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090" });
  t.deepEqual(excludedPortsOf(parsed), { inbound: [9090], outbound: [] });
});

test("probe source option parsing", (t) => {
  t.deepEqual(parseProbeSources(undefined), [...DEFAULT_PROBE_SOURCES]);
  t.deepEqual(parseProbeSources([]), [...DEFAULT_PROBE_SOURCES]);
  t.deepEqual(parseProbeSources(["10.0.0.9, fd00::9", "10.0.0.8"]), ["10.0.0.9", "fd00::9", "10.0.0.8"]);
  t.deepEqual(parseProbeSources(["10.0.0.9", "10.0.0.9"]), ["10.0.0.9"]);
  t.deepEqual(parseProbeSources(["none"]), []);
  t.throws(() => parseProbeSources(["none,10.0.0.9"]), { message: /"none" cannot be combined/ });
  t.throws(() => parseProbeSources(["kubelet"]), { message: /invalid --probe-source "kubelet"/ });
  t.throws(() => parseProbeSources(["10.0.0.0/8"]), { message: /invalid --probe-source/ });
  const many = Array.from({ length: 17 }, (_, index) => `10.0.0.${index + 1}`);
  t.throws(() => parseProbeSources(many), { message: /at most 16/ });
});

test("ip bytes of both families", (t) => {
  t.deepEqual([...ipBytes("10.1.2.3")], [10, 1, 2, 3]);
  t.deepEqual([...ipBytes("::1")], [...new Array(15).fill(0), 1]);
  t.deepEqual([...ipBytes("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")], [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
  ]);
  t.deepEqual([...ipBytes("::ffff:10.0.0.1")], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
  t.deepEqual([...ipv6OrMappedBytes("169.254.7.127")], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 169, 254, 7, 127]);
  t.is(formatIpBytes(ipBytes("fd00:aa:20::2")), "fd00:aa:20::2");
  t.is(formatIpBytes(ipv6OrMappedBytes("10.0.0.1")), "::ffff:10.0.0.1");
  t.throws(() => ipBytes("10.0.0.256"), { instanceOf: TypeError });
});

test("probe source key round trip", (t) => {
  for (const address of DEFAULT_PROBE_SOURCES) {
    const key = encodeProbeSourceKey(address);
    t.is(key.length, STRUCT_LAYOUTS.aa_probe_source_key.size);
    t.is(decodeProbeSourceKey(key), address);
  }
});

test("excluded port key layout", (t) => {
  const key = encodeExcludedPortKey("10.1.0.5", 0x1f90, "outbound");
  const offsets = STRUCT_LAYOUTS.aa_excluded_port_key.offsets;
  t.is(key.length, STRUCT_LAYOUTS.aa_excluded_port_key.size);
  t.deepEqual([...key.subarray(offsets.pod_ip4, offsets.pod_ip4 + 4)], [10, 1, 0, 5]);
  // Host byte order: sk_lookup compares local_port and connect4 converts user_port with bpf_ntohs.
  t.deepEqual([...key.subarray(offsets.port, offsets.port + 2)], os.endianness() === "LE" ? [0x90, 0x1f] : [0x1f, 0x90]);
  t.is(key[offsets.direction], DIRECTION_CODES.outbound);
  t.is(key[offsets.pad], 0);
  t.deepEqual(decodeExcludedPortKey(key), { podIp: "10.1.0.5", port: 8080, direction: "outbound" });
  t.throws(() => encodeExcludedPortKey("fd00::5", 8080, "inbound"), { instanceOf: TypeError });
  t.throws(() => encodeExcludedPortKey("10.1.0.5", 0, "inbound"), { instanceOf: RangeError });
});

/** An in-memory exemption store that records the excluded ports per pod IP. */
class FakeStore implements CaptureExemptionStore {
  readonly ports = new Map<string, ExcludedPorts>();
  probe: readonly string[] = [];
  failWrites = false;

  setProbeSources(addresses: readonly string[]): void {
    this.probe = addresses;
  }

  setExcludedPorts(podIp: string, ports: ExcludedPorts): void {
    if (this.failWrites) throw new Error("map full");
    if (ports.inbound.length === 0 && ports.outbound.length === 0) this.ports.delete(podIp);
    else this.ports.set(podIp, ports);
  }

  clearExcludedPorts(podIp: string): void {
    this.ports.delete(podIp);
  }

  excludedPorts(): Map<string, ExcludedPorts> {
    return new Map(this.ports);
  }
}

interface LogLine {
  level: number;
  msg: string;
  excludedInboundPorts?: number[];
  excludedOutboundPorts?: number[];
}

function recordingLogger(): { logger: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(JSON.parse(chunk.toString()) as LogLine);
      done();
    },
  });
  return { logger: pino({ level: "debug" }, stream), lines };
}

/** Lets pino's stream deliver the lines written so far. */
const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test("writer logs every exclusion", async (t) => {
  const store = new FakeStore();
  const { logger, lines } = recordingLogger();
  const writer = new ExcludedPortsWriter(store, logger);

  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090", [EXCLUDE_OUTBOUND_PORTS_ANNOTATION]: "5432" }));
  await settle();
  t.deepEqual(store.ports.get("10.1.0.5"), { inbound: [9090], outbound: [5432] });
  const info = lines.find((line) => line.msg === "ports excluded from capture");
  t.is(info?.level, 30);
  t.deepEqual(info?.excludedInboundPorts, [9090]);
  t.deepEqual(info?.excludedOutboundPorts, [5432]);

  // The same annotations again write and log nothing.
  const count = lines.length;
  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090", [EXCLUDE_OUTBOUND_PORTS_ANNOTATION]: "5432" }));
  await settle();
  t.is(lines.length, count);

  writer.remove("shop/cart");
  await settle();
  t.false(store.ports.has("10.1.0.5"));
  t.truthy(lines.find((line) => line.msg === "excluded ports removed"));
});

test("writer fails closed on bad annotation", async (t) => {
  const store = new FakeStore();
  const { logger, lines } = recordingLogger();
  const writer = new ExcludedPortsWriter(store, logger);

  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090" }));
  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090,15006" }));
  await settle();
  t.false(store.ports.has("10.1.0.5"), "the earlier exclusion is gone");
  const errors = lines.filter((line) => line.level === 50);
  t.is(errors.length, 1);
  t.regex(errors[0].msg, /invalid traffic\.sidecar\.istio\.io\/excludeInboundPorts annotation "9090,15006"/);

  // The same bad value again is not logged again.
  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090,15006" }));
  await settle();
  t.is(lines.filter((line) => line.level === 50).length, 1);

  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9091" }));
  t.deepEqual(store.ports.get("10.1.0.5"), { inbound: [9091], outbound: [] });
});

test("writer follows an IP change", (t) => {
  const store = new FakeStore();
  const writer = new ExcludedPortsWriter(store, recordingLogger().logger);
  writer.apply(workload({ [EXCLUDE_OUTBOUND_PORTS_ANNOTATION]: "5432" }, "10.1.0.5"));
  writer.apply(workload({ [EXCLUDE_OUTBOUND_PORTS_ANNOTATION]: "5432" }, "10.1.0.6"));
  t.false(store.ports.has("10.1.0.5"));
  t.deepEqual(store.ports.get("10.1.0.6"), { inbound: [], outbound: [5432] });
});

test("writer clears on failed write", async (t) => {
  const store = new FakeStore();
  const { logger, lines } = recordingLogger();
  const writer = new ExcludedPortsWriter(store, logger);
  store.failWrites = true;
  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090" }));
  await settle();
  t.false(store.ports.has("10.1.0.5"));
  t.truthy(lines.find((line) => line.level === 50 && /failed to write/.test(line.msg)));
});

test("writer removes stale pod entries", (t) => {
  const store = new FakeStore();
  store.ports.set("10.1.0.99", { inbound: [80], outbound: [] });
  const writer = new ExcludedPortsWriter(store, recordingLogger().logger);
  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090" }));
  writer.removeStale();
  t.deepEqual([...store.ports.keys()], ["10.1.0.5"]);
});

test("IPv6 pod with exclusions is rejected", async (t) => {
  const store = new FakeStore();
  const { logger, lines } = recordingLogger();
  const writer = new ExcludedPortsWriter(store, logger);
  writer.apply(workload({ [EXCLUDE_INBOUND_PORTS_ANNOTATION]: "9090" }, "fd00::5"));
  await settle();
  t.is(store.ports.size, 0);
  t.truthy(lines.find((line) => line.level === 50));
});
