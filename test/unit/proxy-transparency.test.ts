import test from "ava";
import net from "node:net";
import pino from "pino";
import type { PodNetwork, TransparentSourceState } from "../../agent/proxy/pod-network";
import { applicationSourceFor, transparencyProblem } from "../../agent/proxy/transparency";

const POD_IP = "10.244.2.10";

const PROBLEM_CASES: [clientIp: string, problem: RegExp | undefined][] = [
  ["10.244.1.10", undefined],
  ["::ffff:10.244.1.10", undefined],
  ["169.254.7.127", undefined],
  [POD_IP, /the pod itself/],
  [`::ffff:${POD_IP}`, /the pod itself/],
  ["127.0.0.1", /loopback/],
  ["127.1.2.3", /loopback/],
  ["0.0.0.0", /unspecified/],
  ["fd00::1", /not IPv4/],
  ["", /not IPv4/],
];

for (const [clientIp, problem] of PROBLEM_CASES) {
  test(`transparencyProblem for client ${clientIp || "(empty)"}`, (t) => {
    const result = transparencyProblem(clientIp, POD_IP);
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

function networkIn(state: TransparentSourceState | undefined): PodNetwork {
  return { listen: async () => undefined, connect: () => new net.Socket(), transparentSource: state };
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
