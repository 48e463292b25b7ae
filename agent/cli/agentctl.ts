#!/usr/bin/env node
// agentctl: node diagnostics and set-up for ambient-agent.

import fs from "node:fs";
import net from "node:net";
import { Capture } from "../capture/ebpf/capture";
import { readCaptureEntries } from "../capture/ebpf/inspect";
import { describeHolderPid, lockHolder } from "../capture/pin-lock";
import { chainedSockets, unchain } from "../cni/chain";
import { initCa } from "../identity/ca";
import { UsageError } from "./admin-client";
import { AUDIT_USAGE, runAuditCommand } from "./audit-commands";
import { DOCTOR_USAGE, runDoctorCommand } from "./doctor";
import { INSPECT_USAGE, runInspectCommand } from "./inspect-commands";
import { pinRootOption } from "./pin-root-option";
import { parseOptions, synopsisOf, usageErrorText } from "./usage";

/** The trust domains initCa accepts; checked here too, so that a bad --trust-domain is a usage error. */
const TRUST_DOMAIN = /^[a-z0-9._-]+$/;

const USAGE = `usage: agentctl COMMAND [options]

  ca init --dir DIR [--trust-domain TD] [--force]
                     create an embedded CA (ECDSA P-256 root) in DIR; agents given the same DIR trust each other.
                     --trust-domain sets the SPIFFE trust domain (default cluster.local); --force
                     replaces a CA that DIR already holds
  capture remove --node NAME [--pin-root DIR] [--force]
                     detach the node's eBPF programs and remove its pinned maps (capture stops);
                     refused while an agent serves them, unless --force
  capture list --node NAME [--pin-root DIR]
                     print the node's pinned capture entries as JSON (enrolled netns cookies, guarded pod
                     IPs, inbound listeners, sk_lookup links); works while the agent is down.
                     --pin-root replaces the default /sys/fs/bpf/ambient-agent/NAME of both capture commands
  cni remove --conf-dir DIR [--force]
                     remove the agent's plugin entry from the node's CNI configuration in DIR, for
                     uninstalling; new pods then start without waiting for an agent. Refused while an
                     agent serves the entry's socket (it would put the entry back), unless --force
${INSPECT_USAGE}${DOCTOR_USAGE}${AUDIT_USAGE}
\`agentctl --help\`, \`agentctl help\` and \`agentctl COMMAND --help\` print this text.
Exit status: 0 on success; 1 on an error (agent unreachable or not ready, unknown pod, a doctor check
failed); 2 on a missing or unknown command or a missing or invalid option. audit has its own statuses,
listed above.
`;

async function caInit(argv: string[]): Promise<void> {
  const { values } = parseOptions({
    args: argv,
    options: { dir: { type: "string" }, "trust-domain": { type: "string" }, force: { type: "boolean" } },
  });
  if (!values.dir) throw new UsageError("missing --dir: the folder that will hold the CA");
  const trustDomain = values["trust-domain"];
  if (trustDomain !== undefined && !TRUST_DOMAIN.test(trustDomain)) {
    throw new UsageError(`invalid --trust-domain ${JSON.stringify(trustDomain)}: use lowercase letters, digits, '.', '-' and '_' only, for example cluster.local`);
  }
  await initCa(values.dir, { trustDomain: values["trust-domain"], force: values.force });
  process.stdout.write(`created CA in ${values.dir} (trust domain ${values["trust-domain"] ?? "cluster.local"})\n`);
}

/** Returns the pin root that --node or --pin-root names. Throws UsageError without either. */
function requiredPinRoot(values: { node?: string; "pin-root"?: string }): string {
  const pinRoot = pinRootOption(values);
  if (pinRoot === undefined) throw new UsageError("missing --node NAME (or --pin-root DIR)");
  return pinRoot;
}

function captureList(argv: string[]): void {
  const { values } = parseOptions({ args: argv, options: { node: { type: "string" }, "pin-root": { type: "string" } } });
  const pinRoot = requiredPinRoot(values);
  if (!fs.existsSync(pinRoot)) throw new Error(`nothing is pinned under ${pinRoot}: no agent has attached capture for this node`);
  process.stdout.write(JSON.stringify(readCaptureEntries(pinRoot), null, 2) + "\n");
}

function captureRemove(argv: string[]): void {
  const { values } = parseOptions({
    args: argv,
    options: { node: { type: "string" }, "pin-root": { type: "string" }, force: { type: "boolean" } },
  });
  const pinRoot = requiredPinRoot(values);
  const holder = lockHolder(pinRoot);
  if (holder !== undefined && !values.force) {
    throw new Error(
      `an agent (${describeHolderPid(holder)}) serves ${pinRoot}; removing its capture would open its pods. Stop the agent first, or pass --force`,
    );
  }
  const removed = Capture.remove(pinRoot);
  process.stdout.write(removed ? `removed capture pinned under ${pinRoot}\n` : `nothing pinned under ${pinRoot}\n`);
}

async function cniRemove(argv: string[]): Promise<void> {
  const { values } = parseOptions({ args: argv, options: { "conf-dir": { type: "string" }, force: { type: "boolean" } } });
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
  if (group === "capture") throw new UsageError(action === undefined ? "missing capture command: use list or remove" : `unknown capture command "${action}": use list or remove`);
  if (group === "ca") throw new UsageError(action === undefined ? "missing ca command: use init" : `unknown ca command "${action}": use init`);
  if (group === "doctor") {
    process.exitCode = await runDoctorCommand([action, ...rest].filter((value) => value !== undefined));
    return;
  }
  if (group === "audit") {
    process.exitCode = await runAuditCommand(action, rest);
    return;
  }
  if (group === "help") {
    process.stdout.write(USAGE);
    return;
  }
  if (group === undefined) throw new MissingCommandError();
  if (await runInspectCommand(group, action, rest)) return;
  throw new UsageError(`unknown command "${group}"; ${COMMAND_NAMES}`);
}

/** `agentctl` without a command: bad usage, printed with the whole help text. */
class MissingCommandError extends UsageError {}

const COMMAND_NAMES = "the commands are ca, capture, cni, status, config, workloads, services, certificates, connections, log, authz, policies, doctor and audit";

/** Returns the words of the command that `argv` names, such as ["authz", "check"]; [] for an unknown command. */
function commandWords(argv: readonly string[]): string[] {
  const [group, action] = argv;
  if (group === undefined) return [];
  if (action !== undefined && synopsisOf(USAGE, [group, action]).length > 0) return [group, action];
  return synopsisOf(USAGE, [group]).length > 0 ? [group] : [];
}

if (require.main === module) {
  // A reader that stops early (agentctl policies | head) is no error.
  process.stdout.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code === "EPIPE") process.exit(0);
    throw error;
  });
  main(process.argv.slice(2)).catch((error: Error) => {
    if (error instanceof MissingCommandError) {
      process.stderr.write(`agentctl: missing command\n\n${USAGE}`);
      process.exit(2);
    }
    if (error instanceof UsageError) {
      process.stderr.write(usageErrorText(USAGE, commandWords(process.argv.slice(2)), error.message));
      process.exit(2);
    }
    process.stderr.write(`agentctl: ${error.message}\n`);
    process.exit(1);
  });
}
