import test from "ava";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { AuditPipeline } from "../../agent/audit/pipeline";
import type { AuditEvent, ConnectionOpenedRecord } from "../../agent/audit/record";
import { Redactor, parseRedactionRules, scrubRecord } from "../../agent/audit/redact";
import type { AuditSink, SpooledRecord } from "../../agent/audit/sink";
import { silentLogger } from "../../agent/log";

const KEY = Buffer.alloc(32, 7);

function opened(id: string): ConnectionOpenedRecord {
  return {
    type: "connection.opened",
    time: "2026-01-01T00:00:00.000Z",
    start: "2026-01-01T00:00:00.000Z",
    node: "n1",
    connection_id: id,
    direction: "inbound",
    src: { addr: "10.0.0.1:40000", identity: "spiffe://cluster.local/ns/a/sa/b" },
    dst: { addr: "10.0.0.2:8080", hbone_addr: "10.0.0.2:15008" },
    transport: "hbone",
    decision: "allow",
    reason: "allowed_by_policy",
    policy: "ns/allow",
    dry_run: [{ policy: "ns/dry", rule: 0, decision: "deny" }],
  };
}

class MemorySink implements AuditSink {
  readonly name = "memory";
  readonly lines: string[] = [];
  async open(): Promise<undefined> {
    return undefined;
  }
  async send(batch: readonly SpooledRecord[]): Promise<void> {
    for (const record of batch) this.lines.push(record.line);
  }
  async close(): Promise<void> {}
}

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "audit-redact-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("redaction rule naming no field is rejected", (t) => {
  const error = t.throws(() => parseRedactionRules("src.adr"));
  t.regex(error!.message, /no record has the field src\.adr/);
  t.throws(() => parseRedactionRules("seq"), { message: /cannot be redacted/ });
  t.throws(() => parseRedactionRules("src.addr:scramble"), { message: /expected FIELD or FIELD:hash/ });
});

test("redacting dst.addr covers dst.hbone_addr", (t) => {
  const record = opened("c1");
  new Redactor(parseRedactionRules("dst.addr"), KEY).apply(record);
  t.false("addr" in record.dst);
  t.false("hbone_addr" in record.dst);
});

test("redaction reaches array elements", (t) => {
  const record = opened("c1");
  new Redactor(parseRedactionRules("dry_run.policy:hash"), KEY).apply(record);
  t.regex(record.dry_run![0].policy, /^hmac-sha256:[0-9a-f]{32}$/);
  t.is(record.dry_run![0].rule, 0);
});

test("hashing an object keeps its shape", (t) => {
  const record: AuditEvent = { type: "policy.added", time: "t", node: "n1", policy: { kind: "AuthorizationPolicy", namespace: "ns", name: "p" }, file: "f" };
  new Redactor(parseRedactionRules("policy:hash"), KEY).apply(record);
  const policy = (record as unknown as { policy: Record<string, string> }).policy;
  t.deepEqual(Object.keys(policy), ["kind", "namespace", "name"]);
  t.regex(policy.name, /^hmac-sha256:/);
});

test("equal values get equal hashes", (t) => {
  const redactor = new Redactor(parseRedactionRules("src.addr:hash"), KEY);
  const first = redactor.apply(opened("c1")) as ConnectionOpenedRecord;
  const second = redactor.apply(opened("c2")) as ConnectionOpenedRecord;
  t.is(first.src.addr, second.src.addr);
  t.not(first.src.addr, "10.0.0.1:40000");
});

test("scrub removes a whole PEM block", (t) => {
  const pem = "-----BEGIN PRIVATE KEY-----\nMIIBVgIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----";
  const record = { message: `CA said: ${pem} and more` };
  const scrubbed = scrubRecord(record, JSON.stringify(record));
  t.notRegex(scrubbed.message, /MIIBVg|END PRIVATE KEY|BEGIN/);
  t.regex(scrubbed.message, /^CA said: \[removed: .*\] and more$/);
});

test("scrub removes a PEM block without its END line", (t) => {
  const record = { message: "-----BEGIN CERTIFICATE-----\nMIIBVgIBADANBgkqhkiG9w0BAQEFAASC" };
  t.notRegex(scrubRecord(record, JSON.stringify(record)).message, /MIIBVg/);
});

test("scrub replaces a lone surrogate", (t) => {
  const record = { message: "a\ud800b\ud83d\ude00" };
  const scrubbed = scrubRecord(record, JSON.stringify(record));
  t.is(scrubbed.message, "a\ufffdb\ud83d\ude00");
  const clean = { message: "plain \ud83d\ude00" };
  t.is(scrubRecord(clean, JSON.stringify(clean)), clean, "a record without a match is returned as it is");
});

test("interrupted connections keep their hashes", async (t) => {
  const dir = tempDir(t);
  const rules = parseRedactionRules("dst.addr:hash,policy:hash");
  const first = new AuditPipeline({ node: "n1", spoolDir: dir, sinks: [new MemorySink()], redaction: rules }, silentLogger());
  await first.start();
  first.write(opened("c1"));
  await first.flush();
  // No close(): the process is gone. The next one completes c1 from the spooled, already redacted record.
  const sink = new MemorySink();
  const second = new AuditPipeline({ node: "n1", spoolDir: dir, sinks: [sink], redaction: rules }, silentLogger());
  await second.start();
  second.recordInterrupted();
  await second.flush();
  const spooledOpened = JSON.parse(fs.readFileSync(path.join(dir, fs.readdirSync(dir).find((name) => name.startsWith("segment-"))!), "utf8").split("\n")[0]);
  const completed = sink.lines.map((line) => JSON.parse(line)).find((record) => record.type === "connection.completed");
  t.is(completed.dst.addr, spooledOpened.dst.addr);
  t.is(completed.policy, spooledOpened.policy);
  await second.close();
});

test("short redaction key file is replaced", async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, "redaction.key"), "");
  const sink = new MemorySink();
  const audit = new AuditPipeline({ node: "n1", spoolDir: dir, sinks: [sink], redaction: parseRedactionRules("src.addr:hash") }, silentLogger());
  await audit.start();
  audit.write(opened("c1"));
  await audit.flush();
  t.is(fs.readFileSync(path.join(dir, "redaction.key")).length, 32);
  const emptyKeyHash = new Redactor(parseRedactionRules("src.addr:hash"), Buffer.alloc(0)).apply(opened("c2")) as ConnectionOpenedRecord;
  t.not(JSON.parse(sink.lines[0]).src.addr, emptyKeyHash.src.addr, "the empty key is not used");
  await audit.close();
});

test("write redacts in place for the caller's log", async (t) => {
  const dir = tempDir(t);
  const audit = new AuditPipeline({ node: "n1", spoolDir: dir, sinks: [new MemorySink()], redaction: parseRedactionRules("src.addr") }, silentLogger());
  await audit.start();
  t.true(audit.redacting);
  const record = opened("c1");
  audit.write(record);
  t.false("addr" in record.src);
  await audit.close();
});

test("rules added after a kill apply to interrupted connections", async (t) => {
  const dir = tempDir(t);
  const first = new AuditPipeline({ node: "n1", spoolDir: dir, sinks: [new MemorySink()] }, silentLogger());
  await first.start();
  first.write(opened("c1"));
  await first.flush();
  // Killed with no rules; the next agent runs with rules.
  const sink = new MemorySink();
  const second = new AuditPipeline({ node: "n1", spoolDir: dir, sinks: [sink], redaction: parseRedactionRules("src.addr:hash,error.message") }, silentLogger());
  await second.start();
  second.recordInterrupted();
  await second.flush();
  const completed = sink.lines.map((line) => JSON.parse(line)).find((record) => record.type === "connection.completed");
  t.regex(completed.src.addr, /^hmac-sha256:/);
  t.is(completed.error.code, "AGENT_INTERRUPTED");
  t.false("message" in completed.error);
  await second.close();
});

test("a value with the hash prefix is hashed in new records", (t) => {
  const record = opened("c1");
  record.src.addr = "hmac-sha256:0123456789abcdef0123456789abcdef";
  new Redactor(parseRedactionRules("src.addr:hash"), KEY).apply(record);
  t.not(record.src.addr, "hmac-sha256:0123456789abcdef0123456789abcdef");
  const rebuilt = opened("c2");
  rebuilt.src.addr = "hmac-sha256:0123456789abcdef0123456789abcdef";
  new Redactor(parseRedactionRules("src.addr:hash"), KEY).apply(rebuilt, { keepHashed: true });
  t.is(rebuilt.src.addr, "hmac-sha256:0123456789abcdef0123456789abcdef");
});
