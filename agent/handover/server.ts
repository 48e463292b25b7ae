// The running agent's side of a hand-over: it listens on the node's hand-over socket and serves
// one replacement at a time. See protocol.ts for the messages.

import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { AgentError } from "../errors";
import { listenUnixSocket } from "../unix-socket";
import type { Logger } from "../log";
import { formatHandoverMessage, LineSplitter, parseHandoverMessage, type HandoverMessage } from "./protocol";

/** Callbacks that the running agent runs at each step of a hand-over. The daemon supplies them. */
export interface HandoverHandlers {
  /** Lets a replacement's listeners join this agent's. Returns the enrolled workloads and the drain timeout. */
  prepare(): { enrolled: string[]; drainTimeoutMs: number };
  /**
   * Undoes prepare's effect on inbound capture after an abort, after the replacement disconnected
   * mid-way, or after it stayed prepared past the deadline.
   */
  resume(): void;
  /** Closes the listeners at once and starts the drain and the exit. */
  release(): void;
}

/**
 * "expired": the prepared deadline passed, and the connection is closing. "ended": this agent
 * began to stop, and the connection is closing.
 */
type SessionState = "idle" | "prepared" | "released" | "expired" | "ended";

/** One replacement's connection and the step its hand-over has reached. */
interface Session {
  connection: net.Socket;
  state: SessionState;
  /** Ends the prepared state of a replacement that sends neither handover nor abort in time. */
  deadline?: NodeJS.Timeout;
}

/**
 * How long the running agent stays prepared without a handover or abort request, in milliseconds.
 * Prepared, it enrols and unenrols no pod, so a replacement that stalls must not keep it there.
 */
export const DEFAULT_PREPARED_TIMEOUT_MS = 60_000;
/** The environment variable that sets the prepared deadline in milliseconds, for tests. */
export const PREPARED_TIMEOUT_VARIABLE = "AMBIENT_AGENT_HANDOVER_PREPARED_TIMEOUT_MS";

/**
 * Returns the prepared deadline that the environment sets, DEFAULT_PREPARED_TIMEOUT_MS when it is
 * unset or empty. Throws an AgentError that names the value when it is not a positive integer.
 */
export function preparedTimeoutFromEnvironment(environment: NodeJS.ProcessEnv = process.env): number {
  const text = environment[PREPARED_TIMEOUT_VARIABLE];
  if (text === undefined || text === "") return DEFAULT_PREPARED_TIMEOUT_MS;
  const value = Number(text);
  if (!/^[0-9]+$/.test(text) || !Number.isSafeInteger(value) || value === 0) {
    throw new AgentError("INTERNAL", `invalid ${PREPARED_TIMEOUT_VARIABLE}=${JSON.stringify(text)}: expected a positive number of milliseconds; unset it to use ${DEFAULT_PREPARED_TIMEOUT_MS}`);
  }
  return value;
}

export class HandoverServer {
  /** The session of the replacement being served, while a hand-over runs. */
  #active: Session | undefined;
  /** Every open connection, so that close() can end them. */
  readonly #sessions = new Set<Session>();
  #released = false;
  #closed = false;

  private constructor(
    readonly socketPath: string,
    private readonly server: net.Server,
    private readonly socketInode: number,
    private readonly handlers: HandoverHandlers,
    private readonly preparedTimeoutMs: number,
    private readonly logger: Logger,
  ) {}

  /**
   * Listens on socketPath, replacing a socket file that a stopped agent left. The caller must hold
   * the node's lock, which makes any existing file stale. The file is readable by root only. A
   * replacement that stays prepared for preparedTimeoutMs without handover or abort is dropped,
   * and this agent resumes serving alone.
   */
  static async listen(socketPath: string, handlers: HandoverHandlers, logger: Logger, preparedTimeoutMs = DEFAULT_PREPARED_TIMEOUT_MS): Promise<HandoverServer> {
    fs.mkdirSync(path.dirname(socketPath), { recursive: true });
    fs.rmSync(socketPath, { force: true });
    let self: HandoverServer | undefined;
    const { server, inode } = await listenUnixSocket(socketPath, (connection) => self?.accept(connection), logger, "hand-over socket");
    self = new HandoverServer(socketPath, server, inode, handlers, preparedTimeoutMs, logger);
    logger.debug({ socket: socketPath }, "hand-over socket listening");
    return self;
  }

  /** Whether this agent handed the node over to a replacement (it replied released). */
  get handedOver(): boolean {
    return this.#released;
  }

  /**
   * Ends hand-overs for good, as the agent's stop begins: stops accepting replacements, removes
   * the socket file if it is still this agent's, and ends every session but a released one. Each
   * connected replacement, prepared or not, gets an `error` with `stopping` and its connection
   * closes, so no hand-over completes while this agent drains or removes what an uninstall
   * removes. A replacement that was released stays connected until this process exits, which is
   * how it learns that the node is free. Calls after the first do nothing.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.server.close();
    try {
      if (fs.statSync(this.socketPath).ino === this.socketInode) fs.rmSync(this.socketPath, { force: true });
    } catch {
      // Already gone.
    }
    for (const session of this.#sessions) {
      if (session.state !== "released") this.end(session);
    }
  }

  /**
   * Closes the connection of the replacement that this agent handed the node over to, which then
   * takes the node. Call it once this agent released its locks. An agent that exits closes the
   * connection by exiting; one that stays idle after the hand-over must call this.
   */
  closeReleased(): void {
    if (this.#released) this.#active?.connection.destroy();
  }

  private accept(connection: net.Socket): void {
    const session: Session = { connection, state: "idle" };
    this.#sessions.add(session);
    const splitter = new LineSplitter();
    const reply = (message: HandoverMessage): void => void connection.write(formatHandoverMessage(message));

    connection.on("error", (error) => this.logger.debug({ err: error }, "hand-over connection failed"));
    connection.on("data", (chunk: Buffer) => {
      let lines: string[];
      try {
        lines = splitter.push(chunk);
      } catch (error) {
        reply({ type: "error", message: (error as Error).message });
        connection.destroy();
        return;
      }
      for (const line of lines) this.handle(session, line, reply);
    });
    connection.on("close", () => {
      clearTimeout(session.deadline);
      this.#sessions.delete(session);
      if (this.#active !== session) return;
      this.#active = undefined;
      if (session.state === "prepared") {
        this.logger.warn("the replacement agent disconnected during the hand-over, so this agent keeps serving");
        this.resume();
      }
    });
    // Accepted as close() ran: the listening socket was still open.
    if (this.#closed) this.end(session);
  }

  /** Handles one request and moves the session to its next state. */
  private handle(session: Session, line: string, reply: (message: HandoverMessage) => void): void {
    if (session.state === "expired" || session.state === "ended") return;
    let message: HandoverMessage;
    try {
      message = parseHandoverMessage(line);
    } catch (error) {
      this.logger.warn({ err: error, state: session.state }, "rejected an invalid hand-over message");
      reply({ type: "error", message: (error as Error).message });
      return;
    }

    if (message.type === "prepare" && session.state === "idle") {
      this.prepare(session, message.pid, reply);
      return;
    }
    if (message.type === "handover" && session.state === "prepared") {
      clearTimeout(session.deadline);
      this.#released = true;
      this.logger.info("handing the node over: closing the listeners and draining");
      this.handlers.release();
      reply({ type: "released" });
      session.state = "released";
      return;
    }
    if (message.type === "abort" && session.state === "prepared") {
      clearTimeout(session.deadline);
      this.#active = undefined;
      this.resume();
      reply({ type: "resumed" });
      session.state = "idle";
      return;
    }
    reply({ type: "error", message: `unexpected ${message.type} request while the hand-over is ${session.state}` });
  }

  private prepare(session: Session, pid: number, reply: (message: HandoverMessage) => void): void {
    if (this.#released || this.#active) {
      const reason = this.#released ? "this agent already handed the node over" : "another hand-over is in progress";
      reply({ type: "error", message: `${reason}. Wait until it finishes and try again` });
      return;
    }
    try {
      const { enrolled, drainTimeoutMs } = this.handlers.prepare();
      this.#active = session;
      this.logger.info({ replacement: pid, enrolled: enrolled.length }, "a replacement agent is starting its listeners next to this agent's");
      reply({ type: "prepared", pid: process.pid, enrolled, drainTimeoutMs });
      session.state = "prepared";
      session.deadline = setTimeout(() => this.expire(session, pid), this.preparedTimeoutMs).unref();
    } catch (error) {
      this.logger.error({ err: error, replacement: pid }, "failed to prepare the hand-over");
      this.resume();
      reply({ type: "error", message: `the running agent failed to prepare the hand-over: ${(error as Error).message}` });
    }
  }

  /**
   * Ends a hand-over whose replacement stayed prepared too long: this agent resumes serving alone,
   * sends the replacement an error with the reason and closes the connection.
   */
  private expire(session: Session, pid: number): void {
    if (session.state !== "prepared" || this.#active !== session) return;
    const seconds = this.preparedTimeoutMs / 1000;
    this.logger.warn(
      { replacement: pid, timeoutMs: this.preparedTimeoutMs },
      `the replacement agent sent neither handover nor abort within ${seconds} s of prepare; this agent resumes serving alone and closes the hand-over connection`,
    );
    this.#active = undefined;
    session.state = "expired";
    this.resume();
    const message = `the hand-over timed out: no handover or abort request within ${seconds} s of prepare, so the running agent (PID ${process.pid}) serves the node alone again. Start the replacement again`;
    session.connection.end(formatHandoverMessage({ type: "error", message }), () => session.connection.destroy());
  }

  /**
   * Ends a session because this agent is stopping: sends the replacement an `error` with
   * `stopping` and closes the connection. A prepared replacement's listeners keep serving next
   * to this agent's, and capture is not pointed back here, because this agent's stop closes its
   * listeners anyway.
   */
  private end(session: Session): void {
    clearTimeout(session.deadline);
    if (session.state === "prepared") this.logger.info("ending the prepared hand-over: this agent is stopping and hands the node over to no one");
    session.state = "ended";
    if (this.#active === session) this.#active = undefined;
    const message = `the running agent is stopping (PID ${process.pid}) and hands the node over to no one: take the node once its locks are free`;
    session.connection.end(formatHandoverMessage({ type: "error", message, stopping: true }), () => session.connection.destroy());
  }

  private resume(): void {
    try {
      this.handlers.resume();
    } catch (error) {
      this.logger.error({ err: error }, "failed to restore inbound capture after an aborted hand-over");
    }
  }
}
