// --probe-snat: keeps the table of probe-snat-ruleset.ts in the host's network namespace, with the
// enrolled pods' addresses in its sets. The table stays when the agent stops, so kubelet probes keep
// reaching the applications through the probe-source exemption while no agent runs. Writing it
// never holds back enrolment: a failure is logged, shown by readiness, and retried.
import path from "node:path";

import type { Logger } from "../../log";
import { runNft } from "./capture";
import {
  NO_PODS,
  PROBE_SNAT_TABLE_FAMILY,
  PROBE_SNAT_TABLE_NAME,
  listsProbeSnatTable,
  probeSnatPods,
  probeSnatSources,
  renderInetTablesListing,
  renderProbeSnatElements,
  renderProbeSnatRemoval,
  renderProbeSnatRuleset,
  samePods,
  type ProbeSnatPods,
  type ProbeSnatSources,
} from "./probe-snat-ruleset";

/** How long after a failed write the table is written again. */
const RETRY_DELAY_MS = 10_000;

/** The probe SNAT table's state, for readiness and agentctl status. */
export interface ProbeSnatStatus {
  /** Whether the table is in place with the current pods' addresses. */
  installed: boolean;
  /** The table, "inet ambient_agent_probes". */
  table: string;
  /** The host network namespace the table is written in. */
  netns: string;
  /** The addresses probes are rewritten to. */
  sources: string[];
  /** Enrolled pods' addresses in the table's sets, by family. */
  pods: { ipv4: number; ipv6: number };
  /** The last write's error while the table is not in place. */
  error?: string;
}

export interface ProbeSnatOptions {
  /** Path of the host's network namespace, such as /proc/1/ns/net. */
  hostNetns: string;
  /** The --probe-source addresses. The table rewrites to the first IPv4 and the first IPv6 one. */
  probeSources: readonly string[];
  logger: Logger;
  /** Runs an nftables script inside a network namespace and returns its output. Default runNft. */
  runScript?: (netnsPath: string, script: string, what: string) => string;
}

/** The probe SNAT table of the host's network namespace, written with nftables from a thread inside that namespace. */
export class ProbeSnat {
  private readonly sources: ProbeSnatSources;
  /** The addresses the sets should contain. */
  private desired: ProbeSnatPods = NO_PODS;
  /** The addresses the kernel's sets contain, as last written. Undefined while the table is not known to be in place. */
  private written: ProbeSnatPods | undefined;
  private error: string | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly runScript: NonNullable<ProbeSnatOptions["runScript"]>;

  constructor(private readonly options: ProbeSnatOptions) {
    this.sources = probeSnatSources(options.probeSources);
    this.runScript = options.runScript ?? runNft;
  }

  /**
   * Writes the whole table with `addresses` in its sets, replacing what an earlier run left in one
   * transaction. Pass the addresses the previous agent had enrolled, so that probes of those pods
   * keep their rewritten source until the first enrolment sets the current ones.
   */
  install(addresses: Iterable<string>): void {
    this.desired = probeSnatPods(addresses);
    this.write();
  }

  /** Sets the enrolled pods' addresses. Writes only the sets' elements when the table is in place and they changed. */
  update(addresses: Iterable<string>): void {
    this.desired = probeSnatPods(addresses);
    if (this.written !== undefined && samePods(this.written, this.desired)) return;
    this.write();
  }

  status(): ProbeSnatStatus {
    const pods = this.written ?? NO_PODS;
    return {
      installed: this.written !== undefined && samePods(this.written, this.desired),
      table: `${PROBE_SNAT_TABLE_FAMILY} ${PROBE_SNAT_TABLE_NAME}`,
      netns: this.options.hostNetns,
      sources: [this.sources.ipv4, this.sources.ipv6].filter((ip): ip is string => ip !== undefined),
      pods: { ipv4: pods.ipv4.length, ipv6: pods.ipv6.length },
      ...(this.error !== undefined && { error: this.error }),
    };
  }

  /** Stops retrying. The table stays, so probes keep their rewritten source while no agent runs. */
  close(): void {
    this.closed = true;
    clearTimeout(this.retryTimer);
  }

  /** Writes the desired addresses. On failure, logs and retries later. */
  private write(): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    const desired = this.desired;
    try {
      this.writeScripts(desired);
    } catch (error) {
      this.failed(error as Error);
      return;
    }
    this.succeeded(desired);
  }

  /** Replaces the sets' elements when the table is in place, else writes the whole table. Throws with nftables' message. */
  private writeScripts(desired: ProbeSnatPods): void {
    const { hostNetns } = this.options;
    if (this.written !== undefined) {
      try {
        this.runScript(hostNetns, renderProbeSnatElements(desired), "updating the addresses of the probe SNAT table");
        return;
      } catch (error) {
        // The table may have been deleted by hand, so write it whole.
        this.options.logger.warn({ err: error, netns: hostNetns }, "updating the probe SNAT table's addresses failed; writing the whole table");
        this.written = undefined;
      }
    }
    this.runScript(hostNetns, renderProbeSnatRuleset(this.sources, desired), "writing the probe SNAT table");
  }

  private succeeded(pods: ProbeSnatPods): void {
    const fields = { netns: this.options.hostNetns, ipv4: pods.ipv4.length, ipv6: pods.ipv6.length };
    if (this.written === undefined) {
      this.options.logger.info({ ...fields, sources: this.status().sources }, "probe SNAT table written: kubelet probes of enrolled pods come from the probe source address");
    } else {
      this.options.logger.debug(fields, "probe SNAT table addresses updated");
    }
    this.written = pods;
    this.error = undefined;
  }

  /** Records the failure, logs it (at error the first time, at debug while it repeats) and schedules a retry. */
  private failed(error: Error): void {
    this.written = undefined;
    const repeated = this.error === error.message;
    this.error = error.message;
    const message = `writing the probe SNAT table failed: kubelet probes of enrolled pods come from the node's address and are captured; retrying in ${RETRY_DELAY_MS / 1000} s`;
    if (repeated) this.options.logger.debug({ err: error, netns: this.options.hostNetns }, message);
    else this.options.logger.error({ err: error, netns: this.options.hostNetns }, message);
    if (this.closed) return;
    this.retryTimer = setTimeout(() => this.write(), RETRY_DELAY_MS);
    this.retryTimer.unref();
  }
}

/** Returns the path of the host network namespace that the table goes in: --host-netns, else that of PID 1 under --host-proc. */
export function hostNetnsPath(hostNetns: string | undefined, hostProc: string): string {
  return hostNetns ?? path.join(hostProc, "1", "ns", "net");
}

/** Tells whether the host network namespace at hostNetns has the probe SNAT table. Throws with nftables' message when the namespace cannot be read. */
export function hasProbeSnatTable(hostNetns: string): boolean {
  return listsProbeSnatTable(runNft(hostNetns, renderInetTablesListing(), "listing the nftables tables"));
}

/**
 * Removes the probe SNAT table from the host network namespace at hostNetns. Writes nothing when
 * the table is absent. Returns whether there was a table. Throws with nftables' message when the
 * namespace cannot be read or the table cannot be removed.
 */
export function removeProbeSnat(hostNetns: string): boolean {
  if (!hasProbeSnatTable(hostNetns)) return false;
  runNft(hostNetns, renderProbeSnatRemoval(), "removing the probe SNAT table");
  return true;
}
