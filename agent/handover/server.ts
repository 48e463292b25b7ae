// The running agent's side of a hand-over: it listens on the node's hand-over socket and serves
// one replacement at a time. See protocol.ts for the messages.

import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { listenUnixSocket } from "../unix-socket";
import type { Logger } from "../log";
import { formatHandoverMessage, LineSplitter, parseHandoverMessage, type HandoverMessage } from "./protocol";

/** Callbacks that the running agent runs at each step of a hand-over. The daemon supplies them. */
export interface HandoverHandlers {
  /** Lets a replacement's listeners join this agent's. Returns the enrolled workloads and the drain timeout. */
  prepare(): { enrolled: string[]; drainTimeoutMs: number };
  /** Undoes prepare's effect on inbound capture after an abort, or after the replacement disconnected mid-way. */
  resume(): void;
  /** Closes the listeners at once and starts the drain and the exit. */
  release(): void;
}

type SessionState = "idle" | "prepared" | "released";

export class HandoverServer {
  /** The connection of the replacement being served, while a hand-over runs. */
  #active: net.Socket | undefined;
  #released = false;

  private constructor(
    readonly socketPath: string,
    private readonly server: net.Server,
    private readonly socketInode: number,
    private readonly handlers: HandoverHandlers,
    private readonly logger: Logger,
  ) {}

  /**
   * Listens on socketPath, replacing a socket file that a stopped agent left. The caller must hold
   * the node's lock, which makes any existing file stale. The file is readable by root only.
   */
  static async listen(socketPath: string, handlers: HandoverHandlers, logger: Logger): Promise<HandoverServer> {
    fs.mkdirSync(path.dirname(socketPath), { recursive: true });
    fs.rmSync(socketPath, { force: true });
    let self: HandoverServer | undefined;
    const { server, inode } = await listenUnixSocket(socketPath, (connection) => self?.accept(connection), logger, "hand-over socket");
    self = new HandoverServer(socketPath, server, inode, handlers, logger);
    logger.debug({ socket: socketPath }, "hand-over socket listening");
    return self;
  }

  /**
   * Stops accepting replacements and removes the socket file if it is still this agent's. A
   * replacement that was released stays connected until this process exits, which is how it
   * learns that the node is free.
   */
  close(): void {
    this.server.close();
    try {
      if (fs.statSync(this.socketPath).ino === this.socketInode) fs.rmSync(this.socketPath, { force: true });
    } catch {
      // Already gone.
    }
  }

  /**
   * Closes the connection of the replacement that this agent handed the node over to, which then
   * takes the node. Call it once this agent released its locks. An agent that exits closes the
   * connection by exiting; one that stays idle after the hand-over must call this.
   */
  closeReleased(): void {
    if (this.#released) this.#active?.destroy();
  }

  private accept(connection: net.Socket): void {
    let state: SessionState = "idle";
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
      for (const line of lines) state = this.handle(connection, state, line, reply);
    });
    connection.on("close", () => {
      if (this.#active !== connection) return;
      this.#active = undefined;
      if (state === "prepared") {
        this.logger.warn("the replacement agent disconnected during the hand-over, so this agent keeps serving");
        this.resume();
      }
    });
  }

  /** Handles one request and returns the session's next state. */
  private handle(connection: net.Socket, state: SessionState, line: string, reply: (message: HandoverMessage) => void): SessionState {
    let message: HandoverMessage;
    try {
      message = parseHandoverMessage(line);
    } catch (error) {
      this.logger.warn({ err: error, state }, "rejected an invalid hand-over message");
      reply({ type: "error", message: (error as Error).message });
      return state;
    }

    if (message.type === "prepare" && state === "idle") return this.prepare(connection, message.pid, reply);
    if (message.type === "handover" && state === "prepared") {
      this.#released = true;
      this.logger.info("handing the node over: closing the listeners and draining");
      this.handlers.release();
      reply({ type: "released" });
      return "released";
    }
    if (message.type === "abort" && state === "prepared") {
      this.#active = undefined;
      this.resume();
      reply({ type: "resumed" });
      return "idle";
    }
    reply({ type: "error", message: `unexpected ${message.type} request while the hand-over is ${state}` });
    return state;
  }

  private prepare(connection: net.Socket, pid: number, reply: (message: HandoverMessage) => void): SessionState {
    if (this.#released || this.#active) {
      const reason = this.#released ? "this agent already handed the node over" : "another hand-over is in progress";
      reply({ type: "error", message: `${reason}. Wait until it finishes and try again` });
      return "idle";
    }
    try {
      const { enrolled, drainTimeoutMs } = this.handlers.prepare();
      this.#active = connection;
      this.logger.info({ replacement: pid, enrolled: enrolled.length }, "a replacement agent is starting its listeners next to this agent's");
      reply({ type: "prepared", pid: process.pid, enrolled, drainTimeoutMs });
      return "prepared";
    } catch (error) {
      this.logger.error({ err: error, replacement: pid }, "failed to prepare the hand-over");
      this.resume();
      reply({ type: "error", message: `the running agent failed to prepare the hand-over: ${(error as Error).message}` });
      return "idle";
    }
  }

  private resume(): void {
    try {
      this.handlers.resume();
    } catch (error) {
      this.logger.error({ err: error }, "failed to restore inbound capture after an aborted hand-over");
    }
  }
}
