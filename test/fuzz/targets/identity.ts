// Fuzz targets of peer identities: SPIFFE ids, and the subjectAltName text that Node builds from
// a peer certificate, whose URI values a remote agent or its CA chose.

import fc from "fast-check";
import { formatSpiffeId, parseSpiffeId } from "../../../agent/identity/spiffe";
import { uriSubjectAltNames } from "../../../agent/identity/verify";
import { identityFromSubjectAltName } from "../../../agent/proxy/hbone";
import { invariant, type FuzzTarget } from "../runner";
import { isAgentError } from "./hbone";

const SPIFFE_TOKENS = ["spiffe://", "/", "/ns/", "/sa/", ".", "..", "%2F", "?", "#", "@", ":", "SPIFFE://", "\u0000", "\u212a"];

export const spiffeId: FuzzTarget = {
  name: "spiffe-id",
  tokens: SPIFFE_TOKENS,
  maxBytes: 2048,
  run(input) {
    const text = input.toString("utf8");
    const identity = parseSpiffeId(text);
    const formatted = formatSpiffeId(identity);
    invariant(formatted === text, () => `${JSON.stringify(text)} parsed to an identity that formats to ${JSON.stringify(formatted)}`);
  },
  expected: (error) => isAgentError(error, "IDENTITY_ERROR"),
};

/** subjectAltName text as Node's X509Certificate formats it: entries joined by ", ", a value with a comma or quote as a JSON string. */
function subjectAltName(entries: [string, string][]): Buffer {
  const text = entries.map(([kind, value]) => `${kind}:${/[,"]/.test(value) ? JSON.stringify(value) : value}`).join(", ");
  return Buffer.from(text, "utf8");
}

export const certificateSan: FuzzTarget = {
  name: "certificate-san",
  tokens: [...SPIFFE_TOKENS, "URI:", "DNS:", "IP Address:", ", ", '"', '\\"', "\\\\", "\\u0022", "\\x"],
  maxBytes: 4096,
  arbitraries: [
    fc
      .array(fc.tuple(fc.constantFrom("URI", "DNS", "email", "IP Address"), fc.oneof(fc.string({ unit: "binary", maxLength: 60 }), fc.constant("spiffe://td/ns/a/sa/b"))), { maxLength: 4 })
      .map(subjectAltName),
  ],
  run(input) {
    const text = input.toString("utf8");
    const uris = uriSubjectAltNames(text);
    const identity = identityFromSubjectAltName(text);
    if (identity === undefined) return;
    const formatted = formatSpiffeId(identity);
    invariant(uris.includes(formatted), () => `${JSON.stringify(text)} gave the identity ${formatted}, which is not one of its URIs ${JSON.stringify(uris)}`);
  },
  // The readers return what they find and never throw.
  expected: () => false,
};
