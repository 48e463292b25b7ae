// Watch streams of the fake Kubernetes API server: one JSON event per line over a chunked 200
// response, as the real API server sends them. Selectors apply to transitions: an object that
// stops matching arrives as DELETED, one that starts matching as ADDED.

import type http from "node:http";
import { apiVersionOf, tooOldStatus, type ResourceType } from "./fake-kube-resources";
import type { KubeObject, Selector } from "./fake-kube-selectors";
import { ExpiredError, type Change, type KubeStore } from "./fake-kube-store";

export type WatchEventType = "ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK" | "ERROR";

export interface WatchRequest {
  type: ResourceType;
  /** Only objects of this namespace; undefined watches every namespace. */
  namespace?: string;
  selector: Selector;
  /** The resourceVersion query value: undefined or "0" sends the current objects first. */
  resourceVersion?: string;
  allowBookmarks: boolean;
  /** sendInitialEvents=true: the current objects, then a BOOKMARK marked "k8s.io/initial-events-end". */
  sendInitialEvents: boolean;
  bookmarkIntervalMs: number;
  /** timeoutSeconds; the stream ends after it. */
  timeoutSeconds?: number;
}

/** The annotation of the BOOKMARK that ends the initial events of a sendInitialEvents watch. */
const INITIAL_EVENTS_END = "k8s.io/initial-events-end";

/** One open watch stream. */
export class WatchStream {
  readonly #request: WatchRequest;
  readonly #response: http.ServerResponse;
  readonly #store: KubeStore;
  readonly #timers: NodeJS.Timeout[] = [];
  #removeListener: () => void = () => undefined;
  #closed = false;
  readonly #onEnd: (stream: WatchStream) => void;

  constructor(store: KubeStore, request: WatchRequest, response: http.ServerResponse, onEnd: (stream: WatchStream) => void) {
    this.#store = store;
    this.#request = request;
    this.#response = response;
    this.#onEnd = onEnd;
  }

  /**
   * Sends the response head and the starting events, then follows the store. Everything up to
   * the registration runs synchronously, so no write falls between the replay and the live events.
   */
  start(): void {
    this.#response.on("close", () => this.end());
    this.#response.writeHead(200, { "Content-Type": "application/json", "Cache-Control": "no-cache, private" });
    this.#response.flushHeaders();

    if (!this.#sendStartingEvents()) return;
    this.#removeListener = this.#store.onChange((change) => this.#forward(change));
    this.#scheduleTimers();
  }

  /** Returns false when the stream ended with an ERROR event because the resourceVersion is too old. */
  #sendStartingEvents(): boolean {
    const requested = this.#request.resourceVersion;
    if (requested === undefined || requested === "" || requested === "0" || this.#request.sendInitialEvents) {
      this.#sendCurrentObjects();
      if (this.#request.sendInitialEvents && this.#request.allowBookmarks) this.#sendBookmark(true);
      return true;
    }
    try {
      for (const change of this.#store.changesAfter(Number(requested))) this.#forward(change);
      return true;
    } catch (error) {
      if (!(error instanceof ExpiredError)) throw error;
      this.#send("ERROR", tooOldStatus(error.requested, error.oldest));
      this.end();
      return false;
    }
  }

  #sendCurrentObjects(): void {
    for (const [, object] of this.#store.snapshot(this.#request.type.name, this.#store.resourceVersion)) {
      if (this.#inScope(object) && this.#request.selector.matches(object)) this.#send("ADDED", object);
    }
  }

  #inScope(object: KubeObject): boolean {
    return this.#request.namespace === undefined || object.metadata?.namespace === this.#request.namespace;
  }

  /** Sends one change translated through the selector: MODIFIED, or ADDED and DELETED when the match changes. */
  #forward(change: Change): void {
    if (this.#closed || change.resource !== this.#request.type.name || !this.#inScope(change.object)) return;
    const matchedBefore = change.previous !== undefined && this.#request.selector.matches(change.previous);
    const matchesNow = change.type !== "DELETED" && this.#request.selector.matches(change.object);

    if (matchesNow) {
      this.#send(matchedBefore ? "MODIFIED" : "ADDED", change.object);
    } else if (matchedBefore) {
      // The watcher last saw the object in its previous state, so that state goes out, stamped with this change's version.
      const last = change.type === "DELETED" ? change.object : withResourceVersion(change.previous!, change.resourceVersion);
      this.#send("DELETED", last);
    }
  }

  #scheduleTimers(): void {
    if (this.#request.allowBookmarks && this.#request.bookmarkIntervalMs > 0) {
      this.#timers.push(setInterval(() => this.#sendBookmark(false), this.#request.bookmarkIntervalMs));
    }
    if (this.#request.timeoutSeconds !== undefined && this.#request.timeoutSeconds > 0) {
      this.#timers.push(setTimeout(() => this.end(), this.#request.timeoutSeconds * 1000));
    }
  }

  #sendBookmark(initialEventsEnd: boolean): void {
    const type = this.#request.type;
    const metadata: Record<string, unknown> = { resourceVersion: String(this.#store.resourceVersion) };
    if (initialEventsEnd) metadata.annotations = { [INITIAL_EVENTS_END]: "true" };
    this.#send("BOOKMARK", { kind: type.kind, apiVersion: apiVersionOf(type), metadata });
  }

  #send(type: WatchEventType, object: unknown): void {
    if (this.#closed) return;
    this.#response.write(JSON.stringify({ type, object }) + "\n");
  }

  /** Ends the stream cleanly, as the API server does at the watch timeout or when it shuts down. */
  end(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#removeListener();
    for (const timer of this.#timers) clearTimeout(timer);
    const reset = this.#response.destroyed || this.#response.socket?.destroyed === true;
    if (!this.#response.writableEnded && !reset) this.#response.end();
    this.#onEnd(this);
  }
}

function withResourceVersion(object: KubeObject, resourceVersion: number): KubeObject {
  return { ...object, metadata: { ...object.metadata, resourceVersion: String(resourceVersion) } };
}
