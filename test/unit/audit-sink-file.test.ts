import test from "ava";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { GENESIS_HASH, sealLine } from "../../agent/audit/chain";
import { auditFileSet, rotatedFileName } from "../../agent/audit/files";
import type { SealedRecord } from "../../agent/audit/record";
import type { SpooledRecord } from "../../agent/audit/sink";
import { FileSink } from "../../agent/audit/sinks/file";
import { silentLogger } from "../../agent/log";

/** Builds a chain of sealed records with seq 1..count; `timeOf` sets each record's time. */
function buildChain(count: number, timeOf: (seq: number) => string = () => new Date().toISOString()): SpooledRecord[] {
  const records: SpooledRecord[] = [];
  let prevHash = GENESIS_HASH;
  for (let seq = 1; seq <= count; seq += 1) {
    const id = `00000000-0000-4000-8000-${String(seq).padStart(12, "0")}`;
    const body = JSON.stringify({
      time: timeOf(seq),
      type: "connection.completed",
      v: 1,
      seq,
      id,
      node: "n1",
      start: timeOf(seq),
      connection_id: `c${seq}`,
      direction: "inbound",
      src: { addr: "10.0.0.1:40000", identity: "spiffe://cluster.local/ns/demo/sa/client" },
      dst: { addr: "10.0.0.2:8080", workload: "web", namespace: "demo" },
      transport: "hbone",
      decision: "allow",
      reason: "no_policy",
      established: true,
      bytes_sent: seq,
      bytes_recv: 0,
      duration_ms: 1,
      prev_hash: prevHash,
    });
    const { line, hash } = sealLine(body);
    prevHash = hash;
    records.push({ seq, id, line, record: JSON.parse(line) as SealedRecord });
  }
  return records;
}

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "audit-sink-file-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function contentOf(records: readonly SpooledRecord[]): string {
  return records.map((record) => `${record.line}\n`).join("");
}

function seqsIn(file: string): number[] {
  return fs
    .readFileSync(file, "utf8")
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => (JSON.parse(line) as { seq: number }).seq);
}

function seqsInSet(activePath: string): number[] {
  return auditFileSet(activePath).flatMap((file) => seqsIn(file));
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from + 1 }, (_, index) => from + index);
}

/** Creates a logger that keeps each log line's level and message. */
function capturingLogger(): { logger: pino.Logger; lines: { level: number; msg: string; [key: string]: unknown }[] } {
  const lines: { level: number; msg: string }[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line) as { level: number; msg: string }) });
  return { logger, lines };
}

test("rotated names carry time and counter", (t) => {
  const at = new Date("2026-12-05T07:15:00.456Z");
  t.is(rotatedFileName("/var/log/aa/audit.log", at), "/var/log/aa/audit-20261205T071500Z.log");
  t.is(rotatedFileName("/var/log/aa/audit.log", at, 0), "/var/log/aa/audit-20261205T071500Z.log");
  t.is(rotatedFileName("/var/log/aa/audit.log", at, 2), "/var/log/aa/audit-20261205T071500Z-2.log");
  t.is(rotatedFileName("/var/log/aa/audit", at), "/var/log/aa/audit-20261205T071500Z");
});

test("file set sorts by time then counter", (t) => {
  const dir = tempDir(t);
  const active = path.join(dir, "audit.log");
  t.deepEqual(auditFileSet(active), []);
  t.deepEqual(auditFileSet(path.join(dir, "missing", "audit.log")), []);

  const names = ["audit-20261205T071500Z-2.log", "audit-20261205T071500Z-10.log", "audit-20261204T235959Z.log", "audit-20261205T071500Z.log"];
  for (const name of [...names, "other-20261205T071500Z.log", "audit.log.1", "audit-20261205T071500Z.json"]) fs.writeFileSync(path.join(dir, name), "");
  t.deepEqual(
    auditFileSet(active).map((file) => path.basename(file)),
    ["audit-20261204T235959Z.log", "audit-20261205T071500Z.log", "audit-20261205T071500Z-2.log", "audit-20261205T071500Z-10.log"],
  );

  fs.writeFileSync(active, "");
  t.is(auditFileSet(active).at(-1), active);
});

test("open creates folder and file", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "logs", "audit.log");
  const sink = new FileSink({ path: file }, silentLogger());
  t.is(sink.name, `file:${file}`);
  t.is(await sink.open(), undefined);
  await sink.close();

  t.is(fs.statSync(path.dirname(file)).mode & 0o777, 0o750 & ~process.umask());
  t.is(fs.statSync(file).mode & 0o777, 0o640 & ~process.umask());
  t.is(fs.statSync(file).size, 0);
});

test("reopen resumes after last seq", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(8);

  const first = new FileSink({ path: file }, silentLogger());
  t.is(await first.open(), undefined);
  await first.send(chain.slice(0, 5));
  await first.close();

  const second = new FileSink({ path: file }, silentLogger());
  const held = await second.open();
  t.is(held?.seq, 5);
  t.is(held?.hash, chain[4].record.hash, "open() returns the last record's hash");
  await second.send(chain.slice(2, 8));
  await second.send(chain.slice(6, 8));
  await second.close();

  t.is(fs.readFileSync(file, "utf8"), contentOf(chain));
});

test("torn last line is cut at open", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(4);
  fs.writeFileSync(file, contentOf(chain.slice(0, 3)) + chain[3].line.slice(0, 100));

  const { logger, lines } = capturingLogger();
  const sink = new FileSink({ path: file }, logger);
  t.is((await sink.open())?.seq, 3);
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain.slice(0, 3)));
  t.true(lines.some((line) => line.level === 40 && line.msg.includes("incomplete line") && line.bytes_cut === 100));

  await sink.send(chain);
  await sink.close();
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain));
});

test("file of one torn line is emptied", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  fs.writeFileSync(file, buildChain(1)[0].line.slice(0, 50));

  const sink = new FileSink({ path: file }, silentLogger());
  t.is(await sink.open(), undefined);
  await sink.close();
  t.is(fs.statSync(file).size, 0);
});

test("long last line is found", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const long = JSON.stringify({ time: new Date().toISOString(), seq: 7, pad: "x".repeat(200_000) });
  fs.writeFileSync(file, `${long}\n${long}\n`);

  const sink = new FileSink({ path: file }, silentLogger());
  t.is((await sink.open())?.seq, 7);
  await sink.close();
});

test("empty active file resumes from rotated", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(6);
  fs.writeFileSync(rotatedFileName(file, new Date("2026-01-01T00:00:00Z")), contentOf(chain.slice(0, 2)));
  fs.writeFileSync(rotatedFileName(file, new Date("2026-01-02T00:00:00Z")), contentOf(chain.slice(2, 4)));
  fs.writeFileSync(file, "");

  const sink = new FileSink({ path: file }, silentLogger());
  t.is((await sink.open())?.seq, 4);
  await sink.send(chain);
  await sink.close();
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain.slice(4)));
});

test("size rotation names and prunes files", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(20);
  const lineBytes = chain[0].line.length + 1;
  const { logger, lines } = capturingLogger();

  // Three lines fit, so each file contains one batch of two records and rotates before the next.
  const sink = new FileSink({ path: file, maxBytes: lineBytes * 3 + 10, maxFiles: 3 }, logger);
  await sink.open();
  for (let from = 0; from < 20; from += 2) await sink.send(chain.slice(from, from + 2));
  await sink.close();

  const files = auditFileSet(file);
  t.is(files.length, 4, "three rotated files and the active one");
  t.is(files.at(-1), file);
  for (const rotated of files.slice(0, -1)) t.regex(path.basename(rotated), /^audit-\d{8}T\d{6}Z(-\d+)?\.log$/);
  for (const each of files) t.true(fs.statSync(each).size <= lineBytes * 3 + 10);
  t.deepEqual(seqsInSet(file), range(13, 20), "oldest files were deleted and the rest is in order");

  const rotations = lines.filter((line) => line.msg === "audit file rotated");
  t.is(rotations.length, 9);
  t.true(rotations.every((line) => line.level === 30 && line.file === file && typeof line.rotated_to === "string"));
  t.is(lines.filter((line) => line.msg === "old rotated audit file deleted").length, 6);
});

test("batch above max size stays in one file", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(12);
  const sink = new FileSink({ path: file, maxBytes: 1000, maxFiles: 0 }, silentLogger());
  await sink.open();
  await sink.send(chain.slice(0, 1));
  await sink.send(chain.slice(1, 11));
  await sink.send(chain.slice(11));
  await sink.close();

  const files = auditFileSet(file);
  t.is(files.length, 3);
  t.deepEqual(seqsIn(files[0]), [1]);
  t.deepEqual(seqsIn(files[1]), range(2, 11));
  t.deepEqual(seqsIn(files[2]), [12]);
});

test("age rotation after max age", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(4);
  const sink = new FileSink({ path: file, maxAgeMs: 50 }, silentLogger());
  await sink.open();
  await sink.send(chain.slice(0, 2));
  await sink.send(chain.slice(2, 3));
  t.is(auditFileSet(file).length, 1, "a young file does not rotate");

  await new Promise((resolve) => setTimeout(resolve, 120));
  const later = buildChain(4);
  await sink.send(later.slice(3));
  await sink.close();

  const files = auditFileSet(file);
  t.is(files.length, 2);
  t.deepEqual(seqsIn(files[0]), [1, 2, 3]);
  t.deepEqual(seqsIn(files[1]), [4]);
});

test("age uses first record after reopen", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const hourAgo = Date.now() - 3_600_000;
  const chain = buildChain(3, (seq) => new Date(seq === 3 ? Date.now() : hourAgo).toISOString());
  fs.writeFileSync(file, contentOf(chain.slice(0, 2)));

  const sink = new FileSink({ path: file, maxAgeMs: 60_000 }, silentLogger());
  t.is((await sink.open())?.seq, 2);
  await sink.send(chain.slice(2));
  await sink.close();
  t.deepEqual(auditFileSet(file).map((each) => seqsIn(each)), [[1, 2], [3]]);
});

test("backlog of old records rotates by record time", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const base = Date.now() - 3_600_000;
  // Records one second apart, an hour old: a 2.5 s limit puts three records in each file.
  const chain = buildChain(7, (seq) => new Date(base + seq * 1000).toISOString());
  const sink = new FileSink({ path: file, maxAgeMs: 2500 }, silentLogger());
  await sink.open();
  for (const record of chain) await sink.send([record]);
  await sink.close();
  t.deepEqual(auditFileSet(file).map((each) => seqsIn(each)), [[1, 2, 3], [4, 5, 6], [7]]);
});

test("outside rename opens new file", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(9);
  const { logger, lines } = capturingLogger();
  const sink = new FileSink({ path: file, pathCheckIntervalMs: 0 }, logger);
  await sink.open();
  await sink.send(chain.slice(0, 3));

  fs.renameSync(file, `${file}.1`);
  await sink.send(chain.slice(3, 6));
  t.deepEqual(seqsIn(`${file}.1`), [1, 2, 3]);
  t.deepEqual(seqsIn(file), [4, 5, 6]);
  t.true(lines.some((line) => line.msg.includes("renamed or deleted")));

  fs.unlinkSync(file);
  await sink.send(chain.slice(6));
  await sink.close();
  t.deepEqual(seqsIn(file), [7, 8, 9]);
});

test("unwritable path rejects then recovers", async (t) => {
  const dir = tempDir(t);
  const folder = path.join(dir, "logs");
  const file = path.join(folder, "audit.log");
  const chain = buildChain(6);
  const sink = new FileSink({ path: file, pathCheckIntervalMs: 0 }, silentLogger());
  await sink.open();
  await sink.send(chain.slice(0, 2));

  // The folder is replaced by a file, so the path cannot be opened, even by root.
  fs.renameSync(folder, path.join(dir, "old-logs"));
  fs.writeFileSync(folder, "");
  const error = await t.throwsAsync(sink.send(chain.slice(2, 4)));
  t.true(error?.message.includes(file));

  fs.unlinkSync(folder);
  await sink.send(chain.slice(2, 4));
  await sink.send(chain.slice(4));
  await sink.close();
  t.deepEqual(seqsIn(path.join(dir, "old-logs", "audit.log")), [1, 2]);
  t.deepEqual(seqsIn(file), [3, 4, 5, 6]);
});

// Serial: it patches FileHandle.prototype.write, which the other tests of this file use too.
test.serial("partial write is truncated before resend", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(10);
  const sink = new FileSink({ path: file }, silentLogger());
  await sink.open();
  await sink.send(chain.slice(0, 3));

  // The next write(2) stores half of its bytes and the one after fails, as on a full disk.
  const probe = await fs.promises.open(path.join(dir, "probe"), "w");
  const prototype = Object.getPrototypeOf(probe) as { write: (...args: unknown[]) => Promise<{ bytesWritten: number }> };
  await probe.close();
  const originalWrite = prototype.write;
  let calls = 0;
  prototype.write = async function (this: unknown, buffer: unknown, offset: unknown, length: unknown, ...rest: unknown[]) {
    calls += 1;
    if (calls === 1) return originalWrite.call(this, buffer, offset, Math.floor((length as number) / 2), ...rest);
    const error = new Error("ENOSPC: no space left on device, write") as NodeJS.ErrnoException;
    error.code = "ENOSPC";
    throw error;
  };
  try {
    const error = await t.throwsAsync(sink.send(chain.slice(3, 7)));
    t.true(error?.message.includes(file));
  } finally {
    prototype.write = originalWrite;
  }
  t.not(fs.statSync(file).size, contentOf(chain.slice(0, 3)).length, "the failed batch left half a batch behind");

  await sink.send(chain.slice(3, 7));
  await sink.send(chain.slice(7));
  await sink.close();
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain));
});

// Serial: it patches FileHandle.prototype.write, which the other tests of this file use too.
test.serial("close after partial write leaves whole lines", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(7);
  const { logger, lines } = capturingLogger();
  const sink = new FileSink({ path: file }, logger);
  await sink.open();
  await sink.send(chain.slice(0, 3));

  // The next write(2) stores half of its bytes and the one after fails, as on a full disk.
  const probe = await fs.promises.open(path.join(dir, "probe"), "w");
  const prototype = Object.getPrototypeOf(probe) as { write: (...args: unknown[]) => Promise<{ bytesWritten: number }> };
  await probe.close();
  const originalWrite = prototype.write;
  let calls = 0;
  prototype.write = async function (this: unknown, buffer: unknown, offset: unknown, length: unknown, ...rest: unknown[]) {
    calls += 1;
    if (calls === 1) return originalWrite.call(this, buffer, offset, Math.floor((length as number) / 2), ...rest);
    const error = new Error("ENOSPC: no space left on device, write") as NodeJS.ErrnoException;
    error.code = "ENOSPC";
    throw error;
  };
  try {
    await t.throwsAsync(sink.send(chain.slice(3)));
  } finally {
    prototype.write = originalWrite;
  }
  t.true(fs.statSync(file).size > contentOf(chain.slice(0, 3)).length, "the failed batch left part of itself behind");

  await sink.close();
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain.slice(0, 3)));
  t.true(lines.some((line) => line.msg.includes("truncated to its size before the failed write")));
});

test("fsync option writes the batch", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(3);
  const sink = new FileSink({ path: file, fsync: true }, silentLogger());
  await sink.open();
  await sink.send(chain);
  await sink.close();
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain));
});

test("send after close rejects", async (t) => {
  const dir = tempDir(t);
  const sink = new FileSink({ path: path.join(dir, "audit.log") }, silentLogger());
  await sink.open();
  await sink.close();
  await t.throwsAsync(sink.send(buildChain(1)), { message: /closed/ });
});

/** Mounts a tmpfs of `kib` KiB on a new folder; returns undefined when mounting is not possible (not root). */
function mountTinyTmpfs(t: { teardown(fn: () => void): void }, kib: number): string | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const mountPoint = fs.mkdtempSync(path.join(os.tmpdir(), "audit-sink-tmpfs-"));
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", `size=${kib}k`, "tmpfs", mountPoint], { stdio: "ignore" });
  } catch {
    fs.rmdirSync(mountPoint);
    return undefined;
  }
  t.teardown(() => {
    execFileSync("umount", [mountPoint], { stdio: "ignore" });
    fs.rmdirSync(mountPoint);
  });
  return mountPoint;
}

test("full disk write resends cleanly", async (t) => {
  const mountPoint = mountTinyTmpfs(t, 64);
  if (mountPoint === undefined) {
    // As root (and in CI) this must run; elsewhere the unit tests need no root.
    if (process.env.CI || process.getuid?.() === 0) t.fail("mounting a tmpfs failed: this test needs root and tmpfs");
    else t.log("skipped: mounting a tmpfs needs root");
    t.pass();
    return;
  }
  const file = path.join(mountPoint, "audit", "audit.log");
  const filler = path.join(mountPoint, "filler");
  const chain = buildChain(60);
  const sink = new FileSink({ path: file }, silentLogger());
  await sink.open();
  await sink.send(chain.slice(0, 10));

  // Leave about 4 KiB free, so the next batch of 50 lines is written in part.
  const free = fs.statfsSync(mountPoint).bavail * fs.statfsSync(mountPoint).bsize;
  fs.writeFileSync(filler, Buffer.alloc(free - 4096));
  const error = await t.throwsAsync(sink.send(chain.slice(10)));
  t.regex(error?.message ?? "", /ENOSPC/);
  t.true(error?.message.includes(file));
  t.true(fs.statSync(file).size > contentOf(chain.slice(0, 10)).length, "part of the failed batch reached the disk");

  fs.unlinkSync(filler);
  await sink.send(chain.slice(10));
  await sink.close();
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain));
});

test("full disk then close leaves whole lines", async (t) => {
  const mountPoint = mountTinyTmpfs(t, 64);
  if (mountPoint === undefined) {
    // As root (and in CI) this must run; elsewhere the unit tests need no root.
    if (process.env.CI || process.getuid?.() === 0) t.fail("mounting a tmpfs failed: this test needs root and tmpfs");
    else t.log("skipped: mounting a tmpfs needs root");
    t.pass();
    return;
  }
  const file = path.join(mountPoint, "audit", "audit.log");
  const chain = buildChain(60);
  const sink = new FileSink({ path: file }, silentLogger());
  await sink.open();
  await sink.send(chain.slice(0, 10));

  // Leave about 4 KiB free, so the next batch of 50 lines is written in part.
  const free = fs.statfsSync(mountPoint).bavail * fs.statfsSync(mountPoint).bsize;
  fs.writeFileSync(path.join(mountPoint, "filler"), Buffer.alloc(free - 4096));
  await t.throwsAsync(sink.send(chain.slice(10)), { message: /ENOSPC/ });
  t.true(fs.statSync(file).size > contentOf(chain.slice(0, 10)).length, "part of the failed batch reached the disk");

  await sink.close();
  t.is(fs.readFileSync(file, "utf8"), contentOf(chain.slice(0, 10)));
});

test("outside rename noticed within the check interval", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, "audit.log");
  const chain = buildChain(3);
  const sink = new FileSink({ path: file, pathCheckIntervalMs: 200 }, silentLogger());
  await sink.open();
  await sink.send(chain.slice(0, 1));
  fs.renameSync(file, path.join(dir, "moved.log"));
  // Within the interval the sink still writes to the file it has open.
  await sink.send(chain.slice(1, 2));
  await new Promise((resolve) => setTimeout(resolve, 250));
  await sink.send(chain.slice(2));
  await sink.close();
  t.deepEqual(seqsIn(path.join(dir, "moved.log")), [1, 2]);
  t.deepEqual(seqsIn(file), [3]);
});
