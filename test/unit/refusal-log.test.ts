import test from "ava";
import type { AuditEvent, ConnectionRefusedRecord } from "../../agent/audit/record";
import { createLogger } from "../../agent/log";
import { RefusalLog, closeReasonOf, type RefusalEvent } from "../../agent/proxy/refusal-log";
import { AgentError } from "../../agent/errors";

/** Returns a RefusalLog that writes into an array, with a logger that counts its warn lines. */
function refusalLog(options: { windowMs?: number; maxKeys?: number } = {}): { log: RefusalLog; records: ConnectionRefusedRecord[]; warnings: () => number } {
  const records: ConnectionRefusedRecord[] = [];
  const logger = createLogger({}, "silent");
  let warnings = 0;
  logger.warn = (() => {
    warnings += 1;
  }) as unknown as typeof logger.warn;
  const audit = { write: (record: AuditEvent) => records.push(record as ConnectionRefusedRecord) };
  const log = new RefusalLog({ node: "aalim-n1", audit, logger, windowMs: options.windowMs ?? 60_000, maxKeys: options.maxKeys });
  return { log, records, warnings: () => warnings };
}

function event(srcAddr: string, overrides: Partial<RefusalEvent> = {}): RefusalEvent {
  return {
    listener: "outbound",
    port: 15001,
    src: { addr: srcAddr, workload: "a", namespace: "default" },
    dst: { addr: "10.232.0.9:80" },
    reason: "connections_per_pod",
    message: "pod default/a has 2 open outbound connections, the limit (--max-connections-per-pod)",
    limit: 2,
    ...overrides,
  };
}

test("first refusal is written at once", (t) => {
  const { log, records, warnings } = refusalLog();
  log.refuse(event("10.232.0.2:40000"));
  t.is(records.length, 1);
  const record = records[0];
  t.is(record.type, "connection.refused");
  t.is(record.node, "aalim-n1");
  t.is(record.listener, "outbound");
  t.is(record.port, 15001);
  t.is(record.reason, "connections_per_pod");
  t.is(record.limit, 2);
  t.is(record.count, 1);
  t.is(record.first_time, record.time);
  t.is(record.src.addr, "10.232.0.2:40000");
  t.is(record.dst?.addr, "10.232.0.9:80");
  t.is(warnings(), 1);
});

test("repeats of a key fold into one record", (t) => {
  const { log, records, warnings } = refusalLog();
  for (let port = 40000; port < 40010; port += 1) log.refuse(event(`10.232.0.2:${port}`));
  t.is(records.length, 1);
  log.flush();
  t.is(records.length, 2);
  t.is(records[1].count, 9);
  t.is(records[1].src.addr, "10.232.0.2:40009");
  t.true(records[1].first_time <= records[1].time);
  t.is(warnings(), 2);
});

test("flush writes nothing without pending refusals", (t) => {
  const { log, records } = refusalLog();
  log.refuse(event("10.232.0.2:40000"));
  log.flush();
  log.flush();
  t.is(records.length, 1);
});

test("different keys get their own records", (t) => {
  const { log, records } = refusalLog();
  log.refuse(event("10.232.0.2:1"));
  log.refuse(event("10.232.0.3:1"));
  log.refuse(event("10.232.0.2:2", { reason: "proxy_port_target", limit: undefined }));
  log.refuse(event("10.232.0.2:3", { listener: "inbound_plaintext", port: 15006 }));
  log.refuse(event("10.232.0.2:4", { dst: { addr: "10.232.0.9:81" } }));
  t.is(records.length, 5);
  t.false("limit" in records[2]);
});

test("IPv6 sources key by address without the port", (t) => {
  const { log, records } = refusalLog();
  log.refuse(event("[fd00::2]:40000"));
  log.refuse(event("[fd00::2]:40001"));
  t.is(records.length, 1);
  log.flush();
  t.is(records[1].count, 1);
});

test("keys past the cap share an overflow record", (t) => {
  const { log, records } = refusalLog({ maxKeys: 3 });
  for (let host = 1; host <= 10; host += 1) log.refuse(event(`10.232.1.${host}:5000`));
  t.is(records.length, 3);
  log.flush();
  t.is(records.length, 4);
  const overflow = records[3];
  t.is(overflow.count, 7);
  t.is(overflow.src.addr, "10.232.1.10:5000");
  t.regex(overflow.message, /more than 3 sources/);
});

test("overflow entries stay bounded", (t) => {
  const { log, records } = refusalLog({ maxKeys: 2 });
  for (let host = 0; host < 5000; host += 1) log.refuse(event(`10.${host >> 8}.${host & 255}.1:1`));
  log.flush();
  t.is(records.length, 3);
  t.is(records[0].count + records[1].count + records[2].count, 5000);
});

test("totals count every refusal and close", (t) => {
  const { log } = refusalLog();
  for (let i = 0; i < 5; i += 1) log.refuse(event(`10.232.0.2:${i}`));
  log.refuse(event("10.232.0.2:9", { listener: "inbound_plaintext", port: 15006, reason: "connections_per_peer" }));
  log.countClosed("outbound", "idle_timeout");
  log.countClosed("outbound", "idle_timeout");
  const totals = log.totals().sort((a, b) => `${a.listener}${a.reason}`.localeCompare(`${b.listener}${b.reason}`));
  t.deepEqual(totals, [
    { listener: "inbound_plaintext", reason: "connections_per_peer", count: 1 },
    { listener: "outbound", reason: "connections_per_pod", count: 5 },
    { listener: "outbound", reason: "idle_timeout", count: 2 },
  ]);
});

test("countClosed writes no record", (t) => {
  const { log, records } = refusalLog();
  log.countClosed("inbound", "idle_timeout");
  log.flush();
  t.is(records.length, 0);
});

test("window end writes the folded record", async (t) => {
  const { log, records } = refusalLog({ windowMs: 20 });
  log.refuse(event("10.232.0.2:1"));
  log.refuse(event("10.232.0.2:2"));
  log.refuse(event("10.232.0.2:3"));
  for (let waited = 0; records.length < 2 && waited < 2000; waited += 10) await new Promise((resolve) => setTimeout(resolve, 10));
  t.is(records.length, 2);
  t.is(records[1].count, 2);
  log.flush();
  t.is(records.length, 2);
});

test("limit errors map to refusal reasons", (t) => {
  t.is(closeReasonOf(new AgentError("IDLE_TIMEOUT", "idle")), "idle_timeout");
  t.is(closeReasonOf(new AgentError("STREAM_RESET", "reset")), undefined);
  t.is(closeReasonOf(new Error("plain")), undefined);
});
