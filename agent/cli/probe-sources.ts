// The --probe-source option of `ambient-agent run`.

import net from "node:net";
import { DEFAULT_PROBE_SOURCES } from "../capture/ebpf/exemptions";
import { MAX_PROBE_SOURCES } from "../capture/layout";

/**
 * Reads every --probe-source value: IP addresses, comma-separated or one per option, or "none"
 * for no probe exemption. Returns the defaults when the option is absent. Throws on an invalid
 * address, on "none" mixed with addresses, and on more addresses than aa_probe_sources holds.
 */
export function parseProbeSources(values: readonly string[] | undefined): string[] {
  if (values === undefined || values.length === 0) return [...DEFAULT_PROBE_SOURCES];
  const items = values.flatMap((value) => value.split(",")).map((item) => item.trim());
  if (items.includes("none")) {
    if (items.length > 1) throw new Error(`invalid --probe-source "${values.join(",")}": "none" cannot be combined with addresses`);
    return [];
  }
  for (const item of items) {
    if (net.isIP(item) === 0) {
      throw new Error(`invalid --probe-source "${item}": give an IPv4 or IPv6 address, for example 169.254.7.127, or "none"`);
    }
  }
  const unique = [...new Set(items)];
  if (unique.length > MAX_PROBE_SOURCES) {
    throw new Error(`${unique.length} --probe-source addresses given: at most ${MAX_PROBE_SOURCES} are supported`);
  }
  return unique;
}
