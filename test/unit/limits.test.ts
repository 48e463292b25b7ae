import test from "ava";
import { parseArgs } from "node:util";
import { RUN_OPTIONS } from "../../agent/cli/ambient-agent";
import { withConfigFile } from "../../agent/cli/config-file";
import { DEFAULT_LIMITS, limitSettings, parseLimitFlags, type LimitFlagValues } from "../../agent/proxy/limits";
import { useTempFolder } from "../harness/temp-files";

const temp = useTempFolder(test, "aalim-");

test("no flag gives the defaults", (t) => {
  t.deepEqual(parseLimitFlags({}), { ...DEFAULT_LIMITS });
});

test("defaults match the documented values", (t) => {
  t.is(DEFAULT_LIMITS.maxConnectionsPerPod, 4096);
  t.is(DEFAULT_LIMITS.maxConnectionsPerPeer, 512);
  t.is(DEFAULT_LIMITS.maxStreamsPerConnection, 200);
  t.is(DEFAULT_LIMITS.maxStreamsPerPeer, 2048);
  t.is(DEFAULT_LIMITS.maxHeaderListBytes, 16384);
  t.is(DEFAULT_LIMITS.handshakeTimeoutMs, 10_000);
  t.is(DEFAULT_LIMITS.idleTimeoutMs, 3_600_000);
  t.is(DEFAULT_LIMITS.maxBufferedBytes, 268_435_456);
  t.true(Object.isFrozen(DEFAULT_LIMITS));
});

test("every flag sets its limit", (t) => {
  const limits = parseLimitFlags({
    "max-connections-per-pod": "10",
    "max-connections-per-peer": "3",
    "max-streams-per-connection": "50",
    "max-streams-per-peer": "7",
    "max-header-list-size": "8KiB",
    "handshake-timeout": "2.5",
    "idle-timeout": "0",
    "max-buffered-bytes": "1MiB",
  });
  t.deepEqual(limits, {
    maxConnectionsPerPod: 10,
    maxConnectionsPerPeer: 3,
    maxStreamsPerConnection: 50,
    maxStreamsPerPeer: 7,
    maxHeaderListBytes: 8192,
    handshakeTimeoutMs: 2500,
    idleTimeoutMs: 0,
    maxBufferedBytes: 1_048_576,
  });
});

test("byte flags take plain bytes and units", (t) => {
  t.is(parseLimitFlags({ "max-buffered-bytes": "4096" }).maxBufferedBytes, 4096);
  t.is(parseLimitFlags({ "max-buffered-bytes": "2GiB" }).maxBufferedBytes, 2 * 1024 ** 3);
  t.is(parseLimitFlags({ "max-header-list-size": "64kib" }).maxHeaderListBytes, 65536);
});

test("idle timeout takes fractions of a second", (t) => {
  t.is(parseLimitFlags({ "idle-timeout": "0.25" }).idleTimeoutMs, 250);
});

/** Cases of an invalid value: the flag and the value that must appear in the message. */
const INVALID: Array<[keyof LimitFlagValues, string]> = [
  ["max-connections-per-pod", "0"],
  ["max-connections-per-pod", "-1"],
  ["max-connections-per-pod", "1.5"],
  ["max-connections-per-pod", "ten"],
  ["max-connections-per-pod", ""],
  ["max-connections-per-peer", "1e3"],
  ["max-streams-per-connection", "4294967296"],
  ["max-streams-per-peer", "0x10"],
  ["max-header-list-size", "0"],
  ["max-header-list-size", "4GiB"],
  ["max-header-list-size", "1.5KiB"],
  ["max-header-list-size", "10MB"],
  ["handshake-timeout", "0"],
  ["handshake-timeout", "-1"],
  ["handshake-timeout", "0.0001"],
  ["handshake-timeout", "Infinity"],
  ["handshake-timeout", "2147484"],
  ["handshake-timeout", "0x10"],
  ["handshake-timeout", "1e3"],
  ["handshake-timeout", "0b11"],
  ["handshake-timeout", "-0"],
  ["handshake-timeout", "+5"],
  ["handshake-timeout", ".5"],
  ["handshake-timeout", "5."],
  ["handshake-timeout", "0.0005"],
  ["handshake-timeout", "0.0009"],
  ["idle-timeout", "-0"],
  ["idle-timeout", "0x0"],
  ["idle-timeout", "0.0005"],
  ["idle-timeout", "-5"],
  ["idle-timeout", "0.0004"],
  ["idle-timeout", "NaN"],
  ["idle-timeout", " "],
  ["idle-timeout", "1h"],
  ["max-buffered-bytes", "0"],
  ["max-buffered-bytes", "lots"],
];

for (const [flag, value] of INVALID) {
  test(`--${flag} rejects ${JSON.stringify(value)}`, (t) => {
    const error = t.throws(() => parseLimitFlags({ [flag]: value }));
    t.true(error?.message.includes(`--${flag}`), `flag missing from: ${error?.message}`);
    t.true(error?.message.includes(`"${value}"`), `value missing from: ${error?.message}`);
    t.regex(error?.message ?? "", /for example/);
  });
}

test("timeouts take plain decimals from 0.001", (t) => {
  t.is(parseLimitFlags({ "handshake-timeout": "0.001" }).handshakeTimeoutMs, 1);
  t.is(parseLimitFlags({ "handshake-timeout": "007" }).handshakeTimeoutMs, 7000);
  t.is(parseLimitFlags({ "handshake-timeout": " 2.5 " }).handshakeTimeoutMs, 2500);
  t.is(parseLimitFlags({ "idle-timeout": "0" }).idleTimeoutMs, 0);
  t.is(parseLimitFlags({ "idle-timeout": "0.000" }).idleTimeoutMs, 0);
});

test("timeouts at the timer maximum pass", (t) => {
  t.is(parseLimitFlags({ "idle-timeout": "2147483" }).idleTimeoutMs, 2_147_483_000);
});

test("settings list every limit in snake case", (t) => {
  t.deepEqual(limitSettings(DEFAULT_LIMITS), {
    max_connections_per_pod: 4096,
    max_connections_per_peer: 512,
    max_streams_per_connection: 200,
    max_streams_per_peer: 2048,
    max_header_list_bytes: 16384,
    handshake_timeout_ms: 10_000,
    idle_timeout_ms: 3_600_000,
    max_buffered_bytes: 268_435_456,
  });
});

test("config file keys reach the limit parser", (t) => {
  const file = temp.configFile("max-connections-per-pod: 12\nidle-timeout: 0.5\nmax-buffered-bytes: 64MiB\n");
  const args = withConfigFile(["--config", file], RUN_OPTIONS);
  const { values } = parseArgs({ args, options: RUN_OPTIONS, strict: true });
  const limits = parseLimitFlags(values);
  t.is(limits.maxConnectionsPerPod, 12);
  t.is(limits.idleTimeoutMs, 500);
  t.is(limits.maxBufferedBytes, 64 * 1024 * 1024);
});

test("command line replaces the config file's limit", (t) => {
  const file = temp.configFile("max-connections-per-pod: 12\n");
  const args = withConfigFile(["--config", file, "--max-connections-per-pod", "3"], RUN_OPTIONS);
  const { values } = parseArgs({ args, options: RUN_OPTIONS, strict: true });
  t.is(parseLimitFlags(values).maxConnectionsPerPod, 3);
});
