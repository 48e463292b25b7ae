// Fuzz targets of the audit readers behind `agentctl audit verify` and `audit query`: one sealed
// line, whole files (whose lines anyone with write access may have edited), and the filters given
// on the command line.

import fc from "fast-check";
import { sealLine } from "../../../agent/audit/chain";
import { readFileLines } from "../../../agent/audit/line-reader";
import { parseAuditQuery, queryAuditFiles, type AuditQuery, type AuditQueryOptions } from "../../../agent/audit/query";
import { parseChainLine } from "../../../agent/audit/verify-line";
import { verifyAuditFiles } from "../../../agent/audit/verify";
import { invariant, type FuzzTarget } from "../runner";
import { writeTempFile } from "../temp-file";
import { isAgentError } from "./hbone";

const HEX64 = /^[0-9a-f]{64}$/;
const AUDIT_TOKENS = ['"seq":', '"prev_hash":', '"hash":"', "0".repeat(64), '"}', "{", "}", "\\u0000", "\r", "\n", "\u2028", "\xff", '"type":"connection.completed"'];

/** A JSON object with the chain fields, sealed as the agent seals it. */
const sealedLines = fc
  .record({ seq: fc.integer({ min: 1, max: 2 ** 40 }), extra: fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 3 }), { maxKeys: 4 }) })
  .map(({ seq, extra }) => Buffer.from(sealLine(JSON.stringify({ ...extra, seq, prev_hash: "0".repeat(64) })).line, "utf8"));

export const auditLine: FuzzTarget = {
  name: "audit-line",
  tokens: AUDIT_TOKENS,
  maxBytes: 8192,
  arbitraries: [sealedLines],
  run(input) {
    const parsed = parseChainLine(input);
    if (!parsed.ok) return;
    invariant(Number.isSafeInteger(parsed.seq) && parsed.seq >= 1, () => `the line was accepted with seq ${parsed.seq}`);
    invariant(HEX64.test(parsed.prevHash) && HEX64.test(parsed.hash), () => `the line was accepted with prev_hash ${parsed.prevHash} and hash ${parsed.hash}`);
    if (parsed.hashValid) invariant(parsed.computed === parsed.hash, () => `the hash ${parsed.hash} was accepted against the computed ${parsed.computed}`);
    const resealed = sealLine(`${input.toString("utf8").slice(0, -75)}}`).line;
    if (parsed.hashValid) invariant(resealed === input.toString("utf8"), () => "a line with a valid hash differs from the same body sealed again");
  },
  expected: () => false,
};

const FILE_QUERIES: AuditQuery[] = [
  {},
  { type: { value: "connection.", prefix: true }, decision: "deny" },
  { identity: { value: "spiffe://cluster.local/ns/shop/", prefix: true }, limit: 2 },
  { workload: { namespace: "shop", name: "web" }, since: 0, until: Date.parse("2100-01-01T00:00:00Z") },
  { namespace: "shop", policy: "backend/api-allow-web", limit: 1 },
];

/** Small enough that generated files have lines past the limit. */
const FUZZ_MAX_LINE_BYTES = 200;

/**
 * Per-input bound of the file target, which reads each input six times at about 5 µs per line and
 * pass: 16 KiB of empty lines takes about 500 ms here, so 100 ms is too tight.
 */
const AUDIT_FILE_INPUT_MS = 1_000;

export const auditFiles: FuzzTarget = {
  name: "audit-files",
  tokens: AUDIT_TOKENS,
  maxBytes: 16384,
  inputMs: AUDIT_FILE_INPUT_MS,
  async run(input) {
    const file = writeTempFile("audit.jsonl", input);
    await checkLines(file, input);
    const report = await verifyAuditFiles([file]);
    invariant(typeof report === "object" && report !== null, () => "verifyAuditFiles returned no report");
    for (const query of FILE_QUERIES) {
      let delivered = 0;
      const summary = await queryAuditFiles([file], query, (match) => {
        delivered += 1;
        invariant(typeof match.record === "object" && match.record !== null, () => "a match has no record");
      });
      const expected = query.limit === undefined ? summary.matched : Math.min(summary.matched, query.limit);
      invariant(delivered === expected, () => `query ${JSON.stringify(query)} delivered ${delivered} matches of ${summary.matched} with limit ${query.limit}`);
    }
  },
  expected: () => false,
};

/** Checks that the lines the reader yields put together give the file back, with the long ones counted. */
async function checkLines(file: string, input: Buffer): Promise<void> {
  const parts: Buffer[] = [];
  let number = 0;
  let total = 0;
  for await (const line of readFileLines(file, FUZZ_MAX_LINE_BYTES)) {
    number += 1;
    invariant(line.number === number, () => `line ${number} came with number ${line.number}`);
    invariant(line.tooLong === line.length > FUZZ_MAX_LINE_BYTES, () => `line ${number} of ${line.length} bytes has tooLong ${line.tooLong}`);
    if (!line.tooLong) {
      invariant(line.bytes.length === line.length, () => `line ${number} has ${line.bytes.length} bytes, but its length is ${line.length}`);
      parts.push(line.bytes);
    } else {
      parts.push(input.subarray(total, total + line.length));
    }
    total += line.length + (line.unterminated ? 0 : 1);
    if (!line.unterminated) parts.push(Buffer.from("\n"));
  }
  invariant(total === input.length, () => `the lines cover ${total} bytes of ${input.length}`);
  invariant(Buffer.concat(parts).equals(input), () => "the lines put together differ from the file");
}

const QUERY_OPTIONS = ["identity", "workload", "namespace", "decision", "policy", "type", "since", "until", "limit"] as const;

/** Reads `option=value` lines into the options of `agentctl audit query`. */
function queryOptions(text: string): AuditQueryOptions {
  const options: AuditQueryOptions = {};
  for (const line of text.split("\n")) {
    const equals = line.indexOf("=");
    const key = line.slice(0, equals) as (typeof QUERY_OPTIONS)[number];
    if (equals > 0 && QUERY_OPTIONS.includes(key)) options[key] = line.slice(equals + 1);
  }
  return options;
}

export const auditQuery: FuzzTarget = {
  name: "audit-query",
  tokens: [...QUERY_OPTIONS.map((option) => `\n${option}=`), "*", ".", "/", "spiffe://", "T", "Z", "+23:59", "-00:00", "9999999999999999", "30s", "7d", "2026-02-29T10:00:00Z", ":60"],
  maxBytes: 2048,
  run(input) {
    const query = parseAuditQuery(queryOptions(input.toString("utf8")), Date.parse("2026-03-01T00:00:00Z"));
    for (const bound of [query.since, query.until]) {
      invariant(bound === undefined || !Number.isNaN(bound), () => `a time bound parsed to NaN: ${JSON.stringify(query)}`);
    }
    if (query.limit !== undefined) invariant(Number.isInteger(query.limit) && query.limit >= 1, () => `--limit parsed to ${query.limit}`);
  },
  expected: (error) => isAgentError(error, "INVALID_QUERY"),
};
