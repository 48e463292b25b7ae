import test from "ava";
import { createLevelledLogger, LogLevels } from "../../agent/log";
import { formatTextLine, parseLogFormat, TextDestination, type LineDestination } from "../../agent/log-format";

/** A destination that keeps what it receives, with a count of the flushes passed on to it. */
class MemoryDestination implements LineDestination {
  readonly chunks: string[] = [];
  flushes = 0;

  write(chunk: string): void {
    this.chunks.push(chunk);
  }

  flushSync(): void {
    this.flushes++;
  }
}

/** Makes a logger tree that writes text lines to a memory destination. */
function textLogger(): { logger: ReturnType<typeof createLevelledLogger>; out: MemoryDestination } {
  const out = new MemoryDestination();
  const logger = createLevelledLogger(new LogLevels({ default: "debug", components: {} }), { node: "n1" }, new TextDestination(out));
  return { logger, out };
}

const TIME = Date.UTC(2026, 0, 2, 3, 4, 5, 678);

test("record becomes time, level, component, message and fields", (t) => {
  const line = formatTextLine(JSON.stringify({ level: 30, time: TIME, pid: 7, node: "n1", component: "cni", msg: "CNI ADD succeeded", netns: "/var/run/netns/p1", durationMs: 3 }) + "\n");
  t.is(line, "2026-01-02T03:04:05.678Z info cni CNI ADD succeeded netns=/var/run/netns/p1 durationMs=3\n");
});

test("line without a component is the agent's", (t) => {
  t.is(formatTextLine(JSON.stringify({ level: 40, time: TIME, msg: "agent ready" })), "2026-01-02T03:04:05.678Z warn agent agent ready\n");
});

test("every pino level has its name", (t) => {
  const names = [10, 20, 30, 40, 50, 60].map((level) => formatTextLine(JSON.stringify({ level, time: TIME, msg: "m" })).split(" ")[1]);
  t.deepEqual(names, ["trace", "debug", "info", "warn", "error", "fatal"]);
  t.is(formatTextLine(JSON.stringify({ level: 35, time: TIME, msg: "m" })).split(" ")[1], "35");
});

test("values are quoted when they would split", (t) => {
  const fields = {
    plain: "10.0.0.1:8080",
    spaced: "two words",
    quoted: 'say "hi"',
    equals: "a=b",
    empty: "",
    newline: "a\nb",
    count: 0,
    flag: false,
    nothing: null,
    list: ["a", "b c"],
    nested: { ip: "10.0.0.1", port: 80 },
  };
  const line = formatTextLine(JSON.stringify({ level: 30, time: TIME, msg: "m", ...fields }));
  t.is(
    line,
    '2026-01-02T03:04:05.678Z info agent m plain=10.0.0.1:8080 spaced="two words" quoted="say \\"hi\\"" equals="a=b" empty="" newline="a\\nb" count=0 flag=false nothing=null list=["a","b c"] nested={"ip":"10.0.0.1","port":80}\n',
  );
});

test("message with a newline stays on one line", (t) => {
  const line = formatTextLine(JSON.stringify({ level: 50, time: TIME, msg: "first\nsecond" }));
  t.is(line, "2026-01-02T03:04:05.678Z error agent first\\nsecond\n");
  t.is(line.split("\n").length, 2);
});

test("line that is not a JSON object passes through", (t) => {
  t.is(formatTextLine("not json"), "not json\n");
  t.is(formatTextLine("[1,2]\n"), "[1,2]\n");
});

test("logger tree writes one text line per record", (t) => {
  const { logger, out } = textLogger();
  logger.info({ enrolled: 2 }, "agent ready");
  logger.child({ component: "cni" }).child({ component: "handover" }).debug({ socket: "/run/x.sock" }, "listening");
  logger.error({ err: new Error("boom\nsecond line") }, "failed");
  t.is(out.chunks.length, 3);
  t.regex(out.chunks[0], /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info agent agent ready enrolled=2\n$/);
  t.regex(out.chunks[1], / debug handover listening socket=\/run\/x\.sock\n$/);
  t.regex(out.chunks[2], / error agent failed err=\{"type":"Error","message":"boom\\nsecond line","stack":".*"\}\n$/);
  for (const chunk of out.chunks) {
    t.is(chunk.indexOf("\n"), chunk.length - 1, `not one line: ${chunk}`);
    t.false(chunk.includes("pid="), "the pid is repeated on the line");
    t.false(chunk.includes("node="), "the node is repeated on the line");
  }
});

test("text destination passes flushes on", (t) => {
  const out = new MemoryDestination();
  const destination = new TextDestination(out);
  destination.flushSync();
  t.is(out.flushes, 1);
  let flushed = false;
  destination.flush(() => (flushed = true));
  t.true(flushed, "flush without a target flush did not call back");
});

test("log format is checked", (t) => {
  t.is(parseLogFormat("json"), "json");
  t.is(parseLogFormat("text"), "text");
  t.throws(() => parseLogFormat("logfmt"), { message: 'unknown log format "logfmt"; valid formats: json, text' });
  t.throws(() => parseLogFormat("JSON"), { message: /unknown log format "JSON"/ });
});
