// Parsing of one sealed audit line, read back as raw bytes, and the check of its own hash. The
// links between lines are checked in verify.ts.

import crypto from "node:crypto";
import { isUtf8 } from "node:buffer";
import { HASH_SUFFIX_LENGTH, unsealLine } from "./chain";

const HEX64 = /^[0-9a-f]{64}$/;
const SEQ_IN_TEXT = /"seq":(\d{1,15})[,}]/;

/**
 * A line read back: either a record with its chain fields, or the reason it is malformed. A record
 * whose hash does not match has `computed`, the hash of its bytes, or `change`, a description of
 * a change that leaves no hash to compare.
 */
export type ParsedLine =
  | { ok: true; seq: number; prevHash: string; hash: string; hashValid: boolean; computed?: string; change?: string }
  | { ok: false; reason: string; seq?: number };

/**
 * Parses one line and checks its hash over the exact bytes, without looking at other lines. The
 * agent writes only valid UTF-8 and ends lines with 0x0A alone, so invalid UTF-8 is malformed and a
 * trailing 0x0D (a file converted to CRLF line endings) is a change to the record.
 */
export function parseChainLine(bytes: Buffer): ParsedLine {
  if (bytes.length === 0) return { ok: false, reason: "the line is empty" };
  if (!isUtf8(bytes)) {
    return { ok: false, reason: "the line is not valid UTF-8, although the agent writes only UTF-8, so its bytes were changed", seq: seqInText(bytes.toString("latin1")) };
  }

  const text = bytes.toString("utf8");
  const carriageReturns = /\r+$/.exec(text)?.[0].length ?? 0;
  const sealed = unsealLine(carriageReturns === 0 ? text : text.slice(0, -carriageReturns));
  if (sealed === undefined) {
    return { ok: false, reason: 'the line does not end with a "hash" member of 64 hex digits', seq: seqInText(text) };
  }

  let body: Record<string, unknown>;
  try {
    body = JSON.parse(sealed.body) as Record<string, unknown>;
  } catch {
    return { ok: false, reason: "the line is not one JSON object", seq: seqInText(text) };
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) return { ok: false, reason: "the line is not a JSON object" };

  const { seq, prev_hash: prevHash } = body;
  if (typeof seq !== "number" || !Number.isSafeInteger(seq) || seq < 1) {
    return { ok: false, reason: `"seq" is ${JSON.stringify(seq)}, not a positive integer` };
  }
  if (typeof prevHash !== "string" || !HEX64.test(prevHash)) {
    return { ok: false, reason: `"prev_hash" is ${JSON.stringify(prevHash)}, not 64 hex digits`, seq };
  }

  if (carriageReturns > 0) {
    const change = `it ends with ${carriageReturns === 1 ? "a carriage return" : `${carriageReturns} carriage returns`} (0x0D) after its "hash" member, which the agent never writes (the file was converted to CRLF line endings or edited)`;
    return { ok: true, seq, prevHash, hash: sealed.hash, hashValid: false, change };
  }
  const computed = hashLineBody(bytes);
  return { ok: true, seq, prevHash, hash: sealed.hash, hashValid: computed === sealed.hash, computed };
}

/**
 * Hashes the bytes of a sealed line without its `hash` member, as sealLine() hashed the body: the
 * line up to `,"hash":"…"`, then the closing `}`. The suffix is ASCII, so its 75 characters are 75 bytes.
 */
function hashLineBody(bytes: Buffer): string {
  const bodyLength = bytes.length - HASH_SUFFIX_LENGTH + 1;
  const body = Buffer.allocUnsafe(bodyLength);
  bytes.copy(body, 0, 0, bodyLength - 1);
  body[bodyLength - 1] = 0x7d;
  return crypto.hash("sha256", body, "hex");
}

function seqInText(text: string): number | undefined {
  const match = SEQ_IN_TEXT.exec(text);
  return match ? Number(match[1]) : undefined;
}
