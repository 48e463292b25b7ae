#!/usr/bin/env node
// agentctl: node diagnostics and set-up for ambient-agent.

import fs from "node:fs";
import http from "node:http";
import { parseArgs } from "node:util";
import { Capture } from "../capture/ebpf/capture";
import { readCaptureEntries } from "../capture/ebpf/inspect";
import { canonicalPinRoot, lockHolder } from "../capture/pin-lock";
import { initCa } from "../identity/ca";

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
  config [--admin HOST:PORT]
                     print what the running agent serves (from its admin API, default 127.0.0.1:15000)
`;

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

async function main(argv: string[]): Promise<void> {
  const [group, action, ...rest] = argv;
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(USAGE);
    return;
  }
  if (group === "ca" && action === "init") return caInit(rest);
  if (group === "capture" && action === "remove") return captureRemove(rest);
  if (group === "capture" && action === "list") return captureList(rest);
  if (group === "config") return config([action, ...rest].filter((value) => value !== undefined));
  if (group === undefined || group === "help" || group === "--help") {
    process.stdout.write(USAGE);
    return;
  }
  throw new Error(`unknown command "${argv.join(" ")}"\n\n${USAGE}`);
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((error: Error) => {
    process.stderr.write(`agentctl: ${error.message}\n`);
    process.exit(1);
  });
}
