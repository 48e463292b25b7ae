// The audit settings of the agent and the parsing of their textual forms: sink URIs, byte sizes
// and durations, as the command line and the Helm chart's ConfigMap give them.

import type { RedactionRule } from "./redact";
import type { FsyncPolicy } from "./spool";

/** TLS settings of a remote sink: file paths of PEM files, and the name to check in the server certificate. */
export interface SinkTls {
  ca?: string;
  cert?: string;
  key?: string;
  serverName?: string;
}

export type RemoteSinkSpec =
  | { kind: "stdout" }
  | { kind: "otlp"; endpoint: string; tls?: SinkTls; headers: Record<string, string> }
  | { kind: "syslog"; transport: "tcp" | "tls"; host: string; port: number; tls?: SinkTls; facility?: string; sdId?: string; maxMessageBytes?: number };

export interface AuditFileOptions {
  path: string;
  maxBytes: number;
  maxAgeMs: number;
  maxFiles: number;
}

export interface AuditOptions {
  /** The local JSON-lines file, which `agentctl audit query` reads; undefined when disabled. */
  file: AuditFileOptions | undefined;
  sinks: RemoteSinkSpec[];
  spoolDir: string;
  spoolMaxBytes: number;
  fsync: FsyncPolicy;
  queueCapacity: number;
  redaction: RedactionRule[];
  /** File holding the key of redaction hashes; default a random key kept in the spool folder. */
  redactionKeyFile?: string;
}

export const AUDIT_DEFAULTS = {
  file: "/var/log/ambient-agent/audit.log",
  fileMaxBytes: 100 * 1024 * 1024,
  fileMaxAgeMs: 24 * 3600 * 1000,
  fileMaxFiles: 10,
  spoolDir: "/var/lib/ambient-agent/audit-spool",
  spoolMaxBytes: 256 * 1024 * 1024,
  fsyncIntervalMs: 1_000,
  queueCapacity: 50_000,
} as const;

const SIZE_UNITS: Record<string, number> = { "": 1, b: 1, k: 1e3, kb: 1e3, kib: 1024, m: 1e6, mb: 1e6, mib: 1024 ** 2, g: 1e9, gb: 1e9, gib: 1024 ** 3 };

/** Parses a byte size such as 1048576, 512KiB, 100MiB or 1GB. Throws naming `flag` and the value. */
export function parseByteSize(value: string, flag: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*([a-zA-Z]*)$/.exec(value.trim());
  const unit = match ? SIZE_UNITS[match[2].toLowerCase()] : undefined;
  if (!match || unit === undefined || Number(match[1]) * unit < 1) {
    throw new Error(`invalid ${flag} "${value}": give a size in bytes, optionally with a unit KiB, MiB, GiB, KB, MB or GB (for example 100MiB)`);
  }
  return Math.floor(Number(match[1]) * unit);
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Parses a duration such as 500ms, 30s, 15m, 24h or 7d into milliseconds. Throws naming `flag` and the value. */
export function parseDurationMs(value: string, flag: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(value.trim());
  if (!match || Number(match[1]) <= 0) {
    throw new Error(`invalid ${flag} "${value}": give a positive duration with a unit ms, s, m, h or d (for example 30s or 24h)`);
  }
  return Math.round(Number(match[1]) * DURATION_UNITS[match[2]]);
}

/** Parses --audit-fsync: always, never, or a duration between syncs. */
export function parseFsyncPolicy(value: string | undefined): FsyncPolicy {
  if (value === undefined) return { mode: "interval", intervalMs: AUDIT_DEFAULTS.fsyncIntervalMs };
  if (value === "always" || value === "never") return { mode: value };
  let intervalMs: number;
  try {
    intervalMs = parseDurationMs(value, "--audit-fsync");
  } catch {
    intervalMs = NaN;
  }
  if (!(intervalMs >= MIN_FSYNC_INTERVAL_MS)) {
    throw new Error(`invalid --audit-fsync "${value}": give always, never, or the time between syncs, at least 10ms, such as 1s`);
  }
  return { mode: "interval", intervalMs };
}

const SYSLOG_DEFAULT_PORTS = { tcp: 514, tls: 6514 } as const;
const KNOWN_PARAMETERS: Readonly<Record<string, ReadonlySet<string>>> = {
  "otlp:": new Set(["ca", "cert", "key", "server_name", "header"]),
  "syslog+tcp:": new Set(["facility", "sd_id", "max_message_size"]),
  "syslog+tls:": new Set(["ca", "cert", "key", "server_name", "facility", "sd_id", "max_message_size"]),
};
/** A shorter interval costs an fdatasync(2) per batch anyway: use "always" for that. */
const MIN_FSYNC_INTERVAL_MS = 10;

/**
 * Parses a sink URI:
 *   stdout
 *   otlp://HOST:PORT[?ca=FILE&cert=FILE&key=FILE&server_name=NAME&header=NAME:VALUE]
 *   syslog+tcp://HOST[:PORT][?facility=NAME&sd_id=ID&max_message_size=SIZE]
 *   syslog+tls://HOST[:PORT]?ca=FILE[&cert=FILE&key=FILE&server_name=NAME&facility=NAME&sd_id=ID&max_message_size=SIZE]
 * An otlp URI with ca, cert or key uses TLS, without them plaintext HTTP/2.
 */
export function parseSinkUri(text: string): RemoteSinkSpec {
  if (text === "stdout" || text === "stdout:") return { kind: "stdout" };
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    const port = /^[a-z+]+:\/\/[^/?#]*:(\d+)/.exec(text)?.[1];
    throw new Error(sinkError(text, port !== undefined && Number(port) > 65535 ? `port ${port} is out of range 1-65535` : "it is not a URI"));
  }
  if (url.port === "0") throw new Error(sinkError(text, "port 0 is out of range 1-65535"));
  const query = url.searchParams;
  const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
  if (host === "") throw new Error(sinkError(text, "the host is missing"));
  if (url.username !== "" || url.password !== "") {
    throw new Error(sinkError(text, "user information in the URI is not used; give credentials as a header parameter"));
  }
  if (url.hash !== "" || (url.pathname !== "" && url.pathname !== "/")) {
    throw new Error(sinkError(text, "a path or #fragment in the URI is not used; put parameters after ? (a # inside a value must be written %23)"));
  }
  const known = KNOWN_PARAMETERS[url.protocol] ?? new Set<string>();
  for (const name of query.keys()) {
    if (url.protocol === "syslog+tcp:" && ["ca", "cert", "key", "server_name"].includes(name)) throw new Error(sinkError(text, "TLS parameters need syslog+tls://"));
    if (!known.has(name)) throw new Error(sinkError(text, `unknown parameter "${name.slice(0, 40).replace(/[^\x20-\x7e]/g, "?")}" for ${url.protocol}// sinks`));
    if (query.getAll(name).length > 1 && name !== "header") throw new Error(sinkError(text, `parameter "${name}" is given twice`));
    if (query.getAll(name).some((value) => value.trim() === "")) throw new Error(sinkError(text, `parameter "${name}" has no value`));
  }
  const tls = tlsOf(query);
  if (url.protocol === "otlp:") {
    if (url.port === "") throw new Error(sinkError(text, "give the port, for example otlp://127.0.0.1:4317"));
    const headers: Record<string, string> = {};
    for (const header of query.getAll("header")) {
      const colon = header.indexOf(":");
      if (colon <= 0) throw new Error(sinkError(text, "a header parameter must be NAME:VALUE, for example header=authorization:Bearer%20TOKEN"));
      const headerName = header.slice(0, colon).trim().toLowerCase();
      if (Object.hasOwn(headers, headerName)) throw new Error(sinkError(text, `header "${headerName}" is given twice`));
      headers[headerName] = header.slice(colon + 1).trim();
    }
    return { kind: "otlp", endpoint: `${url.hostname}:${url.port}`, tls, headers };
  }
  if (url.protocol === "syslog+tcp:" || url.protocol === "syslog+tls:") {
    const transport = url.protocol === "syslog+tcp:" ? "tcp" : "tls";
    if (transport === "tcp" && tls !== undefined) throw new Error(sinkError(text, "TLS parameters need syslog+tls://"));
    const port = url.port === "" ? SYSLOG_DEFAULT_PORTS[transport] : Number(url.port);
    return {
      kind: "syslog",
      transport,
      host,
      port,
      tls: transport === "tls" ? (tls ?? {}) : undefined,
      facility: query.get("facility") ?? undefined,
      sdId: query.get("sd_id") ?? undefined,
      maxMessageBytes: query.has("max_message_size") ? parseMessageSize(text, query.get("max_message_size")!) : undefined,
    };
  }
  throw new Error(sinkError(text, `unknown scheme "${url.protocol}"`));
}

/** Parses max_message_size, the receiver's largest message (rsyslog's maxMessageSize): at least 2048 bytes, which RFC 5425 requires every receiver to take. */
function parseMessageSize(text: string, value: string): number {
  let bytes: number;
  try {
    bytes = parseByteSize(value, "max_message_size");
  } catch {
    bytes = NaN;
  }
  if (!(bytes >= 2048)) throw new Error(sinkError(text, "max_message_size must be a size of at least 2048 bytes, such as 8KiB or 64KiB"));
  return bytes;
}

function tlsOf(query: URLSearchParams): SinkTls | undefined {
  const tls: SinkTls = {};
  if (query.has("ca")) tls.ca = query.get("ca")!;
  if (query.has("cert")) tls.cert = query.get("cert")!;
  if (query.has("key")) tls.key = query.get("key")!;
  if (query.has("server_name")) tls.serverName = query.get("server_name")!;
  if ((tls.cert === undefined) !== (tls.key === undefined)) throw new Error("a sink's cert and key parameters go together: give both or neither");
  return Object.keys(tls).length > 0 ? tls : undefined;
}

function sinkError(text: string, problem: string): string {
  // Parameter values (a header may hold a token) and user information are not repeated in the message.
  const shown = text
    .replace(/[?#].*$/s, (rest) => rest.replace(/=[^&#]*/g, "=…"))
    .replace(/^([a-z+]+:\/\/)[^?#]*@/i, "$1…@");
  return `invalid --audit-sink "${shown}": ${problem}; expected stdout, otlp://HOST:PORT, syslog+tcp://HOST[:PORT] or syslog+tls://HOST[:PORT]?ca=FILE`;
}
