import test from "ava";
import { ManifestMerge } from "../../agent/discovery/manifest-merge";
import { parseApiObject } from "../../agent/discovery/manifest-parse";
import type { ParsedObject } from "../../agent/discovery/manifest-problem";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import type { EndpointSlice } from "../../agent/state/types";

const SLICE = `apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-abc12
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv6
endpoints:
  - addresses: ["FD00::0A"]
    nodeName: node-b
    targetRef: {kind: Pod, name: api-1}
  - addresses: ["fd00::b"]
    conditions: {ready: false, serving: true, terminating: true}
    targetRef: {kind: Pod, namespace: other, name: api-2}
    zone: zone-a
ports:
  - {name: http, port: 8080, protocol: TCP, appProtocol: http}
  - {port: 9090}
  - {name: any}
`;

function parseSlice(text: string): { slice?: EndpointSlice; problems: string[] } {
  const result = parseManifests("slices.yaml", text);
  const problems = result.problems.map((problem) => `${problem.field}: ${problem.message}`);
  const object = result.objects[0];
  return { slice: object?.kind === "EndpointSlice" ? object.value : undefined, problems };
}

/** Replaces `from` by `to` in the sample slice. */
function variant(from: string, to: string): string {
  if (!SLICE.includes(from)) throw new Error(`sample has no ${from}`);
  return SLICE.replace(from, to);
}

test("slice fields and defaults", (t) => {
  const { slice, problems } = parseSlice(SLICE);
  t.deepEqual(problems, []);
  t.truthy(slice);
  t.is(slice!.uid, "shop/api-abc12");
  t.is(slice!.service, "api");
  t.is(slice!.addressType, "IPv6");
  t.deepEqual(slice!.endpoints[0], {
    addresses: ["fd00::a"],
    ready: true,
    serving: true,
    terminating: false,
    nodeName: "node-b",
    targetRef: { kind: "Pod", namespace: "shop", name: "api-1" },
  });
  t.deepEqual(slice!.endpoints[1], {
    addresses: ["fd00::b"],
    ready: false,
    serving: true,
    terminating: true,
    targetRef: { kind: "Pod", namespace: "other", name: "api-2" },
  });
  t.deepEqual(slice!.ports, [
    { name: "http", port: 8080, protocol: "TCP" },
    { name: "", port: 9090, protocol: "TCP" },
    { name: "any", protocol: "TCP" },
  ]);
});

test("slice without service label", (t) => {
  const { slice, problems } = parseSlice(variant("  labels: {kubernetes.io/service-name: api}\n", ""));
  t.deepEqual(problems, []);
  t.is(slice?.service, "");
});

test("FQDN slice read", (t) => {
  const text = variant("addressType: IPv6", "addressType: FQDN").replace('["FD00::0A"]', '["db.example.com"]').replace('["fd00::b"]', '["db2.example.com"]');
  const { slice, problems } = parseSlice(text);
  t.deepEqual(problems, []);
  t.deepEqual(slice?.endpoints.map((endpoint) => endpoint.addresses[0]), ["db.example.com", "db2.example.com"]);
});

const INVALID: { name: string; text: string; field: string; message: RegExp }[] = [
  { name: "unknown address type", text: variant("addressType: IPv6", "addressType: IP"), field: "addressType", message: /invalid addressType "IP"; use IPv4, IPv6, FQDN/ },
  { name: "missing address type", text: variant("addressType: IPv6\n", ""), field: "addressType", message: /missing value/ },
  { name: "address of other family", text: variant('["FD00::0A"]', '["10.0.0.1"]'), field: "endpoints[0].addresses[0]", message: /invalid IPv6 address "10.0.0.1"/ },
  { name: "mapped IPv4 in IPv6 slice", text: variant('["FD00::0A"]', '["::ffff:10.0.0.1"]'), field: "endpoints[0].addresses[0]", message: /invalid IPv6 address/ },
  { name: "missing addresses", text: variant('  - addresses: ["FD00::0A"]\n    nodeName', "  - nodeName"), field: "endpoints[0].addresses", message: /missing addresses/ },
  { name: "condition not boolean", text: variant("ready: false", 'ready: "no"'), field: "endpoints[1].conditions.ready", message: /expected true or false/ },
  { name: "misspelt condition", text: variant("serving: true", "servng: true"), field: "endpoints[1].conditions.servng", message: /unknown field/ },
  { name: "misspelt endpoint field", text: variant("nodeName: node-b", "node: node-b"), field: "endpoints[0].node", message: /unknown field/ },
  { name: "spec is not a field", text: `${SLICE}spec: {}\n`, field: "spec", message: /unknown field; expected one of apiVersion, kind, metadata, addressType, endpoints, ports/ },
  { name: "invalid port name", text: variant("name: http,", "name: HTTP,"), field: "ports[0].name", message: /invalid port name "HTTP"/ },
  { name: "invalid port number", text: variant("port: 9090", "port: 0"), field: "ports[1].port", message: /invalid port 0/ },
  { name: "invalid protocol", text: variant("protocol: TCP", "protocol: HTTP"), field: "ports[0].protocol", message: /invalid protocol "HTTP"/ },
  { name: "duplicate port name", text: variant("{name: any}", "{name: http, port: 8081}"), field: "ports[2].name", message: /duplicate port name "http"/ },
];

for (const item of INVALID) {
  test(`slice rejected: ${item.name}`, (t) => {
    const result = parseManifests("slices.yaml", item.text);
    t.deepEqual(result.objects, []);
    const problem = result.problems.find((candidate) => candidate.field === item.field);
    t.truthy(problem, JSON.stringify(result.problems));
    t.regex(problem?.message ?? "", item.message);
    t.is(problem?.object, "EndpointSlice shop/api-abc12");
  });
}

test("too many addresses rejected", (t) => {
  const addresses = Array.from({ length: 101 }, (_, index) => `"fd00::${(index + 1).toString(16)}"`).join(", ");
  const result = parseManifests("slices.yaml", variant('["FD00::0A"]', `[${addresses}]`));
  t.deepEqual(result.objects, []);
  t.regex(result.problems[0]?.message ?? "", /101 addresses; an endpoint has at most 100/);
});

test("v1beta1 slice skipped", (t) => {
  const result = parseManifests("slices.yaml", variant("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"));
  t.deepEqual(result.objects, []);
  t.deepEqual(result.problems, []);
});

test("misspelt kind rejected", (t) => {
  const result = parseManifests("slices.yaml", variant("kind: EndpointSlice", "kind: Endpointslice"));
  t.deepEqual(result.objects, []);
  t.regex(result.problems[0]?.message ?? "", /kinds are case-sensitive, write EndpointSlice/);
});

test("slice from API object", (t) => {
  const value = {
    apiVersion: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    metadata: { name: "api-x", namespace: "shop", labels: { "kubernetes.io/service-name": "api" }, resourceVersion: "7" },
    addressType: "IPv4",
    endpoints: [{ addresses: ["10.244.1.5"], conditions: { ready: true }, targetRef: { kind: "Pod", namespace: "shop", name: "api-1", uid: "u" } }],
    ports: [{ name: "", port: 8080, protocol: "TCP" }],
  };
  const { object, problems } = parseApiObject(value, { file: "kubernetes:endpointslices", document: 0 });
  t.deepEqual(problems, []);
  t.is(object?.kind, "EndpointSlice");
  t.is(object?.key, "EndpointSlice shop/api-x");
  if (object?.kind !== "EndpointSlice") return;
  t.deepEqual(object.value.endpoints[0].targetRef, { kind: "Pod", namespace: "shop", name: "api-1" });
  t.deepEqual(object.value.ports, [{ name: "", port: 8080, protocol: "TCP" }]);
});

test("snapshot holds slices only when present", (t) => {
  const namespace = parseManifests("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n").objects;
  t.false("endpointSlices" in buildSnapshot(namespace));
  const withSlice = buildSnapshot([...namespace, ...parseManifests("slices.yaml", SLICE).objects]);
  t.deepEqual([...(withSlice.endpointSlices?.keys() ?? [])], ["shop/api-abc12"]);
});

test("merge adds and removes slices", (t) => {
  const merge = new ManifestMerge();
  const objects = new Map<string, ParsedObject>(parseManifests("slices.yaml", SLICE).objects.map((object) => [object.key, object]));
  const files = new Map<string, ReadonlyMap<string, ParsedObject> | undefined>([["slices.yaml", objects]]);
  const added = merge.update(files, () => objects, () => t.fail("no duplicate expected"));
  t.deepEqual([...(added?.endpointSlices?.keys() ?? [])], ["shop/api-abc12"]);

  const removed = merge.update(new Map([["slices.yaml", undefined]]), () => undefined, () => t.fail("no duplicate expected"));
  t.is(removed?.endpointSlices?.size, 0);
  t.is(added?.endpointSlices?.size, 1, "a published snapshot is never changed");
});
