#!/usr/bin/env node
// agentctl: node diagnostics and set-up for ambient-agent.

import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import { parseArgs } from "node:util";
import { Capture } from "../capture/ebpf/capture";
import { readCaptureEntries } from "../capture/ebpf/inspect";
import { canonicalPinRoot, lockHolder } from "../capture/pin-lock";
import { chainedSockets, unchain } from "../cni/chain";
import { initCa } from "../identity/ca";
import { parsePodUid } from "../rbac/authz-query";
import { parseDestinationQuery, parseSourceQuery, type AccessCheck, type PolicyStatusReport, type WorkloadExplanation } from "../rbac/explain";
import { AUDIT_USAGE, runAuditCommand } from "./audit-commands";
import { fetchReadiness, formatReadiness } from "./status-command";
import { formatAccessCheck, formatPolicyStatuses, formatWorkloadExplanation } from "./authz-output";

const NODE_NAME = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;

const USAGE = `usage: agentctl COMMAND [options]

  ca init --dir DIR [--trust-domain TD] [--force]
                     create an embedded CA (ECDSA P-256 root) in DIR; agents given the same DIR trust each other
  capture remove --node NAME [--pin-root DIR] [--force]
                     detach the node's eBPF programs and remove its pinned maps (capture stops);
                     refused while an agent serves them, unless --force
  capture list --node NAME [--pin-root DIR]
                     print the node's pinned capture entries as JSON (enrolled netns cookies, guarded pod
                     IPs, inbound listeners, sk_lookup links); works while the agent is down
  cni remove --conf-dir DIR [--force]
                     remove the agent's plugin entry from the node's CNI configuration in DIR, for
                     uninstalling; new pods then start without waiting for an agent. Refused while an
                     agent serves the entry's socket (it would put the entry back), unless --force
  status [--admin HOST:PORT] [-o table|json]
                     tell whether the agent is ready (configuration read, capture attached,
                     certificates issued, CNI plugin chained), how many pods are enrolled, and the
                     state of each Kubernetes API watch (listed, watching, last error). Exits 1
                     when the agent is not ready
  config [--admin HOST:PORT]
                     print what the running agent serves (from its admin API, default 127.0.0.1:15000)
  authz check --from SOURCE --to DESTINATION [--admin HOST:PORT] [-o table|json]
                     tell whether SOURCE may connect to DESTINATION, by which policy and rule, from the
                     running agent's state. SOURCE: spiffe://TD/ns/NS/sa/SA, TD/ns/NS/sa/SA, a pod NS/NAME
                     (its identity when enrolled, plaintext otherwise) or an IP (plaintext).
                     DESTINATION: a pod NS/NAME[:PORT], or IP:PORT of a pod or a Service cluster IP.
                     Without a port, every port the pod's policies name is checked. Exits 0 for allow and deny
  authz explain NAMESPACE/NAME [--admin HOST:PORT] [-o table|json]
                     list the AuthorizationPolicies that apply to the pod in evaluation order, and its
                     PeerAuthentication scopes with the effective mTLS mode per port
  policies [--admin HOST:PORT] [-o table|json]
                     list every AuthorizationPolicy and PeerAuthentication with its status (enforced,
                     dry-run, rejected, warnings), and the rejected manifests with file, line and field
${AUDIT_USAGE}
Exit status: 0 on success, 1 on an error (agent unreachable, unknown pod), 2 on a missing or invalid option.
`;

const DEFAULT_ADMIN = "127.0.0.1:15000";
const ADMIN_TIMEOUT_MS = 5_000;

/** A missing or malformed option: agentctl prints the usage text and exits with status 2. */
class UsageError extends Error {}

/** The options every authz command takes. */
const OUTPUT_OPTIONS = { admin: { type: "string" }, output: { type: "string", short: "o" } } as const;

async function caInit(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { dir: { type: "string" }, "trust-domain": { type: "string" }, force: { type: "boolean" } },
  });
  if (!values.dir) throw new Error("missing --dir: the folder that will hold the CA");
  await initCa(values.dir, { trustDomain: values["trust-domain"], force: values.force });
  process.stdout.write(`created CA in ${values.dir} (trust domain ${values["trust-domain"] ?? "cluster.local"})\n`);
}

/** Returns the pin root that --node or --pin-root names. */
function pinRootOption(values: { node?: string; "pin-root"?: string }): string {
  if (!values.node && !values["pin-root"]) throw new Error("missing --node NAME (or --pin-root DIR)");
  if (values.node && !NODE_NAME.test(values.node)) {
    throw new Error(`invalid --node "${values.node}": use a Kubernetes node name (lowercase letters, digits, '-' and '.')`);
  }
  return canonicalPinRoot(values["pin-root"] ?? `/sys/fs/bpf/ambient-agent/${values.node}`);
}

function captureList(argv: string[]): void {
  const { values } = parseArgs({ args: argv, options: { node: { type: "string" }, "pin-root": { type: "string" } } });
  const pinRoot = pinRootOption(values);
  if (!fs.existsSync(pinRoot)) throw new Error(`nothing is pinned under ${pinRoot}: no agent has attached capture for this node`);
  process.stdout.write(JSON.stringify(readCaptureEntries(pinRoot), null, 2) + "\n");
}

function captureRemove(argv: string[]): void {
  const { values } = parseArgs({
    args: argv,
    options: { node: { type: "string" }, "pin-root": { type: "string" }, force: { type: "boolean" } },
  });
  const pinRoot = pinRootOption(values);
  const holder = lockHolder(pinRoot);
  if (holder !== undefined && !values.force) {
    throw new Error(
      `the agent with PID ${holder} serves ${pinRoot}; removing its capture would open its pods. Stop the agent first, or pass --force`,
    );
  }
  const removed = Capture.remove(pinRoot);
  process.stdout.write(removed ? `removed capture pinned under ${pinRoot}\n` : `nothing pinned under ${pinRoot}\n`);
}

async function cniRemove(argv: string[]): Promise<void> {
  const { values } = asUsage(() => parseArgs({ args: argv, options: { "conf-dir": { type: "string" }, force: { type: "boolean" } } }));
  const confDir = values["conf-dir"];
  if (!confDir) throw new UsageError("missing --conf-dir DIR: the node's CNI configuration folder, for example /etc/cni/net.d");
  if (!fs.existsSync(confDir)) throw new Error(`the CNI configuration folder ${confDir} does not exist; pass the folder the container runtime reads`);
  if (!values.force) {
    for (const socket of chainedSockets(confDir)) {
      if (await socketAnswers(socket)) {
        throw new Error(`an agent serves ${socket} and would put the entry back: stop it first, or pass --force`);
      }
    }
  }
  const changed = unchain(confDir);
  if (changed.length === 0) {
    process.stdout.write(`no CNI configuration file in ${confDir} has the agent's plugin entry; nothing to remove\n`);
    return;
  }
  for (const file of changed) process.stdout.write(`removed the agent's plugin entry from ${file}\n`);
}

/** Tells whether a process accepts connections on the unix socket `socketPath` (within 1 s). */
function socketAnswers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(socketPath);
    const finish = (answered: boolean): void => {
      socket.destroy();
      resolve(answered);
    };
    socket.setTimeout(1_000, () => finish(false));
    socket.once("connect", () => finish(true));
    socket.once("error", () => finish(false));
  });
}

async function config(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { admin: { type: "string" } } });
  const address = values.admin ?? "127.0.0.1:15000";
  const body = await new Promise<string>((resolve, reject) => {
    http
      .get(`http://${address}/config_dump`, (response) => {
        let text = "";
        response.setEncoding("utf8");
        response.on("data", (chunk) => (text += chunk));
        response.on("end", () => resolve(text));
      })
      .on("error", (error) => reject(new Error(`cannot reach the agent's admin API at ${address}: ${error.message}; is the agent running (and in this network namespace)?`)));
  });
  process.stdout.write(body);
}

/** Runs an option parser; an unknown option or a missing value becomes a usage error. */
function asUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

function outputFormat(value: string | undefined): "table" | "json" {
  if (value === undefined || value === "table" || value === "json") return value ?? "table";
  throw new UsageError(`invalid -o ${JSON.stringify(value)}: use table or json`);
}

/** Fetches a JSON body from the agent's admin API. A 400 response is a usage error, and any other failure is an error. */
async function adminGet(address: string, requestPath: string): Promise<unknown> {
  const { status, text } = await new Promise<{ status: number; text: string }>((resolve, reject) => {
    const request = http.get(`http://${address}${requestPath}`, { timeout: ADMIN_TIMEOUT_MS }, (response) => {
      let body = "";
      response.setEncoding("utf8");
      response.on("data", (chunk) => (body += chunk));
      response.on("end", () => resolve({ status: response.statusCode ?? 0, text: body }));
    });
    request.on("timeout", () => request.destroy(new Error(`no response within ${ADMIN_TIMEOUT_MS / 1000} s`)));
    request.on("error", (error) =>
      reject(new Error(`cannot reach the agent's admin API at ${address}: ${error.message}; is the agent running (and in this network namespace)?`)),
    );
  });
  let body: { error?: string } | undefined;
  try {
    body = JSON.parse(text) as { error?: string };
  } catch {
    throw new Error(`the admin API at ${address} responded to ${requestPath} with status ${status} and no JSON: ${text.trim().slice(0, 200)}; is this agent older than agentctl?`);
  }
  if (status === 400) throw new UsageError(body.error ?? `the agent rejected ${requestPath}`);
  if (status !== 200) throw new Error(body.error ?? `the admin API responded to ${requestPath} with status ${status}`);
  return body;
}

function validAdmin(value: string | undefined): string {
  const address = value ?? DEFAULT_ADMIN;
  if (!/^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}$/.test(address)) {
    throw new UsageError(`invalid --admin ${JSON.stringify(address)}: write HOST:PORT, for example ${DEFAULT_ADMIN}`);
  }
  return address;
}

async function authzCheck(argv: string[]): Promise<void> {
  const { values } = asUsage(() => parseArgs({ args: argv, options: { ...OUTPUT_OPTIONS, from: { type: "string" }, to: { type: "string" } } }));
  const format = outputFormat(values.output);
  if (values.from === undefined) throw new UsageError("missing --from SOURCE");
  if (values.to === undefined) throw new UsageError("missing --to DESTINATION");
  // The forms are checked here too, so a typo is a usage error even with the agent down.
  try {
    parseSourceQuery(values.from);
    parseDestinationQuery(values.to);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  const query = new URLSearchParams({ from: values.from, to: values.to });
  const check = (await adminGet(validAdmin(values.admin), `/authz/check?${query}`)) as AccessCheck;
  process.stdout.write(format === "json" ? JSON.stringify(check, null, 2) + "\n" : formatAccessCheck(check));
}

async function authzExplain(argv: string[]): Promise<void> {
  const { values, positionals } = asUsage(() => parseArgs({ args: argv, options: OUTPUT_OPTIONS, allowPositionals: true }));
  const format = outputFormat(values.output);
  if (positionals.length !== 1) throw new UsageError(positionals.length === 0 ? "missing pod: write agentctl authz explain NAMESPACE/NAME" : `expected one pod, got ${positionals.join(" ")}`);
  if (parsePodUid(positionals[0]) === undefined) {
    throw new UsageError(`invalid pod ${JSON.stringify(positionals[0])}: write NAMESPACE/NAME, for example demo/web`);
  }
  const query = new URLSearchParams({ pod: positionals[0] });
  const explanation = (await adminGet(validAdmin(values.admin), `/authz/explain?${query}`)) as WorkloadExplanation;
  process.stdout.write(format === "json" ? JSON.stringify(explanation, null, 2) + "\n" : formatWorkloadExplanation(explanation));
}

async function policies(argv: string[]): Promise<void> {
  const { values } = asUsage(() => parseArgs({ args: argv, options: OUTPUT_OPTIONS }));
  const format = outputFormat(values.output);
  const report = (await adminGet(validAdmin(values.admin), "/policies")) as PolicyStatusReport;
  process.stdout.write(format === "json" ? JSON.stringify(report, null, 2) + "\n" : formatPolicyStatuses(report));
}

async function status(argv: string[]): Promise<void> {
  const { values } = asUsage(() => parseArgs({ args: argv, options: OUTPUT_OPTIONS }));
  const format = outputFormat(values.output);
  const readiness = await fetchReadiness(validAdmin(values.admin), ADMIN_TIMEOUT_MS);
  process.stdout.write(format === "json" ? JSON.stringify(readiness, null, 2) + "\n" : formatReadiness(readiness));
  // A script can test readiness by the exit status alone.
  if (!readiness.ready) process.exitCode = 1;
}

async function main(argv: string[]): Promise<void> {
  const [group, action, ...rest] = argv;
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(USAGE);
    return;
  }
  if (group === "ca" && action === "init") return caInit(rest);
  if (group === "capture" && action === "remove") return captureRemove(rest);
  if (group === "capture" && action === "list") return captureList(rest);
  if (group === "cni" && action === "remove") return cniRemove(rest);
  if (group === "cni") throw new UsageError(action === undefined ? "missing cni command: use remove" : `unknown cni command "${action}": use remove`);
  if (group === "config") return config([action, ...rest].filter((value) => value !== undefined));
  if (group === "authz" && action === "check") return authzCheck(rest);
  if (group === "authz" && action === "explain") return authzExplain(rest);
  if (group === "authz") throw new UsageError(action === undefined ? "missing authz command: use check or explain" : `unknown authz command "${action}": use check or explain`);
  if (group === "audit") {
    process.exitCode = await runAuditCommand(action, rest);
    return;
  }
  if (group === "status") return status([action, ...rest].filter((value) => value !== undefined));
  if (group === "policies") return policies([action, ...rest].filter((value) => value !== undefined));
  if (group === undefined || group === "help" || group === "--help") {
    process.stdout.write(USAGE);
    return;
  }
  throw new Error(`unknown command "${argv.join(" ")}"\n\n${USAGE}`);
}

if (require.main === module) {
  // A reader that stops early (agentctl policies | head) is no error.
  process.stdout.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code === "EPIPE") process.exit(0);
    throw error;
  });
  main(process.argv.slice(2)).catch((error: Error) => {
    if (error instanceof UsageError) {
      process.stderr.write(`agentctl: ${error.message}\n\n${USAGE}`);
      process.exit(2);
    }
    process.stderr.write(`agentctl: ${error.message}\n`);
    process.exit(1);
  });
}
