// Redaction of audit record fields before they reach the spool, and a last check that no
// certificate, private key or bearer token ends up in a record through a free-text field.

import crypto from "node:crypto";
import type { AuditEvent } from "./record";

/** A redaction of one field: removal, or a keyed hash that still matches equal values. */
export interface RedactionRule {
  /** Dotted path in the record, such as "src.addr" or "error.message". */
  path: string;
  mode: "remove" | "hash";
}

/**
 * The field paths of schema version 1 that rules may name, across all record types. A segment
 * that reaches an array applies to each element, as in dry_run.policy or changes.after.
 */
export const REDACTABLE_FIELDS: readonly string[] = [
  // Connection records.
  "start", "connection_id", "direction", "transport", "decision", "reason", "established",
  "src", "src.addr", "src.workload", "src.namespace", "src.identity", "src.service",
  "dst", "dst.addr", "dst.workload", "dst.namespace", "dst.identity", "dst.service", "dst.hbone_addr",
  "policy", "policy_kind", "rule", "dry_run", "dry_run.policy", "dry_run.rule", "dry_run.decision",
  "bytes_sent", "bytes_recv", "duration_ms", "flag", "error", "error.code", "error.message",
  // Control records.
  "version", "pid", "previous_stop", "settings", "open_connections", "mode", "requested", "previous_mode",
  "workload", "namespace", "ip", "identity", "policy.kind", "policy.namespace", "policy.name",
  "file", "previous_file", "line", "message", "changes", "changes.path", "changes.before", "changes.after",
  "changes_omitted", "serial", "not_before", "not_after", "fingerprint_sha256", "issuer",
  "lost", "first_time", "last_time", "sink", "first_seq", "last_seq",
];

/** Fields that may not be redacted: the chain and the record type hold the pipeline together. */
const PROTECTED_FIELDS = new Set(["time", "type", "v", "seq", "id", "prev_hash", "hash", "node"]);

/**
 * Fields that repeat another field's value: a rule on the first applies to the second too, so that
 * hiding dst.addr does not leave the same IP in dst.hbone_addr.
 */
const COMPANION_FIELDS: Readonly<Record<string, string>> = { "dst.addr": "dst.hbone_addr" };

/**
 * Parses redaction rules written as PATH or PATH:hash (PATH:remove is the default), comma
 * separated, such as "src.addr:hash,dst.addr:hash,error.message". Throws on a malformed rule or
 * a path that names no field of any record type.
 */
export function parseRedactionRules(text: string): RedactionRule[] {
  const rules: RedactionRule[] = [];
  for (const item of text.split(",").map((part) => part.trim()).filter((part) => part.length > 0)) {
    const [fieldPath, mode = "remove", extra] = item.split(":");
    if (extra !== undefined || !/^[a-z_0-9]+(\.[a-z_0-9]+)*$/.test(fieldPath) || (mode !== "remove" && mode !== "hash")) {
      throw new Error(
        `invalid audit redaction rule "${item}": expected FIELD or FIELD:hash with a dotted field path such as src.addr or dst.identity:hash`,
      );
    }
    if (PROTECTED_FIELDS.has(fieldPath)) {
      throw new Error(`invalid audit redaction rule "${item}": ${fieldPath} is part of the record's chain or type and cannot be redacted`);
    }
    if (!REDACTABLE_FIELDS.includes(fieldPath)) {
      throw new Error(
        `invalid audit redaction rule "${item}": no record has the field ${fieldPath}; fields include src.addr, src.identity, dst.addr, dst.identity, ip, error.message (docs/audit.md lists all)`,
      );
    }
    rules.push({ path: fieldPath, mode });
    const companion = COMPANION_FIELDS[fieldPath];
    if (companion !== undefined) rules.push({ path: companion, mode });
  }
  return rules;
}

/**
 * Text that looks like a PEM block (through its END line, or to the end of the text when that is
 * missing) or a JSON Web Token (three base64url parts, the first two JSON objects).
 */
const SECRET_PATTERN = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?(?:-----END \1-----|$)|eyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*/g;
/** A cheap test for the serialized record, before the slower replacement. */
const SECRET_HINT = /-----BEGIN|eyJ[A-Za-z0-9_-]{6,}\.eyJ/;
const SECRET_REPLACEMENT = "[removed: looked like a certificate, key or token]";

const HASH_PREFIX = "hmac-sha256:";

export class Redactor {
  private readonly rules: readonly { keys: string[]; mode: RedactionRule["mode"] }[];
  private keepHashed = false;

  /** `key` keys the hash of "hash" rules, so that a hashed address cannot be found by hashing every address. */
  constructor(rules: readonly RedactionRule[], private readonly key: Buffer) {
    this.rules = rules.map((rule) => ({ keys: rule.path.split("."), mode: rule.mode }));
  }

  /**
   * Applies the rules to the record in place and returns it. With `keepHashed`, for records rebuilt
   * from spooled ones, values that already carry the hash prefix keep it instead of being hashed again.
   */
  apply(record: AuditEvent, options: { keepHashed?: boolean } = {}): AuditEvent {
    this.keepHashed = options.keepHashed ?? false;
    try {
      for (const rule of this.rules) this.applyRule(record, rule.keys, rule.mode);
    } finally {
      this.keepHashed = false;
    }
    return record;
  }

  /** Follows `keys` from `target`, into every element of an array on the way, and redacts what the last key names. */
  private applyRule(target: unknown, keys: readonly string[], mode: RedactionRule["mode"]): void {
    if (Array.isArray(target)) {
      for (const element of target) this.applyRule(element, keys, mode);
      return;
    }
    if (typeof target !== "object" || target === null) return;
    const object = target as Record<string, unknown>;
    const [key, ...rest] = keys;
    if (!Object.hasOwn(object, key)) return;
    if (rest.length > 0) {
      this.applyRule(object[key], rest, mode);
    } else if (mode === "remove") {
      delete object[key];
    } else {
      object[key] = this.hashLeaves(object[key]);
    }
  }

  /** Replaces each string, number and boolean in `value` with its hash, keeping objects and arrays in shape. */
  private hashLeaves(value: unknown): unknown {
    if (Array.isArray(value)) return value.map((element) => this.hashLeaves(element));
    if (typeof value === "object" && value !== null) {
      const copy: Record<string, unknown> = {};
      for (const [name, item] of Object.entries(value)) copy[name] = this.hashLeaves(item);
      return copy;
    }
    if (value === null || value === undefined) return value;
    // A value hashed already, in a record rebuilt from the spool, keeps its hash.
    if (this.keepHashed && typeof value === "string" && value.startsWith(HASH_PREFIX)) return value;
    return `hmac-sha256:${crypto.createHmac("sha256", this.key).update(String(value)).digest("hex").slice(0, 32)}`;
  }
}

/** JSON.stringify writes a lone UTF-16 surrogate as a \udXXX escape; paired ones stay raw characters. */
const LONE_SURROGATE_ESCAPE = /\\ud[89a-f][0-9a-f]{2}/i;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/**
 * Cleans the strings of a serialized record. Text that looks like a certificate, private key or
 * token is replaced: records never carry them by design, and this guards free-text fields such as
 * error messages. A lone UTF-16 surrogate, which has no UTF-8 form, becomes U+FFFD, so that every
 * sink carries the text the hash covers. Returns the same object when nothing matched.
 */
export function scrubRecord<T extends object>(record: T, serialized: string): T {
  if (!SECRET_HINT.test(serialized) && !LONE_SURROGATE_ESCAPE.test(serialized)) return record;
  return JSON.parse(serialized, (_key, value: unknown) =>
    typeof value === "string" ? value.replace(SECRET_PATTERN, SECRET_REPLACEMENT).replace(LONE_SURROGATE, "\ufffd") : value,
  ) as T;
}
