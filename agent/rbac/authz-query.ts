// The sources, destinations and pods that `agentctl authz` and the admin API take as text, read
// into queries before they are looked up in a mesh state.

import net from "node:net";
import { AgentError } from "../errors";
import { parseSpiffeId } from "../identity/spiffe";
import { canonicalIp } from "../state/ip";
import type { MeshState } from "../state/mesh-state";
import type { Identity, Workload } from "../state/types";

/** Kubernetes names: a namespace is a DNS-1123 label, a pod name a DNS-1123 subdomain. */
const NAMESPACE_NAME = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const POD_NAME = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;

/** A source as written by the caller, before it is looked up in the mesh state. */
export type SourceQuery =
  | { kind: "identity"; identity: Identity }
  | { kind: "pod"; uid: string }
  | { kind: "ip"; ip: string };

/** A destination as written by the caller; `port` is absent when every relevant port is wanted. */
export type DestinationQuery = { kind: "pod"; uid: string; port?: number } | { kind: "ip"; ip: string; port?: number };

/** Parses `from`: spiffe://TD/ns/N/sa/S, TD/ns/N/sa/S, a pod "namespace/name", or an IP. */
export function parseSourceQuery(text: string): SourceQuery {
  const value = text.trim();
  if (value === "") throw invalidQuery(`missing source; ${SOURCE_FORMS}`);
  if (value.startsWith("spiffe://")) return { kind: "identity", identity: parseIdentity(value, text) };
  if (/^[^/]+\/ns\/[^/]+\/sa\/[^/]+$/.test(value)) return { kind: "identity", identity: parseIdentity(`spiffe://${value}`, text) };
  if (net.isIP(value) !== 0) return { kind: "ip", ip: canonicalIp(value) };
  const uid = parsePodUid(value);
  if (uid !== undefined) return { kind: "pod", uid };
  throw invalidQuery(`invalid source ${JSON.stringify(text)}; ${SOURCE_FORMS}`);
}

/** Parses `to`: a pod "namespace/name[:port]", "ip[:port]" or "[ipv6][:port]". */
export function parseDestinationQuery(text: string): DestinationQuery {
  const value = text.trim();
  if (value === "") throw invalidQuery(`missing destination; ${DESTINATION_FORMS}`);
  if (net.isIP(value) !== 0) return { kind: "ip", ip: canonicalIp(value) };
  const bracketed = /^\[([^\]]+)\](?::([^:]*))?$/.exec(value);
  if (bracketed !== null && net.isIPv6(bracketed[1])) {
    return { kind: "ip", ip: canonicalIp(bracketed[1]), ...portPart(bracketed[2], text) };
  }
  const colon = value.lastIndexOf(":");
  const head = colon === -1 ? value : value.slice(0, colon);
  const port = colon === -1 ? {} : portPart(value.slice(colon + 1), text);
  if (net.isIPv4(head)) return { kind: "ip", ip: head, ...port };
  const uid = parsePodUid(head);
  if (uid !== undefined) return { kind: "pod", uid, ...port };
  throw invalidQuery(`invalid destination ${JSON.stringify(text)}; ${DESTINATION_FORMS}`);
}

/** Returns the pod with uid "namespace/name"; throws INVALID_QUERY for another form and UNKNOWN_WORKLOAD when absent. */
export function findWorkload(state: MeshState, text: string): Workload {
  const uid = parsePodUid(text.trim());
  if (uid === undefined) throw invalidQuery(`invalid pod ${JSON.stringify(text)}; write NAMESPACE/NAME, for example demo/web`);
  const workload = state.workload(uid);
  if (workload === undefined) {
    throw new AgentError("UNKNOWN_WORKLOAD", `pod ${uid} is not in the agent's mesh state; check the name and namespace, and that its manifest was accepted (agentctl policies lists rejected objects)`);
  }
  return workload;
}

const SOURCE_FORMS = "write spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT, TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT, a pod NAMESPACE/NAME, or an IP";
const DESTINATION_FORMS = "write a pod NAMESPACE/NAME[:PORT], or IP:PORT for a pod IP or a Service cluster IP ([IPV6]:PORT for IPv6)";

function parseIdentity(uri: string, text: string): Identity {
  try {
    return parseSpiffeId(uri);
  } catch (error) {
    throw invalidQuery(`invalid source ${JSON.stringify(text)}: ${(error as Error).message}`);
  }
}

/** Returns "namespace/name" when `text` is a valid pod reference, else undefined. */
export function parsePodUid(text: string): string | undefined {
  const parts = text.split("/");
  if (parts.length !== 2 || !NAMESPACE_NAME.test(parts[0]) || !POD_NAME.test(parts[1])) return undefined;
  return `${parts[0]}/${parts[1]}`;
}

function portPart(text: string | undefined, whole: string): { port?: number } {
  if (text === undefined) return {};
  const port = /^[0-9]{1,5}$/.test(text) ? Number(text) : 0;
  if (port < 1 || port > 65535) throw invalidQuery(`invalid port ${JSON.stringify(text)} in destination ${JSON.stringify(whole)}; use a port from 1 to 65535`);
  return { port };
}

export function invalidQuery(message: string): AgentError {
  return new AgentError("INVALID_QUERY", message);
}
