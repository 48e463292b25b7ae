// Istio's standard TCP metrics (istio_tcp_*), counted and labelled as Istio's ztunnel does
// (src/proxy/metrics.rs of its main branch, August 2026), fed from the connection records of every
// proxy. The data path only adds to plain numbers in a Map entry per label set. A scrape hands those
// numbers to prom-client's Registry as they are, with each label set's text rendered once and cached.
//
// Cardinality: one label set per (reporter, source workload, destination workload, destination
// Service, security policy) as in Istio, plus one per response flag for failed connections. Label
// sets are never removed, because a counter that disappears and comes back reads as a reset, so
// the count grows with the distinct workload pairs seen since the agent started.

import type { Metric, Registry } from "prom-client";
import { flagOf, type ConnectionRecord } from "../proxy/connection-record";
import type { ConnectionObserver } from "../proxy/connection-tracker";
import type { AuditPeer } from "../audit/record";
import { serviceHostname } from "../state/destination-service";
import { formatSpiffeId, identityOf } from "../identity/spiffe";
import type { Workload } from "../state/types";

/** Istio's default cluster id (the istiod flag --clusterID and ztunnel's CLUSTER_ID default to it). */
export const DEFAULT_CLUSTER_ID = "Kubernetes";

/** The label names of every istio_tcp_* metric, in ztunnel's order. */
export const TRAFFIC_LABEL_NAMES = [
  "reporter",
  "source_workload",
  "source_canonical_service",
  "source_canonical_revision",
  "source_workload_namespace",
  "source_principal",
  "source_app",
  "source_version",
  "source_cluster",
  "destination_service",
  "destination_service_namespace",
  "destination_service_name",
  "destination_workload",
  "destination_canonical_service",
  "destination_canonical_revision",
  "destination_workload_namespace",
  "destination_principal",
  "destination_app",
  "destination_version",
  "destination_cluster",
  "request_protocol",
  "response_flags",
  "connection_security_policy",
  "source_region",
  "source_zone",
  "destination_region",
  "destination_zone",
] as const;

export type TrafficLabels = Record<(typeof TRAFFIC_LABEL_NAMES)[number], string>;

const UNKNOWN = "unknown";

/** Looks up the mesh objects that the labels describe; both return undefined for an object the state lacks. */
export interface TrafficLookup {
  /** The workload by uid, "namespace/name". */
  workload(uid: string): Workload | undefined;
  /** The mesh's trust domain, for the principal of a destination reached without mTLS. */
  trustDomain(): string;
}

/** The response_flags value of a connection that did not fail, as in ztunnel. */
export const NO_RESPONSE_FLAGS = "-";

/**
 * Audit flags that are also ztunnel's response flags (its ResponseFlags: DENY, CONNECT, TLS_FAILURE,
 * H2_HANDSHAKE_FAILURE, NETWORK_POLICY, IDENTITY_ERROR, CERT_REVOKED). The agent's other audit flags
 * (NO_ROUTE, RESET, INTERNAL) have no ztunnel counterpart.
 */
const ZTUNNEL_FLAGS: ReadonlySet<string> = new Set(["DENY", "CONNECT", "TLS_FAILURE", "IDENTITY_ERROR"]);

/** Totals of one label set whose response_flags is "-". */
interface TrafficTotals {
  readonly labels: TrafficLabels;
  opened: number;
  /** Connections of this label set that closed without a response flag. */
  closed: number;
  /** Bytes of closed connections, from source to destination. */
  bytesReceived: number;
  /** Bytes of closed connections, from destination to source. */
  bytesSent: number;
  /** Closes with a response flag, by flag; absent until the first one. */
  flagged?: Map<string, FlaggedTotals>;
}

/** Closes of one label set with one response flag: every one of them also counts as failed. */
interface FlaggedTotals {
  readonly labels: TrafficLabels;
  closed: number;
}

/**
 * Returns the canonical service of a workload as Istio derives it: the label
 * service.istio.io/canonical-name, else app.kubernetes.io/name, else app, else the workload name.
 */
export function canonicalService(workload: Workload): string {
  const labels = workload.labels;
  return labels["service.istio.io/canonical-name"] ?? labels["app.kubernetes.io/name"] ?? labels["app"] ?? workloadName(workload);
}

/**
 * Returns the canonical revision of a workload as Istio derives it: the label
 * service.istio.io/canonical-revision, else app.kubernetes.io/version, else version, else "latest".
 */
export function canonicalRevision(workload: Workload): string {
  const labels = workload.labels;
  return labels["service.istio.io/canonical-revision"] ?? labels["app.kubernetes.io/version"] ?? labels["version"] ?? "latest";
}

/** Returns the workload name of the metrics labels: the pod's controller (a Deployment, for example), else the pod name. */
export function workloadName(workload: Workload): string {
  return workload.workloadName ?? workload.name;
}

/**
 * Returns the response_flags label of a connection that ended, as ztunnel sets it. It is "-" when the
 * connection ended without error or when the agent's drain deadline cut it, because ztunnel records
 * a connection that its drain dropped without a flag. Otherwise it is the audit flag when ztunnel
 * has the same one, else CONNECT, ztunnel's flag for every other failure (a reset during the copy).
 */
export function responseFlagsOf(record: ConnectionRecord): string {
  const code = record.error?.code;
  if (code === undefined || code === "DRAIN_TIMEOUT") return NO_RESPONSE_FLAGS;
  const flag = flagOf(code);
  // ztunnel's source side receives a denial at the destination as a CONNECT answered with 401 or 403,
  // which it counts as a connection failure.
  if (record.direction === "outbound" && flag === "DENY") return "CONNECT";
  return ZTUNNEL_FLAGS.has(flag) ? flag : "CONNECT";
}

/** Builds the labels of a connection; `responseFlags` is "-" unless the connection failed. */
export function trafficLabels(record: ConnectionRecord, lookup: TrafficLookup, responseFlags = "-"): TrafficLabels {
  const source = workloadOf(record.src, lookup);
  const destination = workloadOf(record.dst, lookup);
  const service = serviceOf(record.dst.service);
  return {
    reporter: record.direction === "outbound" ? "source" : "destination",
    source_workload: source ? workloadName(source) : UNKNOWN,
    source_canonical_service: source ? canonicalService(source) : UNKNOWN,
    source_canonical_revision: source ? canonicalRevision(source) : UNKNOWN,
    source_workload_namespace: source?.namespace ?? UNKNOWN,
    // As in ztunnel, only a peer authenticated by mTLS has a source principal.
    source_principal: (record.transport === "hbone" ? record.src.identity : undefined) ?? UNKNOWN,
    source_app: source ? canonicalService(source) : UNKNOWN,
    source_version: source ? canonicalRevision(source) : UNKNOWN,
    source_cluster: source ? DEFAULT_CLUSTER_ID : UNKNOWN,
    destination_service: service?.hostname ?? UNKNOWN,
    destination_service_namespace: service?.namespace ?? UNKNOWN,
    destination_service_name: service?.name ?? UNKNOWN,
    destination_workload: destination ? workloadName(destination) : UNKNOWN,
    destination_canonical_service: destination ? canonicalService(destination) : UNKNOWN,
    destination_canonical_revision: destination ? canonicalRevision(destination) : UNKNOWN,
    destination_workload_namespace: destination?.namespace ?? UNKNOWN,
    // As in ztunnel, a known destination workload has its identity as principal, with mTLS or not.
    destination_principal: record.dst.identity ?? (destination ? formatSpiffeId(identityOf(destination, lookup.trustDomain())) : UNKNOWN),
    destination_app: destination ? canonicalService(destination) : UNKNOWN,
    destination_version: destination ? canonicalRevision(destination) : UNKNOWN,
    destination_cluster: destination ? DEFAULT_CLUSTER_ID : UNKNOWN,
    request_protocol: "tcp",
    response_flags: responseFlags,
    connection_security_policy: record.transport === "hbone" ? "mutual_tls" : UNKNOWN,
    // The agent has no locality: pods carry no topology labels, and Nodes are not watched.
    source_region: UNKNOWN,
    source_zone: UNKNOWN,
    destination_region: UNKNOWN,
    destination_zone: UNKNOWN,
  };
}

function workloadOf(peer: AuditPeer, lookup: TrafficLookup): Workload | undefined {
  if (peer.workload === undefined || peer.namespace === undefined) return undefined;
  return lookup.workload(`${peer.namespace}/${peer.workload}`);
}

/** Splits a Service uid "namespace/name" into the Service labels; the hostname is name.namespace.svc.cluster.local. */
function serviceOf(uid: string | undefined): { namespace: string; name: string; hostname: string } | undefined {
  const hostname = uid === undefined ? undefined : serviceHostname(uid);
  if (uid === undefined || hostname === undefined) return undefined;
  const slash = uid.indexOf("/");
  return { namespace: uid.slice(0, slash), name: uid.slice(slash + 1), hostname };
}

function keyOf(labels: TrafficLabels): string {
  let key = "";
  for (const name of TRAFFIC_LABEL_NAMES) key += labels[name] + "\u0000";
  return key;
}

/** One sample of a counter: its label set and value. */
type TrafficSample = readonly [TrafficLabels, number];

/**
 * Counts connections and bytes per label set, as ztunnel does:
 * - opened (response_flags "-"): once the proxy routed the connection, that is when its destination
 *   is known and valid, before authorization. A connection counts when it is established (the
 *   `connection.opened` record), or at its end when it never was, so that a denial counts as opened.
 *   ztunnel counts both when it routes them; the difference lasts while a connect or handshake is pending.
 * - closed: every routed connection once, when it ends, with its response flag (DENY for a denial).
 * - failed: the closed connections whose response flag is not "-".
 * - bytes (response_flags "-"): the bytes of closed connections plus, at scrape time, what the
 *   established connections still open copied so far.
 * A connection that failed before it was routed counts nowhere, because ztunnel only logs those.
 * Such failures are failed TLS handshakes and client certificates, and CONNECT requests with a bad
 * method, authority or port. So are a destination address that is not the pod's, and an outbound
 * connection without an original destination or to a Service without a usable endpoint.
 */
export class TrafficMetrics implements ConnectionObserver {
  readonly #totals = new Map<string, TrafficTotals>();
  /** The established connections still open, with the totals they count in. */
  readonly #open = new Map<ConnectionRecord, TrafficTotals>();

  constructor(private readonly lookup: TrafficLookup) {}

  opened(record: ConnectionRecord): void {
    const totals = this.#totalsOf(record);
    totals.opened += 1;
    this.#open.set(record, totals);
  }

  closed(record: ConnectionRecord): void {
    let totals = this.#open.get(record);
    if (totals !== undefined) {
      this.#open.delete(record);
    } else {
      // An established connection that is not in #open was opened before this observer existed.
      if (record.established || !record.routed) return;
      totals = this.#totalsOf(record);
      totals.opened += 1;
    }
    totals.bytesReceived += record.bytesSent;
    totals.bytesSent += record.bytesRecv;
    const flags = record.error === undefined ? NO_RESPONSE_FLAGS : responseFlagsOf(record);
    if (flags === NO_RESPONSE_FLAGS) {
      totals.closed += 1;
      return;
    }
    totals.flagged ??= new Map();
    let flagged = totals.flagged.get(flags);
    if (flagged === undefined) {
      flagged = { labels: { ...totals.labels, response_flags: flags }, closed: 0 };
      totals.flagged.set(flags, flagged);
    }
    flagged.closed += 1;
  }

  /** Registers the istio_tcp_* counters in `registry`. */
  register(registry: Registry): void {
    const counter = (name: string, help: string, samples: () => TrafficSample[]): void =>
      registry.registerMetric(new SampledCounter(name, help, samples) as unknown as Metric);

    counter("istio_tcp_connections_opened_total", "The total number of TCP connections opened.", () => this.#samples((totals, samples) => samples.push([totals.labels, totals.opened])));
    counter("istio_tcp_connections_closed_total", "The total number of TCP connections closed.", () =>
      this.#samples((totals, samples) => {
        if (totals.closed > 0) samples.push([totals.labels, totals.closed]);
        for (const flagged of totals.flagged?.values() ?? []) samples.push([flagged.labels, flagged.closed]);
      }),
    );
    counter("istio_tcp_received_bytes_total", "The size of total bytes received during request in case of a TCP connection: bytes from source to destination.", () =>
      this.#withLiveBytes((totals) => totals.bytesReceived, (record) => record.bytesSent),
    );
    counter("istio_tcp_sent_bytes_total", "The size of total bytes sent during response in case of a TCP connection: bytes from destination to source.", () =>
      this.#withLiveBytes((totals) => totals.bytesSent, (record) => record.bytesRecv),
    );
    counter("istio_tcp_connections_failed_total", "The total number of TCP connections that failed: denied, refused or reset, by response flag.", () =>
      this.#samples((totals, samples) => {
        for (const flagged of totals.flagged?.values() ?? []) samples.push([flagged.labels, flagged.closed]);
      }),
    );
  }

  /** Returns the totals of the record's label set with response_flags "-", created on first use. */
  #totalsOf(record: ConnectionRecord): TrafficTotals {
    const labels = trafficLabels(record, this.lookup);
    const key = keyOf(labels);
    let totals = this.#totals.get(key);
    if (totals === undefined) {
      totals = { labels, opened: 0, closed: 0, bytesReceived: 0, bytesSent: 0 };
      this.#totals.set(key, totals);
    }
    return totals;
  }

  #samples(add: (totals: TrafficTotals, samples: TrafficSample[]) => void): TrafficSample[] {
    const samples: TrafficSample[] = [];
    for (const totals of this.#totals.values()) add(totals, samples);
    return samples;
  }

  /** Returns each label set's bytes of closed connections plus the bytes its open connections copied so far. */
  #withLiveBytes(closed: (totals: TrafficTotals) => number, live: (record: ConnectionRecord) => number): TrafficSample[] {
    const liveBytes = new Map<TrafficTotals, number>();
    for (const [record, totals] of this.#open) liveBytes.set(totals, (liveBytes.get(totals) ?? 0) + live(record));
    return this.#samples((totals, samples) => samples.push([totals.labels, closed(totals) + (liveBytes.get(totals) ?? 0)]));
  }
}

/** The label-less part of every sample that SampledCounter hands to prom-client. */
const NO_LABELS: Readonly<Record<string, string>> = Object.freeze({});

/**
 * A counter that prom-client's Registry formats from samples returned at scrape time, in place of a
 * prom-client Counter whose collect() would reset it and add every label set again (about a third
 * of a scrape with 5,000 label sets). The Registry calls get() for JSON and getForPromString() for
 * the text format. The latter passes each label set as `sharedLabels`, whose rendered text
 * prom-client 15 caches per object, so each label set is escaped and joined once, not on every
 * scrape. The output is the same as a Counter's, which the unit tests check, as long as the Registry
 * has no default labels (the agent sets none): those would come before the label set, not after.
 * NOTE: `sharedLabels` and getForPromString() are prom-client internals (lib/registry.js, 15.1);
 * a prom-client update must pass the comparison test.
 */
class SampledCounter {
  readonly type = "counter";
  readonly aggregator = "sum";

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly samples: () => TrafficSample[],
  ) {}

  async get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: { labels: TrafficLabels; value: number }[] }> {
    const values = this.samples().map(([labels, value]) => ({ labels, value }));
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values };
  }

  async getForPromString(): Promise<{ name: string; help: string; type: string; aggregator: string; values: { labels: Readonly<Record<string, string>>; sharedLabels: TrafficLabels; value: number }[] }> {
    const values = this.samples().map(([labels, value]) => ({ labels: NO_LABELS, sharedLabels: labels, value }));
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values };
  }

  /** Does nothing: the totals belong to TrafficMetrics, and a counter never goes back. */
  reset(): void {}
}
