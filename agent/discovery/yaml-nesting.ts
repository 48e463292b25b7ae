// A nesting limit for YAML text from files. The yaml package (2.9) composes flow collections
// ({...} and [...]) recursively. About 2,000 nested flow maps, or 50,000 flow sequences, take the
// stack so deep that V8 cannot compile a regular expression there, and Node 20 then aborts the
// whole process ("RegExpCompiler Allocation failed") instead of throwing. Its parser also recurses
// once per block collection opened on one line ("a: b: c: ..."), and 1,800 of them before an
// indented line overflow the stack. The yaml lexer is not recursive, so it measures both first.

import { Lexer } from "yaml";

/**
 * The deepest nesting accepted, counting flow collections and the block indicators (`-`, `?`,
 * `:`) of one line. A Kubernetes object written as JSON nests about 12 levels.
 */
export const MAX_YAML_NESTING = 100;

/** The position of the first collection deeper than MAX_YAML_NESTING. */
export interface TooDeepNesting {
  /** Zero-based index of the YAML document. */
  document: number;
  /** One-based line of the collection that opens level MAX_YAML_NESTING + 1. */
  line: number;
}

const BLOCK_INDICATORS: ReadonlySet<string> = new Set(["-", "?", ":"]);

/** Tells whether a lexer token is document content: not a marker, directive, blank, line break or comment. */
function isContent(token: string): boolean {
  return token !== "---" && token !== "..." && !/^[#%]/.test(token) && token.trim() !== "" && !/^[\x00-\x1f]$/.test(token);
}

/** Returns where collections in `text` first nest deeper than MAX_YAML_NESTING, or undefined when they never do. */
export function findTooDeepNesting(text: string): TooDeepNesting | undefined {
  let flowDepth = 0;
  let lineIndicators = 0;
  // A "---" or "..." marker ends the document only when content came before it, as the parser counts documents.
  let document = 0;
  let documentHasContent = false;
  let line = 1;
  for (const token of new Lexer().lex(text)) {
    if ((token === "---" || token === "...") && documentHasContent) {
      document += 1;
      documentHasContent = false;
      flowDepth = 0;
    } else if (isContent(token)) {
      documentHasContent = true;
    }
    if (token === "{" || token === "[") {
      flowDepth += 1;
    } else if ((token === "}" || token === "]") && flowDepth > 0) {
      flowDepth -= 1;
    } else if (flowDepth === 0 && BLOCK_INDICATORS.has(token)) {
      lineIndicators += 1;
    }
    if (flowDepth + lineIndicators > MAX_YAML_NESTING) return { document, line };
    for (let index = token.indexOf("\n"); index >= 0; index = token.indexOf("\n", index + 1)) {
      line += 1;
      lineIndicators = 0;
    }
  }
  return undefined;
}
