import pino from "pino";

export type Logger = pino.Logger;

/** Creates the process logger: JSON lines on stderr, level from AMBIENT_AGENT_LOG_LEVEL (default info). */
export function createLogger(bindings: Record<string, unknown> = {}): Logger {
  const level = process.env.AMBIENT_AGENT_LOG_LEVEL ?? "info";
  return pino({ level, base: { pid: process.pid, ...bindings } }, pino.destination(2));
}

/** Creates a logger that discards everything, for unit tests. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
