// Mutations of corpus entries as fast-check arbitraries: byte flips, insertions of bytes or of
// target tokens, deletions, truncations, repeats of a slice, and splices of two entries. The
// mutations are plain data, so fast-check shrinks a failing input by dropping mutations.

import fc from "fast-check";

type Mutation =
  | { kind: "flip"; at: number; bit: number }
  | { kind: "set"; at: number; byte: number }
  | { kind: "insert"; at: number; bytes: Uint8Array }
  | { kind: "token"; at: number; token: number }
  | { kind: "delete"; at: number; length: number }
  | { kind: "truncate"; at: number }
  | { kind: "repeat"; at: number; length: number; times: number }
  | { kind: "splice"; at: number; other: number; from: number; length: number };

const position = fc.nat();

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant("flip" as const), at: position, bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant("set" as const), at: position, byte: fc.constantFrom(0x00, 0x0a, 0x0d, 0x22, 0x5c, 0x7f, 0x80, 0xff, 0x3a, 0x2c) }),
  fc.record({ kind: fc.constant("insert" as const), at: position, bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }) }),
  fc.record({ kind: fc.constant("token" as const), at: position, token: fc.nat() }),
  fc.record({ kind: fc.constant("delete" as const), at: position, length: fc.integer({ min: 1, max: 64 }) }),
  fc.record({ kind: fc.constant("truncate" as const), at: position }),
  fc.record({ kind: fc.constant("repeat" as const), at: position, length: fc.integer({ min: 1, max: 32 }), times: fc.integer({ min: 2, max: 2000 }) }),
  fc.record({ kind: fc.constant("splice" as const), at: position, other: fc.nat(), from: position, length: fc.integer({ min: 1, max: 256 }) }),
);

/**
 * Inputs made by one to eight mutations of a corpus entry. `tokens` are byte strings worth
 * inserting whole (quotes, separators, escapes of the target's format). Results are cut to `maxBytes`.
 */
export function mutatedInputs(corpus: readonly Buffer[], tokens: readonly Buffer[], maxBytes: number): fc.Arbitrary<Buffer> {
  const bases = corpus.length > 0 ? corpus : [Buffer.alloc(0)];
  return fc
    .record({ base: fc.nat(), mutations: fc.array(mutation, { minLength: 1, maxLength: 8 }) })
    .map(({ base, mutations }) => {
      let bytes = bases[base % bases.length];
      for (const change of mutations) bytes = applyMutation(bytes, change, bases, tokens, maxBytes);
      return bytes;
    });
}

function applyMutation(bytes: Buffer, change: Mutation, corpus: readonly Buffer[], tokens: readonly Buffer[], maxBytes: number): Buffer {
  const at = change.at % (bytes.length + 1);
  const head = bytes.subarray(0, at);
  switch (change.kind) {
    case "flip":
    case "set": {
      if (bytes.length === 0) return bytes;
      const copy = Buffer.from(bytes);
      const index = change.at % bytes.length;
      copy[index] = change.kind === "flip" ? copy[index] ^ (1 << change.bit) : change.byte;
      return copy;
    }
    case "insert":
      return capped([head, Buffer.from(change.bytes), bytes.subarray(at)], maxBytes);
    case "token":
      return tokens.length === 0 ? bytes : capped([head, tokens[change.token % tokens.length], bytes.subarray(at)], maxBytes);
    case "delete":
      return Buffer.concat([head, bytes.subarray(at + change.length)]);
    case "truncate":
      return head;
    case "repeat": {
      const slice = bytes.subarray(at, at + change.length);
      if (slice.length === 0) return bytes;
      const count = Math.min(change.times, Math.floor(maxBytes / slice.length));
      return capped([head, ...new Array<Buffer>(count).fill(slice), bytes.subarray(at)], maxBytes);
    }
    case "splice": {
      const other = corpus[change.other % corpus.length];
      const from = change.from % (other.length + 1);
      return capped([head, other.subarray(from, from + change.length), bytes.subarray(at)], maxBytes);
    }
  }
}

function capped(parts: Buffer[], maxBytes: number): Buffer {
  const joined = Buffer.concat(parts);
  return joined.length > maxBytes ? joined.subarray(0, maxBytes) : joined;
}
