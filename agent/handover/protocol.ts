// The hand-over protocol between a running agent and its replacement for the same node. The
// running agent listens on a unix socket under /run/ambient-agent. In Kubernetes the two agents
// run in different pods, so the socket is on a hostPath volume that both pods mount. Messages are
// JSON objects, one per line:
//
//   replacement -> running      running -> replacement
//   prepare {pid}               prepared {pid, enrolled, drainTimeoutMs}: its listeners now share their ports
//   handover                    released: its listeners are closed; it drains, flushes audit and exits
//   abort                       resumed: its 15006 listeners are back in the sk_lookup map
//                               error {message}: the request was rejected, or the running agent
//                               stayed prepared past its deadline and serves alone again
//                               error {message, stopping: true}: the running agent is stopping,
//                               sent unrequested, after which it closes the connection
//
// Before it sends prepare, the replacement may connect and close without a message, to learn
// whether an agent runs. The replacement takes the node once the running agent's connection
// closes, which happens when that process exits. When the connection closes with no released
// reply, or the running agent replies that it is stopping, the replacement takes the node once
// that agent's locks are free. A running agent that began to stop hands the node over to no one,
// because its stop may be an uninstall, which removes the node's capture.

import path from "node:path";
import { AgentError } from "../errors";
import { LOCK_DIRECTORY } from "../capture/pin-lock";

export type HandoverMessage =
  | { type: "prepare"; pid: number }
  | { type: "prepared"; pid: number; enrolled: string[]; drainTimeoutMs: number }
  | { type: "handover" }
  | { type: "released" }
  | { type: "abort" }
  | { type: "resumed" }
  | { type: "error"; message: string; stopping?: boolean };

/** Maximum length of a message line, which bounds the memory that a peer can make the agent use. */
export const MAX_MESSAGE_BYTES = 1024 * 1024;

/** Returns the hand-over socket of a node: node-<name>.sock next to the node's lock file. */
export function handoverSocketPath(node: string, directory = LOCK_DIRECTORY): string {
  return path.join(directory, `node-${node.replace(/[^A-Za-z0-9._-]/g, "_")}.sock`);
}

/** Formats a message as one line, newline included. */
export function formatHandoverMessage(message: HandoverMessage): string {
  return JSON.stringify(message) + "\n";
}

function invalid(line: string, problem: string): AgentError {
  const excerpt = line.length > 200 ? `${line.slice(0, 200)}...` : line;
  return new AgentError("INTERNAL", `invalid hand-over message ${JSON.stringify(excerpt)}: ${problem}. Check that both agents run the same version.`);
}

function isCount(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value) && value >= 0;
}

/** Parses one message line and checks every field. Throws an AgentError that names the invalid field. */
export function parseHandoverMessage(line: string): HandoverMessage {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    throw invalid(line, "not JSON");
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw invalid(line, "not a JSON object");
  const message = value as Record<string, unknown>;
  switch (message.type) {
    case "prepare":
      if (!isCount(message.pid) || message.pid === 0) throw invalid(line, "pid must be a positive integer");
      return { type: "prepare", pid: message.pid };
    case "prepared":
      if (!isCount(message.pid) || message.pid === 0) throw invalid(line, "pid must be a positive integer");
      if (!Array.isArray(message.enrolled) || !message.enrolled.every((uid) => typeof uid === "string")) {
        throw invalid(line, "enrolled must be a list of workload names");
      }
      if (!isCount(message.drainTimeoutMs)) throw invalid(line, "drainTimeoutMs must be an integer of 0 or more");
      return { type: "prepared", pid: message.pid, enrolled: message.enrolled as string[], drainTimeoutMs: message.drainTimeoutMs };
    case "handover":
    case "released":
    case "abort":
    case "resumed":
      return { type: message.type };
    case "error":
      if (typeof message.message !== "string") throw invalid(line, "message must be a string");
      if (message.stopping !== undefined && typeof message.stopping !== "boolean") throw invalid(line, "stopping must be true or false");
      return message.stopping === true ? { type: "error", message: message.message, stopping: true } : { type: "error", message: message.message };
    default:
      throw invalid(line, `unknown type ${JSON.stringify(message.type)}`);
  }
}

/**
 * Splits a byte stream into message lines. push() returns the complete lines received so far and
 * throws once a line grows past MAX_MESSAGE_BYTES.
 */
export class LineSplitter {
  #buffer = "";

  push(chunk: Buffer | string): string[] {
    this.#buffer += chunk.toString();
    const lines = this.#buffer.split("\n");
    this.#buffer = lines.pop() ?? "";
    if (Buffer.byteLength(this.#buffer) > MAX_MESSAGE_BYTES) {
      throw new AgentError("INTERNAL", `invalid hand-over message: longer than ${MAX_MESSAGE_BYTES} bytes, so the peer is not a compatible agent. Check that both agents run the same version.`);
    }
    return lines.filter((line) => line.trim() !== "");
  }
}

/**
 * Returns the workloads that the running agent serves, that this agent also expects to serve, and
 * whose listeners this agent could not start. Taking over would leave them without listeners, so
 * the replacement aborts instead. A workload that this agent no longer expects to serve (its pod
 * left) does not block.
 */
export function handoverBlockers(
  predecessorEnrolled: readonly string[],
  wantedHere: readonly string[],
  enrolledHere: readonly string[],
): string[] {
  const wanted = new Set(wantedHere);
  const enrolled = new Set(enrolledHere);
  return predecessorEnrolled.filter((uid) => wanted.has(uid) && !enrolled.has(uid)).sort();
}
