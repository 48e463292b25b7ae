// Verification of the audit hash chain in one or more files, read in the order given (rotated
// files oldest first, then the active file). Every line must carry a valid `hash` of its own bytes,
// a `prev_hash` equal to the previous record's hash, and a `seq` one above the previous record's.
// Files are streamed line by line, so memory stays bounded whatever their size.

import fs from "node:fs";
import readline from "node:readline";
import { GENESIS_HASH, hashBody, unsealLine } from "./chain";

/** Kind of break in the chain at one line. */
export type ChainProblemKind =
  | "hash_mismatch"
  | "broken_link"
  | "gap"
  | "reorder"
  | "duplicate"
  | "malformed"
  | "chain_restart";

/** The first line at which the chain breaks in one way, with what was expected there and what was found. */
export interface ChainProblem {
  kind: ChainProblemKind;
  file: string;
  /** Line number in `file`, starting at 1. */
  line: number;
  /** `seq` of the line, absent when the line has none that can be read. */
  seq?: number;
  expected?: string;
  found?: string;
  /** gap only: how many records are missing. */
  missing?: number;
  /** One sentence stating what is wrong, where, and what it means. */
  message: string;
}

export interface VerifyReport {
  files: string[];
  /** Lines read, including malformed ones. */
  lines: number;
  /** Lines that carry a readable record with a valid hash. */
  records: number;
  firstSeq?: number;
  lastSeq?: number;
  /** `hash` of the last record: compare it with a copy kept elsewhere to detect a chain re-hashed to its end. */
  lastHash?: string;
  /** Problems found, in file order; the first MAX_REPORTED_PROBLEMS are listed in `problems`. */
  problemCount: number;
  problems: ChainProblem[];
  problemsByKind: Partial<Record<ChainProblemKind, number>>;
  /** Facts that are no problem, such as a chain that starts past seq 1 because older files were removed. */
  notes: string[];
  intact: boolean;
}

/** Problems listed in a report; further ones are only counted. */
export const MAX_REPORTED_PROBLEMS = 1000;

/**
 * Records whose seq and hash the verifier remembers, to tell a duplicate line from a line that
 * moved back. NOTE: a line repeated from further back than this is reported as `reorder`.
 */
const SEQ_WINDOW = 8192;

/** Forward jumps whose missing seqs may still turn up later (as moved lines); older ones stay gaps. */
const MAX_OPEN_GAPS = 64;

const HEX64 = /^[0-9a-f]{64}$/;
const SEQ_IN_TEXT = /"seq":(\d{1,15})[,}]/;

/** Position of a line: the file and its line number. */
interface Position {
  file: string;
  line: number;
}

/** A forward jump of seq whose missing records may still appear later in the files. */
interface OpenGap {
  from: number;
  to: number;
  found: number;
  problem: ChainProblem;
}

/** A line read back: either a record with its chain fields, or the reason it is malformed. */
type ParsedLine =
  | { ok: true; seq: number; prevHash: string; hash: string; hashValid: boolean; computed: string }
  | { ok: false; reason: string; seq?: number };

/** Checks the chain across `files`, in the order given. Rejects when a file cannot be read. */
export async function verifyAuditFiles(files: readonly string[]): Promise<VerifyReport> {
  const verifier = new ChainVerifier([...files]);
  for (const file of files) {
    let line = 0;
    const input = fs.createReadStream(file, { encoding: "utf8", highWaterMark: 1 << 20 });
    const lines = readline.createInterface({ input, crlfDelay: Infinity });
    for await (const text of lines) {
      line += 1;
      verifier.check(text, { file, line });
    }
    if (line > 0 && !(await endsWithNewline(file))) verifier.markTornLastLine({ file, line });
  }
  return verifier.finish();
}

/** Reads the last byte of a non-empty file. */
async function endsWithNewline(file: string): Promise<boolean> {
  const handle = await fs.promises.open(file, "r");
  try {
    const { size } = await handle.stat();
    if (size === 0) return true;
    const byte = Buffer.alloc(1);
    await handle.read(byte, 0, 1, size - 1);
    return byte[0] === 0x0a;
  } finally {
    await handle.close();
  }
}

/** Parses one line and checks its hash, without looking at other lines. */
export function parseChainLine(text: string): ParsedLine {
  if (text === "") return { ok: false, reason: "the line is empty" };
  const sealed = unsealLine(text);
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
  const computed = hashBody(sealed.body);
  return { ok: true, seq, prevHash, hash: sealed.hash, hashValid: computed === sealed.hash, computed };
}

function seqInText(text: string): number | undefined {
  const match = SEQ_IN_TEXT.exec(text);
  return match ? Number(match[1]) : undefined;
}

/** The chain state between lines. One instance checks one sequence of files. */
class ChainVerifier {
  private lines = 0;
  private records = 0;
  private firstSeq: number | undefined;
  private firstPrevHash: string | undefined;
  private firstPosition: Position | undefined;
  private lastRestart: ChainProblem | undefined;
  /** Highest seq seen since the chain (re)started, its hash (undefined when unknown) and position. */
  private lastSeq: number | undefined;
  private lastHash: string | undefined;
  private lastPosition: Position | undefined;
  private readonly recent = new Map<number, { hash: string; position: Position }>();
  private openGaps: OpenGap[] = [];
  /** Malformed lines since the last good record: they may hold the seqs that seem to be missing. */
  private malformedRun = 0;
  private problemCount = 0;
  private readonly problems: ChainProblem[] = [];
  private readonly problemsByKind: Partial<Record<ChainProblemKind, number>> = {};
  private readonly notes: string[] = [];

  constructor(private readonly files: string[]) {}

  check(text: string, at: Position): void {
    this.lines += 1;
    const parsed = parseChainLine(text);
    if (!parsed.ok) {
      this.reportMalformed(parsed, at);
      return;
    }
    this.records += 1;
    if (!parsed.hashValid) {
      this.report({
        kind: "hash_mismatch",
        ...at,
        seq: parsed.seq,
        expected: parsed.computed,
        found: parsed.hash,
        message: `${where(at)} (seq ${parsed.seq}) was changed after it was written: its content hashes to ${short(parsed.computed)}, but its "hash" member is ${short(parsed.hash)}`,
      });
    }
    this.link(parsed.seq, parsed.prevHash, parsed.hash, at);
  }

  /** Compares a record with the ones before it, then makes it the new end of the chain. */
  private link(seq: number, prevHash: string, hash: string, at: Position): void {
    const malformedBefore = this.malformedRun;
    this.malformedRun = 0;
    if (this.lastSeq === undefined) {
      this.startChain(seq, prevHash, at);
      this.advance(seq, hash, at);
      return;
    }
    const earlier = this.recent.get(seq);
    if (earlier !== undefined && earlier.hash === hash) {
      this.reportDuplicate(seq, at, earlier.position);
      return;
    }
    if (seq === 1 && prevHash === GENESIS_HASH) {
      this.reportRestart(at);
      this.recent.clear();
      this.openGaps = [];
      this.advance(seq, hash, at);
      return;
    }
    if (seq <= this.lastSeq) {
      this.placeBehind(seq, prevHash, hash, at);
      return;
    }
    if (seq === this.lastSeq + 1) {
      if (this.lastHash !== undefined && prevHash !== this.lastHash) this.reportBrokenLink(seq, prevHash, this.lastHash, at);
    } else if (seq - this.lastSeq - 1 > malformedBefore) {
      this.reportGap(seq, at);
    }
    this.advance(seq, hash, at);
  }

  /** Checks the first record read: it may start past seq 1 when older files were removed. */
  private startChain(seq: number, prevHash: string, at: Position): void {
    this.firstSeq = seq;
    this.firstPrevHash = prevHash;
    this.firstPosition = at;
    if (seq > 1) {
      this.notes.push(`${where(at)}: the chain starts at seq ${seq}, so records 1 to ${seq - 1} are in files not given here (rotated files that were removed, for example); their links cannot be checked`);
      return;
    }
    if (prevHash !== GENESIS_HASH) {
      this.report({
        kind: "broken_link",
        ...at,
        seq,
        expected: GENESIS_HASH,
        found: prevHash,
        message: `${where(at)} is seq 1 but its prev_hash is ${short(prevHash)} instead of 64 zeros: the first record was replaced`,
      });
    }
  }

  /** Handles a record whose seq is not above the highest one seen: a moved line, or one inserted twice. */
  private placeBehind(seq: number, prevHash: string, hash: string, at: Position): void {
    const gap = this.openGaps.find((candidate) => seq > candidate.from && seq < candidate.to);
    if (gap !== undefined) {
      gap.found += 1;
      this.convertToReorder(gap, seq, at);
      const before = this.recent.get(seq - 1);
      if (before !== undefined && before.hash !== prevHash) this.reportBrokenLink(seq, prevHash, before.hash, at);
      this.remember(seq, hash, at);
      return;
    }
    const earlier = this.recent.get(seq);
    this.report({
      kind: "reorder",
      ...at,
      seq,
      expected: `seq ${this.lastSeq! + 1}`,
      found: `seq ${seq}`,
      message:
        earlier === undefined
          ? `${where(at)} has seq ${seq} after seq ${this.lastSeq} (${where(this.lastPosition!)}): the seq goes back, so lines were moved or inserted here`
          : `${where(at)} has seq ${seq}, which ${where(earlier.position)} already has with a different hash: a second record with the same seq was inserted`,
    });
  }

  /** Turns the gap of an earlier jump into a reorder, now that a record it missed was found later. */
  private convertToReorder(gap: OpenGap, seq: number, at: Position): void {
    const { problem } = gap;
    if (problem.kind === "reorder") return;
    this.problemsByKind.gap = (this.problemsByKind.gap ?? 1) - 1;
    this.problemsByKind.reorder = (this.problemsByKind.reorder ?? 0) + 1;
    problem.kind = "reorder";
    problem.missing = undefined;
    problem.message = `${where(problem)} has seq ${problem.seq} where seq ${gap.from + 1} was expected, and seq ${seq} comes later at ${where(at)}: lines are out of order (moved or swapped)`;
  }

  private advance(seq: number, hash: string, at: Position): void {
    this.lastSeq = seq;
    this.lastHash = hash;
    this.lastPosition = at;
    this.remember(seq, hash, at);
  }

  private remember(seq: number, hash: string, at: Position): void {
    this.recent.delete(seq);
    this.recent.set(seq, { hash, position: at });
    if (this.recent.size > SEQ_WINDOW) this.recent.delete(this.recent.keys().next().value!);
  }

  private reportMalformed(parsed: { reason: string; seq?: number }, at: Position): void {
    this.report({
      kind: "malformed",
      ...at,
      seq: parsed.seq,
      message: `${where(at)}${parsed.seq === undefined ? "" : ` (seq ${parsed.seq})`} is malformed: ${parsed.reason}; the record cannot be checked, and the link to the next record is skipped`,
    });
    if (parsed.seq !== undefined && this.lastSeq !== undefined && parsed.seq === this.lastSeq + 1) {
      // The seq is readable, so the chain goes on from it; its hash is unknown.
      this.lastSeq = parsed.seq;
      this.lastHash = undefined;
      this.lastPosition = at;
      return;
    }
    this.malformedRun += 1;
    this.lastHash = undefined;
  }

  /** Called when a file does not end with a newline: its last line is incomplete. */
  markTornLastLine(at: Position): void {
    const alreadyMalformed = this.problems.some((problem) => problem.file === at.file && problem.line === at.line && problem.kind === "malformed");
    if (alreadyMalformed) {
      const problem = this.problems.find((candidate) => candidate.file === at.file && candidate.line === at.line)!;
      problem.message += ". The file does not end with a newline, so the writer stopped in the middle of this line (a crash or a full disk)";
      return;
    }
    this.report({
      kind: "malformed",
      ...at,
      message: `${where(at)} has no newline at the end of the file: the writer stopped in the middle of the line (a crash or a full disk), although what it wrote verifies`,
    });
  }

  private reportDuplicate(seq: number, at: Position, earlier: Position): void {
    this.report({
      kind: "duplicate",
      ...at,
      seq,
      found: `seq ${seq} again`,
      message: `${where(at)} repeats the record of ${where(earlier)} (seq ${seq}, same hash): a line was written or copied twice`,
    });
  }

  private reportRestart(at: Position): void {
    this.lastRestart = {
      kind: "chain_restart",
      ...at,
      seq: 1,
      expected: `seq ${this.lastSeq! + 1}`,
      found: "seq 1 with the genesis prev_hash",
      message: `${where(at)} starts a new chain (seq 1, prev_hash of 64 zeros) after seq ${this.lastSeq} at ${where(this.lastPosition!)}: the agent's spool was reset, so the two chains are not linked and records in between may be lost`,
    };
    this.report(this.lastRestart);
  }

  private reportBrokenLink(seq: number, found: string, expected: string, at: Position): void {
    const previous = this.recent.get(seq - 1)?.position ?? this.lastPosition!;
    this.report({
      kind: "broken_link",
      ...at,
      seq,
      expected,
      found,
      message: `${where(at)} (seq ${seq}) has prev_hash ${short(found)}, but the record before it, ${where(previous)} (seq ${seq - 1}), has hash ${short(expected)}: one of the two lines was replaced, or the chain was re-hashed from ${where(previous)} on`,
    });
  }

  private reportGap(seq: number, at: Position): void {
    const from = this.lastSeq!;
    const missing = seq - from - 1;
    const problem: ChainProblem = {
      kind: "gap",
      ...at,
      seq,
      expected: `seq ${from + 1}`,
      found: `seq ${seq}`,
      missing,
      message: `${where(at)} has seq ${seq} right after seq ${from}: ${missing === 1 ? `1 record (seq ${from + 1}) is` : `${missing} records (seq ${from + 1} to ${seq - 1}) are`} missing, so lines were removed`,
    };
    this.report(problem);
    this.openGaps.push({ from, to: seq, found: 0, problem });
    if (this.openGaps.length > MAX_OPEN_GAPS) this.openGaps.shift();
  }

  private report(problem: ChainProblem): void {
    this.problemCount += 1;
    this.problemsByKind[problem.kind] = (this.problemsByKind[problem.kind] ?? 0) + 1;
    if (this.problems.length < MAX_REPORTED_PROBLEMS) this.problems.push(problem);
  }

  finish(): VerifyReport {
    this.reportUnfilledReorders();
    this.detectFilesOutOfOrder();
    for (const kind of Object.keys(this.problemsByKind) as ChainProblemKind[]) {
      if (this.problemsByKind[kind] === 0) delete this.problemsByKind[kind];
    }
    return {
      files: this.files,
      lines: this.lines,
      records: this.records,
      firstSeq: this.firstSeq,
      lastSeq: this.lastSeq,
      lastHash: this.lastHash,
      problemCount: this.problemCount,
      problems: this.problems,
      problemsByKind: this.problemsByKind,
      notes: this.notes,
      intact: this.problemCount === 0,
    };
  }

  /**
   * Turns the last chain_restart into a reorder when the chain that follows it ends with the record
   * the first one links to: then the files were given in the wrong order rather than the spool reset.
   */
  private detectFilesOutOfOrder(): void {
    const restart = this.lastRestart;
    if (restart === undefined || this.firstSeq === undefined || this.lastHash === undefined) return;
    if (this.lastSeq! + 1 !== this.firstSeq || this.lastHash !== this.firstPrevHash) return;
    this.problemsByKind.chain_restart = (this.problemsByKind.chain_restart ?? 1) - 1;
    this.problemsByKind.reorder = (this.problemsByKind.reorder ?? 0) + 1;
    restart.kind = "reorder";
    restart.message = `${where(restart)} (seq 1) comes after ${where(this.firstPosition!)} (seq ${this.firstSeq}), although the chain from seq 1 ends at seq ${this.lastSeq} and links to it: the files are out of order; give rotated files oldest first, then the active file`;
  }

  /** Reports the records that a jump partly filled by moved lines still misses: they appear nowhere. */
  private reportUnfilledReorders(): void {
    for (const gap of this.openGaps) {
      const missing = gap.to - gap.from - 1 - gap.found;
      if (gap.problem.kind !== "reorder" || missing <= 0) continue;
      this.report({
        kind: "gap",
        file: gap.problem.file,
        line: gap.problem.line,
        seq: gap.problem.seq,
        missing,
        message: `${where(gap.problem)}: besides the lines out of order, ${missing} of the records seq ${gap.from + 1} to ${gap.to - 1} appear nowhere, so lines were removed`,
      });
    }
  }
}

function where(at: Position): string {
  return `${at.file}:${at.line}`;
}

/** Shortens a hash to its first 12 hex digits, enough to compare by eye. */
function short(hash: string): string {
  return hash.length > 12 ? `${hash.slice(0, 12)}…` : hash;
}
