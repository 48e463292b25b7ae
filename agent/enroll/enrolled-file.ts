// The workloads this node's agent enrolled, by netns cookie, kept in a small file under
// /run/ambient-agent. The capture maps outlive the agent but name no pod, so the next agent reads
// this file to tell which pod a stale capture entry belonged to when it releases it.

import fs from "node:fs";
import path from "node:path";
import type { Identity, Workload } from "../state/types";
import type { CniPodSandbox } from "./cni-pods";

/** One enrolled workload, as the file keeps it. */
export interface EnrolledRecord {
  workload: Workload;
  identity: Identity;
  /** The sandbox the CNI plugin announced for it, which the next agent needs until the API shows the pod's IP. */
  sandbox?: CniPodSandbox;
}

export class EnrolledFile {
  /** The keys last written, so that an unchanged set is not written again; undefined before the first write, which always writes. */
  private lastWritten: string | undefined;

  constructor(private readonly file: string) {}

  /** Reads the records of the previous agent by cookie; an unreadable file is an empty map. */
  load(): Map<string, EnrolledRecord> {
    try {
      const entries = JSON.parse(fs.readFileSync(this.file, "utf8")) as [string, EnrolledRecord][];
      return new Map(entries.filter(([cookie, record]) => typeof cookie === "string" && typeof record?.workload?.uid === "string"));
    } catch {
      return new Map();
    }
  }

  /** Writes the current set atomically when it changed. A failure is returned, not thrown: the file only serves diagnostics. */
  save(entries: readonly ({ cookie: bigint } & EnrolledRecord)[]): Error | undefined {
    const rows = entries.map((entry) => [entry.cookie.toString(), { workload: entry.workload, identity: entry.identity, sandbox: entry.sandbox }] as const);
    const key = rows.map(([cookie, record]) => `${cookie}:${record.workload.uid}:${record.workload.ip}:${record.sandbox?.netns ?? ""}`).sort().join(",");
    if (key === this.lastWritten) return undefined;
    try {
      fs.mkdirSync(path.dirname(this.file), { recursive: true, mode: 0o700 });
      const temporary = `${this.file}.tmp`;
      fs.writeFileSync(temporary, JSON.stringify(rows), { mode: 0o600 });
      fs.renameSync(temporary, this.file);
      this.lastWritten = key;
      return undefined;
    } catch (error) {
      return error as Error;
    }
  }
}
