// The open connections of every proxy of the agent. A ConnectionRecord registers when a proxy
// accepts its connection and leaves exactly once, when the record is written, so the tracker
// contains every connection the proxies serve, failures included.

import type { ConnectionView } from "../admin/views";
import type { Direction } from "../state/types";
import type { ConnectionRecord, ConnectionRegistry } from "./connection-record";

/**
 * Benchmark switch, read once when the agent starts: with AMBIENT_BENCH_NO_CONNECTION_TRACKER=1 the
 * proxies get no tracker, so no connection registers and the Istio TCP metrics stay empty. The
 * diagnostics benchmark (test/bench/diagnostics.ts) sets it to measure what the tracker and the
 * metrics cost the data path. Never set it in production: /connections and istio_tcp_* go blind.
 */
export const TRACKER_DISABLED_FOR_BENCHMARK = process.env.AMBIENT_BENCH_NO_CONNECTION_TRACKER === "1";

/** Receives each connection's establishment and end, such as the Istio TCP metrics. */
export interface ConnectionObserver {
  /** Called once, when the connection is established (the `connection.opened` record). */
  opened(record: ConnectionRecord): void;
  /** Called once, when the record is written; `record.established` is true when it was ever established. */
  closed(record: ConnectionRecord): void;
}

export class ConnectionTracker implements ConnectionRegistry {
  /** A Set iterates in insertion order, so the oldest connection comes first. */
  readonly #open = new Set<ConnectionRecord>();
  #inbound = 0;
  #outbound = 0;
  readonly #observers: ConnectionObserver[] = [];

  /** Adds an observer that receives every connection established or closed from now on. */
  observe(observer: ConnectionObserver): void {
    this.#observers.push(observer);
  }

  /** Registers a connection that a proxy accepted. */
  add(record: ConnectionRecord): void {
    if (this.#open.has(record)) return;
    this.#open.add(record);
    if (record.direction === "inbound") this.#inbound += 1;
    else this.#outbound += 1;
  }

  /** Passes the establishment of a registered connection on to the observers. */
  opened(record: ConnectionRecord): void {
    if (!this.#open.has(record)) return;
    for (const observer of this.#observers) observer.opened(record);
  }

  /** Removes a connection whose record is written; a second call for it does nothing. */
  remove(record: ConnectionRecord): void {
    if (!this.#open.delete(record)) return;
    if (record.direction === "inbound") this.#inbound -= 1;
    else this.#outbound -= 1;
    for (const observer of this.#observers) observer.closed(record);
  }

  counts(): { inbound: number; outbound: number } {
    return { inbound: this.#inbound, outbound: this.#outbound };
  }

  /** Describes the open connections, oldest first, optionally of one direction only. */
  views(direction?: Direction): ConnectionView[] {
    const now = Date.now();
    const views: ConnectionView[] = [];
    for (const record of this.#open) {
      if (direction === undefined || record.direction === direction) views.push(connectionView(record, now));
    }
    return views;
  }
}

/**
 * Describes one open connection from the side of the enrolled pod whose proxy serves it: `local` is the
 * pod's address and `remote` the peer's. Outbound, the pod is the source and the peer the
 * destination, whose address is the tunnel's (ip:15008) when the connection is carried in HBONE.
 * Inbound, the pod is the destination (the tunnel's address for HBONE) and the peer the source.
 * For HBONE, `remoteTarget` is the destination pod's address inside the tunnel.
 */
export function connectionView(record: ConnectionRecord, now = Date.now()): ConnectionView {
  const tunnel = record.dst.hbone_addr;
  const destination = tunnel ?? record.dst.addr;
  const inbound = record.direction === "inbound";
  const view: ConnectionView = {
    id: record.id,
    workload: record.workload,
    direction: record.direction,
    local: inbound ? destination : record.src.addr,
    remote: inbound ? record.src.addr : destination,
    protocol: record.transport === "hbone" ? "HBONE" : "TCP",
    startedAt: new Date(record.startedAt).toISOString(),
    durationMs: Math.max(0, now - record.startedAt),
    bytesSent: record.bytesSent,
    bytesRecv: record.bytesRecv,
  };
  if (tunnel !== undefined) view.remoteTarget = record.dst.addr;
  if (record.src.identity !== undefined) view.srcIdentity = record.src.identity;
  if (record.dst.identity !== undefined) view.dstIdentity = record.dst.identity;
  if (record.policy !== undefined) view.policy = record.policy;
  return view;
}
