import test from "ava";
import { missingRequiredCapabilities, parseEffectiveCapabilities } from "../../agent/capture/capabilities";

/** CapEff of a container granted DAC_OVERRIDE, NET_ADMIN, SYS_PTRACE and SYS_ADMIN (bits 1, 12, 19, 21). */
const CHART_SET = "0000000000281002";

function statusWith(capEff: string): string {
  return `Name:\tnode\nUmask:\t0022\nCapInh:\t0000000000000000\nCapPrm:\t${capEff}\nCapEff:\t${capEff}\nCapBnd:\t${capEff}\n`;
}

test("the chart's capability set lacks nothing the agent requires", (t) => {
  const capabilities = parseEffectiveCapabilities(statusWith(CHART_SET));
  t.truthy(capabilities);
  t.deepEqual(missingRequiredCapabilities(capabilities!), []);
  t.true(capabilities!.has("CAP_DAC_OVERRIDE"));
  t.false(capabilities!.has("CAP_NET_RAW"));
});

test("each required capability is named when it is missing", (t) => {
  // Without bit 12 (NET_ADMIN), then without bit 21 (SYS_ADMIN).
  t.deepEqual(missingRequiredCapabilities(parseEffectiveCapabilities(statusWith("0000000000280002"))!), ["CAP_NET_ADMIN"]);
  t.deepEqual(missingRequiredCapabilities(parseEffectiveCapabilities(statusWith("0000000000081002"))!), ["CAP_SYS_ADMIN"]);
  t.deepEqual(missingRequiredCapabilities(parseEffectiveCapabilities(statusWith("0000000000000000"))!), ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]);
});

test("CAP_BPF alone does not stand in for CAP_SYS_ADMIN", (t) => {
  // Bits 12 (NET_ADMIN) and 39 (BPF): programs would load, but setns into pods still needs CAP_SYS_ADMIN.
  t.deepEqual(missingRequiredCapabilities(parseEffectiveCapabilities(statusWith("0000008000001000"))!), ["CAP_SYS_ADMIN"]);
});

test("a status text without CapEff gives no capability set", (t) => {
  t.is(parseEffectiveCapabilities("Name:\tnode\n"), undefined);
});
