// The fake Kubernetes API server against @kubernetes/client-node, the client the agent uses, and
// plain HTTP where the wire format itself is checked. Loopback only, except the network namespace
// test, which makes its own namespace.

import test from "ava";
import { execFile, execFileSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import os from "node:os";
import path from "node:path";
import * as k8s from "@kubernetes/client-node";
import { FakeKubeApi, type KubeObject } from "../harness/fake-kube-api";

const WAIT_MS = 5000;

function pod(name: string, options: { namespace?: string; labels?: Record<string, string>; node?: string } = {}): KubeObject {
  return {
    apiVersion: "v1",
    kind: "Pod",
    metadata: { name, namespace: options.namespace ?? "default", labels: options.labels ?? {} },
    spec: { nodeName: options.node ?? "node1", containers: [{ name: "app", image: "app" }] },
    status: { phase: "Running", podIP: "10.0.0.1" },
  };
}

function kubeConfigFor(api: FakeKubeApi): k8s.KubeConfig {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "fake-kube-")), "kubeconfig");
  api.writeKubeconfig(file);
  const config = new k8s.KubeConfig();
  config.loadFromFile(file);
  fs.rmSync(path.dirname(file), { recursive: true, force: true });
  return config;
}

interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** Sends one request and reads the whole response; for watches, pass a URL with timeoutSeconds. */
function request(api: FakeKubeApi, pathAndQuery: string, options: { method?: string; headers?: Record<string, string>; body?: string; ca?: string } = {}): Promise<RawResponse> {
  const url = new URL(api.url + pathAndQuery);
  const headers = { ...(api.token ? { Authorization: `Bearer ${api.token}` } : {}), ...options.headers };
  const client = url.protocol === "https:" ? https : http;
  return new Promise((resolve, reject) => {
    const outgoing = client.request(url, { method: options.method ?? "GET", headers, ca: options.ca ?? api.caPem, timeout: WAIT_MS }, (response) => {
      const chunks: Buffer[] = [];
      response.on("data", (chunk: Buffer) => chunks.push(chunk));
      response.on("end", () => resolve({ status: response.statusCode ?? 0, headers: response.headers, body: Buffer.concat(chunks).toString() }));
      response.on("error", reject);
    });
    outgoing.on("timeout", () => outgoing.destroy(new Error(`no response to ${pathAndQuery} within ${WAIT_MS} ms`)));
    outgoing.on("error", reject);
    outgoing.end(options.body);
  });
}

async function getJson(api: FakeKubeApi, pathAndQuery: string): Promise<any> {
  const response = await request(api, pathAndQuery);
  return JSON.parse(response.body);
}

interface WatchEvent {
  type: string;
  object: any;
}

/** A client-node watch that records its events. */
class Recorder {
  readonly events: WatchEvent[] = [];
  done: Promise<unknown>;
  #controller: AbortController | undefined;
  #resolveDone: (error: unknown) => void = () => undefined;

  constructor() {
    this.done = new Promise((resolve) => (this.#resolveDone = resolve));
  }

  static async start(config: k8s.KubeConfig, watchPath: string, query: Record<string, string | number | boolean | undefined>): Promise<Recorder> {
    const recorder = new Recorder();
    recorder.#controller = await new k8s.Watch(config).watch(
      watchPath,
      query,
      (type, object) => recorder.events.push({ type, object }),
      (error) => recorder.#resolveDone(error ?? null),
    );
    return recorder;
  }

  /** Waits until at least `count` events arrived and returns them all. */
  async waitFor(count: number): Promise<WatchEvent[]> {
    const deadline = Date.now() + WAIT_MS;
    while (this.events.length < count) {
      if (Date.now() > deadline) throw new Error(`expected ${count} watch events within ${WAIT_MS} ms, got ${JSON.stringify(this.events.map((event) => event.type))}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    return this.events;
  }

  stop(): void {
    this.#controller?.abort();
  }
}

async function started(t: { teardown(fn: () => unknown): void }, options: Parameters<typeof FakeKubeApi.start>[0] = {}): Promise<FakeKubeApi> {
  const api = await FakeKubeApi.start(options);
  t.teardown(() => api.stop());
  return api;
}

test("list pages through a consistent snapshot", async (t) => {
  const api = await started(t);
  for (let i = 0; i < 25; i++) api.put(pod(`p${String(i).padStart(2, "0")}`));

  const first = await getJson(api, "/api/v1/pods?limit=10");
  t.is(first.kind, "PodList");
  t.is(first.apiVersion, "v1");
  t.is(first.metadata.resourceVersion, api.resourceVersion);
  t.is(first.items.length, 10);
  t.is(first.metadata.remainingItemCount, 15);
  t.is(first.items[0].kind, undefined, "built-in kinds leave kind out of list items");

  // A pod created between pages is not in the snapshot the pages read.
  api.put(pod("p00a"));
  const second = await getJson(api, `/api/v1/pods?limit=10&continue=${first.metadata.continue}`);
  const third = await getJson(api, `/api/v1/pods?limit=10&continue=${second.metadata.continue}`);
  t.is(third.metadata.continue, undefined);
  const names = [...first.items, ...second.items, ...third.items].map((item: any) => item.metadata.name);
  t.is(names.length, 25);
  t.is(new Set(names).size, 25);
  t.false(names.includes("p00a"));
  t.is(second.metadata.resourceVersion, first.metadata.resourceVersion);
});

test("list through client-node with limit", async (t) => {
  const api = await started(t, { token: "secret-token" });
  for (let i = 0; i < 7; i++) api.put(pod(`p${i}`, { namespace: i % 2 === 0 ? "even" : "odd" }));
  const core = kubeConfigFor(api).makeApiClient(k8s.CoreV1Api);

  const page = await core.listPodForAllNamespaces({ limit: 5 });
  t.is(page.items.length, 5);
  const rest = await core.listPodForAllNamespaces({ limit: 5, _continue: page.metadata?._continue });
  t.is(rest.items.length, 2);
  const even = await core.listNamespacedPod({ namespace: "even" });
  t.deepEqual(even.items.map((item) => item.metadata?.name).sort(), ["p0", "p2", "p4", "p6"]);
});

test("create fills uid, timestamp and namespace", async (t) => {
  const api = await started(t);
  const before = Number(api.resourceVersion);
  const stored = api.put({ apiVersion: "v1", kind: "Pod", metadata: { name: "bare" } });
  t.is(stored.metadata?.namespace, "default");
  t.regex(String(stored.metadata?.uid), /^[0-9a-f-]{36}$/);
  t.regex(String(stored.metadata?.creationTimestamp), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
  t.is(stored.metadata?.resourceVersion, String(before + 1));

  const replaced = api.put({ apiVersion: "v1", kind: "Pod", metadata: { name: "bare", labels: { a: "b" } } });
  t.is(replaced.metadata?.uid, stored.metadata?.uid);
  t.is(replaced.metadata?.resourceVersion, String(before + 2));

  const namespace = api.put({ apiVersion: "v1", kind: "Namespace", metadata: { name: "ns1", namespace: "ignored" } });
  t.is(namespace.metadata?.namespace, undefined);
  const one = await getJson(api, "/api/v1/namespaces/ns1");
  t.is(one.kind, "Namespace");
  t.is(one.metadata.uid, namespace.metadata?.uid);
});

test("istio policy list keeps kind on items", async (t) => {
  const api = await started(t);
  api.put({ apiVersion: "security.istio.io/v1", kind: "AuthorizationPolicy", metadata: { name: "deny", namespace: "ns1" }, spec: { action: "DENY" } });
  api.put({ apiVersion: "security.istio.io/v1", kind: "PeerAuthentication", metadata: { name: "strict", namespace: "ns1" }, spec: { mtls: { mode: "STRICT" } } });

  const policies = await getJson(api, "/apis/security.istio.io/v1/namespaces/ns1/authorizationpolicies");
  t.is(policies.kind, "AuthorizationPolicyList");
  t.is(policies.apiVersion, "security.istio.io/v1");
  t.is(policies.items[0].kind, "AuthorizationPolicy");
  const peer = await getJson(api, "/apis/security.istio.io/v1/peerauthentications");
  t.is(peer.items.length, 1);
  const slices = await getJson(api, "/apis/discovery.k8s.io/v1/endpointslices");
  t.is(slices.kind, "EndpointSliceList");
});

test("unknown path returns a NotFound Status", async (t) => {
  const api = await started(t);
  for (const unknown of ["/api/v1/secrets", "/apis/apps/v1/deployments", "/nothing", "/api/v1/namespaces/ns1/pods/p1/exec"]) {
    const response = await request(api, unknown);
    t.is(response.status, 404, unknown);
    const status = JSON.parse(response.body);
    t.is(status.kind, "Status");
    t.is(status.reason, "NotFound");
    t.is(status.code, 404);
  }
  const missing = JSON.parse((await request(api, "/api/v1/namespaces/default/pods/nope")).body);
  t.is(missing.message, 'pods "nope" not found');
  t.deepEqual(missing.details, { name: "nope", kind: "pods" });
});

test("watch from 0 sends current objects then changes", async (t) => {
  const api = await started(t);
  api.put(pod("a"));
  api.put(pod("b"));
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { resourceVersion: "0" });
  t.teardown(() => watch.stop());
  await watch.waitFor(2);

  api.put(pod("c"));
  api.patchLabels("pods", "default", "a", { tier: "web" });
  api.remove("pods", "default", "b");
  const events = await watch.waitFor(5);
  t.deepEqual(events.map((event) => `${event.type} ${event.object.metadata.name}`), ["ADDED a", "ADDED b", "ADDED c", "MODIFIED a", "DELETED b"]);
  t.is(events[3].object.metadata.labels.tier, "web");
  t.is(events[3].object.kind, "Pod", "watch events carry kind");
  t.is(events[4].object.metadata.resourceVersion, api.resourceVersion, "DELETED carries the deletion's resourceVersion");
  t.is(api.openWatches(), 1);
});

test("watch resumes after a resourceVersion", async (t) => {
  const api = await started(t);
  api.put(pod("a"));
  const from = api.resourceVersion;
  api.put(pod("b"));
  api.patchLabels("pods", "default", "a", { x: "1" });
  api.put(pod("other", { namespace: "other" }));

  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/namespaces/default/pods", { resourceVersion: from });
  t.teardown(() => watch.stop());
  const events = await watch.waitFor(2);
  api.remove("pods", "default", "b");
  await watch.waitFor(3);
  t.deepEqual(events.map((event) => `${event.type} ${event.object.metadata.name}`), ["ADDED b", "MODIFIED a", "DELETED b"]);
});

test("watch of a compacted resourceVersion gets 410", async (t) => {
  const api = await started(t);
  api.put(pod("a"));
  const old = api.resourceVersion;
  api.put(pod("b"));
  api.compact();

  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { resourceVersion: String(Number(old) - 1) });
  const error = await watch.done;
  t.is(error, null, "the stream ends normally after the ERROR event");
  t.is(watch.events.length, 1);
  t.is(watch.events[0].type, "ERROR");
  t.is(watch.events[0].object.kind, "Status");
  t.is(watch.events[0].object.code, 410);
  t.is(watch.events[0].object.reason, "Expired");
  t.regex(watch.events[0].object.message, /^too old resource version: \d+ \(\d+\)$/);

  // The current resourceVersion is still good after compaction.
  const current = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { resourceVersion: api.resourceVersion });
  t.teardown(() => current.stop());
  api.put(pod("c"));
  t.is((await current.waitFor(1))[0].object.metadata.name, "c");
});

test("continue token of a compacted snapshot gets 410", async (t) => {
  const api = await started(t);
  for (let i = 0; i < 5; i++) api.put(pod(`p${i}`));
  const first = await getJson(api, "/api/v1/pods?limit=2");
  api.put(pod("late"));
  api.compact();

  const response = await request(api, `/api/v1/pods?limit=2&continue=${first.metadata.continue}`);
  t.is(response.status, 410);
  const status = JSON.parse(response.body);
  t.is(status.kind, "Status");
  t.is(status.reason, "Expired");
  t.is(status.code, 410);

  const garbage = await request(api, "/api/v1/pods?limit=2&continue=notatoken");
  t.is(garbage.status, 400);
});

test("history limit expires old resourceVersions", async (t) => {
  const api = await started(t, { historyLimit: 3 });
  const start = api.resourceVersion;
  for (let i = 0; i < 5; i++) api.put(pod(`p${i}`));
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { resourceVersion: start });
  await watch.done;
  t.is(watch.events[0]?.type, "ERROR");
});

test("bookmarks carry only the resourceVersion", async (t) => {
  const api = await started(t, { bookmarkIntervalMs: 50 });
  api.put(pod("a"));
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { resourceVersion: api.resourceVersion, allowWatchBookmarks: true });
  t.teardown(() => watch.stop());
  api.put(pod("b"));
  const events = await watch.waitFor(3);
  const bookmark = events.find((event) => event.type === "BOOKMARK");
  t.truthy(bookmark);
  // A bookmark sent before pod "b" carries the version before it: the version is checked by range.
  const { resourceVersion, ...rest } = bookmark!.object.metadata;
  t.deepEqual({ ...bookmark!.object, metadata: rest }, { kind: "Pod", apiVersion: "v1", metadata: {} });
  t.true(Number(resourceVersion) >= 1 && Number(resourceVersion) <= Number(api.resourceVersion), `bookmark version ${resourceVersion}`);

  const plain = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { resourceVersion: api.resourceVersion });
  t.teardown(() => plain.stop());
  await new Promise((resolve) => setTimeout(resolve, 200));
  t.is(plain.events.length, 0, "no bookmarks unless allowWatchBookmarks is set");
});

test("sendInitialEvents ends with a marked bookmark", async (t) => {
  const api = await started(t, { bookmarkIntervalMs: 60_000 });
  api.put(pod("a"));
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { sendInitialEvents: true, allowWatchBookmarks: true, resourceVersionMatch: "NotOlderThan" });
  t.teardown(() => watch.stop());
  const events = await watch.waitFor(2);
  t.is(events[0].type, "ADDED");
  t.is(events[1].type, "BOOKMARK");
  t.is(events[1].object.metadata.annotations["k8s.io/initial-events-end"], "true");
});

test("watch timeoutSeconds ends the stream", async (t) => {
  const api = await started(t);
  const startedAt = Date.now();
  const response = await request(api, "/api/v1/pods?watch=1&timeoutSeconds=1");
  t.is(response.status, 200);
  t.is(response.headers["transfer-encoding"], "chunked");
  t.true(Date.now() - startedAt >= 900);
  t.is(api.openWatches(), 0);
});

test("label selector transitions send DELETED and ADDED", async (t) => {
  const api = await started(t);
  api.put(pod("a", { labels: { app: "web" } }));
  api.put(pod("b", { labels: { app: "db" } }));
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { labelSelector: "app in (web,api),!canary" });
  t.teardown(() => watch.stop());
  await watch.waitFor(1);

  api.patchLabels("pods", "default", "a", { app: "db" });
  api.patchLabels("pods", "default", "b", { app: "api" });
  api.patchLabels("pods", "default", "b", { canary: "true" });
  api.patchLabels("pods", "default", "a", { team: "x" });
  const events = await watch.waitFor(4);
  t.deepEqual(events.map((event) => `${event.type} ${event.object.metadata.name}`), ["ADDED a", "DELETED a", "ADDED b", "DELETED b"]);
  t.is(events[1].object.metadata.labels.app, "web", "DELETED shows the last state that matched");
  t.is(Number(events[1].object.metadata.resourceVersion), Number(events[0].object.metadata.resourceVersion) + 2);
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.is(watch.events.length, 4, "a change to a non-matching object sends nothing");
});

test("label selector operators", async (t) => {
  const api = await started(t);
  api.put(pod("web", { labels: { app: "web", tier: "front" } }));
  api.put(pod("db", { labels: { app: "db" } }));
  api.put(pod("bare"));
  const cases: [string, string[]][] = [
    ["app=web", ["web"]],
    ["app==web", ["web"]],
    ["app!=web", ["bare", "db"]],
    ["app notin (web)", ["bare", "db"]],
    ["app in (web, db)", ["db", "web"]],
    ["tier", ["web"]],
    ["!tier", ["bare", "db"]],
    ["app,!tier", ["db"]],
    ["app=web,tier=back", []],
    ["", ["bare", "db", "web"]],
  ];
  for (const [selector, expected] of cases) {
    const result = await getJson(api, `/api/v1/pods?labelSelector=${encodeURIComponent(selector)}`);
    t.deepEqual(result.items.map((item: any) => item.metadata.name).sort(), expected, selector);
  }
  for (const malformed of ["app in web", "app=(x", "=x", "a,,b", "app in ()", "bad key=x"]) {
    const response = await request(api, `/api/v1/pods?labelSelector=${encodeURIComponent(malformed)}`);
    t.is(response.status, 400, malformed);
    t.is(JSON.parse(response.body).reason, "BadRequest", malformed);
  }
});

test("field selector on spec.nodeName", async (t) => {
  const api = await started(t);
  api.put(pod("a", { node: "node1" }));
  api.put(pod("b", { node: "node2" }));
  api.put(pod("c", { namespace: "other", node: "node1" }));
  const names = async (query: string): Promise<string[]> =>
    (await getJson(api, `/api/v1/pods?fieldSelector=${encodeURIComponent(query)}`)).items.map((item: any) => item.metadata.name).sort();

  t.deepEqual(await names("spec.nodeName=node1"), ["a", "c"]);
  t.deepEqual(await names("spec.nodeName==node1,metadata.namespace=default"), ["a"]);
  t.deepEqual(await names("spec.nodeName!=node1"), ["b"]);
  t.deepEqual(await names("metadata.name=b"), ["b"]);

  const unsupported = await request(api, `/api/v1/pods?fieldSelector=${encodeURIComponent("spec.color=red")}`);
  t.is(unsupported.status, 400);
  t.regex(JSON.parse(unsupported.body).message, /field label not supported: spec\.color/);
  const notForServices = await request(api, `/api/v1/services?fieldSelector=${encodeURIComponent("spec.nodeName=node1")}`);
  t.is(notForServices.status, 400);
  t.is((await request(api, "/api/v1/pods?fieldSelector=justtext")).status, 400);

  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { fieldSelector: "spec.nodeName=node2" });
  t.teardown(() => watch.stop());
  await watch.waitFor(1);
  api.put(pod("d", { node: "node2" }));
  api.put(pod("e", { node: "node3" }));
  api.put(pod("b", { node: "node3" }));
  const events = await watch.waitFor(3);
  t.deepEqual(events.map((event) => `${event.type} ${event.object.metadata.name}`), ["ADDED b", "ADDED d", "DELETED b"]);
});

test("merge patch adds and removes an annotation", async (t) => {
  const api = await started(t);
  api.put({ ...pod("a"), metadata: { name: "a", namespace: "default", annotations: { keep: "1" } } });
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { resourceVersion: api.resourceVersion });
  t.teardown(() => watch.stop());
  const patchPath = "/api/v1/namespaces/default/pods/a";

  const added = await request(api, patchPath, {
    method: "PATCH",
    headers: { "Content-Type": "application/merge-patch+json" },
    body: JSON.stringify({ metadata: { annotations: { "ambient.istio.io/redirection": "enabled" } } }),
  });
  t.is(added.status, 200);
  t.deepEqual(JSON.parse(added.body).metadata.annotations, { keep: "1", "ambient.istio.io/redirection": "enabled" });

  const removed = await request(api, patchPath, {
    method: "PATCH",
    headers: { "Content-Type": "application/strategic-merge-patch+json; charset=utf-8" },
    body: JSON.stringify({ metadata: { annotations: { "ambient.istio.io/redirection": null } } }),
  });
  t.is(removed.status, 200);
  t.deepEqual(api.get("pods", "default", "a")?.metadata?.annotations, { keep: "1" });

  const events = await watch.waitFor(2);
  t.deepEqual(events.map((event) => event.type), ["MODIFIED", "MODIFIED"]);

  const noop = await request(api, patchPath, { method: "PATCH", headers: { "Content-Type": "application/merge-patch+json" }, body: JSON.stringify({ metadata: { annotations: { keep: "1" } } }) });
  t.is(JSON.parse(noop.body).metadata.resourceVersion, api.resourceVersion, "a patch that changes nothing is no write");
});

test("patch status and errors", async (t) => {
  const api = await started(t);
  api.put(pod("a"));
  const status = await request(api, "/api/v1/namespaces/default/pods/a/status", {
    method: "PATCH",
    headers: { "Content-Type": "application/merge-patch+json" },
    body: JSON.stringify({ status: { phase: "Succeeded" }, spec: { nodeName: "ignored" } }),
  });
  t.is(status.status, 200);
  t.is((api.get("pods", "default", "a")?.status as any).phase, "Succeeded");
  t.is((api.get("pods", "default", "a")?.spec as any).nodeName, "node1", "a status patch keeps spec");

  const mainIgnoresStatus = await request(api, "/api/v1/namespaces/default/pods/a", { method: "PATCH", headers: { "Content-Type": "application/merge-patch+json" }, body: '{"status":{"phase":"Failed"}}' });
  t.is(JSON.parse(mainIgnoresStatus.body).status.phase, "Succeeded");

  const jsonPatch = await request(api, "/api/v1/namespaces/default/pods/a", { method: "PATCH", headers: { "Content-Type": "application/json-patch+json" }, body: "[]" });
  t.is(jsonPatch.status, 415);
  t.is(JSON.parse(jsonPatch.body).reason, "UnsupportedMediaType");
  const missing = await request(api, "/api/v1/namespaces/default/pods/nope", { method: "PATCH", headers: { "Content-Type": "application/merge-patch+json" }, body: "{}" });
  t.is(missing.status, 404);
  const invalid = await request(api, "/api/v1/namespaces/default/pods/a", { method: "PATCH", headers: { "Content-Type": "application/merge-patch+json" }, body: "{not json" });
  t.is(invalid.status, 400);
  const stale = await request(api, "/api/v1/namespaces/default/pods/a", { method: "PATCH", headers: { "Content-Type": "application/merge-patch+json" }, body: '{"metadata":{"resourceVersion":"1","labels":{"x":"y"}}}' });
  t.is(stale.status, 409);
});

test("patch through client-node", async (t) => {
  const api = await started(t, { token: "t0ken" });
  api.put(pod("a"));
  const core = kubeConfigFor(api).makeApiClient(k8s.CoreV1Api);
  const patched = await core.patchNamespacedPod(
    { name: "a", namespace: "default", body: { metadata: { annotations: { note: "x" } } } },
    k8s.setHeaderOptions("Content-Type", k8s.PatchStrategy.MergePatch),
  );
  t.is(patched.metadata?.annotations?.note, "x");
  t.is(api.requests.at(-1)?.method, "PATCH");
});

test("requests without the token get 401", async (t) => {
  const api = await started(t, { token: "right" });
  api.put(pod("a"));
  const anonymous = await request(api, "/api/v1/pods", { headers: { Authorization: "" } });
  t.is(anonymous.status, 401);
  t.is(JSON.parse(anonymous.body).reason, "Unauthorized");
  const wrong = await request(api, "/api/v1/pods", { headers: { Authorization: "Bearer wrong" } });
  t.is(wrong.status, 401);

  const core = kubeConfigFor(api).makeApiClient(k8s.CoreV1Api);
  t.is((await core.listPodForAllNamespaces()).items.length, 1);
  t.deepEqual(api.requests.at(-1), { method: "GET", path: "/api/v1/pods", query: {} });
});

test("refused requests leave open watches", async (t) => {
  const api = await started(t);
  const daemonSet = { apiVersion: "apps/v1", kind: "DaemonSet", metadata: { name: "agent", namespace: "mesh" }, spec: {} };
  api.put(daemonSet);
  api.put({ ...daemonSet, metadata: { name: "other", namespace: "mesh" } });
  const watch = await Recorder.start(kubeConfigFor(api), "/apis/apps/v1/namespaces/mesh/daemonsets", { fieldSelector: "metadata.name=agent" });
  t.teardown(() => watch.stop());
  t.deepEqual((await watch.waitFor(1)).map((event) => `${event.type} ${event.object.metadata.name}`), ["ADDED agent"]);

  api.refuseRequests(403);
  const forbidden = await request(api, "/apis/apps/v1/namespaces/mesh/daemonsets/agent");
  t.is(forbidden.status, 403);
  t.is(JSON.parse(forbidden.body).reason, "Forbidden");
  api.remove("daemonsets", "mesh", "other");
  api.remove("daemonsets", "mesh", "agent");
  t.deepEqual((await watch.waitFor(2)).map((event) => `${event.type} ${event.object.metadata.name}`), ["ADDED agent", "DELETED agent"]);

  api.refuseRequests(401);
  t.is((await request(api, "/apis/apps/v1/namespaces/mesh/daemonsets")).status, 401);
  api.refuseRequests(undefined);
  t.is((await request(api, "/apis/apps/v1/namespaces/mesh/daemonsets")).status, 200);
});

test("outage resets connections and recovery works", async (t) => {
  const api = await started(t);
  api.put(pod("a"));
  const config = kubeConfigFor(api);
  const watch = await Recorder.start(config, "/api/v1/pods", {});
  t.teardown(() => watch.stop());
  await watch.waitFor(1);
  t.is(api.openWatches(), 1);

  api.setOutage(true);
  const error = await watch.done;
  t.truthy(error, "the watch ends with an error, not cleanly");
  t.is(api.openWatches(), 0);
  const refused = await request(api, "/api/v1/pods").catch((failure: NodeJS.ErrnoException) => failure);
  t.true(refused instanceof Error);
  t.is((refused as NodeJS.ErrnoException).code, "ECONNRESET");

  api.setOutage(false);
  const core = config.makeApiClient(k8s.CoreV1Api);
  t.is((await core.listPodForAllNamespaces()).items.length, 1);
  const again = await Recorder.start(config, "/api/v1/pods", {});
  t.teardown(() => again.stop());
  await again.waitFor(1);
});

test("closeWatches ends streams cleanly", async (t) => {
  const api = await started(t);
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/namespaces", {});
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.is(api.openWatches(), 1);
  api.closeWatches();
  t.is(await watch.done, null);
  t.is(api.openWatches(), 0);
});

test("TLS with the generated CA", async (t) => {
  const api = await started(t, { tls: true, token: "tls-token" });
  t.true(api.url.startsWith("https://127.0.0.1:"));
  t.regex(api.caPem ?? "", /^-----BEGIN CERTIFICATE-----/);
  api.put(pod("a"));

  const core = kubeConfigFor(api).makeApiClient(k8s.CoreV1Api);
  t.is((await core.listPodForAllNamespaces()).items.length, 1);
  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", {});
  t.teardown(() => watch.stop());
  await watch.waitFor(1);

  const untrusted = await request(api, "/api/v1/pods", { ca: "" }).catch((failure: NodeJS.ErrnoException) => failure);
  t.true(untrusted instanceof Error);
  t.regex(String((untrusted as NodeJS.ErrnoException).code), /SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER/);
});

test("discovery documents", async (t) => {
  const api = await started(t);
  t.is((await getJson(api, "/version")).major, "1");
  t.deepEqual((await getJson(api, "/api")).versions, ["v1"]);
  const groups = (await getJson(api, "/apis")).groups.map((group: any) => group.name).sort();
  t.deepEqual(groups, ["apps", "discovery.k8s.io", "security.istio.io"]);
  const core = await getJson(api, "/api/v1");
  t.true(core.resources.some((entry: any) => entry.name === "pods" && entry.namespaced && entry.verbs.includes("watch")));
});

test("serves 10,000 pods and 1,000 services", async (t) => {
  const api = await started(t);
  for (let i = 0; i < 10_000; i++) api.put(pod(`pod-${i}`, { namespace: `ns-${i % 50}`, node: `node-${i % 20}` }));
  for (let i = 0; i < 1000; i++) api.put({ apiVersion: "v1", kind: "Service", metadata: { name: `svc-${i}`, namespace: `ns-${i % 50}` }, spec: { clusterIP: "10.96.0.1" } });

  const startedAt = Date.now();
  const core = kubeConfigFor(api).makeApiClient(k8s.CoreV1Api);
  let count = 0;
  let token: string | undefined;
  do {
    const page = await core.listPodForAllNamespaces({ limit: 500, _continue: token });
    count += page.items.length;
    token = page.metadata?._continue;
  } while (token);
  t.is(count, 10_000);
  t.is((await core.listServiceForAllNamespaces()).items.length, 1000);

  const watch = await Recorder.start(kubeConfigFor(api), "/api/v1/pods", { fieldSelector: "spec.nodeName=node-3" });
  t.teardown(() => watch.stop());
  await watch.waitFor(500);
  t.log(`listed 10,000 pods in pages of 500 and watched 500 in ${Date.now() - startedAt} ms`);
  t.true(Date.now() - startedAt < 30_000);
});

test("listenInNetns serves inside a namespace", async (t) => {
  if (process.getuid?.() !== 0) {
    t.pass("needs root to make a network namespace");
    return;
  }
  const netns = `aakapi-${process.pid}`;
  execFileSync("ip", ["netns", "add", netns]);
  t.teardown(() => execFileSync("ip", ["netns", "delete", netns]));
  const netnsPath = `/var/run/netns/${netns}`;
  execFileSync("nsenter", [`--net=${netnsPath}`, "ip", "link", "set", "lo", "up"]);

  const api = await started(t, { tls: true, token: "ns-token" });
  api.put(pod("inside"));
  const url = await api.listenInNetns(netnsPath, "127.0.0.1", 0);
  t.regex(url, /^https:\/\/127\.0\.0\.1:\d+$/);

  const caFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "fake-kube-ca-")), "ca.pem");
  fs.writeFileSync(caFile, api.caPem!);
  t.teardown(() => fs.rmSync(path.dirname(caFile), { recursive: true, force: true }));
  const curl = (): Promise<string> =>
    new Promise((resolve, reject) => {
      // execFile keeps the event loop free, because the server that responds to curl runs in this process.
      const args = [`--net=${netnsPath}`, "curl", "-sS", "--max-time", "5", "--cacert", caFile, "-H", "Authorization: Bearer ns-token", `${url}/api/v1/pods`];
      execFile("nsenter", args, { encoding: "utf8" }, (error, stdout) => (error ? reject(error) : resolve(stdout)));
    });
  const list = JSON.parse(await curl());
  t.is(list.items[0].metadata.name, "inside");
  t.is(api.requests.at(-1)?.path, "/api/v1/pods");
});
