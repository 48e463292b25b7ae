// The steps of a hand-over inside the daemon, on both sides. The running agent shares its
// listeners' ports, and after an abort puts its 15006 listeners back in the sk_lookup map. The
// replacement checks that it serves every pod the running agent serves, hands over, and waits for
// the running agent to exit before it takes the node's lock and admin port. A running agent that
// is stopped during the hand-over ends the session instead (an error with `stopping`, then the
// connection closes), and the replacement then takes the node once that agent's locks are free.

import { setTimeout as delay } from "node:timers/promises";

import type { EnrollmentCapture } from "../capture/backend";
import type { EnrollmentReconciler } from "../enroll/reconciler";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import { INBOUND_PLAINTEXT_PORT } from "../proxy/hbone";
import { workloadIpOfFamily } from "../state/ip";
import type { Predecessor } from "./client";
import { handoverBlockers } from "./protocol";
import type { HandoverHandlers } from "./server";

/** How long each request of a hand-over may wait for the running agent's reply. */
export const HANDOVER_REPLY_TIMEOUT_MS = 5_000;
/**
 * How much longer than its drain timeout the running agent may take to exit after the hand-over or
 * a stop signal. The agent's own stop deadline is its drain timeout plus 10 s, after which it
 * releases its locks and exits anyway.
 */
export const EXIT_MARGIN_MS = 15_000;
/** How long the replacement retries binding the admin port that the exited agent held. */
export const ADMIN_RETRY_TIMEOUT_MS = 10_000;
const ADMIN_RETRY_DELAY_MS = 100;
/** How often a replacement tries the locks of an agent that stopped without handing the node over. */
const LOCK_RETRY_DELAY_MS = 100;
/**
 * How long a replacement retries the locks once the agent that handed the node over closed the
 * connection. An agent that stops releases its locks before it exits, but one killed then loses
 * them only as the kernel closes its files, which may come after the connection's close.
 */
const LOCK_RELEASE_TIMEOUT_MS = 2_000;

/** Capture calls that point a pod's inbound capture at a listener. */
type InboundAttachment = Pick<EnrollmentCapture, "attachInbound" | "attachInbound6">;

/** Returns the running agent's side of the hand-over, working on its enrolled workloads. */
export function handoverHandlers(
  reconciler: EnrollmentReconciler,
  capture: InboundAttachment,
  drainTimeoutMs: number,
  release: () => void,
  logger: Logger,
): HandoverHandlers {
  return {
    prepare: () => {
      reconciler.freeze();
      const entries = reconciler.list();
      for (const entry of entries) entry.network.shareListeners();
      return { enrolled: entries.map((entry) => entry.workload.uid), drainTimeoutMs };
    },
    resume: () => {
      reattachInbound(reconciler, capture);
      void reconciler.thaw();
      logger.info("inbound capture points at this agent's listeners again");
    },
    release,
  };
}

/**
 * Points the inbound capture of every workload this agent enrolled at its 15006 listeners. The
 * other agent on the node may have changed it meanwhile: a running agent after its replacement
 * aborted, or a replaced agent that retried a pod it isolated and so guarded it again.
 */
function reattachInbound(reconciler: EnrollmentReconciler, capture: InboundAttachment): void {
  for (const entry of reconciler.list()) {
    const fd = entry.network.listenerFd(INBOUND_PLAINTEXT_PORT, 4);
    if (fd !== undefined) capture.attachInbound(entry.netnsPath, entry.cookie, workloadIpOfFamily(entry.workload, 4) ?? entry.workload.ip, fd);
    const podIp6 = entry.network.podIp6;
    const fd6 = entry.network.listenerFd(INBOUND_PLAINTEXT_PORT, 6);
    if (podIp6 !== undefined && fd6 !== undefined) capture.attachInbound6?.(entry.cookie, podIp6, workloadIpOfFamily(entry.workload, 4), fd6);
  }
}

export interface TakeOverOptions {
  predecessor: Predecessor;
  reconciler: EnrollmentReconciler;
  capture: InboundAttachment;
  /** Workloads that this agent is expected to serve on the node. */
  wanted: string[];
  /** Drain timeout for this agent's own connections if it aborts, in milliseconds. */
  drainTimeoutMs: number;
  /** Takes the node's locks, or throws while another agent holds one of them. */
  takeLocks: () => void;
  /**
   * Lists what of this agent's capture is gone from the node, checked once this agent holds the
   * locks of an agent that stopped during the hand-over: that agent's uninstall removes it.
   */
  missingCapture?: () => string[];
  /** Ends the wait for the locks of an agent that stopped during the hand-over, when this agent's start is aborted. */
  signal?: AbortSignal;
  logger: Logger;
}

/**
 * Finishes a replacement's start once its listeners run next to the running agent's: hands the
 * node over, waits for the running agent to exit and takes the node's locks. When this agent could
 * not start the listeners of a pod that the running agent serves, it aborts instead: the running
 * agent keeps serving, this agent drains its own connections and the returned promise rejects.
 * When the running agent closes the connection before it hands the node over, it was stopped, and
 * this agent takes the node once that agent's locks are free.
 */
export async function takeOver(options: TakeOverOptions): Promise<void> {
  const { predecessor, reconciler, logger } = options;
  const enrolledHere = reconciler.list().map((entry) => entry.workload.uid);
  const blockers = handoverBlockers(predecessor.enrolled, options.wanted, enrolledHere);
  if (blockers.length > 0) {
    logger.error({ workloads: blockers, predecessor: predecessor.pid }, "aborting the hand-over: this agent could not start the listeners of pods the running agent serves");
    const resumed = await predecessor.abort(HANDOVER_REPLY_TIMEOUT_MS).catch((error) => {
      logger.error({ err: error, predecessor: predecessor.pid }, "the running agent failed to confirm the abort");
      return true;
    });
    // The running agent stopped meanwhile: this agent serves what it can, and the reconciler
    // retries the blocked pods, whose capture stays closed until their listeners start.
    if (!resumed) return takeOverFromStopped(options);
    await reconciler.stop(options.drainTimeoutMs);
    throw new AgentError(
      "INTERNAL",
      `replacing the agent (PID ${predecessor.pid}) aborted: this agent could not start the listeners of ${blockers.join(", ")}, which that agent serves; it keeps serving the node. See the warnings above for each pod`,
    );
  }

  if (!(await predecessor.handOver(HANDOVER_REPLY_TIMEOUT_MS))) return takeOverFromStopped(options);
  // Until it released the node, the running agent kept retrying the pods it isolated, and each
  // failed retry guarded the pod again over this agent's capture. A retry already under way when
  // it released the node can still do that, so capture is pointed here again once it exited.
  reattachInbound(reconciler, options.capture);
  logger.info({ predecessor: predecessor.pid, drainTimeoutMs: predecessor.drainTimeoutMs }, "the running agent handed the node over; waiting for it to drain and exit");
  await predecessor.waitExit(predecessor.drainTimeoutMs + EXIT_MARGIN_MS);
  reattachInbound(reconciler, options.capture);
  const exited = `the agent being replaced (PID ${predecessor.pid}) closed the hand-over connection after handing the node over`;
  await takeLocksWhenFree(options.takeLocks, LOCK_RELEASE_TIMEOUT_MS, exited);
}

/**
 * Takes the node from a running agent that ended the hand-over without handing the node over,
 * which happens when it is stopped (SIGTERM) after prepare. Its listeners close as it drains,
 * while this agent's listeners already serve next to them. This agent waits until that agent's
 * locks are free, then points inbound capture at its own listeners. When that agent's stop was
 * an uninstall, it removed the capture that this agent attached, and this agent throws instead:
 * pointing capture here would pin a part of it again.
 */
async function takeOverFromStopped(options: TakeOverOptions): Promise<void> {
  const { predecessor, logger } = options;
  const timeoutMs = predecessor.drainTimeoutMs + EXIT_MARGIN_MS;
  logger.warn(
    { predecessor: predecessor.pid, timeoutMs },
    "the running agent closed the hand-over connection before it handed the node over, so it is stopping; taking the node once its locks are free",
  );
  const stopped = `the agent being replaced (PID ${predecessor.pid}) closed the hand-over connection without handing the node over`;
  await takeLocksWhenFree(options.takeLocks, timeoutMs, stopped, options.signal);
  const missing = options.missingCapture?.() ?? [];
  if (missing.length > 0) {
    throw new AgentError(
      "INTERNAL",
      `the agent being replaced (PID ${predecessor.pid}) removed this node's capture as it stopped, as an uninstall does (${missing.length} gone, such as ${missing[0]}), ` +
        "so this agent does not serve the node. Start it again to attach capture anew",
    );
  }
  reattachInbound(options.reconciler, options.capture);
}

/**
 * Calls takeLocks until it succeeds, while the agent being replaced may still hold the locks: it
 * stopped without handing the node over and may still drain, or it is exiting. After timeoutMs it
 * throws an error that starts with `stopped` (what happened to that agent) and names the lock
 * still taken. Once `signal` aborts, it stops waiting and throws the signal's reason.
 */
export async function takeLocksWhenFree(takeLocks: () => void, timeoutMs: number, stopped: string, signal?: AbortSignal): Promise<void> {
  try {
    await retryUntil(async () => takeLocks(), timeoutMs, LOCK_RETRY_DELAY_MS, signal);
  } catch (error) {
    if (signal?.aborted) throw signal.reason;
    throw new AgentError(
      "INTERNAL",
      `${stopped}, and its locks were still taken after ${timeoutMs / 1000} s: ${(error as Error).message}. Check that agent's log; once it has exited, start this agent again`,
      { cause: error },
    );
  }
}

/**
 * Calls attempt until it resolves, every delayMs. After timeoutMs it rethrows the last error.
 * Once `signal` aborts, it rejects at once, without another attempt.
 */
async function retryUntil(attempt: () => Promise<void>, timeoutMs: number, delayMs: number, signal?: AbortSignal): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    signal?.throwIfAborted();
    try {
      await attempt();
      return;
    } catch (error) {
      if (Date.now() >= deadline) throw error;
    }
    await delay(delayMs, undefined, { signal });
  }
}

/**
 * Calls start until it resolves, for the admin port that an exiting agent may still hold. After
 * timeoutMs it rethrows the last error, named by operation and with the time spent.
 */
export async function retryUntilBound(start: () => Promise<void>, operation: string, timeoutMs = ADMIN_RETRY_TIMEOUT_MS): Promise<void> {
  try {
    await retryUntil(start, timeoutMs, ADMIN_RETRY_DELAY_MS);
  } catch (error) {
    throw new AgentError("INTERNAL", `${operation} failed for ${timeoutMs / 1000} s after the replaced agent exited: ${(error as Error).message}`, { cause: error });
  }
}
