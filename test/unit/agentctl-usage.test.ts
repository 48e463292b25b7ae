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
    [["status", "--bogus"], /^agentctl status: unknown option --bogus; the options are --admin, -o$/m],
    [["connections", "--direction"], /^agentctl connections: missing value of --direction; write --direction VALUE$/m],
    [["connections", "--bogus"], /^agentctl connections: unknown option --bogus; the options are --direction, --workload, --admin, -o$/m],
    [["workloads", "--local=yes"], /--local takes no value, but got "--local=yes"; write --local alone/],
    [["authz", "check", "--from", "-x"], /^agentctl authz check: the value "-x" of --from starts with "-"/m],
    [["status", "-o", "xml"], /invalid -o "xml": use table, json, yaml/],
    [["config", "-o", "table"], /invalid -o "table": use json, yaml/],
    [["workloads", "--namespace", "Shop"], /invalid --namespace "Shop"/],
    [["workloads", "--node"], /argument missing|--node/],
    [["workloads", "extra"], /^agentctl workloads: unexpected argument "extra"; this command takes options only: --namespace, --node, --local, --admin, -o$/m],
    [["services", "--admin", "localhost"], /invalid --admin "localhost": write HOST:PORT/],
    [["services", "--admin", "127.0.0.1:70000"], /invalid --admin "127.0.0.1:70000"/],
    [["certificates", "-o", "short"], /invalid -o "short"/],
    [["connections", "--direction", "sideways"], /invalid --direction "sideways": use inbound or outbound/],
    [["connections", "--workload", "web"], /invalid --workload "web": write NAMESPACE\/NAME/],
    [["log", "--level", "loud"], /invalid --level "loud": use fatal, error, warn, info, debug, trace, silent/],
    [["log", "proxy:verbose"], /invalid level "verbose" in "proxy:verbose"/],
    [["log", "proxy"], /missing level for "proxy"/],
    [["log", "Proxy:debug"], /invalid log setting "Proxy:debug"/],
    [["log", "proxy=debug,outbound:loud"], /invalid level "loud" in "outbound:loud" of "proxy=debug,outbound:loud"/],
    [["log", "proxy=debug=trace"], /invalid log setting "proxy=debug=trace": write COMPONENT=LEVEL, COMPONENT:LEVEL or LEVEL/],
    [["log", "--reset", "proxy:debug"], /--reset restores every start-up level/],
    [["doctor", "--capture", "bpf"], /invalid --capture "bpf": use auto, ebpf, nftables/],
    [["doctor", "-o", "xml"], /invalid -o "xml"/],
    [["doctor", "--config", "/nonexistent/config.yaml"], /cannot read the config file \/nonexistent\/config\.yaml/],
    [["doctor", "--node", "Node_A"], /invalid --node "Node_A"/],
    [["authz", "check", "--from", "shop/web", "--to", "backend/api", "-o", "xml"], /invalid -o "xml"/],
    [["capture", "list"], /missing --node NAME/],
    [["capture", "list", "--node", "Node_A"], /invalid --node "Node_A"/],
    [["capture", "frob"], /unknown capture command "frob"/],
    [["ca", "init"], /missing --dir/],
    [["ca", "init", "--bogus"], /^agentctl ca init: unknown option --bogus; the options are --dir, --trust-domain, --force$/m],
    [["ca", "init", "--dir", "/nonexistent/ca", "--trust-domain", "bad domain"], /^agentctl ca init: invalid --trust-domain "bad domain": use lowercase letters/m],
  ];
  const runs = await Promise.all(cases.map(([args]) => agentctl(...args)));
  cases.forEach(([args, message], i) => {
    t.is(runs[i].status, 2, `agentctl ${args.join(" ")}: ${runs[i].stderr}`);
    t.regex(runs[i].stderr, message, args.join(" "));
    t.regex(runs[i].stderr, /\nrun agentctl --help for every command and option\n$/, args.join(" "));
    t.notRegex(runs[i].stderr, /usage: agentctl COMMAND/, `${args.join(" ")}: the whole help text`);
    t.true(runs[i].stderr.split("\n").length <= 6, `${args.join(" ")}: ${runs[i].stderr}`);
    t.notRegex(runs[i].stderr, /Unknown option|argument missing|ambiguous|Unexpected argument/, `${args.join(" ")}: a node:util message`);
  });
});

test("usage error shows the command synopsis", async (t) => {
  const run = await agentctl("doctor", "--bogus");
  t.is(run.status, 2);
  t.deepEqual(run.stderr.split("\n"), [
    "agentctl doctor: unknown option --bogus; the options are --config, --node, --pin-root, --cgroup, --bpf-object, --capture, --probe-snat, --host-proc, --host-netns, --admin, -o",
    "usage: agentctl doctor [--config FILE] [--node NAME] [--pin-root DIR] [--cgroup PATH] [--bpf-object PATH]",
    "       [--capture ebpf|nftables|auto] [--probe-snat] [--host-proc DIR] [--host-netns PATH]",
    "       [--admin HOST:PORT] [-o table|json|yaml]",
    "run agentctl --help for every command and option",
    "",
  ]);
  const unknown = await agentctl("frobnicate");
  t.regex(unknown.stderr, /^agentctl: unknown command "frobnicate"; the commands are ca, capture, cni, status/);
});

test("missing command exits 2 with help", async (t) => {
  const run = await agentctl();
  t.is(run.status, 2);
  t.regex(run.stderr, /^agentctl: missing command\n\nusage: agentctl COMMAND/);
  t.is(run.stdout, "");
  for (const help of [["help"], ["--help"], ["-h"]]) {
    const shown = await agentctl(...help);
    t.is(shown.status, 0, help.join(" "));
    t.regex(shown.stdout, /^usage: agentctl COMMAND/, help.join(" "));
    t.is(shown.stderr, "", help.join(" "));
  }
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
  t.is((await agentctl("log", "--admin", admin.address, "access=debug,outbound:warn")).status, 0);
  t.is((await agentctl("log", "--admin", admin.address, "info,proxy=debug", "cni")).status, 2, "cni has no level and no --level");
  t.is((await agentctl("log", "--admin", admin.address, "info,proxy=debug")).status, 0);
  t.deepEqual(admin.requests, [
    "GET /logging",
    "POST /logging?level=warn",
    "POST /logging?level=proxy%3Atrace%2Ccapture%3Aerror",
    "POST /logging?reset",
    "POST /logging?level=access%3Adebug%2Coutbound%3Awarn",
    "POST /logging?level=info%2Cproxy%3Adebug",
  ]);
});

/** Serves the same status and body on every path, as a web server that is no agent does. */
async function foreignServer(status: number, contentType: string, body: string): Promise<{ address: string; close(): Promise<void> }> {
  const server = http.createServer((_request, response) => response.writeHead(status, { "content-type": contentType }).end(body));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  return { address: `127.0.0.1:${port}`, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

const ADMIN_COMMANDS = [
  ["status"],
  ["config"],
  ["workloads"],
  ["services"],
  ["certificates"],
  ["connections"],
  ["log"],
  ["log", "proxy=debug"],
  ["policies"],
  ["authz", "check", "--from", "shop/web", "--to", "backend/api"],
  ["authz", "explain", "shop/web"],
];

test("html server is not an agent", async (t) => {
  const server = await foreignServer(404, "text/html", "<html><body><h1>404 Not Found</h1></body></html>");
  t.teardown(() => server.close());
  for (const command of ADMIN_COMMANDS) {
    const run = await agentctl(...command, "--admin", server.address);
    const context = `agentctl ${command.join(" ")}: ${run.stderr}`;
    t.is(run.status, 1, context);
    t.regex(run.stderr, new RegExp(`^agentctl: the server at ${server.address} is not an ambient-agent admin API \\((GET|POST) /\\S* returned status 404 and no JSON: "<html>`), context);
    t.regex(run.stderr, /pass the agent's admin API address with --admin/, context);
    t.notRegex(run.stderr, /older|upgrade/, context);
  }
});

test("metrics port is named, not the admin API", async (t) => {
  const body = JSON.stringify({ error: "not found: /status; try /metrics, /stats/prometheus", code: "NOT_FOUND", server: "metrics server" });
  const server = await foreignServer(404, "application/json", body);
  t.teardown(() => server.close());
  const run = await agentctl("workloads", "--admin", server.address);
  t.is(run.status, 1);
  t.regex(run.stderr, /is the agent's metrics server, not its admin API/);
  t.notRegex(run.stderr, /upgrade/);
});

test("a server that is not HTTP is not an agent", async (t) => {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => undefined);
    socket.end("SSH-2.0-OpenSSH\r\n");
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  const { port } = server.address() as net.AddressInfo;
  const run = await agentctl("status", "--admin", `127.0.0.1:${port}`);
  t.is(run.status, 1);
  t.regex(run.stderr, /is not an ambient-agent admin API \(GET \/\S+ returned a response that is not HTTP/);
  t.notRegex(run.stderr, /cannot reach/);
});

test("foreign json is not an agent", async (t) => {
  const bodies: [string, unknown, RegExp][] = [
    ["object", { hello: "world" }, /returned JSON (in which "\S+" is missing, expected|that is an object, expected a list)/],
    ["list", [{ id: 1 }], /returned JSON (in which "\[0\]\.\S+" is missing, expected|that is a list, expected an object)/],
    ["null", null, /returned JSON that is null, expected (a list|an object)/],
  ];
  for (const [kind, body, problem] of bodies) {
    const server = await foreignServer(200, "application/json", JSON.stringify(body));
    for (const command of ADMIN_COMMANDS) {
      const run = await agentctl(...command, "--admin", server.address);
      const context = `agentctl ${command.join(" ")} against ${kind}: ${run.stderr}`;
      t.is(run.status, 1, context);
      t.regex(run.stderr, new RegExp(`^agentctl: the server at ${server.address} is not an ambient-agent admin API \\(`), context);
      t.regex(run.stderr, problem, context);
      t.notRegex(run.stderr, /Cannot convert|Cannot read|reading '|is not a function|undefined/, context);
    }
    await server.close();
  }
});

test("nested shape errors name the field", async (t) => {
  const broken = [{ ...CERTIFICATES[0], chain: [{ type: "Leaf" }] }];
  const admin = await fakeAdmin({ ...ROUTES, "/certificates": { body: broken }, "/services": { body: [{ ...SERVICES[0], endpoints: "3" }] } });
  t.teardown(() => admin.close());
  const certificates = await agentctl("certificates", "--admin", admin.address);
  t.is(certificates.status, 1);
  t.regex(certificates.stderr, /GET \/certificates returned JSON in which "\[0\]\.chain\[0\]\.serialNumber" is missing, expected a string\)/);
  const services = await agentctl("services", "--admin", admin.address);
  t.is(services.status, 1);
  t.regex(services.stderr, /GET \/services returned JSON in which "\[0\]\.endpoints" is a string, expected an object\)/);
});

test("agent error status keeps its message", async (t) => {
  const admin = await fakeAdmin({ "/workloads": { status: 503, body: { error: "the agent has not read its configuration yet" } }, "/services": { status: 500, body: { message: "boom" } } });
  t.teardown(() => admin.close());
  const workloads = await agentctl("workloads", "--admin", admin.address);
  t.is(workloads.status, 1);
  t.is(workloads.stderr, "agentctl: the agent has not read its configuration yet\n");
  const services = await agentctl("services", "--admin", admin.address);
  t.is(services.status, 1);
  t.regex(services.stderr, /is not an ambient-agent admin API \(GET \/services returned status 500 and JSON without an "error" field\)/);
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

test("status lists failing certificates", async (t) => {
  const admin = await fakeAdmin(ROUTES);
  t.teardown(() => admin.close());
  const run = await agentctl("status", "--admin", admin.address);
  t.is(run.status, 0, run.stderr);
  t.regex(run.stdout, /^certificates: 2 total: .*1 failing.*\n {2}spiffe:\/\/cluster\.local\/ns\/shop\/sa\/batch: failing, next retry at 2026-03-01T12:00:30Z: CA unreachable$/m);
  t.notRegex(run.stdout, /^ {2}spiffe:\/\/cluster\.local\/ns\/shop\/sa\/web:/m, "a valid certificate is not listed");
  t.true(admin.requests.includes("GET /certificates"));
});

test("status skips certificates when all valid", async (t) => {
  const healthy = { ...STATUS, certificates: { ...STATUS.certificates, valid: 2, failing: 0 } };
  const admin = await fakeAdmin({ ...ROUTES, "/status": { body: healthy } });
  t.teardown(() => admin.close());
  const run = await agentctl("status", "--admin", admin.address);
  t.is(run.status, 0, run.stderr);
  t.false(admin.requests.includes("GET /certificates"));
});

test("status of a stopping agent", async (t) => {
  const readiness = { ...READINESS, ready: false, stopping: true };
  const admin = await fakeAdmin({ ...ROUTES, "/status": { body: { ...STATUS, ready: false, stopping: true } }, "/healthz/ready": { status: 503, body: readiness } });
  t.teardown(() => admin.close());
  const run = await agentctl("status", "--admin", admin.address);
  t.is(run.status, 1, "a stopping agent is not ready");
  t.regex(run.stdout, /^stopping: the agent is draining its connections and exits soon$/m);
  t.notRegex(run.stdout, /^ready: no$/m);
  t.regex(run.stdout, /^ {2}capture +ok$/m);
  const json = await agentctl("status", "--admin", admin.address, "-o", "json");
  t.like(JSON.parse(json.stdout), { ready: false, stopping: true });
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

test("agent 404 names the missing route", async (t) => {
  const server = http.createServer((request, response) => {
    const path = new URL(request.url ?? "/", "http://agent").pathname;
    if (path === "/healthz/ready") {
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(READINESS));
      return;
    }
    // As the agent's admin server responds to a path it does not serve.
    response.writeHead(404, { "content-type": "application/json" }).end(JSON.stringify({ error: `not found: ${path}; try /healthz/ready`, code: "NOT_FOUND" }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const address = `127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  const status = await agentctl("status", "--admin", address);
  t.is(status.status, 0, status.stderr);
  t.regex(status.stdout, /^enrolled pods: 1$/m);
  const workloads = await agentctl("workloads", "--admin", address);
  t.is(workloads.status, 1);
  t.is(workloads.stderr, `agentctl: the agent at ${address} does not serve GET /workloads (status 404); upgrade the agent to the version of agentctl\n`);
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

test("log --level without a bare component is bad usage", async (t) => {
  const run = await agentctl("log", "--level", "debug", "access:warn", "--admin", "127.0.0.1:1");
  t.is(run.status, 2);
  t.regex(run.stderr, /--level debug applies to COMPONENT names written without a level/);
});
