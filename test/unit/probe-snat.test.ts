// The probe SNAT table without the kernel: the nft scripts it renders, the writes ProbeSnat makes as
// pods come and go and when nftables fails, and how readiness and agentctl status show it.
import test from "ava";
import pino from "pino";

import { readinessChecks, type ReadinessInputs } from "../../agent/admin/readiness";
import { ProbeSnat } from "../../agent/capture/nft/probe-snat";
import {
  NO_PODS,
  listsProbeSnatTable,
  probeSnatPods,
  probeSnatSources,
  renderProbeSnatElements,
  renderProbeSnatRemoval,
  renderProbeSnatRuleset,
  renderProbeSnatTable,
} from "../../agent/capture/nft/probe-snat-ruleset";
import { formatWatches, type Readiness } from "../../agent/cli/status-command";
import { AgentError } from "../../agent/errors";

const SOURCE4 = "169.254.7.127";
const SOURCE6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
const HOST_NETNS = "/proc/1/ns/net";

test("table with both families", (t) => {
  const table = renderProbeSnatTable({ ipv4: SOURCE4, ipv6: SOURCE6 }, { ipv4: ["10.1.0.5", "10.1.0.7"], ipv6: ["fd00::5"] });
  t.is(
    table,
    [
      "table inet ambient_agent_probes {",
      "  set pods_ip4 {",
      "    type ipv4_addr",
      "    elements = { 10.1.0.5, 10.1.0.7 }",
      "  }",
      "  set pods_ip6 {",
      "    type ipv6_addr",
      "    elements = { fd00::5 }",
      "  }",
      "  chain postrouting {",
      "    type nat hook postrouting priority srcnat - 10; policy accept;",
      `    meta l4proto tcp ct status & dnat == 0 meta skuid >= 0 fib saddr type local ip daddr @pods_ip4 snat ip to ${SOURCE4}`,
      `    meta l4proto tcp ct status & dnat == 0 meta skuid >= 0 fib saddr type local ip6 daddr @pods_ip6 snat ip6 to ${SOURCE6}`,
      "  }",
      "}",
      "",
    ].join("\n"),
  );
});

test("table without pods or IPv6 source", (t) => {
  const table = renderProbeSnatTable({ ipv4: SOURCE4 }, NO_PODS);
  t.false(table.includes("elements"), "an empty set has no elements line");
  t.false(table.includes("snat ip6"), "no IPv6 rule without an IPv6 source");
  t.true(table.includes(`ip daddr @pods_ip4 snat ip to ${SOURCE4}`));
  // The IPv6 set stays, so that the elements script can always flush both sets.
  t.true(table.includes("set pods_ip6 {"));
});

test("table rejects invalid sources", (t) => {
  t.throws(() => renderProbeSnatTable({ ipv4: SOURCE6 }, NO_PODS), { instanceOf: AgentError, message: /invalid IPv4 probe source/ });
  t.throws(() => renderProbeSnatTable({ ipv6: SOURCE4 }, NO_PODS), { instanceOf: AgentError, message: /invalid IPv6 probe source/ });
});

test("ruleset replaces the table atomically", (t) => {
  const script = renderProbeSnatRuleset({ ipv4: SOURCE4, ipv6: SOURCE6 }, { ipv4: ["10.1.0.5"], ipv6: [] });
  const lines = script.split("\n");
  t.is(lines[0], "table inet ambient_agent_probes");
  t.is(lines[1], "delete table inet ambient_agent_probes");
  t.is(lines[2], "table inet ambient_agent_probes {");
  t.true(script.includes("elements = { 10.1.0.5 }"));
});

test("elements script flushes both sets", (t) => {
  t.is(
    renderProbeSnatElements({ ipv4: ["10.1.0.5", "10.1.0.6"], ipv6: ["fd00::5"] }),
    [
      "flush set inet ambient_agent_probes pods_ip4",
      "flush set inet ambient_agent_probes pods_ip6",
      "add element inet ambient_agent_probes pods_ip4 { 10.1.0.5, 10.1.0.6 }",
      "add element inet ambient_agent_probes pods_ip6 { fd00::5 }",
      "",
    ].join("\n"),
  );
  t.is(renderProbeSnatElements(NO_PODS), "flush set inet ambient_agent_probes pods_ip4\nflush set inet ambient_agent_probes pods_ip6\n");
});

test("removal and listing", (t) => {
  t.is(renderProbeSnatRemoval(), "table inet ambient_agent_probes\ndelete table inet ambient_agent_probes\n");
  t.true(listsProbeSnatTable("table inet filter\ntable inet ambient_agent_probes\n"));
  t.false(listsProbeSnatTable("table inet ambient_agent\ntable inet ambient_agent_probes_old\n"));
  t.false(listsProbeSnatTable(""));
});

test("sources: first address of each family", (t) => {
  t.deepEqual(probeSnatSources([SOURCE6, "10.9.9.9", SOURCE4, "fd00::9"]), { ipv4: "10.9.9.9", ipv6: SOURCE6 });
  t.deepEqual(probeSnatSources([SOURCE4]), { ipv4: SOURCE4, ipv6: undefined });
  t.throws(() => probeSnatSources([]), { instanceOf: AgentError, message: /no probe source address/ });
});

test("pods: canonical, sorted, unique", (t) => {
  t.deepEqual(probeSnatPods(["10.1.0.7", "fd00:0:0::5", "10.1.0.5", "fd00::5", "10.1.0.7"]), { ipv4: ["10.1.0.5", "10.1.0.7"], ipv6: ["fd00::5"] });
  t.throws(() => probeSnatPods(["10.1.0.300"]), { instanceOf: AgentError, message: /invalid pod address "10.1.0.300"/ });
});

/** Returns a ProbeSnat that records its scripts, and fails them with the message last given to `fail`. */
function recordedProbeSnat(probeSources: string[] = [SOURCE4, SOURCE6]): { probeSnat: ProbeSnat; scripts: string[]; fail: (message: string | undefined) => void } {
  const scripts: string[] = [];
  let failure: string | undefined;
  const probeSnat = new ProbeSnat({
    hostNetns: HOST_NETNS,
    probeSources,
    logger: pino({ level: "silent" }),
    runScript: (netnsPath, script) => {
      if (netnsPath !== HOST_NETNS) throw new Error(`script run in ${netnsPath}`);
      scripts.push(script);
      if (failure !== undefined) throw new Error(failure);
      return "";
    },
  });
  return { probeSnat, scripts, fail: (message) => (failure = message) };
}

test("install writes the whole table", (t) => {
  const { probeSnat, scripts } = recordedProbeSnat();
  probeSnat.install(["10.1.0.5"]);
  t.is(scripts.length, 1);
  t.true(scripts[0].startsWith("table inet ambient_agent_probes\ndelete table"));
  t.true(scripts[0].includes("elements = { 10.1.0.5 }"));
  t.like(probeSnat.status(), { installed: true, netns: HOST_NETNS, sources: [SOURCE4, SOURCE6], pods: { ipv4: 1, ipv6: 0 } });
  t.is(probeSnat.status().error, undefined);
  probeSnat.close();
});

test("update writes only changed sets", (t) => {
  const { probeSnat, scripts } = recordedProbeSnat();
  probeSnat.install(["10.1.0.5"]);
  probeSnat.update(["10.1.0.5"]);
  t.is(scripts.length, 1, "the same addresses write nothing");
  probeSnat.update(["10.1.0.5", "fd00::6", "10.1.0.6"]);
  t.is(scripts.length, 2);
  t.true(scripts[1].startsWith("flush set"), "a change writes the elements only");
  t.true(scripts[1].includes("pods_ip4 { 10.1.0.5, 10.1.0.6 }"));
  t.true(scripts[1].includes("pods_ip6 { fd00::6 }"));
  probeSnat.update([]);
  t.is(scripts[2], renderProbeSnatElements(NO_PODS), "the last pod's unenrolment empties the sets");
  t.like(probeSnat.status(), { installed: true, pods: { ipv4: 0, ipv6: 0 } });
  probeSnat.close();
});

test("failed install shows in status", (t) => {
  const { probeSnat, scripts, fail } = recordedProbeSnat();
  fail("Could not process rule: Operation not permitted");
  probeSnat.install(["10.1.0.5"]);
  t.like(probeSnat.status(), { installed: false, error: "Could not process rule: Operation not permitted" });
  // Enrolment goes on, and the next change tries the whole table again.
  fail(undefined);
  probeSnat.update(["10.1.0.5", "10.1.0.6"]);
  t.true(scripts[scripts.length - 1].startsWith("table inet ambient_agent_probes\ndelete table"));
  t.like(probeSnat.status(), { installed: true, pods: { ipv4: 2, ipv6: 0 } });
  t.is(probeSnat.status().error, undefined);
  probeSnat.close();
});

test("failed update rewrites the table", (t) => {
  const scripts: string[] = [];
  const probeSnat = new ProbeSnat({
    hostNetns: HOST_NETNS,
    probeSources: [SOURCE4],
    logger: pino({ level: "silent" }),
    runScript: (_netnsPath, script) => {
      scripts.push(script);
      // A table deleted by hand: its sets are gone, so only the whole table can be written.
      if (script.startsWith("flush set")) throw new Error("Error: No such file or directory");
      return "";
    },
  });
  probeSnat.install([]);
  probeSnat.update(["10.1.0.5"]);
  t.is(scripts.length, 3);
  t.true(scripts[1].startsWith("flush set"));
  t.true(scripts[2].startsWith("table inet ambient_agent_probes\ndelete table"));
  t.true(scripts[2].includes("elements = { 10.1.0.5 }"));
  t.like(probeSnat.status(), { installed: true, sources: [SOURCE4] });
  probeSnat.close();
});

const READY_INPUTS: ReadinessInputs = {
  configurationRead: true,
  captureAttached: true,
  enrolmentRunning: true,
  pending: [],
  certificates: [],
  enrolled: 1,
  stopping: false,
};

const INSTALLED = { installed: true, table: "inet ambient_agent_probes", netns: HOST_NETNS, sources: [SOURCE4, SOURCE6], pods: { ipv4: 3, ipv6: 1 } };

test("readiness holds without the table", (t) => {
  t.false("probeSnat" in readinessChecks(READY_INPUTS).checks, "no check without --probe-snat");
  t.deepEqual(readinessChecks({ ...READY_INPUTS, probeSnat: INSTALLED }), {
    ready: true,
    checks: { configuration: true, capture: true, enrolment: true, certificates: true, probeSnat: true },
  });
  const failing = readinessChecks({ ...READY_INPUTS, probeSnat: { ...INSTALLED, installed: false, error: "boom" } });
  t.false(failing.ready);
  t.false(failing.checks.probeSnat);
});

test("status line of the table", (t) => {
  const readiness: Readiness = { ready: true, checks: {}, enrolled: 1, probeSnat: INSTALLED };
  t.true(
    formatWatches(readiness).includes(`probe snat: table inet ambient_agent_probes in ${HOST_NETNS}, to ${SOURCE4} and ${SOURCE6}, for 3 IPv4 and 1 IPv6 pod addresses`),
  );
  const failing = formatWatches({ ...readiness, probeSnat: { ...INSTALLED, installed: false, error: "Operation not permitted" } });
  t.true(failing.includes(`probe snat: table inet ambient_agent_probes in ${HOST_NETNS} not in place (Operation not permitted)`), failing);
  t.false(formatWatches({ ...readiness, probeSnat: undefined }).includes("probe snat"));
});
