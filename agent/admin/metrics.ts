// Prometheus metrics served by the admin API at /metrics: the audit pipeline's, and the helpers that
// every metric of the agent is registered with. Values are read from their sources when Prometheus
// scrapes, so the data path updates no metric object.

import { Counter, Gauge, type Registry } from "prom-client";
import type { AuditPipelineStatus } from "../audit/pipeline";

/** The samples of a metric at one scrape: each label set with its value. */
export type MetricSamples = () => Iterable<readonly [Readonly<Record<string, string>>, number]>;

/**
 * Registers a counter whose samples `samples` returns at each scrape. The sources keep their own
 * totals, so the counter is reset and set to them each time.
 */
export function collectedCounter(registry: Registry, name: string, help: string, labelNames: readonly string[], samples: MetricSamples): void {
  new Counter({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [labels, value] of samples()) this.inc(labels, value);
    },
  });
}

/** Registers a gauge whose samples `samples` returns at each scrape; a label set it no longer returns disappears. */
export function collectedGauge(registry: Registry, name: string, help: string, labelNames: readonly string[], samples: MetricSamples): void {
  new Gauge({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [labels, value] of samples()) this.set(labels, value);
    },
  });
}

/** Registers the audit pipeline's metrics; `status` returns undefined before the pipeline exists. */
export function registerAuditMetrics(registry: Registry, status: () => AuditPipelineStatus | undefined): void {
  type Values = (current: AuditPipelineStatus) => [Record<string, string>, number][];
  const valuesOf = (values: Values) => (): [Record<string, string>, number][] => {
    const current = status();
    return current === undefined ? [] : values(current);
  };
  const counter = (name: string, help: string, labelNames: string[], values: Values): void => collectedCounter(registry, name, help, labelNames, valuesOf(values));
  const gauge = (name: string, help: string, labelNames: string[], values: Values): void => collectedGauge(registry, name, help, labelNames, valuesOf(values));

  counter("ambient_agent_audit_records_total", "Audit records handed to the pipeline, by record type.", ["type"], (s) =>
    Object.entries(s.records).map(([type, count]) => [{ type }, count]),
  );
  counter("ambient_agent_audit_queue_dropped_records_total", "Audit records dropped because the queue in front of the spool was full.", [], (s) => [[{}, s.dropped.queue_full]]);
  gauge("ambient_agent_audit_queue_records", "Audit records waiting to be written to the spool.", [], (s) => [[{}, s.queue.records]]);
  gauge("ambient_agent_audit_queue_capacity_records", "Audit records the queue holds before it drops new ones.", [], (s) => [[{}, s.queue.capacity]]);
  gauge("ambient_agent_audit_spool_bytes", "Bytes of audit records in the spool on disk.", [], (s) => [[{}, s.spool.bytes]]);
  gauge("ambient_agent_audit_spool_max_bytes", "Spool size above which the oldest records are evicted.", [], (s) => [[{}, s.spool.maxBytes]]);
  counter("ambient_agent_audit_sink_delivered_records_total", "Audit records a sink accepted.", ["sink"], (s) => s.sinks.map((sink) => [{ sink: sink.name }, sink.delivered]));
  counter("ambient_agent_audit_sink_failures_total", "Failed deliveries of a batch to a sink; each is retried.", ["sink"], (s) => s.sinks.map((sink) => [{ sink: sink.name }, sink.failures]));
  counter(
    "ambient_agent_audit_sink_dropped_records_total",
    "Audit records a sink never received because the spool was full and evicted them; a gap record counts each loss.",
    ["sink"],
    (s) => s.sinks.map((sink) => [{ sink: sink.name }, sink.dropped]),
  );
  counter(
    "ambient_agent_audit_sink_rejected_records_total",
    "Audit records a sink's destination refused for good (an OTLP partial success); they are not sent again.",
    ["sink"],
    (s) => s.sinks.map((sink) => [{ sink: sink.name }, sink.rejected]),
  );
  gauge("ambient_agent_audit_sink_lag_records", "Spooled audit records a sink has not accepted yet.", ["sink"], (s) => s.sinks.map((sink) => [{ sink: sink.name }, sink.lag]));
  gauge("ambient_agent_audit_sink_up", "1 when the sink's last delivery succeeded, 0 while it fails.", ["sink"], (s) => s.sinks.map((sink) => [{ sink: sink.name }, sink.up ? 1 : 0]));
}
