// Serves the objects of the manifest files in one folder and follows their changes. The folder
// is watched with fs.watch (debounced) and also polled, because fs.watch can miss events (for
// example on network filesystems or after a rename over a file). Only the folder's own files are
// read, not subfolders; names starting with "." are skipped (temporary files, ConfigMap internals).
//
// A bad edit loses nothing valid. A file with a syntax error keeps serving its last valid objects.
// An invalid object keeps its last valid version from the same file. Only a deleted file, or an
// object removed from a file, takes objects away.

import { EventEmitter } from "node:events";
import fs from "node:fs";
import path from "node:path";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { ClusterSnapshot } from "../state/types";
import { parseManifestsReusing, type ParsedDocument } from "./manifest-documents";
import { ManifestMerge } from "./manifest-merge";
import { formatManifestProblem, type ManifestProblem, type ParsedObject } from "./manifest-problem";

export { buildSnapshot } from "./manifest-merge";

const MANIFEST_EXTENSIONS = [".yaml", ".yml", ".json"];

export interface ManifestSourceOptions {
  /** Delay between a filesystem event and the re-read, so that a burst of events reads once. */
  debounceMs?: number;
  /** Interval of the poll that compares modification times and sizes. */
  pollIntervalMs?: number;
}

interface FileState {
  mtimeMs: number;
  size: number;
  /** The objects this file serves, by key: the last valid version of each. */
  objects: Map<string, ParsedObject>;
  /** The problems of the file's current version, replaced on each parse. */
  problems: ManifestProblem[];
  /** The documents of the last parse, reused when the file changes; undefined when it was parsed whole. */
  documents?: ParsedDocument[];
}

export interface ManifestSource {
  on(event: "change", listener: (snapshot: ClusterSnapshot) => void): this;
  on(event: "problem", listener: (problem: ManifestProblem) => void): this;
  emit(event: "change", snapshot: ClusterSnapshot): boolean;
  emit(event: "problem", problem: ManifestProblem): boolean;
}

export class ManifestSource extends EventEmitter {
  private readonly files = new Map<string, FileState>();
  private readonly changedNames = new Set<string>();
  private readonly debounceMs: number;
  private readonly pollIntervalMs: number;
  private readonly merge = new ManifestMerge();
  /** Files read or removed since the last publish(), whose objects the merge has not seen. */
  private readonly dirty = new Set<string>();
  private watcher: fs.FSWatcher | undefined;
  private debounceTimer: NodeJS.Timeout | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private reloading: Promise<void> | undefined;
  private reloadAgain = false;
  private folderMissingLogged = false;
  private stopped = false;

  constructor(
    private readonly dir: string,
    private readonly logger: Logger,
    options: ManifestSourceOptions = {},
  ) {
    super();
    this.debounceMs = options.debounceMs ?? 100;
    this.pollIntervalMs = options.pollIntervalMs ?? 2_000;
  }

  /** Reads every manifest once, then starts watching. Throws when the folder does not exist. */
  async start(): Promise<void> {
    await this.checkFolder();
    await this.reload(true);
    this.startWatching();
    this.pollTimer = setInterval(() => this.requestReload(), this.pollIntervalMs);
    this.pollTimer.unref();
    this.logger.info({ dir: this.dir, files: this.files.size }, "manifest source started");
  }

  snapshot(): ClusterSnapshot {
    return this.merge.snapshot;
  }

  /** Returns the problems of the current version of every file, in file name order. */
  problems(): ManifestProblem[] {
    return [...this.files.keys()].sort().flatMap((name) => this.files.get(name)!.problems);
  }

  /** Stops watching and polling; resolves once a re-read in progress has finished. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.watcher?.close();
    clearTimeout(this.debounceTimer);
    clearInterval(this.pollTimer);
    await this.reloading;
  }

  /** Re-reads changed files now; resolves once the snapshot is up to date. For tests and diagnostics. */
  async refresh(): Promise<void> {
    this.requestReload();
    while (this.reloading !== undefined) await this.reloading;
  }

  private async checkFolder(): Promise<void> {
    let stat: fs.Stats;
    try {
      stat = await fs.promises.stat(this.dir);
    } catch (error) {
      throw new AgentError("INTERNAL", `manifest folder ${this.dir} cannot be read (${(error as Error).message}); create it or fix the path`, { cause: error });
    }
    if (!stat.isDirectory()) {
      throw new AgentError("INTERNAL", `manifest path ${this.dir} is not a directory; point the agent at the directory that contains the manifests`);
    }
  }

  private startWatching(): void {
    try {
      this.watcher = fs.watch(this.dir, { persistent: false }, (_event, filename) => {
        // An event without a name, or on a file we do not read, may hide a change behind a
        // symlink (ConfigMap volumes swap "..data"): re-read everything then.
        if (filename && isManifestName(filename.toString())) this.changedNames.add(filename.toString());
        else this.changedNames.add("*");
        clearTimeout(this.debounceTimer);
        this.debounceTimer = setTimeout(() => this.requestReload(), this.debounceMs);
      });
      this.watcher.on("error", (error) => {
        this.logger.warn({ dir: this.dir, err: error }, "manifest folder watch failed; changes are picked up by polling only");
        this.watcher?.close();
        this.watcher = undefined;
      });
    } catch (error) {
      this.logger.warn({ dir: this.dir, err: error }, "cannot watch the manifest folder; changes are picked up by polling only");
    }
  }

  /** Runs one re-read at a time; a request during a re-read runs one more afterwards. */
  private requestReload(): void {
    if (this.stopped) return;
    if (this.reloading !== undefined) {
      this.reloadAgain = true;
      return;
    }
    this.reloading = this.reload(false)
      .catch((error: unknown) => this.logger.error({ dir: this.dir, err: error }, "manifest re-read failed"))
      .finally(() => {
        this.reloading = undefined;
        if (this.reloadAgain) {
          this.reloadAgain = false;
          this.requestReload();
        }
      });
  }

  private async reload(initial: boolean): Promise<void> {
    const names = await this.listManifestFiles();
    if (names === undefined) return;
    const forceAll = initial || this.changedNames.has("*");
    const forced = new Set(this.changedNames);
    this.changedNames.clear();

    const present = new Set(names);
    for (const name of [...this.files.keys()]) {
      if (!present.has(name)) this.removeFile(name);
    }
    // A folder may hold thousands of files: they are stat'ed in parallel, then read in name order.
    const stats = await statFiles(this.dir, names);
    for (const name of names) {
      await this.readFileIfChanged(name, forceAll || forced.has(name), stats.get(name)!);
    }
    this.publish();
  }

  private async listManifestFiles(): Promise<string[] | undefined> {
    try {
      const entries = await fs.promises.readdir(this.dir);
      this.folderMissingLogged = false;
      return entries.filter(isManifestName).sort();
    } catch (error) {
      // Keep serving what was read: a folder that disappears for a moment (remount) must not
      // unenroll every workload.
      if (!this.folderMissingLogged) {
        this.logger.error({ dir: this.dir, err: error }, "cannot list the manifest folder; keeping the objects read before");
        this.folderMissingLogged = true;
      }
      return undefined;
    }
  }

  /** Reads and parses a file whose size or modification time differs from the last read, or any file when `force` is set. */
  private async readFileIfChanged(name: string, force: boolean, statResult: fs.Stats | Error): Promise<void> {
    const file = path.join(this.dir, name);
    let stat: fs.Stats;
    let text: string;
    try {
      if (statResult instanceof Error) throw statResult;
      stat = statResult;
      if (!stat.isFile()) return;
      const known = this.files.get(name);
      if (!force && known !== undefined && known.mtimeMs === stat.mtimeMs && known.size === stat.size) return;
      text = await fs.promises.readFile(file, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") {
        this.removeFile(name);
        return;
      }
      this.logger.error({ file, err: error }, "cannot read manifest file; keeping its objects read before");
      return;
    }
    this.applyParse(name, file, stat, text);
  }

  private applyParse(name: string, file: string, stat: fs.Stats, text: string): void {
    const { result, documents } = parseManifestsReusing(file, text, this.files.get(name)?.documents, this.logger);
    for (const problem of result.problems) {
      this.logger.warn({ file, problem }, formatManifestProblem(problem));
      this.emit("problem", problem);
    }
    const previous = this.files.get(name)?.objects ?? new Map<string, ParsedObject>();
    if (result.syntaxError) {
      this.files.set(name, { mtimeMs: stat.mtimeMs, size: stat.size, objects: previous, problems: result.problems, documents });
      return;
    }

    const objects = new Map<string, ParsedObject>();
    for (const object of result.objects) {
      if (objects.has(object.key)) {
        this.logger.warn({ file, object: object.key }, "object defined twice in one manifest file; the later definition is used");
      }
      objects.set(object.key, object);
    }
    for (const problem of result.problems) {
      for (const key of lastValidKeys(problem, previous)) {
        if (objects.has(key)) continue;
        this.logger.warn({ file, object: key, problem: problem.object }, "keeping the last valid version of a rejected object");
        objects.set(key, previous.get(key)!);
      }
    }
    // A document rejected so early that it names no object (a mistyped kind or name field) keeps
    // the objects that the document at its place in the file defined before. A document whose
    // problems name an object is matched by that name above, never by its place.
    const servedDocuments = new Set(result.objects.map((object) => object.value.source.document));
    const namingDocuments = new Set(result.problems.filter((problem) => splitKey(problem.object) !== undefined).map((problem) => problem.document));
    const rejectedDocuments = new Set(
      result.problems.map((problem) => problem.document).filter((document) => !servedDocuments.has(document) && !namingDocuments.has(document)),
    );
    for (const [key, object] of previous) {
      if (objects.has(key) || !rejectedDocuments.has(object.value.source.document)) continue;
      this.logger.warn({ file, object: key, document: object.value.source.document }, "keeping the last valid version of an object whose document was rejected");
      objects.set(key, object);
    }
    this.files.set(name, { mtimeMs: stat.mtimeMs, size: stat.size, objects, problems: result.problems, documents });
    this.dirty.add(name);
  }

  private removeFile(name: string): void {
    if (this.files.delete(name)) {
      this.dirty.add(name);
      this.logger.info({ file: path.join(this.dir, name) }, "manifest file removed; its objects are withdrawn");
    }
  }

  /** Merges the files read since the last call (a later file in name order wins a duplicate) and emits "change" when the result differs. */
  private publish(): void {
    const files = new Map([...this.dirty].map((name) => [name, this.files.get(name)?.objects] as const));
    this.dirty.clear();
    const snapshot = this.merge.update(
      files,
      (name) => this.files.get(name)?.objects,
      ({ key, used, ignored }) =>
        this.logger.warn(
          { object: key, used: used.value.source.file, ignored: ignored.map((object) => object.value.source.file) },
          "object defined in two manifest files; the file last in name order wins",
        ),
    );
    if (snapshot !== undefined) this.emit("change", snapshot);
  }

}

/**
 * Returns the keys of the objects read before from the same file that a rejected object replaces.
 * That is the object of the same key, or, when the kind or a metadata field was the mistake, the
 * object of the same name under another kind or namespace. A mistyped apiVersion, kind or namespace thus
 * keeps the last valid version serving instead of removing the object.
 */
function lastValidKeys(problem: ManifestProblem, previous: ReadonlyMap<string, ParsedObject>): string[] {
  if (previous.has(problem.object)) return [problem.object];
  const rejected = splitKey(problem.object);
  if (rejected === undefined) return [];
  const kindWrong = problem.field === "kind";
  const namespaceWrong = problem.field.startsWith("metadata");
  return [...previous.keys()].filter((key) => {
    const earlier = splitKey(key)!;
    return (
      earlier.name === rejected.name &&
      (earlier.kind === rejected.kind || kindWrong) &&
      (earlier.namespace === rejected.namespace || namespaceWrong)
    );
  });
}

/** Splits "Kind namespace/name" or "Kind name"; undefined for labels such as "document 2". */
function splitKey(key: string): { kind: string; namespace?: string; name: string } | undefined {
  const match = /^(\S+) (?:([^/\s]+)\/)?([^/\s]+)$/.exec(key);
  if (match === null || /^\d+$/.test(match[3]) || match[1] === "document") return undefined;
  return { kind: match[1], namespace: match[2], name: match[3] };
}

/** Number of stat calls in flight while a folder is re-read. */
const STAT_CONCURRENCY = 64;

/** Returns the stat of each named file of `dir`, or the error that stat failed with. */
async function statFiles(dir: string, names: readonly string[]): Promise<Map<string, fs.Stats | Error>> {
  const stats = new Map<string, fs.Stats | Error>();
  for (let start = 0; start < names.length; start += STAT_CONCURRENCY) {
    const batch = names.slice(start, start + STAT_CONCURRENCY);
    const results = await Promise.all(
      batch.map((name) => fs.promises.stat(path.join(dir, name)).catch((error: unknown) => (error instanceof Error ? error : new Error(String(error))))),
    );
    batch.forEach((name, index) => stats.set(name, results[index]));
  }
  return stats;
}

function isManifestName(name: string): boolean {
  return !name.startsWith(".") && MANIFEST_EXTENSIONS.includes(path.extname(name).toLowerCase());
}

