import test from "ava";

import { capturePodIp, isIpv6Only } from "../../agent/enroll/dual-stack";

const cases: { name: string; ip: string; ips?: string[]; captureIp: string; ipv6Only: boolean }[] = [
  { name: "IPv4-only", ip: "10.0.0.1", captureIp: "10.0.0.1", ipv6Only: false },
  { name: "IPv4-first dual-stack", ip: "10.0.0.1", ips: ["10.0.0.1", "fd00::1"], captureIp: "10.0.0.1", ipv6Only: false },
  { name: "IPv6-first dual-stack", ip: "fd00::1", ips: ["fd00::1", "10.0.0.1"], captureIp: "10.0.0.1", ipv6Only: false },
  { name: "IPv6-only", ip: "fd00::1", ips: ["fd00::1"], captureIp: "fd00::1", ipv6Only: true },
  { name: "IPv6-only without podIPs", ip: "FD00:0::1", captureIp: "fd00::1", ipv6Only: true },
];

for (const entry of cases) {
  test(`capture address of ${entry.name} pod`, (t) => {
    const workload = { uid: "ns/pod", ip: entry.ip, ips: entry.ips } as Parameters<typeof capturePodIp>[0];
    t.is(capturePodIp(workload), entry.captureIp);
    t.is(isIpv6Only(workload), entry.ipv6Only);
  });
}
