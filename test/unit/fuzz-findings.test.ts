// The parser fixes that fuzzing led to, one test each, with the input reduced to its cause. The
// full inputs stay in test/fuzz/corpus as regression seeds.

import test from "ava";
import { RUN_OPTIONS, COMMA_LIST_OPTIONS } from "../../agent/cli/ambient-agent";
import { ConfigFileError, withConfigFile } from "../../agent/cli/config-file";
import { formatIpBytes } from "../../agent/capture/ip-bytes";
import { CniRequestReader, InvalidCniRequestError } from "../../agent/cni/protocol";
import { parseManifests } from "../../agent/discovery/manifest-parse";
import { findTooDeepNesting, MAX_YAML_NESTING } from "../../agent/discovery/yaml-nesting";
import { uriSubjectAltNames } from "../../agent/identity/verify";
import { buildBaggage, identityFromSubjectAltName } from "../../agent/proxy/hbone";
import type { Workload } from "../../agent/state/types";
import { useTempFolder } from "../harness/temp-files";

const temp = useTempFolder(test, "aafuzzfix-");

test("manifest with deep flow maps rejected", (t) => {
  // 2,000 of these aborted Node 20 inside the yaml package ("RegExpCompiler Allocation failed").
  const text = `apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: ${'{ "app"'.repeat(2000)}\n`;
  const result = parseManifests("pods.yaml", text);
  t.true(result.syntaxError);
  t.is(result.objects.length, 0);
  t.is(result.problems.length, 1);
  t.is(result.problems[0].line, 5);
  t.regex(result.problems[0].message, /nest deeper than 100 levels/);
});

test("manifest with deep one-line mappings rejected", (t) => {
  // 1,800 of these, then an indented line, overflowed the stack of the yaml parser (RangeError).
  const text = `spec:\n  nodeName: ${"noName: ".repeat(1800)}node-a\n\n  .invalid\n`;
  const result = parseManifests("pods.yaml", text);
  t.true(result.syntaxError);
  t.is(result.problems[0].line, 2);
});

test("nesting limit counts flow and line levels", (t) => {
  const nested = (levels: number): string => `${"[".repeat(levels)}${"]".repeat(levels)}\n`;
  t.is(findTooDeepNesting(nested(MAX_YAML_NESTING)), undefined);
  t.deepEqual(findTooDeepNesting(nested(MAX_YAML_NESTING + 1)), { document: 0, line: 1 });
  t.deepEqual(findTooDeepNesting(`a: 1\n---\nb: 2\n---\n${"- ".repeat(MAX_YAML_NESTING + 1)}x\n`), { document: 2, line: 5 });
  t.deepEqual(findTooDeepNesting(`# comment\n%YAML 1.2\n---\n${"- ".repeat(MAX_YAML_NESTING + 1)}x\n`), { document: 0, line: 4 });
  t.is(findTooDeepNesting(`${"- ".repeat(50)}x\n${"- ".repeat(50)}y\n`), undefined);
  t.is(findTooDeepNesting(`note: "${"[".repeat(500)}"\nplain: x{${"[".repeat(500)}\n`), undefined);
});

test("config file with deep nesting rejected", (t) => {
  const file = temp.configFile(`log-level: ${'{ "app"'.repeat(2000)}\n`);
  const error = t.throws(() => withConfigFile(["--config", file], RUN_OPTIONS, COMMA_LIST_OPTIONS), { instanceOf: ConfigFileError });
  t.regex(error?.message ?? "", /line 1: collections nest deeper than 100 levels/);
});

test("baggage of a lone surrogate label", (t) => {
  // encodeURIComponent threw URIError on the unpaired "\ud800" that a YAML escape produces.
  const workload = { name: "web", namespace: "shop", labels: { "service.istio.io/canonical-revision": "\ud800v1" } } as unknown as Workload;
  const baggage = buildBaggage(workload, "Kubernetes");
  t.true(baggage.endsWith("service.version=%EF%BF%BDv1"));
});

test("subjectAltName with invalid quoted value", (t) => {
  // JSON.parse threw SyntaxError on the raw NUL; the value now stays quoted and counts as a URI.
  const text = 'URI:"\u0000piffe://cluster.local/ns/demo/sa/a,b", URI:spiffe://cluster.local/ns/demo/sa/web';
  t.deepEqual(uriSubjectAltNames(text), ['"\u0000piffe://cluster.local/ns/demo/sa/a,b"', "spiffe://cluster.local/ns/demo/sa/web"]);
  t.deepEqual(identityFromSubjectAltName(text), { trustDomain: "cluster.local", namespace: "demo", serviceAccount: "web" });
});

test("address bytes of other lengths", (t) => {
  // 8 bytes threw RangeError from readUInt16BE, and 17 or more formatted their first 16.
  for (const length of [0, 5, 8, 15, 17]) {
    t.throws(() => formatIpBytes(Buffer.alloc(length)), { instanceOf: TypeError, message: /expected 4 \(IPv4\) or 16 \(IPv6\) bytes/ });
  }
  t.is(formatIpBytes(Buffer.alloc(16)), "::");
});

test("CNI configuration nested too deep", (t) => {
  // JSON.stringify of such a prevResult threw RangeError when the agent built the ADD reply.
  const config = `{"cniVersion":"1.0.0","prevResult":{"x":${"[".repeat(6000)}${"]".repeat(6000)}}}`;
  const request = Buffer.from(`CNI_COMMAND=ADD\nCNI_CONTAINERID=a\nCNI_NETNS=/proc/1/ns/net\nCNI_IFNAME=eth0\nCONFIG_LENGTH=${config.length}\n\n${config}`);
  const error = t.throws(() => new CniRequestReader().push(request), { instanceOf: InvalidCniRequestError });
  t.regex(error?.message ?? "", /deeper than 64 levels/);
});
