// Summary statistics of the benchmark's samples.

/** Returns the `quantile` (0 < q <= 1) of `sorted` by the nearest-rank method; NaN when it is empty. */
export function nearestRank(sorted: readonly number[], quantile: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.ceil(quantile * sorted.length);
  return sorted[Math.min(Math.max(rank, 1), sorted.length) - 1];
}

export interface LatencySummary {
  count: number;
  p50: number;
  p99: number;
  mean: number;
  max: number;
}

/** Summarises round-trip times given in microseconds. */
export function summarizeLatency(samplesUs: readonly number[]): LatencySummary {
  const sorted = [...samplesUs].sort((a, b) => a - b);
  const total = sorted.reduce((sum, value) => sum + value, 0);
  return {
    count: sorted.length,
    p50: nearestRank(sorted, 0.5),
    p99: nearestRank(sorted, 0.99),
    mean: sorted.length > 0 ? total / sorted.length : Number.NaN,
    max: sorted.length > 0 ? sorted[sorted.length - 1] : Number.NaN,
  };
}

/** Rounds to `digits` decimal places, for figures in the report. */
export function round(value: number, digits: number): number {
  const scale = 10 ** digits;
  return Math.round(value * scale) / scale;
}
