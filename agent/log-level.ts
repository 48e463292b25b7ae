// The log levels of the agent, as pino names them, apart from agent/log.ts so that agentctl can
// check a level without loading pino.

export type LogLevel = "fatal" | "error" | "warn" | "info" | "debug" | "trace" | "silent";

/** Every level, most severe first. "silent" turns logging off. */
export const LOG_LEVELS: readonly LogLevel[] = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];
