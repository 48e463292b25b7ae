// Marks enrolled pods in the Kubernetes API, as istio-cni does: the annotation
// ambient.istio.io/redirection=enabled is on a pod while its capture is in place, and removed when
// the pod leaves ambient mode, for the other Istio components that read it.
//
// The writer is level-triggered: each sync() compares the wanted value with what the API last
// showed and patches the difference, so a failed or lost patch is retried by the next sync.

import type { KubeClient } from "../discovery/kube-client";
import { KubeApiError, statusOf } from "../discovery/kube-client";
import type { Logger } from "../log";
import type { Workload } from "../state/types";

export const REDIRECTION_ANNOTATION = "ambient.istio.io/redirection";
export const REDIRECTION_ENABLED = "enabled";

/**
 * How long a written value is trusted before the pod's object shows it. Past that, another writer
 * may have overwritten it, and the next check compares again and patches.
 */
const WRITTEN_TRUST_MS = 5_000;
/** The maximum trust period, reached when something keeps removing what the agent writes. */
const MAX_WRITTEN_TRUST_MS = 300_000;
/** Patches in flight at once. */
const PATCH_CONCURRENCY = 8;
/** Delay before failed patches are tried again; it doubles per failure in a row, up to the maximum. */
const RETRY_DELAY_MS = 2_000;
const MAX_RETRY_DELAY_MS = 60_000;
/** How often flush() checks whether the queued patches were sent. */
const FLUSH_POLL_MS = 20;

interface PendingPatch {
  namespace: string;
  name: string;
  /** The value to write; undefined removes the annotation. */
  value: string | undefined;
}

export class RedirectionAnnotator {
  /** Patches waiting to be sent, by pod uid; a newer sync replaces a waiting entry. */
  private readonly queue = new Map<string, PendingPatch>();
  /**
   * Values written and not yet seen back in the pod, by uid, so a sync does not patch them twice.
   * `trustMs` doubles each time the same value is written again without ever being seen, so that
   * something that strips the annotation (a webhook) gets fewer and fewer patches.
   */
  private readonly written = new Map<string, { value: string | undefined; at: number; trustMs: number }>();
  /** The last trust period per pod whose written value was never seen, carried into its next write. */
  private readonly unseen = new Map<string, { value: string | undefined; trustMs: number }>();
  private recheckTimer: NodeJS.Timeout | undefined;
  private readonly inFlight = new Set<string>();
  /** Patches that failed, by uid, waiting for the retry timer. */
  private readonly delayed = new Map<string, PendingPatch>();
  private retryTimer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** No patch is sent before this time, after a failure. */
  private pausedUntil = 0;
  private failures = 0;

  /**
   * `current` returns the node's pods and the uids whose capture is in place, for the checks that
   * run without a configuration change.
   */
  constructor(
    private readonly client: KubeClient,
    private readonly logger: Logger,
    private readonly current: () => { podsOnNode: readonly Workload[]; enrolled: ReadonlySet<string> } | undefined = () => undefined,
    private readonly writtenTrustMs = WRITTEN_TRUST_MS,
  ) {}

  /** Brings the annotation of every pod of this node in line with `enrolled` (uids whose capture is in place). */
  sync(podsOnNode: readonly Workload[], enrolled: ReadonlySet<string>): void {
    const present = new Set<string>();
    for (const pod of podsOnNode) {
      present.add(pod.uid);
      const have = pod.annotations?.[REDIRECTION_ANNOTATION];
      const want = enrolled.has(pod.uid) ? REDIRECTION_ENABLED : undefined;
      const written = this.written.get(pod.uid);
      if (written !== undefined && written.value === have) {
        this.written.delete(pod.uid);
        this.unseen.delete(pod.uid);
      } else if (written !== undefined && Date.now() - written.at > written.trustMs) {
        this.written.delete(pod.uid);
        this.unseen.set(pod.uid, { value: written.value, trustMs: written.trustMs });
      }
      if (have === want) {
        this.queue.delete(pod.uid);
        this.delayed.delete(pod.uid);
        this.unseen.delete(pod.uid);
        continue;
      }
      const trusted = this.written.get(pod.uid);
      if (trusted !== undefined && trusted.value === want) continue;
      if (this.delayed.has(pod.uid) && this.delayed.get(pod.uid)!.value === want) continue;
      this.delayed.delete(pod.uid);
      this.queue.set(pod.uid, { namespace: pod.namespace, name: pod.name, value: want });
    }
    for (const uid of [...this.queue.keys()]) if (!present.has(uid)) this.queue.delete(uid);
    for (const uid of [...this.written.keys()]) if (!present.has(uid)) this.written.delete(uid);
    for (const uid of [...this.unseen.keys()]) if (!present.has(uid)) this.unseen.delete(uid);
    for (const uid of [...this.delayed.keys()]) if (!present.has(uid)) this.delayed.delete(uid);
    this.pump();
    this.scheduleRecheck();
  }

  /** Checks again once the written values are no longer trusted, unless a sync comes first. */
  private scheduleRecheck(): void {
    clearTimeout(this.recheckTimer);
    this.recheckTimer = undefined;
    if (this.written.size === 0 || this.stopped) return;
    const soonest = Math.min(...[...this.written.values()].map((written) => written.at + written.trustMs));
    this.recheckTimer = setTimeout(() => {
      this.recheckTimer = undefined;
      const current = this.current();
      if (current !== undefined) this.sync(current.podsOnNode, current.enrolled);
    }, Math.max(0, soonest - Date.now()) + 100);
    this.recheckTimer.unref();
  }

  /** Counts the patches not yet written, for status. */
  pending(): number {
    return this.queue.size + this.inFlight.size + this.delayed.size;
  }

  /**
   * Waits until every queued patch was sent once (written or failed), or `timeoutMs` passed.
   * Returns how many patches were not written, failed ones included.
   */
  async flush(timeoutMs: number): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    while ((this.queue.size > 0 || this.inFlight.size > 0) && Date.now() < deadline && !this.stopped) {
      await new Promise((resolve) => setTimeout(resolve, FLUSH_POLL_MS));
    }
    return this.pending();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.recheckTimer);
  }

  private pump(): void {
    if (this.stopped || Date.now() < this.pausedUntil) return;
    for (const [uid, patch] of this.queue) {
      if (this.inFlight.size >= PATCH_CONCURRENCY) return;
      if (this.inFlight.has(uid)) continue;
      this.queue.delete(uid);
      this.inFlight.add(uid);
      void this.send(uid, patch).finally(() => {
        this.inFlight.delete(uid);
        this.pump();
      });
    }
  }

  private async send(uid: string, patch: PendingPatch): Promise<void> {
    const path = `/api/v1/namespaces/${encodeURIComponent(patch.namespace)}/pods/${encodeURIComponent(patch.name)}/status`;
    try {
      await this.client.request("PATCH", path, {
        body: { metadata: { annotations: { [REDIRECTION_ANNOTATION]: patch.value ?? null } } },
        contentType: "application/merge-patch+json",
      });
      const unseen = this.unseen.get(uid);
      const trustMs = unseen !== undefined && unseen.value === patch.value ? Math.min(unseen.trustMs * 2, MAX_WRITTEN_TRUST_MS) : this.writtenTrustMs;
      this.written.set(uid, { value: patch.value, at: Date.now(), trustMs });
      this.scheduleRecheck();
      this.failures = 0;
      this.logger.debug({ pod: uid, annotation: REDIRECTION_ANNOTATION, value: patch.value ?? null }, "pod annotation written");
    } catch (error) {
      // A pod that is gone needs no annotation.
      if (statusOf(error) === 404) return;
      this.failures++;
      const retryAfterMs = error instanceof KubeApiError && error.retryAfterSeconds !== undefined ? error.retryAfterSeconds * 1000 : 0;
      const delay = Math.min(MAX_RETRY_DELAY_MS, Math.max(retryAfterMs, RETRY_DELAY_MS * 2 ** Math.min(this.failures - 1, 10)));
      const log = this.failures === 1 ? this.logger.warn.bind(this.logger) : this.logger.debug.bind(this.logger);
      log({ pod: uid, err: error, retryInMs: delay }, `cannot write the ${REDIRECTION_ANNOTATION} annotation of pod ${uid}; retrying (add patch on pods/status to the agent's ClusterRole if the API server refused it)`);
      if (!this.queue.has(uid)) this.delayed.set(uid, patch);
      // Patches wait for the timer, so that an unreachable server gets one round of them per delay.
      this.pausedUntil = Math.max(this.pausedUntil, Date.now() + delay);
      clearTimeout(this.retryTimer);
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        for (const [delayedUid, delayedPatch] of this.delayed) if (!this.queue.has(delayedUid)) this.queue.set(delayedUid, delayedPatch);
        this.delayed.clear();
        this.pump();
      }, this.pausedUntil - Date.now());
      this.retryTimer.unref();
    }
  }
}
