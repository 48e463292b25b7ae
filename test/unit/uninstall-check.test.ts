// Uninstall detection against the fake API server: the watch of the DaemonSet, the read at the
// stop signal, the watched deletion that decides when the read fails, and the decision table.
// Loopback only.

import test, { type ExecutionContext } from "ava";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { KubeApiError, KubeClient } from "../../agent/discovery/kube-client";
import { decisionOf, parseDaemonSetRef, UninstallCheck, type DaemonSetRef, type DaemonSetState, type WatchRecord } from "../../agent/uninstall";
import { FakeKubeApi, type RequestRecord, type ResponseOverride } from "../harness/fake-kube-api";
import { writeKubeconfigFile } from "../harness/fake-kube-tls";

const REF: DaemonSetRef = { namespace: "mesh", name: "ambient-agent" };
const OBJECT_PATH = "/apis/apps/v1/namespaces/mesh/daemonsets/ambient-agent";
const COLLECTION_PATH = "/apis/apps/v1/namespaces/mesh/daemonsets";
/** The body of the API server's own 404 for the DaemonSet, the only 404 that means not found. */
const NOT_FOUND_STATUS = {
  kind: "Status",
  apiVersion: "v1",
  metadata: {},
  status: "Failure",
  message: 'daemonsets.apps "ambient-agent" not found',
  reason: "NotFound",
  details: { name: "ambient-agent", group: "apps", kind: "daemonsets" },
  code: 404,
};
/** A short read timeout, so that the unreachable cases end fast. */
const TIMEOUT_MS = 500;
/** Short backoffs, so that a watch resumes at once after an outage. */
const REFLECTOR = { minBackoffMs: 10, maxBackoffMs: 100 };
/** The bound on each wait for the watch, which no test asserts on. */
const WAIT_MS = 5_000;

let workDir = "";
/** One fake API server and client for the tests that read the DaemonSet from it; they run one at a time. */
let api: FakeKubeApi;
let client: KubeClient;

test.before(async () => {
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), "aauninst-"));
  api = await FakeKubeApi.start({ token: "t0ken" });
  client = await clientFor(api.url, "t0ken");
});

test.after.always(async () => {
  client?.close();
  await api?.stop();
  fs.rmSync(workDir, { recursive: true, force: true });
});

function daemonSet(metadata: Record<string, unknown> = {}): Record<string, unknown> {
  return { apiVersion: "apps/v1", kind: "DaemonSet", metadata: { name: REF.name, namespace: REF.namespace, ...metadata }, spec: {} };
}

let clientCount = 0;

/** Loads a KubeClient for `serverUrl`, through a kubeconfig as the agent does with --kubeconfig. */
async function clientFor(serverUrl: string, token?: string): Promise<KubeClient> {
  const kubeconfig = path.join(workDir, `kubeconfig-${++clientCount}`);
  writeKubeconfigFile(kubeconfig, { serverUrl, token });
  return KubeClient.load({ kind: "kubeconfig", path: kubeconfig });
}

/** Makes a logger that keeps each record's message. */
function memoryLogger(): { logger: pino.Logger; messages: string[] } {
  const messages: string[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => void messages.push((JSON.parse(line) as { msg: string }).msg) });
  return { logger, messages };
}

/**
 * Stores the DaemonSet in the shared fake API server, or removes it, and returns a check against
 * that server, stopped when the test ends.
 */
function fakeApi(t: ExecutionContext, stored?: Record<string, unknown>, checkClient: Pick<KubeClient, "request" | "watch"> = client): { check: UninstallCheck; messages: string[] } {
  api.remove("daemonsets", REF.namespace, REF.name);
  if (stored) api.put(stored);
  const { logger, messages } = memoryLogger();
  const check = new UninstallCheck(checkClient, REF, logger, TIMEOUT_MS, REFLECTOR);
  t.teardown(() => check.stop());
  return { check, messages };
}

/** Waits until `condition` holds, or fails with `what` after WAIT_MS. */
async function waitUntil(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${WAIT_MS} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Starts the check and waits until its watch has listed the DaemonSet. */
async function startWatching(check: UninstallCheck, messages: string[]): Promise<void> {
  check.start();
  await waitUntil(() => messages.some((message) => message.startsWith("found DaemonSet mesh/ambient-agent")), "the watch to list the DaemonSet");
  // The watch opens after the list, and later changes reach it from the list's resourceVersion.
  await waitUntil(() => api.requests.some((request) => request.path === COLLECTION_PATH && request.query.watch === "true"), "the watch to open");
}

/** Tells whether the DaemonSet itself was read (GET of the object) since request number `from`. */
function objectReadSince(from: number): boolean {
  return api.requests.slice(from).some((request) => request.method === "GET" && request.path === OBJECT_PATH);
}

/** Tells whether a request is a list (not a watch) of the DaemonSet's collection. */
function isList(request: RequestRecord): boolean {
  return request.method === "GET" && request.path === COLLECTION_PATH && request.query.watch !== "true";
}

/** Tells whether a request is a watch of the DaemonSet's collection. */
function isWatch(request: RequestRecord): boolean {
  return request.path === COLLECTION_PATH && request.query.watch === "true";
}

/** Runs `body` with `interceptor` responding to requests in place of the fake API server. */
async function intercepted<T>(interceptor: (request: RequestRecord) => ResponseOverride | undefined, body: () => Promise<T>): Promise<T> {
  api.respondFirst(interceptor);
  try {
    return await body();
  } finally {
    api.respondFirst(undefined);
  }
}

/** Runs `body` while the fake API server refuses every request with `status`, as after `helm uninstall`. */
async function refused<T>(status: 401 | 403, body: () => Promise<T>): Promise<T> {
  api.refuseRequests(status);
  try {
    return await body();
  } finally {
    api.refuseRequests(undefined);
  }
}

/** Makes the watch list again: the outage ends its stream, and compaction expires the version it resumes from. */
function forceNewList(): void {
  api.setOutage(true);
  // A change the watch does not select moves the resourceVersion past the watch's.
  api.put(daemonSet({ name: "other-agent" }));
  api.remove("daemonsets", REF.namespace, "other-agent");
  api.compact();
  api.setOutage(false);
}

/** Starts a plain HTTP server that responds to every request with `status` and a Status body, or never when status is 0. */
async function stubServer(status: number): Promise<{ url: string; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = http.createServer((_request, response) => {
    if (status === 0) return;
    const body = JSON.stringify({ kind: "Status", apiVersion: "v1", status: "Failure", code: status, reason: "Forbidden", message: "daemonsets.apps is forbidden" });
    response.writeHead(status, { "content-type": "application/json" }).end(body);
  });
  server.on("connection", (socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  return {
    url,
    close: () => {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

test.serial("watch follows only the DaemonSet", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  api.put(daemonSet({ name: "other-agent" }));
  await startWatching(check, messages);
  api.remove("daemonsets", REF.namespace, "other-agent");
  const watches = api.requests.filter((request) => request.path === COLLECTION_PATH && request.query.watch === "true");
  t.true(watches.length > 0, "the DaemonSet is not watched");
  for (const request of api.requests.filter((request) => request.path === COLLECTION_PATH)) {
    t.is(request.query.fieldSelector, "metadata.name=ambient-agent", JSON.stringify(request));
  }
  // Events arrive in order: when this one is seen, the other DaemonSet's deletion has been handled.
  api.put(daemonSet({ deletionTimestamp: "2026-01-02T03:04:05Z" }));
  await waitUntil(() => check.watchedDeletion() !== undefined, "the watch to report the deletionTimestamp");
  t.is(check.watchedDeletion(), "DaemonSet mesh/ambient-agent is being deleted (deletionTimestamp 2026-01-02T03:04:05Z)", "the deletion of another DaemonSet was taken for this one");
});

test.serial("present DaemonSet is not an uninstall", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  const from = api.requests.length;
  const decision = await check.decide();
  t.false(decision.uninstall);
  t.is(decision.reason, "DaemonSet mesh/ambient-agent exists");
  t.is(decision.source, "read at stop");
  t.true(messages.some((message) => message.startsWith("not an uninstall: DaemonSet mesh/ambient-agent exists")), messages.join("\n"));
  t.true(objectReadSince(from), "the DaemonSet was not read at the stop");
});

test.serial("watched deletion survives revoked access", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  api.remove("daemonsets", REF.namespace, REF.name);
  await waitUntil(() => check.watchedDeletion() !== undefined, "the watch to report the deletion");
  const from = api.requests.length;
  const decision = await refused(403, () => check.decide());
  t.true(decision.uninstall);
  t.is(decision.source, "watch");
  t.regex(decision.reason, /^DaemonSet mesh\/ambient-agent was deleted \(watch event at \d{4}-\d\d-\d\dT/);
  t.true(messages.some((message) => /^uninstall: DaemonSet mesh\/ambient-agent was deleted .*; the read at the stop failed, so the deletion that the watch saw decides;/.test(message)), messages.join("\n"));
  t.true(objectReadSince(from), "the DaemonSet was not read at the stop");
});

test.serial("watched deletionTimestamp survives revoked credentials", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  api.put(daemonSet({ deletionTimestamp: "2026-01-02T03:04:05Z", finalizers: ["foregroundDeletion"] }));
  await waitUntil(() => check.watchedDeletion() !== undefined, "the watch to report the deletionTimestamp");
  const decision = await refused(401, () => check.decide());
  t.true(decision.uninstall);
  t.is(decision.source, "watch");
  t.is(decision.reason, "DaemonSet mesh/ambient-agent is being deleted (deletionTimestamp 2026-01-02T03:04:05Z)");
  t.true(messages.some((message) => message.startsWith("DaemonSet mesh/ambient-agent is being deleted (deletionTimestamp 2026-01-02T03:04:05Z): a stop signal now uninstalls")), messages.join("\n"));
});

test.serial("DaemonSet created again is not an uninstall", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  api.remove("daemonsets", REF.namespace, REF.name);
  await waitUntil(() => check.watchedDeletion() !== undefined, "the watch to report the deletion");
  api.put(daemonSet());
  await waitUntil(() => check.watchedDeletion() === undefined, "the watch to report the new DaemonSet");
  const decision = await check.decide();
  t.false(decision.uninstall);
  t.is(decision.reason, "DaemonSet mesh/ambient-agent exists");
  t.true(messages.includes("DaemonSet mesh/ambient-agent created again: a stop signal no longer uninstalls the agent"), messages.join("\n"));
});

test.serial("DaemonSet created again while the watch was down", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  api.remove("daemonsets", REF.namespace, REF.name);
  await waitUntil(() => check.watchedDeletion() !== undefined, "the watch to report the deletion");
  const unavailable = { code: 503, body: JSON.stringify({ kind: "Status", apiVersion: "v1", status: "Failure", code: 503, reason: "ServiceUnavailable", message: "etcd is unavailable" }) };
  // The watch can neither list nor watch, so it does not see the DaemonSet created again.
  const decision = await intercepted(
    (request) => (request.path === COLLECTION_PATH ? unavailable : undefined),
    async () => {
      api.closeWatches();
      api.put(daemonSet());
      return check.decide();
    },
  );
  t.truthy(check.watchedDeletion(), "the watch saw the DaemonSet created again, so the read did not have to decide");
  t.false(decision.uninstall);
  t.is(decision.source, "read at stop");
  t.is(decision.reason, "DaemonSet mesh/ambient-agent exists, so it was created again after the deletion that the watch saw");
});

test.serial("new list without the DaemonSet is no deletion", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  // As a restored etcd or another store behind a proxy: the list lacks the DaemonSet, which still exists.
  const emptyList = (): ResponseOverride => ({ code: 200, body: JSON.stringify({ kind: "DaemonSetList", apiVersion: "apps/v1", metadata: { resourceVersion: api.resourceVersion }, items: [] }) });
  await intercepted(
    (request) => (isList(request) ? emptyList() : undefined),
    async () => {
      forceNewList();
      await waitUntil(() => messages.some((message) => message.startsWith("DaemonSet mesh/ambient-agent is missing from a new list, which is no proof of deletion")), "the new list without the DaemonSet");
    },
  );
  t.is(check.watchedDeletion(), undefined, "the new list counted as a deletion");
  const decision = await refused(403, () => check.decide());
  t.false(decision.uninstall);
  t.regex(decision.reason, /^cannot read DaemonSet mesh\/ambient-agent: .*403/);
});

test.serial("deletion during a watch outage is found by the read", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  api.setOutage(true);
  api.remove("daemonsets", REF.namespace, REF.name);
  // The watch cannot resume from its version, so it lists again.
  api.compact();
  api.setOutage(false);
  await waitUntil(() => messages.some((message) => message.startsWith("DaemonSet mesh/ambient-agent is missing from a new list")), "the new list without the DaemonSet");
  t.is(check.watchedDeletion(), undefined, "the new list counted as a deletion");
  const from = api.requests.length;
  const decision = await check.decide();
  t.true(decision.uninstall);
  t.is(decision.source, "read at stop");
  t.is(decision.reason, "DaemonSet mesh/ambient-agent not found");
  t.true(objectReadSince(from), "the DaemonSet was not read at the stop");
});

test.serial("deletion of another uid is no deletion", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  // Events for older objects of the same name, sent on one watch stream that then ends.
  const foreign = (uid: string, extra: Record<string, unknown> = {}): Record<string, unknown> => daemonSet({ uid, ...extra });
  const events = [
    { type: "MODIFIED", object: foreign("uid-older-1", { deletionTimestamp: "2026-01-02T03:04:05Z" }) },
    { type: "DELETED", object: foreign("uid-older-2") },
  ];
  const stream = { code: 200, body: events.map((event) => JSON.stringify(event) + "\n").join("") };
  let sent = false;
  const ignored = (): number => messages.filter((message) => message.includes("does not count as a deletion, because its uid")).length;
  await intercepted(
    (request) => {
      if (!isWatch(request) || sent) return undefined;
      sent = true;
      return stream;
    },
    async () => {
      api.closeWatches();
      await waitUntil(() => ignored() === 2, "the watch to ignore both events");
    },
  );
  t.is(check.watchedDeletion(), undefined, "an event for another uid counted as a deletion");
  const decision = await refused(403, () => check.decide());
  t.false(decision.uninstall);
  t.regex(decision.reason, /^cannot read DaemonSet mesh\/ambient-agent: /);
});

test.serial("deletionTimestamp at first sight is no watched deletion", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet({ deletionTimestamp: "2026-01-02T03:04:05Z" }));
  check.start();
  await waitUntil(() => messages.some((message) => message.startsWith("deletionTimestamp 2026-01-02T03:04:05Z of DaemonSet mesh/ambient-agent does not count")), "the first list");
  t.is(check.watchedDeletion(), undefined);
  const refusedDecision = await refused(403, () => check.decide());
  t.false(refusedDecision.uninstall, "the watch decided on a uid it had not seen before");
  // The read itself still finds the deletion.
  const decision = await check.decide();
  t.true(decision.uninstall);
  t.is(decision.reason, "DaemonSet mesh/ambient-agent is being deleted (deletionTimestamp 2026-01-02T03:04:05Z)");
});

test.serial("404 without the NotFound Status is no uninstall", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  const status = (changes: Record<string, unknown>): string => JSON.stringify({ ...NOT_FOUND_STATUS, ...changes });
  const cases: Array<{ what: string; response: ResponseOverride; uninstall: boolean }> = [
    { what: "a proxy's text", response: { code: 404, body: "404 page not found\n", contentType: "text/plain; charset=utf-8" }, uninstall: false },
    { what: "an empty body", response: { code: 404, body: "" }, uninstall: false },
    { what: "a Status without details", response: { code: 404, body: status({ details: undefined }) }, uninstall: false },
    { what: "a Status for another name", response: { code: 404, body: status({ details: { name: "other-agent", group: "apps", kind: "daemonsets" } }) }, uninstall: false },
    { what: "a Status for another kind", response: { code: 404, body: status({ details: { name: "ambient-agent", group: "", kind: "pods" } }) }, uninstall: false },
    { what: "a Status for another group", response: { code: 404, body: status({ details: { name: "ambient-agent", group: "extensions", kind: "daemonsets" } }) }, uninstall: false },
    { what: "a Status with another reason", response: { code: 404, body: status({ reason: "" }) }, uninstall: false },
    { what: "a body that is no Status", response: { code: 404, body: status({ kind: "DaemonSet" }) }, uninstall: false },
    { what: "the API server's NotFound Status", response: { code: 404, body: JSON.stringify(NOT_FOUND_STATUS) }, uninstall: true },
  ];
  for (const { what, response, uninstall } of cases) {
    const decision = await intercepted(
      (request) => (request.method === "GET" && request.path === OBJECT_PATH ? response : undefined),
      () => check.decide(),
    );
    t.is(decision.uninstall, uninstall, `${what}: ${decision.reason}`);
    if (!uninstall) t.regex(decision.reason, /^cannot read DaemonSet mesh\/ambient-agent: GET .*: 404 /, what);
  }
  t.true(messages.some((message) => message.includes("comes from a proxy or an API server that is still starting")), messages.join("\n"));
});

test.serial("404 without the NotFound Status leaves the watch to decide", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  api.remove("daemonsets", REF.namespace, REF.name);
  await waitUntil(() => check.watchedDeletion() !== undefined, "the watch to report the deletion");
  const proxy404 = { code: 404, body: "404 page not found\n", contentType: "text/plain; charset=utf-8" };
  const decision = await intercepted((request) => (request.path === OBJECT_PATH ? proxy404 : undefined), () => check.decide());
  t.true(decision.uninstall);
  t.is(decision.source, "watch");
  t.regex(decision.reason, /^DaemonSet mesh\/ambient-agent was deleted \(watch event at /);
});

test.serial("read at stop finds a deletion the watch missed", async (t) => {
  // A Role that grants get and list but not watch: the watch fails, the read still works.
  const noWatch: Pick<KubeClient, "request" | "watch"> = {
    request: (method, requestPath, options) => client.request(method, requestPath, options),
    watch: async (_path, _query, handlers) => {
      setImmediate(() => handlers.done(new KubeApiError(403, "watch daemonsets.apps is forbidden")));
      return () => undefined;
    },
  };
  const { check, messages } = fakeApi(t, daemonSet(), noWatch);
  await startWatching(check, messages);
  api.remove("daemonsets", REF.namespace, REF.name);
  const decision = await check.decide();
  t.true(decision.uninstall);
  t.is(decision.source, "read at stop");
  t.is(decision.reason, "DaemonSet mesh/ambient-agent not found");
  t.is(check.watchedDeletion(), undefined);
});

test.serial("read at stop finds deletionTimestamp", async (t) => {
  const { check } = fakeApi(t, daemonSet({ deletionTimestamp: "2026-01-02T03:04:05Z" }));
  const decision = await check.decide();
  t.true(decision.uninstall);
  t.is(decision.reason, "DaemonSet mesh/ambient-agent is being deleted (deletionTimestamp 2026-01-02T03:04:05Z)");
});

test.serial("DaemonSet missing since start is not an uninstall", async (t) => {
  const { check, messages } = fakeApi(t);
  check.start();
  const decision = await check.decide();
  t.false(decision.uninstall);
  t.regex(decision.reason, /not found, as at start, so --daemonset may name the wrong object/);
  t.true(messages.some((message) => message.includes("not found: check --daemonset")), messages.join("\n"));
});

test.serial("unreachable API server is not an uninstall", async (t) => {
  const { check, messages } = fakeApi(t, daemonSet());
  await startWatching(check, messages);
  api.setOutage(true);
  api.remove("daemonsets", REF.namespace, REF.name);
  try {
    const decision = await check.decide();
    t.false(decision.uninstall);
    t.regex(decision.reason, /^cannot read DaemonSet mesh\/ambient-agent: /);
    t.true(messages.some((message) => message.includes("check that the API server is reachable")), messages.join("\n"));
  } finally {
    api.setOutage(false);
  }
});

test.serial("rejected token is not an uninstall", async (t) => {
  const rejected = await clientFor(api.url, "wrong");
  try {
    const { check } = fakeApi(t, daemonSet({ deletionTimestamp: "2026-01-02T03:04:05Z" }), rejected);
    check.start();
    const decision = await check.decide();
    t.false(decision.uninstall);
    t.regex(decision.reason, /401/);
  } finally {
    rejected.close();
  }
});

test.serial("forbidden read is not an uninstall", async (t) => {
  const server = await stubServer(403);
  const forbidden = await clientFor(server.url);
  try {
    const { logger, messages } = memoryLogger();
    const check = new UninstallCheck(forbidden, REF, logger, TIMEOUT_MS, REFLECTOR);
    t.teardown(() => check.stop());
    check.start();
    const decision = await check.decide();
    t.false(decision.uninstall);
    t.regex(decision.reason, /403 daemonsets\.apps is forbidden/);
    t.true(messages.some((message) => message.includes("grant the agent's service account get, list and watch on apps daemonsets")), messages.join("\n"));
    t.true(messages.some((message) => message.includes(`may not list or watch ${COLLECTION_PATH} (403)`)), messages.join("\n"));
  } finally {
    forbidden.close();
    await server.close();
  }
});

test.serial("server that never answers is not an uninstall", async (t) => {
  const server = await stubServer(0);
  const silent = await clientFor(server.url);
  try {
    const { logger } = memoryLogger();
    // Not started: a list that gets no response would hold stop() for the request timeout.
    const decision = await new UninstallCheck(silent, REF, logger, TIMEOUT_MS).decide();
    t.false(decision.uninstall);
    t.regex(decision.reason, /timed out/);
  } finally {
    silent.close();
    await server.close();
  }
});

test("object other than the DaemonSet is not an uninstall", async (t) => {
  const { logger } = memoryLogger();
  const other = { request: async () => ({ kind: "Status", metadata: {} }), watch: async () => () => undefined };
  const decision = await new UninstallCheck(other, REF, logger, TIMEOUT_MS).decide();
  t.false(decision.uninstall);
  t.regex(decision.reason, /something other than DaemonSet mesh\/ambient-agent/);
});

test("decision table", (t) => {
  const present: DaemonSetState = { kind: "present" };
  const deleting: DaemonSetState = { kind: "deleting", since: "2026-01-01T00:00:00Z" };
  const notFound: DaemonSetState = { kind: "not-found" };
  const forbidden: DaemonSetState = { kind: "error", status: 403, message: "forbidden" };
  const unreachable: DaemonSetState = { kind: "error", message: "ECONNREFUSED" };
  const proxy404: DaemonSetState = { kind: "error", status: 404, message: "404 page not found" };
  const seen: WatchRecord = { seen: true, listed: true };
  const deleted: WatchRecord = { seen: true, listed: true, deletion: "DaemonSet mesh/ambient-agent was deleted (watch event at 2026-01-01T00:00:00Z)" };
  const missing: WatchRecord = { seen: false, listed: true };
  const unlisted: WatchRecord = { seen: false, listed: false };
  const cases: Array<{ state: DaemonSetState; watch: WatchRecord; uninstall: boolean; source: "read at stop" | "watch" }> = [
    { state: present, watch: seen, uninstall: false, source: "read at stop" },
    { state: present, watch: deleted, uninstall: false, source: "read at stop" },
    { state: deleting, watch: seen, uninstall: true, source: "read at stop" },
    { state: deleting, watch: missing, uninstall: true, source: "read at stop" },
    { state: deleting, watch: unlisted, uninstall: true, source: "read at stop" },
    { state: notFound, watch: seen, uninstall: true, source: "read at stop" },
    { state: notFound, watch: deleted, uninstall: true, source: "read at stop" },
    { state: notFound, watch: missing, uninstall: false, source: "read at stop" },
    { state: notFound, watch: unlisted, uninstall: false, source: "read at stop" },
    { state: forbidden, watch: seen, uninstall: false, source: "read at stop" },
    { state: forbidden, watch: deleted, uninstall: true, source: "watch" },
    { state: unreachable, watch: seen, uninstall: false, source: "read at stop" },
    { state: unreachable, watch: deleted, uninstall: true, source: "watch" },
    { state: proxy404, watch: seen, uninstall: false, source: "read at stop" },
    { state: proxy404, watch: deleted, uninstall: true, source: "watch" },
  ];
  for (const { state, watch, uninstall, source } of cases) {
    const decision = decisionOf(state, REF, watch);
    const label = `${state.kind}${state.kind === "error" ? ` ${state.status ?? "no status"}` : ""}, watch ${JSON.stringify(watch)}`;
    t.is(decision.uninstall, uninstall, label);
    t.is(decision.source, source, label);
  }
});

test("daemonset reference is checked", (t) => {
  t.deepEqual(parseDaemonSetRef("ambient-agent/ambient-agent"), { namespace: "ambient-agent", name: "ambient-agent" });
  t.deepEqual(parseDaemonSetRef("kube-system/agent.v2"), { namespace: "kube-system", name: "agent.v2" });
  for (const invalid of ["ambient-agent", "a/b/c", "/name", "ns/", "NS/name", "ns/Name", "ns.dot/name", `${"a".repeat(64)}/name`, "ns/-name"]) {
    t.throws(() => parseDaemonSetRef(invalid), { message: new RegExp(`invalid --daemonset "${invalid.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}": give NAMESPACE/NAME`) }, invalid);
  }
});
