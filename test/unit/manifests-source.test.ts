import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ManifestSource, type ManifestProblem } from "../../agent/discovery/manifests";
import { silentLogger } from "../../agent/log";
import type { ClusterSnapshot } from "../../agent/state/types";

function podYaml(name: string, ip: string, extra = ""): string {
  return `apiVersion: v1\nkind: Pod\nmetadata:\n  name: ${name}\n  namespace: demo\n${extra}spec:\n  nodeName: node-a\nstatus:\n  podIP: ${ip}\n`;
}

async function withFolder(run: (dir: string, source: ManifestSource) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "manifest-source-"));
  const source = new ManifestSource(dir, silentLogger(), { debounceMs: 20, pollIntervalMs: 200 });
  try {
    await run(dir, source);
  } finally {
    await source.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function waitForChange(source: ManifestSource, timeoutMs: number): Promise<ClusterSnapshot> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no change event within ${timeoutMs} ms`)), timeoutMs);
    source.once("change", (snapshot: ClusterSnapshot) => {
      clearTimeout(timer);
      resolve(snapshot);
    });
  });
}

test("missing folder fails start", async (t) => {
  const source = new ManifestSource(path.join(os.tmpdir(), "no-such-manifest-folder-for-test"), silentLogger());
  await t.throwsAsync(source.start(), { message: /manifest folder .* cannot be read/ });
});

test("initial read serves every file", async (t) => {
  await withFolder(async (dir, source) => {
    fs.writeFileSync(path.join(dir, "a.yaml"), podYaml("a", "10.0.0.1"));
    fs.writeFileSync(path.join(dir, "b.yml"), podYaml("b", "10.0.0.2"));
    fs.writeFileSync(path.join(dir, ".c.yaml.tmp"), podYaml("c", "10.0.0.3"));
    fs.writeFileSync(path.join(dir, "notes.txt"), "not a manifest");
    await source.start();
    t.deepEqual([...source.snapshot().workloads.keys()].sort(), ["demo/a", "demo/b"]);
  });
});

test("new file emits change by watch", async (t) => {
  await withFolder(async (dir, source) => {
    await source.start();
    const changed = waitForChange(source, 3_000);
    fs.writeFileSync(path.join(dir, "a.yaml"), podYaml("a", "10.0.0.1"));
    const snapshot = await changed;
    t.is(snapshot.workloads.get("demo/a")?.ip, "10.0.0.1");
    t.is(source.snapshot(), snapshot);
  });
});

test("syntax error keeps last valid objects", async (t) => {
  await withFolder(async (dir, source) => {
    const file = path.join(dir, "a.yaml");
    fs.writeFileSync(file, podYaml("a", "10.0.0.1") + "---\n" + podYaml("b", "10.0.0.2"));
    await source.start();
    const problems: ManifestProblem[] = [];
    source.on("problem", (problem) => problems.push(problem));

    fs.writeFileSync(file, podYaml("a", "10.0.0.9") + "---\nkind: [broken\n");
    await source.refresh();
    t.deepEqual([...source.snapshot().workloads.keys()].sort(), ["demo/a", "demo/b"]);
    t.is(source.snapshot().workloads.get("demo/a")?.ip, "10.0.0.1");
    t.true(problems.length > 0);
    t.regex(problems[0].message, /invalid YAML/);
  });
});

test("invalid object keeps its last valid version", async (t) => {
  await withFolder(async (dir, source) => {
    const file = path.join(dir, "a.yaml");
    fs.writeFileSync(file, podYaml("a", "10.0.0.1") + "---\n" + podYaml("b", "10.0.0.2"));
    await source.start();

    fs.writeFileSync(file, podYaml("a", "10.0.0") + "---\n" + podYaml("b", "10.0.0.20"));
    await source.refresh();
    const workloads = source.snapshot().workloads;
    t.is(workloads.get("demo/a")?.ip, "10.0.0.1");
    t.is(workloads.get("demo/b")?.ip, "10.0.0.20");
  });
});

const DENY_POLICY = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-a
  namespace: shop
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/x/sa/a"]}}]
`;

const TYPOS: Record<string, string> = {
  apiVersion: DENY_POLICY.replace("security.istio.io/v1", "security.istio.io/v2"),
  kind: DENY_POLICY.replace("kind: AuthorizationPolicy", "kind: AuthorisationPolicy"),
  "metadata field": DENY_POLICY.replace("  namespace: shop", "  namespce: shop"),
  "when key": DENY_POLICY.replace('from: [{source: {principals: ["cluster.local/ns/x/sa/a"]}}]', "when: [{key: source.namespce, values: [x]}]"),
  "apiVersion group": DENY_POLICY.replace("security.istio.io/v1", "security.isito.io/v1"),
  "apiVersion dot": DENY_POLICY.replace("security.istio.io/v1", "security.istio.io.v1"),
  "apiVersion without group": DENY_POLICY.replace("security.istio.io/v1", "v1"),
  "apiVersion key": DENY_POLICY.replace("apiVersion:", "apiversion:"),
  "kind key": DENY_POLICY.replace("kind:", "knd:"),
  "metadata key": DENY_POLICY.replace("metadata:", "metdata:"),
  "name key": DENY_POLICY.replace("  name: deny-a", "  nmae: deny-a"),
  "spec key": DENY_POLICY.replace("spec:", "sepc:"),
  "kind case": DENY_POLICY.replace("kind: AuthorizationPolicy", "kind: authorizationpolicy"),
};

for (const [name, text] of Object.entries(TYPOS)) {
  test(`policy typo in ${name} keeps last valid version`, async (t) => {
    await withFolder(async (dir, source) => {
      const file = path.join(dir, "p.yaml");
      fs.writeFileSync(file, DENY_POLICY);
      await source.start();

      fs.writeFileSync(file, text);
      await source.refresh();
      t.deepEqual([...source.snapshot().authorizationPolicies.keys()], ["shop/deny-a"]);
      t.is(source.snapshot().authorizationPolicies.get("shop/deny-a")?.action, "DENY");
      t.true(source.problems().length >= 1, "the typo is reported");
    });
  });
}

test("deleted policy goes although a rejected one takes its place", async (t) => {
  await withFolder(async (dir, source) => {
    const file = path.join(dir, "p.yaml");
    const waypoint = DENY_POLICY.replace("deny-a", "waypoint").replace("spec:\n", "spec:\n  targetRefs: [{kind: Service, group: \"\", name: reviews}]\n");
    fs.writeFileSync(file, DENY_POLICY + "---\n" + waypoint);
    await source.start();

    fs.writeFileSync(file, waypoint);
    await source.refresh();
    t.deepEqual([...source.snapshot().authorizationPolicies.keys()], []);
    fs.writeFileSync(file, DENY_POLICY.replace("deny-a", "other").replace("action: DENY", "action: ALOW"));
    await source.refresh();
    t.deepEqual([...source.snapshot().authorizationPolicies.keys()], []);
  });
});

test("renamed policy replaces the old one", async (t) => {
  await withFolder(async (dir, source) => {
    const file = path.join(dir, "p.yaml");
    fs.writeFileSync(file, DENY_POLICY);
    await source.start();

    fs.writeFileSync(file, DENY_POLICY.replace("deny-a", "deny-b"));
    await source.refresh();
    t.deepEqual([...source.snapshot().authorizationPolicies.keys()], ["shop/deny-b"]);
  });
});

test("invalid new object is not served", async (t) => {
  await withFolder(async (dir, source) => {
    fs.writeFileSync(path.join(dir, "a.yaml"), podYaml("a", "999.0.0.1"));
    await source.start();
    t.is(source.snapshot().workloads.size, 0);
  });
});

test("deleted file withdraws its objects", async (t) => {
  await withFolder(async (dir, source) => {
    fs.writeFileSync(path.join(dir, "a.yaml"), podYaml("a", "10.0.0.1"));
    fs.writeFileSync(path.join(dir, "b.yaml"), podYaml("b", "10.0.0.2"));
    await source.start();
    const changed = waitForChange(source, 3_000);
    fs.unlinkSync(path.join(dir, "a.yaml"));
    const snapshot = await changed;
    t.deepEqual([...snapshot.workloads.keys()], ["demo/b"]);
  });
});

test("duplicate object: last file wins", async (t) => {
  await withFolder(async (dir, source) => {
    fs.writeFileSync(path.join(dir, "b.yaml"), podYaml("a", "10.0.0.2"));
    fs.writeFileSync(path.join(dir, "a.yaml"), podYaml("a", "10.0.0.1"));
    await source.start();
    const workload = source.snapshot().workloads.get("demo/a");
    t.is(workload?.ip, "10.0.0.2");
    t.is(workload?.source.file, path.join(dir, "b.yaml"));
  });
});

test("rewrite without change emits nothing", async (t) => {
  await withFolder(async (dir, source) => {
    const file = path.join(dir, "a.yaml");
    fs.writeFileSync(file, podYaml("a", "10.0.0.1"));
    await source.start();
    let changes = 0;
    source.on("change", () => (changes += 1));
    fs.writeFileSync(file, "# same objects, new comment\n" + podYaml("a", "10.0.0.1"));
    await source.refresh();
    t.is(changes, 0);
    fs.writeFileSync(file, podYaml("a", "10.0.0.1", "  labels: {app: a}\n"));
    await source.refresh();
    t.is(changes, 1);
    t.deepEqual(source.snapshot().workloads.get("demo/a")?.labels, { app: "a" });
  });
});

test("poll notices a change the watch missed", async (t) => {
  await withFolder(async (dir, source) => {
    const file = path.join(dir, "a.yaml");
    fs.writeFileSync(file, podYaml("a", "10.0.0.1"));
    await source.start();
    // Stop the watcher to stand for a missed event; the poll alone must pick the change up.
    (source as unknown as { watcher?: fs.FSWatcher }).watcher?.close();
    const changed = waitForChange(source, 3_000);
    fs.writeFileSync(file, podYaml("a", "10.0.0.77"));
    const snapshot = await changed;
    t.is(snapshot.workloads.get("demo/a")?.ip, "10.0.0.77");
  });
});
