// Istio's standard TCP metrics (istio_tcp_*), with the labels Istio's ztunnel gives them, fed from
// the connection records of every proxy. The data path only adds to plain numbers in a Map entry
// per label set; prom-client reads the Map when Prometheus scrapes.
//
// Cardinality: one label set per (reporter, source workload, destination workload, destination
// Service, security policy) as in Istio, plus one per response flag for failed connections. Label
// sets are never removed, because a counter that disappears and comes back reads as a reset, so
// the count grows with the distinct workload pairs seen since the agent started.

import type { Registry } from "prom-client";
import { flagOf, type ConnectionRecord } from "../proxy/connection-record";
import type { ConnectionObserver } from "../proxy/connection-tracker";
import type { AuditPeer } from "../audit/record";
import type { Workload } from "../state/types";
import { collectedCounter } from "./metrics";

/** Istio's default cluster id (the istiod flag --clusterID and ztunnel's CLUSTER_ID default to it). */
export const DEFAULT_CLUSTER_ID = "Kubernetes";
/** The Kubernetes cluster domain that Service hostnames end with, as in Istio's default. */
export const CLUSTER_DOMAIN = "cluster.local";

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
] as const;

export type TrafficLabels = Record<(typeof TRAFFIC_LABEL_NAMES)[number], string>;

const UNKNOWN = "unknown";

/** Looks up the mesh objects that the labels describe; both return undefined for an object the state lacks. */
export interface TrafficLookup {
  /** The workload by uid, "namespace/name". */
  workload(uid: string): Workload | undefined;
}

/** Totals of one label set. */
interface TrafficTotals {
  readonly labels: TrafficLabels;
  opened: number;
  closed: number;
  /** Bytes of closed connections, from source to destination. */
  bytesReceived: number;
  /** Bytes of closed connections, from destination to source. */
  bytesSent: number;
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
    source_principal: record.src.identity ?? UNKNOWN,
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
    destination_principal: record.dst.identity ?? UNKNOWN,
    destination_app: destination ? canonicalService(destination) : UNKNOWN,
    destination_version: destination ? canonicalRevision(destination) : UNKNOWN,
    destination_cluster: destination ? DEFAULT_CLUSTER_ID : UNKNOWN,
    request_protocol: "tcp",
    response_flags: responseFlags,
    connection_security_policy: record.transport === "hbone" ? "mutual_tls" : UNKNOWN,
  };
}

function workloadOf(peer: AuditPeer, lookup: TrafficLookup): Workload | undefined {
  if (peer.workload === undefined || peer.namespace === undefined) return undefined;
  return lookup.workload(`${peer.namespace}/${peer.workload}`);
}

/** Splits a Service uid "namespace/name" into the Service labels; the hostname is name.namespace.svc.cluster.local. */
function serviceOf(uid: string | undefined): { namespace: string; name: string; hostname: string } | undefined {
  if (uid === undefined) return undefined;
  const slash = uid.indexOf("/");
  if (slash <= 0) return undefined;
  const namespace = uid.slice(0, slash);
  const name = uid.slice(slash + 1);
  return { namespace, name, hostname: `${name}.${namespace}.svc.${CLUSTER_DOMAIN}` };
}

function keyOf(labels: TrafficLabels): string {
  let key = "";
  for (const name of TRAFFIC_LABEL_NAMES) key += labels[name] + "\u0000";
  return key;
}

/**
 * Counts connections and bytes per label set. As a ConnectionObserver it receives each connection
 * established and closed; the byte counters add the live bytes of open connections at scrape
 * time, so they equal the bytes of closed connections plus what open ones copied so far.
 */
export class TrafficMetrics implements ConnectionObserver {
  readonly #totals = new Map<string, TrafficTotals>();
  /** Failed connections by label set, response_flags included. */
  readonly #failed = new Map<string, { labels: TrafficLabels; count: number }>();
  /** The established connections still open, with the totals they count in. */
  readonly #open = new Map<ConnectionRecord, TrafficTotals>();

  constructor(private readonly lookup: TrafficLookup) {}

  opened(record: ConnectionRecord): void {
    const labels = trafficLabels(record, this.lookup);
    const key = keyOf(labels);
    let totals = this.#totals.get(key);
    if (totals === undefined) {
      totals = { labels, opened: 0, closed: 0, bytesReceived: 0, bytesSent: 0 };
      this.#totals.set(key, totals);
    }
    totals.opened += 1;
    this.#open.set(record, totals);
  }

  closed(record: ConnectionRecord): void {
    const totals = this.#open.get(record);
    if (totals !== undefined) {
      this.#open.delete(record);
      totals.closed += 1;
      totals.bytesReceived += record.bytesSent;
      totals.bytesSent += record.bytesRecv;
      return;
    }
    if (record.established || record.error === undefined) return;
    const labels = trafficLabels(record, this.lookup, flagOf(record.error.code));
    const key = keyOf(labels);
    const failed = this.#failed.get(key);
    if (failed === undefined) this.#failed.set(key, { labels, count: 1 });
    else failed.count += 1;
  }

  /** Registers the istio_tcp_* counters in `registry`. */
  register(registry: Registry): void {
    const counter = (name: string, help: string, samples: () => Iterable<[TrafficLabels, number]>): void =>
      collectedCounter(registry, name, help, TRAFFIC_LABEL_NAMES, samples);
    const totals = (value: (totals: TrafficTotals) => number): [TrafficLabels, number][] =>
      [...this.#totals.values()].map((entry) => [entry.labels, value(entry)]);

    counter("istio_tcp_connections_opened_total", "The total number of TCP connections opened.", () => totals((entry) => entry.opened));
    counter("istio_tcp_connections_closed_total", "The total number of TCP connections closed.", () => totals((entry) => entry.closed));
    counter("istio_tcp_received_bytes_total", "The size of total bytes received during request in case of a TCP connection: bytes from source to destination.", () =>
      this.#withLiveBytes((entry) => entry.bytesReceived, (record) => record.bytesSent),
    );
    counter("istio_tcp_sent_bytes_total", "The size of total bytes sent during response in case of a TCP connection: bytes from destination to source.", () =>
      this.#withLiveBytes((entry) => entry.bytesSent, (record) => record.bytesRecv),
    );
    counter("istio_tcp_connections_failed_total", "TCP connections that ended with an error before they were established, such as denials, by response flag.", () =>
      [...this.#failed.values()].map((entry): [TrafficLabels, number] => [entry.labels, entry.count]),
    );
  }

  /** Returns each label set's bytes of closed connections plus the bytes its open connections copied so far. */
  #withLiveBytes(closed: (totals: TrafficTotals) => number, live: (record: ConnectionRecord) => number): [TrafficLabels, number][] {
    const values = new Map<TrafficTotals, number>();
    for (const entry of this.#totals.values()) values.set(entry, closed(entry));
    for (const [record, entry] of this.#open) values.set(entry, (values.get(entry) ?? 0) + live(record));
    return [...values].map(([entry, value]) => [entry.labels, value]);
  }
}
