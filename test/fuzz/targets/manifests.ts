// Fuzz targets of the manifest readers: YAML or JSON files of Namespaces, Pods, Services,
// EndpointSlices, AuthorizationPolicies and PeerAuthentications, and objects as the Kubernetes
// API returns them. Every object the readers accept must then go through the mesh state, the
// policy compiler, the authorizer and the diagnostics without an error.

import { isDeepStrictEqual } from "node:util";
import fc from "fast-check";
import { parseManifestsReusing } from "../../../agent/discovery/manifest-documents";
import { buildSnapshot } from "../../../agent/discovery/manifest-merge";
import { parseApiObject, parseManifests } from "../../../agent/discovery/manifest-parse";
import type { ParsedObject } from "../../../agent/discovery/manifest-problem";
import { authorizerFor } from "../../../agent/rbac/authorize";
import { compilePolicy } from "../../../agent/rbac/compile";
import { explainWorkload } from "../../../agent/rbac/explain";
import { mtlsFor, peerAuthenticationWarnings } from "../../../agent/rbac/peer-authentication";
import { policyWarnings } from "../../../agent/rbac/warnings";
import { MeshState } from "../../../agent/state/mesh-state";
import type { RbacConnection } from "../../../agent/rbac/types";
import { invariant, type FuzzTarget } from "../runner";

const SETTINGS = { trustDomain: "cluster.local", trustDomainAliases: ["old.local"] };

/** Connections that exercise every source field: mTLS from two namespaces, plaintext, IPv6. */
const CONNECTIONS: RbacConnection[] = [
  { sourceIdentity: { trustDomain: "cluster.local", namespace: "demo", serviceAccount: "client" }, sourceIp: "10.244.1.11", destinationIp: "10.244.1.10", destinationPort: 8080 },
  { sourceIdentity: { trustDomain: "old.local", namespace: "other", serviceAccount: "default" }, sourceIp: "10.245.0.5", destinationIp: "10.244.1.10", destinationPort: 9090 },
  { sourceIp: "192.168.1.1", destinationIp: "10.244.1.10", destinationPort: 80 },
  { sourceIp: "fd00::1", destinationIp: "fd00::2", destinationPort: 443 },
];

/** Runs the accepted objects through the mesh state, the compiler, the authorizer and the diagnostics. */
function useObjects(objects: readonly ParsedObject[]): void {
  const state = new MeshState(buildSnapshot(objects));
  for (const object of objects) {
    if (object.kind === "AuthorizationPolicy") {
      compilePolicy(object.value, { trustDomain: SETTINGS.trustDomain, aliases: SETTINGS.trustDomainAliases });
      policyWarnings(object.value);
    }
    if (object.kind === "PeerAuthentication") peerAuthenticationWarnings(object.value);
  }
  for (const workload of state.workloads()) {
    const authorizer = authorizerFor(state, workload, SETTINGS);
    for (const connection of CONNECTIONS) {
      const result = authorizer.evaluate(connection);
      invariant(result.decision === "allow" || result.decision === "deny", () => `the authorizer returned ${JSON.stringify(result)} for workload ${workload.uid}`);
      mtlsFor(state, workload, connection.destinationPort);
    }
    explainWorkload(state, SETTINGS, workload);
  }
}

/**
 * The yaml package spends about 0.03 ms on each syntax error it reports (linear in the size), and
 * 16 KiB of ":" lines contains 7,000 of them. So the YAML targets get a looser bound and 8 KiB
 * inputs. Catastrophic backtracking still exceeds the bound by far.
 */
export const YAML_INPUT_MS = 500;
export const YAML_MAX_BYTES = 8192;

const YAML_TOKENS = ["---\n", "...\n", "%YAML 1.2\n", "&a ", "*a", "<<: *a", "!!binary ", "? ", "- ", ": ", "{", "}", "[", "]", "'", '"', "\\ud800", "\t", "#", "|\n", ">-\n", "null", "~", "1e400", "0x1F", "kind: AuthorizationPolicy\n", "kind: Pod\n", "action: DENY\n", "rules:\n", "from:\n", "- source:\n", "principals: [\"*\"]\n", "ipBlocks: [\"10.0.0.0/8\"]\n", "ports: [\"80\"]\n", "notPorts:", "when:\n", "key: source.ip\n", "values:", "selector:\n", "matchLabels:\n", "portLevelMtls:\n"];

export const manifests: FuzzTarget = {
  name: "manifests",
  tokens: YAML_TOKENS,
  maxBytes: YAML_MAX_BYTES,
  inputMs: YAML_INPUT_MS,
  run(input) {
    const text = input.toString("utf8");
    const whole = parseManifests("fuzz.yaml", text);
    const { result } = parseManifestsReusing("fuzz.yaml", text, undefined);
    const keys = (objects: readonly ParsedObject[]): string[] => objects.map((object) => object.key);
    invariant(isDeepStrictEqual(keys(result.objects), keys(whole.objects)), () => `the document-wise parse accepted ${JSON.stringify(keys(result.objects))}, the whole-file parse ${JSON.stringify(keys(whole.objects))}`);
    useObjects(result.objects);
  },
  // Problems are returned, never thrown.
  expected: () => false,
};

const KINDS = ["Namespace", "Pod", "Service", "EndpointSlice", "AuthorizationPolicy", "PeerAuthentication", "List"];

/** Objects with a known kind and API version and arbitrary JSON elsewhere, as a hostile or broken API server could send. */
const apiObjects = fc
  .record({
    kind: fc.constantFrom(...KINDS),
    apiVersion: fc.constantFrom("v1", "security.istio.io/v1", "discovery.k8s.io/v1"),
    metadata: fc.oneof(fc.record({ name: fc.constantFrom("a", "web", ""), namespace: fc.constantFrom("demo", "istio-system") }), fc.jsonValue({ maxDepth: 2 })),
    spec: fc.jsonValue({ maxDepth: 5 }),
    status: fc.jsonValue({ maxDepth: 3 }),
  })
  .map((object) => Buffer.from(JSON.stringify(object)));

export const kubeObjects: FuzzTarget = {
  name: "kube-objects",
  tokens: ['"', ",", ":", "{", "}", "[", "]", "null", "true", "-1", "1e400", '"__proto__"', '"*"'],
  maxBytes: 16384,
  arbitraries: [apiObjects],
  run(input) {
    let value: unknown;
    try {
      value = JSON.parse(input.toString("utf8"));
    } catch {
      return;
    }
    const { object } = parseApiObject(value, { file: "kubernetes:fuzz", document: 0 });
    if (object !== undefined) useObjects([object]);
  },
  expected: () => false,
};
