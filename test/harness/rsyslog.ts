// Runs a private rsyslogd for tests: in the foreground, with its configuration, work directory,
// pid file and output in a temporary folder, listening on 127.0.0.1 only. It loads no input but
// imtcp, so it never reads /dev/log and never touches the machine's own syslog configuration.
// One input takes plain TCP, a second one TLS with a server certificate made for the test
// (DNS name localhost). Every message goes to one file, a line per message with tab-separated
// fields (see OUTPUT_TEMPLATE), which readMessages() parses.

import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

import { createLeaf, createRoot } from "../unit/cert-fixtures";
import { forgetRun, registerPid } from "./pid-registry";

const RSYSLOGD = "/usr/sbin/rsyslogd";
/** The DNS name in the TLS certificate of the receiver. Connect to 127.0.0.1 and verify this name. */
export const RSYSLOG_SERVER_NAME = "localhost";
const START_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 10_000;

/** PRI, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID, STRUCTURED-DATA and MSG, separated by tabs. */
const OUTPUT_TEMPLATE = "%pri%\\t%timereported:::date-rfc3339%\\t%hostname%\\t%app-name%\\t%procid%\\t%msgid%\\t%structured-data%\\t%msg%\\n";

/** One message as rsyslog parsed and stored it. */
export interface ReceivedMessage {
  pri: number;
  timestamp: string;
  hostname: string;
  appName: string;
  procId: string;
  msgId: string;
  structuredData: string;
  msg: string;
}

export interface RsyslogOptions {
  /** Prefix of the temporary folder. The pid registry uses it to end what a crashed run left. */
  prefix: string;
  /** rsyslog's maximum message size. Default 64k. */
  maxMessageSize?: string;
  /** Network namespace (a name under /var/run/netns) to run rsyslogd in; default this process's. */
  netns?: string;
  /** Port of the plain TCP input; default a free port. */
  tcpPort?: number;
  /** Port of the TLS input; default a free port. */
  tlsPort?: number;
}

export class RsyslogServer {
  readonly tcpPort: number;
  readonly tlsPort: number;
  /** PEM file of the CA that signed the TLS input's certificate. */
  readonly caFile: string;
  readonly outputFile: string;
  private child: ChildProcess | undefined;
  private exited: Promise<void> | undefined;

  private constructor(
    private readonly directory: string,
    private readonly prefix: string,
    ports: { tcp: number; tls: number },
    private readonly netns: string | undefined,
  ) {
    this.tcpPort = ports.tcp;
    this.tlsPort = ports.tls;
    this.caFile = path.join(directory, "ca.pem");
    this.outputFile = path.join(directory, "messages.log");
  }

  /** Writes the certificates and the configuration into a new temporary folder and starts rsyslogd. */
  static async start(options: RsyslogOptions): Promise<RsyslogServer> {
    const directory = fs.mkdtempSync(path.join(os.tmpdir(), `${options.prefix}-`));
    const prefix = path.basename(directory);
    const ports = { tcp: options.tcpPort ?? (await freePort()), tls: options.tlsPort ?? (await freePort()) };
    const server = new RsyslogServer(directory, prefix, ports, options.netns);
    try {
      await server.writeFiles(options.maxMessageSize ?? "64k");
      await server.run();
    } catch (error) {
      await server.cleanup();
      throw error;
    }
    return server;
  }

  /** Starts rsyslogd (again) on the same ports and resolves once both inputs listen. */
  async run(): Promise<void> {
    if (this.child !== undefined) throw new Error("rsyslogd is already running");
    const log = fs.openSync(path.join(this.directory, "rsyslogd.out"), "a");
    const args = ["-n", "-f", this.configFile, "-i", path.join(this.directory, "rsyslogd.pid")];
    // nsenter execs rsyslogd in place, so the child's PID is rsyslogd's in both cases.
    const child = this.netns
      ? spawn("nsenter", [`--net=/var/run/netns/${this.netns}`, "--", RSYSLOGD, ...args], { stdio: ["ignore", log, log] })
      : spawn(RSYSLOGD, args, { stdio: ["ignore", log, log] });
    fs.closeSync(log);
    registerPid(this.prefix, child.pid);
    this.child = child;
    this.exited = new Promise((resolve) => child.once("exit", () => resolve()));
    child.once("exit", () => {
      if (this.child === child) this.child = undefined;
    });
    await this.waitForListeners();
  }

  /** Stops rsyslogd with SIGTERM (SIGKILL after 10 s) and waits until it exited. */
  async stop(): Promise<void> {
    const child = this.child;
    if (child === undefined || child.pid === undefined) return;
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
    await this.exited;
    clearTimeout(timer);
    this.child = undefined;
  }

  /**
   * Freezes rsyslogd (SIGSTOP) and waits until every thread is stopped. The kernel still
   * acknowledges bytes sent to it, which then wait unread in the socket buffer.
   */
  async pause(): Promise<void> {
    const pid = this.child?.pid;
    if (pid === undefined) return;
    process.kill(pid, "SIGSTOP");
    const deadline = Date.now() + STOP_TIMEOUT_MS;
    while (!allThreadsStopped(pid)) {
      if (Date.now() >= deadline) throw new Error(`rsyslogd ${pid} did not stop within ${STOP_TIMEOUT_MS} ms of SIGSTOP`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /** Ends rsyslogd with SIGKILL, so whatever it had not written yet is lost, and waits until it exited. */
  async kill(): Promise<void> {
    const child = this.child;
    if (child === undefined) return;
    child.kill("SIGKILL");
    await this.exited;
    this.child = undefined;
  }

  /** Stops rsyslogd and removes the temporary folder. */
  async cleanup(): Promise<void> {
    await this.stop();
    forgetRun(this.prefix);
    fs.rmSync(this.directory, { recursive: true, force: true });
  }

  /** Returns the messages from `appName` in the output file, in the order rsyslog wrote them. */
  readMessages(appName = "ambient-agent"): ReceivedMessage[] {
    if (!fs.existsSync(this.outputFile)) return [];
    return fs
      .readFileSync(this.outputFile, "utf8")
      .split("\n")
      .filter((line) => line !== "")
      .map(parseOutputLine)
      .filter((message) => message.appName === appName);
  }

  /** Polls the output file until `done` holds for its messages; rejects after timeoutMs. */
  async waitForMessages(done: (messages: ReceivedMessage[]) => boolean, timeoutMs = 10_000): Promise<ReceivedMessage[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const messages = this.readMessages();
      if (done(messages)) return messages;
      if (Date.now() >= deadline) throw new Error(`rsyslog output did not reach the expected state within ${timeoutMs} ms (${messages.length} messages)`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Returns what rsyslogd wrote to stdout and stderr, for failure messages. */
  daemonOutput(): string {
    const file = path.join(this.directory, "rsyslogd.out");
    return fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
  }

  private get configFile(): string {
    return path.join(this.directory, "rsyslog.conf");
  }

  private async writeFiles(maxMessageSize: string): Promise<void> {
    const root = await createRoot({ name: "rsyslog test root" });
    const leaf = await createLeaf(root, { dnsNames: [RSYSLOG_SERVER_NAME] });
    const certFile = path.join(this.directory, "server.pem");
    const keyFile = path.join(this.directory, "server-key.pem");
    fs.writeFileSync(this.caFile, root.certPem);
    fs.writeFileSync(certFile, leaf.chainPem);
    fs.writeFileSync(keyFile, leaf.keyPem, { mode: 0o600 });
    const work = path.join(this.directory, "work");
    fs.mkdirSync(work);
    const tlsSettings =
      `streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon" ` +
      `streamDriver.caFile="${this.caFile}" streamDriver.certFile="${certFile}" streamDriver.keyFile="${keyFile}"`;
    const config = [
      `global(workDirectory="${work}" maxMessageSize="${maxMessageSize}")`,
      `module(load="imtcp" maxSessions="200")`,
      `template(name="aa_test" type="string" string="${OUTPUT_TEMPLATE}")`,
      `input(type="imtcp" address="127.0.0.1" port="${this.tcpPort}" ruleset="aa_test")`,
      `input(type="imtcp" address="127.0.0.1" port="${this.tlsPort}" ruleset="aa_test" ${tlsSettings})`,
      `ruleset(name="aa_test") { action(type="omfile" file="${this.outputFile}" template="aa_test") }`,
      "",
    ].join("\n");
    fs.writeFileSync(this.configFile, config);
  }

  /** Waits until both ports listen on 127.0.0.1, read from rsyslogd's /proc/PID/net/tcp so that no test connection reaches rsyslog. */
  private async waitForListeners(): Promise<void> {
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (!(isListening(this.tcpPort, this.child?.pid) && isListening(this.tlsPort, this.child?.pid))) {
      if (this.child === undefined) throw new Error(`rsyslogd exited during start:\n${this.daemonOutput()}`);
      if (Date.now() >= deadline) throw new Error(`rsyslogd did not listen on ports ${this.tcpPort} and ${this.tlsPort} within ${START_TIMEOUT_MS} ms:\n${this.daemonOutput()}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

/** Parses one line of OUTPUT_TEMPLATE. MSG is last, so a tab inside it stays in it. */
export function parseOutputLine(line: string): ReceivedMessage {
  const fields = line.split("\t");
  const [pri, timestamp, hostname, appName, procId, msgId, structuredData] = fields;
  return { pri: Number(pri), timestamp, hostname, appName, procId, msgId, structuredData, msg: fields.slice(7).join("\t") };
}

/** Returns the PARAM-VALUEs of the first SD-ELEMENT, with RFC 5424's escapes removed. */
export function parseStructuredData(structuredData: string): { sdId: string; params: Record<string, string> } {
  const match = /^\[([^ \]]+)((?: [^=]+="(?:[^"\\]|\\.)*")*)\]/.exec(structuredData);
  if (!match) throw new Error(`structured data ${JSON.stringify(structuredData)} does not parse`);
  const params: Record<string, string> = {};
  for (const param of match[2].matchAll(/ ([^=]+)="((?:[^"\\]|\\.)*)"/g)) {
    params[param[1]] = param[2].replace(/\\(.)/g, "$1");
  }
  return { sdId: match[1], params };
}

/** Tells whether every thread of `pid` is in state T (stopped by a signal), from /proc/PID/task/TID/stat. */
function allThreadsStopped(pid: number): boolean {
  const tasks = fs.readdirSync(`/proc/${pid}/task`);
  return tasks.every((tid) => {
    const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) === "T";
  });
}

/** Tells whether `port` listens on 127.0.0.1 in the network namespace of process `pid`. */
function isListening(port: number, pid: number | undefined): boolean {
  if (pid === undefined) return false;
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  let table: string;
  try {
    table = fs.readFileSync(`/proc/${pid}/net/tcp`, "utf8");
  } catch {
    return false;
  }
  return table
    .split("\n")
    .some((line) => {
      const columns = line.trim().split(/\s+/);
      return columns[1] === local && columns[3] === "0A";
    });
}

/** Returns a port that was free on 127.0.0.1 a moment ago. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}
