// Measures what the proxy limits cost on the data path, in the benchmark process. It runs the same
// loopback copy through copyBidirectional with and without CopyLimits in alternating rounds. CopyLimits
// add the idle timer stamp and the node-wide buffered-bytes count per chunk. It also times one acquire
// and release of a per-pod slot in the LimitTracker.

import net from "node:net";
import { copyBidirectional, tcpEndpoint, type CopyLimits } from "../../agent/proxy/copy";
import { DEFAULT_LIMITS } from "../../agent/proxy/limits";
import { copyLimitsOf, LimitTracker } from "../../agent/proxy/limit-tracker";
import { nearestRank, round } from "./stats";

export interface LimitsCostFigures {
  /** MiB copied per round and variant. */
  mib_per_round: number;
  rounds: number;
  /** Median CPU of the benchmark process per MiB copied, without and with the limits. */
  plain_cpu_us_per_mib: number;
  limited_cpu_us_per_mib: number;
  /** Median of the per-round ratios limited / plain. */
  ratio_cpu: number;
  /** CPU of one acquire and release of a per-pod slot. */
  tracker_acquire_ns: number;
}

const CHUNK = Buffer.alloc(64 << 10, 0x61);

function median(values: number[]): number {
  return nearestRank([...values].sort((a, b) => a - b), 0.5);
}

/** Resolves with a connected pair of loopback sockets: [the client's, the server's]. */
async function socketPair(): Promise<[net.Socket, net.Socket]> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  const accepted = new Promise<net.Socket>((resolve) => server.once("connection", resolve));
  const client = net.connect(port, "127.0.0.1");
  const [socket] = await Promise.all([accepted, new Promise<void>((resolve) => client.once("connect", resolve))]);
  server.close();
  return [client, socket];
}

/** Copies `mib` MiB from a writer through the proxy copy to a reader; returns the CPU µs it took in this process. */
async function copyRound(mib: number, limits: CopyLimits | undefined): Promise<number> {
  const [writer, proxyIn] = await socketPair();
  const [proxyOut, reader] = await socketPair();
  const copied = copyBidirectional(tcpEndpoint("in", proxyIn), tcpEndpoint("out", proxyOut), undefined, limits);
  let received = 0;
  const total = mib << 20;
  const done = new Promise<void>((resolve) => {
    reader.on("data", (chunk: Buffer) => {
      received += chunk.length;
    });
    reader.on("end", () => {
      reader.end();
      resolve();
    });
  });
  const started = process.cpuUsage();
  for (let sent = 0; sent < total; sent += CHUNK.length) {
    if (!writer.write(CHUNK)) await new Promise((resolve) => writer.once("drain", resolve));
  }
  writer.end();
  await done;
  await copied;
  const used = process.cpuUsage(started);
  writer.destroy();
  if (received !== total) throw new Error(`the limits benchmark received ${received} bytes of ${total}`);
  return used.user + used.system;
}

/** Measures the copy with and without limits over `rounds` alternating rounds, and the tracker's acquire. */
export async function measureLimitsCost(rounds: number, mibPerRound: number): Promise<LimitsCostFigures> {
  const limits = copyLimitsOf(new LimitTracker(DEFAULT_LIMITS));
  await copyRound(mibPerRound, undefined);
  await copyRound(mibPerRound, limits);
  const plain: number[] = [];
  const limited: number[] = [];
  for (let index = 0; index < rounds; index++) {
    plain.push((await copyRound(mibPerRound, undefined)) / mibPerRound);
    limited.push((await copyRound(mibPerRound, limits)) / mibPerRound);
  }
  const tracker = new LimitTracker(DEFAULT_LIMITS);
  const acquires = 1_000_000;
  const started = process.cpuUsage();
  for (let index = 0; index < acquires; index++) tracker.acquire(`pod-${index & 1023}`, "outbound")?.();
  const used = process.cpuUsage(started);
  return {
    mib_per_round: mibPerRound,
    rounds,
    plain_cpu_us_per_mib: round(median(plain), 1),
    limited_cpu_us_per_mib: round(median(limited), 1),
    ratio_cpu: round(median(limited.map((value, index) => value / plain[index])), 3),
    tracker_acquire_ns: Math.round(((used.user + used.system) * 1000) / acquires),
  };
}
