// The audit options of `ambient-agent run`: the local file, the remote sinks, the spool, the fsync
// policy and redaction.

import path from "node:path";
import { parseRedactionRules } from "../audit/redact";
import { AUDIT_DEFAULTS, parseByteSize, parseDurationMs, parseFsyncPolicy, parseSinkUri, type AuditOptions } from "../audit/config";

export const AUDIT_USAGE = `  --audit-file PATH    JSON-lines audit file, rotated by size and age, which \`agentctl audit query\`
                       reads (default ${AUDIT_DEFAULTS.file}; "none" writes no file)
  --audit-file-max-size SIZE
                       size at which the audit file is rotated (default 100MiB; units KiB, MiB, GiB)
  --audit-file-max-age DURATION
                       age at which the audit file is rotated (default 24h; units s, m, h, d)
  --audit-file-max-files N
                       rotated audit files kept; older ones are deleted (default 10, 0 keeps all)
  --audit-sink URI     another destination of every record; repeatable: stdout,
                       otlp://HOST:PORT (OTLP logs over gRPC; ?ca=FILE&cert=FILE&key=FILE for TLS,
                       &header=NAME:VALUE for a header), syslog+tcp://HOST[:PORT] or
                       syslog+tls://HOST[:PORT]?ca=FILE (RFC 5424, default ports 514 and 6514;
                       &facility=NAME)
  --audit-spool DIR    folder where records wait until every sink has them (default
                       ${AUDIT_DEFAULTS.spoolDir}/NODE)
  --audit-spool-max-size SIZE
                       spool size above which the oldest records are evicted, with a gap record
                       for each sink that had not received them (default 256MiB)
  --audit-fsync POLICY always (fdatasync before sinks see a record), never, or the time between
                       fdatasync calls (default 1s)
  --audit-queue N      records waiting for the spool before new ones are dropped and counted in a
                       gap record (default ${AUDIT_DEFAULTS.queueCapacity})
  --audit-redact FIELD[:hash][,FIELD[:hash]...]
                       record fields to remove, or to replace with a keyed hash that still matches
                       equal values, for example src.addr:hash,dst.addr:hash
  --audit-redact-key-file FILE
                       key of the redaction hashes (default a random key kept in the spool folder)
`;

export const AUDIT_FLAGS = {
  "audit-file": { type: "string" },
  "audit-file-max-size": { type: "string" },
  "audit-file-max-age": { type: "string" },
  "audit-file-max-files": { type: "string" },
  "audit-sink": { type: "string", multiple: true },
  "audit-spool": { type: "string" },
  "audit-spool-max-size": { type: "string" },
  "audit-fsync": { type: "string" },
  "audit-queue": { type: "string" },
  "audit-redact": { type: "string", multiple: true },
  "audit-redact-key-file": { type: "string" },
} as const;

export interface AuditFlagValues {
  "audit-file"?: string;
  "audit-file-max-size"?: string;
  "audit-file-max-age"?: string;
  "audit-file-max-files"?: string;
  "audit-sink"?: string[];
  "audit-spool"?: string;
  "audit-spool-max-size"?: string;
  "audit-fsync"?: string;
  "audit-queue"?: string;
  "audit-redact"?: string[];
  "audit-redact-key-file"?: string;
}

/** Builds the audit options. Throws an Error naming the flag and the value when one is invalid. */
export function parseAuditFlags(values: AuditFlagValues, node: string): AuditOptions {
  const filePath = values["audit-file"] ?? AUDIT_DEFAULTS.file;
  const file =
    filePath === "none"
      ? undefined
      : {
          path: path.resolve(filePath),
          maxBytes: optional(values["audit-file-max-size"], (value) => parseByteSize(value, "--audit-file-max-size"), AUDIT_DEFAULTS.fileMaxBytes),
          maxAgeMs: optional(values["audit-file-max-age"], (value) => parseDurationMs(value, "--audit-file-max-age"), AUDIT_DEFAULTS.fileMaxAgeMs),
          maxFiles: optional(values["audit-file-max-files"], (value) => parseCount(value, "--audit-file-max-files", 0), AUDIT_DEFAULTS.fileMaxFiles),
        };
  const sinks = (values["audit-sink"] ?? []).map(parseSinkUri);
  if (file === undefined && sinks.length === 0) {
    throw new Error('--audit-file none leaves no audit destination: give at least one --audit-sink, or an audit file');
  }
  return {
    file,
    sinks,
    spoolDir: path.resolve(values["audit-spool"] ?? path.join(AUDIT_DEFAULTS.spoolDir, node)),
    spoolMaxBytes: optional(values["audit-spool-max-size"], (value) => parseByteSize(value, "--audit-spool-max-size"), AUDIT_DEFAULTS.spoolMaxBytes),
    fsync: parseFsyncPolicy(values["audit-fsync"]),
    queueCapacity: optional(values["audit-queue"], (value) => parseCount(value, "--audit-queue", 1), AUDIT_DEFAULTS.queueCapacity),
    redaction: (values["audit-redact"] ?? []).flatMap(parseRedactionRules),
    redactionKeyFile: values["audit-redact-key-file"],
  };
}

function optional<T>(value: string | undefined, parse: (value: string) => T, fallback: T): T {
  return value === undefined ? fallback : parse(value);
}

function parseCount(value: string, flag: string, minimum: number): number {
  const count = Number(value);
  if (!/^\d+$/.test(value.trim()) || count < minimum) {
    throw new Error(`invalid ${flag} "${value}": give a whole number, ${minimum} or more`);
  }
  return count;
}
