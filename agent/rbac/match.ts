// The shapes of a compiled AuthorizationPolicy rule and of the connection facts it is matched
// against, shared by the compiler (compile.ts) and the prefilter (prefilter.ts).

import type { Identity } from "../state/types";

/** The connection attributes the matcher reads, prepared once per authorization. */
export interface MatchContext {
  identity?: Identity;
  /** "<trust domain>/ns/<namespace>/sa/<service account>", the SPIFFE id without "spiffe://". */
  principal?: string;
  sourceIp: string;
  /** True when the source address is unknown (diagnostics only): a match that checks it fails. */
  sourceIpUnknown: boolean;
  destinationIp: string;
  destinationPort: number;
  /** sourceIp parsed on the first CIDR check; null when it is not an IP address. Start with undefined. */
  sourceAddress: Address | null | undefined;
  /** destinationIp parsed on the first CIDR check; null when it is not an IP address. Start with undefined. */
  destinationAddress: Address | null | undefined;
}

/** An IP address as an unsigned 32-bit number (IPv4, also IPv4-mapped IPv6) or a 128-bit bigint (IPv6). */
export type Address = { family: 4; value: number } | { family: 6; value: bigint };

/** A CIDR prepared for matching: an address is inside when its masked value equals `network`. */
export type CidrMatcher = { family: 4; network: number; mask: number } | { family: 6; network: bigint; mask: bigint };

/** A principal, namespace or trust domain pattern: "*" (any non-empty value), "*suffix", "prefix*" or exact. */
export interface StringPattern {
  kind: "any" | "suffix" | "prefix" | "exact";
  text: string;
}

/** A serviceAccounts entry with its namespace resolved. */
export interface ServiceAccountRef {
  namespace: string;
  name: string;
}

/**
 * One field check: some value must match, or none may when `negate` is set (a not* field). Checks
 * are data rather than closures, so that one function with a switch runs all of them: V8 then
 * keeps a single call target instead of one per field.
 */
export type Check =
  | { field: "principal" | "namespace" | "trustDomain"; negate: boolean; values: readonly StringPattern[] }
  | { field: "serviceAccount"; negate: boolean; values: readonly ServiceAccountRef[] }
  | { field: "sourceIp" | "destinationIp"; negate: boolean; values: readonly CidrMatcher[] }
  | { field: "port"; negate: boolean; values: readonly number[] };

/** A conjunction of field checks; an empty list never matches. */
export type Match = Check[];

/** A disjunction of matches. */
export type Clause = Match[];

/** A conjunction of clauses; an empty list matches every connection (`rules: [{}]`). */
export type Clauses = Clause[];
