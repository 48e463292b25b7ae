// Answers an operator's questions from one mesh state, with the evaluator the proxies use: may
// this source reach that destination and why, which policies apply to a pod, and which policies
// are enforced, only partly enforced or rejected. Pure: no I/O, so `agentctl authz` and the admin
// API return what a real connection would get from the same state.

import net from "node:net";
import { enrollmentDecision, isAmbient } from "../enroll/enrollment";
import { EXCLUDE_INBOUND_PORTS_ANNOTATION, excludedPortsOf } from "../enroll/excluded-ports";
import { formatSpiffeId, identityOf } from "../identity/spiffe";
import { serviceEndpoints } from "../state/endpoints";
import { canonicalIp } from "../state/ip";
import { DEFAULT_ROOT_NAMESPACE, type MeshState } from "../state/mesh-state";
import type { AuthorizationPolicy, Identity, Labels, Workload } from "../state/types";
import { authorizerFor, type AuthorizationSettings } from "./authorize";
import { findWorkload, invalidQuery, parseDestinationQuery, parseSourceQuery, type DestinationQuery, type SourceQuery } from "./authz-query";
import { compilePolicy } from "./compile";
import type { MtlsRequirement, PeerAuthenticationScopes } from "./peer-authentication";
import { peerAuthenticationRef, type PeerAuthenticationRef } from "./policy-report";
import type { AuthorizationReason, AuthorizationResult } from "./types";
import { policyStatus } from "./warnings";

export { findWorkload, parseDestinationQuery, parseSourceQuery, type DestinationQuery, type SourceQuery } from "./authz-query";
export {
  policyMessages,
  policyStatuses,
  type AuthorizationPolicyStatus,
  type PeerAuthenticationRef,
  type PeerAuthenticationStatus,
  type PolicyMessage,
  type PolicyStatusReport,
  type RejectedPolicy,
} from "./policy-report";

/** The agent's own ports: an HBONE request with one of them as its target port is rejected with 503. */
const PROXY_PORTS: readonly number[] = [15001, 15006, 15008];

/**
 * Why a check came out as it did: the evaluator's reasons, plus
 * - not_enrolled: the destination pod is not in ambient mode, so no agent enforces policy for it;
 * - unknown_destination: no pod or Service of the mesh state has the address;
 * - no_service_port, no_healthy_endpoint: a Service cluster IP with nowhere to send the connection;
 * - proxy_port: the target port is one of the agent's ports 15001, 15006, 15008;
 * - port_excluded: the pod's traffic.sidecar.istio.io/excludeInboundPorts annotation takes the port
 *   out of inbound capture, so its connections never reach an agent;
 * - wrong_trust_domain: the peer's trust domain is not accepted, so the mutual TLS handshake fails.
 */
export type CheckReason =
  | AuthorizationReason
  | "not_enrolled"
  | "unknown_destination"
  | "no_service_port"
  | "no_healthy_endpoint"
  | "proxy_port"
  | "port_excluded"
  | "wrong_trust_domain";

/** The source of a check, resolved against the mesh state. */
export interface CheckSource {
  /** The text the caller passed. */
  query: string;
  kind: SourceQuery["kind"];
  /** hbone: the connection arrives through a tunnel with a peer identity; plaintext: without one. */
  transport: "hbone" | "plaintext";
  /** SPIFFE URI of the peer identity; absent for plaintext. */
  identity?: string;
  /** "namespace/name" of the source pod, when the source is a pod. */
  workload?: string;
  /** Source IP; absent when the caller gave an identity only. */
  ip?: string;
}

/** The decision on a connection to one destination port. */
export interface PortDecision {
  /** "namespace/name" of the destination pod; absent when no pod has the address. */
  workload?: string;
  /** "namespace/name" of the Service whose cluster IP was dialled. */
  service?: string;
  /** The Service port that was dialled, for a Service cluster IP. */
  servicePort?: number;
  /** Destination IP at the inbound side: the pod's IP. */
  ip: string;
  /** Target (container) port; "other" stands for every port that no applicable policy names. */
  port: number | "other";
  decision: AuthorizationResult["decision"];
  reason: CheckReason;
  /** Whether an agent enforces policy on this connection: false when the destination is outside the mesh. */
  enforced: boolean;
  policy?: string;
  policyKind?: AuthorizationResult["policyKind"];
  rule?: number;
  dryRun: AuthorizationResult["dryRun"];
  /** The PeerAuthentication mode for the port; absent when the destination is outside the mesh. */
  mtls?: MtlsRequirement;
  /** One line for an operator: the decision and what decided it. */
  explanation: string;
}

export interface AccessCheck {
  source: CheckSource;
  /** The text the caller passed as the destination. */
  destination: string;
  results: PortDecision[];
  /** Facts that limit the result, such as a source IP that the check could not know. */
  notes: string[];
}

/**
 * Decides whether `from` may reach `to`, with the evaluator and state the proxies use. Without a
 * port, every port that the applicable policies name is checked, plus one stand-in for all others.
 */
export function checkAccess(state: MeshState, settings: AuthorizationSettings, from: string, to: string): AccessCheck {
  const sourceQuery = parseSourceQuery(from);
  const destinationQuery = parseDestinationQuery(to);
  const notes: string[] = [];
  const { source, identity } = resolveSource(state, settings, sourceQuery, from, notes);
  const targets = resolveDestination(state, destinationQuery, to);
  const results = targets.flatMap((target) => decideTarget(state, settings, source, identity, target, notes));
  const hint = bareIpv6Hint(state, to, targets);
  if (hint !== undefined) notes.push(hint);
  return { source, destination: to, results, notes: [...new Set(notes)] };
}

// ---- sources ---------------------------------------------------------------------------------

function resolveSource(
  state: MeshState,
  settings: AuthorizationSettings,
  query: SourceQuery,
  text: string,
  notes: string[],
): { source: CheckSource; identity?: Identity } {
  switch (query.kind) {
    case "identity":
      notes.push("the source is an identity with no IP: rules on source IPs (ipBlocks, notIpBlocks, source.ip) are checked as not matching");
      return { source: { query: text, kind: "identity", transport: "hbone", identity: formatSpiffeId(query.identity) }, identity: query.identity };
    case "ip": {
      const workload = state.workloadByIp(query.ip);
      if (workload !== undefined && isAmbient(state, workload, settings.enrollment)) {
        notes.push(`${query.ip} is the IP of the enrolled pod ${workload.uid}, whose connections carry its identity; pass --from ${workload.uid} to check those`);
      }
      return { source: { query: text, kind: "ip", transport: "plaintext", ip: query.ip, ...(workload && { workload: workload.uid }) } };
    }
    case "pod": {
      const workload = findWorkload(state, query.uid);
      const ip = workload.ip === "" ? undefined : workload.ip;
      if (ip === undefined) notes.push(`pod ${workload.uid} has no IP yet: rules on source IPs are checked as not matching`);
      if (!isAmbient(state, workload, settings.enrollment)) {
        notes.push(`pod ${workload.uid} is not enrolled (${notEnrolledReason(state, workload, settings)}): it connects in plaintext, with no identity`);
        return { source: { query: text, kind: "pod", transport: "plaintext", workload: workload.uid, ...(ip && { ip }) } };
      }
      const identity = identityOf(workload, settings.trustDomain ?? "cluster.local");
      const source: CheckSource = { query: text, kind: "pod", transport: "hbone", identity: formatSpiffeId(identity), workload: workload.uid, ...(ip && { ip }) };
      return { source, identity };
    }
  }
}

// ---- destinations ----------------------------------------------------------------------------

/** One place a connection can end: a pod (with its target port, when known) or an address outside the mesh. */
type Target =
  | { kind: "workload"; workload: Workload; ip: string; port?: number; service?: string; servicePort?: number }
  | { kind: "outside"; ip: string; port?: number }
  | { kind: "unavailable"; ip: string; port: number; service: string; reason: "no_service_port" | "no_healthy_endpoint"; message: string };

function resolveDestination(state: MeshState, query: DestinationQuery, text: string): Target[] {
  if (query.kind === "pod") {
    const workload = findWorkload(state, query.uid);
    return [{ kind: "workload", workload, ip: workload.ip, port: query.port }];
  }
  const service = state.serviceByVip(query.ip);
  if (service !== undefined) {
    if (query.port === undefined) {
      const ports = service.ports.filter((port) => port.protocol === "TCP").map((port) => port.port);
      throw invalidQuery(`destination ${JSON.stringify(text)} is the cluster IP of Service ${service.uid}, which needs a port: write ${query.ip}:PORT with one of its TCP ports (${ports.join(", ") || "none"})`);
    }
    return serviceTargets(state, query.ip, query.port);
  }
  const workload = state.workloadByIp(query.ip);
  if (workload !== undefined) return [{ kind: "workload", workload, ip: query.ip, port: query.port }];
  return [{ kind: "outside", ip: query.ip, port: query.port }];
}

/**
 * Returns a note for a bare IPv6 destination that no pod or Service has: "fd00::10:8080" is read
 * as one address, and a port needs brackets. When the last group read as a port gives a known
 * address, the note names that reading.
 */
function bareIpv6Hint(state: MeshState, text: string, targets: readonly Target[]): string | undefined {
  const value = text.trim();
  if (!net.isIPv6(value) || targets.some((target) => target.kind !== "outside")) return undefined;
  const note = `${value} is read as the IPv6 address ${canonicalIp(value)}, which no pod or Service has; to give a port with an IPv6 address, write [ADDRESS]:PORT`;
  const colon = value.lastIndexOf(":");
  const head = value.slice(0, colon);
  const port = value.slice(colon + 1);
  if (!net.isIPv6(head) || !/^[0-9]{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535) return note;
  const ip = canonicalIp(head);
  if (state.workloadByIp(ip) === undefined && state.serviceByVip(ip) === undefined) return note;
  return `${note}, for example [${ip}]:${Number(port)}`;
}

/** Returns one target per ready endpoint of the Service port, as the outbound proxy would pick them. */
function serviceTargets(state: MeshState, vip: string, port: number): Target[] {
  const found = serviceEndpoints(state, vip, port)!;
  if (found.kind === "unavailable") {
    return [{ kind: "unavailable", ip: vip, port, service: found.service.uid, reason: found.reason, message: found.message }];
  }
  return found.endpoints.map((endpoint): Target => {
    // An EndpointSlice address that no known pod has is reached as plain TCP, like any address outside the mesh.
    if (endpoint.workload === undefined) return { kind: "outside", ip: endpoint.ip, port: endpoint.targetPort };
    return { kind: "workload", workload: endpoint.workload, ip: endpoint.ip, port: endpoint.targetPort, service: found.service.uid, servicePort: port };
  });
}

// ---- decisions -------------------------------------------------------------------------------

function decideTarget(
  state: MeshState,
  settings: AuthorizationSettings,
  source: CheckSource,
  identity: Identity | undefined,
  target: Target,
  notes: string[],
): PortDecision[] {
  if (target.kind === "unavailable") {
    const base = { service: target.service, servicePort: target.port, ip: target.ip, port: target.port, dryRun: [] };
    return [{ ...base, decision: "deny", reason: target.reason, enforced: true, explanation: `reset: ${target.message}` }];
  }
  if (target.kind === "outside") {
    const explanation = `not protected: no pod or Service in the mesh state has the address ${target.ip}, so the agent passes the connection through and enforces no policy`;
    return [{ ip: target.ip, port: target.port ?? "other", decision: "allow", reason: "unknown_destination", enforced: false, dryRun: [], explanation }];
  }

  const { workload } = target;
  const where = { workload: workload.uid, ...(target.service && { service: target.service, servicePort: target.servicePort }), ip: target.ip };
  if (!isAmbient(state, workload, settings.enrollment)) {
    const explanation = `not protected: pod ${workload.uid} is not enrolled (${notEnrolledReason(state, workload, settings)}), so no agent enforces policy on its connections`;
    return [{ ...where, port: target.port ?? "other", decision: "allow", reason: "not_enrolled", enforced: false, dryRun: [], explanation }];
  }

  const rootNamespace = settings.rootNamespace ?? DEFAULT_ROOT_NAMESPACE;
  const excluded = excludedInboundPorts(workload);
  let ports: (number | "other")[] = [];
  if (target.port !== undefined) {
    ports = [target.port];
  } else {
    const named = new Set([...policyPorts(state, workload, rootNamespace), ...excluded]);
    ports = [...[...named].sort((a, b) => a - b), "other"];
    notes.push(`no port given: checked every port that the policies of ${workload.uid} name, and "other" for all the rest`);
  }

  const authorizer = authorizerFor(state, workload, settings);
  const allowPolicies = state.policiesForWorkload(workload, rootNamespace).filter((policy) => policy.action === "ALLOW" && !policy.dryRun);
  const otherPort = standInPort(ports);
  return ports.map((port) => {
    if (port !== "other" && excluded.includes(port)) {
      const explanation = `not protected: the pod's ${EXCLUDE_INBOUND_PORTS_ANNOTATION} annotation excludes port ${port} from inbound capture, so connections to it reach the application directly, without mutual TLS, policy or audit`;
      return { ...where, port, decision: "allow", reason: "port_excluded", enforced: false, dryRun: [], explanation };
    }
    const evaluated = port === "other" ? otherPort : port;
    const mtls = authorizer.mtls(evaluated);
    const rejected = rejectedBeforePolicy(settings, identity, evaluated);
    if (rejected !== undefined) return { ...where, port, ...rejected, enforced: true, dryRun: [], mtls };
    const result = authorizer.evaluate({
      sourceIdentity: identity,
      sourceIp: source.ip ?? "",
      sourceIpUnknown: source.ip === undefined,
      destinationIp: target.ip,
      destinationPort: evaluated,
    });
    return { ...where, port, ...result, enforced: true, mtls, explanation: explainResult(result, workload, port, mtls, allowPolicies) };
  });
}

/** Returns the inbound ports that the pod's annotation excludes from capture; none when it is invalid, as the agent then excludes none. */
function excludedInboundPorts(workload: Workload): number[] {
  try {
    return excludedPortsOf(workload).inbound;
  } catch {
    return [];
  }
}

/** Returns the rejection that comes before policies are read: a proxy port, or a peer of a trust domain the server does not accept. */
function rejectedBeforePolicy(
  settings: AuthorizationSettings,
  identity: Identity | undefined,
  port: number,
): Pick<PortDecision, "decision" | "reason" | "explanation"> | undefined {
  if (PROXY_PORTS.includes(port)) {
    return { decision: "deny", reason: "proxy_port", explanation: `rejected: port ${port} is one of the agent's own ports (15001, 15006, 15008), which are never a target` };
  }
  const accepted = settings.trustDomain === undefined ? undefined : [settings.trustDomain, ...(settings.trustDomainAliases ?? [])];
  if (identity !== undefined && accepted !== undefined && !accepted.includes(identity.trustDomain)) {
    return {
      decision: "deny",
      reason: "wrong_trust_domain",
      explanation: `rejected: trust domain ${identity.trustDomain} is not accepted (accepted: ${accepted.join(", ")}), so the mutual TLS handshake fails before any policy is checked`,
    };
  }
  return undefined;
}

/** Explains an evaluator result. `port` is "other" for the stand-in port, whose number means nothing to the reader. */
function explainResult(result: AuthorizationResult, workload: Workload, port: number | "other", mtls: MtlsRequirement, allowPolicies: AuthorizationPolicy[]): string {
  let text: string;
  switch (result.reason) {
    case "mtls_required":
      text = `denied: PeerAuthentication ${result.policy} sets STRICT mutual TLS for ${port === "other" ? "other ports" : `port ${port}`}${mtls.scope === "port" ? " (portLevelMtls)" : ""}, and a plaintext connection has no peer identity`;
      break;
    case "denied_by_policy":
      text = `denied: rules[${result.rule}] of DENY policy ${result.policy} matches`;
      break;
    case "allowed_by_policy":
      text = `allowed: rules[${result.rule}] of ALLOW policy ${result.policy} matches`;
      break;
    case "no_policy":
      text = `allowed: no ALLOW policy applies to ${workload.uid} and no DENY policy matches`;
      break;
    case "no_allow_match":
      text = `denied: ALLOW policies apply to ${workload.uid} (${allowPolicies.map((policy) => policy.uid).join(", ")}) and none matches`;
      break;
  }
  for (const effect of result.dryRun) {
    const rule = effect.rule === undefined ? "" : ` rules[${effect.rule}]`;
    text += `; dry-run policy ${effect.policy}${rule} would ${effect.decision} it`;
  }
  return text;
}

/**
 * Lists the target ports that the policies of a workload name: rules' to.operation ports and
 * notPorts, destination.port conditions, and the portLevelMtls keys of its PeerAuthentication.
 */
export function policyPorts(state: MeshState, workload: Workload, rootNamespace = DEFAULT_ROOT_NAMESPACE): number[] {
  const ports = new Set<number>();
  const add = (values: readonly string[] | undefined) => {
    for (const value of values ?? []) {
      const port = /^[0-9]{1,5}$/.test(value) ? Number(value) : 0;
      if (port >= 1 && port <= 65535) ports.add(port);
    }
  };
  for (const policy of state.policiesForWorkload(workload, rootNamespace)) {
    for (const rule of policy.rules ?? []) {
      for (const entry of rule.to ?? []) {
        add(entry.operation.ports);
        add(entry.operation.notPorts);
      }
      for (const condition of rule.when ?? []) {
        if (condition.key !== "destination.port") continue;
        add(condition.values);
        add(condition.notValues);
      }
    }
  }
  const selected = state.peerAuthenticationsFor(workload, rootNamespace).workload;
  for (const port of Object.keys(selected?.portLevelMtls ?? {})) ports.add(Number(port));
  return [...ports].sort((a, b) => a - b);
}

/** Returns a port that no entry of `ports` names and that is no proxy port, to stand for "every other port". */
function standInPort(ports: readonly (number | "other")[]): number {
  let port = 1;
  while (ports.includes(port) || PROXY_PORTS.includes(port)) port++;
  return port;
}

function notEnrolledReason(state: MeshState, workload: Workload, settings: AuthorizationSettings): string {
  if (state.namespace(workload.namespace) === undefined) return `its namespace ${workload.namespace} is not in the mesh state`;
  return enrollmentDecision(state, workload, settings.enrollment).reason;
}

// ---- one workload ----------------------------------------------------------------------------

/** The origin of an applicable AuthorizationPolicy. */
export type PolicyScope = "namespace" | "workload" | "mesh";

export interface AppliedPolicy {
  uid: string;
  action: AuthorizationPolicy["action"];
  /** namespace: the workload's namespace, no selector; workload: a selector there; mesh: the root namespace. */
  scope: PolicyScope;
  selector?: Labels;
  status: "enforced" | "dry-run" | "rejected";
  /** The reason the policy is rejected. */
  message?: string;
  warnings: string[];
  /** Number of entries in spec.rules; 0 means the policy matches no connection. */
  rules: number;
  /** Number of rules an L4 proxy evaluates: ALLOW rules with HTTP fields are dropped. */
  enforcedRules: number;
  file: string;
}

export interface WorkloadExplanation {
  workload: string;
  enrolled: boolean;
  /** The reason the pod is not enrolled; absent when it is. */
  notEnrolledReason?: string;
  /** SPIFFE URI the pod's connections carry, when enrolled. */
  identity?: string;
  ip: string;
  /** Inbound ports that the pod's annotation takes out of capture: no mutual TLS, policy or audit applies to them. */
  excludedInboundPorts: number[];
  /** The applicable AuthorizationPolicies in evaluation order: DENY, ALLOW, dry-run DENY, dry-run ALLOW, rejected. */
  policies: AppliedPolicy[];
  peerAuthentication: {
    mesh?: PeerAuthenticationRef;
    namespace?: PeerAuthenticationRef;
    workload?: PeerAuthenticationRef;
    /** The mode per port that a portLevelMtls entry names, then "other" for every other port. */
    ports: { port: number | "other"; mode: MtlsRequirement["mode"]; policy?: string; scope?: MtlsRequirement["scope"] }[];
  };
}

/** Lists what decides connections to a workload: its policies in evaluation order and its PeerAuthentication scopes. */
export function explainWorkload(state: MeshState, settings: AuthorizationSettings, workload: Workload): WorkloadExplanation {
  const rootNamespace = settings.rootNamespace ?? DEFAULT_ROOT_NAMESPACE;
  const enrolled = isAmbient(state, workload, settings.enrollment);
  const policies = state
    .policiesForWorkload(workload, rootNamespace)
    .map((policy) => appliedPolicy(policy, rootNamespace, settings))
    .sort(byEvaluationOrder);
  const scopes = state.peerAuthenticationsFor(workload, rootNamespace);
  const authorizer = authorizerFor(state, workload, settings);
  const listed = Object.keys(scopes.workload?.portLevelMtls ?? {}).map(Number).sort((a, b) => a - b);
  const ports = [...listed, "other" as const].map((port) => {
    const requirement = authorizer.mtls(port === "other" ? standInPort(listed) : port);
    return { port, ...requirement };
  });
  return {
    workload: workload.uid,
    enrolled,
    ...(!enrolled && { notEnrolledReason: notEnrolledReason(state, workload, settings) }),
    ...(enrolled && { identity: formatSpiffeId(identityOf(workload, settings.trustDomain ?? "cluster.local")) }),
    ip: workload.ip,
    excludedInboundPorts: excludedInboundPorts(workload),
    policies,
    peerAuthentication: { ...peerAuthenticationRefs(scopes), ports },
  };
}

function appliedPolicy(policy: AuthorizationPolicy, rootNamespace: string, settings: AuthorizationSettings): AppliedPolicy {
  const status = policyStatus(policy);
  let scope: PolicyScope = "workload";
  if (policy.namespace === rootNamespace) scope = "mesh";
  else if (policy.selector === undefined) scope = "namespace";
  const enforcedRules = status.state === "rejected" ? 0 : compilePolicy(policy, settings).rules.length;
  return {
    uid: policy.uid,
    action: policy.action,
    scope,
    ...(policy.selector !== undefined && { selector: policy.selector }),
    status: status.state,
    ...(status.message !== undefined && { message: status.message }),
    warnings: status.warnings,
    rules: policy.rules?.length ?? 0,
    enforcedRules,
    file: policy.source.file,
  };
}

/**
 * Orders policies as the evaluator reads them (enforced DENY, enforced ALLOW, dry-run DENY, dry-run
 * ALLOW, rejected), then by uid.
 */
function byEvaluationOrder(a: AppliedPolicy, b: AppliedPolicy): number {
  const rank = evaluationRank(a) - evaluationRank(b);
  if (rank !== 0) return rank;
  if (a.uid === b.uid) return 0;
  return a.uid < b.uid ? -1 : 1;
}

function evaluationRank(policy: AppliedPolicy): number {
  if (policy.status === "rejected") return 4;
  const dryRun = policy.status === "dry-run" ? 2 : 0;
  return dryRun + (policy.action === "DENY" ? 0 : 1);
}

function peerAuthenticationRefs(scopes: PeerAuthenticationScopes): Partial<Record<"mesh" | "namespace" | "workload", PeerAuthenticationRef>> {
  const refs: Partial<Record<"mesh" | "namespace" | "workload", PeerAuthenticationRef>> = {};
  for (const scope of ["mesh", "namespace", "workload"] as const) {
    const policy = scopes[scope];
    if (policy !== undefined) refs[scope] = peerAuthenticationRef(policy);
  }
  return refs;
}
