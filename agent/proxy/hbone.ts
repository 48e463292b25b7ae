// HBONE wire facts: ports, HTTP/2 settings, the CONNECT request headers, and the peer identity of a
// TLS connection. HBONE is HTTP/2 CONNECT over mutual TLS 1.3 between the source and destination nodes.

import crypto from "node:crypto";
import net from "node:net";
import type http2 from "node:http2";
import type tls from "node:tls";
import { AgentError } from "../errors";
import { parseSpiffeId } from "../identity/spiffe";
import { uriSubjectAltNames } from "../identity/verify";
import type { Identity, Workload } from "../state/types";
import { formatAddress } from "./tcp";

/** Outbound capture: the pod's own connections are steered here. */
export const OUTBOUND_PORT = 15001;
/** Inbound plaintext: connections from outside the mesh. */
export const INBOUND_PLAINTEXT_PORT = 15006;
/** Inbound HBONE: mTLS + HTTP/2 CONNECT from other nodes. */
export const HBONE_PORT = 15008;
/** Target ports a CONNECT may not ask for, so that a tunnel cannot loop back into the proxy. */
export const PROXY_PORTS: ReadonlySet<number> = new Set([OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT]);

/** Both sides give up on an upstream TCP connect after this long, as ztunnel does. */
export const CONNECT_TIMEOUT_MS = 10_000;

/** Per-stream receive window. */
export const STREAM_WINDOW_BYTES = 1 << 20;
/**
 * Per-connection receive window. It must exceed the stream window, or two streams read in opposite
 * order can each wait for the other's window update.
 */
export const CONNECTION_WINDOW_BYTES = 16 << 20;
/** Largest DATA frame the peer may send; 64 KiB with the windows above gave full loopback throughput on Node 20. */
export const MAX_FRAME_BYTES = 64 << 10;
/** Streams a server accepts at once on one HBONE connection, unless --max-streams-per-connection sets another value. */
export const SERVER_MAX_CONCURRENT_STREAMS = 200;
/**
 * Node's per-session memory limit in MB: past it, Node rejects new streams on the session. It counts
 * queued outgoing data among other things, and its default of 10 MB is less than one connection window.
 */
export const MAX_SESSION_MEMORY_MB = 64;

/** HTTP/2 SETTINGS sent by the HBONE client. */
export const CLIENT_SETTINGS: http2.Settings = {
  enablePush: false,
  initialWindowSize: STREAM_WINDOW_BYTES,
  maxFrameSize: MAX_FRAME_BYTES,
  maxHeaderListSize: 16 << 10,
};

/**
 * HTTP/2 SETTINGS sent by the HBONE server. The inbound server replaces maxConcurrentStreams and
 * maxHeaderListSize with its limits (--max-streams-per-connection, --max-header-list-size).
 */
export const SERVER_SETTINGS: http2.Settings = {
  initialWindowSize: STREAM_WINDOW_BYTES,
  maxFrameSize: MAX_FRAME_BYTES,
  maxConcurrentStreams: SERVER_MAX_CONCURRENT_STREAMS,
  maxHeaderListSize: 16 << 10,
};

/**
 * Invalid frames (frames on closed or idle streams, bad lengths) a client may send on one HBONE
 * connection before Node closes it; Node's default is 1000. An HBONE client sends none but for
 * races with a reset stream.
 */
export const MAX_SESSION_INVALID_FRAMES = 100;
/** Streams that Node refuses on creation (session memory, concurrency) before it closes the connection; Node's default too. */
export const MAX_SESSION_REJECTED_STREAMS = 100;

/** The target of a CONNECT request. */
export interface Authority {
  ip: string;
  port: number;
}

export interface ConnectRequest {
  /** The tunnel's target: the destination pod's IP and target port. */
  destination: Authority;
  /** The client's address inside the source pod, sent in `forwarded`. */
  source: Authority;
  /** The source workload, described in `baggage`. */
  workload: Workload;
  /** Cluster name for `baggage`; "Kubernetes" when absent, as Istio defaults it. */
  cluster?: string;
  /** A W3C traceparent to continue; a new one is made when absent. */
  traceparent?: string;
  /**
   * The hostname (name.namespace.svc.cluster.local) of the Service whose VIP the client dialled,
   * sent as `host` in `forwarded` so that the destination can name the Service in its metrics.
   */
  serviceHost?: string;
}

/** Builds the HTTP/2 CONNECT headers of an HBONE request. */
export function buildConnectHeaders(request: ConnectRequest): http2.OutgoingHttpHeaders {
  return {
    ":method": "CONNECT",
    ":authority": formatAddress(request.destination.ip, request.destination.port),
    forwarded: buildForwarded(request.source, request.serviceHost),
    baggage: buildBaggage(request.workload, request.cluster ?? "Kubernetes"),
    traceparent: request.traceparent ?? newTraceparent(),
  };
}

/** Builds the `forwarded` header as ztunnel does: for="ip:port", then ;host=HOSTNAME when the client dialled a Service. */
export function buildForwarded(source: Authority, serviceHost?: string): string {
  const forwarded = `for="${formatAddress(source.ip, source.port)}"`;
  return serviceHost === undefined ? forwarded : `${forwarded};host=${serviceHost}`;
}

/**
 * Builds the W3C baggage that describes the source workload: cluster, namespace, pod, and the
 * canonical service name and revision taken from the usual Kubernetes and Istio labels.
 */
export function buildBaggage(workload: Workload, cluster: string): string {
  const labels = workload.labels;
  const serviceName =
    labels["service.istio.io/canonical-name"] ?? labels["app.kubernetes.io/name"] ?? labels["app"] ?? workload.name;
  const serviceVersion =
    labels["service.istio.io/canonical-revision"] ?? labels["app.kubernetes.io/version"] ?? labels["version"] ?? "latest";
  const entries: [string, string][] = [
    ["k8s.cluster.name", cluster],
    ["k8s.namespace.name", workload.namespace],
    ["k8s.pod.name", workload.name],
    ["service.name", serviceName],
    ["service.version", serviceVersion],
  ];
  // encodeURIComponent throws on a lone UTF-16 surrogate, which a label value in a manifest can carry.
  return entries.map(([key, value]) => `${key}=${encodeURIComponent(value.replace(LONE_SURROGATE, "\ufffd"))}`).join(",");
}

/** A UTF-16 surrogate that is not half of a pair: with the u flag, a pair is one code point and never matches. */
const LONE_SURROGATE = /\p{Cs}/gu;

/** Random bytes for trace ids, filled 256 ids at a time: two randomBytes() calls per CONNECT were 3% of the proxies' CPU on loopback. */
const TRACE_ID_POOL = Buffer.alloc(24 * 256);
let traceIdPoolOffset = TRACE_ID_POOL.length;

/** A new W3C traceparent: version 00, random trace and parent ids, flags 00 (not sampled). */
export function newTraceparent(): string {
  if (traceIdPoolOffset === TRACE_ID_POOL.length) {
    crypto.randomFillSync(TRACE_ID_POOL);
    traceIdPoolOffset = 0;
  }
  const start = traceIdPoolOffset;
  traceIdPoolOffset += 24;
  return `00-${TRACE_ID_POOL.toString("hex", start, start + 16)}-${TRACE_ID_POOL.toString("hex", start + 16, start + 24)}-00`;
}

/** Parses a CONNECT `:authority` of the form ip:port or [ipv6]:port; throws AgentError BAD_REQUEST otherwise. */
export function parseAuthority(authority: string | undefined): Authority {
  // The port has no leading zero, and an IPv4-mapped IPv6 address is not accepted in place of the IPv4 form.
  const match = authority === undefined ? null : /^(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([1-9]\d{0,4})$/.exec(authority);
  const ip = match?.[1] ?? match?.[2];
  const port = match ? Number(match[3]) : NaN;
  const mapped = match?.[1] !== undefined && /^::ffff:/i.test(match[1]);
  const validIp = ip !== undefined && !mapped && (match?.[1] !== undefined ? net.isIPv6(ip) : net.isIPv4(ip));
  if (!validIp || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new AgentError(
      "BAD_REQUEST",
      `invalid CONNECT authority ${JSON.stringify(authority ?? null)}: expected <pod ip>:<port> with IPv6 in brackets`,
    );
  }
  return { ip: ip!, port };
}

/** Parses the `for` address of a `forwarded: for="ip:port"` header; undefined when absent or invalid. */
export function parseForwardedFor(header: string | string[] | undefined): Authority | undefined {
  const value = Array.isArray(header) ? header[0] : header;
  const match = value === undefined ? null : /(?:^|[;,\s])for="?([^";,]+)"?/i.exec(value);
  if (!match) {
    return undefined;
  }
  try {
    return parseAuthority(match[1]);
  } catch {
    return undefined;
  }
}

/** Longest `forwarded` header whose `host` is read; a longer one is ignored, because the client chooses it. */
export const MAX_FORWARDED_CHARS = 512;
/** A DNS name of at most 253 characters: labels of letters, digits and inner hyphens, 63 characters each at most. */
const DNS_NAME = /^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/;

/**
 * Returns the `host` parameter of the first element of a `forwarded` header (RFC 7239), quoted or
 * not, in lower case. Undefined when the header is absent, longer than MAX_FORWARDED_CHARS, has no
 * host, or the host is not a DNS name. The value comes from the client, so callers must accept it
 * only when it names one of a bounded set of Services.
 */
export function parseForwardedHost(header: string | string[] | undefined): string | undefined {
  const value = Array.isArray(header) ? header[0] : header;
  if (value === undefined || value.length > MAX_FORWARDED_CHARS) return undefined;
  const element = value.split(",", 1)[0];
  for (const pair of element.split(";")) {
    const equals = pair.indexOf("=");
    if (equals < 0 || pair.slice(0, equals).trim().toLowerCase() !== "host") continue;
    let host = pair.slice(equals + 1).trim();
    if (host.length >= 2 && host.startsWith('"') && host.endsWith('"')) host = host.slice(1, -1);
    host = host.toLowerCase();
    return DNS_NAME.test(host) ? host : undefined;
  }
  return undefined;
}

/** Returns the identity a TLS peer proved: the first URI SAN of its certificate that is a SPIFFE id. */
export function peerIdentityOf(socket: tls.TLSSocket): Identity | undefined {
  const certificate = socket.getPeerX509Certificate();
  return certificate ? identityFromSubjectAltName(certificate.subjectAltName) : undefined;
}

/** Reads the first SPIFFE URI from Node's subjectAltName text ("URI:spiffe://..., DNS:..."). */
export function identityFromSubjectAltName(subjectAltName: string | undefined): Identity | undefined {
  for (const uri of uriSubjectAltNames(subjectAltName)) {
    try {
      return parseSpiffeId(uri);
    } catch {
      // Not a SPIFFE id: try the next URI.
    }
  }
  return undefined;
}
