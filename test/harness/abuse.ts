// What the end-to-end tests that attack the agent share: the test file's cluster, curl inside a
// namespace, the refusal counter of a node's metrics server, the agents' liveness and readiness, a
// random blob that legitimate pods download next to the abuse, and the sink servers that the
// abuse targets.

import type { ExecutionContext } from "ava";
import { execFile, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { curl, sha256, startHttpServer, writeRandomFile, type CurlResult } from "./clients";
import { assertHostCapable, Cluster, removeLeftovers, type ClusterOptions } from "./cluster";
import { parsePrometheusText, sumOf, type MetricSample } from "./prometheus-text";

/** The counter of connections refused or closed by a limit, labelled by listener and reason. */
export const REFUSED_METRIC = "ambient_agent_refused_connections_total";

/** The outcome of curlInNetns(). */
export interface NetnsCurlResult {
  /** The HTTP status, 0 when no response arrived. */
  status: number;
  body: string;
  /** curl's exit code, or -1 when curl did not start or was killed after its time limit. */
  exitCode: number;
}

/**
 * Runs curl with `args` inside a network namespace without blocking the event loop, so that a test
 * can run it next to its own servers and clients. Never throws for a failed request.
 */
export function curlInNetns(netns: string, args: string[], maxTimeSeconds = 5): Promise<NetnsCurlResult> {
  const curlArgs = ["-sS", "--max-time", String(maxTimeSeconds), "-w", "\n%{http_code}", ...args];
  return new Promise((resolve) => {
    execFile("nsenter", [`--net=/var/run/netns/${netns}`, "--", "curl", ...curlArgs], { encoding: "utf8", timeout: maxTimeSeconds * 1000 + 10_000 }, (error, stdout) => {
      const newline = stdout.lastIndexOf("\n");
      let exitCode = 0;
      if (error) exitCode = typeof error.code === "number" ? error.code : -1;
      resolve({ status: Number(stdout.slice(newline + 1)) || 0, body: stdout.slice(0, Math.max(newline, 0)), exitCode });
    });
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A file of random bytes that pods serve over HTTP at /blob.bin. */
export interface ServedBlob {
  size: number;
  sha256: string;
  /** The port of the HTTP servers. */
  port: number;
}

/** Asserts that a download of `blob` succeeded and arrived byte-exact. The failure messages start with `description`. */
export function assertBlobReceived(t: ExecutionContext, transfer: CurlResult, blob: ServedBlob, description: string): void {
  t.is(transfer.exitCode, 0, `${description} failed: ${transfer.stderr}`);
  t.is(transfer.status, 200, `${description} returned HTTP ${transfer.status}`);
  t.is(transfer.body.length, blob.size, `${description} has ${transfer.body.length} bytes`);
  t.is(sha256(transfer.body), blob.sha256, `${description} arrived altered`);
}

/** The ports of a sink server started by AbuseCluster.startSinkServer(). */
export interface SinkPorts {
  /** Reads every connection until its end and sends nothing back. */
  drainPort: number;
  /** Accepts connections and never reads them. */
  neverReadPort?: number;
  /** Seconds a never-read connection stays open before the sink closes it. With 0 or none, it stays open until the sink ends. */
  holdSeconds?: number;
}

/**
 * A TCP sink in Python 3, run as `python3 -c SINK_SERVER RUN_PREFIX DRAIN_PORT NEVER_READ_PORT HOLD_SECONDS`.
 * NEVER_READ_PORT 0 opens no never-read port, and HOLD_SECONDS 0 keeps never-read connections until the sink ends.
 */
const SINK_SERVER = `
import socket, sys, threading, time
drain_port, never_read_port, hold_seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def drain(connection):
    while connection.recv(65536):
        pass
    connection.close()
def hold(connection):
    if hold_seconds > 0:
        time.sleep(hold_seconds)
    else:
        threading.Event().wait()
    connection.close()
def serve(port, handler):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(1024)
    while True:
        connection, _ = server.accept()
        threading.Thread(target=handler, args=(connection,), daemon=True).start()
if never_read_port:
    threading.Thread(target=serve, args=(never_read_port, hold), daemon=True).start()
serve(drain_port, drain)
`;

/**
 * The cluster of one end-to-end test file, made in test.before and used by its tests, with the
 * helpers those tests share. The `cluster` getter throws while no cluster exists, so after a
 * failed start() every test fails with a message that points at the first failure.
 */
export class AbuseCluster {
  #cluster: Cluster | undefined;

  get cluster(): Cluster {
    if (!this.#cluster) throw new Error("the cluster was not created; see the first failure");
    return this.#cluster;
  }

  /** Whether start() succeeded and destroy() has not run yet. */
  get created(): boolean {
    return this.#cluster !== undefined;
  }

  /**
   * Checks the host, removes what a crashed run of `prefixFamily` left, creates the cluster and
   * runs `setup` on it. When `setup` throws, it destroys the cluster and throws the error on.
   */
  async start(prefixFamily: string, options: ClusterOptions, setup: (cluster: Cluster) => Promise<void>): Promise<void> {
    assertHostCapable();
    removeLeftovers(prefixFamily);
    this.#cluster = Cluster.create(options);
    try {
      await setup(this.#cluster);
    } catch (error) {
      await this.destroy();
      throw error;
    }
  }

  /** Stops the agents and removes the namespaces and the work folder, if start() made them. */
  async destroy(): Promise<void> {
    const cluster = this.#cluster;
    this.#cluster = undefined;
    await cluster?.destroy({ removeWorkDir: true });
  }

  ipOf(pod: string): string {
    return this.cluster.topology.pod(pod).ip;
  }

  netnsOf(pod: string): string {
    return this.cluster.topology.pod(pod).netns;
  }

  /** Returns the node's address on its pod bridge, where the metrics and readiness servers listen and the admin API does not. */
  nodeAddress(node: string): string {
    return this.cluster.topology.node(node).podCidr.replace(/\.0\/24$/, ".1");
  }

  /** Reads every sample of a node's metrics server, from inside the node's namespace. */
  async metricsOf(node: string): Promise<MetricSample[]> {
    const response = await curlInNetns(this.cluster.topology.node(node).netns, ["http://127.0.0.1:15020/metrics"]);
    if (response.status !== 200) throw new Error(`GET /metrics on ${node} returned ${response.status}: ${response.body.slice(0, 200)}`);
    return parsePrometheusText(response.body);
  }

  /** Reads a node's ambient_agent_refused_connections_total for one listener and reason. */
  async refusedTotal(node: string, listener: string, reason: string): Promise<number> {
    return sumOf(await this.metricsOf(node), REFUSED_METRIC, { listener, reason });
  }

  /** Returns VmRSS of a node's agent in bytes, from /proc/PID/status. */
  agentRss(node: string): number {
    const pid = this.cluster.agent(node).pid;
    const kib = /^VmRSS:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))?.[1];
    if (kib === undefined) throw new Error(`no VmRSS in /proc/${pid}/status of the agent of ${node}`);
    return Number(kib) * 1024;
  }

  /** Asserts that the agents of `nodes` still run and that their readiness returns 200. */
  async assertAgentsServe(t: ExecutionContext, nodes: readonly string[]): Promise<void> {
    for (const node of nodes) {
      const agent = this.cluster.agent(node);
      t.true(agent.running, `the agent of ${node} exited (${JSON.stringify(agent.exit)}):\n${agent.tail()}`);
      const ready = await curlInNetns(this.cluster.topology.node(node).netns, ["http://127.0.0.1:15021/healthz/ready"]);
      t.is(ready.status, 200, `the readiness of ${node}: ${ready.body}`);
    }
  }

  /** Writes a blob of `size` random bytes and serves it from each of `pods` on `port`. Returns once every server listens. */
  async serveBlob(pods: readonly string[], port: number, size: number): Promise<ServedBlob> {
    const site = path.join(this.cluster.workDir, "site");
    const digest = writeRandomFile(path.join(site, "blob.bin"), size);
    for (const pod of pods) await startHttpServer(this.cluster.topology, pod, site, port);
    return { size, sha256: digest, port };
  }

  /** Downloads `blob` from pod `server` as pod `client`, through the mesh when both are enrolled. */
  fetchBlob(client: string, server: string, blob: ServedBlob, timeoutSeconds = 30): Promise<CurlResult> {
    return curl(this.cluster.topology, client, `http://${this.ipOf(server)}:${blob.port}/blob.bin`, timeoutSeconds);
  }

  /** Starts a sink server in `pod`. It does not wait until the sink listens. */
  startSinkServer(pod: string, ports: SinkPorts): ChildProcess {
    const topology = this.cluster.topology;
    const args = [String(ports.drainPort), String(ports.neverReadPort ?? 0), String(ports.holdSeconds ?? 0)];
    // The prefix in its command line lets removeLeftovers() end it after a crashed run.
    return topology.spawn(this.netnsOf(pod), "python3", ["-c", SINK_SERVER, topology.prefix, ...args], { stdio: ["ignore", "ignore", "ignore"] });
  }
}
