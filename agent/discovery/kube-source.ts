// Serves the mesh configuration read from the Kubernetes API server: Namespaces, this node's Pods,
// the other nodes' Pods, Services, EndpointSlices, AuthorizationPolicies and PeerAuthentications.
// Each object is converted by the same readers as a manifest file, so the two sources cannot
// disagree. An invalid new version of an object is rejected alone and its last valid version keeps
// serving; a deleted object goes. Through an API-server outage the last state read keeps serving.

import { EventEmitter } from "node:events";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import type { ClusterSnapshot } from "../state/types";
import type { KubeClient } from "./kube-client";
import { Reflector, type ReflectorHealth, type ReflectorOptions, type ReflectorStore, type ResourceSpec } from "./kube-reflector";
import { buildSnapshot } from "./manifest-merge";
import { parseApiObject } from "./manifest-parse";
import type { ManifestProblem, ParsedObject } from "./manifest-problem";

/** The name that stands for the API server where a manifest problem names a file. */
export const KUBERNETES_SOURCE = "kubernetes";

/** Istio's sidecar injection marker; enrolment reads it on destination pods too. */
const SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status";

/** kubectl's copy of the whole applied object, often kilobytes per pod, which the agent never reads. */
const LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration";

interface KubeResource extends ResourceSpec {
  /** apiVersion and kind of the items, which list responses leave out. */
  apiVersion: string;
  kind: string;
  /** "sidecar-only" keeps no annotation but the sidecar marker. */
  annotations?: "sidecar-only";
}

/** Lists the resources the agent follows for `node`. Policies are optional, because Istio's CRDs may be missing. */
export function kubeResources(node: string): KubeResource[] {
  return [
    { name: "namespaces", path: "/api/v1/namespaces", apiVersion: "v1", kind: "Namespace" },
    // Pods of other nodes first: a pod that is being bound moves from that set to this node's, which then wins.
    { name: "pods of other nodes", path: "/api/v1/pods", fieldSelector: `spec.nodeName!=${node}`, apiVersion: "v1", kind: "Pod", annotations: "sidecar-only" },
    { name: "pods of this node", path: "/api/v1/pods", fieldSelector: `spec.nodeName=${node}`, apiVersion: "v1", kind: "Pod" },
    { name: "services", path: "/api/v1/services", apiVersion: "v1", kind: "Service" },
    { name: "endpointslices", path: "/apis/discovery.k8s.io/v1/endpointslices", apiVersion: "discovery.k8s.io/v1", kind: "EndpointSlice" },
    // List items carry their apiVersion, so the v1beta1 fallback converts with the right one.
    {
      name: "authorizationpolicies",
      path: "/apis/security.istio.io/v1/authorizationpolicies",
      olderPaths: ["/apis/security.istio.io/v1beta1/authorizationpolicies"],
      apiVersion: "security.istio.io/v1",
      kind: "AuthorizationPolicy",
      optional: true,
    },
    {
      name: "peerauthentications",
      path: "/apis/security.istio.io/v1/peerauthentications",
      olderPaths: ["/apis/security.istio.io/v1beta1/peerauthentications"],
      apiVersion: "security.istio.io/v1",
      kind: "PeerAuthentication",
      optional: true,
    },
  ];
}

export interface KubeSourceOptions {
  node: string;
  client: KubeClient;
  /** Delay that gathers a burst of events into one new snapshot. */
  debounceMs?: number;
  reflector?: ReflectorOptions;
}

export interface KubeHealth {
  server: string;
  /** Whether every resource has been listed at least once. */
  synced: boolean;
  /** Whether every resource that the server serves has a watch open now. */
  watching: boolean;
  resources: ReflectorHealth[];
}

export interface KubeSource {
  on(event: "change", listener: (snapshot: ClusterSnapshot) => void): this;
  emit(event: "change", snapshot: ClusterSnapshot): boolean;
}

/** The objects and problems of one resource, by "namespace/name". */
class ResourceStore implements ReflectorStore {
  objects = new Map<string, ParsedObject>();
  problems = new Map<string, ManifestProblem[]>();
  /** The list being read: its objects and problems, swapped in by endList(). */
  private listing: { objects: Map<string, ParsedObject>; problems: Map<string, ManifestProblem[]> } | undefined;

  constructor(
    private readonly resource: KubeResource,
    private readonly changed: () => void,
    private readonly logger: Logger,
  ) {}

  beginList(): void {
    this.listing = { objects: new Map(), problems: new Map() };
  }

  listPage(items: unknown[]): void {
    const listing = this.listing;
    if (listing === undefined) return;
    for (const item of items) {
      const key = keyOf(item);
      if (key === undefined) {
        this.logger.warn({ resource: this.resource.name }, "the API server sent an object without metadata.name; skipped");
        continue;
      }
      const { object, problems } = this.convert(item);
      if (problems.length > 0) listing.problems.set(key, problems);
      // A rejected object keeps the valid version held before the list, if any.
      const kept = object ?? this.objects.get(key);
      if (kept !== undefined) listing.objects.set(key, kept);
    }
  }

  endList(): void {
    if (this.listing === undefined) return;
    this.objects = this.listing.objects;
    this.problems = this.listing.problems;
    this.listing = undefined;
    this.changed();
  }

  abortList(): void {
    this.listing = undefined;
  }

  upsert(item: unknown): void {
    if (this.read(item) !== undefined) this.changed();
  }

  remove(item: unknown): void {
    const key = keyOf(item);
    if (key === undefined) return;
    const removed = this.objects.delete(key);
    const hadProblems = this.problems.delete(key);
    if (removed || hadProblems) this.changed();
  }

  /** Converts one object and stores it, or records why it was rejected. Returns its key. */
  private read(item: unknown): string | undefined {
    const key = keyOf(item);
    if (key === undefined) {
      this.logger.warn({ resource: this.resource.name }, "the API server sent an object without metadata.name; skipped");
      return undefined;
    }
    const { object, problems } = this.convert(item);
    if (problems.length > 0) this.problems.set(key, problems);
    else this.problems.delete(key);
    // A rejected new version leaves the last valid one in place.
    if (object !== undefined) this.objects.set(key, object);
    return key;
  }

  /** Converts one object with the manifest readers; the object is undefined when it was rejected or is of no use. */
  private convert(item: unknown): { object?: ParsedObject; problems: ManifestProblem[] } {
    const { object, problems } = parseApiObject(this.complete(item), { file: KUBERNETES_SOURCE, document: 0 });
    return { object: problems.length === 0 ? object : undefined, problems };
  }

  /**
   * Fills in apiVersion and kind, which list items lack, and drops what the agent never reads:
   * managedFields, kubectl's applied copy, and the annotations of other nodes' pods. Of those,
   * only the sidecar marker matters, because it takes a destination out of the mesh.
   */
  private complete(item: unknown): unknown {
    const value = item as { apiVersion?: unknown; kind?: unknown; metadata?: { annotations?: Record<string, unknown>; managedFields?: unknown } };
    const metadata = value.metadata && { ...value.metadata };
    if (metadata) {
      delete metadata.managedFields;
      if (metadata.annotations) metadata.annotations = this.keptAnnotations(metadata.annotations);
    }
    return { ...value, apiVersion: value.apiVersion ?? this.resource.apiVersion, kind: value.kind ?? this.resource.kind, metadata };
  }

  private keptAnnotations(annotations: Record<string, unknown>): Record<string, unknown> {
    if (this.resource.annotations === "sidecar-only") {
      return SIDECAR_STATUS_ANNOTATION in annotations ? { [SIDECAR_STATUS_ANNOTATION]: annotations[SIDECAR_STATUS_ANNOTATION] } : {};
    }
    if (!(LAST_APPLIED_ANNOTATION in annotations)) return annotations;
    const kept = { ...annotations };
    delete kept[LAST_APPLIED_ANNOTATION];
    return kept;
  }
}

function keyOf(item: unknown): string | undefined {
  const metadata = (item as { metadata?: { name?: unknown; namespace?: unknown } } | undefined)?.metadata;
  if (typeof metadata?.name !== "string" || metadata.name === "") return undefined;
  return typeof metadata.namespace === "string" && metadata.namespace !== "" ? `${metadata.namespace}/${metadata.name}` : metadata.name;
}

export class KubeSource extends EventEmitter {
  private readonly stores: ResourceStore[];
  private readonly reflectors: Reflector[];
  private current: ClusterSnapshot;
  private publishTimer: NodeJS.Timeout | undefined;
  private started = false;
  private readonly debounceMs: number;
  #stopRequested: () => void = () => undefined;
  /** Settles when stop() is called, so that a start() still waiting for its first lists ends. */
  private readonly stopRequested = new Promise<void>((resolve) => (this.#stopRequested = resolve));

  constructor(
    private readonly options: KubeSourceOptions,
    private readonly logger: Logger,
  ) {
    super();
    this.debounceMs = options.debounceMs ?? 20;
    const resources = kubeResources(options.node);
    this.stores = resources.map((resource) => new ResourceStore(resource, () => this.schedulePublish(), logger));
    this.reflectors = resources.map(
      (resource, index) => new Reflector(options.client, resource, this.stores[index], logger, options.reflector),
    );
    this.current = buildSnapshot([]);
  }

  /** Lists every resource, then watches; resolves once each has been listed. Logs what it still waits for every 10 s. */
  async start(): Promise<void> {
    for (const reflector of this.reflectors) reflector.start();
    const waiting = setInterval(() => {
      const pending = this.reflectors.filter((reflector) => !reflector.health().synced);
      this.logger.warn(
        { server: this.options.client.server, pending: pending.map((reflector) => ({ resource: reflector.spec.name, lastError: reflector.health().lastError })) },
        "still waiting for the first list from the Kubernetes API server; no pod is enrolled until every resource has been read",
      );
    }, 10_000);
    // This timer is not unref'd: while every reflector sleeps in its backoff it keeps the process alive.
    try {
      const outcome = await Promise.race([Promise.all(this.reflectors.map((reflector) => reflector.synced)).then(() => "synced" as const), this.stopRequested.then(() => "stopped" as const)]);
      if (outcome === "stopped") throw new AgentError("INTERNAL", "the agent stopped before the Kubernetes API server's first list completed");
    } finally {
      clearInterval(waiting);
    }
    this.started = true;
    clearTimeout(this.publishTimer);
    this.current = this.build();
    this.logger.info(
      { server: this.options.client.server, namespaces: this.current.namespaces.size, workloads: this.current.workloads.size, services: this.current.services.size },
      "Kubernetes API source started",
    );
  }

  snapshot(): ClusterSnapshot {
    return this.current;
  }

  /** Lists the rejected objects and why, in key order. */
  problems(): ManifestProblem[] {
    return this.stores.flatMap((store) => [...store.problems.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).flatMap(([, problems]) => problems));
  }

  health(): KubeHealth {
    const resources = this.reflectors.map((reflector) => reflector.health());
    return {
      server: this.options.client.server,
      synced: resources.every((resource) => resource.synced),
      watching: resources.every((resource) => resource.watching || resource.absent),
      resources,
    };
  }

  /** Publishes a snapshot of what the stores hold now. */
  async refresh(): Promise<void> {
    if (this.started) this.publish();
  }

  async stop(): Promise<void> {
    this.#stopRequested();
    clearTimeout(this.publishTimer);
    this.started = false;
    await Promise.all(this.reflectors.map((reflector) => reflector.stop()));
    this.options.client.close();
  }

  private schedulePublish(): void {
    if (!this.started || this.publishTimer !== undefined) return;
    this.publishTimer = setTimeout(() => this.publish(), this.debounceMs);
  }

  private publish(): void {
    clearTimeout(this.publishTimer);
    this.publishTimer = undefined;
    if (!this.started) return;
    this.current = this.build();
    this.emit("change", this.current);
  }

  private build(): ClusterSnapshot {
    return buildSnapshot(this.stores.flatMap((store) => [...store.objects.values()]));
  }
}
