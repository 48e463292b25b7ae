// Incremental parsing of a multi-document manifest file. The text is split at bare "---" document
// markers. A document whose text is the same as at the last parse keeps its parsed objects and
// problems, so an edit of one policy in a file of hundreds parses that document alone. A file
// with directives, "..." markers or content after "---" is parsed whole.

import type { Logger } from "../log";
import { parseManifests } from "./manifest-parse";
import type { ParseResult } from "./manifest-problem";

/** One document of a file, as parsed last. */
export interface ParsedDocument {
  text: string;
  /** One-based line of the document's first line in the file. */
  startLine: number;
  /** Zero-based index of the document in the file, as in ObjectSource. */
  index: number;
  result: ParseResult;
}

/** "---" alone, or followed by blanks and a comment; "---#x" is content, as YAML reads it. */
const BARE_MARKER = /^---([ \t]+(#.*)?)?$/;
const OTHER_MARKER = /^(---|\.\.\.)([ \t]|$)|^%/;

/**
 * Parses a file, reusing the documents of `previous` (the documents of the file's last parse)
 * whose text did not change. Returns the result and the documents to pass next time, which are
 * undefined when the file was parsed whole.
 */
export function parseManifestsReusing(
  file: string,
  text: string,
  previous: readonly ParsedDocument[] | undefined,
  logger?: Logger,
): { result: ParseResult; documents?: ParsedDocument[] } {
  const split = splitDocuments(text);
  if (split === undefined) return { result: parseManifests(file, text, logger) };

  const earlier = new Map((previous ?? []).map((document) => [document.index, document]));
  const documents = split.map(({ text: documentText, startLine }, index): ParsedDocument => {
    const before = earlier.get(index);
    if (before !== undefined && before.text === documentText) {
      return { text: documentText, startLine, index, result: shiftLines(before.result, startLine - before.startLine) };
    }
    // The parser numbers lines from the document's start; the file's numbers are shifted by its first line.
    const result = shiftLines(parseManifests(file, documentText, logger, index), startLine - 1);
    return { text: documentText, startLine, index, result };
  });

  // A syntax error can sit at a document's end, and the parser then reports it at the next
  // marker, so the whole file is parsed again for the same message as a plain parse.
  if (documents.some((document) => document.result.syntaxError)) return { result: parseManifests(file, text, logger), documents };
  const problems = documents.flatMap((document) => document.result.problems);
  const objects = documents.flatMap((document) => document.result.objects);
  return { result: { objects, problems, syntaxError: false }, documents };
}

/**
 * Splits a YAML stream at bare "---" lines, numbering the documents as the parser does. Text
 * before the first marker is a document only when it contains more than blank lines and comments.
 * Every part after a marker is one, even when empty. Returns undefined when another marker or a
 * directive appears, so the caller parses the file whole.
 */
export function splitDocuments(text: string): { text: string; startLine: number }[] | undefined {
  const lines = text.split("\n");
  const documents: { text: string; startLine: number }[] = [];
  let start = 0;
  let sawMarker = false;
  for (let index = 0; index <= lines.length; index += 1) {
    const line = index < lines.length ? lines[index].replace(/\r$/, "") : undefined;
    if (line !== undefined && !BARE_MARKER.test(line)) {
      if (OTHER_MARKER.test(line)) return undefined;
      continue;
    }
    // A part before a marker keeps the line break that ended its last line, "\r\n" included.
    const part = lines.slice(start, index).join("\n") + (index < lines.length && index > start ? "\n" : "");
    if (sawMarker || !onlyCommentsOrBlank(part)) documents.push({ text: part, startLine: start + 1 });
    sawMarker = true;
    start = index + 1;
  }
  return documents;
}

function onlyCommentsOrBlank(text: string): boolean {
  return text.split("\n").every((line) => /^[ \t]*(#.*)?\r?$/.test(line));
}

function shiftLines(result: ParseResult, by: number): ParseResult {
  if (by === 0) return result;
  return { ...result, problems: result.problems.map((problem) => (problem.line === undefined ? problem : { ...problem, line: problem.line + by })) };
}
