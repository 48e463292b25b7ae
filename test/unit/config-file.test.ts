import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { RUN_OPTIONS } from "../../agent/cli/ambient-agent";
import { ConfigFileError, withConfigFile } from "../../agent/cli/config-file";
import { useTempFolder } from "../harness/temp-files";

const COMMA_LISTS = new Set(["log-level"]);

const temp = useTempFolder(test, "aacfg-");
const configFile = (text: string): string => temp.configFile(text);

/** Runs withConfigFile with the real option table of `ambient-agent run`, then parses the result as the agent does. */
function parse(argv: string[]): Record<string, unknown> {
  const args = withConfigFile(argv, RUN_OPTIONS, COMMA_LISTS);
  return parseArgs({ args, options: RUN_OPTIONS, strict: true }).values;
}

/** Asserts that withConfigFile rejects the file with a ConfigFileError whose message names the file and matches `message`. */
function assertRejected(t: import("ava").ExecutionContext, text: string, message: RegExp): void {
  const file = configFile(text);
  const error = t.throws(() => withConfigFile(["--config", file], RUN_OPTIONS, COMMA_LISTS), { instanceOf: ConfigFileError });
  t.regex(error?.message ?? "", message);
  t.true(error?.message.includes(file), `the message does not name the file: ${error?.message}`);
}

test("argv without --config is unchanged", (t) => {
  const argv = ["--node", "n1", "--kubernetes"];
  t.is(withConfigFile(argv, RUN_OPTIONS, COMMA_LISTS), argv);
});

test("file entries become options", (t) => {
  const file = configFile(`
node: n1
kubernetes: true
replace: false
cni-timeout: 30
drain-timeout: 0.5
excluded-namespaces: [kube-system, ambient-agent]
audit-sink: stdout
log-level: [info, cni=debug]
`);
  const values = parse(["--config", file]);
  t.is(values.node, "n1");
  t.is(values.kubernetes, true);
  t.false("replace" in values, "a switch set to false is given");
  t.is(values["cni-timeout"], "30");
  t.is(values["drain-timeout"], "0.5");
  t.deepEqual(values["excluded-namespaces"], ["kube-system", "ambient-agent"]);
  t.deepEqual(values["audit-sink"], ["stdout"]);
  t.is(values["log-level"], "info,cni=debug");
});

test("file tokens come before the command line", (t) => {
  const file = configFile("node: n1\n");
  t.deepEqual(withConfigFile(["--config", file, "--kubernetes"], RUN_OPTIONS, COMMA_LISTS), ["--node=n1", "--config", file, "--kubernetes"]);
});

test("command line replaces the file's value", (t) => {
  const file = configFile(`
node: from-file
excluded-namespaces: [kube-system, ambient-agent]
audit-sink: [stdout, "syslog+tcp://127.0.0.1:514"]
`);
  const values = parse(["--config", file, "--node", "from-cli", "--excluded-namespaces", "team-a"]);
  t.is(values.node, "from-cli");
  t.deepEqual(values["excluded-namespaces"], ["team-a"]);
  t.deepEqual(values["audit-sink"], ["stdout", "syslog+tcp://127.0.0.1:514"]);
});

test("command line switch replaces its no- twin", (t) => {
  const file = configFile("no-transparent-source: true\n");
  const values = parse(["--config", file, "--transparent-source"]);
  t.is(values["transparent-source"], true);
  t.false("no-transparent-source" in values);
  const reverse = configFile("transparent-source: true\n");
  const reversed = parse(["--config", reverse, "--no-transparent-source"]);
  t.is(reversed["no-transparent-source"], true);
  t.false("transparent-source" in reversed);
});

test("false switch gives its no- twin", (t) => {
  const off = parse(["--config", configFile("transparent-source: false\n")]);
  t.is(off["no-transparent-source"], true, "transparent-source: false left the default on");
  t.false("transparent-source" in off);
  const on = parse(["--config", configFile("no-transparent-source: false\n")]);
  t.is(on["transparent-source"], true, "no-transparent-source: false gave nothing");
  t.false("no-transparent-source" in on);
  const cli = parse(["--config", configFile("transparent-source: false\n"), "--transparent-source"]);
  t.is(cli["transparent-source"], true, "the command line did not replace the file's false");
  t.false("no-transparent-source" in cli);
});

test("false switch without a twin gives nothing", (t) => {
  const file = configFile("replace: false\nkubernetes: false\n");
  t.deepEqual(withConfigFile(["--config", file], RUN_OPTIONS, COMMA_LISTS), ["--config", file]);
});

test("both forms of one switch are rejected", (t) => {
  assertRejected(t, "transparent-source: false\nno-transparent-source: false\n", /sets both "transparent-source" and "no-transparent-source", which are one switch/);
  assertRejected(t, "no-transparent-source: true\ntransparent-source: true\n", /sets both "transparent-source" and "no-transparent-source"/);
});

test("values that look like options stay values", (t) => {
  const file = configFile(`node: "--kubernetes"\nprobe-source: ["-1"]\n`);
  const values = parse(["--config", file]);
  t.is(values.node, "--kubernetes");
  t.deepEqual(values["probe-source"], ["-1"]);
  t.false("kubernetes" in values);
});

test("empty file and empty list give nothing", (t) => {
  t.deepEqual(withConfigFile(["--config", configFile("")], RUN_OPTIONS, COMMA_LISTS).length, 2);
  t.deepEqual(withConfigFile(["--config", configFile("# only a comment\n")], RUN_OPTIONS, COMMA_LISTS).length, 2);
  const values = parse(["--config", configFile("audit-sink: []\nlog-level: []\n")]);
  t.false("audit-sink" in values);
  t.false("log-level" in values);
});

test("unknown key is rejected", (t) => {
  assertRejected(t, "nod: n1\n", /unknown key "nod"/);
  assertRejected(t, "--node: n1\n", /unknown key "--node"/);
  assertRejected(t, "no-replace: true\n", /unknown key "no-replace"/);
});

test("inherited property names are unknown keys", (t) => {
  for (const key of ["__proto__", "toString", "constructor", "hasOwnProperty"]) {
    assertRejected(t, `${key}: true\n`, new RegExp(`unknown key "${key}"`));
    assertRejected(t, `${key}: n1\n`, new RegExp(`unknown key "${key}"`));
  }
});

test("unknown key is rejected although the command line gives its base", (t) => {
  const file = configFile("no-node: true\n");
  const error = t.throws(() => withConfigFile(["--config", file, "--node", "n1"], RUN_OPTIONS, COMMA_LISTS), { instanceOf: ConfigFileError });
  t.regex(error?.message ?? "", /unknown key "no-node"/);
});

test("config key inside the file is rejected", (t) => {
  assertRejected(t, "config: other.yaml\n", /sets "config"/);
});

test("wrong value types are rejected", (t) => {
  assertRejected(t, "kubernetes: yes\n", /"kubernetes".*the string "yes", where the switch takes true or false/);
  assertRejected(t, "replace: 1\n", /"replace".*the number 1/);
  assertRejected(t, "node: {name: n1}\n", /"node".*a mapping/);
  assertRejected(t, "node: [n1, n2]\n", /"node".*a list, where the option takes one value/);
  assertRejected(t, "node:\n", /"node".*an empty value/);
  assertRejected(t, "node: ''\n", /"node".*an empty string/);
  assertRejected(t, "cni-timeout: .inf\n", /"cni-timeout".*the number Infinity/);
  assertRejected(t, "log-level: true\n", /"log-level".*the value true/);
  assertRejected(t, "excluded-namespaces: [a, [b]]\n", /"excluded-namespaces".*a list, where the option takes a string or a number/);
});

test("invalid YAML is rejected", (t) => {
  assertRejected(t, "node: [n1\n", /invalid YAML/);
  assertRejected(t, "node: n1\nnode: n2\n", /invalid YAML/);
  assertRejected(t, "node: n1\n---\nnode: n2\n", /invalid YAML/);
});

test("file that is no mapping is rejected", (t) => {
  assertRejected(t, "- node\n- n1\n", /contains a list, not a mapping/);
  assertRejected(t, "node n1\n", /contains the string "node n1", not a mapping/);
});

test("unreadable file is rejected", (t) => {
  const missing = path.join(temp.path, "missing.yaml");
  const error = t.throws(() => withConfigFile(["--config", missing], RUN_OPTIONS, COMMA_LISTS), { instanceOf: ConfigFileError });
  t.regex(error?.message ?? "", /cannot read the config file/);
  t.true(error?.message.includes(missing));
});

test("invalid command line fails before the file is read", (t) => {
  const missing = path.join(temp.path, "never-read.yaml");
  t.throws(() => withConfigFile(["--config", missing, "--no-such-option"], RUN_OPTIONS, COMMA_LISTS), { message: /--no-such-option/ });
});

test("alias bomb is rejected with the file's name", (t) => {
  const levels = ["a: &a [x, x, x, x, x, x, x, x, x]"];
  for (let i = 1; i < 9; i++) levels.push(`${String.fromCharCode(97 + i)}: &${String.fromCharCode(97 + i)} [${Array(9).fill(`*${String.fromCharCode(96 + i)}`).join(", ")}]`);
  assertRejected(t, `${levels.join("\n")}\n`, /^invalid YAML in the config file .*config-\d+\.yaml: .*alias/i);
});

test("a list of many entries does not overflow", (t) => {
  // 300,000 entries fit under the size limit; push(...) of them would throw RangeError.
  const file = configFile(`probe-source: [${Array.from({ length: 300_000 }, () => "x").join(",")}]\n`);
  t.is(withConfigFile(["--config", file], RUN_OPTIONS, COMMA_LISTS).length, 300_002);
});

test("file over 1 MiB and a device without end are rejected", (t) => {
  assertRejected(t, `# ${"x".repeat(1024 * 1024)}\n`, /is larger than 1048576 bytes/);
  const error = t.throws(() => withConfigFile(["--config", "/dev/zero"], RUN_OPTIONS, COMMA_LISTS), { instanceOf: ConfigFileError });
  t.regex(error?.message ?? "", /\/dev\/zero is larger than 1048576 bytes/);
});

test("file that is not UTF-8 is rejected", (t) => {
  const file = path.join(temp.path, "latin1.yaml");
  fs.writeFileSync(file, Buffer.from("audit-file: /tmp/caf\xe9.log\n", "latin1"));
  const error = t.throws(() => withConfigFile(["--config", file], RUN_OPTIONS, COMMA_LISTS), { instanceOf: ConfigFileError });
  t.regex(error?.message ?? "", /latin1\.yaml is not valid UTF-8/);
});

test("a second --config is rejected", (t) => {
  const first = configFile("log-level: info\n");
  const second = configFile("log-level: debug\n");
  const error = t.throws(() => withConfigFile(["--config", first, "--config", second], RUN_OPTIONS, COMMA_LISTS), { instanceOf: ConfigFileError });
  t.regex(error?.message ?? "", /--config is given more than once/);
});

test("merge keys apply", (t) => {
  const file = configFile("defaults: &defaults\n  log-level: debug\n<<: *defaults\n");
  t.throws(() => parse(["--config", file]), { message: /unknown key "defaults"/ });
  const merged = configFile("<<: {log-level: debug, capture: nftables}\nnode: n1\n");
  const values = parse(["--config", merged]);
  t.is(values["log-level"], "debug");
  t.is(values.capture, "nftables");
});
