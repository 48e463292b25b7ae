// The OTLP test receiver as a child process inside a node's network namespace, where the agent
// runs and can reach it on 127.0.0.1. Every record it accepted is appended to a JSON-lines file
// that the test reads. SIGTERM stops the server and writes what is still unwritten before exit,
// so a record the agent saw accepted is always in the file.
// In "count" mode, for benchmarks, it decodes nothing. It replies to each Export with success and
// counts the request's records, which costs too little CPU to slow the agents it measures, and it
// keeps {"records":N} in the output file.
//   node otlp-receiver-process.js PORT OUTPUT_FILE [count]

import { type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import * as grpc from "@grpc/grpc-js";
import { EXPORT_METHOD } from "../../agent/audit/sinks/otlp";
import { OtlpReceiver } from "./otlp-receiver";
import type { Topology } from "./topology";

/** One accepted record as the output file stores it. */
export interface StoredOtlpRecord {
  id: string;
  seq: number;
  type: string;
  record: Record<string, any>;
}

export class OtlpReceiverProcess {
  private child: ChildProcess | undefined;

  constructor(
    private readonly topology: Topology,
    private readonly netns: string,
    readonly port: number,
    readonly outputFile: string,
  ) {}

  get endpoint(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Starts the receiver and waits until it listens; `mode` "count" only counts records (see the file's header). */
  async start(mode: "store" | "count" = "store"): Promise<void> {
    if (this.child) throw new Error("the OTLP receiver already runs");
    this.child = this.topology.spawn(this.netns, process.execPath, [__filename, String(this.port), this.outputFile, mode], { stdio: ["ignore", "ignore", "inherit"] });
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      const listening = this.topology.exec(this.netns, "ss", ["-Hltn", `sport = :${this.port}`], { allowFail: true });
      if (listening.trim() !== "") return;
      if (this.child.exitCode !== null) throw new Error(`the OTLP receiver exited with code ${this.child.exitCode}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    throw new Error(`the OTLP receiver did not listen on ${this.port} within 10 s`);
  }

  /** Stops the receiver with SIGTERM and waits until it has written every accepted record. */
  async stop(): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  }

  /** Records counted so far by a receiver started in "count" mode. */
  countedRecords(): number {
    if (!fs.existsSync(this.outputFile)) return 0;
    const text = fs.readFileSync(this.outputFile, "utf8");
    return text === "" ? 0 : (JSON.parse(text) as { records: number }).records;
  }

  /** Returns every accepted record so far, duplicates included, in arrival order. */
  records(): StoredOtlpRecord[] {
    if (!fs.existsSync(this.outputFile)) return [];
    return fs
      .readFileSync(this.outputFile, "utf8")
      .split("\n")
      .filter((line) => line !== "")
      .map((line) => JSON.parse(line) as StoredOtlpRecord);
  }
}

/** Picks a port that is free on 127.0.0.1 of this process's namespace, for a receiver in a fresh namespace. */
export async function pickPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** The bytes of the attribute key that every LogRecord of the sink carries once. */
const RECORD_ID_KEY = Buffer.from("log.record.uid");

/** Counts the LogRecords of an encoded request by their log.record.uid attribute key, without decoding it. */
export function countEncodedRecords(request: Buffer): number {
  let count = 0;
  for (let at = request.indexOf(RECORD_ID_KEY); at >= 0; at = request.indexOf(RECORD_ID_KEY, at + RECORD_ID_KEY.length)) count++;
  return count;
}

/** Serves Export with no decoding and keeps the running count of records in `outputFile`. */
async function countRecords(port: number, outputFile: string): Promise<void> {
  let records = 0;
  let written = -1;
  const server = new grpc.Server();
  const passThrough = (bytes: Buffer): Buffer => bytes;
  server.addService(
    {
      Export: {
        path: EXPORT_METHOD,
        requestStream: false,
        responseStream: false,
        requestSerialize: passThrough,
        requestDeserialize: passThrough,
        // An ExportLogsServiceResponse with no field set is full success, and encodes to no bytes.
        responseSerialize: () => Buffer.alloc(0),
        responseDeserialize: passThrough,
      },
    },
    {
      Export: (call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) => {
        records += countEncodedRecords(call.request);
        callback(null, Buffer.alloc(0));
      },
    },
  );
  await new Promise<void>((resolve, reject) => server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (error) => (error ? reject(error) : resolve())));
  const writeCount = (): void => {
    if (records === written) return;
    written = records;
    fs.writeFileSync(outputFile, JSON.stringify({ records }));
  };
  const timer = setInterval(writeCount, 50);
  process.once("SIGTERM", () => {
    clearInterval(timer);
    server.forceShutdown();
    writeCount();
    process.exit(0);
  });
}

async function main(): Promise<void> {
  const [portText, outputFile, mode] = process.argv.slice(2);
  if (mode === "count") return countRecords(Number(portText), outputFile);
  const receiver = await OtlpReceiver.start({ port: Number(portText) });
  let written = 0;
  const writeNew = (): void => {
    const fresh = receiver.records.slice(written);
    written += fresh.length;
    if (fresh.length === 0) return;
    fs.appendFileSync(outputFile, fresh.map(({ id, seq, type, record }) => JSON.stringify({ id, seq, type, record })).join("\n") + "\n");
  };
  const timer = setInterval(writeNew, 50);
  process.once("SIGTERM", () => {
    clearInterval(timer);
    void receiver.stop().then(() => {
      writeNew();
      process.exit(0);
    });
  });
}

if (require.main === module) void main();
