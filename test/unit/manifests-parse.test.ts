import test from "ava";
import fs from "node:fs";
import path from "node:path";
import type { AuthorizationPolicy, PeerAuthentication, Service, Workload } from "../../agent/state/types";
import { formatManifestProblem, parseManifests, type ParsedObject } from "../../agent/discovery/manifests";

const FIXTURES = path.join(__dirname, "../../../test/fixtures/manifests");

function parseFixture(name: string) {
  return parseManifests(`manifests/${name}`, fs.readFileSync(path.join(FIXTURES, name), "utf8"));
}

function find<T extends ParsedObject["value"]>(objects: ParsedObject[], key: string): T {
  const object = objects.find((candidate) => candidate.key === key);
  if (object === undefined) throw new Error(`object ${key} not parsed`);
  return object.value as T;
}

test("cluster fixture parses every known kind", (t) => {
  const result = parseFixture("cluster.yaml");
  t.deepEqual(result.problems, []);
  t.false(result.syntaxError);
  t.deepEqual(
    result.objects.map((object) => object.key),
    [
      "Namespace demo",
      "Namespace plain",
      "Pod demo/web",
      "Pod demo/client",
      "Pod plain/legacy",
      "Service demo/web",
      "AuthorizationPolicy demo/web-allow-client",
      "PeerAuthentication demo/strict",
    ],
  );
});

test("pod fields and defaults", (t) => {
  const { objects } = parseFixture("cluster.yaml");
  const web = find<Workload>(objects, "Pod demo/web");
  t.is(web.uid, "demo/web");
  t.is(web.serviceAccount, "web-sa");
  t.is(web.nodeName, "node-a");
  t.is(web.ip, "10.244.1.10");
  t.deepEqual(web.labels, { app: "web", version: "1" });
  t.deepEqual(web.namedPorts, { http: 8080 });
  t.false(web.hostNetwork);
  t.deepEqual(web.source, { file: "manifests/cluster.yaml", document: 2 });

  const client = find<Workload>(objects, "Pod demo/client");
  t.is(client.serviceAccount, "default");
  t.is(find<Workload>(objects, "Pod plain/legacy").ip, "fd00::12");
});

test("service ports and headless service", (t) => {
  const service = find<Service>(parseFixture("cluster.yaml").objects, "Service demo/web");
  t.deepEqual(service.vips, ["10.96.0.20"]);
  t.deepEqual(service.selector, { app: "web" });
  t.deepEqual(service.ports, [
    { name: "http", port: 80, targetPort: "http", protocol: "TCP" },
    { name: "metrics", port: 9090, targetPort: 9090, protocol: "TCP" },
  ]);

  const json = parseFixture("service.json");
  t.deepEqual(json.problems, []);
  const headless = find<Service>(json.objects, "Service demo/headless");
  t.deepEqual(headless.vips, []);
  t.deepEqual(headless.ports, [{ name: "", port: 8080, targetPort: 8080, protocol: "TCP" }]);
});

test("authorization policy and peer authentication", (t) => {
  const { objects } = parseFixture("cluster.yaml");
  const policy = find<AuthorizationPolicy>(objects, "AuthorizationPolicy demo/web-allow-client");
  t.is(policy.action, "ALLOW");
  t.false(policy.dryRun);
  t.deepEqual(policy.selector, { app: "web" });
  t.deepEqual(policy.rules, [
    {
      from: [{ source: { principals: ["cluster.local/ns/demo/sa/default"] } }],
      to: [{ operation: { ports: ["8080"] } }],
      when: [{ key: "source.ip", values: ["10.244.0.0/16"] }],
    },
  ]);

  const peer = find<PeerAuthentication>(objects, "PeerAuthentication demo/strict");
  t.is(peer.mode, "STRICT");
  t.is(peer.selector, undefined);
  t.deepEqual(peer.portLevelMtls, {});
});

test("kind List items and dry-run annotation", (t) => {
  const result = parseFixture("list.yaml");
  t.deepEqual(result.problems, []);
  const policy = find<AuthorizationPolicy>(result.objects, "AuthorizationPolicy listed/deny-all-dry");
  t.true(policy.dryRun);
  t.is(policy.action, "DENY");
  t.deepEqual(policy.rules, [{}]);
  t.truthy(result.objects.find((object) => object.key === "Namespace listed"));
});

test("policy without rules keeps rules undefined", (t) => {
  const text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: x}\nspec: {}\n";
  const policy = find<AuthorizationPolicy>(parseManifests("f.yaml", text).objects, "AuthorizationPolicy x/deny-all");
  t.is(policy.rules, undefined);
  t.is(policy.action, "ALLOW");
  t.is(policy.namespace, "x");
});

test("invalid objects are rejected alone", (t) => {
  const result = parseFixture("invalid.yaml");
  t.false(result.syntaxError);
  t.deepEqual(
    result.objects.map((object) => object.key),
    ["Pod demo/good"],
  );
  const lines = result.problems.map(formatManifestProblem);
  t.true(lines.includes('manifests/invalid.yaml:9: Pod demo/bad-ip: status.podIP: invalid IPv4 or IPv6 address "10.1.1"; fix the value or remove the field'), lines.join("\n"));
});

test("invalid fields each get a problem", (t) => {
  const problems = parseFixture("invalid.yaml").problems;
  const fields = problems.map((problem) => `${problem.object} ${problem.field}`);
  const expected = [
    "Pod demo/bad-ip status.podIP",
    "AuthorizationPolicy demo/bad-policy spec.action",
    "AuthorizationPolicy demo/bad-policy spec.rules[0].from[0].source.principal",
    "AuthorizationPolicy demo/bad-policy spec.rules[0].from[0].source.ipBlocks[0]",
    "AuthorizationPolicy demo/bad-policy spec.rules[0].to[0].operation.ports[0]",
    "AuthorizationPolicy demo/bad-policy spec.rules[0].to[0].operation.ports[1]",
    "AuthorizationPolicy demo/bad-policy spec.rules[0].when[0]",
    "PeerAuthentication demo/bad-pa spec.mtls.mode",
    "PeerAuthentication demo/bad-pa spec.portLevelMtls.70000",
    "Service default/bad-svc spec.clusterIP",
    "Service default/bad-svc spec.ports[0].port",
    "Service default/bad-svc spec.ports[0].protocol",
    "Service default/bad-svc spec.ports[0].targetPort",
    "document 6 apiVersion",
    "document 7 ",
  ];
  for (const field of expected) t.true(fields.includes(field), `missing problem for ${field}; got:\n${fields.join("\n")}`);
  t.is(problems.length, expected.length, fields.join("\n"));
});

test("problem lines point at the field", (t) => {
  const problems = parseFixture("invalid.yaml").problems;
  const action = problems.find((problem) => problem.field === "spec.action");
  t.is(action?.line, 25);
  t.is(action?.document, 2);
});

test("syntax error rejects the whole file", (t) => {
  const text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: [unclosed\n";
  const result = parseManifests("broken.yaml", text);
  t.true(result.syntaxError);
  t.deepEqual(result.objects, []);
  t.true(result.problems.length > 0);
  t.regex(formatManifestProblem(result.problems[0]), /^broken\.yaml:\d+: document 2: invalid YAML: /);
});

test("labels must be strings", (t) => {
  const text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: n\n  labels:\n    version: 2\n";
  const result = parseManifests("n.yaml", text);
  t.deepEqual(result.objects, []);
  t.is(formatManifestProblem(result.problems[0]), "n.yaml:6: Namespace n: metadata.labels.version: expected a string value, found 2; quote the value");
});

test("namespace defaults and name checks", (t) => {
  const text = [
    "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
    "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name, namespace: x}\n",
    "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n",
  ].join("---\n");
  const result = parseManifests("p.yaml", text);
  t.deepEqual(result.objects.map((object) => object.key), ["Pod default/p"]);
  t.deepEqual(result.problems.map((problem) => `${problem.object}: ${problem.field}`), [
    "Pod x/Bad_Name: metadata.name",
    "document 3: metadata.name",
  ]);
});

test("hostNetwork and serviceAccount fields", (t) => {
  const text = "apiVersion: v1\nkind: Pod\nmetadata: {name: h}\nspec: {hostNetwork: true, serviceAccount: legacy-sa}\nstatus: {podIP: 192.168.0.5}\n";
  const pod = find<Workload>(parseManifests("h.yaml", text).objects, "Pod default/h");
  t.true(pod.hostNetwork);
  t.is(pod.serviceAccount, "legacy-sa");
});

test("policy checks serviceAccounts and targetRef", (t) => {
  const text = [
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  rules:\n  - from:\n    - source: {serviceAccounts: [x/y], principals: [z]}\n",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: x}\nspec:\n  targetRefs: [{kind: Service, name: s}]\n",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: c, namespace: x}\nspec:\n  rules:\n  - to:\n    - operation: {}\n",
  ].join("---\n");
  const result = parseManifests("a.yaml", text);
  t.deepEqual(result.objects, []);
  t.deepEqual(result.problems.map((problem) => `${problem.object}: ${problem.field}`), [
    "AuthorizationPolicy x/a: spec.rules[0].from[0].source",
    "AuthorizationPolicy x/b: spec.targetRefs",
    "AuthorizationPolicy x/c: spec.rules[0].to[0].operation",
  ]);
});

test("peer authentication port levels need a selector", (t) => {
  const base = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: x}\nspec:\n";
  const withoutSelector = parseManifests("p.yaml", `${base}  portLevelMtls: {"8080": {mode: DISABLE}}\n`);
  t.is(withoutSelector.problems[0]?.field, "spec.portLevelMtls");
  const withSelector = parseManifests("p.yaml", `${base}  selector: {matchLabels: {app: a}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {"8080": {mode: DISABLE}}\n`);
  t.deepEqual(withSelector.problems, []);
  const peer = find<PeerAuthentication>(withSelector.objects, "PeerAuthentication x/p");
  t.deepEqual(peer.portLevelMtls, { 8080: "DISABLE" });
  t.deepEqual(peer.selector, { app: "a" });
});

test("unknown kinds are skipped", (t) => {
  const text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: a}\n";
  const result = parseManifests("c.yaml", text);
  t.deepEqual(result.objects, []);
  t.deepEqual(result.problems, []);
});

test("known kind names are case-sensitive", (t) => {
  const result = parseManifests("c.yaml", "apiVersion: v1\nkind: list\nitems: []\n");
  t.deepEqual(result.objects, []);
  t.is(result.problems.length, 1);
  t.regex(result.problems[0].message, /kinds are case-sensitive, write List/);
});

test("empty documents are skipped", (t) => {
  const result = parseManifests("e.yaml", "---\n# only a comment\n---\n");
  t.deepEqual(result, { objects: [], problems: [], syntaxError: false });
});

test("a finished pod owns no address", (t) => {
  const pod = (phase: string): string =>
    `apiVersion: v1\nkind: Pod\nmetadata: {name: job-${phase.toLowerCase()}, namespace: shop}\nspec: {nodeName: n1}\nstatus: {phase: ${phase}, podIP: 10.244.1.9, podIPs: [{ip: 10.244.1.9}]}\n`;
  const result = parseManifests("pods.yaml", ["Succeeded", "Failed", "Running"].map(pod).join("---\n"));
  t.deepEqual(result.problems, []);
  const ipOf = (index: number): string => (result.objects[index].value as Workload).ip;
  t.is(ipOf(0), "", "a Succeeded pod's address may belong to a new pod");
  t.is(ipOf(1), "", "a Failed pod's address may belong to a new pod");
  t.is(ipOf(2), "10.244.1.9");
  t.deepEqual((result.objects[0].value as Workload).ips, []);
});

test("pod workload name comes from its controller, as Istio's metrics name it", (t) => {
  const pod = (name: string, generateName: string | undefined, owner: { kind: string; name: string; controller?: boolean } | undefined, hash?: string): string =>
    [
      "apiVersion: v1",
      "kind: Pod",
      "metadata:",
      `  name: ${name}`,
      "  namespace: shop",
      ...(generateName ? [`  generateName: ${generateName}`] : []),
      ...(hash ? ["  labels:", `    pod-template-hash: ${hash}`] : []),
      ...(owner ? ["  ownerReferences:", `  - {apiVersion: apps/v1, kind: ${owner.kind}, name: ${owner.name}, uid: u1, controller: ${owner.controller ?? true}}`] : []),
      "spec: {nodeName: node1}",
      "status: {podIP: 10.0.0.1}",
    ].join("\n");
  const workloadName = (text: string): string | undefined => {
    const { objects, problems } = parseManifests("pods.yaml", text);
    t.deepEqual(problems, []);
    return (objects[0].value as Workload).workloadName;
  };
  t.is(workloadName(pod("web-5d9c7b-x2x4k", "web-5d9c7b-", { kind: "ReplicaSet", name: "web-5d9c7b" }, "5d9c7b")), "web");
  t.is(workloadName(pod("db-0", "db-", { kind: "StatefulSet", name: "db" })), "db");
  t.is(workloadName(pod("backup-28812345-abcde", "backup-28812345-", { kind: "Job", name: "backup-28812345" })), "backup");
  t.is(workloadName(pod("migrate-abcde", "migrate-", { kind: "Job", name: "migrate" })), "migrate");
  // A ReplicaSet without a Deployment keeps its own name; a pod without generateName is its own workload.
  t.is(workloadName(pod("rs-abcde", "rs-", { kind: "ReplicaSet", name: "rs" })), "rs");
  t.is(workloadName(pod("web", undefined, { kind: "ReplicaSet", name: "web-5d9c7b" }, "5d9c7b")), undefined);
  t.is(workloadName(pod("web-x", "web-", { kind: "ReplicaSet", name: "web-5d9c7b", controller: false }, "5d9c7b")), undefined);
});
