import test from "ava";
import pino from "pino";
import { ConfigWarnings } from "../../agent/config-warnings";
import { parseManifests } from "../../agent/discovery/manifests";
import { buildSnapshot } from "../../agent/discovery/manifest-merge";
import { MeshState } from "../../agent/state/mesh-state";

/** Builds the mesh state of a YAML text. */
function stateOf(yaml: string): MeshState {
  const { objects, problems } = parseManifests("test.yaml", yaml);
  if (problems.length > 0) throw new Error(problems.map((problem) => problem.message).join("; "));
  return new MeshState(buildSnapshot(objects));
}

const CONFLICT = `apiVersion: v1
kind: Namespace
metadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: legacy}
spec: {nodeName: n1}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: legacy}
spec: {clusterIP: 10.1.0.5, ports: [{port: 80}]}
`;

function capture(): { logger: pino.Logger; messages: string[] } {
  const messages: string[] = [];
  const logger = pino({ level: "warn" }, { write: (line: string) => messages.push((JSON.parse(line) as { msg: string }).msg) });
  return { logger, messages };
}

test("warnings are logged once while they last", (t) => {
  const { logger, messages } = capture();
  const warnings = new ConfigWarnings(logger, "istio-system", () => ({ excludedNamespaces: ["legacy"] }));
  const state = stateOf(CONFLICT);
  warnings.check(state);
  warnings.check(stateOf(CONFLICT));
  t.is(messages.filter((message) => message.includes("which is the IP of pod legacy/web")).length, 1);
  t.is(messages.filter((message) => message.startsWith("namespace legacy is labelled")).length, 1);
});

test("a warning that went away is logged again when it returns", (t) => {
  const { logger, messages } = capture();
  const warnings = new ConfigWarnings(logger, "istio-system", () => ({ excludedNamespaces: [] }));
  warnings.check(stateOf(CONFLICT));
  warnings.check(stateOf("apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n"));
  warnings.check(stateOf(CONFLICT));
  t.is(messages.filter((message) => message.includes("which is the IP of pod legacy/web")).length, 2);
});
