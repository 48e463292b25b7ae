// One agent per pin root and per node name: two agents serving the same node would fight over the
// same maps, links or in-pod ports, and the loser's clean-up could open the winner's pods. bpffs
// holds no regular files, so each lock is a file under /run/ambient-agent with a flock(2) lock on
// it. The kernel drops a flock lock when its holder dies, and the lock works between processes in
// different PID namespaces that share the folder, as the old and new agent pods of a rolling update
// do. The file also contains the holder's PID, for messages only: that PID is numbered in the
// holder's own PID namespace and may belong to an unrelated process here.

import fs from "node:fs";
import path from "node:path";
import { AgentError } from "../errors";
import { tryFlock } from "./native";

export const LOCK_DIRECTORY = "/run/ambient-agent";

/**
 * Maximum number of times acquiring opens a lock file. It opens the file again when the holder's
 * release unlinked it between this process's open and flock, and each retry needs another release.
 */
const MAX_OPEN_ATTEMPTS = 5;
/** Maximum number of bytes read back from a lock file, more than a PID and a newline take. */
const MAX_PID_TEXT_BYTES = 32;

/**
 * Returns the absolute path of a pin root with every symbolic link resolved, so that two spellings of
 * one folder share one lock. A pin root that does not exist yet keeps its own name under its resolved parent.
 */
export function canonicalPinRoot(pinRoot: string): string {
  const absolute = path.resolve(pinRoot);
  try {
    return fs.realpathSync(absolute);
  } catch {
    try {
      return path.join(fs.realpathSync(path.dirname(absolute)), path.basename(absolute));
    } catch {
      return absolute;
    }
  }
}

/** Returns the lock file of a pin root: its canonical path with "/" replaced, under /run/ambient-agent. */
export function lockFileOf(pinRoot: string, directory = LOCK_DIRECTORY): string {
  const name = canonicalPinRoot(pinRoot).replace(/^\/+/, "").replace(/[^A-Za-z0-9._-]/g, "_");
  return path.join(directory, `${name}.pid`);
}

/** The process that holds a lock. */
export interface LockHolder {
  /** PID written in the lock file, numbered in the holder's own PID namespace; undefined until the holder writes it. */
  pid: number | undefined;
}

/** Describes a holder's PID for messages, such as "PID 12 in its own PID namespace". */
export function describeHolderPid(holder: LockHolder): string {
  return holder.pid === undefined ? "PID not written yet" : `PID ${holder.pid} in its own PID namespace`;
}

/** Returns the process that holds the lock of `pinRoot`, or undefined when no process holds it. */
export function lockHolder(pinRoot: string, directory = LOCK_DIRECTORY): LockHolder | undefined {
  return lockFileHolder(lockFileOf(pinRoot, directory));
}

/**
 * Returns the process that holds the lock file `file`, or undefined when no process holds it or
 * the file does not exist. It tests for a shared flock lock, which it gives back at once.
 * NOTE: an agent that tries to take the lock in the microseconds this test holds it fails as if
 * another agent held the lock.
 */
export function lockFileHolder(file: string): LockHolder | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw error;
  }
  try {
    return tryFlock(fd, "shared", file) ? undefined : { pid: writtenPid(fd) };
  } finally {
    fs.closeSync(fd);
  }
}

/** Returns the PID written in the open lock file `fd`, or undefined when it holds no valid PID. */
function writtenPid(fd: number): number | undefined {
  const buffer = Buffer.alloc(MAX_PID_TEXT_BYTES);
  const length = fs.readSync(fd, buffer, 0, buffer.length, 0);
  const text = buffer.toString("utf8", 0, length);
  return /^[1-9][0-9]{0,9}\n$/.test(text) ? Number(text) : undefined;
}

/** Tells whether `file` is still the file that `opened` describes, so not unlinked or replaced since. */
function isSameFile(opened: fs.Stats, file: string): boolean {
  try {
    const current = fs.lstatSync(file);
    return current.dev === opened.dev && current.ino === opened.ino;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw error;
  }
}

/**
 * An exclusive flock lock on a lock file, held by this process until release() or its exit. It
 * claims a pin root, a node name, an audit spool or an audit file.
 */
export class PinRootLock {
  #fd: number | undefined;

  private constructor(
    readonly file: string,
    fd: number,
    private readonly locked: fs.Stats,
  ) {
    this.#fd = fd;
  }

  /** Takes the lock of a pin root or throws an error naming the process that holds it. */
  static acquire(pinRoot: string, directory = LOCK_DIRECTORY): PinRootLock {
    return PinRootLock.acquireFile(lockFileOf(pinRoot, directory), `the pin root ${pinRoot}`, directory);
  }

  /** Takes the lock of a node name: two agents with one --node but different pin roots would still fight. */
  static acquireNode(node: string, directory = LOCK_DIRECTORY): PinRootLock {
    return PinRootLock.acquireFile(path.join(directory, `node-${node.replace(/[^A-Za-z0-9._-]/g, "_")}.pid`), `the node ${node}`, directory);
  }

  /** Takes the lock of an audit spool folder: two agents appending to one spool would break its chain. */
  static acquireSpool(spoolDir: string, directory = LOCK_DIRECTORY): PinRootLock {
    return PinRootLock.acquireFile(lockFileOf(spoolDir, directory), `the audit spool ${spoolDir}`, directory, "give this agent its own --audit-spool");
  }

  /** Takes the lock of an audit file: two agents appending to one file would copy each other's records into it. */
  static acquireAuditFile(file: string, directory = LOCK_DIRECTORY): PinRootLock {
    return PinRootLock.acquireFile(lockFileOf(file, directory), `the audit file ${file}`, directory, "give this agent its own --audit-file");
  }

  private static acquireFile(file: string, subject: string, directory: string, fix = "give this agent its own --node and --pin-root"): PinRootLock {
    fs.mkdirSync(directory, { recursive: true });
    for (let attempt = 0; attempt < MAX_OPEN_ATTEMPTS; attempt++) {
      const lock = PinRootLock.lockFile(file, subject, fix);
      if (lock) return lock;
    }
    throw new AgentError(
      "INTERNAL",
      `could not take the lock ${file} for ${subject}: the file was removed or replaced ${MAX_OPEN_ATTEMPTS} times while this agent locked it. Check what else writes to ${directory}`,
    );
  }

  /**
   * Opens `file` (creating it), locks it and writes this process's PID into it. Returns undefined
   * when the file was unlinked or replaced after the open, because a flock lock on an unlinked file
   * claims nothing: the caller then opens the path again.
   */
  private static lockFile(file: string, subject: string, fix: string): PinRootLock | undefined {
    const fd = openLockFile(file);
    let lock: PinRootLock | undefined;
    try {
      if (!tryFlock(fd, "exclusive", file)) {
        const holder = describeHolderPid({ pid: writtenPid(fd) });
        throw new AgentError("INTERNAL", `another agent (${holder}) already serves ${subject}; stop it first, or ${fix} (lock file ${file})`);
      }
      const locked = fs.fstatSync(fd);
      if (!isSameFile(locked, file)) return undefined;
      fs.ftruncateSync(fd, 0);
      fs.writeSync(fd, `${process.pid}\n`, 0);
      lock = new PinRootLock(file, fd, locked);
      return lock;
    } finally {
      if (!lock) fs.closeSync(fd);
    }
  }

  /**
   * Removes the lock file if it is still the file this lock holds, then closes it, which releases
   * the flock lock. Calling it again does nothing.
   */
  release(): void {
    const fd = this.#fd;
    if (fd === undefined) return;
    this.#fd = undefined;
    try {
      // Unlinked before the close: a process that opens the path after the unlink creates a new
      // file. One that opened it before finds it locked or, after the close, finds it unlinked and
      // opens the path again.
      if (isSameFile(this.locked, this.file)) fs.unlinkSync(this.file);
    } catch {
      // A lock file left behind is harmless: the next agent locks and reuses it.
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** Opens (creating) a lock file for reading and writing without truncating it; it must be a regular file. */
function openLockFile(file: string): number {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK, 0o644);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ELOOP") throw error;
    throw new AgentError("INTERNAL", `the lock file ${file} is a symbolic link; remove it, because a lock file must be a regular file`, { cause: error });
  }
  if (!fs.fstatSync(fd).isFile()) {
    fs.closeSync(fd);
    throw new AgentError("INTERNAL", `the lock file ${file} is not a regular file; remove it and start the agent again`);
  }
  return fd;
}
