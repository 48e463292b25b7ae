import pino from "pino";

export type Logger = pino.Logger;

/** Bytes of log lines collected before one write(2) to stderr. */
const LOG_BATCH_BYTES = 4096;
/** A line waits at most this long in the batch when fewer than LOG_BATCH_BYTES are logged. */
const LOG_FLUSH_INTERVAL_MS = 100;

/**
 * Creates the process logger: JSON lines on stderr, level from AMBIENT_AGENT_LOG_LEVEL (default info).
 * Lines are collected and written with one synchronous write(2) per LOG_BATCH_BYTES, or every
 * LOG_FLUSH_INTERVAL_MS, so a busy proxy makes no write(2) per connection. The batch is also written
 * on fatal() and when the process exits; a SIGKILL loses what is still collected. The audit file,
 * not this log, is the record of each connection. Synchronous writes cost less than handing each
 * batch to libuv's thread pool, and keep the lines in order with what the process prints on exit.
 */
export function createLogger(bindings: Record<string, unknown> = {}): Logger {
  const level = process.env.AMBIENT_AGENT_LOG_LEVEL ?? "info";
  const destination = pino.destination({ dest: 2, sync: true, minLength: LOG_BATCH_BYTES, periodicFlush: LOG_FLUSH_INTERVAL_MS });
  // Pino registers an exit flush only for asynchronous destinations.
  process.once("exit", () => flushOnExit(destination));
  return pino({ level, base: { pid: process.pid, ...bindings } }, destination);
}

function flushOnExit(destination: ReturnType<typeof pino.destination>): void {
  try {
    destination.flushSync();
  } catch {
    // stderr is closed or full: nothing is left to report the loss to.
  }
}

/** Creates a logger that discards everything, for unit tests. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
