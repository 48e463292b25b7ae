// Verification of the audit hash chain in one or more files, read in the order given (rotated
// files oldest first, then the active file). Every line must carry a valid `hash` of its own bytes,
// a `prev_hash` equal to the previous record's hash, and a `seq` one above the previous record's.
// Files are streamed line by line as raw bytes, so memory stays bounded whatever their size, and
// each hash covers the bytes on disk rather than a decoded copy.

import { GENESIS_HASH } from "./chain";
import { MAX_LINE_BYTES, readFileLines, type FileLine } from "./line-reader";
import { parseChainLine } from "./verify-line";

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
  /**
   * Facts that are no problem, such as a chain that starts past seq 1 because older files were
   * removed, or files that hold no record.
   */
  notes: string[];
  /** True when at least one record was read and no problem was found. */
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

/** Problems at the first record of a file that may come from files given in the wrong order. */
const FILE_BOUNDARY_KINDS: ReadonlySet<ChainProblemKind> = new Set(["chain_restart", "gap", "reorder", "broken_link"]);

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

/** The seqs of the first and last record of one file. */
interface FileChain {
  file: string;
  firstSeq: number;
  lastSeq: number;
}

/**
 * Checks the chain across `files`, in the order given. When their records show that the files were
 * given out of order, it checks them again in the order of their seqs and reports one reorder
 * problem for the order. Rejects when a file cannot be read.
 */
export async function verifyAuditFiles(files: readonly string[]): Promise<VerifyReport> {
  const given = await readInOrder(files);
  const order = given.chainOrder();
  if (order === undefined) return given.finish();
  const sorted = await readInOrder(order.files);
  return sorted.finishReordered(files, order.problem);
}

async function readInOrder(files: readonly string[]): Promise<ChainVerifier> {
  const verifier = new ChainVerifier([...files]);
  for (const file of files) {
    verifier.startFile();
    for await (const line of readFileLines(file)) verifier.check(line, { file, line: line.number });
  }
  return verifier;
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
  /** Malformed lines since the last record, and the first of them: a gap after them names them. */
  private malformedRun = 0;
  private firstMalformed: Position | undefined;
  /** The first and last seq of each file that contains records, in the order read. */
  private readonly fileChains: FileChain[] = [];
  private currentFile: FileChain | undefined;
  /** The first problem found at the first record of a file: files given in the wrong order show there. */
  private firstFileBoundaryProblem: ChainProblem | undefined;
  private atFileBoundary = false;
  private problemCount = 0;
  private readonly problems: ChainProblem[] = [];
  private readonly problemsByKind: Partial<Record<ChainProblemKind, number>> = {};
  private readonly notes: string[] = [];

  constructor(private readonly files: string[]) {}

  /** Starts the next file: its first record is where files given in the wrong order show. */
  startFile(): void {
    this.currentFile = undefined;
  }

  check(line: FileLine, at: Position): void {
    this.lines += 1;
    if (line.tooLong) {
      this.reportMalformed({ reason: `the line is ${line.length} bytes long, more than the limit of ${MAX_LINE_BYTES} bytes (1 MiB) for one record, so it was not read` }, at);
    } else {
      this.checkRecord(line.bytes, at);
    }
    if (line.unterminated) this.markTornLastLine(at);
  }

  private checkRecord(bytes: Buffer, at: Position): void {
    const parsed = parseChainLine(bytes);
    if (!parsed.ok) {
      this.reportMalformed(parsed, at);
      return;
    }
    this.records += 1;
    if (!parsed.hashValid) {
      const change = parsed.change ?? `its content hashes to ${short(parsed.computed!)}, but its "hash" member is ${short(parsed.hash)}`;
      this.report({
        kind: "hash_mismatch",
        ...at,
        seq: parsed.seq,
        expected: parsed.computed,
        found: parsed.hash,
        message: `${where(at)} (seq ${parsed.seq}) was changed after it was written: ${change}`,
      });
    }
    this.trackFile(parsed.seq, parsed.prevHash, parsed.hash, at);
  }

  /** Records the seqs where the current file starts and ends, and links the record to the ones before it. */
  private trackFile(seq: number, prevHash: string, hash: string, at: Position): void {
    if (this.currentFile === undefined) {
      this.currentFile = { file: at.file, firstSeq: seq, lastSeq: seq };
      this.fileChains.push(this.currentFile);
      this.atFileBoundary = true;
    }
    this.link(seq, prevHash, hash, at);
    this.atFileBoundary = false;
    this.currentFile.lastSeq = seq;
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
    } else {
      this.reportGap(seq, at, malformedBefore);
    }
    this.advance(seq, hash, at);
  }

  /** Checks the first record read: it may start past seq 1 when older files were removed. */
  private startChain(seq: number, prevHash: string, at: Position): void {
    this.firstSeq = seq;
    this.firstPrevHash = prevHash;
    this.firstPosition = at;
    if (seq === 1 && prevHash !== GENESIS_HASH) {
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

  /**
   * Reports a line without a record that can be checked. It never takes the place of a record, even
   * when a seq can be read from it, so the next record reports the seqs it skipped as a gap.
   */
  private reportMalformed(parsed: { reason: string; seq?: number }, at: Position): void {
    this.report({
      kind: "malformed",
      ...at,
      seq: parsed.seq,
      message: `${where(at)}${parsed.seq === undefined ? "" : ` (seq ${parsed.seq})`} is malformed: ${parsed.reason}; the record cannot be checked, and the link to the next record is skipped`,
    });
    if (this.malformedRun === 0) this.firstMalformed = at;
    this.malformedRun += 1;
    this.lastHash = undefined;
  }

  /** Called when a file does not end with a newline: its last line is incomplete. */
  private markTornLastLine(at: Position): void {
    const problem = this.problems.find((candidate) => candidate.file === at.file && candidate.line === at.line && candidate.kind === "malformed");
    if (problem !== undefined) {
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

  private reportGap(seq: number, at: Position, malformedBefore: number): void {
    const from = this.lastSeq!;
    const missing = seq - from - 1;
    const records = missing === 1 ? `1 record (seq ${from + 1}) is` : `${missing} records (seq ${from + 1} to ${seq - 1}) are`;
    const them = missing === 1 ? "it" : "them";
    let malformed = "so lines were removed";
    if (malformedBefore === 1) malformed = `so lines were removed or replaced: the malformed line ${where(this.firstMalformed!)} may have held ${them}, but cannot be checked`;
    if (malformedBefore > 1) malformed = `so lines were removed or replaced: the ${malformedBefore} malformed lines from ${where(this.firstMalformed!)} on may have held ${them}, but cannot be checked`;
    const problem: ChainProblem = {
      kind: "gap",
      ...at,
      seq,
      expected: `seq ${from + 1}`,
      found: `seq ${seq}`,
      missing,
      message: `${where(at)} has seq ${seq} right after seq ${from}: ${records} missing, ${malformed}`,
    };
    this.report(problem);
    this.openGaps.push({ from, to: seq, found: 0, problem });
    if (this.openGaps.length > MAX_OPEN_GAPS) this.openGaps.shift();
  }

  private report(problem: ChainProblem): void {
    this.problemCount += 1;
    this.problemsByKind[problem.kind] = (this.problemsByKind[problem.kind] ?? 0) + 1;
    if (this.problems.length < MAX_REPORTED_PROBLEMS) this.problems.push(problem);
    if (this.atFileBoundary && FILE_BOUNDARY_KINDS.has(problem.kind)) this.firstFileBoundaryProblem ??= problem;
  }

  finish(): VerifyReport {
    this.detectChainHalvesSwapped();
    this.reportUnfilledReorders();
    this.noteChainStart();
    if (this.records === 0) {
      this.notes.push(
        `the ${this.files.length === 1 ? "file holds" : "files hold"} no record (${countOf(this.lines, "line")} read), so there is nothing to check. A file emptied or cut short by someone who may write it looks the same: only the last seq and hash held elsewhere, such as by a remote sink, show what is missing`,
      );
    }
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
      intact: this.problemCount === 0 && this.records > 0,
    };
  }

  /** Notes a chain that starts past seq 1: older records are in files not given, which is no problem. */
  private noteChainStart(): void {
    if (this.firstSeq === undefined || this.firstSeq === 1) return;
    const at = this.firstPosition!;
    this.notes.push(
      `${where(at)}: the chain starts at seq ${this.firstSeq}, so records 1 to ${this.firstSeq - 1} are in files not given here (rotated files that were removed, for example); their links cannot be checked`,
    );
  }

  /**
   * Returns the files sorted by the seq of their first record, with the first problem that their
   * given order caused, when sorting puts the seq ranges one after another without overlap. Returns
   * undefined when the order given is already that order or sorting does not help (a chain that
   * restarted, or overlapping files). Files without records go last.
   */
  chainOrder(): { files: string[]; problem: ChainProblem } | undefined {
    const problem = this.firstFileBoundaryProblem;
    const given = this.fileChains;
    if (problem === undefined || given.length < 2) return undefined;
    const sorted = [...given].sort((a, b) => a.firstSeq - b.firstSeq);
    if (sorted.every((chain, index) => chain === given[index])) return undefined;
    if (!sorted.every((chain, index) => index === 0 || chain.firstSeq > sorted[index - 1].lastSeq)) return undefined;
    const withRecords = new Set(given.map((chain) => chain.file));
    return { files: [...sorted.map((chain) => chain.file), ...this.files.filter((file) => !withRecords.has(file))], problem };
  }

  /**
   * Finishes a check of files that were read in chain order because `givenFiles` were out of order,
   * adding one reorder problem at `firstBoundary`, the first place where the given order broke.
   */
  finishReordered(givenFiles: readonly string[], firstBoundary: ChainProblem): VerifyReport {
    const report = this.finish();
    const order = this.fileChains.map((chain) => `${chain.file} (seq ${chain.firstSeq} to ${chain.lastSeq})`).join(", ");
    const problem: ChainProblem = {
      kind: "reorder",
      file: firstBoundary.file,
      line: firstBoundary.line,
      seq: firstBoundary.seq,
      expected: `files in chain order: ${this.files.join(", ")}`,
      found: `files in the order given: ${givenFiles.join(", ")}`,
      message: `${where(firstBoundary)} (seq ${firstBoundary.seq}) does not follow the file before it: the files are out of order, so they were checked in the order of their seqs, ${order}; give rotated files oldest first, then the active file`,
    };
    report.files = [...givenFiles];
    report.problems.unshift(problem);
    if (report.problems.length > MAX_REPORTED_PROBLEMS) report.problems.pop();
    report.problemCount += 1;
    report.problemsByKind.reorder = (report.problemsByKind.reorder ?? 0) + 1;
    report.intact = false;
    return report;
  }

  /**
   * Turns the last chain_restart into a reorder when the chain that follows it ends with the record
   * the first one links to: then the records were given in the wrong order rather than the spool reset.
   */
  private detectChainHalvesSwapped(): void {
    const restart = this.lastRestart;
    if (restart === undefined || this.firstSeq === undefined || this.lastHash === undefined) return;
    if (this.lastSeq! + 1 !== this.firstSeq || this.lastHash !== this.firstPrevHash) return;
    this.problemsByKind.chain_restart = (this.problemsByKind.chain_restart ?? 1) - 1;
    this.problemsByKind.reorder = (this.problemsByKind.reorder ?? 0) + 1;
    restart.kind = "reorder";
    restart.message = `${where(restart)} (seq 1) comes after ${where(this.firstPosition!)} (seq ${this.firstSeq}), although the chain from seq 1 ends at seq ${this.lastSeq} and links to it: the lines are out of order (files given in the wrong order, or a part of a file moved); give rotated files oldest first, then the active file`;
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

function countOf(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}
