import test from "ava";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import { EndpointPicker, serviceEndpoints, type EndpointChoice } from "../../agent/state/endpoints";
import { MeshState } from "../../agent/state/mesh-state";

/** Renders a Pod manifest with label app=`app`, optional container ports, and extra lines for `metadata:` and `status:`. */
function pod(name: string, app: string, ip: string, options: { ports?: string; status?: string; metadata?: string } = {}): string {
  const ports = options.ports === undefined ? "" : `\n      ports: ${options.ports}`;
  return `apiVersion: v1
kind: Pod
metadata:
  name: ${name}
  namespace: shop
  labels: {app: ${app}}${options.metadata ?? ""}
spec:
  nodeName: node-b
  containers:
    - name: app
      image: example.invalid/app${ports}
status:
  podIP: "${ip}"${options.status ?? ""}
`;
}

function service(name: string, vip: string, selector: string, ports: string): string {
  return `apiVersion: v1
kind: Service
metadata: {name: ${name}, namespace: shop}
spec: {clusterIP: "${vip}", selector: ${selector}, ports: ${ports}}
`;
}

function mesh(...documents: string[]): MeshState {
  const namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
  const result = parseManifests("endpoints.yaml", [namespace, ...documents].join("---\n"));
  if (result.problems.length > 0) throw new Error(JSON.stringify(result.problems));
  return new MeshState(buildSnapshot(result.objects));
}

function picked(choice: EndpointChoice | undefined): { workload: string; ip: string; port: number } {
  if (choice?.kind !== "endpoint") throw new Error(`expected an endpoint, got ${JSON.stringify(choice)}`);
  return { workload: choice.endpoint.workload?.name ?? "", ip: choice.endpoint.ip, port: choice.endpoint.targetPort };
}

const NAMED_PORTS = "[{name: http, containerPort: 8080}]";

test("numeric target port", (t) => {
  const state = mesh(pod("api-1", "api", "10.244.2.10"), service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: 9090}]"));
  t.deepEqual(picked(new EndpointPicker().pick(state, "10.96.0.10", 80)), { workload: "api-1", ip: "10.244.2.10", port: 9090 });
});

test("absent target port is the port", (t) => {
  const state = mesh(pod("api-1", "api", "10.244.2.10"), service("api", "10.96.0.10", "{app: api}", "[{port: 8000}]"));
  t.is(picked(new EndpointPicker().pick(state, "10.96.0.10", 8000)).port, 8000);
});

test("named target port per endpoint", (t) => {
  const state = mesh(
    pod("api-1", "api", "10.244.2.10", { ports: "[{name: http, containerPort: 8080}]" }),
    pod("api-2", "api", "10.244.2.11", { ports: "[{name: http, containerPort: 8081}]" }),
    service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: http}]"),
  );
  const found = serviceEndpoints(state, "10.96.0.10", 80);
  if (found?.kind !== "endpoints") throw new Error(`expected endpoints, got ${JSON.stringify(found)}`);
  t.deepEqual(
    found.endpoints.map((endpoint) => [endpoint.workload?.name, endpoint.targetPort]),
    [["api-1", 8080], ["api-2", 8081]],
  );
});

test("endpoint without named port skipped", (t) => {
  const state = mesh(
    pod("api-1", "api", "10.244.2.10", { ports: "[{name: metrics, containerPort: 9090}]" }),
    pod("api-2", "api", "10.244.2.11", { ports: NAMED_PORTS }),
    service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: http}]"),
  );
  const picker = new EndpointPicker();
  for (let i = 0; i < 4; i++) {
    t.deepEqual(picked(picker.pick(state, "10.96.0.10", 80)), { workload: "api-2", ip: "10.244.2.11", port: 8080 });
  }
});

test("unready pods skipped", (t) => {
  const state = mesh(
    pod("ready", "api", "10.244.2.10"),
    pod("running-explicit", "api", "10.244.2.11", { status: "\n  phase: Running\n  conditions: [{type: Ready, status: \"True\"}]" }),
    pod("pending", "api", "10.244.2.12", { status: "\n  phase: Pending" }),
    pod("failed", "api", "10.244.2.13", { status: "\n  phase: Failed" }),
    pod("not-ready", "api", "10.244.2.14", { status: "\n  phase: Running\n  conditions: [{type: Ready, status: \"False\"}]" }),
    pod("unknown-ready", "api", "10.244.2.15", { status: "\n  conditions: [{type: Ready, status: \"Unknown\"}]" }),
    pod("deleting", "api", "10.244.2.16", { metadata: "\n  deletionTimestamp: \"2026-03-01T10:00:00Z\"" }),
    pod("no-ip", "api", ""),
    service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: 8080}]"),
  );
  const found = serviceEndpoints(state, "10.96.0.10", 80);
  if (found?.kind !== "endpoints") throw new Error(`expected endpoints, got ${JSON.stringify(found)}`);
  t.deepEqual(found.endpoints.map((endpoint) => endpoint.workload?.name), ["ready", "running-explicit"]);
});

test("pod readiness from status", (t) => {
  const state = mesh(
    pod("plain", "a", "10.244.2.10"),
    pod("pending", "a", "10.244.2.11", { status: "\n  phase: Pending" }),
    pod("not-ready", "a", "10.244.2.12", { status: "\n  conditions: [{type: PodScheduled, status: \"True\"}, {type: Ready, status: \"False\"}]" }),
    pod("other-condition-false", "a", "10.244.2.13", { status: "\n  conditions: [{type: ContainersReady, status: \"False\"}]" }),
  );
  t.true(state.workload("shop/plain")?.ready);
  t.false(state.workload("shop/pending")?.ready);
  t.false(state.workload("shop/not-ready")?.ready);
  t.true(state.workload("shop/other-condition-false")?.ready);
});

test("invalid phase rejected", (t) => {
  const result = parseManifests("bad.yaml", pod("odd", "a", "10.244.2.10", { status: "\n  phase: Sleeping" }));
  t.is(result.problems.length, 1);
  t.is(result.problems[0].field, "status.phase");
  t.regex(result.problems[0].message, /invalid phase "Sleeping"; use one of Pending, Running/);
});

test("even spread over endpoints", (t) => {
  const pods = [1, 2, 3, 4, 5].map((n) => pod(`api-${n}`, "api", `10.244.2.${n + 9}`, { ports: NAMED_PORTS }));
  const state = mesh(...pods, service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: http}, {name: alt, port: 81, targetPort: 8080}]"));
  for (const random of [0, 0.5, 0.999]) {
    const picker = new EndpointPicker(() => random);
    const counts = new Map<string, number>();
    for (let i = 0; i < 7 * pods.length; i++) {
      const name = picked(picker.pick(state, "10.96.0.10", 80)).workload;
      counts.set(name, (counts.get(name) ?? 0) + 1);
      // Picks on another port of the same Service use their own counter and must not skew port 80.
      if (i % 3 === 0) picker.pick(state, "10.96.0.10", 81);
    }
    t.deepEqual([...counts.values()], [7, 7, 7, 7, 7], `random ${random}: ${JSON.stringify([...counts])}`);
  }
});

test("random start index", (t) => {
  const pods = [1, 2, 3, 4].map((n) => pod(`api-${n}`, "api", `10.244.2.${n + 9}`));
  const state = mesh(...pods, service("api", "10.96.0.10", "{app: api}", "[{port: 80}]"));
  t.is(picked(new EndpointPicker(() => 0).pick(state, "10.96.0.10", 80)).workload, "api-1");
  t.is(picked(new EndpointPicker(() => 0.5).pick(state, "10.96.0.10", 80)).workload, "api-3");
  t.is(picked(new EndpointPicker(() => 0.99).pick(state, "10.96.0.10", 80)).workload, "api-4");
});

test("spread survives a shrinking endpoint set", (t) => {
  const three = [1, 2, 3].map((n) => pod(`api-${n}`, "api", `10.244.2.${n + 9}`));
  const svc = service("api", "10.96.0.10", "{app: api}", "[{port: 80}]");
  const picker = new EndpointPicker(() => 0.9);
  t.is(picked(picker.pick(mesh(...three, svc), "10.96.0.10", 80)).workload, "api-3");
  const two = mesh(three[0], three[1], svc);
  const names = [0, 1, 2, 3].map(() => picked(picker.pick(two, "10.96.0.10", 80)).workload);
  t.deepEqual(names.sort(), ["api-1", "api-1", "api-2", "api-2"]);
});

test("no pod matches selector", (t) => {
  const state = mesh(pod("web", "web", "10.244.2.10"), service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: http}]"));
  const choice = new EndpointPicker().pick(state, "10.96.0.10", 80);
  t.is(choice?.kind, "unavailable");
  if (choice?.kind !== "unavailable") return;
  t.is(choice.reason, "no_healthy_endpoint");
  t.is(choice.service.uid, "shop/api");
  t.regex(choice.message, /^Service shop\/api port 80 has no ready endpoint: no pod matches its selector app=api;/);
});

test("matching pods lack named port", (t) => {
  const state = mesh(pod("api-1", "api", "10.244.2.10"), service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: http}]"));
  const choice = new EndpointPicker().pick(state, "10.96.0.10", 80);
  if (choice?.kind !== "unavailable") throw new Error(`expected unavailable, got ${JSON.stringify(choice)}`);
  t.is(choice.reason, "no_healthy_endpoint");
  t.regex(choice.message, /Service shop\/api port 80 has no ready endpoint: matching pods do not define the named port http;/);
});

test("matching pods not ready", (t) => {
  const state = mesh(
    pod("api-1", "api", "10.244.2.10", { status: "\n  phase: Pending" }),
    service("api", "10.96.0.10", "{app: api}", "[{port: 80}]"),
  );
  const choice = new EndpointPicker().pick(state, "10.96.0.10", 80);
  if (choice?.kind !== "unavailable") throw new Error(`expected unavailable, got ${JSON.stringify(choice)}`);
  t.is(choice.reason, "no_healthy_endpoint");
  t.regex(choice.message, /the matching pods \(api-1\) are not ready or have no IP/);
});

test("service without selector", (t) => {
  const state = mesh(pod("api-1", "api", "10.244.2.10"), service("api", "10.96.0.10", "{}", "[{port: 80}]"));
  const choice = new EndpointPicker().pick(state, "10.96.0.10", 80);
  if (choice?.kind !== "unavailable") throw new Error(`expected unavailable, got ${JSON.stringify(choice)}`);
  t.is(choice.reason, "no_healthy_endpoint");
  t.regex(choice.message, /the Service has no selector/);
});

test("unknown service port", (t) => {
  const state = mesh(pod("api-1", "api", "10.244.2.10"), service("api", "10.96.0.10", "{app: api}", "[{port: 80}, {name: dns, port: 53, protocol: UDP}]"));
  for (const port of [443, 53]) {
    const choice = new EndpointPicker().pick(state, "10.96.0.10", port);
    if (choice?.kind !== "unavailable") throw new Error(`expected unavailable, got ${JSON.stringify(choice)}`);
    t.is(choice.reason, "no_service_port");
    t.is(choice.message, `Service shop/api has no TCP port ${port}: it exposes TCP 80; dial one of those or add the port to the Service`);
  }
});

test("address that is no VIP", (t) => {
  const state = mesh(pod("api-1", "api", "10.244.2.10"), service("api", "10.96.0.10", "{app: api}", "[{port: 80}]"));
  t.is(new EndpointPicker().pick(state, "10.244.2.10", 80), undefined);
  t.is(serviceEndpoints(state, "10.96.0.11", 80), undefined);
});

test("VIP in IPv4-mapped form", (t) => {
  const state = mesh(pod("api-1", "api", "10.244.2.10"), service("api", "10.96.0.10", "{app: api}", "[{port: 80}]"));
  t.is(picked(new EndpointPicker().pick(state, "::ffff:10.96.0.10", 80)).workload, "api-1");
});

test("counters of removed services dropped", (t) => {
  const picker = new EndpointPicker(() => 0);
  const withService = mesh(pod("api-1", "api", "10.244.2.10"), pod("api-2", "api", "10.244.2.11"), service("api", "10.96.0.10", "{app: api}", "[{port: 80}]"));
  t.is(picked(picker.pick(withService, "10.96.0.10", 80)).workload, "api-1");
  t.is(picker.pick(mesh(pod("api-1", "api", "10.244.2.10")), "10.96.0.10", 80), undefined);
  // The Service is back: its counter starts again at the random index instead of continuing.
  t.is(picked(picker.pick(withService, "10.96.0.10", 80)).workload, "api-1");
});
