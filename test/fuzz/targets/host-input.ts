// Fuzz targets of input from the node: the `--config` file of `ambient-agent run`, the requests
// that the CNI plugin forwards from the container runtime, and the bytes of eBPF map entries.

import { parseArgs } from "node:util";
import fc from "fast-check";
import { COMMA_LIST_OPTIONS, RUN_OPTIONS } from "../../../agent/cli/ambient-agent";
import { ConfigFileError, withConfigFile } from "../../../agent/cli/config-file";
import { formatIpBytes, ipBytes } from "../../../agent/capture/ip-bytes";
import {
  decodeCookie,
  decodeInboundPod,
  decodeOriginalDestination,
  decodePodInfo,
  encodeCookie,
  encodeOriginalDestination,
  encodePodInfo,
  parseInboundLinkName,
  inboundLinkName,
  STRUCT_LAYOUTS,
} from "../../../agent/capture/layout";
import { CniRequestReader, InvalidCniRequestError, successOutput, toPodEvent } from "../../../agent/cni/protocol";
import { invariant, type FuzzTarget } from "../runner";
import { writeTempFile } from "../temp-file";
import { YAML_INPUT_MS, YAML_MAX_BYTES } from "./manifests";

export const configFile: FuzzTarget = {
  name: "config-file",
  inputMs: YAML_INPUT_MS,
  tokens: ["\n", ": ", "- ", "[", "]", "{", "}", "true", "false", "null", "<<: ", "&a ", "*a", "no-", "config: x\n", "log-level: ", "excluded-namespaces: ", "node: ", "__proto__: ", "constructor: ", "\ufeff", "\\ud800"],
  maxBytes: YAML_MAX_BYTES,
  run(input) {
    const args = withConfigFile(["--config", writeTempFile("config.yaml", input)], RUN_OPTIONS, COMMA_LIST_OPTIONS);
    // The file's tokens go through the command line's parser, which must accept whatever the reader let through.
    try {
      parseArgs({ args, options: RUN_OPTIONS, strict: true });
    } catch (error) {
      invariant(false, () => `the file was accepted as ${JSON.stringify(args)}, which the option parser rejects: ${(error as Error).message}`);
    }
  },
  expected: (error) => error instanceof ConfigFileError,
};

/** Formats a request as the plugin writes it: variables, CONFIG_LENGTH, a blank line, and the configuration. */
function formatCniRequest(variables: Record<string, string>, config: string): Buffer {
  const lines = Object.entries(variables).map(([key, value]) => `${key}=${value}`);
  return Buffer.from(`${lines.join("\n")}\nCONFIG_LENGTH=${Buffer.byteLength(config)}\n\n${config}`);
}

const generatedCniRequests = fc
  .record({
    command: fc.constantFrom("ADD", "DEL", "CHECK", ""),
    args: fc.array(fc.tuple(fc.constantFrom("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID", "IgnoreUnknown", ""), fc.string({ maxLength: 12 })), { maxLength: 4 }),
    netns: fc.constantFrom("/var/run/netns/cni-1", "/proc/1/ns/net", "", "relative", "/a/../b"),
    prevResult: fc.oneof(fc.constant(undefined), fc.jsonValue({ maxDepth: 3 }), fc.record({ ips: fc.array(fc.record({ address: fc.oneof(fc.constantFrom("10.0.0.5/24", "fd00::5/64", "10.0.0.5"), fc.jsonValue({ maxDepth: 1 })) }), { maxLength: 3 }) })),
  })
  .map(({ command, args, netns, prevResult }) =>
    formatCniRequest(
      { CNI_COMMAND: command, CNI_CONTAINERID: "abc123", CNI_NETNS: netns, CNI_IFNAME: "eth0", CNI_ARGS: args.map(([key, value]) => `${key}=${value}`).join(";") },
      JSON.stringify({ cniVersion: "1.0.0", name: "k8s-pod-network", prevResult }),
    ),
  );

export const cniRequest: FuzzTarget = {
  name: "cni-request",
  tokens: ["\n", "\n\n", "=", ";", "CNI_COMMAND=ADD\n", "CNI_COMMAND=DEL\n", "CONFIG_LENGTH=", "CNI_NETNS=/", "CNI_ARGS=", "K8S_POD_NAME=", '"prevResult":', '"ips":[', '"address":', "{", "}", "\u0000"],
  maxBytes: 16384,
  arbitraries: [generatedCniRequests],
  run(input) {
    // Bytes arrive in chunks of any size: split the input at two places to cover a request cut anywhere.
    const reader = new CniRequestReader();
    const cuts = [Math.floor(input.length / 3), Math.floor((2 * input.length) / 3), input.length];
    let request;
    let start = 0;
    for (const cut of cuts) {
      request = reader.push(input.subarray(start, cut)) ?? request;
      start = cut;
      if (request !== undefined) break;
    }
    if (request === undefined) return;
    const event = toPodEvent(request);
    invariant(event.command === "ADD" || event.command === "DEL", () => `the request was accepted with command ${event.command}`);
    invariant(typeof event.cniVersion === "string" && event.cniVersion !== "", () => `the request was accepted with cniVersion ${JSON.stringify(event.cniVersion)}`);
    JSON.parse(successOutput(request.config));
  },
  expected: (error) => error instanceof InvalidCniRequestError,
};

/**
 * Map entries as the kernel returns them, always of the map's value size. The decoders take any
 * bytes of that size; the input is padded or cut to it.
 */
function sized(input: Buffer, size: number): Buffer {
  return input.length >= size ? input.subarray(0, size) : Buffer.concat([input, Buffer.alloc(size - input.length)]);
}

export const kernelBytes: FuzzTarget = {
  name: "kernel-bytes",
  maxBytes: 64,
  run(input) {
    // Addresses: 4 or 16 bytes format to text that encodes back to the same bytes.
    for (const size of [4, 16]) {
      const bytes = sized(input, size);
      const text = formatIpBytes(bytes);
      const again = size === 16 && /^::ffff:\d+\.\d+\.\d+\.\d+$/.test(text) ? Buffer.concat([Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]), ipBytes(text.slice(7))]) : ipBytes(text);
      invariant(again.equals(bytes), () => `${bytes.toString("hex")} formats to ${text}, which encodes to ${again.toString("hex")}`);
    }
    // Any other length is the caller's mistake, reported as a TypeError.
    formatIpBytes(input);

    const destination = decodeOriginalDestination(sized(input, STRUCT_LAYOUTS.aa_orig_dst.size));
    const encoded = encodeOriginalDestination(destination.ip, destination.port);
    invariant(decodeOriginalDestination(encoded).ip === destination.ip, () => `the original destination ${destination.ip} does not round-trip`);
    const pod = decodePodInfo(sized(input, STRUCT_LAYOUTS.aa_pod_info.size));
    invariant(decodePodInfo(encodePodInfo(pod.podIp)).podIp === pod.podIp, () => `the pod address ${pod.podIp} does not round-trip`);
    const cookie = decodeCookie(sized(input, 8));
    invariant(encodeCookie(cookie).equals(sized(input, 8)), () => `the cookie ${cookie} does not round-trip`);
    decodeInboundPod(sized(input, STRUCT_LAYOUTS.aa_inbound_pod.size));
    invariant(parseInboundLinkName(inboundLinkName(cookie)) === cookie, () => `the link name of cookie ${cookie} does not parse back`);
    parseInboundLinkName(input.toString("latin1"));
  },
  expected: (error) => error instanceof TypeError && /^invalid IP address bytes/.test(error.message),
};
