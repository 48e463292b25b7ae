// agentctl commands that read the running agent through its admin API: status, config, authz,
// policies, workloads, services, certificates, connections and log. Each takes --admin HOST:PORT
// and, where it prints data, -o table|json|yaml.

import type { ParseArgsConfig } from "node:util";
import type { CertificateView, ConnectionView, LogLevelsView, ServiceView, WorkloadView } from "../admin/views";
import { parsePodUid } from "../rbac/authz-query";
import { parseDestinationQuery, parseSourceQuery, type AccessCheck, type PolicyStatusReport, type WorkloadExplanation } from "../rbac/explain";
import { LOG_LEVELS } from "../log-level";
import { adminList, adminView, DEFAULT_ADMIN, UsageError, validAdmin } from "./admin-client";
import { formatAccessCheck, formatPolicyStatuses, formatWorkloadExplanation } from "./authz-output";
import { formatCertificates, formatConnections, formatLogLevels, formatServices, formatWorkloads } from "./inspect-output";
import { parseOutputFormat, render, type OutputFormat } from "./output";
import { fetchStatusReport, formatStatusReport, reportReady, statusData } from "./status-command";
import { parseOptions } from "./usage";
import {
  ACCESS_CHECK_SHAPE,
  CERTIFICATE_SHAPE,
  CONFIG_DUMP_SHAPE,
  CONNECTION_SHAPE,
  EXPLANATION_SHAPE,
  LOG_LEVELS_SHAPE,
  POLICY_REPORT_SHAPE,
  SERVICE_SHAPE,
  WORKLOAD_SHAPE,
} from "./view-shapes";

export const INSPECT_USAGE = `  status [--admin HOST:PORT] [-o table|json|yaml]
                     tell whether the agent is ready (configuration read, capture attached,
                     certificates issued, CNI plugin chained), its version and node, the capture mode
                     and why it was chosen, the attached programs, map entries in use of their maximum,
                     enrolled, pending and isolated pods, certificate states and the next expiry, open
                     connections, and the state of each Kubernetes API watch. Exits 1 when the agent
                     is not ready. An agent without GET /status gets the readiness part alone
  config [--admin HOST:PORT] [-o json|yaml]
                     print everything the running agent serves (GET /config_dump); default json
  workloads [--namespace NS] [--node NODE] [--local] [--admin HOST:PORT] [-o table|json|yaml]
                     list the workloads the agent knows: namespace, pod name, addresses, node, protocol
                     (HBONE when enrolled) and state. --namespace and --node keep only that namespace or
                     node; --local keeps only the pods on the agent's node. Default: every workload
  services [--namespace NS] [--admin HOST:PORT] [-o table|json|yaml]
                     list the Services: namespace, name, cluster IPs, ports (port->targetPort/protocol)
                     and endpoints (ready/total). --namespace keeps only that namespace's Services
  certificates [--admin HOST:PORT] [-o table|json|yaml]
                     list the certificate of each identity of this node's pods, one row per
                     certificate of its chain: type (Leaf, Intermediate, Root), state, serial number,
                     validity period (UTC) and time to expiry. Exits 0 whatever the certificates'
                     state: agentctl status, and its exit status, report their health
  connections [--direction inbound|outbound] [--workload NS/NAME] [--admin HOST:PORT] [-o table|json|yaml]
                     list the open connections of this node's proxies, oldest first: pod, direction,
                     local and remote address, the address inside the HBONE tunnel, protocol, the
                     peer's identity, bytes sent and received, and age. --direction keeps one direction
                     (default both); --workload keeps the connections of one pod
  log [SETTING[,SETTING...]...] [--level LEVEL] [--reset] [--admin HOST:PORT] [-o table|json|yaml]
                     without arguments, print the log level of each component. --level LEVEL alone
                     sets every component. A SETTING is COMPONENT=LEVEL or COMPONENT:LEVEL (one
                     component), a LEVEL (every component), or a COMPONENT alone, which takes --level;
                     the forms of the agent's --log-level, such as access:debug,outbound=warn.
                     --reset restores the levels the agent started with.
                     Levels: ${LOG_LEVELS.join(", ")}
  authz check --from SOURCE --to DESTINATION [--admin HOST:PORT] [-o table|json|yaml]
                     tell whether SOURCE may connect to DESTINATION, by which policy and rule, from the
                     running agent's state. SOURCE: spiffe://TD/ns/NS/sa/SA, TD/ns/NS/sa/SA, a pod NS/NAME
                     (its identity when enrolled, plaintext otherwise) or an IP (plaintext).
                     DESTINATION: a pod NS/NAME[:PORT], or IP:PORT of a pod or a Service cluster IP.
                     Without a port, every port the pod's policies name is checked. Exits 0 for allow and deny
  authz explain NAMESPACE/NAME [--admin HOST:PORT] [-o table|json|yaml]
                     list the AuthorizationPolicies that apply to the pod in evaluation order, and its
                     PeerAuthentication scopes with the effective mTLS mode per port
  policies [--admin HOST:PORT] [-o table|json|yaml]
                     list every AuthorizationPolicy and PeerAuthentication with its status (enforced,
                     dry-run, rejected, warnings), and the rejected manifests with file, line and field
  Options of status, config, workloads, services, certificates, connections, log, authz and policies:
    --admin HOST:PORT  the agent's admin API address (default ${DEFAULT_ADMIN})
    -o FORMAT          output format: table (the default, except json for config), json or yaml
`;

const COMPONENT_NAME = /^[a-z][a-z0-9-]*$/;

/** The options every admin API command takes. */
const ADMIN_OPTIONS = { admin: { type: "string" }, output: { type: "string", short: "o" } } as const;

/**
 * Runs `agentctl GROUP ACTION ...` when it is an admin API command and returns true, or returns
 * false for any other command.
 */
export async function runInspectCommand(group: string, action: string | undefined, rest: string[]): Promise<boolean> {
  const args = [action, ...rest].filter((value): value is string => value !== undefined);
  if (group === "authz") {
    if (action === "check") await authzCheck(rest);
    else if (action === "explain") await authzExplain(rest);
    else throw new UsageError(action === undefined ? "missing authz command: use check or explain" : `unknown authz command "${action}": use check or explain`);
    return true;
  }
  const commands: Record<string, (argv: string[]) => Promise<void>> = {
    status,
    config,
    policies,
    workloads,
    services,
    certificates,
    connections,
    log,
  };
  const command = commands[group];
  if (command === undefined) return false;
  await command(args);
  return true;
}

/** Parses a command's options; an unknown option, a missing value or a stray argument is a usage error. */
function parseCommand<O extends NonNullable<ParseArgsConfig["options"]>>(argv: string[], options: O, allowPositionals = false) {
  return parseOptions({ args: argv, options: { ...options, ...ADMIN_OPTIONS }, allowPositionals, strict: true as const });
}

function write(format: OutputFormat, data: unknown, table: () => string): void {
  process.stdout.write(render(format, data, table));
}

async function status(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, {});
  const format = parseOutputFormat(values.output);
  const report = await fetchStatusReport(validAdmin(values.admin));
  write(format, statusData(report), () => formatStatusReport(report));
  // A script can test readiness by the exit status alone.
  if (!reportReady(report)) process.exitCode = 1;
}

async function config(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, {});
  const format = parseOutputFormat(values.output, ["json", "yaml"]);
  const dump = await adminView<object>(validAdmin(values.admin), "/config_dump", CONFIG_DUMP_SHAPE);
  write(format, dump, () => "");
}

async function authzCheck(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, { from: { type: "string" }, to: { type: "string" } });
  const format = parseOutputFormat(values.output);
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
  const check = await adminView<AccessCheck>(validAdmin(values.admin), `/authz/check?${query}`, ACCESS_CHECK_SHAPE);
  write(format, check, () => formatAccessCheck(check));
}

async function authzExplain(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommand(argv, {}, true);
  const format = parseOutputFormat(values.output);
  if (positionals.length !== 1) throw new UsageError(positionals.length === 0 ? "missing pod: write agentctl authz explain NAMESPACE/NAME" : `expected one pod, got ${positionals.join(" ")}`);
  checkPod(positionals[0], "pod");
  const query = new URLSearchParams({ pod: positionals[0] });
  const explanation = await adminView<WorkloadExplanation>(validAdmin(values.admin), `/authz/explain?${query}`, EXPLANATION_SHAPE);
  write(format, explanation, () => formatWorkloadExplanation(explanation));
}

async function policies(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, {});
  const format = parseOutputFormat(values.output);
  const report = await adminView<PolicyStatusReport>(validAdmin(values.admin), "/policies", POLICY_REPORT_SHAPE);
  write(format, report, () => formatPolicyStatuses(report));
}

async function workloads(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, { namespace: { type: "string" }, node: { type: "string" }, local: { type: "boolean" } });
  const format = parseOutputFormat(values.output);
  if (values.namespace !== undefined) checkName(values.namespace, "--namespace");
  if (values.node !== undefined) checkName(values.node, "--node");
  const address = validAdmin(values.admin);
  const all = await adminList<WorkloadView>(address, "/workloads", "workloads", WORKLOAD_SHAPE);
  const selected = all.filter(
    (workload) =>
      (values.namespace === undefined || workload.namespace === values.namespace) &&
      (values.node === undefined || workload.node === values.node) &&
      (values.local !== true || workload.local),
  );
  write(format, selected, () => formatWorkloads(selected));
}

async function services(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, { namespace: { type: "string" } });
  const format = parseOutputFormat(values.output);
  if (values.namespace !== undefined) checkName(values.namespace, "--namespace");
  const address = validAdmin(values.admin);
  const all = await adminList<ServiceView>(address, "/services", "services", SERVICE_SHAPE);
  const selected = all.filter((service) => values.namespace === undefined || service.namespace === values.namespace);
  write(format, selected, () => formatServices(selected));
}

async function certificates(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, {});
  const format = parseOutputFormat(values.output);
  const address = validAdmin(values.admin);
  const list = await adminList<CertificateView>(address, "/certificates", "certificates", CERTIFICATE_SHAPE);
  write(format, list, () => formatCertificates(list));
}

async function connections(argv: string[]): Promise<void> {
  const { values } = parseCommand(argv, { direction: { type: "string" }, workload: { type: "string" } });
  const format = parseOutputFormat(values.output);
  const direction = values.direction;
  if (direction !== undefined && direction !== "inbound" && direction !== "outbound") {
    throw new UsageError(`invalid --direction ${JSON.stringify(direction)}: use inbound or outbound`);
  }
  if (values.workload !== undefined) checkPod(values.workload, "--workload");
  const address = validAdmin(values.admin);
  const requestPath = direction === undefined ? "/connections" : `/connections?direction=${direction}`;
  const all = await adminList<ConnectionView>(address, requestPath, "connections", CONNECTION_SHAPE);
  // Filtered here as well, so that an agent that ignores the query still prints only what was asked.
  const selected = all.filter(
    (connection) => (direction === undefined || connection.direction === direction) && (values.workload === undefined || connection.workload === values.workload),
  );
  write(format, selected, () => formatConnections(selected));
}

async function log(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommand(argv, { level: { type: "string" }, reset: { type: "boolean" } }, true);
  const format = parseOutputFormat(values.output);
  if (values.level !== undefined) checkLevel(values.level, `invalid --level ${JSON.stringify(values.level)}`);
  const settings = positionals.flatMap((argument) => parseLogSettings(argument, values.level));
  const bareComponent = (setting: string): boolean => !/[=:]/.test(setting) && !(LOG_LEVELS as readonly string[]).includes(setting);
  if (values.level !== undefined && positionals.length > 0 && !positionals.some((argument) => argument.split(",").some((setting) => bareComponent(setting.trim())))) {
    throw new UsageError(`--level ${values.level} applies to COMPONENT names written without a level, and ${positionals.join(" ")} has none; drop --level, or write the component alone`);
  }
  if (values.reset === true && (settings.length > 0 || values.level !== undefined)) {
    throw new UsageError("--reset restores every start-up level and takes no COMPONENT=LEVEL or --level; run a second agentctl log to set levels after it");
  }
  const address = validAdmin(values.admin);
  let levels: LogLevelsView;
  if (values.reset === true) levels = await adminView<LogLevelsView>(address, "/logging?reset", LOG_LEVELS_SHAPE, "POST");
  else if (settings.length > 0) levels = await adminView<LogLevelsView>(address, `/logging?level=${encodeURIComponent(settings.join(","))}`, LOG_LEVELS_SHAPE, "POST");
  else if (values.level !== undefined) levels = await adminView<LogLevelsView>(address, `/logging?level=${values.level}`, LOG_LEVELS_SHAPE, "POST");
  else levels = await adminView<LogLevelsView>(address, "/logging", LOG_LEVELS_SHAPE);
  write(format, levels, () => formatLogLevels(levels));
}

/**
 * Parses one argument of `agentctl log`: comma-separated settings, each COMPONENT=LEVEL or
 * COMPONENT:LEVEL, a LEVEL for every component, or a COMPONENT alone, which takes `level`
 * (--level). Returns them as the admin API reads them: "component:level" or "level".
 */
export function parseLogSettings(argument: string, level: string | undefined): string[] {
  return argument.split(",").map((setting) => parseLogSetting(setting.trim(), argument, level));
}

function parseLogSetting(setting: string, argument: string, level: string | undefined): string {
  const where = setting === argument ? JSON.stringify(setting) : `${JSON.stringify(setting)} of ${JSON.stringify(argument)}`;
  const separator = setting.search(/[=:]/);
  const component = separator === -1 ? setting : setting.slice(0, separator);
  const own = separator === -1 ? undefined : setting.slice(separator + 1);
  if (own === undefined && (LOG_LEVELS as readonly string[]).includes(component)) return component;
  if (!COMPONENT_NAME.test(component) || own?.includes(":") === true || own?.includes("=") === true) {
    throw new UsageError(`invalid log setting ${where}: write COMPONENT=LEVEL, COMPONENT:LEVEL or LEVEL, for example proxy=debug`);
  }
  if (own === undefined) {
    if (level === undefined) throw new UsageError(`missing level for ${JSON.stringify(component)}: write ${component}=LEVEL, or add --level LEVEL`);
    return `${component}:${level}`;
  }
  checkLevel(own, `invalid level ${JSON.stringify(own)} in ${where}`);
  return `${component}:${own}`;
}

/** Throws a usage error starting with `invalid` unless `level` is one of LOG_LEVELS. */
function checkLevel(level: string, invalid: string): void {
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new UsageError(`${invalid}: use ${LOG_LEVELS.join(", ")}`);
  }
}

/** Checks a Kubernetes namespace or node name (RFC 1123 subdomain). */
function checkName(value: string, option: string): void {
  if (!/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/.test(value) || value.length > 253) {
    throw new UsageError(`invalid ${option} ${JSON.stringify(value)}: use a Kubernetes name (lowercase letters, digits, '-' and '.')`);
  }
}

function checkPod(value: string, option: string): void {
  if (parsePodUid(value) === undefined) {
    throw new UsageError(`invalid ${option} ${JSON.stringify(value)}: write NAMESPACE/NAME, for example demo/web`);
  }
}
