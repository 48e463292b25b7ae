// The limits that keep one pod, peer or connection from exhausting the node's proxies, and the
// parser of their `ambient-agent run` flags. docs/limits.md describes each limit and what happens
// when it is reached.

/** Limits of the proxies (15001, 15006, 15008), one set per agent. */
export interface ProxyLimits {
  /**
   * Open proxied connections per enrolled pod and direction: as a source (15001) and, separately,
   * as a destination (15006 connections and 15008 streams together).
   */
  maxConnectionsPerPod: number;
  /** Open TCP connections from one remote IP to one pod's 15008, and separately to its 15006. */
  maxConnectionsPerPeer: number;
  /** HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS of 15008, which the agent also enforces before the client acknowledges it. */
  maxStreamsPerConnection: number;
  /** Open CONNECT streams from one peer identity (SPIFFE id) to one pod, over all its connections. */
  maxStreamsPerPeer: number;
  /** SETTINGS_MAX_HEADER_LIST_SIZE of 15008 in bytes, also enforced. */
  maxHeaderListBytes: number;
  /** Time from the TCP accept on 15008 to the end of the TLS handshake and the first CONNECT request's headers, in ms. */
  handshakeTimeoutMs: number;
  /**
   * Time in ms after which a proxied connection with no byte in either direction is closed, and
   * an HBONE session with no open stream. 0 turns it off.
   */
  idleTimeoutMs: number;
  /** Node-wide bytes that the proxies have read and not yet written. Above it, new connections are refused. */
  maxBufferedBytes: number;
}

/** The limits when no flag sets them. */
export const DEFAULT_LIMITS: Readonly<ProxyLimits> = Object.freeze({
  maxConnectionsPerPod: 4096,
  maxConnectionsPerPeer: 512,
  // ztunnel's server value. An HTTP/2 client opens a new connection past it.
  maxStreamsPerConnection: 200,
  maxStreamsPerPeer: 2048,
  // ztunnel's HBONE client sends at most 16 KiB, and its server accepts 64 KiB.
  maxHeaderListBytes: 16 * 1024,
  // The same as the upstream connect timeout (CONNECT_TIMEOUT_MS).
  handshakeTimeoutMs: 10_000,
  // Envoy's TCP proxy default idle timeout.
  idleTimeoutMs: 60 * 60 * 1000,
  maxBufferedBytes: 256 * 1024 * 1024,
});

/** The flag values that the limits come from (node:util parseArgs), by flag name without the dashes. */
export interface LimitFlagValues {
  "max-connections-per-pod"?: string;
  "max-connections-per-peer"?: string;
  "max-streams-per-connection"?: string;
  "max-streams-per-peer"?: string;
  "max-header-list-size"?: string;
  "handshake-timeout"?: string;
  "idle-timeout"?: string;
  "max-buffered-bytes"?: string;
}

/** The largest HTTP/2 SETTINGS value (RFC 9113 section 6.5.1: 32-bit unsigned). */
const MAX_HTTP2_SETTING = 2 ** 32 - 1;
/** The maximum timer delay of Node.js in ms: a longer delay fires after 1 ms instead. */
const MAX_TIMER_MS = 2 ** 31 - 1;

const SIZE_UNITS: Record<string, number> = { "": 1, kib: 1024, mib: 1024 ** 2, gib: 1024 ** 3 };

/**
 * Reads the limit flags. An absent flag keeps its DEFAULT_LIMITS value. Throws an Error whose
 * message names the flag, the value and an example of a valid one.
 */
export function parseLimitFlags(values: LimitFlagValues): ProxyLimits {
  return {
    maxConnectionsPerPod: parseCount(values, "max-connections-per-pod", DEFAULT_LIMITS.maxConnectionsPerPod, Number.MAX_SAFE_INTEGER),
    maxConnectionsPerPeer: parseCount(values, "max-connections-per-peer", DEFAULT_LIMITS.maxConnectionsPerPeer, Number.MAX_SAFE_INTEGER),
    maxStreamsPerConnection: parseCount(values, "max-streams-per-connection", DEFAULT_LIMITS.maxStreamsPerConnection, MAX_HTTP2_SETTING),
    maxStreamsPerPeer: parseCount(values, "max-streams-per-peer", DEFAULT_LIMITS.maxStreamsPerPeer, Number.MAX_SAFE_INTEGER),
    maxHeaderListBytes: parseBytes(values, "max-header-list-size", DEFAULT_LIMITS.maxHeaderListBytes, MAX_HTTP2_SETTING),
    handshakeTimeoutMs: parseSeconds(values, "handshake-timeout", DEFAULT_LIMITS.handshakeTimeoutMs, false),
    idleTimeoutMs: parseSeconds(values, "idle-timeout", DEFAULT_LIMITS.idleTimeoutMs, true),
    maxBufferedBytes: parseBytes(values, "max-buffered-bytes", DEFAULT_LIMITS.maxBufferedBytes, Number.MAX_SAFE_INTEGER),
  };
}

/** Parses a whole number from 1 to `max`. */
function parseCount(values: LimitFlagValues, flag: keyof LimitFlagValues, fallback: number, max: number): number {
  const value = values[flag];
  if (value === undefined) return fallback;
  const count = Number(value);
  if (!/^\d+$/.test(value.trim()) || count < 1 || count > max) {
    throw new Error(`invalid --${flag} "${value}": give a whole number from 1 to ${max} (for example ${fallback})`);
  }
  return count;
}

/** Parses a byte count from 1 to `max`, optionally with a unit KiB, MiB or GiB. */
function parseBytes(values: LimitFlagValues, flag: keyof LimitFlagValues, fallback: number, max: number): number {
  const value = values[flag];
  if (value === undefined) return fallback;
  const match = /^(\d+)\s*([a-zA-Z]*)$/.exec(value.trim());
  const unit = match ? SIZE_UNITS[match[2].toLowerCase()] : undefined;
  const bytes = match && unit !== undefined ? Number(match[1]) * unit : NaN;
  if (!(bytes >= 1 && bytes <= max)) {
    throw new Error(`invalid --${flag} "${value}": give a whole number of bytes from 1 to ${max}, optionally with a unit KiB, MiB or GiB (for example ${fallback} or ${formatMiB(fallback)})`);
  }
  return bytes;
}

/**
 * Parses seconds into ms: a plain decimal number (digits, optionally a fraction) from 0.001, or 0
 * too when `zeroTurnsOff`. Hexadecimal, binary, exponent and signed forms are rejected.
 */
function parseSeconds(values: LimitFlagValues, flag: keyof LimitFlagValues, fallbackMs: number, zeroTurnsOff: boolean): number {
  const value = values[flag];
  if (value === undefined) return fallbackMs;
  const plainDecimal = /^\d+(\.\d+)?$/.test(value.trim());
  const seconds = Number(value);
  const ms = Math.round(seconds * 1000);
  const valid = plainDecimal && ms <= MAX_TIMER_MS && (seconds >= 0.001 || (zeroTurnsOff && seconds === 0));
  if (!valid) {
    const range = zeroTurnsOff ? "0 to turn it off, or from 0.001" : "from 0.001";
    throw new Error(`invalid --${flag} "${value}": give a number of seconds, ${range} to ${Math.floor(MAX_TIMER_MS / 1000)} (for example ${fallbackMs / 1000} or 2.5)`);
  }
  return ms;
}

/** Writes a byte count as "NMiB" when it is a whole number of MiB, else as KiB. */
function formatMiB(bytes: number): string {
  return bytes % (1024 * 1024) === 0 ? `${bytes / (1024 * 1024)}MiB` : `${Math.round(bytes / 1024)}KiB`;
}

/** The flag of the limit behind each refusal reason that a limit sets. */
const FLAG_OF_REASON: Readonly<Record<string, string>> = {
  connections_per_pod: "--max-connections-per-pod",
  connections_per_peer: "--max-connections-per-peer",
  streams_per_connection: "--max-streams-per-connection",
  streams_per_peer: "--max-streams-per-peer",
  header_list_size: "--max-header-list-size",
  handshake_timeout: "--handshake-timeout",
  idle_timeout: "--idle-timeout",
  buffered_bytes: "--max-buffered-bytes",
};

/** Returns the flag of the limit behind a refusal reason, or undefined for a reason that no limit sets (tls_handshake, http2_flood). */
export function limitFlagOf(reason: string): string | undefined {
  return Object.hasOwn(FLAG_OF_REASON, reason) ? FLAG_OF_REASON[reason] : undefined;
}

/** Returns the limits as the `agent.started` record's settings list them, in snake case with their units. */
export function limitSettings(limits: ProxyLimits): Record<string, number> {
  return {
    max_connections_per_pod: limits.maxConnectionsPerPod,
    max_connections_per_peer: limits.maxConnectionsPerPeer,
    max_streams_per_connection: limits.maxStreamsPerConnection,
    max_streams_per_peer: limits.maxStreamsPerPeer,
    max_header_list_bytes: limits.maxHeaderListBytes,
    handshake_timeout_ms: limits.handshakeTimeoutMs,
    idle_timeout_ms: limits.idleTimeoutMs,
    max_buffered_bytes: limits.maxBufferedBytes,
  };
}
