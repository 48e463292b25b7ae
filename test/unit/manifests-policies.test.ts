import test from "ava";
import type { AuthorizationPolicy, PeerAuthentication } from "../../agent/state/types";
import { formatManifestProblem, parseManifests } from "../../agent/discovery/manifests";

const POLICY_BODY = `kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/demo/sa/client"], notIpBlocks: ["10.9.0.0/16"]}
    to:
    - operation: {ports: ["8080"]}
    when:
    - {key: source.namespace, values: [demo]}
`;

const PEER_BODY = `kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls: {"9090": {mode: PERMISSIVE}}
`;

function parseOne<T>(file: string, text: string): T {
  const result = parseManifests(file, text);
  if (result.problems.length > 0 || result.objects.length !== 1) {
    throw new Error(`expected one object without problems, got ${result.objects.length}: ${result.problems.map(formatManifestProblem).join("; ")}`);
  }
  return result.objects[0].value as T;
}

for (const version of ["v1", "v1beta1"]) {
  test(`security.istio.io/${version} authorization policy read`, (t) => {
    const policy = parseOne<AuthorizationPolicy>("p.yaml", `apiVersion: security.istio.io/${version}\n${POLICY_BODY}`);
    t.is(policy.uid, "demo/allow-client");
    t.is(policy.action, "ALLOW");
    t.deepEqual(policy.selector, { app: "web" });
    t.deepEqual(policy.rules, [
      {
        from: [{ source: { principals: ["cluster.local/ns/demo/sa/client"], notIpBlocks: ["10.9.0.0/16"] } }],
        to: [{ operation: { ports: ["8080"] } }],
        when: [{ key: "source.namespace", values: ["demo"] }],
      },
    ]);
  });

  test(`security.istio.io/${version} peer authentication read`, (t) => {
    const peer = parseOne<PeerAuthentication>("p.yaml", `apiVersion: security.istio.io/${version}\n${PEER_BODY}`);
    t.is(peer.uid, "demo/strict");
    t.is(peer.mode, "STRICT");
    t.deepEqual(peer.portLevelMtls, { 9090: "PERMISSIVE" });
  });
}

test("v1alpha1 rejected with the value", (t) => {
  const result = parseManifests("old.yaml", `apiVersion: security.istio.io/v1alpha1\n${POLICY_BODY}`);
  t.deepEqual(result.objects, []);
  t.deepEqual(result.problems.map(formatManifestProblem), [
    'old.yaml:1: AuthorizationPolicy demo/allow-client: apiVersion: unsupported apiVersion "security.istio.io/v1alpha1"; use security.istio.io/v1 or security.istio.io/v1beta1',
  ]);
});

test("trustDomains and notTrustDomains read", (t) => {
  const text = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: domains, namespace: demo}
spec:
  action: DENY
  rules:
  - from:
    - source: {notTrustDomains: [cluster.local, "*.example.org"]}
  - from:
    - source: {trustDomains: [partner.example]}
`;
  const policy = parseOne<AuthorizationPolicy>("d.yaml", text);
  t.deepEqual(policy.rules?.[0].from?.[0].source, { notTrustDomains: ["cluster.local", "*.example.org"] });
  t.deepEqual(policy.rules?.[1].from?.[0].source, { trustDomains: ["partner.example"] });
});

interface BadValue {
  name: string;
  /** YAML lines after `spec:`, or a whole document when `document` is set. */
  spec?: string;
  document?: string;
  /** The one formatted problem expected: "file:line: object: field: message". */
  problem: string;
}

const HEADER = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: demo}\nspec:\n";
const OBJECT = "bad.yaml:LINE: AuthorizationPolicy demo/bad:";

const badValues: BadValue[] = [
  {
    name: "port not a number",
    spec: "  rules:\n  - to:\n    - operation: {ports: [\"80a\"]}\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].to[0].operation.ports[0]: invalid port "80a"; use a port from "1" to "65535" written as a string`,
  },
  {
    name: "port out of range",
    spec: "  rules:\n  - to:\n    - operation: {notPorts: [\"70000\"]}\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].to[0].operation.notPorts[0]: invalid port "70000"; use a port from "1" to "65535" written as a string`,
  },
  {
    name: "cidr invalid",
    spec: "  rules:\n  - from:\n    - source: {notIpBlocks: [\"10.0.0.0/33\"]}\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].from[0].source.notIpBlocks[0]: invalid IP address or CIDR "10.0.0.0/33"; use a form like 10.0.0.0/8 or 10.1.2.3`,
  },
  {
    name: "trust domain not a string",
    spec: "  rules:\n  - from:\n    - source: {trustDomains: [7]}\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].from[0].source.trustDomains[0]: expected a string, found 7; quote the value`,
  },
  {
    name: "when port invalid",
    spec: "  rules:\n  - when:\n    - key: destination.port\n      values: [http]\n",
    problem: `${OBJECT.replace("LINE", "8")} spec.rules[0].when[0].values[0]: invalid port "http"; use a port from "1" to "65535" written as a string`,
  },
  {
    name: "when ip invalid",
    spec: "  rules:\n  - when:\n    - key: source.ip\n      notValues: [\"10.0.0.300\"]\n",
    problem: `${OBJECT.replace("LINE", "8")} spec.rules[0].when[0].notValues[0]: invalid IP address or CIDR "10.0.0.300"; use a form like 10.0.0.0/8 or 10.1.2.3`,
  },
  {
    name: "when without values",
    spec: "  rules:\n  - when:\n    - key: source.ip\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].when[0]: a condition needs a non-empty values or notValues; add one of them`,
  },
  {
    name: "misspelt when key",
    spec: "  rules:\n  - when:\n    - key: source.namespce\n      values: [demo]\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].when[0].key: unknown condition key "source.namespce"; use source.ip, source.namespace, source.principal, destination.ip or destination.port (checked at L4), or an HTTP key such as request.headers[NAME]`,
  },
  {
    name: "source with only empty lists",
    spec: "  rules:\n  - from:\n    - source: {principals: []}\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].from[0].source: a from entry needs a non-empty source, and every list in it is empty; add values or remove the entry`,
  },
  {
    name: "operation with only empty lists",
    spec: "  rules:\n  - to:\n    - operation: {ports: [], methods: []}\n",
    problem: `${OBJECT.replace("LINE", "7")} spec.rules[0].to[0].operation: a to entry needs a non-empty operation, and every list in it is empty; add values or remove the entry`,
  },
  {
    name: "misspelt metadata field",
    document: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: bad\n  namespce: demo\nspec: {}\n",
    problem: 'bad.yaml:5: AuthorizationPolicy default/bad: metadata.namespce: unknown field; expected one of name, generateName, namespace, selfLink, uid, resourceVersion, generation, creationTimestamp, deletionTimestamp, deletionGracePeriodSeconds, labels, annotations, ownerReferences, finalizers, managedFields',
  },
  {
    name: "misspelt security kind",
    document: "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\nmetadata: {name: bad, namespace: demo}\nspec: {}\n",
    problem: 'bad.yaml:2: AuthorisationPolicy demo/bad: kind: unknown kind "AuthorisationPolicy" in security.istio.io; the agent reads AuthorizationPolicy and PeerAuthentication',
  },
  {
    name: "action lower case",
    spec: "  action: deny\n",
    problem: `${OBJECT.replace("LINE", "5")} spec.action: invalid action "deny"; use ALLOW, DENY, AUDIT or CUSTOM`,
  },
  {
    name: "dry-run annotation",
    document: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: bad\n  namespace: demo\n  annotations: {istio.io/dry-run: \"yes\"}\nspec: {}\n",
    problem: `${OBJECT.replace("LINE", "6")} metadata.annotations.istio.io/dry-run: invalid value "yes"; use "true" or "false"`,
  },
  {
    name: "peer authentication mode",
    document: "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: bad, namespace: demo}\nspec:\n  mtls: {mode: strict}\n",
    problem: 'bad.yaml:5: PeerAuthentication demo/bad: spec.mtls.mode: invalid mode "strict"; use UNSET, DISABLE, PERMISSIVE or STRICT',
  },
  {
    name: "peer authentication port",
    document:
      "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: bad, namespace: demo}\nspec:\n  selector: {matchLabels: {app: web}}\n  portLevelMtls: {\"0\": {mode: STRICT}}\n",
    problem: 'bad.yaml:6: PeerAuthentication demo/bad: spec.portLevelMtls.0: invalid port "0"; use a workload port from 1 to 65535',
  },
];

for (const row of badValues) {
  test(`policy rejected: ${row.name}`, (t) => {
    const result = parseManifests("bad.yaml", row.document ?? `${HEADER}${row.spec ?? ""}`);
    t.deepEqual(result.objects, [], "the object is rejected");
    t.deepEqual(result.problems.map(formatManifestProblem), [row.problem]);
  });
}

test("misspelt source field rejected", (t) => {
  const result = parseManifests("bad.yaml", `${HEADER}  rules:\n  - from:\n    - source: {principal: [x]}\n`);
  t.deepEqual(result.objects, []);
  t.is(result.problems.length, 1);
  t.is(result.problems[0].field, "spec.rules[0].from[0].source.principal");
});

test("http condition keys accepted", (t) => {
  for (const key of ["request.headers[x-user]", "request.auth.claims[groups]", "request.auth.claims[a][b]", "remote.ip", "connection.sni"]) {
    const values = key === "remote.ip" ? '["10.0.0.0/8"]' : "[x]";
    const result = parseManifests("ok.yaml", `${HEADER}  action: DENY\n  rules:\n  - when:\n    - key: ${key}\n      values: ${values}\n`);
    t.deepEqual(result.problems.map(formatManifestProblem), [], key);
  }
});

test("dry-run annotation takes Go's boolean spellings", (t) => {
  for (const [value, dryRun] of [["True", true], ["1", true], ["t", true], ["False", false], ["0", false], ["F", false]] as const) {
    const text = `apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: demo\n  annotations: {istio.io/dry-run: "${value}"}\nspec: {}\n`;
    t.is(parseOne<AuthorizationPolicy>("p.yaml", text).dryRun, dryRun, value);
  }
});

test("wildcard selector value rejected", (t) => {
  const result = parseManifests("bad.yaml", `${HEADER}  selector: {matchLabels: {app: "*"}}\n`);
  t.deepEqual(result.objects, []);
  t.is(result.problems[0]?.field, "spec.selector.matchLabels.app");
});

test("policy kind of another group is rejected", (t) => {
  for (const apiVersion of ["security.io/v1", "policy.linkerd.io/v1alpha1", "v1"]) {
    const result = parseManifests("other.yaml", `apiVersion: ${apiVersion}\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\nspec: {}\n`);
    t.deepEqual(result.objects, [], apiVersion);
    t.is(result.problems[0]?.field, "apiVersion", apiVersion);
  }
});

test("misspelt spec key rejected", (t) => {
  const result = parseManifests("bad.yaml", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nsepc:\n  mtls: {mode: STRICT}\n");
  t.deepEqual(result.objects, []);
  t.is(result.problems[0]?.field, "sepc");
});

test("newer and experimental condition keys accepted", (t) => {
  for (const key of ["source.serviceAccount", "request.experimental.inline.headers[x-user]", "experimental.envoy.filters.network.mysql_proxy[db.table]"]) {
    const result = parseManifests("ok.yaml", `${HEADER}  action: DENY\n  rules:\n  - when:\n    - key: ${key}\n      values: [x]\n`);
    t.deepEqual(result.problems.map(formatManifestProblem), [], key);
  }
  const result = parseManifests("bad.yaml", `${HEADER}  rules:\n  - when:\n    - key: experimental.envoy.filters.mysql\n      values: [x]\n`);
  t.is(result.problems.length, 1);
});
