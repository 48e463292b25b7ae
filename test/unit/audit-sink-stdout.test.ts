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

/** Creates a Writable whose reader takes nothing until release() is called. */
function stuckWritable(highWaterMark: number): { stream: Writable; received: string[]; release: () => void } {
  const received: string[] = [];
  let stuck: (() => void) | undefined;
  let released = false;
  const stream = new Writable({
    highWaterMark,
    write(chunk: Buffer, _encoding, callback) {
      received.push(chunk.toString("utf8"));
      if (released) callback();
      else stuck = callback;
    },
  });
  const release = (): void => {
    released = true;
    stuck?.();
  };
  return { stream, received, release };
}

/** Resolves to the outcome of `promise`, or to "pending" after `ms`. */
function settledWithin(promise: Promise<unknown>, ms: number): Promise<unknown> {
  return Promise.race([
    promise.then(
      () => "resolved",
      (error: Error) => error,
    ),
    new Promise((resolve) => setTimeout(() => resolve("pending"), ms)),
  ]);
}

test("stdout blocked reader times out, then recovers", async (t) => {
  const { stream, received, release } = stuckWritable(16);
  // A 1 s drain timeout keeps "at once" apart from "after the timeout", even on a loaded machine.
  const sink = new StdoutSink(silentLogger(), stream, { drainTimeoutMs: 1_000 });
  const chain = buildChain(4);

  const started = Date.now();
  const first = await settledWithin(sink.send(chain.slice(0, 1)), 5_000);
  t.true(first instanceof Error, `send() ${String(first)}`);
  t.regex((first as Error).message, /did not take the records within 1000 ms/);
  t.true(Date.now() - started < 4_000);

  const buffered = stream.writableLength;
  const again = Date.now();
  const second = await settledWithin(sink.send(chain.slice(1, 2)), 5_000);
  t.true(second instanceof Error, `send() ${String(second)}`);
  t.regex((second as Error).message, /stdout is blocked: .*nothing was written/);
  t.true(Date.now() - again < 900, "a send() to a blocked stream rejects at once, without waiting for the drain timeout");
  t.is(stream.writableLength, buffered, "a send() to a blocked stream writes nothing");

  release();
  await new Promise((resolve) => setImmediate(resolve));
  await sink.send(chain.slice(1, 2));
  await sink.send(chain.slice(2));
  t.is(received.join(""), chain.map((record) => `${record.line}\n`).join(""));
  await sink.close();
});

test("stdout close does not wait for a blocked stream", async (t) => {
  const { stream } = stuckWritable(16);
  const sink = new StdoutSink(silentLogger(), stream);
  const sending = settledWithin(sink.send(buildChain(1)), 2_000);
  await new Promise((resolve) => setTimeout(resolve, 20));

  const started = Date.now();
  await sink.close();
  t.true(Date.now() - started < 1_000);
  const outcome = await sending;
  t.true(outcome instanceof Error, `the waiting send() ${String(outcome)}`);
  t.regex((outcome as Error).message, /closed/);
  // The stream still buffers the batch, so a late error must not find it without a listener.
  t.notThrows(() => stream.emit("error", new Error("write EPIPE")));
  await t.throwsAsync(sink.send(buildChain(1)), { message: /closed/ });
});
