// The rendered-object checker of the chart tests: schema errors and unknown fields, found with their paths.

import test from "ava";
import { unknownFields, validateObject } from "../harness/kube-schema";

function daemonSet(container: Record<string, unknown>, podSpec: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    apiVersion: "apps/v1",
    kind: "DaemonSet",
    metadata: { name: "agent", namespace: "ambient-agent", labels: { app: "agent" } },
    spec: {
      selector: { matchLabels: { app: "agent" } },
      template: {
        metadata: { labels: { app: "agent" } },
        spec: {
          containers: [{ name: "agent", image: "ambient-agent:0.1.0", ...container }],
          volumes: [{ name: "netns", hostPath: { path: "/var/run/netns", type: "DirectoryOrCreate" } }],
          ...podSpec,
        },
      },
      updateStrategy: { type: "RollingUpdate", rollingUpdate: { maxSurge: 1, maxUnavailable: 0 } },
    },
  };
}

test("valid DaemonSet has no problem", (t) => {
  const problems = validateObject(daemonSet({ volumeMounts: [{ name: "netns", mountPath: "/var/run/netns", mountPropagation: "HostToContainer" }] }));
  t.deepEqual(problems, []);
});

test("misspelt field reported with its path", (t) => {
  const problems = validateObject(daemonSet({ volumeMounts: [{ name: "netns", mountPath: "/var/run/netns", mountPropagaton: "HostToContainer" }] }));
  t.deepEqual(
    problems.map((problem) => problem.path),
    ["spec.template.spec.containers[0].volumeMounts[0].mountPropagaton"],
  );
  t.regex(problems[0].message, /unknown field "mountPropagaton" of V1VolumeMount/);
});

test("unknown fields in maps and arrays", (t) => {
  const object = daemonSet(
    { securityContext: { capabilities: { add: ["NET_ADMIN"], remove: ["ALL"] } } },
    { tolerations: [{ operator: "Exists", effectt: "NoSchedule" }], hostNetwork: false, hostNetwrok: false },
  );
  t.deepEqual(
    validateObject(object).map((problem) => problem.path).sort(),
    [
      "spec.template.spec.containers[0].securityContext.capabilities.remove",
      "spec.template.spec.hostNetwrok",
      "spec.template.spec.tolerations[0].effectt",
    ],
  );
});

test("labels and annotations take any key", (t) => {
  const object = daemonSet({});
  (object.metadata as Record<string, unknown>).annotations = { "prometheus.io/scrape": "true", "checksum/config": "abc" };
  t.deepEqual(validateObject(object), []);
});

test("wrong type reported by the schema", (t) => {
  const problems = validateObject(daemonSet({ ports: [{ name: "http-metrics", containerPort: "15020" }] }));
  t.is(problems.length, 1);
  t.is(problems[0].path, "spec.template.spec.containers[0].ports[0].containerPort");
  t.regex(problems[0].message, /must be integer/);
});

test("missing required field reported", (t) => {
  const object = daemonSet({});
  delete (object.spec as Record<string, unknown>).selector;
  const problems = validateObject(object);
  t.is(problems.length, 1);
  t.regex(problems[0].message, /must have required property/);
  t.regex(problems[0].message, /selector/);
});

test("RBAC rule with an unknown key", (t) => {
  const role = {
    apiVersion: "rbac.authorization.k8s.io/v1",
    kind: "ClusterRole",
    metadata: { name: "agent" },
    rules: [{ apiGroups: [""], resources: ["pods"], verbs: ["list"], resourceName: ["x"] }],
  };
  t.deepEqual(validateObject(role).map((problem) => problem.path), ["rules[0].resourceName"]);
});

test("kind without a schema is a problem", (t) => {
  const problems = validateObject({ apiVersion: "v1", kind: "Secret", metadata: { name: "x" } });
  t.is(problems.length, 1);
  t.regex(problems[0].message, /no schema for apiVersion v1 kind Secret/);
});

test("type without a client-node model throws", (t) => {
  t.throws(() => unknownFields({ a: 1 }, "V1NoSuchThing"), { message: /no model V1NoSuchThing/ });
});
