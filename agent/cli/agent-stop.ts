// The end of the agent's process: the stop decision and the drain after a signal, a failed start
// or a hand-over, the idle wait after a hand-over, and the SIGHUP handler.

import type { Agent } from "../daemon";
import type { Logger } from "../log";
import type { StopDecision } from "../uninstall";

/** How much longer than the drain timeout the stop may take (audit flush, admin and capture close) before the process exits anyway. */
const STOP_DEADLINE_MS = 10_000;
/** The maximum the uninstall decision adds to the deadline: the wait for the watch's first list and the read, 2 s each, and a margin. */
const DECISION_DEADLINE_MS = 5_000;
/** Period of the timer that keeps an idle agent's process alive. Its callback does nothing. */
const IDLE_TIMER_MS = 3_600_000;

/** The cause of the agent's stop. */
export type StopCause =
  | { kind: "signal"; signal: string }
  | { kind: "signal during start"; signal: string }
  | { kind: "start failed"; message: string }
  | { kind: "hand-over" };

const STOPPING_MESSAGES: Record<StopCause["kind"], string> = {
  signal: "signal received, stopping",
  "signal during start": "stopping after the signal received during start",
  "start failed": "start failed, stopping",
  "hand-over": "node handed over, stopping",
};

/**
 * Stops the agent after `cause`. Returns the exit status and whether a SIGTERM or SIGINT came
 * during the stop. The status is 1 after a failed start, and when the stop failed or outlived its
 * deadline; else 0. Every cause but the hand-over first decides whether the agent is being
 * uninstalled (Agent.stopDecision). That includes a signal during the start, because an uninstall
 * removes the agent's credentials before it signals the agent, which may then still wait for its
 * first list. A second signal resets the open connections at once.
 */
export async function stopAgent(agent: Agent, logger: Logger, drainTimeoutMs: number, cause: StopCause): Promise<{ code: number; signalled: boolean }> {
  let draining = false;
  let cutShort = false;
  const onSecondSignal = (second: string): void => {
    logger.warn({ signal: second }, "signal received while stopping");
    cutShort = true;
    if (draining) agent.abortDrain();
  };
  process.on("SIGTERM", onSecondSignal);
  process.on("SIGINT", onSecondSignal);
  try {
    // A stop that hangs leaves capture in place, which fails closed. Give up after a deadline that
    // starts now, so that it covers the decision too (terminationGracePeriodSeconds must exceed it).
    const drainMs = cause.kind === "start failed" ? 0 : drainTimeoutMs;
    const deadlineMs = DECISION_DEADLINE_MS + drainMs + STOP_DEADLINE_MS;
    const deadline = new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), deadlineMs).unref());
    const decision = cause.kind === "hand-over" ? { uninstall: false, reason: "node handed over to a new agent" } : await agent.stopDecision();
    const signal = "signal" in cause ? cause.signal : undefined;
    logger.info({ signal, drainTimeoutMs: cutShort ? 0 : drainMs, uninstall: decision.uninstall }, STOPPING_MESSAGES[cause.kind]);
    draining = true;
    const stopped = agent.stop(cutShort ? 0 : drainMs, stopReason(cause, decision), decision.uninstall).then(
      () => "stopped" as const,
      (error: unknown) => {
        logger.error({ err: error }, "stopping failed");
        return "failed" as const;
      },
    );
    const outcome = await Promise.race([stopped, deadline]);
    if (outcome === "timeout") {
      logger.error({ deadlineMs }, "stopping took too long; exiting with connections still open");
      agent.releaseLocks();
    }
    const code = outcome === "stopped" && cause.kind !== "start failed" ? 0 : 1;
    return { code, signalled: cutShort };
  } finally {
    process.off("SIGTERM", onSecondSignal);
    process.off("SIGINT", onSecondSignal);
  }
}

/** Returns the reason of the agent.stopped record: the cause, and for an uninstall what decided it. */
function stopReason(cause: StopCause, decision: StopDecision): string {
  switch (cause.kind) {
    case "hand-over":
      return decision.reason;
    case "start failed":
      return decision.uninstall ? `start failed: ${cause.message}; uninstall: ${decision.reason}` : `start failed: ${cause.message}`;
    case "signal":
    case "signal during start": {
      const base = cause.kind === "signal" ? `signal ${cause.signal}` : `signal ${cause.signal} during start`;
      return decision.uninstall ? `${base}: ${decision.reason}` : base;
    }
  }
}

/**
 * Waits, with everything closed, until SIGTERM or SIGINT after a hand-over (--idle-after-handover),
 * then returns `code`. A container runtime would restart an agent that exits, and the restarted
 * agent would take the node back.
 */
export async function idleUntilSignal(logger: Logger, code: number): Promise<number> {
  logger.info("node handed over: idle until SIGTERM or SIGINT");
  // Signal handlers do not keep Node's event loop alive, but this timer does.
  const keepAlive = setInterval(() => undefined, IDLE_TIMER_MS);
  const signal = await new Promise<string>((resolve) => {
    process.once("SIGTERM", () => resolve("SIGTERM"));
    process.once("SIGINT", () => resolve("SIGINT"));
  });
  clearInterval(keepAlive);
  logger.info({ signal }, "signal received while idle after the hand-over, exiting");
  return code;
}

/**
 * Handles SIGHUP for the rest of the process's life, because Node exits on a SIGHUP that nothing
 * handles, and an agent run from a terminal gets one when the terminal closes. While `serving()`
 * is true the agent re-reads its manifests and CA folder. During the start, the stop and the idle
 * wait after a hand-over, the signal is logged at debug level and ignored.
 */
export function handleHangups(agent: Agent, logger: Logger, serving: () => boolean): void {
  process.on("SIGHUP", () => {
    if (!serving()) {
      logger.debug("SIGHUP ignored: the agent re-reads its configuration only while it serves, not while it starts, stops or idles after a hand-over");
      return;
    }
    agent.reload().catch((error: unknown) => logger.error({ err: error }, "manifest reload failed"));
  });
}
