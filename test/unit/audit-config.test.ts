import test from "ava";
import { parseByteSize, parseDurationMs, parseFsyncPolicy, parseSinkUri } from "../../agent/audit/config";
import { parseAuditFlags } from "../../agent/cli/audit-flags";

test("sink URIs of each kind parse", (t) => {
  t.deepEqual(parseSinkUri("stdout"), { kind: "stdout" });
  t.deepEqual(parseSinkUri("otlp://127.0.0.1:4317?header=authorization:Bearer%20x"), {
    kind: "otlp",
    endpoint: "127.0.0.1:4317",
    tls: undefined,
    headers: { authorization: "Bearer x" },
  });
  const syslog = parseSinkUri("syslog+tls://logs.test?ca=/ca.pem&facility=local3&max_message_size=64KiB");
  t.like(syslog, { kind: "syslog", transport: "tls", host: "logs.test", port: 6514, facility: "local3", maxMessageBytes: 65536, tls: { ca: "/ca.pem" } });
  t.like(parseSinkUri("syslog+tcp://[::1]"), { host: "::1", port: 514 });
});

const invalid: [string, RegExp][] = [
  ["otlp://127.0.0.1", /give the port/],
  ["otlp://127.0.0.1:99999", /port 99999 is out of range/],
  ["syslog+tcp://127.0.0.1:0", /port 0 is out of range/],
  ["otlp://127.0.0.1:4317?facility=local0", /unknown parameter "facility" for otlp:/],
  ["syslog+tcp://h?ca=/x", /TLS parameters need syslog\+tls/],
  ["syslog+tcp://h?facility=a&facility=b", /given twice/],
  ["otlp://h:1/v1/logs", /path or #fragment/],
  ["syslog+tcp://h?max_message_size=100", /at least 2048 bytes/],
  ["ftp://h:1", /unknown scheme "ftp:"/],
  ["not a uri", /it is not a URI/],
];

for (const [uri, message] of invalid) {
  test(`sink URI ${uri} is rejected`, (t) => {
    t.throws(() => parseSinkUri(uri), { message });
  });
}

test("sink URI errors hide secrets", (t) => {
  for (const uri of ["otlp://127.0.0.1:4317?header=authorization=Bearer SECRET", "otlp://user:SECRET@127.0.0.1:4317", "syslog+tcp://admin:SE/CRET@h:514", "otlp://h:1#header=a:SECRET"]) {
    const error = t.throws(() => parseSinkUri(uri));
    t.false(error!.message.includes("SECRET"), error!.message);
  }
});

test("sizes, durations and fsync policies parse", (t) => {
  t.is(parseByteSize("100MiB", "--x"), 100 * 1024 * 1024);
  t.is(parseByteSize("1GB", "--x"), 1e9);
  t.is(parseByteSize("512", "--x"), 512);
  t.throws(() => parseByteSize("ten", "--x"), { message: /invalid --x "ten"/ });
  t.is(parseDurationMs("24h", "--x"), 86_400_000);
  t.is(parseDurationMs("500ms", "--x"), 500);
  t.throws(() => parseDurationMs("5", "--x"), { message: /with a unit/ });
  t.deepEqual(parseFsyncPolicy(undefined), { mode: "interval", intervalMs: 1000 });
  t.deepEqual(parseFsyncPolicy("always"), { mode: "always" });
  t.throws(() => parseFsyncPolicy("1ms"), { message: /at least 10ms/ });
});

test("audit flags need a destination", (t) => {
  t.throws(() => parseAuditFlags({ "audit-file": "none" }, "n1"), { message: /no audit destination/ });
  const options = parseAuditFlags({ "audit-file": "none", "audit-sink": ["stdout"] }, "n1");
  t.is(options.file, undefined);
  t.is(options.spoolDir, "/var/lib/ambient-agent/audit-spool/n1");
  t.throws(() => parseAuditFlags({ "audit-queue": "0" }, "n1"), { message: /--audit-queue "0"/ });
  t.throws(() => parseAuditFlags({ "audit-redact": ["src.adr"] }, "n1"), { message: /no record has the field src\.adr/ });
});

test("empty and repeated sink parameters are rejected", (t) => {
  t.throws(() => parseSinkUri("syslog+tls://h?ca="), { message: /"ca" has no value/ });
  t.throws(() => parseSinkUri("otlp://h:1?header=a:1&header=a:2"), { message: /header "a" is given twice/ });
});
