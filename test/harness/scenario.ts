// The two-node cluster that the demo and the end-to-end tests share: clients on node1 in an ambient
// namespace (shop) and in one outside the mesh (legacy), servers on node2 in an ambient namespace
// (backend), and two AuthorizationPolicies on the servers.

import type { NamespaceSpec } from "./manifests";
import type { NodeSpec } from "./topology";

export const SCENARIO_NODES: NodeSpec[] = [
  {
    name: "node1",
    pods: [
      { name: "web", namespace: "shop", serviceAccount: "web" },
      { name: "scraper", namespace: "shop", serviceAccount: "scraper" },
      { name: "legacy", namespace: "legacy", serviceAccount: "default" },
    ],
  },
  {
    name: "node2",
    pods: [
      { name: "api", namespace: "backend", serviceAccount: "api" },
      { name: "db", namespace: "backend", serviceAccount: "db" },
    ],
  },
];

export const SCENARIO_NAMESPACES: NamespaceSpec[] = [
  { name: "shop", ambient: true },
  { name: "backend", ambient: true },
  { name: "legacy", ambient: false },
];

/** The pods that the agents enroll: every pod of an ambient namespace. */
export const SCENARIO_ENROLLED = ["web", "scraper", "api", "db"];

export const ALLOW_WEB_POLICY = `# Only the web service account of the shop namespace may call the api pod, on port 8080.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: api-allow-web
  namespace: backend
spec:
  selector:
    matchLabels:
      app: api
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/web"]
      to:
        - operation:
            ports: ["8080"]
`;

export const DENY_SCRAPER_POLICY = `# The scraper service account is denied everywhere in the backend namespace.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-scraper
  namespace: backend
spec:
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/scraper"]
`;

export const SCENARIO_POLICIES = `${ALLOW_WEB_POLICY}---\n${DENY_SCRAPER_POLICY}`;
