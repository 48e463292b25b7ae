// The hash chain of audit records. Each record carries `prev_hash`, the hash of the record before
// it, and `hash`, the SHA-256 (hex) of its own line without the `hash` member: the line is the JSON
// object `body`, and the spooled line is `body` with `,"hash":"<hex>"` inserted before the final `}`.
// Hashing the exact bytes lets a verifier in any language check a line without re-serializing it.

import crypto from "node:crypto";

/** prev_hash of the first record of a chain. */
export const GENESIS_HASH = "0".repeat(64);

/** Length of `,"hash":"` + 64 hex digits + `"}`, the suffix a sealed line ends with. */
export const HASH_SUFFIX_LENGTH = 75;

/** Hashes `body`, a serialized JSON object that already contains prev_hash, and returns the sealed line and its hash. */
export function sealLine(body: string): { line: string; hash: string } {
  const hash = hashBody(body);
  return { line: `${body.slice(0, -1)},"hash":"${hash}"}`, hash };
}

/**
 * Splits a sealed line into the body that was hashed and the stored hash. Returns undefined when
 * the line does not end with a `hash` member of 64 hex digits.
 */
export function unsealLine(line: string): { body: string; hash: string } | undefined {
  if (line.length <= HASH_SUFFIX_LENGTH) return undefined;
  const suffix = line.slice(-HASH_SUFFIX_LENGTH);
  const match = /^,"hash":"([0-9a-f]{64})"\}$/.exec(suffix);
  if (!match) return undefined;
  return { body: `${line.slice(0, -HASH_SUFFIX_LENGTH)}}`, hash: match[1] };
}

/** Computes the hash of a body as sealLine() does: SHA-256 of its UTF-8 bytes, in hex. */
export function hashBody(body: string): string {
  // The one-shot crypto.hash() costs about half of a createHash() chain per record.
  return crypto.hash("sha256", body, "hex");
}
