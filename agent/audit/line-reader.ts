// Reads audit files as lines of raw bytes for `agentctl audit verify` and `audit query`. Lines end
// at 0x0A only: a 0x0D stays part of its line, and no byte is decoded or replaced, so a verifier
// hashes exactly what is on disk. Memory stays bounded by MAX_LINE_BYTES plus one read chunk.

import fs from "node:fs";

/**
 * Lines longer than this are not kept: the reader reports their length and drops their bytes. An
 * audit record is a few KiB at most (a connection record is under 1 KiB), so only a damaged or
 * forged line gets near 1 MiB.
 */
export const MAX_LINE_BYTES = 1 << 20;

/** Bytes read from the file at a time. */
const READ_CHUNK_BYTES = 1 << 20;

const EMPTY = Buffer.alloc(0);

/** One line of a file. */
export interface FileLine {
  /** Line number in the file, starting at 1. */
  number: number;
  /**
   * The bytes of the line without its 0x0A, empty when `tooLong`. They may share memory with the
   * read chunk: copy them to keep them past the next line.
   */
  bytes: Buffer;
  /** Length of the line in bytes, also when it was too long to keep. */
  length: number;
  /** The line is longer than the reader's limit, so its bytes were dropped. */
  tooLong: boolean;
  /** The file ends inside this line, without a 0x0A after it. */
  unterminated: boolean;
}

/** Yields the lines of `file` in order. Rejects when the file cannot be read. */
export async function* readFileLines(file: string, maxLineBytes = MAX_LINE_BYTES): AsyncGenerator<FileLine> {
  const input = fs.createReadStream(file, { highWaterMark: READ_CHUNK_BYTES });
  let pending: Buffer[] = [];
  let pendingLength = 0;
  let number = 0;
  for await (const chunk of input as AsyncIterable<Buffer>) {
    let start = 0;
    while (start < chunk.length) {
      const end = chunk.indexOf(0x0a, start);
      if (end === -1) {
        pendingLength += chunk.length - start;
        // Past the limit the bytes are dropped and only counted.
        pending = pendingLength > maxLineBytes ? [] : [...pending, chunk.subarray(start)];
        break;
      }
      number += 1;
      const length = pendingLength + end - start;
      yield completeLine(number, length, pending, chunk.subarray(start, end), maxLineBytes, false);
      pending = [];
      pendingLength = 0;
      start = end + 1;
    }
  }
  if (pendingLength > 0) yield completeLine(number + 1, pendingLength, pending, EMPTY, maxLineBytes, true);
}

function completeLine(number: number, length: number, pending: Buffer[], tail: Buffer, maxLineBytes: number, unterminated: boolean): FileLine {
  if (length > maxLineBytes) return { number, bytes: EMPTY, length, tooLong: true, unterminated };
  const bytes = pending.length === 0 ? tail : Buffer.concat([...pending, tail], length);
  return { number, bytes, length, tooLong: false, unterminated };
}
