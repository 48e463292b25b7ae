// Redaction of audit record fields before they reach the spool, and a last check that no
// certificate, private key or bearer token ends up in a record through a free-text field.

import crypto from "node:crypto";
import type { AuditEvent } from "./record";

/** How one field is redacted: removed, or replaced by a keyed hash that still correlates equal values. */
export interface RedactionRule {
  /** Dotted path in the record, such as "src.addr" or "error.message". */
  path: string;
  mode: "remove" | "hash";
}

/** Fields that may not be redacted: the chain and the record type hold the pipeline together. */
const PROTECTED_FIELDS = new Set(["time", "type", "v", "seq", "id", "prev_hash", "hash", "node"]);

/**
 * Parses redaction rules written as PATH or PATH:hash (PATH:remove is the default), comma
 * separated, such as "src.addr:hash,dst.addr:hash,error.message". Throws on a malformed rule.
 */
export function parseRedactionRules(text: string): RedactionRule[] {
  const rules: RedactionRule[] = [];
  for (const item of text.split(",").map((part) => part.trim()).filter((part) => part.length > 0)) {
    const [fieldPath, mode = "remove", extra] = item.split(":");
    if (extra !== undefined || !/^[a-z_]+(\.[a-z_]+)*$/.test(fieldPath) || (mode !== "remove" && mode !== "hash")) {
      throw new Error(
        `invalid audit redaction rule "${item}": expected FIELD or FIELD:hash with a dotted field path such as src.addr or dst.identity:hash`,
      );
    }
    if (PROTECTED_FIELDS.has(fieldPath)) {
      throw new Error(`invalid audit redaction rule "${item}": ${fieldPath} holds the record's chain or type and cannot be redacted`);
    }
    rules.push({ path: fieldPath, mode });
  }
  return rules;
}

/** Text that looks like a PEM block or a JSON Web Token (three base64url parts, the first two JSON objects). */
const SECRET_PATTERN = /-----BEGIN [A-Z ]+-----|eyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*/g;
const SECRET_REPLACEMENT = "[removed: looked like a certificate, key or token]";

export class Redactor {
  private readonly rules: readonly { keys: string[]; mode: RedactionRule["mode"] }[];

  /** `key` keys the hash of "hash" rules, so that a hashed address cannot be found by hashing every address. */
  constructor(rules: readonly RedactionRule[], private readonly key: Buffer) {
    this.rules = rules.map((rule) => ({ keys: rule.path.split("."), mode: rule.mode }));
  }

  /** Applies the rules to the record in place and returns it. */
  apply(record: AuditEvent): AuditEvent {
    for (const rule of this.rules) this.applyRule(record as unknown as Record<string, unknown>, rule.keys, rule.mode);
    return record;
  }

  private applyRule(target: Record<string, unknown>, keys: readonly string[], mode: RedactionRule["mode"]): void {
    let parent: unknown = target;
    for (const key of keys.slice(0, -1)) {
      parent = (parent as Record<string, unknown> | undefined)?.[key];
      if (typeof parent !== "object" || parent === null) return;
    }
    const object = parent as Record<string, unknown>;
    const last = keys[keys.length - 1];
    if (!(last in object)) return;
    if (mode === "remove") delete object[last];
    else object[last] = this.hash(object[last]);
  }

  private hash(value: unknown): string {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    return `hmac-sha256:${crypto.createHmac("sha256", this.key).update(text).digest("hex").slice(0, 32)}`;
  }
}

/**
 * Replaces any text in the serialized record that looks like a certificate, private key or token.
 * Records never carry them by design; this guards free-text fields such as error messages. Returns
 * the record unchanged (the same object) when nothing matched.
 */
export function scrubSecrets<T extends object>(record: T, serialized: string): T {
  SECRET_PATTERN.lastIndex = 0;
  if (!SECRET_PATTERN.test(serialized)) return record;
  return JSON.parse(serialized, (_key, value: unknown) =>
    typeof value === "string" ? value.replace(SECRET_PATTERN, SECRET_REPLACEMENT) : value,
  ) as T;
}
