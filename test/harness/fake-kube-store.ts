// Objects of the fake Kubernetes API server with one global resourceVersion counter and a bounded
// history of changes, from which watches resume and paginated lists read consistent snapshots.
// Stored objects are never mutated: every write stores a new copy, so history entries and
// snapshots can share them.

import crypto from "node:crypto";
import { resourceOfObject, type ResourceName, type ResourceType } from "./fake-kube-resources";
import type { KubeObject } from "./fake-kube-selectors";

export type ChangeType = "ADDED" | "MODIFIED" | "DELETED";

/** One write: the object after it (for DELETED, the last state stamped with the deletion's version) and before it. */
export interface Change {
  resourceVersion: number;
  type: ChangeType;
  resource: ResourceName;
  object: KubeObject;
  previous?: KubeObject;
}

/** Thrown for a resourceVersion older than the retained history. */
export class ExpiredError extends Error {
  constructor(
    readonly requested: number,
    readonly oldest: number,
  ) {
    super(`resourceVersion ${requested} is older than the retained history, which starts after ${oldest - 1}`);
    this.name = "ExpiredError";
  }
}

/** Default number of changes kept for watches and snapshots; older ones are compacted away. */
export const DEFAULT_HISTORY_LIMIT = 50_000;

export function keyOf(namespace: string | undefined, name: string): string {
  return namespace ? `${namespace}/${name}` : name;
}

function objectKey(object: KubeObject): string {
  return keyOf(object.metadata?.namespace, object.metadata?.name ?? "");
}

function compareKeys(a: string, b: string): number {
  if (a < b) return -1;
  if (a > b) return 1;
  return 0;
}

export class KubeStore {
  /** The resourceVersion of the newest write; a decimal string on the wire. */
  resourceVersion = 1;
  readonly #objects = new Map<ResourceName, Map<string, KubeObject>>();
  #history: Change[] = [];
  /** Every change with a resourceVersion above this one is in #history. */
  #compactedThrough = 1;
  readonly #historyLimit: number;
  readonly #listeners = new Set<(change: Change) => void>();

  constructor(historyLimit = DEFAULT_HISTORY_LIMIT) {
    this.#historyLimit = historyLimit;
  }

  /** Calls `listener` synchronously after every write, in resourceVersion order. Returns a function that removes it. */
  onChange(listener: (change: Change) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  objectsOf(resource: ResourceName): Map<string, KubeObject> {
    let objects = this.#objects.get(resource);
    if (!objects) {
      objects = new Map();
      this.#objects.set(resource, objects);
    }
    return objects;
  }

  get(resource: ResourceName, namespace: string | undefined, name: string): KubeObject | undefined {
    return this.objectsOf(resource).get(keyOf(namespace, name));
  }

  /**
   * Creates or replaces an object. A create fills metadata.uid, creationTimestamp, generation and,
   * for a namespaced kind, namespace "default"; a replace keeps uid and creationTimestamp and bumps
   * generation when spec changed. Returns the stored object.
   */
  put(input: KubeObject): KubeObject {
    const type = resourceOfObject(input);
    if (!type) throw new Error(`cannot store kind ${input.kind} of apiVersion ${input.apiVersion}: the fake API server serves only namespaces, pods, services, endpointslices, authorizationpolicies, peerauthentications and daemonsets`);
    if (!input.metadata?.name) throw new Error(`cannot store a ${input.kind} without metadata.name`);

    const object = structuredClone(input) as KubeObject & { metadata: Record<string, unknown> };
    if (type.namespaced) object.metadata.namespace ||= "default";
    else delete object.metadata.namespace;

    const previous = this.objectsOf(type.name).get(objectKey(object));
    this.#fillMetadata(object, previous);
    return this.#write(type, previous ? "MODIFIED" : "ADDED", object, previous);
  }

  #fillMetadata(object: KubeObject & { metadata: Record<string, unknown> }, previous: KubeObject | undefined): void {
    if (previous) {
      const old = previous.metadata!;
      object.metadata.uid = old.uid;
      object.metadata.creationTimestamp = old.creationTimestamp;
      const specChanged = JSON.stringify(object.spec) !== JSON.stringify(previous.spec);
      object.metadata.generation = Number(old.generation ?? 1) + (specChanged ? 1 : 0);
      return;
    }
    object.metadata.uid ||= crypto.randomUUID();
    object.metadata.creationTimestamp ||= new Date().toISOString().replace(/\.\d{3}Z$/, "Z");
    object.metadata.generation ??= 1;
  }

  /** Stores an object that replaces `previous`, keeping its identity fields; used by PATCH. */
  replace(type: ResourceType, object: KubeObject & { metadata: Record<string, unknown> }, previous: KubeObject): KubeObject {
    this.#fillMetadata(object, previous);
    object.metadata.name = previous.metadata!.name;
    if (type.namespaced) object.metadata.namespace = previous.metadata!.namespace;
    return this.#write(type, "MODIFIED", object, previous);
  }

  /** Deletes an object; returns its last state, or undefined when it did not exist. */
  remove(type: ResourceType, namespace: string | undefined, name: string): KubeObject | undefined {
    const key = keyOf(type.namespaced ? namespace || "default" : undefined, name);
    const previous = this.objectsOf(type.name).get(key);
    if (!previous) return undefined;
    const object = structuredClone(previous) as KubeObject & { metadata: Record<string, unknown> };
    return this.#write(type, "DELETED", object, previous);
  }

  #write(type: ResourceType, changeType: ChangeType, object: KubeObject & { metadata: Record<string, unknown> }, previous?: KubeObject): KubeObject {
    this.resourceVersion++;
    object.metadata.resourceVersion = String(this.resourceVersion);
    const objects = this.objectsOf(type.name);
    if (changeType === "DELETED") objects.delete(objectKey(object));
    else objects.set(objectKey(object), object);

    const change: Change = { resourceVersion: this.resourceVersion, type: changeType, resource: type.name, object, previous };
    this.#history.push(change);
    this.#trimHistory();
    for (const listener of this.#listeners) listener(change);
    return object;
  }

  #trimHistory(): void {
    const excess = this.#history.length - this.#historyLimit;
    if (excess <= 0) return;
    this.#compactedThrough = this.#history[excess - 1].resourceVersion;
    this.#history = this.#history.slice(excess);
  }

  /** Drops all history, so that every resourceVersion before the current one is expired. */
  compact(): void {
    this.#compactedThrough = this.resourceVersion;
    this.#history = [];
  }

  /** The oldest resourceVersion a watch or a continue token may start from. */
  get oldestResumable(): number {
    return this.#compactedThrough;
  }

  /** Returns the changes after `resourceVersion` in order; throws ExpiredError when some were compacted. */
  changesAfter(resourceVersion: number): Change[] {
    this.#checkRetained(resourceVersion);
    return this.#history.filter((change) => change.resourceVersion > resourceVersion);
  }

  #checkRetained(resourceVersion: number): void {
    if (resourceVersion < this.#compactedThrough) throw new ExpiredError(resourceVersion, this.#compactedThrough + 1);
  }

  /**
   * Returns the objects of a resource as they were at `resourceVersion`, keyed like the store and
   * sorted by key, by undoing the retained changes after it. Throws ExpiredError when the history
   * no longer reaches back that far.
   */
  snapshot(resource: ResourceName, resourceVersion: number): [string, KubeObject][] {
    this.#checkRetained(resourceVersion);
    const current = this.objectsOf(resource);
    // For each key changed after resourceVersion, the state before its first such change.
    const before = new Map<string, KubeObject | undefined>();
    for (let i = this.#history.length - 1; i >= 0 && this.#history[i].resourceVersion > resourceVersion; i--) {
      const change = this.#history[i];
      if (change.resource === resource) before.set(objectKey(change.object), change.previous);
    }
    const entries: [string, KubeObject][] = [];
    for (const [key, object] of current) {
      if (!before.has(key)) entries.push([key, object]);
    }
    for (const [key, object] of before) {
      if (object) entries.push([key, object]);
    }
    // Keys compare by UTF-16 code unit, like the byte order of the real server's storage keys for ASCII names.
    return entries.sort((a, b) => compareKeys(a[0], b[0]));
  }
}
