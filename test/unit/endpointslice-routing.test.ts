import test from "ava";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import { EndpointPicker, serviceEndpoints, type ServicePortEndpoints } from "../../agent/state/endpoints";
import { MeshState } from "../../agent/state/mesh-state";

const NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

/** Renders a Pod with label app=`app` and one or two IPs (status.podIPs). */
function pod(name: string, app: string, ips: string[], ports = ""): string {
  const podIps = ips.map((ip) => `{ip: "${ip}"}`).join(", ");
  return `apiVersion: v1
kind: Pod
metadata: {name: ${name}, namespace: shop, labels: {app: ${app}}}
spec:
  nodeName: node-b
  containers: [{name: app, image: example.invalid/app, ports: [${ports}]}]
status: {podIP: "${ips[0]}", podIPs: [${podIps}]}
`;
}

function service(name: string, vips: string[], selector: string, ports: string): string {
  const clusterIps = vips.map((vip) => `"${vip}"`).join(", ");
  return `apiVersion: v1
kind: Service
metadata: {name: ${name}, namespace: shop}
spec: {clusterIP: "${vips[0]}", clusterIPs: [${clusterIps}], selector: ${selector}, ports: ${ports}}
`;
}

/** Renders an EndpointSlice of Service `serviceName`. `endpoints` and `ports` are YAML flow lists. */
function slice(name: string, serviceName: string, addressType: string, endpoints: string, ports: string): string {
  return `apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ${name}, namespace: shop, labels: {kubernetes.io/service-name: ${serviceName}}}
addressType: ${addressType}
endpoints: ${endpoints}
ports: ${ports}
`;
}

function mesh(...documents: string[]): MeshState {
  const result = parseManifests("slices.yaml", [NAMESPACE, ...documents].join("---\n"));
  if (result.problems.length > 0) throw new Error(JSON.stringify(result.problems));
  return new MeshState(buildSnapshot(result.objects));
}

/** Lists the endpoints as "workload ip:port" ("-" for an address without workload). */
function listed(found: ServicePortEndpoints | undefined): string[] {
  if (found?.kind !== "endpoints") throw new Error(`expected endpoints, got ${JSON.stringify(found)}`);
  return found.endpoints.map((endpoint) => `${endpoint.workload?.uid ?? "-"} ${endpoint.ip}:${endpoint.targetPort}`);
}

/** Returns the message of an unavailable Service port; its reason is always no_healthy_endpoint here. */
function unavailable(found: ServicePortEndpoints | undefined): string {
  if (found?.kind !== "unavailable") throw new Error(`expected unavailable, got ${JSON.stringify(found)}`);
  if (found.reason !== "no_healthy_endpoint") throw new Error(`expected no_healthy_endpoint, got ${found.reason}`);
  return found.message;
}

const API_PODS = [pod("api-1", "api", ["10.244.1.1"], "{name: http, containerPort: 8080}"), pod("api-2", "api", ["10.244.1.2"], "{name: http, containerPort: 8080}")];
const API_SERVICE = service("api", ["10.96.0.10"], "{app: api}", "[{name: http, port: 80, targetPort: http}]");

test("slices replace selector", (t) => {
  const state = mesh(
    ...API_PODS,
    pod("other", "other", ["10.244.1.3"]),
    API_SERVICE,
    slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.3"], targetRef: {kind: Pod, name: other}}]', "[{name: http, port: 9000}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/other 10.244.1.3:9000"]);
});

test("unready slice endpoint skipped", (t) => {
  const state = mesh(
    ...API_PODS,
    API_SERVICE,
    slice(
      "api-a",
      "api",
      "IPv4",
      '[{addresses: ["10.244.1.1"], conditions: {ready: false, serving: true, terminating: true}}, {addresses: ["10.244.1.2"], conditions: {}}]',
      "[{name: http, port: 8080}]",
    ),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-2 10.244.1.2:8080"]);
});

test("all slice endpoints unready", (t) => {
  const state = mesh(
    ...API_PODS,
    API_SERVICE,
    slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"], conditions: {ready: false}}]', "[{name: http, port: 8080}]"),
  );
  const message = unavailable(serviceEndpoints(state, "10.96.0.10", 80));
  t.is(message, 'Service shop/api port 80 has no ready endpoint: its IPv4 EndpointSlices list no ready endpoint for port name "http"; check the readiness of the pods behind them');
  t.is(new EndpointPicker().pick(state, "10.96.0.10", 80)?.kind, "unavailable");
});

test("named ports per slice", (t) => {
  const state = mesh(
    ...API_PODS,
    service("api", ["10.96.0.10"], "{app: api}", "[{name: http, port: 80, targetPort: http}, {name: metrics, port: 9100, targetPort: 9100}]"),
    slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"]}]', "[{name: metrics, port: 9101}, {name: http, port: 8080}]"),
    slice("api-b", "api", "IPv4", '[{addresses: ["10.244.1.2"]}]', "[{name: http, port: 8081}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-1 10.244.1.1:8080", "shop/api-2 10.244.1.2:8081"]);
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 9100)), ["shop/api-1 10.244.1.1:9101"]);
});

test("unnamed port matches unnamed", (t) => {
  const state = mesh(
    ...API_PODS,
    service("api", ["10.96.0.10"], "{app: api}", "[{port: 80, targetPort: 8080}]"),
    slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"]}]', "[{port: 8080}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-1 10.244.1.1:8080"]);
});

test("slice port name mismatch", (t) => {
  const state = mesh(...API_PODS, API_SERVICE, slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"]}]', "[{port: 8080}, {name: grpc, port: 9090}]"));
  t.is(
    unavailable(serviceEndpoints(state, "10.96.0.10", 80)),
    'Service shop/api port 80 has no ready endpoint: its IPv4 EndpointSlices list no TCP port with port name "http" and a number; the slice port names must match the Service port names',
  );
});

test("slice port without number", (t) => {
  const state = mesh(...API_PODS, API_SERVICE, slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"]}]', "[{name: http}]"));
  t.regex(unavailable(serviceEndpoints(state, "10.96.0.10", 80)), /list no TCP port with port name "http" and a number/);
});

test("slice port of other protocol", (t) => {
  const state = mesh(...API_PODS, API_SERVICE, slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"]}]', "[{name: http, port: 8080, protocol: UDP}]"));
  t.is(serviceEndpoints(state, "10.96.0.10", 80)?.kind, "unavailable");
});

test("address without workload", (t) => {
  const state = mesh(
    service("external", ["10.96.0.20"], "{}", "[{port: 5432}]"),
    slice("external-a", "external", "IPv4", '[{addresses: ["192.0.2.10"]}]', "[{port: 5432}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.20", 5432)), ["- 192.0.2.10:5432"]);
  const choice = new EndpointPicker().pick(state, "10.96.0.20", 5432);
  if (choice?.kind !== "endpoint") throw new Error(`expected an endpoint, got ${JSON.stringify(choice)}`);
  t.is(choice.endpoint.workload, undefined);
  t.is(choice.endpoint.ip, "192.0.2.10");
  t.is(choice.endpoint.targetPort, 5432);
});

test("workload found by IP", (t) => {
  const state = mesh(
    ...API_PODS,
    service("manual", ["10.96.0.30"], "{}", "[{port: 80}]"),
    slice("manual-a", "manual", "IPv4", '[{addresses: ["10.244.1.2"]}]', "[{port: 8080}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.30", 80)), ["shop/api-2 10.244.1.2:8080"]);
});

test("stale targetRef uses pod at address", (t) => {
  const state = mesh(
    ...API_PODS,
    API_SERVICE,
    slice(
      "api-a",
      "api",
      "IPv4",
      '[{addresses: ["10.244.1.2"], targetRef: {kind: Pod, name: api-1}}, {addresses: ["10.244.9.9"], targetRef: {kind: Pod, name: api-1}}]',
      "[{name: http, port: 8080}]",
    ),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-2 10.244.1.2:8080", "- 10.244.9.9:8080"]);
});

test("address in two slices once", (t) => {
  const state = mesh(
    ...API_PODS,
    API_SERVICE,
    slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"]}, {addresses: ["10.244.1.2"]}]', "[{name: http, port: 8080}]"),
    slice("api-b", "api", "IPv4", '[{addresses: ["10.244.1.1"]}]', "[{name: http, port: 8080}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-1 10.244.1.1:8080", "shop/api-2 10.244.1.2:8080"]);
});

test("slices of both families", (t) => {
  const state = mesh(
    pod("api-1", "api", ["10.244.1.1", "fd00:244::1"]),
    pod("api-2", "api", ["10.244.1.2", "fd00:244::2"]),
    service("api", ["10.96.0.10", "fd00:96::10"], "{app: api}", "[{name: http, port: 80, targetPort: 8080}]"),
    slice("api-v4", "api", "IPv4", '[{addresses: ["10.244.1.1"]}, {addresses: ["10.244.1.2"]}]', "[{name: http, port: 8080}]"),
    slice("api-v6", "api", "IPv6", '[{addresses: ["fd00:244::2"], targetRef: {kind: Pod, name: api-2}}]', "[{name: http, port: 8080}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-1 10.244.1.1:8080", "shop/api-2 10.244.1.2:8080"]);
  t.deepEqual(listed(serviceEndpoints(state, "fd00:96::10", 80)), ["shop/api-2 fd00:244::2:8080"]);
  t.deepEqual(listed(serviceEndpoints(state, "FD00:96:0::10", 80)), ["shop/api-2 fd00:244::2:8080"]);
});

test("no slice of VIP family", (t) => {
  const state = mesh(
    ...API_PODS,
    service("api", ["fd00:96::10"], "{app: api}", "[{name: http, port: 80, targetPort: 8080}]"),
    slice("api-v4", "api", "IPv4", '[{addresses: ["10.244.1.1"]}]', "[{name: http, port: 8080}]"),
  );
  t.is(
    unavailable(serviceEndpoints(state, "fd00:96::10", 80)),
    "Service shop/api port 80 has no ready endpoint: none of its EndpointSlices has addressType IPv6; check the Service's ipFamilies and its EndpointSlices",
  );
});

test("FQDN slice gives no endpoint", (t) => {
  const state = mesh(
    ...API_PODS,
    API_SERVICE,
    slice("api-dns", "api", "FQDN", '[{addresses: ["api.example.com"]}]', "[{name: http, port: 8080}]"),
  );
  t.regex(unavailable(serviceEndpoints(state, "10.96.0.10", 80)), /none of its EndpointSlices has addressType IPv4/);
});

test("selector without slices", (t) => {
  const state = mesh(
    ...API_PODS,
    API_SERVICE,
    slice("web-a", "web", "IPv4", '[{addresses: ["10.244.1.9"]}]', "[{name: http, port: 8080}]"),
    slice("orphan", "", "IPv4", '[{addresses: ["10.244.1.9"]}]', "[{name: http, port: 8080}]").replace("{kubernetes.io/service-name: }", "{}"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-1 10.244.1.1:8080", "shop/api-2 10.244.1.2:8080"]);
  t.deepEqual(state.endpointSlicesForService(state.service("shop/api")!), []);
  const web = { ...state.service("shop/api")!, uid: "shop/web", name: "web" };
  t.deepEqual(state.endpointSlicesForService(web).map((item) => item.uid), ["shop/web-a"]);
});

test("selector endpoint IP follows VIP family", (t) => {
  const state = mesh(
    pod("api-1", "api", ["10.244.1.1", "fd00:244::1"]),
    pod("api-2", "api", ["10.244.1.2"]),
    service("api", ["10.96.0.10", "fd00:96::10"], "{app: api}", "[{name: http, port: 80, targetPort: 8080}]"),
  );
  t.deepEqual(listed(serviceEndpoints(state, "10.96.0.10", 80)), ["shop/api-1 10.244.1.1:8080", "shop/api-2 10.244.1.2:8080"]);
  t.deepEqual(listed(serviceEndpoints(state, "fd00:96::10", 80)), ["shop/api-1 fd00:244::1:8080", "shop/api-2 10.244.1.2:8080"]);
});

test("picker turns over slice endpoints", (t) => {
  const state = mesh(
    ...API_PODS,
    API_SERVICE,
    slice("api-a", "api", "IPv4", '[{addresses: ["10.244.1.1"]}, {addresses: ["192.0.2.10"]}]', "[{name: http, port: 8080}]"),
  );
  const picker = new EndpointPicker(() => 0);
  const ips: string[] = [];
  for (let i = 0; i < 4; i++) {
    const choice = picker.pick(state, "10.96.0.10", 80);
    if (choice?.kind !== "endpoint") throw new Error(`expected an endpoint, got ${JSON.stringify(choice)}`);
    ips.push(choice.endpoint.ip);
  }
  t.deepEqual(ips, ["10.244.1.1", "192.0.2.10", "10.244.1.1", "192.0.2.10"]);
});
