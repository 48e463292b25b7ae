// The protocol between the chained CNI plugin (native/cni/ambient-agent-cni.c) and the agent.
// The plugin opens one unix socket connection per ADD or DEL and sends:
//
//   CNI_COMMAND=ADD\n  CNI_CONTAINERID=...\n  (one KEY=VALUE line per CNI_* variable that is set)
//   CONFIG_LENGTH=<bytes>\n  \n  <the network configuration, as the runtime wrote it to stdin>
//
// The agent replies with its exit status in decimal, a newline, and the bytes the plugin prints
// on stdout, then closes the connection.

import net from "node:net";
import path from "node:path";
import { AgentError } from "../errors";

/** Maximum size of the network configuration. The plugin applies the same limit to its stdin. */
export const MAX_CONFIG_BYTES = 1024 * 1024;
/** Maximum size of the KEY=VALUE lines before the configuration. */
export const MAX_HEADER_BYTES = 64 * 1024;
/** Linux limit on interface names (IFNAMSIZ - 1). */
const MAX_IFNAME_BYTES = 15;

/** Error codes of the CNI specification 1.0 that the agent's replies use. Codes from 100 up are this plugin's own. */
export const CNI_ERROR_CODES = {
  INCOMPATIBLE_VERSION: 1,
  INVALID_ENVIRONMENT: 4,
  IO_FAILURE: 5,
  DECODE_FAILED: 6,
  INVALID_CONFIG: 7,
  TRY_AGAIN_LATER: 11,
  /** The agent's handler failed, so capture is not in place. */
  CAPTURE_FAILED: 100,
} as const;

export type CniCommand = "ADD" | "DEL";

/** One request as the plugin sent it, with every field checked. */
export interface CniRequest {
  command: CniCommand;
  containerId: string;
  /** Absolute path of the pod's network namespace, or empty on a DEL whose runtime no longer has one. */
  netns: string;
  ifName: string;
  /** CNI_ARGS split into its KEY=VALUE pairs. */
  args: ReadonlyMap<string, string>;
  /** The network configuration, decoded. */
  config: Record<string, unknown>;
}

/** A pod's sandbox being added to or removed from the node, as the agent's handler receives it. */
export interface CniPodEvent {
  command: CniCommand;
  containerId: string;
  netns: string;
  ifName: string;
  podNamespace?: string;
  podName?: string;
  podUid?: string;
  /** Addresses of prevResult.ips[] without their prefix length. */
  ips: string[];
  cniVersion: string;
}

/** A request that the agent rejects, with the CNI error code that the reply carries. */
export class InvalidCniRequestError extends AgentError {
  constructor(
    readonly cniCode: number,
    message: string,
  ) {
    super("INVALID_CNI_REQUEST", message);
  }
}

const HEADER_KEYS = new Set(["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH", "CONFIG_LENGTH"]);
const HEADER_END = Buffer.from("\n\n");

/** Collects the bytes of one request from a connection and parses it once it is complete. */
export class CniRequestReader {
  #buffer = Buffer.alloc(0);
  #header: Map<string, string> | undefined;
  #configLength = 0;
  #headerLength = 0;

  /** Adds bytes and returns the request once all its bytes arrived. Throws InvalidCniRequestError on invalid or oversized input. */
  push(chunk: Buffer): CniRequest | undefined {
    this.#buffer = Buffer.concat([this.#buffer, chunk]);
    if (!this.#header) this.readHeader();
    if (!this.#header) return undefined;

    const received = this.#buffer.length - this.#headerLength;
    if (received > this.#configLength) {
      throw invalidEnvironment(`the request has ${received - this.#configLength} bytes after the configuration's CONFIG_LENGTH=${this.#configLength}`);
    }
    if (received < this.#configLength) return undefined;
    return parseCniRequest(this.#header, this.#buffer.subarray(this.#headerLength));
  }

  private readHeader(): void {
    const end = this.#buffer.indexOf(HEADER_END);
    if (end < 0) {
      if (this.#buffer.length > MAX_HEADER_BYTES) throw invalidEnvironment(`the request's variables exceed ${MAX_HEADER_BYTES} bytes`);
      return;
    }
    if (end > MAX_HEADER_BYTES) throw invalidEnvironment(`the request's variables exceed ${MAX_HEADER_BYTES} bytes`);
    this.#header = parseHeader(this.#buffer.subarray(0, end).toString("utf8"));
    this.#headerLength = end + HEADER_END.length;
    this.#configLength = parseConfigLength(this.#header.get("CONFIG_LENGTH"));
  }
}

function invalidEnvironment(problem: string): InvalidCniRequestError {
  return new InvalidCniRequestError(CNI_ERROR_CODES.INVALID_ENVIRONMENT, `invalid CNI request: ${problem}. Check that the plugin binary matches the agent's version`);
}

function invalidConfig(problem: string): InvalidCniRequestError {
  return new InvalidCniRequestError(CNI_ERROR_CODES.INVALID_CONFIG, `invalid network configuration: ${problem}`);
}

/** Splits KEY=VALUE lines and rejects unknown and repeated keys. */
export function parseHeader(text: string): Map<string, string> {
  const header = new Map<string, string>();
  for (const line of text.split("\n")) {
    const equals = line.indexOf("=");
    if (equals <= 0) throw invalidEnvironment(`line ${JSON.stringify(line.slice(0, 80))} is not KEY=VALUE`);
    const key = line.slice(0, equals);
    if (!HEADER_KEYS.has(key)) throw invalidEnvironment(`unknown variable ${JSON.stringify(key.slice(0, 80))}`);
    if (header.has(key)) throw invalidEnvironment(`${key} appears twice`);
    header.set(key, line.slice(equals + 1));
  }
  return header;
}

function parseConfigLength(value: string | undefined): number {
  if (value === undefined) throw invalidEnvironment("CONFIG_LENGTH is missing");
  if (!/^\d{1,8}$/.test(value) || Number(value) > MAX_CONFIG_BYTES) {
    throw invalidEnvironment(`CONFIG_LENGTH ${JSON.stringify(value.slice(0, 80))} is not a byte count of at most ${MAX_CONFIG_BYTES}`);
  }
  return Number(value);
}

/** Checks the variables and decodes the configuration of a complete request. */
export function parseCniRequest(header: ReadonlyMap<string, string>, configBytes: Buffer): CniRequest {
  const command = header.get("CNI_COMMAND");
  if (command !== "ADD" && command !== "DEL") {
    throw invalidEnvironment(`CNI_COMMAND ${JSON.stringify(command ?? "")} is not ADD or DEL`);
  }
  const containerId = header.get("CNI_CONTAINERID") ?? "";
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(containerId)) {
    throw invalidEnvironment(`CNI_CONTAINERID ${JSON.stringify(containerId.slice(0, 80))} is missing or has characters other than letters, digits, _ . -`);
  }
  const netns = checkNetns(command, header.get("CNI_NETNS") ?? "");
  const ifName = checkIfName(command, header.get("CNI_IFNAME") ?? "");
  return { command, containerId, netns, ifName, args: parseCniArgs(header.get("CNI_ARGS") ?? ""), config: decodeConfig(configBytes) };
}

function checkNetns(command: CniCommand, netns: string): string {
  if (netns === "" && command === "DEL") return netns;
  if (!path.isAbsolute(netns) || netns.includes("\0") || path.normalize(netns) !== netns) {
    throw invalidEnvironment(`CNI_NETNS ${JSON.stringify(netns.slice(0, 200))} is not a normalized absolute path`);
  }
  return netns;
}

function checkIfName(command: CniCommand, ifName: string): string {
  if (ifName === "" && command === "DEL") return ifName;
  if (ifName === "" || Buffer.byteLength(ifName) > MAX_IFNAME_BYTES || ifName === "." || ifName === ".." || /[\s/:\0]/.test(ifName)) {
    throw invalidEnvironment(`CNI_IFNAME ${JSON.stringify(ifName.slice(0, 80))} is not a valid interface name`);
  }
  return ifName;
}

/** Splits CNI_ARGS ("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b") into its pairs. The first pair of a key wins, as in the plugin. */
export function parseCniArgs(text: string): Map<string, string> {
  const args = new Map<string, string>();
  for (const pair of text.split(";")) {
    if (pair === "") continue;
    const equals = pair.indexOf("=");
    if (equals <= 0) throw invalidEnvironment(`CNI_ARGS entry ${JSON.stringify(pair.slice(0, 80))} is not KEY=VALUE`);
    if (!args.has(pair.slice(0, equals))) args.set(pair.slice(0, equals), pair.slice(equals + 1));
  }
  return args;
}

function decodeConfig(bytes: Buffer): Record<string, unknown> {
  let config: unknown;
  try {
    config = JSON.parse(bytes.toString("utf8"));
  } catch (error) {
    throw new InvalidCniRequestError(CNI_ERROR_CODES.DECODE_FAILED, `failed to decode the network configuration: ${(error as Error).message}`);
  }
  if (typeof config !== "object" || config === null || Array.isArray(config)) throw invalidConfig("it is not a JSON object");
  if (nestingDepth(config) > MAX_CONFIG_NESTING) throw invalidConfig(`it nests objects and arrays deeper than ${MAX_CONFIG_NESTING} levels`);
  const record = config as Record<string, unknown>;
  if (typeof record.cniVersion !== "string" || record.cniVersion === "") throw invalidConfig("cniVersion is missing or not a string");
  const prevResult = record.prevResult;
  if (prevResult !== undefined && prevResult !== null && (typeof prevResult !== "object" || Array.isArray(prevResult))) {
    throw invalidConfig("prevResult is not an object");
  }
  return record;
}

/**
 * Nesting limit of a configuration, as in the plugin's JSON reader (MAX_JSON_DEPTH in
 * native/cni/json-scan.c). Without it, JSON.stringify of a deep prevResult in the reply overflows the stack.
 */
const MAX_CONFIG_NESTING = 64;

/** Returns how deep objects and arrays nest in a decoded JSON value, counted without recursion; stops past MAX_CONFIG_NESTING. */
function nestingDepth(value: unknown): number {
  let deepest = 0;
  const pending: [unknown, number][] = [[value, 1]];
  while (pending.length > 0 && deepest <= MAX_CONFIG_NESTING) {
    const [item, depth] = pending.pop()!;
    if (typeof item !== "object" || item === null) continue;
    deepest = Math.max(deepest, depth);
    for (const child of Object.values(item)) pending.push([child, depth + 1]);
  }
  return deepest;
}

/** Returns the addresses of prevResult.ips[] without their prefix lengths. */
export function prevResultIps(config: Record<string, unknown>): string[] {
  const prevResult = config.prevResult as Record<string, unknown> | null | undefined;
  if (!prevResult || prevResult.ips === undefined) return [];
  if (!Array.isArray(prevResult.ips)) throw invalidConfig("prevResult.ips is not an array");
  return prevResult.ips.map((entry: unknown, index) => {
    const address = (entry as { address?: unknown } | null)?.address;
    const ip = typeof address === "string" ? address.split("/")[0] : undefined;
    if (ip === undefined || net.isIP(ip) === 0) {
      throw invalidConfig(`prevResult.ips[${index}].address ${JSON.stringify(address)} is not an IP address with a prefix length`);
    }
    return ip;
  });
}

/** Builds the event that the agent's handler receives for a request. */
export function toPodEvent(request: CniRequest): CniPodEvent {
  const event: CniPodEvent = {
    command: request.command,
    containerId: request.containerId,
    netns: request.netns,
    ifName: request.ifName,
    ips: prevResultIps(request.config),
    cniVersion: request.config.cniVersion as string,
  };
  const podNamespace = request.args.get("K8S_POD_NAMESPACE");
  const podName = request.args.get("K8S_POD_NAME");
  const podUid = request.args.get("K8S_POD_UID");
  if (podNamespace) event.podNamespace = podNamespace;
  if (podName) event.podName = podName;
  if (podUid) event.podUid = podUid;
  return event;
}

/** Formats a reply: the plugin's exit status on the first line, then what it prints. */
export function formatCniReply(status: number, stdout: string): Buffer {
  return Buffer.from(`${status}\n${stdout}`);
}

/** Returns what a successful ADD prints: the prevResult for the next plugin, or just the version when there is none. */
export function successOutput(config: Record<string, unknown>): string {
  const prevResult = config.prevResult ?? { cniVersion: config.cniVersion };
  return JSON.stringify(prevResult) + "\n";
}

/** Returns the CNI error object that a failed ADD prints. */
export function errorOutput(cniVersion: string, code: number, msg: string, details = ""): string {
  return JSON.stringify({ cniVersion, code, msg, details }) + "\n";
}
