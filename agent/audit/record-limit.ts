// The size limit of one audit record. No connection makes a record that large: configuration text
// does, such as a policy with very long values. Remote sinks would reject such a record again and
// again and hold up the records behind it, because gRPC servers take 4 MiB messages by default and
// syslog receivers often 8 KiB.

/** Largest serialized record, in bytes, before its long values are cut. */
export const MAX_RECORD_BYTES = 64 * 1024;

/** Cuts applied one after the other until the record fits: longest string, then most array elements. */
const CUTS = [
  { maxString: 1024, maxArray: 200 },
  { maxString: 128, maxArray: 20 },
];

/**
 * Returns a copy of `record` whose serialized form fits in MAX_RECORD_BYTES, with `truncated: true`
 * and `original_bytes`, or undefined when `serialized` fits already. Strings are cut with a note of
 * their length, and arrays keep their first elements and a note of how many were left out. A record
 * that still does not fit keeps only its `time`, `type` and `node`.
 */
export function shrinkRecord(record: Record<string, unknown>, serialized: string): Record<string, unknown> | undefined {
  if (serialized.length * 3 <= MAX_RECORD_BYTES) return undefined;
  const originalBytes = Buffer.byteLength(serialized);
  if (originalBytes <= MAX_RECORD_BYTES) return undefined;
  for (const cut of CUTS) {
    const shrunk = { ...(cutValue(record, cut) as Record<string, unknown>), truncated: true, original_bytes: originalBytes };
    if (Buffer.byteLength(JSON.stringify(shrunk)) <= MAX_RECORD_BYTES) return shrunk;
  }
  return { time: record.time, type: record.type, node: record.node, truncated: true, original_bytes: originalBytes };
}

function cutValue(value: unknown, cut: { maxString: number; maxArray: number }): unknown {
  if (typeof value === "string") {
    return value.length > cut.maxString ? `${value.slice(0, cut.maxString)}…(cut from ${value.length} characters)` : value;
  }
  if (Array.isArray(value)) {
    const kept = value.slice(0, cut.maxArray).map((element) => cutValue(element, cut));
    if (value.length > cut.maxArray) kept.push(`…(${value.length - cut.maxArray} more elements cut)`);
    return kept;
  }
  if (typeof value === "object" && value !== null) {
    const copy: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value)) copy[cutValue(key, cut) as string] = cutValue(item, cut);
    return copy;
  }
  return value;
}
