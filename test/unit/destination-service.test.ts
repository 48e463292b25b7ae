import test from "ava";
import { buildSnapshot } from "../../agent/discovery/manifest-source";
import { parseManifests } from "../../agent/discovery/manifests";
import { guessInboundService, inboundServiceOf, serviceHostname } from "../../agent/state/destination-service";
import { MeshState } from "../../agent/state/mesh-state";

function pod(name: string, app: string, ip: string, ports = "[]"): string {
  return `apiVersion: v1
kind: Pod
metadata: {name: ${name}, namespace: shop, labels: {app: ${app}, tier: web}}
spec:
  nodeName: node-b
  containers: [{name: app, image: example.invalid/app, ports: ${ports}}]
status: {podIP: "${ip}"}
`;
}

function service(name: string, vip: string, selector: string, ports: string, namespace = "shop"): string {
  return `apiVersion: v1
kind: Service
metadata: {name: ${name}, namespace: ${namespace}}
spec: {clusterIP: "${vip}", selector: ${selector}, ports: ${ports}}
`;
}

function mesh(...documents: string[]): MeshState {
  const namespaces = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n";
  const result = parseManifests("services.yaml", [namespaces, ...documents].join("---\n"));
  if (result.problems.length > 0) throw new Error(JSON.stringify(result.problems));
  return new MeshState(buildSnapshot(result.objects));
}

/** api-1 serves "api" (80 → 9090), "admin" (81 → named port admin, 7070 on the pod) and "web" (selects tier=web, 8080 → 9090). */
const state = mesh(
  pod("api-1", "api", "10.244.2.10", "[{name: admin, containerPort: 7070}]"),
  service("api", "10.96.0.10", "{app: api}", "[{port: 80, targetPort: 9090}]"),
  service("admin", "10.96.0.11", "{app: api}", "[{port: 81, targetPort: admin}]"),
  service("web", "10.96.0.12", "{tier: web}", "[{port: 8080, targetPort: 9090}]"),
  service("other-api", "10.96.0.13", "{app: api}", "[{port: 80, targetPort: 9090}]", "other"),
  service("db", "10.96.0.14", "{app: db}", "[{port: 5432}]"),
);

test("serviceHostname of a uid", (t) => {
  t.is(serviceHostname("backend/api"), "api.backend.svc.cluster.local");
  t.is(serviceHostname("api"), undefined);
  t.is(serviceHostname("/api"), undefined);
  t.is(serviceHostname("backend/"), undefined);
});

test("requested host of a served Service wins", (t) => {
  // Without the host, "api" comes first of the two Services with target port 9090.
  t.is(inboundServiceOf(state, "shop/api-1", 9090, undefined), "shop/api");
  t.is(inboundServiceOf(state, "shop/api-1", 9090, "web.shop.svc.cluster.local"), "shop/web");
});

test("requested host of another Service is ignored", (t) => {
  // The pod does not serve these: another namespace's Service, a Service selecting other pods, a made-up name.
  t.is(inboundServiceOf(state, "shop/api-1", 9090, "other-api.other.svc.cluster.local"), "shop/api");
  t.is(inboundServiceOf(state, "shop/api-1", 9090, "db.shop.svc.cluster.local"), "shop/api");
  t.is(inboundServiceOf(state, "shop/api-1", 4444, "random-1234.shop.svc.cluster.local"), undefined);
});

test("port guess follows named target ports", (t) => {
  t.is(inboundServiceOf(state, "shop/api-1", 7070, undefined), "shop/admin");
  t.is(inboundServiceOf(state, "shop/api-1", 81, undefined), undefined, "the Service port is not the target port");
});

test("no Service for an unknown workload or port", (t) => {
  t.is(inboundServiceOf(state, "shop/gone", 9090, undefined), undefined);
  t.is(inboundServiceOf(state, "shop/api-1", 5432, undefined), undefined);
});

test("requested host of a Service without the port still wins", (t) => {
  // As in ztunnel, a requested host that the pod serves is taken whatever the port.
  const workload = state.workload("shop/api-1")!;
  t.is(guessInboundService(state.servicesForWorkload(workload), workload, 1234, "admin.shop.svc.cluster.local")?.uid, "shop/admin");
});
