import test from "ava";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { lockFileOf, PinRootLock } from "../../agent/capture/pin-lock";

function lockDirectory(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "aa-lock-"));
}

test("lock file name encodes the pin root", (t) => {
  t.is(lockFileOf("/sys/fs/bpf/ambient-agent/node1", "/run/x"), "/run/x/sys_fs_bpf_ambient-agent_node1.pid");
});

test("second lock on a pin root is rejected", (t) => {
  const directory = lockDirectory();
  const lock = PinRootLock.acquire("/sys/fs/bpf/ambient-agent/a", directory);
  fs.writeFileSync(lock.file, "1\n"); // PID 1 always runs: another live holder
  const error = t.throws(() => PinRootLock.acquire("/sys/fs/bpf/ambient-agent/a", directory));
  t.regex(error!.message, /another agent \(PID 1\) already serves the pin root \/sys\/fs\/bpf\/ambient-agent\/a/);
  fs.rmSync(directory, { recursive: true, force: true });
});

test("lock of a dead process is taken over", (t) => {
  const directory = lockDirectory();
  const exited = spawnSync(process.execPath, ["-e", "process.stdout.write(String(process.pid))"], { encoding: "utf8" });
  fs.writeFileSync(lockFileOf("/pins/b", directory), `${exited.stdout}\n`);
  const lock = PinRootLock.acquire("/pins/b", directory);
  t.is(fs.readFileSync(lock.file, "utf8").trim(), String(process.pid));
  lock.release();
  t.false(fs.existsSync(lock.file));
  fs.rmSync(directory, { recursive: true, force: true });
});

test("symlinked pin root shares the lock", (t) => {
  const directory = lockDirectory();
  const real = path.join(directory, "real-root");
  const link = path.join(directory, "link-root");
  fs.mkdirSync(real);
  fs.symlinkSync(real, link);
  t.is(lockFileOf(link, directory), lockFileOf(real, directory));
  const lock = PinRootLock.acquire(real, directory);
  fs.writeFileSync(lock.file, "1\n"); // PID 1 always runs: another live holder
  t.throws(() => PinRootLock.acquire(link, directory), { message: /already serves/ });
  fs.rmSync(directory, { recursive: true, force: true });
});

test("separate pin roots lock separately", (t) => {
  const directory = lockDirectory();
  const first = PinRootLock.acquire("/pins/node1", directory);
  const second = PinRootLock.acquire("/pins/node2", directory);
  t.not(first.file, second.file);
  first.release();
  second.release();
  fs.rmSync(directory, { recursive: true, force: true });
});
