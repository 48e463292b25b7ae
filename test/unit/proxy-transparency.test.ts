import test from "ava";
import net from "node:net";
import pino from "pino";
import type { PodNetwork, TransparentSourceState } from "../../agent/proxy/pod-network";
import { applicationSourceFor, transparencyProblem } from "../../agent/proxy/transparency";

const POD_IP = "10.244.2.10";
const POD_IP6 = "fd00:244:2::a";

const PROBLEM_CASES: [clientIp: string, problem: RegExp | undefined][] = [
  ["10.244.1.10", undefined],
  ["::ffff:10.244.1.10", undefined],
  ["169.254.7.127", undefined],
  [POD_IP, /the pod itself/],
  [`::ffff:${POD_IP}`, /the pod itself/],
  ["127.0.0.1", /loopback/],
  ["127.1.2.3", /loopback/],
  ["0.0.0.0", /unspecified/],
  ["fd00::1", /is IPv6 but the pod address 10\.244\.2\.10 is not/],
  ["", /\(empty\) is not an IP address/],
  ["not-an-ip", /not-an-ip is not an IP address/],
];

const PROBLEM_CASES6: [clientIp: string, problem: RegExp | undefined][] = [
  ["fd00:244:1::a", undefined],
  ["FD00:244:1:0:0:0:0:A", undefined],
  ["2001:db8::7", undefined],
  [POD_IP6, /the pod itself/],
  ["fd00:244:2:0::a", /the pod itself/],
  ["::1", /loopback/],
  ["::", /unspecified/],
  ["fe80::1", /link-local/],
  ["febf::1", /link-local/],
  ["fec0::1", undefined],
  ["10.244.1.10", /is IPv4 but the pod address fd00:244:2::a is not/],
  ["::ffff:10.244.1.10", /is IPv4 but the pod address/],
];

for (const [clientIp, problem] of PROBLEM_CASES) {
  test(`transparencyProblem for client ${clientIp || "(empty)"}`, (t) => {
    const result = transparencyProblem(clientIp, POD_IP);
    if (problem === undefined) t.is(result, undefined);
    else t.regex(result ?? "", problem);
  });
}

for (const [clientIp, problem] of PROBLEM_CASES6) {
  test(`transparencyProblem for IPv6 pod, client ${clientIp}`, (t) => {
    const result = transparencyProblem(clientIp, POD_IP6);
    if (problem === undefined) t.is(result, undefined);
    else t.regex(result ?? "", problem);
  });
}

interface LoggedLine {
  msg: string;
  reason?: string;
}

function recordingLogger(): { logger: pino.Logger; lines: LoggedLine[] } {
  const lines: LoggedLine[] = [];
  const logger = pino({ level: "debug" }, { write: (text: string) => void lines.push(JSON.parse(text) as LoggedLine) });
  return { logger, lines };
}

function networkIn(state: TransparentSourceState | undefined, state6?: TransparentSourceState): PodNetwork {
  return { listen: async () => undefined, connect: () => new net.Socket(), transparentSource: state, transparentSourceIpv6: state6 };
}

test("applicationSourceFor keeps a remote client", (t) => {
  const { logger, lines } = recordingLogger();
  const source = applicationSourceFor(networkIn("ready"), { ip: "::ffff:10.244.1.10", port: 40001 }, POD_IP, logger, true);
  t.deepEqual(source, { ip: "10.244.1.10", avoidPort: 40001 });
  t.is(lines.length, 0);
});

test("applicationSourceFor avoids no port for HBONE", (t) => {
  const { logger } = recordingLogger();
  const source = applicationSourceFor(networkIn("ready"), { ip: "10.244.1.10", port: 40001 }, POD_IP, logger, false);
  t.deepEqual(source, { ip: "10.244.1.10", avoidPort: undefined });
});

test("applicationSourceFor is silent when off", (t) => {
  const { logger, lines } = recordingLogger();
  t.is(applicationSourceFor(networkIn("off"), { ip: "10.244.1.10", port: 1 }, POD_IP, logger, true), undefined);
  t.is(applicationSourceFor(networkIn(undefined), { ip: "10.244.1.10", port: 1 }, POD_IP, logger, true), undefined);
  t.is(lines.length, 0);
});

test("applicationSourceFor falls back for the pod itself", (t) => {
  const { logger, lines } = recordingLogger();
  t.is(applicationSourceFor(networkIn("ready"), { ip: POD_IP, port: 1 }, POD_IP, logger, true), undefined);
  t.is(lines.length, 1);
  t.regex(lines[0].reason ?? "", /the pod itself/);
});

test("applicationSourceFor falls back when set-up failed", (t) => {
  const { logger, lines } = recordingLogger();
  t.is(applicationSourceFor(networkIn("unavailable"), { ip: "10.244.1.10", port: 1 }, POD_IP, logger, true), undefined);
  t.is(lines.length, 1);
  t.regex(lines[0].reason ?? "", /routing is not installed/);
});

test("applicationSourceFor keeps an IPv6 client", (t) => {
  const { logger, lines } = recordingLogger();
  const source = applicationSourceFor(networkIn("ready", "ready"), { ip: "FD00:244:1::A", port: 40001 }, POD_IP6, logger, true);
  t.deepEqual(source, { ip: "fd00:244:1::a", avoidPort: 40001 });
  t.is(lines.length, 0);
});

test("applicationSourceFor reads the IPv6 state", (t) => {
  const { logger, lines } = recordingLogger();
  const client = { ip: "fd00:244:1::a", port: 1 };
  t.is(applicationSourceFor(networkIn("ready", "off"), client, POD_IP6, logger, true), undefined);
  t.is(applicationSourceFor(networkIn("ready", undefined), client, POD_IP6, logger, true), undefined);
  t.is(lines.length, 0);
  t.is(applicationSourceFor(networkIn("ready", "unavailable"), client, POD_IP6, logger, true), undefined);
  t.is(lines.length, 1);
  t.regex(lines[0].reason ?? "", /IPv6 transparent-source routing is not installed/);
});

test("applicationSourceFor keeps IPv4 when IPv6 is off", (t) => {
  const { logger } = recordingLogger();
  const source = applicationSourceFor(networkIn("ready", "off"), { ip: "10.244.1.10", port: 1 }, POD_IP, logger, false);
  t.deepEqual(source, { ip: "10.244.1.10", avoidPort: undefined });
});

test("applicationSourceFor rejects a link-local client", (t) => {
  const { logger, lines } = recordingLogger();
  t.is(applicationSourceFor(networkIn("off", "ready"), { ip: "fe80::1", port: 1 }, POD_IP6, logger, true), undefined);
  t.regex(lines[0]?.reason ?? "", /link-local/);
});
