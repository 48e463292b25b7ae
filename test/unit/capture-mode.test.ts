import test from "ava";

import { NATIVE_FEATURES, parseCaptureMode, selectCaptureMode, type FeatureProbe } from "../../agent/capture/probe";
import { renderPodRuleset, renderRemoval } from "../../agent/capture/nft/capture";
import { renderPodIp6Change, renderPodRecreation } from "../../agent/capture/nft/ruleset";

const ALL_OK: FeatureProbe[] = ["bpffs", "cgroup2", "object", ...NATIVE_FEATURES].map((feature) => ({ feature, ok: true }));

/** Returns the body of one chain of a rendered ruleset. */
function chain(rules: string, name: string): string {
  const match = new RegExp(`chain ${name} \\{\\n([\\s\\S]*?)\\n  \\}`).exec(rules);
  if (!match) throw new Error(`no chain ${name} in:\n${rules}`);
  return match[1];
}

function withFailure(feature: string, error: string): FeatureProbe[] {
  return ALL_OK.map((probe) => (probe.feature === feature ? { feature, ok: false, error } : probe));
}

test("auto takes ebpf when every hook works", (t) => {
  const selection = selectCaptureMode("auto", ALL_OK);
  t.is(selection.mode, "ebpf");
  t.is(selection.reason, "all hooks present");
  t.deepEqual(selection.missing, []);
});

test("auto falls back to nftables naming the hook", (t) => {
  const selection = selectCaptureMode("auto", withFailure("sk_lookup", "Invalid argument"));
  t.is(selection.mode, "nftables");
  t.is(selection.reason, "sk_lookup unavailable: Invalid argument");
  t.deepEqual(selection.missing.map((probe) => probe.feature), ["sk_lookup"]);
});

test("auto keeps ebpf when bpffs is not mounted", (t) => {
  const selection = selectCaptureMode("auto", withFailure("bpffs", "no bpffs at /sys/fs/bpf"));
  t.is(selection.mode, "ebpf");
  t.is(selection.reason, "host set-up incomplete: no bpffs at /sys/fs/bpf");
});

test("explicit ebpf keeps the missing hooks", (t) => {
  const selection = selectCaptureMode("ebpf", withFailure("map:sk_storage", "Operation not supported"));
  t.is(selection.mode, "ebpf");
  t.deepEqual(selection.missing.map((probe) => probe.feature), ["map:sk_storage"]);
});

test("explicit nftables needs no probe", (t) => {
  const selection = selectCaptureMode("nftables", []);
  t.is(selection.mode, "nftables");
  t.is(selection.reason, "requested with --capture nftables");
});

test("capture flag values", (t) => {
  t.is(parseCaptureMode(undefined), "auto");
  t.is(parseCaptureMode("ebpf"), "ebpf");
  t.is(parseCaptureMode("nftables"), "nftables");
  t.throws(() => parseCaptureMode("iptables"), { message: /invalid --capture "iptables": use auto, ebpf, nftables/ });
});

test("pod ruleset redirects both directions", (t) => {
  const rules = renderPodRuleset("10.1.2.3");
  t.true(rules.startsWith("table inet ambient_agent\nflush table inet ambient_agent\ntable inet ambient_agent {"), "the table is not replaced in one transaction");
  const outbound = chain(rules, "outbound");
  t.regex(outbound, /type nat hook output priority -100;/);
  t.regex(outbound, /meta mark & 0xfff == 0x539 accept/);
  t.regex(outbound, /meta l4proto tcp redirect to :15001$/);
  const inbound = chain(rules, "inbound");
  t.regex(inbound, /type nat hook prerouting priority -100;/);
  t.regex(inbound, /tcp dport \{ 15006, 15008 \} accept/);
  t.regex(inbound, /meta l4proto tcp redirect to :15006$/);
  t.regex(rules, /ip daddr 10\.1\.2\.3 tcp dport \{ 15001, 15006, 15008 \} accept/);
  t.regex(rules, /ip daddr 127\.0\.0\.0\/8 accept/);
  t.regex(rules, /tcp dport 15001 drop/);
  t.notRegex(rules, /iifname != "lo"/, "a captured pod's inbound connections are rejected as if it were isolated");
});

test("isolated ruleset rejects inbound and passes no HBONE", (t) => {
  const rules = renderPodRuleset("10.1.2.3", "isolated");
  t.regex(rules, /iifname != "lo" ip saddr != 10\.1\.2\.3 meta l4proto tcp reject with tcp reset/);
  t.notRegex(rules, /tcp dport \{ 15006, 15008 \} accept/);
});

test("ruleset carries exemptions", (t) => {
  const rules = renderPodRuleset("10.1.2.3", "captured", {
    probeSources: ["169.254.7.127", "fd16::1"],
    excludedPorts: { inbound: [9090, 9091], outbound: [5432] },
  });
  t.regex(rules, /ip saddr \{ 169\.254\.7\.127 \} accept/);
  t.regex(rules, /ip6 saddr \{ fd16::1 \} accept/);
  t.regex(rules, /tcp dport \{ 9090, 9091 \} accept\n    meta l4proto tcp redirect to :15006/);
  t.regex(rules, /tcp dport \{ 5432 \} accept\n    meta l4proto tcp redirect to :15001/);
});

test("ruleset rejects IPv6 as the IPv4 address", (t) => {
  t.throws(() => renderPodRuleset("fd00::1"), { message: /invalid pod IPv4 address "fd00::1".*undefined for an IPv6-only pod/ });
});

test("IPv6-only ruleset captures IPv6", (t) => {
  const rules = renderPodRuleset(undefined, "captured", undefined, "fd00::10");
  t.notRegex(rules, /ip [sd]addr (?!127\.)\d|ip saddr != /, "an IPv6-only pod's table names an IPv4 pod address");
  t.regex(rules, /set pod_ip6 \{\n    type ipv6_addr\n    elements = \{ fd00::10 \}\n  \}/);
  const inbound = chain(rules, "inbound");
  t.regex(inbound, /ip6 saddr @pod_ip6 accept/);
  t.regex(inbound, /tcp dport \{ 15006, 15008 \} accept/);
  t.regex(inbound, /meta l4proto tcp redirect to :15006$/);
  const outbound = chain(rules, "outbound");
  t.regex(outbound, /ip daddr 127\.0\.0\.0\/8 accept/);
  t.regex(outbound, /ip6 daddr @pod_ip6 tcp dport \{ 15001, 15006, 15008 \} accept/);
  t.regex(outbound, /meta l4proto tcp redirect to :15001$/);
});

test("IPv6-only ruleset closes IPv4", (t) => {
  const rules = renderPodRuleset(undefined, "captured", undefined, "fd00::10");
  const guard = chain(rules, "prerouting_guard");
  t.regex(guard, /iifname "lo" accept\n    ip6 saddr @pod_ip6 accept\n    meta nfproto ipv4 meta l4proto tcp drop\n/);
  t.regex(guard, /meta nfproto ipv6 meta l4proto tcp ip6 daddr != @pod_ip6 drop/);
  const outboundGuard = chain(rules, "outbound_guard");
  t.regex(outboundGuard, /meta mark & 0xfff == 0x539 accept\n/);
  t.regex(outboundGuard, /meta nfproto ipv4 meta l4proto tcp ip daddr != 127\.0\.0\.0\/8 reject with icmp admin-prohibited$/);
  const dualStack = renderPodRuleset("10.1.2.3", "captured", undefined, "fd00::10");
  t.notRegex(dualStack, /meta nfproto ipv4/, "a pod with an IPv4 address gets the IPv4 fail-closed rules");
});

test("isolated IPv6-only ruleset captures nothing", (t) => {
  const rules = renderPodRuleset(undefined, "isolated");
  t.regex(rules, /set pod_ip6 \{\n    type ipv6_addr\n  \}/, "an isolated pod's IPv6 set is not empty");
  t.regex(chain(rules, "prerouting_guard"), /meta nfproto ipv4 meta l4proto tcp drop/);
  t.regex(chain(rules, "prerouting_guard"), /meta nfproto ipv6 meta l4proto tcp ip6 daddr != @pod_ip6 drop/);
  t.regex(chain(rules, "outbound_guard"), /ip6 saddr != @pod_ip6 reject with icmpv6 admin-prohibited/);
  t.notRegex(rules, /tcp dport \{ 15006, 15008 \} accept/);
});

test("ruleset without IPv6 drops native IPv6", (t) => {
  const rules = renderPodRuleset("10.1.2.3");
  t.regex(rules, /set pod_ip6 \{\n    type ipv6_addr\n  \}/, "the IPv6 set of a pod without captured IPv6 is not empty");
  t.regex(chain(rules, "prerouting_guard"), /meta nfproto ipv6 meta l4proto tcp ip6 daddr != @pod_ip6 drop/);
  const guard = chain(rules, "outbound_guard");
  t.regex(guard, /type filter hook output priority mangle;/);
  t.regex(guard, /meta mark & 0xfff == 0x539 accept\n    ip6 saddr ::1 accept\n/);
  t.regex(guard, /meta nfproto ipv6 meta l4proto tcp ip6 daddr != ::1 ip6 saddr != @pod_ip6 reject with icmpv6 admin-prohibited$/);
});

test("ruleset captures the pod's IPv6 address", (t) => {
  const rules = renderPodRuleset("10.1.2.3", "captured", undefined, "fd00::10");
  t.regex(rules, /set pod_ip6 \{\n    type ipv6_addr\n    elements = \{ fd00::10 \}\n  \}/);
  t.regex(chain(rules, "inbound"), /ip6 saddr @pod_ip6 accept/);
  t.regex(chain(rules, "outbound"), /ip6 daddr @pod_ip6 tcp dport \{ 15001, 15006, 15008 \} accept/);
  t.throws(() => renderPodRuleset("10.1.2.3", "captured", undefined, "10.1.2.4"), { message: /invalid pod IPv6 address "10\.1\.2\.4"/ });
});

test("IPv6 address changes in place", (t) => {
  t.is(renderPodIp6Change(undefined, "fd00::10"), "add element inet ambient_agent pod_ip6 { fd00::10 }\n");
  t.is(renderPodIp6Change("fd00::10", undefined), "delete element inet ambient_agent pod_ip6 { fd00::10 }\n");
  t.is(renderPodIp6Change("fd00::10", "fd00::11"), "delete element inet ambient_agent pod_ip6 { fd00::10 }\nadd element inet ambient_agent pod_ip6 { fd00::11 }\n");
  t.throws(() => renderPodIp6Change(undefined, "10.0.0.1"), { message: /invalid pod IPv6 address/ });
});

test("recreation deletes the table first", (t) => {
  t.true(renderPodRecreation("10.1.2.3").startsWith("table inet ambient_agent\ndelete table inet ambient_agent\ntable inet ambient_agent {"));
});

test("removal succeeds without a table", (t) => {
  t.is(renderRemoval(), "table inet ambient_agent\ndelete table inet ambient_agent\n");
});
