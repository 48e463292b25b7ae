import test from "ava";

import {
  CNI_ERROR_CODES,
  CniRequestReader,
  errorOutput,
  formatCniReply,
  InvalidCniRequestError,
  MAX_CONFIG_BYTES,
  MAX_HEADER_BYTES,
  parseCniArgs,
  successOutput,
  toPodEvent,
  type CniRequest,
} from "../../agent/cni/protocol";

const CONFIG = {
  cniVersion: "1.0.0",
  name: "k8s-pod-network",
  type: "ambient-agent-cni",
  prevResult: {
    cniVersion: "1.0.0",
    interfaces: [{ name: "eth0", sandbox: "/var/run/netns/cni-1" }],
    ips: [
      { address: "10.244.1.7/24", interface: 0 },
      { address: "fd00::7/64", interface: 0 },
    ],
  },
};

const VARIABLES: Record<string, string> = {
  CNI_COMMAND: "ADD",
  CNI_CONTAINERID: "3f1c0a9e",
  CNI_NETNS: "/var/run/netns/cni-1",
  CNI_IFNAME: "eth0",
  CNI_ARGS: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=9d1e",
  CNI_PATH: "/opt/cni/bin",
};

function requestBytes(variables: Record<string, string | undefined> = {}, config: unknown = CONFIG): Buffer {
  const configBytes = Buffer.from(typeof config === "string" ? config : JSON.stringify(config));
  const lines = Object.entries({ ...VARIABLES, ...variables })
    .filter((entry): entry is [string, string] => entry[1] !== undefined)
    .map(([key, value]) => `${key}=${value}\n`);
  return Buffer.concat([Buffer.from(`${lines.join("")}CONFIG_LENGTH=${configBytes.length}\n\n`), configBytes]);
}

function read(bytes: Buffer): CniRequest | undefined {
  return new CniRequestReader().push(bytes);
}

function rejection(bytes: Buffer): InvalidCniRequestError {
  const error = (() => {
    try {
      const request = read(bytes);
      if (request) toPodEvent(request);
    } catch (caught) {
      return caught;
    }
    return undefined;
  })();
  if (!(error instanceof InvalidCniRequestError)) throw new Error(`expected an InvalidCniRequestError, got ${String(error)}`);
  return error;
}

test("reader parses a complete ADD", (t) => {
  const request = read(requestBytes());
  if (!request) return t.fail("the request was not complete");
  t.is(request.command, "ADD");
  t.is(request.containerId, "3f1c0a9e");
  t.is(request.netns, "/var/run/netns/cni-1");
  t.is(request.ifName, "eth0");
  t.deepEqual(request.config, CONFIG);
});

test("reader waits for every byte", (t) => {
  const bytes = requestBytes();
  const reader = new CniRequestReader();
  for (let at = 0; at < bytes.length - 1; at += 7) {
    t.is(reader.push(bytes.subarray(at, Math.min(at + 7, bytes.length - 1))), undefined);
  }
  t.truthy(reader.push(bytes.subarray(bytes.length - 1)));
});

test("pod event carries pod names and IPs", (t) => {
  const event = toPodEvent(read(requestBytes())!);
  t.deepEqual(event, {
    command: "ADD",
    containerId: "3f1c0a9e",
    netns: "/var/run/netns/cni-1",
    ifName: "eth0",
    podNamespace: "shop",
    podName: "cart-0",
    podUid: "9d1e",
    ips: ["10.244.1.7", "fd00::7"],
    cniVersion: "1.0.0",
  });
});

test("pod event without prevResult has no IPs", (t) => {
  const event = toPodEvent(read(requestBytes({ CNI_ARGS: undefined }, { cniVersion: "0.4.0" }))!);
  t.deepEqual(event.ips, []);
  t.is(event.podNamespace, undefined);
  t.is(event.cniVersion, "0.4.0");
});

test("DEL accepts a missing netns and ifName", (t) => {
  const request = read(requestBytes({ CNI_COMMAND: "DEL", CNI_NETNS: undefined, CNI_IFNAME: undefined }));
  t.is(request?.command, "DEL");
  t.is(request?.netns, "");
});

const INVALID_REQUESTS: Array<[string, Buffer, number, RegExp]> = [
  ["unknown command", requestBytes({ CNI_COMMAND: "CHECK" }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_COMMAND "CHECK" is not ADD or DEL/],
  ["missing command", requestBytes({ CNI_COMMAND: undefined }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_COMMAND "" is not ADD or DEL/],
  ["relative netns", requestBytes({ CNI_NETNS: "netns/cni-1" }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_NETNS "netns\/cni-1" is not a normalized absolute path/],
  ["netns with ..", requestBytes({ CNI_NETNS: "/var/run/netns/../../etc" }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_NETNS/],
  ["missing netns on ADD", requestBytes({ CNI_NETNS: undefined }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_NETNS "" is not/],
  ["bad container id", requestBytes({ CNI_CONTAINERID: "a b" }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_CONTAINERID "a b"/],
  ["long ifName", requestBytes({ CNI_IFNAME: "a-very-long-interface" }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_IFNAME/],
  ["bad CNI_ARGS", requestBytes({ CNI_ARGS: "K8S_POD_NAME" }), CNI_ERROR_CODES.INVALID_ENVIRONMENT, /CNI_ARGS entry "K8S_POD_NAME" is not KEY=VALUE/],
  ["config not JSON", requestBytes({}, "{cniVersion"), CNI_ERROR_CODES.DECODE_FAILED, /failed to decode the network configuration/],
  ["config an array", requestBytes({}, "[]"), CNI_ERROR_CODES.INVALID_CONFIG, /not a JSON object/],
  ["no cniVersion", requestBytes({}, { name: "n" }), CNI_ERROR_CODES.INVALID_CONFIG, /cniVersion is missing/],
  ["prevResult a string", requestBytes({}, { cniVersion: "1.0.0", prevResult: "x" }), CNI_ERROR_CODES.INVALID_CONFIG, /prevResult is not an object/],
  ["ips not an array", requestBytes({}, { cniVersion: "1.0.0", prevResult: { ips: {} } }), CNI_ERROR_CODES.INVALID_CONFIG, /prevResult.ips is not an array/],
  [
    "address not an IP",
    requestBytes({}, { cniVersion: "1.0.0", prevResult: { ips: [{ address: "pod/24" }] } }),
    CNI_ERROR_CODES.INVALID_CONFIG,
    /prevResult.ips\[0\].address "pod\/24" is not an IP address/,
  ],
];

for (const [name, bytes, code, message] of INVALID_REQUESTS) {
  test(`request rejected: ${name}`, (t) => {
    const error = rejection(bytes);
    t.is(error.code, "INVALID_CNI_REQUEST");
    t.is(error.cniCode, code);
    t.regex(error.message, message);
  });
}

test("header rejects unknown and repeated keys", (t) => {
  t.regex(rejection(Buffer.from("CNI_COMMAND=ADD\nFOO=1\nCONFIG_LENGTH=0\n\n")).message, /unknown variable "FOO"/);
  t.regex(rejection(Buffer.from("CNI_COMMAND=ADD\nCNI_COMMAND=DEL\nCONFIG_LENGTH=0\n\n")).message, /CNI_COMMAND appears twice/);
  t.regex(rejection(Buffer.from("CNI_COMMAND\nCONFIG_LENGTH=0\n\n")).message, /line "CNI_COMMAND" is not KEY=VALUE/);
});

test("header needs a valid CONFIG_LENGTH", (t) => {
  t.regex(rejection(Buffer.from("CNI_COMMAND=ADD\n\n")).message, /CONFIG_LENGTH is missing/);
  t.regex(rejection(Buffer.from("CNI_COMMAND=ADD\nCONFIG_LENGTH=-1\n\n")).message, /CONFIG_LENGTH "-1" is not a byte count/);
  t.regex(rejection(Buffer.from(`CNI_COMMAND=ADD\nCONFIG_LENGTH=${MAX_CONFIG_BYTES + 1}\n\n`)).message, /is not a byte count of at most 1048576/);
});

test("reader rejects an oversized header", (t) => {
  const reader = new CniRequestReader();
  t.is(reader.push(Buffer.from("CNI_ARGS=")), undefined);
  const error = t.throws(() => reader.push(Buffer.alloc(MAX_HEADER_BYTES, "a")), { instanceOf: InvalidCniRequestError });
  t.regex(error?.message ?? "", /exceed 65536 bytes/);
});

test("reader rejects bytes after the configuration", (t) => {
  const bytes = Buffer.concat([requestBytes(), Buffer.from("extra")]);
  t.regex(rejection(bytes).message, /5 bytes after the configuration/);
});

test("CNI_ARGS splits into pairs", (t) => {
  // The first pair of a key wins, as in the plugin, which reads the namespace for its exclusions.
  t.deepEqual([...parseCniArgs("A=1;;B=x=y;A=2")], [
    ["A", "1"],
    ["B", "x=y"],
  ]);
  t.deepEqual([...parseCniArgs("")], []);
});

test("success output passes prevResult on", (t) => {
  t.deepEqual(JSON.parse(successOutput(CONFIG)), CONFIG.prevResult);
  t.deepEqual(JSON.parse(successOutput({ cniVersion: "1.0.0" })), { cniVersion: "1.0.0" });
});

test("reply has the status line first", (t) => {
  const reply = formatCniReply(1, errorOutput("1.0.0", 100, "capture failed", "netns gone"));
  const [status, body] = reply.toString().split(/\n(.*)/s);
  t.is(status, "1");
  t.deepEqual(JSON.parse(body), { cniVersion: "1.0.0", code: 100, msg: "capture failed", details: "netns gone" });
});
