import test from "ava";
import { Writable } from "node:stream";
import { GENESIS_HASH, sealLine } from "../../agent/audit/chain";
import type { SealedRecord } from "../../agent/audit/record";
import type { SpooledRecord } from "../../agent/audit/sink";
import { StdoutSink } from "../../agent/audit/sinks/stdout";
import { silentLogger } from "../../agent/log";

function buildChain(count: number): SpooledRecord[] {
  const records: SpooledRecord[] = [];
  let prevHash = GENESIS_HASH;
  for (let seq = 1; seq <= count; seq += 1) {
    const id = `00000000-0000-4000-8000-${String(seq).padStart(12, "0")}`;
    const body = JSON.stringify({ time: new Date().toISOString(), type: "agent.stopped", v: 1, seq, id, node: "n1", reason: "test", open_connections: 0, prev_hash: prevHash });
    const { line, hash } = sealLine(body);
    prevHash = hash;
    records.push({ seq, id, line, record: JSON.parse(line) as SealedRecord });
  }
  return records;
}

/** Creates a Writable that takes `delayMs` per chunk and keeps what it received. */
function slowWritable(delayMs: number, highWaterMark: number): { stream: Writable; received: string[] } {
  const received: string[] = [];
  const stream = new Writable({
    highWaterMark,
    write(chunk: Buffer, _encoding, callback) {
      setTimeout(() => {
        received.push(chunk.toString("utf8"));
        callback();
      }, delayMs);
    },
  });
  return { stream, received };
}

test("stdout sink writes one line per record", async (t) => {
  const { stream, received } = slowWritable(0, 1 << 20);
  const sink = new StdoutSink(silentLogger(), stream);
  t.is(sink.name, "stdout");
  t.is(await sink.open(), undefined);

  const chain = buildChain(3);
  await sink.send(chain);
  await sink.send([]);
  await sink.close();

  const lines = received.join("").split("\n");
  t.is(lines.pop(), "");
  t.deepEqual(lines, chain.map((record) => record.line));
});

test("stdout sink waits for drain", async (t) => {
  const { stream, received } = slowWritable(30, 16);
  const sink = new StdoutSink(silentLogger(), stream);
  const chain = buildChain(2);
  let drains = 0;
  stream.on("drain", () => (drains += 1));

  const started = Date.now();
  await sink.send(chain.slice(0, 1));
  t.true(Date.now() - started >= 25, "send resolved before the slow stream took the chunk");
  t.is(received.length, 1);
  t.is(stream.writableLength, 0);
  t.is(drains, 1);

  await sink.send(chain.slice(1));
  t.is(received.join(""), `${chain[0].line}\n${chain[1].line}\n`);
  await sink.close();
});

test("stdout write error rejects", async (t) => {
  const stream = new Writable({
    write(_chunk, _encoding, callback) {
      const error = new Error("write EPIPE") as NodeJS.ErrnoException;
      error.code = "EPIPE";
      callback(error);
    },
  });
  const sink = new StdoutSink(silentLogger(), stream);
  await t.throwsAsync(sink.send(buildChain(1)), { message: /stdout failed: write EPIPE/ });
  await t.throwsAsync(sink.send(buildChain(1)), { message: /stdout failed/ });
  await sink.close();
});

test("stdout closed stream rejects", async (t) => {
  const { stream } = slowWritable(0, 1024);
  const sink = new StdoutSink(silentLogger(), stream);
  stream.destroy();
  await t.throwsAsync(sink.send(buildChain(1)), { message: /closed/ });
  await sink.close();
});

test("stdout destroy while waiting rejects", async (t) => {
  const { stream } = slowWritable(200, 16);
  const sink = new StdoutSink(silentLogger(), stream);
  const sending = sink.send(buildChain(1));
  setTimeout(() => stream.destroy(new Error("reader went away")), 20);
  await t.throwsAsync(sending, { message: /stdout failed/ });
  await sink.close();
});
