// The replacement agent's side of a hand-over. It connects to the agent that serves the node and
// requests that this agent first share the node and then give it up. See protocol.ts for the messages.

import net from "node:net";
import { AgentError } from "../errors";
import type { Logger } from "../log";
import { formatHandoverMessage, LineSplitter, parseHandoverMessage, type HandoverMessage } from "./protocol";

type Reply = Exclude<HandoverMessage["type"], "prepare" | "handover" | "abort">;

/** The running agent being replaced, reached through its hand-over socket. */
export class Predecessor {
  readonly #replies: HandoverMessage[] = [];
  readonly #waiters = new Set<() => void>();
  #closed = false;
  /** The reason this agent closed the connection itself, on an invalid reply. */
  #invalidReply: Error | undefined;
  readonly #exited: Promise<void>;
  enrolled: string[] = [];
  drainTimeoutMs = 0;
  pid = 0;

  private constructor(
    readonly socketPath: string,
    private readonly connection: net.Socket,
    private readonly logger: Logger,
  ) {
    const splitter = new LineSplitter();
    connection.on("data", (chunk: Buffer) => {
      try {
        for (const line of splitter.push(chunk)) this.#replies.push(parseHandoverMessage(line));
      } catch (error) {
        this.logger.error({ err: error }, "invalid reply from the running agent");
        this.#invalidReply = error as Error;
        connection.destroy();
      }
      this.#wake();
    });
    connection.on("error", (error) => this.logger.debug({ err: error }, "hand-over connection failed"));
    this.#exited = new Promise((resolve) =>
      connection.once("close", () => {
        this.#closed = true;
        this.#wake();
        resolve();
      }),
    );
  }

  /**
   * Tells whether an agent listens on the hand-over socket, by connecting and closing at once. The
   * running agent changes nothing for a connection that sends no request, so this freezes nothing.
   */
  static async probe(socketPath: string, timeoutMs: number): Promise<boolean> {
    const connection = await connectOrUndefined(socketPath, timeoutMs);
    connection?.destroy();
    return connection !== undefined;
  }

  /**
   * Connects to the hand-over socket and requests that the running agent prepare. Resolves with
   * undefined when no agent listens there (no socket file, or no process accepts), or when the
   * agent closed the connection or replied that it is stopping before it prepared. Throws when
   * the agent rejects the request or does not reply within timeoutMs, and nothing has changed then.
   */
  static async contact(socketPath: string, timeoutMs: number, logger: Logger): Promise<Predecessor | undefined> {
    const connection = await connectOrUndefined(socketPath, timeoutMs);
    if (!connection) return undefined;
    const predecessor = new Predecessor(socketPath, connection, logger);
    const reply = await predecessor.request({ type: "prepare", pid: process.pid }, "prepared", timeoutMs);
    if (reply === undefined) return undefined;
    if (reply.type === "prepared") {
      predecessor.pid = reply.pid;
      predecessor.enrolled = reply.enrolled;
      predecessor.drainTimeoutMs = reply.drainTimeoutMs;
    }
    return predecessor;
  }

  /**
   * Tells the running agent to close its listeners and exit. Resolves with true once it confirms,
   * and with false when it closed the connection or replied that it is stopping: it stops without
   * handing the node over.
   */
  async handOver(timeoutMs: number): Promise<boolean> {
    return (await this.request({ type: "handover" }, "released", timeoutMs)) !== undefined;
  }

  /**
   * Tells the running agent to keep serving alone. Resolves with true once its inbound capture is
   * restored, and with false when it closed the connection or replied that it is stopping.
   */
  async abort(timeoutMs: number): Promise<boolean> {
    try {
      return (await this.request({ type: "abort" }, "resumed", timeoutMs)) !== undefined;
    } finally {
      this.connection.destroy();
    }
  }

  /** Resolves once the running agent's process has exited (its end of the connection closed). */
  async waitExit(timeoutMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new AgentError(
              "INTERNAL",
              `the agent being replaced (PID ${this.pid}) did not exit within ${timeoutMs / 1000} s of the hand-over; ` +
                `its listeners are closed and this agent serves the pods, but the node lock and admin port are still its own. Stop it (kill ${this.pid}) and start this agent again`,
            ),
          ),
        timeoutMs,
      );
    });
    try {
      await Promise.race([this.#exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Closes the connection without a hand-over. The running agent then restores its inbound capture by itself. */
  close(): void {
    this.connection.destroy();
  }

  /**
   * Sends a request and returns the reply, or undefined when the running agent closed the
   * connection, or replied that it is stopping, before it replied to the request.
   */
  private async request(message: HandoverMessage, expected: Reply, timeoutMs: number): Promise<HandoverMessage | undefined> {
    if (!this.#closed) this.connection.write(formatHandoverMessage(message));
    const reply = await this.nextReply(timeoutMs, message.type);
    if (reply === undefined) return undefined;
    if (reply.type === "error" && reply.stopping === true) {
      this.logger.info({ request: message.type, reply: reply.message }, "the running agent is stopping, so it hands the node over to no one");
      this.connection.destroy();
      return undefined;
    }
    if (reply.type === "error") {
      this.connection.destroy();
      throw new AgentError("INTERNAL", `the running agent rejected the ${message.type} request on ${this.socketPath}: ${reply.message}`);
    }
    if (reply.type !== expected) {
      this.connection.destroy();
      throw new AgentError("INTERNAL", `the running agent replied to the ${message.type} request on ${this.socketPath} with ${reply.type}, expected ${expected}. Check that both agents run the same version`);
    }
    return reply;
  }

  /** Resolves with the next reply, or with undefined once the connection closed with no reply left to read. */
  private nextReply(timeoutMs: number, request: string): Promise<HandoverMessage | undefined> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        finish();
        this.connection.destroy();
        reject(
          new AgentError(
            "INTERNAL",
            `the running agent did not reply to the ${request} request on ${this.socketPath} within ${timeoutMs / 1000} s; it keeps serving the node. Check its log, or stop it and start this agent without --replace`,
          ),
        );
      }, timeoutMs);
      const check = (): void => {
        const reply = this.#replies.shift();
        if (reply) {
          finish();
          resolve(reply);
        } else if (this.#invalidReply) {
          finish();
          reject(this.#invalidReply);
        } else if (this.#closed) {
          finish();
          resolve(undefined);
        }
      };
      const finish = (): void => {
        clearTimeout(timer);
        this.#waiters.delete(check);
      };
      this.#waiters.add(check);
      check();
    });
  }

  #wake(): void {
    for (const waiter of [...this.#waiters]) waiter();
  }
}

/** Connects to a unix socket. Resolves with undefined when the file is missing or no process listens. */
function connectOrUndefined(socketPath: string, timeoutMs: number): Promise<net.Socket | undefined> {
  return new Promise((resolve, reject) => {
    const connection = net.createConnection(socketPath);
    const timer = setTimeout(() => {
      connection.destroy();
      reject(new AgentError("INTERNAL", `connecting to the hand-over socket ${socketPath} timed out after ${timeoutMs / 1000} s. Check the running agent's log`));
    }, timeoutMs);
    connection.once("connect", () => {
      clearTimeout(timer);
      resolve(connection);
    });
    connection.once("error", (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (error.code === "ENOENT" || error.code === "ECONNREFUSED") resolve(undefined);
      else reject(new AgentError("INTERNAL", `connecting to the hand-over socket ${socketPath} failed: ${error.message}`, { cause: error }));
    });
  });
}
