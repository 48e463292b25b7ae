import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { NativeError, setProcRoot } from "../../agent/capture/native";
import { AgentError } from "../../agent/errors";
import { CniEnrolment } from "../../agent/enroll/cni-enrolment";
import type { EnrolledWorkload } from "../../agent/enroll/reconciler";
import { DEFAULT_HOST_PROC, hostProcPath, listNetns, useHostProc } from "../../agent/enroll/netns";
import { silentLogger } from "../../agent/log";

let fakeProc = "";

/**
 * A folder laid out like the host's procfs for the namespace scan: PID 1's ns/net (the host's),
 * two processes with files of their own in its place, and entries that are no process.
 */
test.before(() => {
  fakeProc = fs.mkdtempSync(path.join(os.tmpdir(), "aahostproc-"));
  for (const entry of ["1", "42", "4242"]) {
    fs.mkdirSync(path.join(fakeProc, entry, "ns"), { recursive: true });
    fs.writeFileSync(path.join(fakeProc, entry, "ns", "net"), entry);
  }
  fs.mkdirSync(path.join(fakeProc, "sys", "ns"), { recursive: true });
  fs.writeFileSync(path.join(fakeProc, "sys", "ns", "net"), "sys");
  // Process 43 shares PID 1's namespace, as host processes do.
  fs.mkdirSync(path.join(fakeProc, "43", "ns"), { recursive: true });
  fs.linkSync(path.join(fakeProc, "1", "ns", "net"), path.join(fakeProc, "43", "ns", "net"));
});

test.after.always(() => {
  useHostProc(DEFAULT_HOST_PROC);
  fs.rmSync(fakeProc, { recursive: true, force: true });
});

test("paths under /proc/ move into the host proc folder", (t) => {
  t.is(hostProcPath("/proc/1234/ns/net", "/host/proc"), "/host/proc/1234/ns/net");
  t.is(hostProcPath("/proc/1234/task/1240/ns/net", "/host/proc"), "/host/proc/1234/task/1240/ns/net");
  t.is(hostProcPath("/proc/1234/ns/net", "/host/proc/"), "/host/proc/1234/ns/net");
});

test("other paths are kept", (t) => {
  t.is(hostProcPath("/var/run/netns/cni-1234", "/host/proc"), "/var/run/netns/cni-1234");
  t.is(hostProcPath("/proc", "/host/proc"), "/proc");
  t.is(hostProcPath("/procfs/1234/ns/net", "/host/proc"), "/procfs/1234/ns/net");
  t.is(hostProcPath("/proc/1234/ns/net", DEFAULT_HOST_PROC), "/proc/1234/ns/net");
});

test("other paths under /proc/ are rejected", (t) => {
  const rejected = [
    "/proc/../../var/run/netns/x",
    "/proc/1234/../../var/run/netns/x",
    "/proc/./1234/ns/net",
    "/proc/1234/ns/./net",
    "/proc//1234/ns/net",
    "/proc/1234/ns/net/",
    "/proc/self/ns/net",
    "/proc/thread-self/ns/net",
    "/proc/1/root/var/run/netns/x",
    "/proc/1234/ns/mnt",
    "/proc/1234/task/self/ns/net",
    "/proc/0/ns/net",
    "/proc/",
  ];
  for (const procDir of ["/host/proc", DEFAULT_HOST_PROC]) {
    for (const netnsPath of rejected) {
      const error = t.throws(() => hostProcPath(netnsPath, procDir), { instanceOf: AgentError }, `${netnsPath} with ${procDir} was accepted`);
      t.is(error?.code, "INVALID_CNI_REQUEST");
      t.true(error?.message.includes(JSON.stringify(netnsPath)), `the message does not name ${netnsPath}: ${error?.message}`);
      t.regex(error?.message ?? "", /only \/proc\/PID\/ns\/net or \/proc\/PID\/task\/TID\/ns\/net/);
    }
  }
});

test.serial("CNI ADD with a rejected netns fails with its reason", async (t) => {
  const enrolment = new CniEnrolment({
    node: "n1",
    state: () => undefined,
    settings: () => ({ excludedNamespaces: [] }),
    stopping: () => false,
    reconcile: async () => t.fail("the ADD reached the reconciler"),
    enrolled: () => undefined,
    evict: async () => t.fail("the ADD evicted a pod"),
    enrolledByCni: () => t.fail("the ADD enrolled a pod"),
    logger: silentLogger(),
  });
  const add = enrolment.add({ command: "ADD", containerId: "c1", netns: "/proc/1/root/var/run/netns/x", ifName: "eth0", podNamespace: "shop", podName: "web", ips: [], cniVersion: "1.0.0" });
  const error = await t.throwsAsync(add, { instanceOf: AgentError });
  t.regex(error?.message ?? "", /invalid network namespace path "\/proc\/1\/root\/var\/run\/netns\/x"/);
});

test.serial("namespace scan lists the host proc folder's processes", (t) => {
  useHostProc(fakeProc);
  try {
    const found = listNetns().map((ref) => ref.path).filter((candidate) => candidate.startsWith(fakeProc));
    t.deepEqual(found.sort(), [path.join(fakeProc, "42", "ns", "net"), path.join(fakeProc, "4242", "ns", "net")]);
  } finally {
    useHostProc(DEFAULT_HOST_PROC);
  }
});

test.serial("CNI_NETNS under /proc/ is matched in the host proc folder", async (t) => {
  useHostProc(fakeProc);
  try {
    const evicted: string[] = [];
    const enrolment = new CniEnrolment({
      node: "n1",
      state: () => undefined,
      settings: () => ({ excludedNamespaces: [] }),
      stopping: () => false,
      reconcile: async () => undefined,
      enrolled: (uid) => (uid === "shop/web" ? ({ netnsPath: path.join(fakeProc, "42", "ns", "net") } as EnrolledWorkload) : undefined),
      evict: async (uid) => void evicted.push(uid),
      enrolledByCni: () => undefined,
      logger: silentLogger(),
    });
    await enrolment.del({ command: "DEL", containerId: "c1", netns: "/proc/42/ns/net", ifName: "eth0", podNamespace: "shop", podName: "web", ips: [], cniVersion: "1.0.0" });
    t.deepEqual(evicted, ["shop/web"], "the DEL for the pod's sandbox did not unenrol it");
  } finally {
    useHostProc(DEFAULT_HOST_PROC);
  }
});

test.serial("native proc root must be absolute", (t) => {
  const error = t.throws(() => setProcRoot("host/proc"), { instanceOf: NativeError });
  t.regex(error?.message ?? "", /proc root "host\/proc" is not an absolute path/);
  t.is(error?.errno, os.constants.errno.EINVAL);
  const long = t.throws(() => setProcRoot(`/${"p".repeat(5000)}`), { instanceOf: NativeError });
  t.is(long?.errno, os.constants.errno.ENAMETOOLONG);
  t.notThrows(() => setProcRoot(DEFAULT_HOST_PROC));
});
