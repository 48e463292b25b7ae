import test from "ava";
import { AgentError } from "../../agent/errors";
import {
  MAX_FORWARDED_CHARS,
  buildConnectHeaders,
  identityFromSubjectAltName,
  parseAuthority,
  parseForwardedFor,
  parseForwardedHost,
  newTraceparent,
} from "../../agent/proxy/hbone";
import type { Workload } from "../../agent/state/types";

const sleep = {
  name: "sleep-7d9f",
  namespace: "default",
  labels: { app: "sleep", version: "v1" },
} as unknown as Workload;

test("buildConnectHeaders for IPv4", (t) => {
  const headers = buildConnectHeaders({
    destination: { ip: "10.0.0.2", port: 8080 },
    source: { ip: "10.0.0.1", port: 40000 },
    workload: sleep,
  });

  t.is(headers[":method"], "CONNECT");
  t.is(headers[":authority"], "10.0.0.2:8080");
  t.is(headers["forwarded"], 'for="10.0.0.1:40000"');
  t.is(
    headers["baggage"],
    "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.pod.name=sleep-7d9f,service.name=sleep,service.version=v1",
  );
  t.regex(String(headers["traceparent"]), /^00-[0-9a-f]{32}-[0-9a-f]{16}-00$/);
});

test("buildConnectHeaders brackets IPv6", (t) => {
  const headers = buildConnectHeaders({
    destination: { ip: "fd00::2", port: 443 },
    source: { ip: "fd00::1", port: 5000 },
    workload: sleep,
    cluster: "east",
    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
  });

  t.is(headers[":authority"], "[fd00::2]:443");
  t.is(headers["forwarded"], 'for="[fd00::1]:5000"');
  t.regex(String(headers["baggage"]), /^k8s\.cluster\.name=east,/);
  t.is(headers["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
});

const authorities: [string, { ip: string; port: number }][] = [
  ["10.0.0.2:8080", { ip: "10.0.0.2", port: 8080 }],
  ["[fd00::2]:443", { ip: "fd00::2", port: 443 }],
  ["127.0.0.1:65535", { ip: "127.0.0.1", port: 65535 }],
];

for (const [authority, expected] of authorities) {
  test(`parseAuthority accepts ${authority}`, (t) => {
    t.deepEqual(parseAuthority(authority), expected);
  });
}

const badAuthorities = [
  undefined,
  "",
  "10.0.0.2",
  "10.0.0.2:",
  "10.0.0.2:0",
  "10.0.0.2:65536",
  "10.0.0.2:80a",
  "10.0.0.256:80",
  "fd00::2:443",
  "[10.0.0.2]:80",
  "[fd00::2]",
  "echo.apps.svc:80",
  " 10.0.0.2:80",
  "10.0.0.2:08080",
  "[::ffff:10.0.0.2]:80",
  "[::FFFF:10.0.0.2]:80",
];

for (const authority of badAuthorities) {
  test(`parseAuthority rejects ${JSON.stringify(authority)}`, (t) => {
    const error = t.throws(() => parseAuthority(authority), { instanceOf: AgentError });
    t.is(error?.code, "BAD_REQUEST");
  });
}

test("parseForwardedFor reads the for address", (t) => {
  t.deepEqual(parseForwardedFor('for="10.0.0.1:4000"'), { ip: "10.0.0.1", port: 4000 });
  t.deepEqual(parseForwardedFor('for="[fd00::1]:4000";host=echo'), { ip: "fd00::1", port: 4000 });
  t.is(parseForwardedFor("for=unknown"), undefined);
  t.is(parseForwardedFor(undefined), undefined);
});

test("buildConnectHeaders names the Service in forwarded", (t) => {
  const headers = buildConnectHeaders({
    destination: { ip: "10.0.0.2", port: 8080 },
    source: { ip: "10.0.0.1", port: 40000 },
    workload: sleep,
    serviceHost: "api.backend.svc.cluster.local",
  });
  // ztunnel's form (build_forwarded in src/proxy/outbound.rs): the host is not quoted.
  t.is(headers["forwarded"], 'for="10.0.0.1:40000";host=api.backend.svc.cluster.local');
  t.deepEqual(parseForwardedFor(headers["forwarded"]), { ip: "10.0.0.1", port: 40000 });
  t.is(parseForwardedHost(headers["forwarded"]), "api.backend.svc.cluster.local");
});

const forwardedHosts: [string, string | string[] | undefined, string | undefined][] = [
  ["unquoted", 'for="10.0.0.1:1";host=api.backend.svc.cluster.local', "api.backend.svc.cluster.local"],
  ["quoted", 'for="10.0.0.1:1";host="api.backend.svc.cluster.local";proto=https', "api.backend.svc.cluster.local"],
  ["upper-case name and value", 'HOST=API.Backend.svc.cluster.local', "api.backend.svc.cluster.local"],
  ["first of a list", ['host=a.b.svc.cluster.local', "host=c.d.svc.cluster.local"], "a.b.svc.cluster.local"],
  ["first element only", "for=x;host=a.b.svc.cluster.local, host=c.d.svc.cluster.local", "a.b.svc.cluster.local"],
  ["host in the second element", "for=x, host=c.d.svc.cluster.local", undefined],
  ["absent header", undefined, undefined],
  ["no host", 'for="10.0.0.1:1";proto=https', undefined],
  ["empty host", 'for="10.0.0.1:1";host=', undefined],
  ["host with a space", "host=a b.svc", undefined],
  ["host with a quote inside", 'host="a"b.svc"', undefined],
  ["non-ASCII host", "host=pröto.svc.cluster.local", undefined],
  ["host with a port", "host=a.b.svc.cluster.local:80", undefined],
  ["label of 63 characters", `host=${"a".repeat(63)}.svc`, `${"a".repeat(63)}.svc`],
  ["label of 64 characters", `host=${"a".repeat(64)}.svc`, undefined],
  ["name of 254 characters", `host=${Array.from({ length: 51 }, () => "abcd").join(".")}`, undefined],
  ["header over the limit", `host=a.b.svc.cluster.local;x=${"y".repeat(MAX_FORWARDED_CHARS)}`, undefined],
];

for (const [name, header, expected] of forwardedHosts) {
  test(`parseForwardedHost: ${name}`, (t) => {
    t.is(parseForwardedHost(header), expected);
  });
}

test("identityFromSubjectAltName takes the first SPIFFE URI", (t) => {
  t.deepEqual(identityFromSubjectAltName("DNS:echo, URI:https://x/y, URI:spiffe://cluster.local/ns/a/sa/b, URI:spiffe://cluster.local/ns/c/sa/d"), {
    trustDomain: "cluster.local",
    namespace: "a",
    serviceAccount: "b",
  });
  t.deepEqual(identityFromSubjectAltName('URI:"spiffe://cluster.local/ns/a/sa/b"'), {
    trustDomain: "cluster.local",
    namespace: "a",
    serviceAccount: "b",
  });
  t.is(identityFromSubjectAltName("DNS:echo"), undefined);
  t.is(identityFromSubjectAltName(undefined), undefined);
});

test("newTraceparent ids are well-formed and distinct", (t) => {
  // 1,000 ids span several refills of the random pool.
  const ids = Array.from({ length: 1_000 }, () => newTraceparent());
  for (const id of ids) {
    t.regex(id, /^00-[0-9a-f]{32}-[0-9a-f]{16}-00$/);
  }
  t.is(new Set(ids.map((id) => id.slice(3, 35))).size, ids.length);
  t.is(new Set(ids.map((id) => id.slice(36, 52))).size, ids.length);
});
