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
   * Connects to the hand-over socket and requests that the running agent prepare. Resolves with
   * undefined when no agent listens there (no socket file, or no process accepts). Throws when the
   * agent rejects the request or does not reply within timeoutMs, and nothing has changed then.
   */
  static async contact(socketPath: string, timeoutMs: number, logger: Logger): Promise<Predecessor | undefined> {
    const connection = await connectOrUndefined(socketPath, timeoutMs);
    if (!connection) return undefined;
    const predecessor = new Predecessor(socketPath, connection, logger);
    const reply = await predecessor.request({ type: "prepare", pid: process.pid }, "prepared", timeoutMs);
    if (reply.type === "prepared") {
      predecessor.pid = reply.pid;
      predecessor.enrolled = reply.enrolled;
      predecessor.drainTimeoutMs = reply.drainTimeoutMs;
    }
    return predecessor;
  }

  /** Tells the running agent to close its listeners and exit. Resolves once it confirms. */
  async handOver(timeoutMs: number): Promise<void> {
    await this.request({ type: "handover" }, "released", timeoutMs);
  }

  /** Tells the running agent to keep serving alone. Resolves once its inbound capture is restored. */
  async abort(timeoutMs: number): Promise<void> {
    try {
      await this.request({ type: "abort" }, "resumed", timeoutMs);
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

  private async request(message: HandoverMessage, expected: Reply, timeoutMs: number): Promise<HandoverMessage> {
    this.connection.write(formatHandoverMessage(message));
    const reply = await this.nextReply(timeoutMs, message.type);
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

  private nextReply(timeoutMs: number, request: string): Promise<HandoverMessage> {
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
        } else if (this.#closed) {
          finish();
          reject(new AgentError("INTERNAL", `the running agent closed the hand-over connection on ${this.socketPath} before it replied to the ${request} request. Check its log`));
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
