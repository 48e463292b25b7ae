// One agent per pin root and per node name: two agents serving the same node would fight over the
// same maps, links or in-pod ports, and the loser's clean-up could open the winner's pods. bpffs holds no regular files, so
// the lock is a PID file under /run, taken with O_EXCL and taken over only from a dead process.

import fs from "node:fs";
import path from "node:path";
import { AgentError } from "../errors";

export const LOCK_DIRECTORY = "/run/ambient-agent";

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

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Returns the PID of the live process that holds the lock of `pinRoot`, if any. */
export function lockHolder(pinRoot: string, directory = LOCK_DIRECTORY): number | undefined {
  try {
    const holder = Number(fs.readFileSync(lockFileOf(pinRoot, directory), "utf8").trim());
    return Number.isInteger(holder) && holder > 0 && isRunning(holder) ? holder : undefined;
  } catch {
    return undefined;
  }
}

/** An exclusive claim on a pin root, or on a node name, for this process; release() gives it back. */
export class PinRootLock {
  private constructor(readonly file: string) {}

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
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        fs.writeFileSync(file, `${process.pid}\n`, { flag: "wx" });
        return new PinRootLock(file);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
      }
      const holder = Number(fs.readFileSync(file, "utf8").trim());
      if (Number.isInteger(holder) && holder > 0 && holder !== process.pid && isRunning(holder)) {
        throw new AgentError(
          "INTERNAL",
          `another agent (PID ${holder}) already serves ${subject}; stop it first, or ${fix} (lock file ${file})`,
        );
      }
      // The holder is gone: its lock is stale.
      fs.rmSync(file, { force: true });
    }
    throw new AgentError("INTERNAL", `could not take the lock ${file} for ${subject}; remove the file if no agent runs`);
  }

  release(): void {
    try {
      if (fs.readFileSync(this.file, "utf8").trim() === String(process.pid)) fs.rmSync(this.file, { force: true });
    } catch {
      // Already gone.
    }
  }
}
