import test, { type ExecutionContext } from "ava";
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { lockFileOf, lockHolder, PinRootLock } from "../../agent/capture/pin-lock";

/** The compiled lock module, which the holder processes load. */
const LOCK_MODULE = path.resolve(__dirname, "../../agent/capture/pin-lock.js");
/** How long a holder process may take to respond, so that a broken one fails the test instead of hanging it. */
const HOLDER_REPLY_TIMEOUT_MS = 15_000;

/**
 * Takes the lock of the pin root in argv[2] under the folder in argv[3], prints "locked <pid>",
 * releases the lock on each "release" line (printing "released") and exits when stdin closes.
 */
const HOLDER_SCRIPT = `
const [modulePath, pinRoot, directory] = process.argv.slice(1);
const { PinRootLock } = require(modulePath);
const lock = PinRootLock.acquire(pinRoot, directory);
process.stdout.write("locked " + process.pid + "\\n");
require("node:readline").createInterface({ input: process.stdin })
  .on("line", (line) => {
    if (line !== "release") return;
    lock.release();
    process.stdout.write("released\\n");
  })
  .on("close", () => process.exit(0));
`;

function lockDirectory(t: ExecutionContext): string {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "aa-lock-"));
  t.teardown(() => fs.rmSync(directory, { recursive: true, force: true }));
  return directory;
}

/** Returns the PID of a process that has exited. */
function deadPid(): number {
  const exited = spawnSync(process.execPath, ["-e", "process.stdout.write(String(process.pid))"], { encoding: "utf8" });
  return Number(exited.stdout);
}

/** A child process that holds a pin root's lock, optionally as PID 1 of its own PID namespace. */
class HolderProcess {
  private output = "";
  private readonly exited: Promise<void>;

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    child.stdout.setEncoding("utf8");
    child.stderr.setEncoding("utf8");
    child.stdout.on("data", (chunk: string) => (this.output += chunk));
    child.stderr.on("data", (chunk: string) => (this.output += chunk));
    this.exited = new Promise((resolve) => child.once("exit", () => resolve()));
  }

  /**
   * Starts a holder and waits until it holds the lock. With pidNamespace it runs as PID 1 of a new
   * PID namespace (unshare, which needs root), the way an agent runs in its pod.
   */
  static async start(t: ExecutionContext, pinRoot: string, directory: string, pidNamespace: boolean): Promise<HolderProcess> {
    const node = [process.execPath, "-e", HOLDER_SCRIPT, LOCK_MODULE, pinRoot, directory];
    const child = pidNamespace
      ? spawn("unshare", ["--pid", "--fork", "--mount-proc", "--kill-child", ...node])
      : spawn(node[0], node.slice(1));
    const holder = new HolderProcess(child);
    t.teardown(() => holder.kill());
    await holder.waitFor(/^locked \d+$/m, "take the lock");
    return holder;
  }

  /** The PID the holder printed, numbered in its own PID namespace. */
  get pid(): number {
    return Number(/^locked (\d+)$/m.exec(this.output)![1]);
  }

  /** Makes the holder call release() and waits until it did. */
  async release(): Promise<void> {
    const count = this.output.split("released\n").length;
    this.child.stdin.write("release\n");
    await this.waitFor(() => this.output.split("released\n").length > count, "release the lock");
  }

  /** Closes the holder's stdin, which makes it exit without releasing, and waits for the exit. */
  async stop(): Promise<void> {
    this.child.stdin.end();
    await this.exited;
  }

  /** Kills the holder with SIGKILL and waits until it exited. */
  async kill(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL");
    await this.exited;
  }

  private async waitFor(done: RegExp | (() => boolean), what: string): Promise<void> {
    const isDone = typeof done === "function" ? done : () => done.test(this.output);
    const deadline = Date.now() + HOLDER_REPLY_TIMEOUT_MS;
    while (!isDone()) {
      if (this.child.exitCode !== null || this.child.signalCode !== null || Date.now() > deadline) {
        throw new Error(`the lock holder process did not ${what}; its output:\n${this.output}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

test("lock file name encodes the pin root", (t) => {
  t.is(lockFileOf("/sys/fs/bpf/ambient-agent/node1", "/run/x"), "/run/x/sys_fs_bpf_ambient-agent_node1.pid");
});

test("second lock on a pin root is rejected", (t) => {
  const directory = lockDirectory(t);
  const lock = PinRootLock.acquire("/sys/fs/bpf/ambient-agent/a", directory);
  const error = t.throws(() => PinRootLock.acquire("/sys/fs/bpf/ambient-agent/a", directory));
  t.is(
    error!.message,
    `another agent (PID ${process.pid} in its own PID namespace) already serves the pin root /sys/fs/bpf/ambient-agent/a; ` +
      `stop it first, or give this agent its own --node and --pin-root (lock file ${lock.file})`,
  );
  lock.release();
});

test("lock holder reports the PID", (t) => {
  const directory = lockDirectory(t);
  t.is(lockHolder("/pins/h", directory), undefined, "a lock with no file is held");
  const lock = PinRootLock.acquire("/pins/h", directory);
  t.deepEqual(lockHolder("/pins/h", directory), { pid: process.pid });
  lock.release();
  t.is(lockHolder("/pins/h", directory), undefined, "a released lock is still held");
  t.false(fs.existsSync(lock.file));
});

test("lock file of a dead agent is reused", (t) => {
  const directory = lockDirectory(t);
  for (const written of [String(deadPid()), "1", String(process.pid), "not a pid"]) {
    const file = lockFileOf("/pins/b", directory);
    fs.writeFileSync(file, `${written}\n`);
    t.is(lockHolder("/pins/b", directory), undefined, `an unlocked file with ${written} is held`);
    const lock = PinRootLock.acquire("/pins/b", directory);
    t.is(fs.readFileSync(lock.file, "utf8"), `${process.pid}\n`);
    lock.release();
    t.false(fs.existsSync(lock.file));
  }
});

test("release twice is harmless", (t) => {
  const directory = lockDirectory(t);
  const lock = PinRootLock.acquire("/pins/r", directory);
  lock.release();
  const next = PinRootLock.acquire("/pins/r", directory);
  lock.release();
  t.true(fs.existsSync(next.file), "the second release removed the next holder's file");
  t.deepEqual(lockHolder("/pins/r", directory), { pid: process.pid });
  next.release();
});

test("symlinked pin root shares the lock", (t) => {
  const directory = lockDirectory(t);
  const real = path.join(directory, "real-root");
  const link = path.join(directory, "link-root");
  fs.mkdirSync(real);
  fs.symlinkSync(real, link);
  t.is(lockFileOf(link, directory), lockFileOf(real, directory));
  const lock = PinRootLock.acquire(real, directory);
  t.throws(() => PinRootLock.acquire(link, directory), { message: /already serves/ });
  lock.release();
});

test("separate pin roots lock separately", (t) => {
  const directory = lockDirectory(t);
  const first = PinRootLock.acquire("/pins/node1", directory);
  const second = PinRootLock.acquire("/pins/node2", directory);
  t.not(first.file, second.file);
  first.release();
  second.release();
});

test("symbolic link as lock file is rejected", (t) => {
  const directory = lockDirectory(t);
  const target = path.join(directory, "target");
  fs.writeFileSync(target, "kept\n");
  fs.symlinkSync(target, lockFileOf("/pins/s", directory));
  const error = t.throws(() => PinRootLock.acquire("/pins/s", directory));
  t.regex(error!.message, /the lock file .*pins_s\.pid is a symbolic link; remove it/);
  t.is(fs.readFileSync(target, "utf8"), "kept\n", "taking the lock wrote through the link");
});

test("lock held in another PID namespace", async (t) => {
  const directory = lockDirectory(t);
  const holder = await HolderProcess.start(t, "/pins/ns", directory, true);
  t.is(holder.pid, 1, "the holder is not PID 1 of its own PID namespace");
  const file = lockFileOf("/pins/ns", directory);
  // The PID in the file means nothing here: PID 1 runs here too, this process is alive, and the last one is dead.
  const dead = deadPid();
  const cases: Array<[string, string]> = [
    ["1\n", "PID 1 in its own PID namespace"],
    [`${process.pid}\n`, `PID ${process.pid} in its own PID namespace`],
    [`${dead}\n`, `PID ${dead} in its own PID namespace`],
    ["", "PID not written yet"],
  ];
  for (const [written, described] of cases) {
    fs.writeFileSync(file, written);
    const error = t.throws(() => PinRootLock.acquire("/pins/ns", directory), undefined, `the lock was taken with ${JSON.stringify(written)} in its file`);
    t.true(error?.message.includes(`another agent (${described}) already serves the pin root /pins/ns`), error?.message);
    const expectedPid = written === "" ? undefined : Number(written);
    t.deepEqual(lockHolder("/pins/ns", directory), { pid: expectedPid });
  }
  await holder.stop();
  t.is(lockHolder("/pins/ns", directory), undefined, "the lock is held after its holder exited");
  PinRootLock.acquire("/pins/ns", directory).release();
});

test("stale release keeps the successor's lock", async (t) => {
  // Both agents are PID 1 of their own PID namespace, like the old and new agent pods of a rolling update.
  const directory = lockDirectory(t);
  const old = await HolderProcess.start(t, "/pins/roll", directory, true);
  await old.release();
  const successor = await HolderProcess.start(t, "/pins/roll", directory, true);
  const file = lockFileOf("/pins/roll", directory);
  t.is(fs.readFileSync(file, "utf8"), "1\n");

  await old.release();
  await old.stop();
  t.true(fs.existsSync(file), "the old agent removed the successor's lock file");
  t.deepEqual(lockHolder("/pins/roll", directory), { pid: 1 });
  t.throws(() => PinRootLock.acquire("/pins/roll", directory), { message: /already serves/ });
  await successor.stop();
});

test("release keeps a replaced lock file", async (t) => {
  const directory = lockDirectory(t);
  const old = await HolderProcess.start(t, "/pins/gone", directory, true);
  const file = lockFileOf("/pins/gone", directory);
  // Someone removed the old agent's file; the successor creates and locks a new one with the same PID in it.
  fs.unlinkSync(file);
  const successor = await HolderProcess.start(t, "/pins/gone", directory, true);
  await old.release();
  t.true(fs.existsSync(file), "the old agent removed a lock file it does not hold");
  t.deepEqual(lockHolder("/pins/gone", directory), { pid: 1 });
  await successor.stop();
});

test("killed holder frees the lock", async (t) => {
  const directory = lockDirectory(t);
  const holder = await HolderProcess.start(t, "/pins/k", directory, false);
  t.deepEqual(lockHolder("/pins/k", directory), { pid: holder.pid });
  await holder.kill();
  t.is(lockHolder("/pins/k", directory), undefined, "the kernel kept the lock of a killed process");
  const lock = PinRootLock.acquire("/pins/k", directory);
  t.is(fs.readFileSync(lock.file, "utf8"), `${process.pid}\n`);
  lock.release();
});
