// The limit options of `ambient-agent run`. agent/proxy/limits.ts parses them and docs/limits.md
// describes what each limit does when it is reached.

import { DEFAULT_LIMITS } from "../proxy/limits";

/** The help text of the limit options, for the usage of `ambient-agent run`. */
export const LIMIT_USAGE = `  --max-connections-per-pod N
                       open proxied connections per enrolled pod as a source (15001), and
                       separately as a destination (15006 and HBONE streams together); more are
                       refused (default ${DEFAULT_LIMITS.maxConnectionsPerPod})
  --max-connections-per-peer N
                       open TCP connections from one remote IP to one pod's 15008, and separately to
                       its 15006 (default ${DEFAULT_LIMITS.maxConnectionsPerPeer})
  --max-streams-per-connection N
                       concurrent CONNECT streams per HBONE connection (default ${DEFAULT_LIMITS.maxStreamsPerConnection})
  --max-streams-per-peer N
                       open CONNECT streams from one peer identity to one pod, over all its
                       connections (default ${DEFAULT_LIMITS.maxStreamsPerPeer})
  --max-header-list-size BYTES
                       largest header list of an HBONE request, in bytes or with a unit KiB, MiB or
                       GiB, at most 4294967295 bytes (default ${DEFAULT_LIMITS.maxHeaderListBytes})
  --handshake-timeout SECONDS
                       time from accepting an HBONE connection to its first CONNECT request,
                       TLS handshake included (default ${DEFAULT_LIMITS.handshakeTimeoutMs / 1000})
  --idle-timeout SECONDS
                       a proxied connection with no byte in either direction for this long is
                       closed, and an HBONE connection with no stream (default ${DEFAULT_LIMITS.idleTimeoutMs / 1000}; 0 turns it off)
  --max-buffered-bytes BYTES
                       bytes the proxies of the node have read and not yet written; while above it,
                       new connections are refused (default 256MiB; units KiB, MiB, GiB)
`;

/** The limit options in node:util parseArgs form. Each takes a string that parseLimitFlags checks. */
export const LIMIT_FLAGS = {
  "max-connections-per-pod": { type: "string" },
  "max-connections-per-peer": { type: "string" },
  "max-streams-per-connection": { type: "string" },
  "max-streams-per-peer": { type: "string" },
  "max-header-list-size": { type: "string" },
  "handshake-timeout": { type: "string" },
  "idle-timeout": { type: "string" },
  "max-buffered-bytes": { type: "string" },
} as const;
