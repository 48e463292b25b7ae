// The merge of the objects of every manifest file into one snapshot. When two files define the
// same object, the file last in name order wins. A re-read updates only the objects of the files
// it read: with 10,000 policies, merging every file again cost more than parsing the changed one.

import type { ClusterSnapshot } from "../state/types";
import type { ParsedObject } from "./manifest-problem";

/** A file whose duplicate definition of an object loses to another file's. */
export interface DuplicateObject {
  key: string;
  used: ParsedObject;
  ignored: ParsedObject[];
}

export class ManifestMerge {
  /** The files that define each object key. */
  readonly #definers = new Map<string, Set<string>>();
  /** The object keys each file defined at the last update. */
  readonly #keysByFile = new Map<string, Set<string>>();
  /** The winning object of each key in the current snapshot. */
  readonly #published = new Map<string, ParsedObject>();
  #snapshot: ClusterSnapshot = buildSnapshot([]);

  get snapshot(): ClusterSnapshot {
    return this.#snapshot;
  }

  /**
   * Applies the new objects of the files in `files` (undefined for a removed file). Returns the new
   * snapshot, or undefined when no published object changed. An object that changed only in
   * identity, with the same JSON, keeps its earlier instance, so caches keyed by it stay warm.
   * `onDuplicate` is called for each object of these files that several files define.
   */
  update(
    files: ReadonlyMap<string, ReadonlyMap<string, ParsedObject> | undefined>,
    objectsOf: (file: string) => ReadonlyMap<string, ParsedObject> | undefined,
    onDuplicate: (duplicate: DuplicateObject) => void,
  ): ClusterSnapshot | undefined {
    const affected = this.#updateDefiners(files);
    const changes: { key: string; before?: ParsedObject; after?: ParsedObject }[] = [];
    for (const key of affected) {
      const winner = this.#winner(key, objectsOf, onDuplicate);
      const before = this.#published.get(key);
      if (winner === before || (winner !== undefined && before !== undefined && sameValue(winner, before))) continue;
      changes.push({ key, before, after: winner });
    }
    if (changes.length === 0) return undefined;

    const snapshot = copySnapshot(this.#snapshot);
    for (const { key, before, after } of changes) {
      if (before !== undefined) mapOf(snapshot, before).delete(keyOf(before));
      if (after !== undefined) {
        mapOf(snapshot, after).set(keyOf(after), after.value);
        this.#published.set(key, after);
      } else {
        this.#published.delete(key);
      }
    }
    this.#snapshot = snapshot;
    return snapshot;
  }

  /** Records which keys each file in `files` defines now, and returns every key whose definers changed. */
  #updateDefiners(files: ReadonlyMap<string, ReadonlyMap<string, ParsedObject> | undefined>): Set<string> {
    const affected = new Set<string>();
    for (const [file, objects] of files) {
      for (const key of this.#keysByFile.get(file) ?? []) {
        affected.add(key);
        const definers = this.#definers.get(key)!;
        definers.delete(file);
        if (definers.size === 0) this.#definers.delete(key);
      }
      const keys = new Set(objects?.keys() ?? []);
      for (const key of keys) {
        affected.add(key);
        const definers = this.#definers.get(key) ?? new Set<string>();
        definers.add(file);
        this.#definers.set(key, definers);
      }
      if (keys.size > 0) this.#keysByFile.set(file, keys);
      else this.#keysByFile.delete(file);
    }
    return affected;
  }

  /** Returns the object of the file last in name order that defines `key`. */
  #winner(
    key: string,
    objectsOf: (file: string) => ReadonlyMap<string, ParsedObject> | undefined,
    onDuplicate: (duplicate: DuplicateObject) => void,
  ): ParsedObject | undefined {
    const definers = this.#definers.get(key);
    if (definers === undefined) return undefined;
    const names = [...definers].sort();
    const used = objectsOf(names[names.length - 1])!.get(key)!;
    if (names.length > 1) {
      onDuplicate({ key, used, ignored: names.slice(0, -1).map((name) => objectsOf(name)!.get(key)!) });
    }
    return used;
  }
}

function sameValue(a: ParsedObject, b: ParsedObject): boolean {
  return a.kind === b.kind && JSON.stringify(a.value) === JSON.stringify(b.value);
}

/** Returns the key of an object inside its snapshot map: the uid, or the name for a Namespace. */
function keyOf(object: ParsedObject): string {
  return object.kind === "Namespace" ? object.value.name : object.value.uid;
}

function mapOf(snapshot: MutableSnapshot, object: ParsedObject): Map<string, unknown> {
  switch (object.kind) {
    case "Namespace":
      return snapshot.namespaces;
    case "Pod":
      return snapshot.workloads;
    case "Service":
      return snapshot.services;
    case "AuthorizationPolicy":
      return snapshot.authorizationPolicies;
    case "PeerAuthentication":
      return snapshot.peerAuthentications;
    case "EndpointSlice":
      // Created with the first slice, so that snapshots without slices keep their earlier shape.
      snapshot.endpointSlices ??= new Map();
      return snapshot.endpointSlices;
  }
}

type MutableSnapshot = { [K in Exclude<keyof ClusterSnapshot, "endpointSlices">]: Map<string, unknown> } & { endpointSlices?: Map<string, unknown> };

/** Copies the maps of a snapshot: a published snapshot is never changed, since readers may hold it. */
function copySnapshot(snapshot: ClusterSnapshot): ClusterSnapshot & MutableSnapshot {
  return {
    namespaces: new Map(snapshot.namespaces),
    workloads: new Map(snapshot.workloads),
    services: new Map(snapshot.services),
    authorizationPolicies: new Map(snapshot.authorizationPolicies),
    peerAuthentications: new Map(snapshot.peerAuthentications),
    ...(snapshot.endpointSlices !== undefined && { endpointSlices: new Map(snapshot.endpointSlices) }),
  } as ClusterSnapshot & MutableSnapshot;
}

/** Builds an immutable snapshot from accepted objects. */
export function buildSnapshot(objects: readonly ParsedObject[]): ClusterSnapshot {
  const snapshot: MutableSnapshot = {
    namespaces: new Map(),
    workloads: new Map(),
    services: new Map(),
    authorizationPolicies: new Map(),
    peerAuthentications: new Map(),
  };
  for (const object of objects) mapOf(snapshot, object).set(keyOf(object), object.value);
  return snapshot as ClusterSnapshot;
}
