// agentctl run as a child process: exit status 2 for bad usage, 1 when the admin API is unreachable,
// the admin API commands against a fake admin server on 127.0.0.1 that serves fixture bodies, and
// `agentctl doctor` on this machine.

import test from "ava";
import { execFile } from "node:child_process";
import http from "node:http";
import net from "node:net";
import YAML from "yaml";
import { AGENTCTL_BIN } from "../harness/agent-process";
import { CERTIFICATES, CONNECTIONS, LOG_LEVELS, READINESS, SERVICES, STATUS, WORKLOADS } from "./agentctl-fixtures";

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs agentctl without blocking the event loop, so that a fake admin server in this process can respond. */
function agentctl(...args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [AGENTCTL_BIN, ...args], { encoding: "utf8", timeout: 60_000 }, (error, stdout, stderr) => {
      let status: number | null = 0;
      if (error !== null) status = typeof error.code === "number" ? error.code : null;
      resolve({ status, stdout, stderr });
    });
  });
}

interface FakeAdmin {
  address: string;
  /** "METHOD /path?query" of every request, in order. */
  requests: string[];
  close(): Promise<void>;
}

/** Serves `routes` (path without query → status and JSON body) on 127.0.0.1 at a free port, and 404 with text elsewhere. */
async function fakeAdmin(routes: Record<string, { status?: number; body: unknown }>): Promise<FakeAdmin> {
  const requests: string[] = [];
  const server = http.createServer((request, response) => {
    requests.push(`${request.method} ${request.url}`);
    const path = new URL(request.url ?? "/", "http://agent").pathname;
    const route = routes[path];
    if (route === undefined) {
      // As the agent's admin server responds to a path it does not serve.
      response.writeHead(404, { "content-type": "text/plain" }).end(`not found: ${path}\n`);
      return;
    }
    response.writeHead(route.status ?? 200, { "content-type": "application/json" });
    response.end(JSON.stringify(route.body));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  return { address: `127.0.0.1:${port}`, requests, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

/** Returns a loopback port with no listener: bound once by the kernel, then released. */
async function unusedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

const ROUTES = {
  "/status": { body: STATUS },
  "/healthz/ready": { body: READINESS },
  "/workloads": { body: WORKLOADS },
  "/services": { body: SERVICES },
  "/certificates": { body: CERTIFICATES },
  "/connections": { body: CONNECTIONS },
  "/logging": { body: LOG_LEVELS },
  "/config_dump": { body: { node: "node-a", workloads: WORKLOADS } },
};

test("bad options exit 2 naming the value", async (t) => {
  const cases: [string[], RegExp][] = [
    [["frobnicate"], /unknown command "frobnicate"/],
    [["status", "--bogus"], /Unknown option '--bogus'/],
    [["status", "-o", "xml"], /invalid -o "xml": use table, json, yaml/],
    [["config", "-o", "table"], /invalid -o "table": use json, yaml/],
    [["workloads", "--namespace", "Shop"], /invalid --namespace "Shop"/],
    [["workloads", "--node"], /argument missing|--node/],
    [["workloads", "extra"], /Unexpected argument 'extra'/],
    [["services", "--admin", "localhost"], /invalid --admin "localhost": write HOST:PORT/],
    [["services", "--admin", "127.0.0.1:70000"], /invalid --admin "127.0.0.1:70000"/],
    [["certificates", "-o", "short"], /invalid -o "short"/],
    [["connections", "--direction", "sideways"], /invalid --direction "sideways": use inbound or outbound/],
    [["connections", "--workload", "web"], /invalid --workload "web": write NAMESPACE\/NAME/],
    [["log", "--level", "loud"], /invalid --level "loud": use fatal, error, warn, info, debug, trace, silent/],
    [["log", "proxy:verbose"], /invalid level "verbose" in "proxy:verbose"/],
    [["log", "proxy"], /missing level for "proxy"/],
    [["log", "Proxy:debug"], /invalid log setting "Proxy:debug"/],
    [["log", "--reset", "proxy:debug"], /--reset restores every start-up level/],
    [["doctor", "--capture", "bpf"], /invalid --capture "bpf": use auto, ebpf, nftables/],
    [["doctor", "-o", "xml"], /invalid -o "xml"/],
    [["authz", "check", "--from", "shop/web", "--to", "backend/api", "-o", "xml"], /invalid -o "xml"/],
    [["capture", "list"], /missing --node NAME/],
    [["capture", "list", "--node", "Node_A"], /invalid --node "Node_A"/],
    [["capture", "frob"], /unknown capture command "frob"/],
    [["ca", "init"], /missing --dir/],
    [["ca", "init", "--bogus"], /Unknown option '--bogus'/],
  ];
  const runs = await Promise.all(cases.map(([args]) => agentctl(...args)));
  cases.forEach(([args, message], i) => {
    t.is(runs[i].status, 2, `agentctl ${args.join(" ")}: ${runs[i].stderr}`);
    t.regex(runs[i].stderr, message, args.join(" "));
    t.regex(runs[i].stderr, /usage: agentctl COMMAND/, args.join(" "));
  });
});

test("help flag prints usage for a command", async (t) => {
  const run = await agentctl("workloads", "--help");
  t.is(run.status, 0);
  t.regex(run.stdout, /^usage: agentctl COMMAND/);
  t.regex(run.stdout, /--admin HOST:PORT {2}the agent's admin API address \(default 127\.0\.0\.1:15000\)/);
  t.regex(run.stdout, /^ {2}doctor /m);
});

test("unreachable admin exits 1", async (t) => {
  const address = `127.0.0.1:${await unusedPort()}`;
  for (const command of [["status"], ["workloads"], ["services"], ["certificates"], ["connections"], ["log"], ["config"], ["policies"]]) {
    const run = await agentctl(...command, "--admin", address);
    t.is(run.status, 1, `agentctl ${command.join(" ")}: ${run.stderr}`);
    t.regex(run.stderr, new RegExp(`cannot reach the agent's admin API at ${address}`), command.join(" "));
    t.notRegex(run.stderr, /usage:/, command.join(" "));
  }
});

test("workloads filters by namespace node and local", async (t) => {
  const admin = await fakeAdmin(ROUTES);
  t.teardown(() => admin.close());
  const all = await agentctl("workloads", "--admin", admin.address, "-o", "json");
  t.is(all.status, 0, all.stderr);
  t.deepEqual(JSON.parse(all.stdout), WORKLOADS);

  const shop = await agentctl("workloads", "--admin", admin.address, "--namespace", "shop", "-o", "json");
  t.deepEqual((JSON.parse(shop.stdout) as { uid: string }[]).map((workload) => workload.uid), ["shop/web", "shop/legacy"]);
  const remote = await agentctl("workloads", "--admin", admin.address, "--node", "node-b", "-o", "yaml");
  t.deepEqual((YAML.parse(remote.stdout) as { uid: string }[]).map((workload) => workload.uid), ["backend/api"]);
  const local = await agentctl("workloads", "--admin", admin.address, "--local");
  t.is(local.status, 0, local.stderr);
  t.deepEqual(local.stdout.trimEnd().split("\n").map((line) => line.split(/\s+/)[1]), ["POD", "web", "legacy"]);
});

test("services and certificates print tables", async (t) => {
  const admin = await fakeAdmin(ROUTES);
  t.teardown(() => admin.close());
  const services = await agentctl("services", "--admin", admin.address, "--namespace", "backend");
  t.is(services.status, 0, services.stderr);
  t.regex(services.stdout, /^backend +api +10\.96\.0\.10 +80->8080\/TCP,9090\/TCP +2\/3$/m);

  const certificates = await agentctl("certificates", "--admin", admin.address);
  t.is(certificates.status, 0, "a failing certificate is reported, not an error of the command");
  t.regex(certificates.stdout, /^spiffe:\/\/cluster\.local\/ns\/shop\/sa\/batch +- +failing/m);
  t.regex(certificates.stdout, /CA unreachable/);
});

test("connections sends the direction query", async (t) => {
  const admin = await fakeAdmin(ROUTES);
  t.teardown(() => admin.close());
  const run = await agentctl("connections", "--admin", admin.address, "--direction", "inbound", "-o", "json");
  t.is(run.status, 0, run.stderr);
  t.deepEqual(admin.requests, ["GET /connections?direction=inbound"]);
  // The fake server ignores the query: agentctl filters the response as well.
  t.deepEqual((JSON.parse(run.stdout) as { id: string }[]).map((connection) => connection.id), ["c2"]);
  const byWorkload = await agentctl("connections", "--admin", admin.address, "--workload", "shop/other", "-o", "json");
  t.deepEqual(JSON.parse(byWorkload.stdout), []);
});

test("log gets and posts levels", async (t) => {
  const admin = await fakeAdmin(ROUTES);
  t.teardown(() => admin.close());
  const show = await agentctl("log", "--admin", admin.address);
  t.is(show.status, 0, show.stderr);
  t.regex(show.stdout, /^proxy +debug$/m);
  t.is((await agentctl("log", "--admin", admin.address, "--level", "warn")).status, 0);
  t.is((await agentctl("log", "--admin", admin.address, "proxy:trace", "capture", "--level", "error")).status, 0);
  t.is((await agentctl("log", "--admin", admin.address, "--reset")).status, 0);
  t.deepEqual(admin.requests, [
    "GET /logging",
    "POST /logging?level=warn",
    "POST /logging?level=proxy%3Atrace%2Ccapture%3Aerror",
    "POST /logging?reset",
  ]);
});

test("agent rejection of a request exits 2", async (t) => {
  const admin = await fakeAdmin({ "/logging": { status: 400, body: { error: 'unknown component "proxi": use proxy, capture' } } });
  t.teardown(() => admin.close());
  const run = await agentctl("log", "--admin", admin.address, "proxi:debug");
  t.is(run.status, 2);
  t.regex(run.stderr, /unknown component "proxi"/);
});

test("status combines view and readiness", async (t) => {
  const admin = await fakeAdmin(ROUTES);
  t.teardown(() => admin.close());
  const table = await agentctl("status", "--admin", admin.address);
  t.is(table.status, 0, table.stderr);
  t.regex(table.stdout, /^agent: version 0\.1\.0 on node node-a/m);
  t.regex(table.stdout, /^configuration source: manifest files$/m);
  const json = await agentctl("status", "--admin", admin.address, "-o", "json");
  t.like(JSON.parse(json.stdout), { ready: true, node: "node-a", enrolled: 1 });
});

test("status exits 1 when not ready", async (t) => {
  const notReady = { ...READINESS, ready: false, checks: { ...READINESS.checks, certificates: false } };
  const admin = await fakeAdmin({ ...ROUTES, "/status": { body: { ...STATUS, ready: false, checks: notReady.checks } }, "/healthz/ready": { status: 503, body: notReady } });
  t.teardown(() => admin.close());
  const run = await agentctl("status", "--admin", admin.address);
  t.is(run.status, 1);
  t.regex(run.stdout, /^ready: no$/m);
  t.regex(run.stdout, /^ {2}certificates +not ready$/m);
});

test("status falls back without the status route", async (t) => {
  const admin = await fakeAdmin({ "/healthz/ready": { body: READINESS } });
  t.teardown(() => admin.close());
  const run = await agentctl("status", "--admin", admin.address);
  t.is(run.status, 0, run.stderr);
  t.regex(run.stdout, /^ready: yes\n/);
  t.regex(run.stdout, /^enrolled pods: 1$/m);
  const json = await agentctl("status", "--admin", admin.address, "-o", "json");
  t.deepEqual(JSON.parse(json.stdout), READINESS);
});

test("config prints json or yaml", async (t) => {
  const admin = await fakeAdmin(ROUTES);
  t.teardown(() => admin.close());
  const json = await agentctl("config", "--admin", admin.address);
  t.is(json.status, 0, json.stderr);
  t.is((JSON.parse(json.stdout) as { node: string }).node, "node-a");
  const yaml = await agentctl("config", "--admin", admin.address, "-o", "yaml");
  t.is((YAML.parse(yaml.stdout) as { node: string }).node, "node-a");
});

test("doctor exit status matches its checks", async (t) => {
  const address = `127.0.0.1:${await unusedPort()}`;
  const run = await agentctl("doctor", "--admin", address, "-o", "json");
  const report = JSON.parse(run.stdout) as { capture: string; checks: { name: string; result: string; message: string }[] };
  t.is(report.capture, "auto");
  t.deepEqual(
    report.checks.map((check) => check.name),
    ["kernel", "btf", "bpffs", "cgroup2", "capabilities", "ebpf programs", "nftables", "clock", "admin api"],
  );
  for (const check of report.checks) {
    t.true(["PASS", "WARN", "FAIL"].includes(check.result), `${check.name}: ${check.result}`);
    t.true(check.message.length > 0, `${check.name} has a message`);
  }
  const failed = report.checks.filter((check) => check.result === "FAIL");
  t.is(run.status, failed.length > 0 ? 1 : 0, JSON.stringify(failed));
  t.is(report.checks.find((check) => check.name === "admin api")?.result, "WARN", "no agent listens on the unused port");
  if (process.getuid?.() === 0) t.not(report.checks.find((check) => check.name === "capabilities")?.result, "FAIL", "root has every capability");
});

test("doctor fails for a missing eBPF object", async (t) => {
  const run = await agentctl("doctor", "--capture", "ebpf", "--bpf-object", "/nonexistent/capture.bpf.o", "--admin", `127.0.0.1:${await unusedPort()}`);
  t.is(run.status, 1);
  t.regex(run.stdout, /^ebpf programs +FAIL +eBPF object \/nonexistent\/capture\.bpf\.o not found: build it with `make bpf`, or pass --bpf-object$/m);
  t.regex(run.stdout, /^\d+ failed, \d+ warnings?, \d+ passed$/m);
});
