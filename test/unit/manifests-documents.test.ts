import fs from "node:fs";
import path from "node:path";
import test from "ava";
import { parseManifestsReusing, splitDocuments } from "../../agent/discovery/manifest-documents";
import { parseManifests } from "../../agent/discovery/manifest-parse";

const FIXTURES = path.join(__dirname, "..", "..", "..", "test", "fixtures", "manifests");

const policy = (name: string, port: string): string => `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ${name}
  namespace: demo
spec:
  rules:
  - to:
    - operation:
        ports: ["${port}"]
`;

const pod = (name: string, ip: string): string => `apiVersion: v1
kind: Pod
metadata:
  name: ${name}
  namespace: demo
spec:
  nodeName: node-a
status:
  podIP: ${ip}
`;

/** Texts whose document numbering and line numbers the split must reproduce exactly. */
const TEXTS: Record<string, string> = {
  plain: [policy("a", "80"), policy("b", "81"), pod("p", "10.0.0.1")].join("---\n"),
  "leading marker": "---\n" + [policy("a", "80"), policy("b", "81")].join("---\n"),
  "leading comment": "# policies\n\n---\n" + policy("a", "80"),
  "empty documents": [policy("a", "80"), "", "# nothing here\n", policy("b", "8x")].join("---\n") + "---\n",
  "trailing marker without newline": policy("a", "80") + "---",
  "marker with comment": policy("a", "80") + "--- # next\n" + policy("b", "99999"),
  crlf: [policy("a", "80"), pod("p", "10.0.0.300")].join("---\n").replace(/\n/g, "\r\n"),
  "syntax error in one document": [policy("a", "80"), "kind: [unclosed\n", policy("b", "81")].join("---\n"),
  "block scalar": `apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  text: |\n    line\n---\n${policy("a", "80")}`,
  json: JSON.stringify({ apiVersion: "v1", kind: "Namespace", metadata: { name: "demo" } }),
  empty: "",
};

for (const [name, text] of Object.entries(TEXTS)) {
  test(`split parse equals whole parse: ${name}`, (t) => {
    const split = parseManifestsReusing("f.yaml", text, undefined);
    t.not(split.documents, undefined);
    // Only a syntax error sends the file to a whole parse, so the other texts test the split path.
    t.is(split.documents!.some((document) => document.result.syntaxError), name === "syntax error in one document");
    t.deepEqual(split.result, parseManifests("f.yaml", text));
  });
}

test("split parse equals whole parse for fixtures", (t) => {
  for (const file of fs.readdirSync(FIXTURES)) {
    const text = fs.readFileSync(path.join(FIXTURES, file), "utf8");
    t.deepEqual(parseManifestsReusing(file, text, undefined).result, parseManifests(file, text), file);
  }
});

test("edits reuse unchanged documents", (t) => {
  const documents = [policy("a", "80"), policy("b", "81x"), pod("p", "10.0.0.1"), policy("c", "82")];
  let previous = parseManifestsReusing("f.yaml", documents.join("---\n"), undefined).documents;
  const edits: string[][] = [
    [policy("a", "90"), ...documents.slice(1)],
    [`# a longer first document\n${policy("a", "90")}`, ...documents.slice(1)],
    [policy("z", "70"), policy("a", "80"), ...documents.slice(1)],
    documents.slice(1),
    [...documents.slice(0, 3), "kind: [unclosed\n"],
    documents,
  ];
  for (const edit of edits) {
    const text = edit.join("---\n");
    const reused = parseManifestsReusing("f.yaml", text, previous);
    t.deepEqual(reused.result, parseManifests("f.yaml", text), text);
    previous = reused.documents;
  }
});

test("unchanged document keeps its objects", (t) => {
  const first = parseManifestsReusing("f.yaml", [policy("a", "80"), policy("b", "81")].join("---\n"), undefined);
  const second = parseManifestsReusing("f.yaml", [policy("a", "80"), policy("b", "82")].join("---\n"), first.documents);
  t.is(second.result.objects[0], first.result.objects[0]);
  t.not(second.result.objects[1], first.result.objects[1]);
});

test("other markers parse the file whole", (t) => {
  for (const text of [`%YAML 1.2\n---\n${policy("a", "80")}`, `--- !tag\n${policy("a", "80")}`, `${policy("a", "80")}...\n`]) {
    t.is(splitDocuments(text), undefined, text);
    const parsed = parseManifestsReusing("f.yaml", text, undefined);
    t.is(parsed.documents, undefined);
    t.deepEqual(parsed.result, parseManifests("f.yaml", text));
  }
});
