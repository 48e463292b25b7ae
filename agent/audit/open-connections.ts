// The connections whose `connection.opened` record is spooled and whose completion is not. After a
// crash or SIGKILL they get their completion record at the next start, so every connection that
// was recorded as opened is completed exactly once. The set is kept in memory, and saved to a
// checkpoint file before spool segments are deleted, because the opened record of a long-lived
// connection may sit in a segment that is deleted while the connection is still open.

import fs from "node:fs";
import path from "node:path";
import type { AuditEvent, ConnectionCompletedRecord, ConnectionFields, ConnectionOpenedRecord } from "./record";
import { ERROR_CODES } from "../errors";

const CHECKPOINT_FILE = "open-connections.json";

/** The chain fields that a spooled opened record carries and a new completion record must not copy. */
const CHAIN_FIELDS = ["v", "seq", "id", "prev_hash", "hash"] as const;

export class OpenConnections {
  private readonly open = new Map<string, ConnectionOpenedRecord>();

  constructor(private readonly dir: string) {}

  get size(): number {
    return this.open.size;
  }

  /** Follows one spooled record: an opened record adds its connection, a completion removes it. */
  track(record: AuditEvent): void {
    if (record.type === "connection.opened") this.open.set(record.connection_id, record);
    else if (record.type === "connection.completed") this.open.delete(record.connection_id);
  }

  /** Loads the checkpoint written before the last segment deletion. A missing file is an empty set. */
  async load(): Promise<void> {
    let text: string;
    try {
      text = await fs.promises.readFile(path.join(this.dir, CHECKPOINT_FILE), "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
      throw error;
    }
    const records = JSON.parse(text) as ConnectionOpenedRecord[];
    for (const record of records) this.open.set(record.connection_id, record);
  }

  /** Saves the set atomically (write, fsync, rename), before spool segments are deleted. */
  async save(): Promise<void> {
    const file = path.join(this.dir, CHECKPOINT_FILE);
    const temporary = `${file}.tmp`;
    const handle = await fs.promises.open(temporary, "w", 0o600);
    try {
      await handle.writeFile(JSON.stringify([...this.open.values()]));
      await handle.datasync();
    } finally {
      await handle.close();
    }
    await fs.promises.rename(temporary, file);
  }

  /**
   * Returns a completion record for every connection still open, and clears the set. Used once at
   * start: these connections were open when the previous agent process ended without closing them.
   */
  completeInterrupted(time: string): ConnectionCompletedRecord[] {
    const records: ConnectionCompletedRecord[] = [];
    for (const opened of this.open.values()) {
      const fields: Record<string, unknown> = { ...opened };
      for (const field of CHAIN_FIELDS) delete fields[field];
      delete fields.type;
      delete fields.time;
      records.push({
        ...(fields as unknown as ConnectionFields),
        type: "connection.completed",
        time,
        established: true,
        flag: ERROR_CODES.AGENT_INTERRUPTED.flag,
        error: {
          code: "AGENT_INTERRUPTED",
          message: `the agent process ended (killed or crashed) while the connection opened at ${opened.start} was open; its bytes and duration are unknown`,
        },
      });
    }
    this.open.clear();
    return records;
  }
}
