// One registry of error codes. Each code is stable (it appears in audit records and logs),
// and maps to the HBONE status of the inbound side's response and to a response flag.

export interface ErrorSpec {
  /** HTTP status for an HBONE CONNECT that fails this way, when the error can happen there. */
  status?: number;
  /** Response flag in audit records, in the style of ztunnel's access log. */
  flag: string;
  description: string;
}

export const ERROR_CODES = {
  BAD_REQUEST: { status: 400, flag: "CONNECT", description: "CONNECT request with a bad method or :authority" },
  AUTHORITY_MISMATCH: { status: 400, flag: "CONNECT", description: ":authority IP differs from the address the tunnel arrived on" },
  POLICY_DENIED: { status: 401, flag: "DENY", description: "an AuthorizationPolicy denied the connection" },
  MTLS_REQUIRED: { flag: "DENY", description: "a plaintext connection reached a port where PeerAuthentication is STRICT" },
  POLICY_CHANGED: { flag: "DENY", description: "a policy or workload change no longer allows an open connection, so it was closed" },
  UNKNOWN_DESTINATION: { status: 503, flag: "NO_ROUTE", description: "no local workload has the requested address" },
  NO_HEALTHY_ENDPOINT: { flag: "NO_ROUTE", description: "the Service dialled has no ready endpoint serving the port, or does not expose the port" },
  PROXY_PORT: { status: 503, flag: "NO_ROUTE", description: "the requested port is one of the proxy ports 15001, 15006, 15008" },
  UPSTREAM_CONNECT_FAILED: { status: 503, flag: "CONNECT", description: "the connection to the application failed or timed out" },
  TLS_FAILURE: { flag: "TLS_FAILURE", description: "the TLS handshake failed" },
  IDENTITY_ERROR: { flag: "IDENTITY_ERROR", description: "the peer certificate did not carry the expected SPIFFE identity" },
  NO_PEER_CERTIFICATE: { flag: "TLS_FAILURE", description: "the peer presented no certificate in the mutual TLS handshake" },
  CERT_EXPIRED: { flag: "TLS_FAILURE", description: "a certificate of the peer's chain has expired" },
  CERT_NOT_YET_VALID: { flag: "TLS_FAILURE", description: "a certificate of the peer's chain is not valid yet" },
  UNKNOWN_ROOT: { flag: "TLS_FAILURE", description: "the peer's certificate chains to none of the trusted roots" },
  NO_SPIFFE_SAN: { flag: "IDENTITY_ERROR", description: "the peer's certificate has no spiffe:// URI SAN" },
  MALFORMED_SPIFFE_ID: { flag: "IDENTITY_ERROR", description: "the peer's certificate has spiffe:// URI SANs but none parses as a SPIFFE id" },
  WRONG_TRUST_DOMAIN: { flag: "IDENTITY_ERROR", description: "the client's SPIFFE id is in a trust domain that the server does not accept" },
  TRUST_BUNDLE_ERROR: { flag: "INTERNAL", description: "a source of trusted roots (the CA's roots or the trust bundle file) is missing or invalid" },
  TUNNEL_REJECTED: { flag: "CONNECT", description: "the destination ztunnel responded to the CONNECT with a status other than 200" },
  TUNNEL_TIMEOUT: { flag: "CONNECT", description: "the destination ztunnel sent no response to the CONNECT within its deadline" },
  NO_ORIGINAL_DESTINATION: { flag: "NO_ROUTE", description: "no original destination was recorded for a captured connection" },
  NO_CERTIFICATE: { flag: "IDENTITY_ERROR", description: "no workload certificate could be issued" },
  STREAM_RESET: { flag: "RESET", description: "the peer reset the connection" },
  IDLE_TIMEOUT: { flag: "IDLE_TIMEOUT", description: "no byte passed in either direction for the idle timeout (--idle-timeout), so the agent closed the connection" },
  DRAIN_TIMEOUT: { flag: "RESET", description: "the agent stopped and the connection was still open when its drain deadline passed" },
  AGENT_INTERRUPTED: { flag: "RESET", description: "the agent process ended without closing the connection (killed or crashed); recorded at the next start" },
  CA_ERROR: { flag: "INTERNAL", description: "the embedded CA folder is missing, invalid or already initialized" },
  CA_UNAVAILABLE: { flag: "IDENTITY_ERROR", description: "Istio's CA could not be reached, failed its TLS check or did not respond in time, or its address or root certificate file is invalid" },
  CA_REJECTED: { flag: "IDENTITY_ERROR", description: "Istio's CA rejected the certificate request, the service-account token file is missing or empty, or the CA's response failed validation" },
  INVALID_ANNOTATION: { flag: "INTERNAL", description: "a pod annotation that the agent reads has an invalid value" },
  INVALID_QUERY: { flag: "INTERNAL", description: "a diagnostics query (agentctl authz, the admin API) has a missing or malformed source, destination or pod" },
  UNKNOWN_WORKLOAD: { flag: "INTERNAL", description: "a diagnostics query names a pod that the mesh state does not contain" },
  INVALID_AUDIT_SINK: { flag: "INTERNAL", description: "an audit sink's settings are invalid, such as a syslog facility, host name or SD-ID outside RFC 5424's limits" },
  AUDIT_SINK_FAILED: { flag: "INTERNAL", description: "an audit sink could not deliver a batch: its destination was unreachable, closed the connection, or did not acknowledge in time" },
  INVALID_KUBECONFIG: { flag: "INTERNAL", description: "the kubeconfig file or the in-cluster configuration is missing, unreadable or names no API server" },
  CNI_ERROR: { flag: "INTERNAL", description: "a CNI request for a new pod failed: the pod is unknown, or its capture could not be put in place" },
  INVALID_CNI_REQUEST: { flag: "INTERNAL", description: "a request from the CNI plugin is malformed: an unknown command, a relative netns path, a missing variable, invalid JSON, or over a size limit" },
  CNI_SETUP_FAILED: { flag: "INTERNAL", description: "the agent could not install its CNI plugin: the CNI configuration or bin folder is missing or not writable, or another agent serves the CNI socket" },
  INTERNAL: { flag: "INTERNAL", description: "an unexpected error inside the agent" },
} as const satisfies Record<string, ErrorSpec>;

export type ErrorCode = keyof typeof ERROR_CODES;

/** An error with a registered code. Its message names what failed, on which value, and what to check. */
export class AgentError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "AgentError";
    this.code = code;
  }

  get status(): number | undefined {
    const spec: ErrorSpec = ERROR_CODES[this.code];
    return spec.status;
  }

  get flag(): string {
    return ERROR_CODES[this.code].flag;
  }
}

/** Returns the registered code of any thrown value, INTERNAL for unknown errors. */
export function errorCodeOf(error: unknown): ErrorCode {
  return error instanceof AgentError ? error.code : "INTERNAL";
}
