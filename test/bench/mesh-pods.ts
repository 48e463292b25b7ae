// The two pods every mesh benchmark uses: a client on one node and a server on the other, both in
// ambient namespaces, with one ALLOW policy so that every connection goes through a policy evaluation
// as in production.

import type { NamespaceSpec } from "../harness/manifests";
import type { NodeSpec } from "../harness/topology";

export const CLIENT = "client";
export const SERVER = "server";

/** Returns the client node and the server node, named `<prefix>-n1` and `<prefix>-n2`. */
export function benchNodes(prefix: string): NodeSpec[] {
  return [
    { name: `${prefix}-n1`, pods: [{ name: CLIENT, namespace: "bench-client", serviceAccount: "client" }] },
    { name: `${prefix}-n2`, pods: [{ name: SERVER, namespace: "bench-server", serviceAccount: "server" }] },
  ];
}

export const BENCH_NAMESPACES: NamespaceSpec[] = [
  { name: "bench-client", ambient: true },
  { name: "bench-server", ambient: true },
];

export const ALLOW_CLIENT_POLICY = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-allow-client
  namespace: bench-server
spec:
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/bench-client/sa/client"]
`;
