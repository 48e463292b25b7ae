// Builds sealed audit chains for tests: records in the spooled line format (envelope, chain fields,
// event fields, prev_hash, then the hash member), and the edits an attacker or a crash makes to them.

import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { GENESIS_HASH, sealLine } from "../../agent/audit/chain";
import { AUDIT_SCHEMA_VERSION, type AuditEvent, type ConnectionCompletedRecord } from "../../agent/audit/record";

/** A sealed line with the fields a test compares. */
export interface ChainLine {
  seq: number;
  line: string;
  hash: string;
}

/** Seals `event` as record `seq` of a chain whose previous record has hash `prevHash`. */
export function sealEvent(event: AuditEvent, seq: number, prevHash: string, id = crypto.randomUUID()): ChainLine {
  const { time, type, ...fields } = event;
  const body = JSON.stringify({ time, type, v: AUDIT_SCHEMA_VERSION, seq, id, ...fields, prev_hash: prevHash });
  const { line, hash } = sealLine(body);
  return { seq, line, hash };
}

/** Seals `events` as consecutive records starting at `startSeq`, linked to `prevHash`. */
export function buildChain(events: readonly AuditEvent[], startSeq = 1, prevHash = GENESIS_HASH): ChainLine[] {
  const chain: ChainLine[] = [];
  let previous = prevHash;
  events.forEach((event, index) => {
    const sealed = sealEvent(event, startSeq + index, previous);
    chain.push(sealed);
    previous = sealed.hash;
  });
  return chain;
}

/** Builds a completed inbound connection at `2026-03-01T10:00:00Z + index s`, with fields from `overrides`. */
export function connectionEvent(index: number, overrides: Partial<ConnectionCompletedRecord> = {}): ConnectionCompletedRecord {
  const time = new Date(Date.parse("2026-03-01T10:00:00.000Z") + index * 1000).toISOString();
  return {
    type: "connection.completed",
    time,
    start: time,
    node: "node-a",
    connection_id: `conn-${index}`,
    direction: "inbound",
    src: { addr: "10.0.1.5:40000", workload: "client", namespace: "demo", identity: "spiffe://cluster.local/ns/demo/sa/client" },
    dst: { addr: "10.0.2.7:8080", workload: "web", namespace: "shop", identity: "spiffe://cluster.local/ns/shop/sa/web" },
    transport: "hbone",
    decision: "allow",
    policy: "shop/allow-demo",
    policy_kind: "AuthorizationPolicy",
    rule: 0,
    reason: "allowed_by_policy",
    established: true,
    bytes_sent: index,
    bytes_recv: 2 * index,
    duration_ms: 1.5,
    ...overrides,
  };
}

/** `count` connection records sealed as a chain from seq `startSeq`. */
export function connectionChain(count: number, startSeq = 1, prevHash = GENESIS_HASH): ChainLine[] {
  const events = Array.from({ length: count }, (_, index) => connectionEvent(startSeq + index));
  return buildChain(events, startSeq, prevHash);
}

/**
 * Re-seals `lines` from `index` on after a change, as an attacker with write access to the file would: each
 * record gets the new hash of the record before it as prev_hash, and a hash of its new bytes.
 */
export function resealFrom(lines: readonly string[], index: number): string[] {
  const result = lines.slice(0, index);
  let previous = index === 0 ? GENESIS_HASH : (JSON.parse(lines[index - 1]) as { hash: string }).hash;
  for (const line of lines.slice(index)) {
    const { hash: _stale, ...record } = JSON.parse(line) as Record<string, unknown>;
    const body = JSON.stringify({ ...record, prev_hash: previous });
    const sealed = sealLine(body);
    result.push(sealed.line);
    previous = sealed.hash;
  }
  return result;
}

/** Creates a temporary folder that the test removes when it ends. */
export function tempAuditDir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "audit-chain-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Writes `lines` to `file`, one per line; without `trailingNewline` the last line has no newline, as after a crash. */
export function writeLines(file: string, lines: readonly string[], trailingNewline = true): string {
  fs.writeFileSync(file, lines.join("\n") + (trailingNewline && lines.length > 0 ? "\n" : ""));
  return file;
}

/** Returns the lines of a chain as strings. */
export function linesOf(chain: readonly ChainLine[]): string[] {
  return chain.map((entry) => entry.line);
}
