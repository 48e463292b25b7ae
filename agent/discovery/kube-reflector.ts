// Keeps one resource of the Kubernetes API in step: a paginated list, then a watch from the
// list's resourceVersion with bookmarks. A watch that ends is resumed from the last version seen;
// a version the server no longer has (410 Gone) makes it list again. Failures back off with jitter
// and never clear the store, so the agent keeps the last state it read through an outage.

import v8 from "node:v8";
import type { Logger } from "../log";
import { KubeApiError, statusOf, type KubeClient } from "./kube-client";

/** One resource to follow: where to list and watch it, and how to select objects. */
export interface ResourceSpec {
  /** Name in logs and health, e.g. "pods of this node". */
  name: string;
  /** Collection path, e.g. /api/v1/pods. */
  path: string;
  /**
   * Paths of older API versions of the same resource, tried in order when the server does not serve
   * `path` (404), as older Istio releases serve security.istio.io v1beta1 only.
   */
  olderPaths?: string[];
  fieldSelector?: string;
  labelSelector?: string;
  /**
   * Whether the resource may be absent from the server (a CustomResourceDefinition that is not
   * installed): a 404 at the first list then counts as an empty, synced list, checked again every
   * minute. After a list succeeded, a 404 is a failure like any other.
   */
  optional?: boolean;
}

/**
 * Receives the objects of one resource. A list arrives page by page between beginList() and
 * endList(), which then replaces every object; abortList() drops a list that failed half-way.
 * Pages are converted as they arrive, so a large list never keeps all its raw objects at once.
 */
export interface ReflectorStore {
  beginList(): void;
  listPage(objects: unknown[]): void;
  endList(): void;
  abortList(): void;
  upsert(object: unknown): void;
  remove(object: unknown): void;
}

export interface ReflectorHealth {
  resource: string;
  /** Whether a full list has been read at least once. */
  synced: boolean;
  /** Whether a watch stream is open now. */
  watching: boolean;
  /** Whether the server reported the resource as not served (404), for optional resources. */
  absent: boolean;
  resourceVersion: string;
  lastSyncTime?: string;
  lastEventTime?: string;
  lastError?: string;
  lastErrorTime?: string;
  lists: number;
  watches: number;
  /** Lists started because the server no longer had the version to resume from (410 Gone). */
  expired: number;
}

export interface ReflectorOptions {
  /** Objects per list page (limit). */
  pageSize?: number;
  /** First delay after a failure; it doubles with each failure in a row. */
  minBackoffMs?: number;
  /** Largest delay between failed attempts. */
  maxBackoffMs?: number;
  /** Server-side watch timeout range in seconds; each watch picks a value in it, so that watches do not end together. */
  watchTimeoutSeconds?: [number, number];
  /** How often an optional resource that the server lacks is listed again. */
  absentRetryMs?: number;
}

const DEFAULTS: Required<ReflectorOptions> = {
  pageSize: 250,
  minBackoffMs: 200,
  maxBackoffMs: 30_000,
  watchTimeoutSeconds: [300, 600],
  absentRetryMs: 60_000,
};

/** A watch that lasted this long counts as healthy, and resets the backoff. */
const HEALTHY_WATCH_MS = 30_000;
/** Slack beyond the server-side timeout before a silent watch is ended by the agent. */
const WATCH_IDLE_SLACK_MS = 30_000;

/** A watch that ends sooner than this with no event counts as a failure, which backs off. */
const QUICK_END_MS = 1_000;

/**
 * Growth of V8's old generation per major collection while any list is read, in percent. A list of
 * 10,000 pods makes about 100 MiB of short-lived garbage, and with V8's own factor (up to four
 * times the live size) the heap grew to 140 MiB before its first major collection and kept those
 * pages. With 10% it is collected as it is made (test/bench/kubernetes.ts, docs/benchmarks.md).
 */
const LIST_HEAP_GROWING_PERCENT = 10;
let listsInProgress = 0;

/** Limits the heap's growth while the first of several concurrent lists runs, until the last ends. */
function listStarted(): void {
  if (listsInProgress++ === 0) v8.setFlagsFromString(`--heap-growing-percent=${LIST_HEAP_GROWING_PERCENT}`);
}

/** Gives V8 back its own growth factor (0 selects it) once no list runs. */
function listEnded(): void {
  if (--listsInProgress === 0) v8.setFlagsFromString("--heap-growing-percent=0");
}

/** Thrown inside the loop when the server no longer has the version to resume from. */
class ExpiredError extends Error {}

export class Reflector {
  private readonly options: Required<ReflectorOptions>;
  private readonly state: ReflectorHealth;
  private stopped = false;
  /** The path in use: `spec.path` or the first of `spec.olderPaths` that the server serves. */
  private path: string;
  /** Set once a list of the resource succeeded: a later 404 is then a failure, not an absent resource. */
  private served = false;
  /** The kind of the current streak of failures (a status code, or "unreachable"), logged once per streak. */
  private failureKind: string | undefined;
  private running: Promise<void> | undefined;
  private endWatch: (() => void) | undefined;
  private wake: (() => void) | undefined;
  private failures = 0;
  #synced: () => void = () => undefined;
  /** Settles once the first full list has been stored. */
  readonly synced = new Promise<void>((resolve) => (this.#synced = resolve));

  constructor(
    private readonly client: Pick<KubeClient, "request" | "watch">,
    readonly spec: ResourceSpec,
    private readonly store: ReflectorStore,
    private readonly logger: Logger,
    options: ReflectorOptions = {},
  ) {
    this.options = { ...DEFAULTS, ...options };
    this.path = spec.path;
    this.state = { resource: spec.name, synced: false, watching: false, absent: false, resourceVersion: "", lists: 0, watches: 0, expired: 0 };
  }

  start(): void {
    this.running ??= this.loop();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.endWatch?.();
    this.wake?.();
    await this.running;
  }

  health(): ReflectorHealth {
    return { ...this.state };
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      try {
        if (this.state.resourceVersion === "") await this.list();
        if (this.stopped) break;
        if (this.state.absent) {
          await this.sleep(this.options.absentRetryMs);
          this.state.resourceVersion = "";
          continue;
        }
        await this.watchOnce();
      } catch (error) {
        if (this.stopped) break;
        if (error instanceof ExpiredError) {
          this.state.expired++;
          this.state.resourceVersion = "";
          this.logger.info({ resource: this.spec.name }, "the API server no longer has the version to resume from (410 Gone); listing again");
          continue;
        }
        await this.backOff(error);
      }
    }
  }

  /** Reads every page of the list and replaces the store with it. */
  private async list(): Promise<void> {
    this.state.lists++;
    listStarted();
    try {
      await this.readList();
    } finally {
      listEnded();
    }
  }

  /** Reads the pages of one list into the store. */
  private async readList(): Promise<void> {
    let count = 0;
    let continueToken: string | undefined;
    let resourceVersion = "";
    this.store.beginList();
    try {
      do {
        const page = (await this.client.request("GET", this.path, {
          query: { limit: this.options.pageSize, continue: continueToken, fieldSelector: this.spec.fieldSelector, labelSelector: this.spec.labelSelector },
        })) as { metadata?: { resourceVersion?: unknown; continue?: unknown }; items?: unknown };
        if (!Array.isArray(page.items)) throw new KubeApiError(200, `GET ${this.path} returned no items list`);
        this.store.listPage(page.items);
        count += page.items.length;
        resourceVersion = typeof page.metadata?.resourceVersion === "string" ? page.metadata.resourceVersion : "";
        continueToken = typeof page.metadata?.continue === "string" && page.metadata.continue !== "" ? page.metadata.continue : undefined;
      } while (continueToken !== undefined && !this.stopped);
      if (!this.stopped && resourceVersion === "") throw new KubeApiError(200, `GET ${this.path} returned no resourceVersion`);
    } catch (error) {
      this.store.abortList();
      // An expired continue token: the list starts over from the first page.
      if (statusOf(error) === 410) throw new ExpiredError();
      // An API server that is starting may respond with 404 for a custom resource it served before.
      // That keeps the last state and backs off like any failure, instead of emptying the policies.
      if (statusOf(error) === 404 && !this.served && this.useOlderPath()) return this.readList();
      if (statusOf(error) === 404 && !this.served && this.spec.optional) {
        this.markAbsent();
        this.path = this.spec.path;
        return;
      }
      throw error;
    }
    if (this.stopped) {
      this.store.abortList();
      return;
    }
    this.store.endList();
    this.served = true;
    this.clearError();
    this.state.absent = false;
    this.state.resourceVersion = resourceVersion;
    this.state.lastSyncTime = new Date().toISOString();
    if (!this.state.synced) {
      this.state.synced = true;
      this.logger.info({ resource: this.spec.name, objects: count, resourceVersion }, "listed");
    } else {
      this.logger.info({ resource: this.spec.name, objects: count, resourceVersion }, "listed again");
    }
    this.#synced();
  }

  /** Moves to the next older API version after a 404. Returns false when none is left. */
  private useOlderPath(): boolean {
    const candidates = [this.spec.path, ...(this.spec.olderPaths ?? [])];
    const next = candidates[candidates.indexOf(this.path) + 1];
    if (next === undefined) return false;
    this.logger.info({ resource: this.spec.name, path: this.path, next }, `the API server does not serve ${this.path} (404); trying ${next}`);
    this.path = next;
    return true;
  }

  private markAbsent(): void {
    if (!this.state.absent) {
      this.logger.warn(
        { resource: this.spec.name, path: this.path },
        `the API server does not serve ${this.path} (404): its CustomResourceDefinition is not installed; treating it as empty and checking again every ${this.options.absentRetryMs / 1000} s`,
      );
    }
    this.store.beginList();
    this.store.endList();
    this.state.absent = true;
    this.state.synced = true;
    this.state.lastSyncTime = new Date().toISOString();
    this.#synced();
  }

  /** Runs one watch stream until it ends. Throws ExpiredError on 410 and the error that ended it otherwise. */
  private async watchOnce(): Promise<void> {
    const [low, high] = this.options.watchTimeoutSeconds;
    const timeoutSeconds = Math.round(low + Math.random() * (high - low));
    const startedAt = Date.now();
    const eventsBefore = this.state.lastEventTime;
    this.state.watches++;
    let idleTimer: NodeJS.Timeout | undefined;
    const outcome = await new Promise<unknown>((resolve) => {
      let settled = false;
      const finish = (error: unknown): void => {
        if (settled) return;
        settled = true;
        clearTimeout(idleTimer);
        resolve(error);
      };
      const armIdle = (): void => {
        clearTimeout(idleTimer);
        idleTimer = setTimeout(() => {
          this.logger.warn({ resource: this.spec.name, idleSeconds: timeoutSeconds + WATCH_IDLE_SLACK_MS / 1000 }, "the watch stream went silent; reconnecting");
          finish(new Error("the watch stream went silent"));
          this.endWatch?.();
        }, timeoutSeconds * 1000 + WATCH_IDLE_SLACK_MS);
        idleTimer.unref();
      };
      armIdle();
      this.client
        .watch(
          this.path,
          {
            resourceVersion: this.state.resourceVersion,
            allowWatchBookmarks: true,
            timeoutSeconds,
            fieldSelector: this.spec.fieldSelector,
            labelSelector: this.spec.labelSelector,
          },
          {
            opened: () => {
              if (settled) return;
              this.state.watching = true;
              this.clearError();
            },
            event: (type, object) => {
              armIdle();
              try {
                this.onEvent(type, object);
              } catch (error) {
                // The outcome is settled first: ending the stream reports a clean end.
                finish(error);
                this.endWatch?.();
              }
            },
            done: (error) => finish(error),
          },
        )
        .then((end) => {
          this.endWatch = end;
          if (settled || this.stopped) end();
        }, finish);
    });
    this.state.watching = false;
    this.endWatch = undefined;
    if (Date.now() - startedAt >= HEALTHY_WATCH_MS) this.failures = 0;
    if (outcome instanceof ExpiredError) throw outcome;
    if (statusOf(outcome) === 410) throw new ExpiredError();
    if (outcome !== undefined && outcome !== null) throw outcome;
    // A stream that the server ends at once with nothing in it must not turn into a busy loop.
    if (Date.now() - startedAt < QUICK_END_MS && this.state.lastEventTime === eventsBefore) {
      throw new Error("the watch stream ended as soon as it opened");
    }
  }

  private onEvent(type: string, object: unknown): void {
    this.state.lastEventTime = new Date().toISOString();
    if (type === "ERROR") {
      const status = object as { code?: unknown; message?: unknown; reason?: unknown };
      if (status?.code === 410 || status?.reason === "Expired" || status?.reason === "Gone") throw new ExpiredError();
      throw new KubeApiError(typeof status?.code === "number" ? status.code : 500, `watch ${this.path}: ${typeof status?.message === "string" ? status.message : "error event"}`);
    }
    const version = (object as { metadata?: { resourceVersion?: unknown } } | undefined)?.metadata?.resourceVersion;
    switch (type) {
      case "ADDED":
      case "MODIFIED":
        this.store.upsert(object);
        break;
      case "DELETED":
        this.store.remove(object);
        break;
      case "BOOKMARK":
        break;
      default:
        this.logger.debug({ resource: this.spec.name, type }, "ignored a watch event of an unknown type");
        return;
    }
    if (typeof version === "string" && version !== "") this.state.resourceVersion = version;
    // A successful event shows the server is back: later failures start from the shortest delay.
    this.failures = 0;
  }

  /** Forgets the last error once a list or a watch succeeded, so that health shows only a current one. */
  private clearError(): void {
    if (this.failureKind !== undefined) this.logger.info({ resource: this.spec.name, failures: this.failures }, "reached the API server again");
    this.failureKind = undefined;
    this.state.lastError = undefined;
    this.state.lastErrorTime = undefined;
  }

  private async backOff(error: unknown): Promise<void> {
    this.failures++;
    const status = statusOf(error);
    const message = describeFailure(this.spec, error, status);
    const delay = Math.min(this.options.maxBackoffMs, this.options.minBackoffMs * 2 ** Math.min(this.failures - 1, 20));
    const backedOff = Math.round(delay / 2 + Math.random() * (delay / 2));
    // A Retry-After (with 429 or 503) sets the shortest delay, within the largest one.
    const retryAfterMs = error instanceof KubeApiError && error.retryAfterSeconds !== undefined ? error.retryAfterSeconds * 1000 : 0;
    const jittered = Math.min(this.options.maxBackoffMs, Math.max(backedOff, retryAfterMs));
    // One warning per streak of failures of one kind; the network's error text varies between tries.
    const kind = status === undefined ? "unreachable" : String(status);
    const repeated = this.failureKind === kind;
    this.failureKind = kind;
    this.state.lastError = message;
    this.state.lastErrorTime = new Date().toISOString();
    const fields = { resource: this.spec.name, status, retryInMs: jittered, failures: this.failures, serving: this.state.synced ? "the last state read" : "nothing yet" };
    if (repeated) this.logger.debug(fields, message);
    else this.logger.warn(fields, message);
    await this.sleep(jittered);
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      timer.unref();
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }
}

/** Words a failed list or watch for the log and for health, with what to check. */
function describeFailure(spec: ResourceSpec, error: unknown, status: number | undefined): string {
  const detail = (error as Error)?.message ?? String(error);
  if (status === 401) return `the API server refused the agent's credentials for ${spec.path} (401): ${detail}; check the token or kubeconfig`;
  if (status === 403) return `the agent may not list or watch ${spec.path} (403): ${detail}; grant list and watch on it to the agent's service account`;
  if (status !== undefined) return `listing or watching ${spec.path} failed (${status}): ${detail}; retrying`;
  return `cannot reach the API server for ${spec.path}: ${detail}; retrying`;
}
