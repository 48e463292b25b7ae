// The Node.js flags the agent runs with. Every launcher passes them: the `ambient-agent` script's
// shebang, the test harness and the benchmark.

/**
 * `--single-threaded-gc`: with V8's helper GC threads, an agent that streams data ran a full
 * mark-compact about every 35 ms, started by external memory pressure from socket buffers, and
 * spent a third of its CPU in the collector. With the collector on the main thread it ran none,
 * and `make bench` measured 1.92 instead of 2.72 CPU-s per GiB per agent on a 2-core node.
 * `--max-semi-space-size=2` (MiB): V8 otherwise grows the young generation to 16 MiB per
 * semi-space under load and keeps it. Capped, the agents' RSS with 1,000 idle connections grew
 * 38 KiB per connection instead of 58, at the same throughput. docs/benchmarks.md has the runs.
 */
export const AGENT_NODE_FLAGS: readonly string[] = ["--single-threaded-gc", "--max-semi-space-size=2"];

/** Tells whether this process was started with every flag of AGENT_NODE_FLAGS. */
export function runsWithAgentFlags(execArgv: readonly string[] = process.execArgv): boolean {
  return AGENT_NODE_FLAGS.every((flag) => execArgv.includes(flag));
}
