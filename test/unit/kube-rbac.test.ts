// The Kubernetes RBAC authorizer of the test harness: requests read into attributes as the API
// server reads them, and decisions that deny what RBAC denies.

import test from "ava";
import {
  describeAttributes,
  parseFieldSelector,
  RbacAuthorizer,
  requestAttributes,
  serviceAccountUser,
  type ApiRequest,
  type RbacObject,
  type RequestAttributes,
} from "../harness/kube-rbac";

function get(path: string, query: Record<string, string> = {}): ApiRequest {
  return { method: "GET", path, query };
}

/** The attributes a request has, written as describeAttributes writes them. */
const ATTRIBUTES: [ApiRequest, string][] = [
  [get("/api/v1/pods"), "list pods"],
  [get("/api/v1/pods", { watch: "true" }), "watch pods"],
  [get("/api/v1/pods", { watch: "1" }), "watch pods"],
  [get("/api/v1/pods", { watch: "" }), "watch pods"],
  [get("/api/v1/pods", { watch: "false" }), "list pods"],
  [get("/api/v1/pods", { watch: "0" }), "list pods"],
  [get("/api/v1/namespaces/shop/pods"), "list pods in namespace shop"],
  [get("/api/v1/namespaces/shop/pods/web"), 'get pods "web" in namespace shop'],
  [{ method: "HEAD", path: "/api/v1/namespaces/shop/pods/web", query: {} }, 'get pods "web" in namespace shop'],
  [get("/api/v1/watch/namespaces/shop/pods"), "watch pods in namespace shop"],
  [get("/api/v1/watch/namespaces/shop/pods/web"), 'watch pods "web" in namespace shop'],
  [{ method: "PATCH", path: "/api/v1/namespaces/shop/pods/web/status", query: {} }, 'patch pods/status "web" in namespace shop'],
  [{ method: "PUT", path: "/api/v1/namespaces/shop/pods/web", query: {} }, 'update pods "web" in namespace shop'],
  [{ method: "POST", path: "/api/v1/namespaces/shop/pods", query: {} }, "create pods in namespace shop"],
  [{ method: "DELETE", path: "/api/v1/namespaces/shop/pods/web", query: {} }, 'delete pods "web" in namespace shop'],
  [{ method: "DELETE", path: "/api/v1/namespaces/shop/pods", query: {} }, "deletecollection pods in namespace shop"],
  // A namespace is named in its own namespace, and status is its subresource, not a resource.
  [get("/api/v1/namespaces"), "list namespaces"],
  [get("/api/v1/namespaces/shop"), 'get namespaces "shop" in namespace shop'],
  [get("/api/v1/namespaces/shop/status"), 'get namespaces/status "shop" in namespace shop'],
  [get("/apis/discovery.k8s.io/v1/endpointslices", { watch: "true" }), "watch discovery.k8s.io/endpointslices"],
  // metadata.name=NAME names the object of a list or a watch, and nothing else does.
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name=agent" }), 'list apps/daemonsets "agent" in namespace sys'],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name==agent", watch: "true" }), 'watch apps/daemonsets "agent" in namespace sys'],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.namespace=sys,metadata.name=agent" }), 'list apps/daemonsets "agent" in namespace sys'],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name!=agent" }), "list apps/daemonsets in namespace sys"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name =agent" }), "list apps/daemonsets in namespace sys"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name=a/b" }), "list apps/daemonsets in namespace sys"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name=a=b" }), "list apps/daemonsets in namespace sys"],
  [get("/api/v1/pods", { fieldSelector: "spec.nodeName=node1" }), "list pods"],
  // Discovery and health paths are non-resource requests, with the HTTP method as the verb.
  [get("/api"), "get /api"],
  [get("/api/v1"), "get /api/v1"],
  [get("/apis/apps/v1"), "get /apis/apps/v1"],
  [get("/readyz"), "get /readyz"],
  [{ method: "POST", path: "/metrics", query: {} }, "post /metrics"],
];

test("requests read as the API server reads them", (t) => {
  for (const [request, expected] of ATTRIBUTES) {
    t.is(describeAttributes(requestAttributes(request)), expected, `${request.method} ${request.path} ${JSON.stringify(request.query)}`);
  }
});

test("special verb without a resource is rejected", (t) => {
  t.throws(() => requestAttributes(get("/api/v1/watch")), { message: /names no resource after watch/ });
});

test("field selector parses as the API server's", (t) => {
  t.deepEqual(parseFieldSelector("metadata.name=a\\,b"), [{ field: "metadata.name", operator: "=", value: "a,b" }]);
  t.deepEqual(parseFieldSelector("b!=1,a==2"), [
    { field: "a", operator: "==", value: "2" },
    { field: "b", operator: "!=", value: "1" },
  ]);
  t.deepEqual(parseFieldSelector(""), []);
  t.is(parseFieldSelector("metadata.name"), undefined);
  t.is(parseFieldSelector("metadata.name=a\\b"), undefined);
  t.is(parseFieldSelector("metadata.name=a\\"), undefined);
});

const AGENT = serviceAccountUser("sys", "agent");

/** A ClusterRole, a Role in sys and their bindings to the ServiceAccount sys/agent, like the chart's. */
const OBJECTS: RbacObject[] = [
  {
    kind: "ClusterRole",
    metadata: { name: "reader" },
    rules: [
      { apiGroups: [""], resources: ["namespaces", "pods"], verbs: ["list", "watch"] },
      { apiGroups: [""], resources: ["pods/status"], verbs: ["patch"] },
      { apiGroups: ["discovery.k8s.io"], resources: ["*"], verbs: ["list"] },
      { apiGroups: ["*"], resources: ["*/scale"], verbs: ["get"] },
    ],
  },
  { kind: "ClusterRoleBinding", metadata: { name: "reader" }, roleRef: { kind: "ClusterRole", name: "reader" }, subjects: [{ kind: "ServiceAccount", name: "agent", namespace: "sys" }] },
  { kind: "Role", metadata: { name: "own", namespace: "sys" }, rules: [{ apiGroups: ["apps"], resources: ["daemonsets"], resourceNames: ["agent"], verbs: ["get", "list", "watch"] }] },
  // No namespace on the subject: the binding's own.
  { kind: "RoleBinding", metadata: { name: "own", namespace: "sys" }, roleRef: { kind: "Role", name: "own" }, subjects: [{ kind: "ServiceAccount", name: "agent" }] },
  // Bound to no subject, so it grants nothing.
  { kind: "ClusterRole", metadata: { name: "unbound" }, rules: [{ apiGroups: ["*"], resources: ["*"], verbs: ["*"] }] },
  // A ClusterRole through a RoleBinding grants only in the binding's namespace.
  { kind: "ClusterRole", metadata: { name: "secrets" }, rules: [{ apiGroups: [""], resources: ["secrets"], verbs: ["get"] }] },
  { kind: "RoleBinding", metadata: { name: "secrets", namespace: "sys" }, roleRef: { kind: "ClusterRole", name: "secrets" }, subjects: [{ kind: "ServiceAccount", name: "agent", namespace: "sys" }] },
  // Not kinds that RBAC reads.
  { kind: "ConfigMap", metadata: { name: "config", namespace: "sys" } },
];

const authorizer = new RbacAuthorizer(OBJECTS);

function decide(request: ApiRequest, user = AGENT): boolean {
  return authorizer.authorize(user, requestAttributes(request)).allowed;
}

const ALLOWED: ApiRequest[] = [
  get("/api/v1/pods"),
  get("/api/v1/namespaces/shop/pods", { watch: "true" }),
  get("/api/v1/watch/pods"),
  get("/api/v1/namespaces"),
  { method: "PATCH", path: "/api/v1/namespaces/shop/pods/web/status", query: {} },
  get("/apis/discovery.k8s.io/v1/endpointslices"),
  get("/apis/apps/v1/namespaces/shop/deployments/web/scale"),
  get("/apis/apps/v1/namespaces/sys/daemonsets/agent"),
  get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name=agent" }),
  get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name=agent", watch: "true" }),
  get("/api/v1/namespaces/sys/secrets/ca"),
  // The default roles of every authenticated user.
  get("/api"),
  get("/apis/apps/v1"),
  get("/version"),
  { method: "POST", path: "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", query: {} },
];

const DENIED: [ApiRequest, string][] = [
  [get("/api/v1/namespaces/shop/pods/web"), "get is not among the verbs"],
  [{ method: "PATCH", path: "/api/v1/namespaces/shop/pods/web", query: {} }, "patch of pods/status allows no patch of the pod"],
  [{ method: "PATCH", path: "/api/v1/namespaces/shop/pods/web/ephemeralcontainers", query: {} }, "another subresource"],
  [get("/api/v1/namespaces/shop/status"), "namespaces allows no namespaces/status"],
  [get("/apis/discovery.k8s.io/v1/endpointslices", { watch: "true" }), "watch is not among the verbs"],
  [get("/apis/security.istio.io/v1/authorizationpolicies"), "another API group"],
  [get("/apis/apps/v1/namespaces/shop/deployments/web"), "*/scale allows only the subresource"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets"), "resourceNames: a list without metadata.name"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { watch: "true" }), "resourceNames: a watch without metadata.name"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name=other" }), "resourceNames: another name"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets", { fieldSelector: "metadata.name!=other" }), "resourceNames: != names no object"],
  [get("/apis/apps/v1/namespaces/sys/daemonsets/other"), "resourceNames: get of another name"],
  [{ method: "POST", path: "/apis/apps/v1/namespaces/sys/daemonsets", query: {} }, "resourceNames: a create has no name"],
  [get("/apis/apps/v1/namespaces/other/daemonsets/agent"), "a Role grants only in its namespace"],
  [get("/apis/apps/v1/daemonsets", { fieldSelector: "metadata.name=agent" }), "a Role grants nothing across namespaces"],
  [get("/api/v1/namespaces/shop/secrets/ca"), "a ClusterRole through a RoleBinding grants only in the binding's namespace"],
  [get("/api/v1/secrets"), "a ClusterRole through a RoleBinding grants nothing across namespaces"],
  [get("/api/v1/namespaces/shop/configmaps"), "the unbound ClusterRole grants nothing"],
  [get("/metrics"), "no non-resource rule for /metrics"],
  [{ method: "POST", path: "/api", query: {} }, "discovery allows get only"],
];

test("bound rules allow", (t) => {
  for (const request of ALLOWED) t.true(decide(request), `${request.method} ${request.path} ${JSON.stringify(request.query)}`);
});

test("RBAC denials", (t) => {
  for (const [request, why] of DENIED) t.false(decide(request), `${request.method} ${request.path} ${JSON.stringify(request.query)}: ${why}`);
});

test("bindings name their subjects", (t) => {
  const pods = get("/api/v1/pods");
  t.false(decide(pods, serviceAccountUser("other", "agent")), "a ServiceAccount of the same name in another namespace");
  t.false(decide(pods, serviceAccountUser("sys", "other")), "another ServiceAccount of the namespace");
  t.false(decide(get("/apis/apps/v1/namespaces/sys/daemonsets/agent"), serviceAccountUser("shop", "agent")), "a RoleBinding's subject without a namespace is in the binding's");
  t.true(decide(get("/api"), { name: "someone", groups: ["system:authenticated"] }), "discovery for every authenticated user");
  t.false(decide(get("/api"), { name: "system:anonymous", groups: ["system:unauthenticated"] }), "no default role for an anonymous user");

  const byGroup = new RbacAuthorizer([
    { kind: "ClusterRole", metadata: { name: "r" }, rules: [{ apiGroups: [""], resources: ["pods"], verbs: ["list"] }] },
    { kind: "ClusterRoleBinding", metadata: { name: "r" }, roleRef: { kind: "ClusterRole", name: "r" }, subjects: [{ kind: "Group", name: "system:serviceaccounts:sys" }] },
  ]);
  t.true(byGroup.authorize(AGENT, requestAttributes(pods)).allowed, "a Group of the namespace's ServiceAccounts");
  t.false(byGroup.authorize(serviceAccountUser("shop", "agent"), requestAttributes(pods)).allowed, "a Group of another namespace's ServiceAccounts");
});

test("ClusterRoleBinding of a Role grants nothing", (t) => {
  const invalid = new RbacAuthorizer([
    { kind: "Role", metadata: { name: "r", namespace: "sys" }, rules: [{ apiGroups: [""], resources: ["pods"], verbs: ["list"] }] },
    { kind: "ClusterRoleBinding", metadata: { name: "r" }, roleRef: { kind: "Role", name: "r" }, subjects: [{ kind: "ServiceAccount", name: "agent", namespace: "sys" }] },
  ]);
  t.false(invalid.authorize(AGENT, requestAttributes(get("/api/v1/namespaces/sys/pods"))).allowed);
});

test("decision names the binding or the request", (t) => {
  const allowed = authorizer.authorize(AGENT, requestAttributes(get("/api/v1/pods")));
  t.is(allowed.reason, "ClusterRoleBinding reader binds ClusterRole reader");
  const denied = authorizer.authorize(AGENT, requestAttributes(get("/api/v1/namespaces/shop/pods/web")));
  t.is(denied.reason, 'no rule bound to system:serviceaccount:sys:agent allows get pods "web" in namespace shop');
});

test("attributes of a resource request", (t) => {
  const expected: RequestAttributes = {
    resourceRequest: true,
    verb: "watch",
    path: "/apis/apps/v1/namespaces/sys/daemonsets",
    apiGroup: "apps",
    resource: "daemonsets",
    subresource: "",
    namespace: "sys",
    name: "agent",
  };
  t.deepEqual(requestAttributes(get(expected.path, { watch: "true", fieldSelector: "metadata.name=agent", resourceVersion: "12" })), expected);
});
