import test from "ava";
import { AgentError } from "../../agent/errors";
import { formatSpiffeId, identityOf, parseSpiffeId } from "../../agent/identity/spiffe";
import type { Workload } from "../../agent/state/types";

const valid: [string, { trustDomain: string; namespace: string; serviceAccount: string }][] = [
  ["spiffe://cluster.local/ns/default/sa/sleep", { trustDomain: "cluster.local", namespace: "default", serviceAccount: "sleep" }],
  ["spiffe://td-1.example_x/ns/a.b/sa/A_b-c", { trustDomain: "td-1.example_x", namespace: "a.b", serviceAccount: "A_b-c" }],
];

const invalid = [
  "",
  "cluster.local/ns/default/sa/sleep",
  "http://cluster.local/ns/default/sa/sleep",
  "SPIFFE://cluster.local/ns/default/sa/sleep",
  "spiffe://",
  "spiffe:///ns/default/sa/sleep",
  "spiffe://Cluster.local/ns/default/sa/sleep",
  "spiffe://cluster.local",
  "spiffe://cluster.local/",
  "spiffe://cluster.local/ns/default",
  "spiffe://cluster.local/ns/default/sa",
  "spiffe://cluster.local/ns/default/sa/",
  "spiffe://cluster.local/ns//sa/sleep",
  "spiffe://cluster.local/ns/default/sa/sleep/",
  "spiffe://cluster.local/ns/default/sa/sleep/extra",
  "spiffe://cluster.local/namespace/default/sa/sleep",
  "spiffe://cluster.local/ns/default/serviceaccount/sleep",
  "spiffe://cluster.local/sa/sleep/ns/default",
  "spiffe://cluster.local/ns/../sa/sleep",
  "spiffe://cluster.local/ns/./sa/sleep",
  "spiffe://cluster.local/ns/default/sa/sleep?x=1",
  "spiffe://cluster.local/ns/default/sa/sleep#frag",
  "spiffe://cluster.local/ns/def ault/sa/sleep",
  "spiffe://user@cluster.local/ns/default/sa/sleep",
  "spiffe://cluster.local:443/ns/default/sa/sleep",
];

for (const [uri, identity] of valid) {
  test(`parseSpiffeId accepts ${uri}`, (t) => {
    t.deepEqual(parseSpiffeId(uri), identity);
    t.is(formatSpiffeId(identity), uri);
  });
}

for (const uri of invalid) {
  test(`parseSpiffeId rejects ${JSON.stringify(uri)}`, (t) => {
    const error = t.throws(() => parseSpiffeId(uri), { instanceOf: AgentError });
    t.is(error?.code, "IDENTITY_ERROR");
    t.true(error?.message.includes(JSON.stringify(uri)));
  });
}

test("identityOf uses namespace and service account", (t) => {
  const workload = { namespace: "apps", serviceAccount: "echo" } as Workload;
  t.deepEqual(identityOf(workload, "mesh.local"), { trustDomain: "mesh.local", namespace: "apps", serviceAccount: "echo" });
});

test("identityOf defaults the service account", (t) => {
  const workload = { namespace: "apps", serviceAccount: "" } as Workload;
  t.is(identityOf(workload, "cluster.local").serviceAccount, "default");
});
