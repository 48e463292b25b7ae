// Fuzz targets of the HBONE request headers that a remote agent sends: `:authority`,
// `forwarded` (for= and host=), and the `baggage` that the outbound side builds from pod labels.
// The inbound side only logs `baggage` and `traceparent`, cut to a bounded length, so the
// baggage target checks the builder against labels that a hostile manifest can carry.

import net from "node:net";
import { isDeepStrictEqual } from "node:util";
import fc from "fast-check";
import { parseManifests } from "../../../agent/discovery/manifest-parse";
import { AgentError } from "../../../agent/errors";
import { buildBaggage, parseAuthority, parseForwardedFor, parseForwardedHost, type Authority } from "../../../agent/proxy/hbone";
import { formatAddress } from "../../../agent/proxy/tcp";
import { invariant, type FuzzTarget } from "../runner";
import { YAML_INPUT_MS, YAML_MAX_BYTES } from "./manifests";

/** Tells whether `error` is an AgentError with `code`. */
export function isAgentError(error: unknown, code: string): boolean {
  return error instanceof AgentError && error.code === code;
}

/** Checks that a parsed authority names a valid address and formats to text that parses back to it. */
function checkAuthority(authority: Authority, input: string): void {
  invariant(net.isIP(authority.ip) !== 0, () => `${JSON.stringify(input)} parsed to the invalid IP ${JSON.stringify(authority.ip)}`);
  invariant(Number.isInteger(authority.port) && authority.port >= 1 && authority.port <= 65535, () => `${JSON.stringify(input)} parsed to port ${authority.port}`);
  const again = parseAuthority(formatAddress(authority.ip, authority.port));
  invariant(isDeepStrictEqual(again, authority), () => `${JSON.stringify(input)} parsed to ${JSON.stringify(authority)}, which formats to an authority that parses to ${JSON.stringify(again)}`);
}

const ADDRESS_TOKENS = ["[", "]", ":", "::", ".", "::ffff:", "%", "%eth0", "0", "65535", "65536", "255", "256", "1.2.3.4", "fe80::1", "\u0000", "\u00a0", "\uff10"];

export const hboneAuthority: FuzzTarget = {
  name: "hbone-authority",
  tokens: ADDRESS_TOKENS,
  maxBytes: 1024,
  run(input) {
    const text = input.toString("utf8");
    checkAuthority(parseAuthority(text), text);
  },
  expected: (error) => isAgentError(error, "BAD_REQUEST"),
};

/** A DNS name as parseForwardedHost accepts it: lowercase labels of at most 63 characters, 253 in all. */
const DNS_NAME = /^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/;

export const hboneForwarded: FuzzTarget = {
  name: "hbone-forwarded",
  tokens: [...ADDRESS_TOKENS, "for=", 'for="', "host=", 'host="', ";", ",", " ", '"', "\\", "FOR=", "Host="],
  maxBytes: 4096,
  run(input) {
    // Lines stand for repeated header fields, which Node hands over as an array.
    const text = input.toString("utf8");
    const header = text.includes("\n") ? text.split("\n") : text;
    const source = parseForwardedFor(header);
    if (source !== undefined) checkAuthority(source, text);
    const host = parseForwardedHost(header);
    if (host !== undefined) invariant(DNS_NAME.test(host), () => `${JSON.stringify(text)} gave the host ${JSON.stringify(host)}, which is not a lowercase DNS name`);
  },
  // Neither parser throws: a bad header reads as absent.
  expected: () => false,
};

/** Builds a Pod manifest with the given label values, as a hostile manifest file or API object carries them. */
function podManifest(labels: Record<string, string>): Buffer {
  return Buffer.from(JSON.stringify({ apiVersion: "v1", kind: "Pod", metadata: { name: "web", namespace: "demo", labels }, status: { podIP: "10.0.0.5" } }));
}

const LABEL_KEYS = ["app", "app.kubernetes.io/name", "service.istio.io/canonical-name", "version", "app.kubernetes.io/version", "service.istio.io/canonical-revision"];

export const hboneBaggage: FuzzTarget = {
  name: "hbone-baggage",
  inputMs: YAML_INPUT_MS,
  tokens: ["\\ud800", "\\udc00", "\\u0000", "%", ",", "=", ";", "\\n", " ", "app: ", "version: ", '"'],
  maxBytes: YAML_MAX_BYTES,
  arbitraries: [fc.dictionary(fc.constantFrom(...LABEL_KEYS), fc.string({ unit: "binary", maxLength: 40 })).map(podManifest)],
  run(input) {
    const result = parseManifests("fuzz.yaml", input.toString("utf8"));
    for (const object of result.objects) {
      if (object.kind !== "Pod") continue;
      const workload = object.value;
      const cluster = workload.labels["app"] ?? "Kubernetes";
      const baggage = buildBaggage(workload, cluster);
      checkBaggage(baggage, [cluster, workload.namespace, workload.name]);
    }
  },
  expected: () => false,
};

/** Checks that a baggage header has its five members and decodes back to the values it was built from. */
function checkBaggage(baggage: string, values: string[]): void {
  const members = baggage.split(",");
  invariant(members.length === 5, () => `the baggage ${JSON.stringify(baggage)} has ${members.length} members, not 5`);
  const decoded = members.map((member) => {
    const [key, value, ...rest] = member.split("=");
    invariant(rest.length === 0 && /^[a-z0-9.]+$/.test(key), () => `the baggage member ${JSON.stringify(member)} is not key=value`);
    return decodeURIComponent(value);
  });
  values.forEach((value, index) => {
    // Lone surrogates cannot be percent-encoded, so they arrive as U+FFFD.
    const expected = value.replace(/\p{Cs}/gu, "\ufffd");
    invariant(decoded[index] === expected, () => `the baggage member ${index} decodes to ${JSON.stringify(decoded[index])}, not ${JSON.stringify(expected)}`);
  });
}
