// The Kubernetes API source against the fake API server on loopback: lists and watches, the same
// conversion as manifests, rejected objects, 410 Gone, an outage, and the redirection annotation.

import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { KubeClient } from "../../agent/discovery/kube-client";
import { KubeSource } from "../../agent/discovery/kube-source";
import { Reflector } from "../../agent/discovery/kube-reflector";
import http from "node:http";
import { REDIRECTION_ANNOTATION, RedirectionAnnotator } from "../../agent/enroll/redirection-annotation";
import type { ClusterSnapshot } from "../../agent/state/types";
import { FakeKubeApi, type KubeObject } from "../harness/fake-kube-api";

const WAIT_MS = 5_000;
const FAST_BACKOFF = { minBackoffMs: 20, maxBackoffMs: 200, watchTimeoutSeconds: [30, 30] as [number, number] };

function quietLogger(): pino.Logger {
  return pino({ level: process.env.KUBE_TEST_LOG ?? "silent" });
}

function namespace(name: string, labels: Record<string, string> = {}): KubeObject {
  return { apiVersion: "v1", kind: "Namespace", metadata: { name, labels } };
}

function pod(name: string, node: string, ip: string, options: { namespace?: string; labels?: Record<string, string> } = {}): KubeObject {
  return {
    apiVersion: "v1",
    kind: "Pod",
    metadata: { name, namespace: options.namespace ?? "apps", labels: options.labels ?? {}, annotations: { "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096) } },
    spec: { nodeName: node, serviceAccountName: "web", containers: [{ name: "app", image: "app" }] },
    status: { phase: "Running", podIP: ip, podIPs: [{ ip }], conditions: [{ type: "Ready", status: "True" }] },
  };
}

function denyPolicy(name: string, action = "DENY"): KubeObject {
  return {
    apiVersion: "security.istio.io/v1",
    kind: "AuthorizationPolicy",
    metadata: { name, namespace: "apps" },
    spec: { action, rules: [{ from: [{ source: { namespaces: ["other"] } }] }] },
  };
}

async function setUp(t: { teardown(fn: () => unknown): void }, options: { token?: string } = {}): Promise<{ api: FakeKubeApi; source: KubeSource; client: KubeClient }> {
  const api = await FakeKubeApi.start({ token: options.token ?? "t0ken", bookmarkIntervalMs: 200 });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "kube-source-"));
  const kubeconfig = path.join(dir, "kubeconfig");
  api.writeKubeconfig(kubeconfig);
  const client = await KubeClient.load({ kind: "kubeconfig", path: kubeconfig });
  const source = new KubeSource({ node: "node1", client, debounceMs: 5, reflector: FAST_BACKOFF }, quietLogger());
  t.teardown(async () => {
    await source.stop();
    await api.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { api, source, client };
}

/** Resolves with the first snapshot for which `predicate` holds, checking the current one first. */
function waitForSnapshot(source: KubeSource, predicate: (snapshot: ClusterSnapshot) => boolean, what: string): Promise<ClusterSnapshot> {
  if (predicate(source.snapshot())) return Promise.resolve(source.snapshot());
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      source.off("change", listener);
      reject(new Error(`timed out waiting for ${what}`));
    }, WAIT_MS);
    const listener = (snapshot: ClusterSnapshot): void => {
      if (!predicate(snapshot)) return;
      clearTimeout(timer);
      source.off("change", listener);
      resolve(snapshot);
    };
    source.on("change", listener);
  });
}

function annotationOf(api: FakeKubeApi, name: string): string | undefined {
  const metadata = api.get("pods", "apps", name)?.metadata as { annotations?: Record<string, string> } | undefined;
  return metadata?.annotations?.[REDIRECTION_ANNOTATION];
}

async function waitFor(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** The AuthorizationPolicy resource as the agent follows it, with its older API version. */
const POLICY_SPEC = {
  name: "authorizationpolicies",
  path: "/apis/security.istio.io/v1/authorizationpolicies",
  olderPaths: ["/apis/security.istio.io/v1beta1/authorizationpolicies"],
  optional: true,
};

/** Objects that a stub store of a reflector received, by list. */
interface StubStore {
  store: ConstructorParameters<typeof Reflector>[2];
  /** The number of objects of each completed list. */
  lists: number[];
  /** The objects of every page received. */
  listed: unknown[];
}

function stubStore(): StubStore {
  const result: StubStore = { lists: [], listed: [], store: undefined as never };
  let pending = 0;
  result.store = {
    beginList: () => (pending = 0),
    listPage: (items: unknown[]) => {
      pending += items.length;
      result.listed.push(...items);
    },
    endList: () => result.lists.push(pending),
    abortList: () => undefined,
    upsert: () => undefined,
    remove: () => undefined,
  };
  return result;
}

/**
 * Starts a reflector of `spec` against a plain HTTP server on loopback that answers with
 * `handler`, through a kubeconfig, and stops both at the end of the test.
 */
async function stubReflector(
  t: { teardown(fn: () => unknown): void },
  handler: http.RequestListener,
  spec: ConstructorParameters<typeof Reflector>[1],
): Promise<{ reflector: Reflector; stub: StubStore }> {
  const server = http.createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "kube-stub-"));
  const kubeconfig = path.join(dir, "kubeconfig");
  const port = (server.address() as { port: number }).port;
  fs.writeFileSync(
    kubeconfig,
    `apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: "http://127.0.0.1:${port}", insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n`,
  );
  const client = await KubeClient.load({ kind: "kubeconfig", path: kubeconfig });
  const stub = stubStore();
  const reflector = new Reflector(client, spec, stub.store, quietLogger(), FAST_BACKOFF);
  t.teardown(async () => {
    await reflector.stop();
    client.close();
    server.closeAllConnections();
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  reflector.start();
  return { reflector, stub };
}

test("lists, converts and follows changes", async (t) => {
  const { api, source } = await setUp(t);
  api.put(namespace("apps", { "istio.io/dataplane-mode": "ambient" }));
  api.put(pod("web", "node1", "10.1.0.5"));
  api.put(pod("db", "node2", "10.1.1.7"));
  api.put(denyPolicy("deny-other"));
  await source.start();

  const first = source.snapshot();
  t.deepEqual([...first.workloads.keys()].sort(), ["apps/db", "apps/web"]);
  const web = first.workloads.get("apps/web")!;
  t.is(web.ip, "10.1.0.5");
  t.is(web.serviceAccount, "web");
  t.is(web.nodeName, "node1");
  t.is(web.source.file, "kubernetes");
  t.false(REDIRECTION_ANNOTATION in (web.annotations ?? {}));
  t.false("kubectl.kubernetes.io/last-applied-configuration" in (web.annotations ?? {}), "the applied-configuration copy is dropped");
  t.is(first.namespaces.get("apps")?.labels["istio.io/dataplane-mode"], "ambient");
  t.is(first.authorizationPolicies.get("apps/deny-other")?.action, "DENY");
  t.true(source.health().synced);

  api.put(pod("web2", "node1", "10.1.0.6"));
  await waitForSnapshot(source, (snapshot) => snapshot.workloads.get("apps/web2")?.ip === "10.1.0.6", "a new pod");
  api.remove("pods", "apps", "db");
  await waitForSnapshot(source, (snapshot) => !snapshot.workloads.has("apps/db"), "a deleted pod");
  api.patchLabels("namespaces", undefined, "apps", { "istio.io/dataplane-mode": null });
  const unlabelled = await waitForSnapshot(source, (snapshot) => snapshot.namespaces.get("apps")?.labels["istio.io/dataplane-mode"] === undefined, "a removed label");
  t.true(unlabelled.workloads.has("apps/web"));
});

test("pod watches split by node", async (t) => {
  const { api, source } = await setUp(t);
  await source.start();
  const watched = api.requests.filter((request) => request.path === "/api/v1/pods").map((request) => request.query.fieldSelector);
  t.true(watched.includes("spec.nodeName=node1"));
  t.true(watched.includes("spec.nodeName!=node1"));
});

test("invalid policy update keeps last version", async (t) => {
  const { api, source } = await setUp(t);
  api.put(namespace("apps"));
  api.put(denyPolicy("deny-other"));
  await source.start();
  t.is(source.snapshot().authorizationPolicies.get("apps/deny-other")?.action, "DENY");

  api.put(denyPolicy("deny-other", "REJECT"));
  await waitFor(() => source.problems().length > 0, "the rejection");
  const problem = source.problems()[0];
  t.is(problem.file, "kubernetes");
  t.is(problem.object, "AuthorizationPolicy apps/deny-other");
  t.regex(problem.message, /REJECT/);
  t.is(source.snapshot().authorizationPolicies.get("apps/deny-other")?.action, "DENY", "the last valid version stays");

  api.put(denyPolicy("deny-other", "ALLOW"));
  await waitForSnapshot(source, (snapshot) => snapshot.authorizationPolicies.get("apps/deny-other")?.action === "ALLOW", "the fixed policy");
  t.deepEqual(source.problems(), []);
  api.remove("authorizationpolicies", "apps", "deny-other");
  await waitForSnapshot(source, (snapshot) => !snapshot.authorizationPolicies.has("apps/deny-other"), "the deleted policy");
});

test("410 relists without loss", async (t) => {
  const { api, source } = await setUp(t);
  api.put(namespace("apps"));
  await source.start();
  const listsBefore = source.health().resources.find((resource) => resource.resource === "namespaces")!.lists;
  // The agent misses a change while disconnected, and the server then drops the versions before it.
  api.setOutage(true);
  await waitFor(() => !source.health().watching, "the watches to drop");
  api.put(namespace("after-compaction"));
  // Deleted while the agent could not see it: only the relist can tell.
  api.remove("namespaces", undefined, "apps");
  api.compact();
  api.setOutage(false);
  await waitForSnapshot(source, (snapshot) => snapshot.namespaces.has("after-compaction"), "the namespace made after the compaction");
  t.false(source.snapshot().namespaces.has("apps"), "the relist drops an object deleted meanwhile");
  const namespaces = source.health().resources.find((resource) => resource.resource === "namespaces")!;
  await waitFor(() => source.health().resources.find((resource) => resource.resource === "namespaces")!.expired >= 1, "the 410 relist");
  t.true(source.health().resources.find((resource) => resource.resource === "namespaces")!.lists > listsBefore);
  t.true(namespaces.synced);
});

test("outage keeps last state, then catches up", async (t) => {
  const { api, source } = await setUp(t);
  api.put(namespace("apps"));
  api.put(pod("web", "node1", "10.1.0.5"));
  await source.start();
  await waitFor(() => source.health().watching, "open watches");

  api.setOutage(true);
  await waitFor(() => !source.health().watching, "the watches to drop");
  const during = source.snapshot();
  t.true(during.workloads.has("apps/web"), "the last state keeps serving");
  await waitFor(() => source.health().resources.some((resource) => resource.lastError !== undefined), "an error in health");
  t.regex(source.health().resources.find((resource) => resource.lastError)!.lastError!, /cannot reach the API server|failed/);

  api.put(pod("late", "node1", "10.1.0.9"));
  api.remove("pods", "apps", "web");
  api.setOutage(false);
  const after = await waitForSnapshot(source, (snapshot) => snapshot.workloads.has("apps/late") && !snapshot.workloads.has("apps/web"), "the changes made during the outage");
  t.is(after.workloads.get("apps/late")?.ip, "10.1.0.9");
  await waitFor(() => source.health().watching, "the watches to reopen");
});

test("start waits for every first list", async (t) => {
  const { api, source } = await setUp(t);
  api.put(namespace("apps"));
  api.setOutage(true);
  let resolved = false;
  const started = source.start().then(() => (resolved = true));
  await waitFor(() => source.health().resources.every((resource) => resource.lastError !== undefined), "a failure per resource");
  t.false(resolved, "no state is served before the first list");
  t.false(source.health().synced);
  api.setOutage(false);
  await started;
  t.true(source.snapshot().namespaces.has("apps"));
  t.true(source.health().synced);
});

test("unanswered watch is not watching", async (t) => {
  // Lists get a response; watch requests are accepted and never get one.
  const { reflector } = await stubReflector(
    t,
    (request, response) => {
      if (request.url?.includes("watch=true")) return;
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ kind: "NamespaceList", apiVersion: "v1", metadata: { resourceVersion: "7" }, items: [] }));
    },
    { name: "namespaces", path: "/api/v1/namespaces" },
  );
  await reflector.synced;
  await waitFor(() => reflector.health().watches >= 1, "the watch request");
  await new Promise((resolve) => setTimeout(resolve, 300));
  t.true(reflector.health().synced);
  t.false(reflector.health().watching);
});

test("bad kubeconfig is a clear error", async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "kube-config-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const missing = path.join(dir, "absent");
  await t.throwsAsync(() => KubeClient.load({ kind: "kubeconfig", path: missing }), { message: new RegExp(`cannot read the kubeconfig ${missing}`) });
  const empty = path.join(dir, "empty");
  fs.writeFileSync(empty, "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n");
  await t.throwsAsync(() => KubeClient.load({ kind: "kubeconfig", path: empty }), { message: /names no current cluster/ });
  const saved = { host: process.env.KUBERNETES_SERVICE_HOST, port: process.env.KUBERNETES_SERVICE_PORT };
  delete process.env.KUBERNETES_SERVICE_HOST;
  delete process.env.KUBERNETES_SERVICE_PORT;
  try {
    await t.throwsAsync(() => KubeClient.load({ kind: "in-cluster" }), { message: /KUBERNETES_SERVICE_HOST/ });
  } finally {
    if (saved.host !== undefined) process.env.KUBERNETES_SERVICE_HOST = saved.host;
    if (saved.port !== undefined) process.env.KUBERNETES_SERVICE_PORT = saved.port;
  }
});

test("in-cluster token and CA", async (t) => {
  const api = await FakeKubeApi.start({ tls: true, token: "in-cluster-token" });
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "kube-incluster-"));
  t.teardown(async () => {
    await api.stop();
    fs.rmSync(root, { recursive: true, force: true });
  });
  const accountDir = path.join(root, "var/run/secrets/kubernetes.io/serviceaccount");
  fs.mkdirSync(accountDir, { recursive: true });
  fs.writeFileSync(path.join(accountDir, "token"), "in-cluster-token");
  fs.writeFileSync(path.join(accountDir, "ca.crt"), api.caPem!);
  fs.writeFileSync(path.join(accountDir, "namespace"), "istio-system");
  const url = new URL(api.url);
  const saved = { host: process.env.KUBERNETES_SERVICE_HOST, port: process.env.KUBERNETES_SERVICE_PORT };
  process.env.KUBERNETES_SERVICE_HOST = url.hostname;
  process.env.KUBERNETES_SERVICE_PORT = url.port;
  try {
    api.put(namespace("apps"));
    const client = await KubeClient.load({ kind: "in-cluster", pathPrefix: root });
    const list = (await client.request("GET", "/api/v1/namespaces")) as { items: { metadata: { name: string } }[] };
    t.deepEqual(list.items.map((item) => item.metadata.name), ["apps"]);
  } finally {
    process.env.KUBERNETES_SERVICE_HOST = saved.host;
    process.env.KUBERNETES_SERVICE_PORT = saved.port;
    if (saved.host === undefined) delete process.env.KUBERNETES_SERVICE_HOST;
    if (saved.port === undefined) delete process.env.KUBERNETES_SERVICE_PORT;
  }
});

test("exec plugin supplies the token", async (t) => {
  const api = await FakeKubeApi.start({ tls: true, token: "exec-token" });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "kube-exec-"));
  t.teardown(async () => {
    await api.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  api.put(namespace("apps"));
  const credential = JSON.stringify({ apiVersion: "client.authentication.k8s.io/v1", kind: "ExecCredential", status: { token: "exec-token" } });
  const kubeconfig = path.join(dir, "kubeconfig");
  fs.writeFileSync(
    kubeconfig,
    [
      "apiVersion: v1",
      "kind: Config",
      "clusters:",
      "- name: fake",
      "  cluster:",
      `    server: ${api.url}`,
      `    certificate-authority-data: ${Buffer.from(api.caPem!).toString("base64")}`,
      "users:",
      "- name: exec-user",
      "  user:",
      "    exec:",
      "      apiVersion: client.authentication.k8s.io/v1",
      "      command: /bin/sh",
      `      args: ["-c", ${JSON.stringify(`echo '${credential}'`)}]`,
      "      interactiveMode: Never",
      "contexts:",
      "- name: fake",
      "  context: {cluster: fake, user: exec-user}",
      "current-context: fake",
      "",
    ].join("\n"),
  );
  const client = await KubeClient.load({ kind: "kubeconfig", path: kubeconfig });
  t.teardown(() => client.close());
  const list = (await client.request("GET", "/api/v1/namespaces")) as { items: { metadata: { name: string } }[] };
  t.deepEqual(list.items.map((item) => item.metadata.name), ["apps"]);
});

test("annotator marks and unmarks once", async (t) => {
  const { api, source, client } = await setUp(t);
  api.put(namespace("apps"));
  api.put(pod("web", "node1", "10.1.0.5"));
  api.put(pod("db", "node1", "10.1.0.6"));
  await source.start();
  const annotator = new RedirectionAnnotator(client, quietLogger());
  t.teardown(() => annotator.stop());
  const onNode = (): ReturnType<ClusterSnapshot["workloads"]["get"]>[] => [...source.snapshot().workloads.values()].filter((workload) => workload.nodeName === "node1");

  annotator.sync(onNode() as never, new Set(["apps/web"]));
  await waitFor(() => annotationOf(api, "web") === "enabled", "the annotation on web");
  t.is(annotationOf(api, "db"), undefined);
  await waitForSnapshot(source, (snapshot) => snapshot.workloads.get("apps/web")?.annotations?.[REDIRECTION_ANNOTATION] === "enabled", "the annotated pod");
  const patches = (): number => api.requests.filter((request) => request.method === "PATCH").length;
  const before = patches();
  annotator.sync(onNode() as never, new Set(["apps/web"]));
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.is(patches(), before, "an annotation already in place is not written again");

  annotator.sync(onNode() as never, new Set());
  await waitFor(() => annotationOf(api, "web") === undefined, "the annotation removed");
  // The server applies the patch before its response reaches the annotator.
  await waitFor(() => annotator.pending() === 0, "the patch to finish");
  t.is(annotator.pending(), 0);
});

test("annotator recheck rewrites an unseen value", async (t) => {
  // Only the recheck can write again here, because nothing syncs on changes and the pods it reads never show the write.
  const { api, source, client } = await setUp(t);
  api.put(namespace("apps"));
  api.put(pod("web", "node1", "10.1.0.5"));
  await source.start();
  const enrolled = new Set(["apps/web"]);
  const before = [...source.snapshot().workloads.values()].filter((workload) => workload.nodeName === "node1");
  const annotator = new RedirectionAnnotator(client, quietLogger(), () => ({ podsOnNode: before, enrolled }), 300);
  t.teardown(() => annotator.stop());
  const patches = (): number => api.requests.filter((request) => request.method === "PATCH").length;
  const syncedAt = Date.now();
  annotator.sync(before, enrolled);
  await waitFor(() => patches() >= 2, "a second write");
  // Load can only make this longer, so the lower bound holds on any machine.
  const elapsed = Date.now() - syncedAt;
  t.true(elapsed >= 300, `the second write came ${elapsed} ms after the sync, within the 300 ms trust period`);
});

test("annotator restores a removed annotation", async (t) => {
  const { api, source, client } = await setUp(t);
  api.put(namespace("apps"));
  api.put(pod("web", "node1", "10.1.0.5"));
  await source.start();
  const enrolled = new Set(["apps/web"]);
  const onNode = () => [...source.snapshot().workloads.values()].filter((workload) => workload.nodeName === "node1");
  const annotator = new RedirectionAnnotator(client, quietLogger(), () => ({ podsOnNode: onNode(), enrolled }), 300);
  // The agent syncs on every change of the cluster view, so a removal seen after the recheck is acted on too.
  const onChange = (): void => annotator.sync(onNode(), enrolled);
  source.on("change", onChange);
  t.teardown(() => {
    source.off("change", onChange);
    annotator.stop();
  });
  annotator.sync(onNode(), enrolled);
  await waitFor(() => annotationOf(api, "web") === "enabled", "the first write");
  // Another writer removes it at once, before the agent's own write comes back in the watch.
  const stored = api.get("pods", "apps", "web")!;
  const metadata = stored.metadata as { annotations?: Record<string, string> };
  delete metadata.annotations?.[REDIRECTION_ANNOTATION];
  api.put(stored);
  await waitFor(() => annotationOf(api, "web") === "enabled", "the annotation written again");
  t.is(annotationOf(api, "web"), "enabled");
});

test("policies fall back to v1beta1", async (t) => {
  // Older Istio releases serve security.istio.io v1beta1 only.
  const requested: string[] = [];
  const { reflector, stub } = await stubReflector(
    t,
    (request, response) => {
      const url = new URL(request.url ?? "/", "http://x");
      requested.push(url.pathname);
      if (url.searchParams.get("watch") === "true") return;
      if (url.pathname !== "/apis/security.istio.io/v1beta1/authorizationpolicies") {
        response.writeHead(404, { "content-type": "application/json" }).end(JSON.stringify({ kind: "Status", code: 404 }));
        return;
      }
      const policy = { apiVersion: "security.istio.io/v1beta1", kind: "AuthorizationPolicy", metadata: { name: "deny", namespace: "apps" }, spec: { action: "DENY", rules: [{}] } };
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ metadata: { resourceVersion: "3" }, items: [policy] }));
    },
    POLICY_SPEC,
  );
  await reflector.synced;
  t.is(stub.listed.length, 1);
  t.false(reflector.health().absent);
  t.true(requested.includes("/apis/security.istio.io/v1/authorizationpolicies"));
  await waitFor(() => requested.filter((pathname) => pathname.endsWith("v1beta1/authorizationpolicies")).length >= 2, "the watch on v1beta1");
});

test("404 after a list keeps policies", async (t) => {
  // An API server that restarts may respond with 404 for a custom resource it served a moment ago.
  let lists = 0;
  const { reflector, stub } = await stubReflector(
    t,
    (request, response) => {
      const url = new URL(request.url ?? "/", "http://x");
      if (url.searchParams.get("watch") === "true") {
        // Forces a new list, which then gets 404.
        response.writeHead(200, { "content-type": "application/json" });
        response.end(JSON.stringify({ type: "ERROR", object: { kind: "Status", code: 410, reason: "Expired", message: "too old" } }) + "\n");
        return;
      }
      lists++;
      if (lists > 1) {
        response.writeHead(404, { "content-type": "application/json" }).end(JSON.stringify({ kind: "Status", code: 404 }));
        return;
      }
      const policy = { apiVersion: "security.istio.io/v1", kind: "AuthorizationPolicy", metadata: { name: "deny", namespace: "apps" }, spec: { action: "DENY", rules: [{}] } };
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ metadata: { resourceVersion: "3" }, items: [policy] }));
    },
    POLICY_SPEC,
  );
  await reflector.synced;
  await waitFor(() => lists >= 3, "lists that get 404");
  t.deepEqual(stub.lists, [1], "the store was never replaced by an empty list");
  t.false(reflector.health().absent);
  t.regex(reflector.health().lastError ?? "", /404/);
});
