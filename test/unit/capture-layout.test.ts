// The byte layouts in agent/capture/layout.ts must match the structs compiled into the
// prebuilt bpf/capture.bpf.o (read from its BTF with bpftool) and the constants of
// bpf/lib/config.h and native/internal.h.
import test from "ava";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import {
  AGENT_MARK,
  AGENT_SOCKET_FLAG,
  INBOUND_HBONE_PORT,
  INBOUND_PLAINTEXT_PORT,
  INBOUND_PROGRAM_NAME,
  MAP_AGENT_SOCKETS,
  DIRECTION_CODES,
  MAP_ENROLLED,
  MAP_EXCLUDED_PORTS,
  MAP_INBOUND_LISTENERS,
  MAP_INBOUND_PODS,
  MAP_ORIGINAL_DESTINATION,
  MAP_OWN_CONNECTIONS,
  MAP_PROBE_SOURCES,
  MAX_EXCLUDED_PORTS,
  MAX_PROBE_SOURCES,
  MAP_SOCKET_ORIGINAL_DESTINATION,
  OUTBOUND_PORT,
  PROGRAM_NAMES,
  STRUCT_LAYOUTS,
  decodeCookie,
  decodeInboundPod,
  decodeIpv4Key,
  decodeOriginalDestination,
  decodePodInfo,
  encodeCookie,
  encodeInboundKey,
  encodeInboundPod,
  encodeIpv4Key,
  encodeListenerFd,
  encodeOriginalDestination,
  encodeOriginalDestinationKey,
  encodeOwnConnectionKey,
  encodePodInfo,
  inboundLinkName,
  parseInboundLinkName,
} from "../../agent/capture/layout";

const REPO = path.resolve(__dirname, "../../..");
const OBJECT_PATH = path.join(REPO, "bpf/capture.bpf.o");
const CONFIG_HEADER = path.join(REPO, "bpf/lib/config.h");
const NATIVE_HEADER = path.join(REPO, "native/internal.h");

interface BtfDump {
  structs: Map<string, BtfStruct>;
  /** Names of FUNC (programs and helpers) and VAR (maps, license) entries. */
  symbols: Set<string>;
}

interface BtfStruct {
  size: number;
  offsets: Record<string, number>;
}

/** Parses `bpftool btf dump format raw`: struct sizes and member byte offsets, FUNC and VAR names. */
function readBtf(objectPath: string): BtfDump {
  const dump = execFileSync("bpftool", ["btf", "dump", "file", objectPath, "format", "raw"], { encoding: "utf8" });
  const structs = new Map<string, BtfStruct>();
  const symbols = new Set<string>();
  let current: BtfStruct | undefined;
  for (const line of dump.split("\n")) {
    const symbol = /^\[\d+\] (?:FUNC|VAR) '([^']+)'/.exec(line);
    if (symbol) symbols.add(symbol[1]);

    const header = /^\[\d+\] STRUCT '([^']*)' size=(\d+)/.exec(line);
    if (header) {
      current = { size: Number(header[2]), offsets: {} };
      structs.set(header[1], current);
      continue;
    }
    const member = /^\s+'([^']+)' type_id=\d+ bits_offset=(\d+)/.exec(line);
    if (member && current) {
      current.offsets[member[1]] = Number(member[2]) / 8;
    } else if (!line.startsWith("\t")) {
      current = undefined;
    }
  }
  return { structs, symbols };
}

/** Reads `#define NAME value` lines of a C header. */
function readDefines(header: string): Map<string, number> {
  const defines = new Map<string, number>();
  for (const match of fs.readFileSync(header, "utf8").matchAll(/^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$/gm)) {
    defines.set(match[1], Number(match[2]));
  }
  return defines;
}

const btf = readBtf(OBJECT_PATH);

for (const [name, layout] of Object.entries(STRUCT_LAYOUTS)) {
  test(`struct ${name} matches BTF`, (t) => {
    const compiled = btf.structs.get(name);
    if (!compiled) return t.fail(`struct ${name} is missing from the BTF of ${OBJECT_PATH}`);
    t.is(compiled.size, layout.size, `sizeof(struct ${name}) in C differs from STRUCT_LAYOUTS.${name}.size`);
    const offsets: Record<string, number> = layout.offsets;
    for (const [field, offset] of Object.entries(offsets)) {
      t.is(compiled.offsets[field], offset, `offset of ${name}.${field} in C differs from STRUCT_LAYOUTS (undefined: no such C field)`);
    }
    for (const field of Object.keys(compiled.offsets)) {
      t.true(field in offsets, `C field ${name}.${field} is missing from STRUCT_LAYOUTS.${name}.offsets`);
    }
  });
}

test("config.h constants match", (t) => {
  const defines = readDefines(CONFIG_HEADER);
  t.is(defines.get("AA_AGENT_MARK"), AGENT_MARK);
  t.is(defines.get("AA_AGENT_SOCKET"), AGENT_SOCKET_FLAG);
  t.is(defines.get("AA_PORT_OUTBOUND"), OUTBOUND_PORT);
  t.is(defines.get("AA_PORT_INBOUND_PLAIN"), INBOUND_PLAINTEXT_PORT);
  t.is(defines.get("AA_PORT_INBOUND_HBONE"), INBOUND_HBONE_PORT);
});

test("object defines the maps and programs", (t) => {
  const maps = [MAP_ENROLLED, MAP_ORIGINAL_DESTINATION, MAP_SOCKET_ORIGINAL_DESTINATION];
  const inboundMaps = [MAP_INBOUND_PODS, MAP_INBOUND_LISTENERS, MAP_OWN_CONNECTIONS, MAP_AGENT_SOCKETS];
  for (const name of [...maps, ...inboundMaps, ...PROGRAM_NAMES, INBOUND_PROGRAM_NAME]) {
    t.true(btf.symbols.has(name), `${name} is missing from the BTF of ${OBJECT_PATH}`);
  }
});

test("native agent flag matches config.h", (t) => {
  // native/netns.c writes this value into aa_agent_socks; the programs test it against AA_AGENT_SOCKET.
  t.is(readDefines(NATIVE_HEADER).get("AA_AGENT_SOCKET_FLAG"), AGENT_SOCKET_FLAG);
  t.is(STRUCT_LAYOUTS.aa_agent_sock.size, 4);
});

test("cookie encodes in host byte order", (t) => {
  const cookie = 0x0102030405060708n;
  const encoded = encodeCookie(cookie);
  t.is(encoded.length, 8);
  t.is(decodeCookie(encoded), cookie);
  t.is(encoded[0], os.endianness() === "LE" ? 0x08 : 0x01);
});

test("pod info puts the IP in network order", (t) => {
  const encoded = encodePodInfo("10.1.2.3");
  t.deepEqual([...encoded], [10, 1, 2, 3, 0, 0, 0, 0]);
  t.deepEqual(decodePodInfo(encoded), { podIp: "10.1.2.3", flags: 0 });
});

test("original destination key layout", (t) => {
  const encoded = encodeOriginalDestinationKey(5n, "10.1.2.3", 0x1234);
  const offsets = STRUCT_LAYOUTS.aa_orig_dst_key.offsets;
  t.is(encoded.length, STRUCT_LAYOUTS.aa_orig_dst_key.size);
  t.is(decodeCookie(encoded.subarray(offsets.netns_cookie, offsets.netns_cookie + 8)), 5n);
  t.deepEqual([...encoded.subarray(offsets.local_ip4, offsets.local_ip4 + 4)], [10, 1, 2, 3]);
  // sockops gives local_port in host byte order.
  const port = [...encoded.subarray(offsets.local_port, offsets.local_port + 2)];
  t.deepEqual(port, os.endianness() === "LE" ? [0x34, 0x12] : [0x12, 0x34]);
  t.deepEqual([...encoded.subarray(offsets.pad, offsets.pad + 2)], [0, 0]);
});

test("original destination value round trip", (t) => {
  const encoded = encodeOriginalDestination("192.0.2.7", 8080);
  // Port in network byte order, as connect4 copies it from bpf_sock_addr.user_port.
  t.deepEqual([...encoded], [192, 0, 2, 7, 0x1f, 0x90, 0, 0]);
  t.deepEqual(decodeOriginalDestination(encoded), { ip: "192.0.2.7", port: 8080 });
});

test("encoders reject invalid input", (t) => {
  t.throws(() => encodePodInfo("fd00::1"), { instanceOf: TypeError });
  t.throws(() => encodeOriginalDestinationKey(1n, "10.0.0.1", 70000), { instanceOf: RangeError });
});

/** Bytes of a host-order u16, as the kernel reads it. */
function hostU16(value: number): number[] {
  return os.endianness() === "LE" ? [value & 0xff, value >> 8] : [value >> 8, value & 0xff];
}

test("inbound pod key and value", (t) => {
  t.deepEqual([...encodeIpv4Key("10.1.2.3")], [10, 1, 2, 3]);
  t.is(decodeIpv4Key(encodeIpv4Key("10.1.2.3")), "10.1.2.3");
  const value = encodeInboundPod(0x0102030405060708n);
  t.is(value.length, STRUCT_LAYOUTS.aa_inbound_pod.size);
  t.deepEqual([...value.subarray(0, 8)], [...encodeCookie(0x0102030405060708n)]);
  t.deepEqual(decodeInboundPod(value), { cookie: 0x0102030405060708n });
});

test("inbound listener key layout", (t) => {
  const encoded = encodeInboundKey("10.1.2.3", INBOUND_PLAINTEXT_PORT);
  const offsets = STRUCT_LAYOUTS.aa_inbound_key.offsets;
  t.is(encoded.length, STRUCT_LAYOUTS.aa_inbound_key.size);
  t.deepEqual([...encoded.subarray(offsets.ip4, offsets.ip4 + 4)], [10, 1, 2, 3]);
  // sk_lookup compares with local_port, which is in host byte order.
  t.deepEqual([...encoded.subarray(offsets.port, offsets.port + 2)], hostU16(15006));
  t.deepEqual([...encoded.subarray(offsets.pad, offsets.pad + 2)], [0, 0]);
});

test("listener fd encodes as host u64", (t) => {
  const encoded = encodeListenerFd(0x1234);
  t.is(encoded.length, 8);
  t.is(decodeCookie(encoded), 0x1234n);
  t.throws(() => encodeListenerFd(-1), { instanceOf: RangeError });
  t.throws(() => encodeListenerFd(1.5), { instanceOf: RangeError });
});

test("own connection key layout", (t) => {
  const encoded = encodeOwnConnectionKey("10.9.0.1", 0x1234, "10.1.2.3", 8080);
  const offsets = STRUCT_LAYOUTS.aa_conn_key.offsets;
  t.is(encoded.length, STRUCT_LAYOUTS.aa_conn_key.size);
  t.deepEqual([...encoded.subarray(offsets.src_ip4, offsets.src_ip4 + 4)], [10, 9, 0, 1]);
  t.deepEqual([...encoded.subarray(offsets.dst_ip4, offsets.dst_ip4 + 4)], [10, 1, 2, 3]);
  t.deepEqual([...encoded.subarray(offsets.src_port, offsets.src_port + 2)], hostU16(0x1234));
  t.deepEqual([...encoded.subarray(offsets.dst_port, offsets.dst_port + 2)], hostU16(8080));
  t.throws(() => encodeOwnConnectionKey("10.9.0.1", 65536, "10.1.2.3", 8080), { instanceOf: RangeError });
});

test("inbound link name round trip", (t) => {
  t.is(inboundLinkName(4097n), "sk_lookup-4097");
  t.is(parseInboundLinkName("sk_lookup-4097"), 4097n);
  t.is(parseInboundLinkName("aa_sockops"), undefined);
  t.is(parseInboundLinkName("sk_lookup-12x"), undefined);
});

test("exemption constants match config.h", (t) => {
  const defines = readDefines(CONFIG_HEADER);
  t.is(defines.get("AA_MAX_PROBE_SOURCES"), MAX_PROBE_SOURCES, "AA_MAX_PROBE_SOURCES");
  t.is(defines.get("AA_MAX_EXCLUDED_PORTS"), MAX_EXCLUDED_PORTS, "AA_MAX_EXCLUDED_PORTS");
  t.is(defines.get("AA_DIRECTION_INBOUND"), DIRECTION_CODES.inbound, "AA_DIRECTION_INBOUND");
  t.is(defines.get("AA_DIRECTION_OUTBOUND"), DIRECTION_CODES.outbound, "AA_DIRECTION_OUTBOUND");
  for (const name of [MAP_PROBE_SOURCES, MAP_EXCLUDED_PORTS]) {
    t.true(btf.symbols.has(name), `${name} is missing from the BTF of ${OBJECT_PATH}`);
  }
});

test("inbound constants match config.h", (t) => {
  const defines = readDefines(CONFIG_HEADER);
  t.is(defines.get("AA_AF_INET"), 2);
  t.is(defines.get("AA_AF_INET6"), 10);
  t.is(defines.get("AA_IPPROTO_TCP"), 6);
});
