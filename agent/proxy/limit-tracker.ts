// The counters behind the connection limits (limits.ts): open connections per pod and direction,
// per remote IP and listener, open CONNECT streams per peer identity, and the node-wide bytes the
// proxies buffer. One tracker per agent, shared by the proxies of every pod.
//
// Use: a listener calls an acquire method when it accepts a connection or stream. Undefined means
// the limit is reached: the listener refuses (RefusalLog.refuse) and keeps nothing. Otherwise it
// keeps the returned release function and calls it once when the connection or stream ends. A
// second call does nothing. A 15008 CONNECT stream takes its pod's "inbound" slot, as a 15006
// connection does, so the two share maxConnectionsPerPod:
//
//   const release = tracker.acquire(pod.uid, "inbound");
//   if (release === undefined) { refusals.refuse({ ..., reason: "connections_per_pod", limit: tracker.limits.maxConnectionsPerPod }); return; }
//   try { ... } finally { release(); }
//
// Counters are removed at zero, so the maps contain only keys with something open.

import type { Logger } from "../log";
import type { Direction } from "../state/types";
import { BufferedBytes } from "./buffered-bytes";
import type { CopyLimits } from "./copy";
import { DEFAULT_LIMITS, type ProxyLimits } from "./limits";
import { RefusalLog } from "./refusal-log";

/** Ends what an acquire method counted. A second call does nothing. */
export type Release = () => void;

/** A listener that limits connections per remote IP. */
export type PeerListener = "inbound" | "inbound_plaintext";

/** Counts what the limits bound. The agent has one. */
export class LimitTracker {
  readonly limits: Readonly<ProxyLimits>;
  readonly buffered: BufferedBytes;
  /** Open connections per "pod uid, direction". */
  readonly #pods = new Map<string, number>();
  /** Open TCP connections per "pod uid, listener, remote IP". */
  readonly #peers = new Map<string, number>();
  /** Open CONNECT streams per "pod uid, peer SPIFFE id". */
  readonly #peerStreams = new Map<string, number>();

  constructor(limits: Readonly<ProxyLimits> = DEFAULT_LIMITS) {
    this.limits = limits;
    this.buffered = new BufferedBytes(limits.maxBufferedBytes);
  }

  /**
   * Counts a proxied connection of a pod: as the source ("outbound", 15001) or as the destination
   * ("inbound", 15006 connections and 15008 streams together). Returns undefined when the pod has
   * maxConnectionsPerPod open in that direction.
   */
  acquire(podUid: string, direction: Direction): Release | undefined {
    return take(this.#pods, `${podUid} ${direction}`, this.limits.maxConnectionsPerPod);
  }

  /**
   * Counts a TCP connection from `peerIp` to a pod's 15008 ("inbound") or 15006
   * ("inbound_plaintext"). Returns undefined when maxConnectionsPerPeer are open.
   */
  acquirePeer(podUid: string, listener: PeerListener, peerIp: string): Release | undefined {
    return take(this.#peers, `${podUid} ${listener} ${peerIp}`, this.limits.maxConnectionsPerPeer);
  }

  /**
   * Counts a CONNECT stream from the peer identity `peerIdentity` (SPIFFE id) to a pod, over all
   * its connections. Returns undefined when maxStreamsPerPeer are open.
   */
  acquirePeerStream(podUid: string, peerIdentity: string): Release | undefined {
    return take(this.#peerStreams, `${podUid} ${peerIdentity}`, this.limits.maxStreamsPerPeer);
  }

  /** Returns the open connections of a pod in a direction, for diagnostics and tests. */
  podCount(podUid: string, direction: Direction): number {
    return this.#pods.get(`${podUid} ${direction}`) ?? 0;
  }

  /** Returns the number of keys in all three maps, which tests check for leaks. */
  keyCount(): number {
    return this.#pods.size + this.#peers.size + this.#peerStreams.size;
  }
}

/** Adds one to `key` unless it is at `limit`, and returns the release function. */
function take(counts: Map<string, number>, key: string, limit: number): Release | undefined {
  const count = counts.get(key) ?? 0;
  if (count >= limit) return undefined;
  counts.set(key, count + 1);
  let released = false;
  return () => {
    if (released) return;
    released = true;
    const left = (counts.get(key) ?? 1) - 1;
    if (left <= 0) counts.delete(key);
    else counts.set(key, left);
  };
}

/** The limit options that every proxy takes. Each is optional, so tests of one module may omit them. */
export interface ProxyLimitOptions {
  /** The agent's limits, or DEFAULT_LIMITS when absent. */
  limits?: Readonly<ProxyLimits>;
  /** The agent's counters, shared by the proxies of every pod, or a tracker of this proxy alone when absent. */
  limitTracker?: LimitTracker;
  /** The agent's refusal log. When absent, refusals are only logged. */
  refusals?: RefusalLog;
}

/** Returns the tracker and refusal log a proxy uses, filling in what the options leave out. */
export function resolveLimitOptions(options: ProxyLimitOptions, node: string, logger: Logger): { tracker: LimitTracker; refusals: RefusalLog } {
  return {
    tracker: options.limitTracker ?? new LimitTracker(options.limits ?? DEFAULT_LIMITS),
    refusals: options.refusals ?? new RefusalLog({ node, audit: { write: () => {} }, logger }),
  };
}

/**
 * Returns the refusal of a new connection while the node's proxies buffer more than
 * maxBufferedBytes, for RefusalLog.refuse, or undefined while they buffer less.
 */
export function bufferedBytesRefusal(tracker: LimitTracker, node: string): { reason: "buffered_bytes"; message: string; limit: number } | undefined {
  if (!tracker.buffered.exceeded) return undefined;
  const limit = tracker.limits.maxBufferedBytes;
  const message = `the proxies of node ${node} buffer ${tracker.buffered.bytes} bytes read and not yet written, more than the limit of ${limit} (--max-buffered-bytes)`;
  return { reason: "buffered_bytes", message, limit };
}

/** Returns the limits a proxy's copy enforces: the idle timeout and the node-wide buffered bytes. */
export function copyLimitsOf(tracker: LimitTracker): CopyLimits {
  return { idleTimeoutMs: tracker.limits.idleTimeoutMs, buffered: tracker.buffered };
}
