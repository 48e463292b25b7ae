// Uninstall detection (--daemonset NAMESPACE/NAME). The agent lists and watches the DaemonSet that
// runs it from start, and remembers a deletion that the watch reports. A stop signal after such a
// deletion is an uninstall rather than a restart, so the agent removes what it installed on the
// node: its CNI plugin entry, every pod's enrolment and its pinned capture.
//
// The watch matters because `helm uninstall` deletes the DaemonSet and, in the same pass, the Role,
// the bindings and the ServiceAccount, without waiting for the pods. A read at the stop signal then
// gets 401 or 403. A watch stream is authorized only when it opens, so the DaemonSet's deletion
// still reaches an agent whose credentials stop working right after.
//
// Without a deletion seen by the watch, the agent reads the DaemonSet at the stop signal as a second
// source, where a deletionTimestamp or a 404 also means an uninstall. Every other result (the DaemonSet exists, the API server is unreachable, any error) is a
// plain stop, which keeps capture pinned so that enrolled pods fail closed until the next agent
// serves them.

import { Capture } from "./capture/ebpf/capture";
import { unchain } from "./cni/chain";
import { statusOf, type KubeClient } from "./discovery/kube-client";
import { Reflector, type ReflectorOptions, type ReflectorStore, type ResourceSpec } from "./discovery/kube-reflector";
import type { Logger } from "./log";

/** The DaemonSet that runs this agent. */
export interface DaemonSetRef {
  namespace: string;
  name: string;
}

/** How long the read of the DaemonSet at a stop signal may take before it counts as unreachable. */
export const DAEMONSET_READ_TIMEOUT_MS = 2_000;

/** What a stop does: uninstall, or keep capture pinned. `reason` explains why, for the log and the agent.stopped record. */
export interface StopDecision {
  uninstall: boolean;
  reason: string;
}

/** The DaemonSet's state, as the read at the stop signal found it. */
export type DaemonSetState =
  | { kind: "present" }
  | { kind: "deleting"; since: string }
  | { kind: "not-found" }
  | { kind: "error"; status?: number; message: string };

/**
 * The watch's record of the DaemonSet since the agent started. It is "seen" once a list or an event
 * contained it, "missing" when the first list completed without it and it has not appeared since,
 * and "unknown" while no list has completed.
 */
export type Sighting = "seen" | "missing" | "unknown";

const NAMESPACE_NAME = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const OBJECT_NAME = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;

/** Parses --daemonset NAMESPACE/NAME. Throws an Error that names the value and the expected form. */
export function parseDaemonSetRef(text: string): DaemonSetRef {
  const parts = text.split("/");
  const [namespace, name] = parts;
  const valid = parts.length === 2 && namespace.length <= 63 && NAMESPACE_NAME.test(namespace) && name.length <= 253 && OBJECT_NAME.test(name);
  if (!valid) {
    throw new Error(`invalid --daemonset "${text}": give NAMESPACE/NAME of the agent's DaemonSet in Kubernetes names (lowercase letters, digits, '-' and, in the name, '.'), for example ambient-agent/ambient-agent`);
  }
  return { namespace, name };
}

function refText(ref: DaemonSetRef): string {
  return `${ref.namespace}/${ref.name}`;
}

/**
 * Returns the resource that lists and watches the DaemonSet alone: its namespace's collection with the
 * metadata.name field selector, which lets a Role with resourceNames authorize the list and the watch.
 */
export function daemonSetResource(ref: DaemonSetRef): ResourceSpec {
  return {
    name: `DaemonSet ${refText(ref)}`,
    path: `/apis/apps/v1/namespaces/${encodeURIComponent(ref.namespace)}/daemonsets`,
    fieldSelector: `metadata.name=${ref.name}`,
  };
}

/**
 * Decides at a stop signal whether the stop is an uninstall. A deletion that the watch saw decides
 * at once. Otherwise the DaemonSet is read. A DaemonSet not found then counts as an uninstall only
 * when the watch saw it before, because one never seen most likely means that --daemonset names the
 * wrong object, and every restart would then remove the node's capture. A DaemonSet being deleted
 * always counts, because the object exists and so the name is right.
 *
 * The watch does not count toward readiness: a node serves its pods whether or not the agent can
 * follow its DaemonSet, and a Role that lacks list or watch must not hold back a rollout. Its
 * failures are logged, one warning per streak, like the other watches.
 */
export class UninstallCheck {
  readonly #tracker: DaemonSetTracker;
  readonly #reflector: Reflector;

  constructor(
    private readonly client: Pick<KubeClient, "request" | "watch">,
    private readonly ref: DaemonSetRef,
    private readonly logger: Logger,
    private readonly timeoutMs = DAEMONSET_READ_TIMEOUT_MS,
    reflectorOptions: ReflectorOptions = {},
  ) {
    this.#tracker = new DaemonSetTracker(ref, logger);
    this.#reflector = new Reflector(client, daemonSetResource(ref), this.#tracker, logger, reflectorOptions);
  }

  /** Starts the list and watch of the DaemonSet, which run until stop(). */
  start(): void {
    this.#reflector.start();
  }

  /** Ends the watch. */
  stop(): Promise<void> {
    return this.#reflector.stop();
  }

  /** Returns the uninstall that a deletion seen by the watch implies, or undefined while the watch has seen none. */
  watchedDeletion(): StopDecision | undefined {
    return this.#tracker.deletion;
  }

  /**
   * Decides from the deletion the watch saw or, without one, from a read of the DaemonSet, and logs
   * the decision and why. Takes at most about twice the read timeout: it first waits that long for
   * the watch's first list when it has not completed yet.
   */
  async decide(): Promise<StopDecision> {
    await this.#firstList();
    if (this.#tracker.deletion) return this.#logged(this.#tracker.deletion);
    const state = await readDaemonSet(this.client, this.ref, this.timeoutMs);
    // A watch event that arrived during the read overrides the read.
    if (this.#tracker.deletion) return this.#logged(this.#tracker.deletion);
    return this.#logged(decisionOf(state, this.ref, this.#tracker.sighting), state);
  }

  /** Logs the decision, why, and whether the watch or the read at the stop (`state`) made it, and returns it. */
  #logged(decision: StopDecision, state?: DaemonSetState): StopDecision {
    const fields = {
      daemonset: refText(this.ref),
      source: state ? "read at stop" : "watch",
      state: state?.kind,
      status: state?.kind === "error" ? state.status : undefined,
      sighting: this.#tracker.sighting,
      reason: decision.reason,
    };
    if (decision.uninstall) {
      this.logger.info(fields, `uninstall: ${decision.reason}; removing the CNI plugin entry, every pod's enrolment and the pinned capture`);
    } else if (state?.kind === "error") {
      this.logger.warn(fields, `not an uninstall: ${decision.reason}; stopping with capture pinned (${hintOf(state)})`);
    } else {
      this.logger.info(fields, `not an uninstall: ${decision.reason}; stopping with capture pinned`);
    }
    return decision;
  }

  /** Waits for the watch's first list, at most the read timeout. */
  async #firstList(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, this.timeoutMs)));
    try {
      await Promise.race([this.#reflector.synced, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * Follows the DaemonSet through the Reflector's lists and watch events, and remembers a deletion.
 * A deletion is a DELETED event (background deletion), an object with metadata.deletionTimestamp
 * (foreground deletion), or a new list without the DaemonSet after it was seen, which means that it
 * was deleted while the watch was down. A DaemonSet seen again without deletionTimestamp was created
 * again, which cancels the remembered deletion. Nothing here reaches the mesh state.
 */
class DaemonSetTracker implements ReflectorStore {
  sighting: Sighting = "unknown";
  deletion: StopDecision | undefined;
  /** The DaemonSet found in the list being read, if any; undefined while no list is read. */
  #listing: { found?: unknown } | undefined;

  constructor(
    private readonly ref: DaemonSetRef,
    private readonly logger: Logger,
  ) {}

  beginList(): void {
    this.#listing = {};
  }

  listPage(objects: unknown[]): void {
    const found = objects.find((object) => this.#isTheDaemonSet(object));
    if (this.#listing && found !== undefined) this.#listing.found = found;
  }

  endList(): void {
    const listing = this.#listing;
    this.#listing = undefined;
    if (listing === undefined) return;
    if (listing.found !== undefined) {
      this.#observe(listing.found);
    } else if (this.sighting === "seen") {
      this.#remember(`DaemonSet ${refText(this.ref)} was deleted (missing from a new list at ${new Date().toISOString()})`);
    } else if (this.sighting === "unknown") {
      this.sighting = "missing";
      this.logger.warn({ daemonset: refText(this.ref) }, `DaemonSet ${refText(this.ref)} not found: check --daemonset. A DaemonSet not found at a stop signal does not count as an uninstall until the watch has seen it`);
    }
  }

  abortList(): void {
    this.#listing = undefined;
  }

  upsert(object: unknown): void {
    if (this.#isTheDaemonSet(object)) this.#observe(object);
  }

  remove(object: unknown): void {
    if (this.#isTheDaemonSet(object)) this.#remember(`DaemonSet ${refText(this.ref)} was deleted (watch event at ${new Date().toISOString()})`);
  }

  #isTheDaemonSet(object: unknown): boolean {
    const metadata = (object as { metadata?: { name?: unknown; namespace?: unknown } } | null)?.metadata;
    return metadata?.name === this.ref.name && metadata.namespace === this.ref.namespace;
  }

  #observe(object: unknown): void {
    const firstSight = this.sighting !== "seen";
    this.sighting = "seen";
    const since = (object as { metadata?: { deletionTimestamp?: unknown } }).metadata?.deletionTimestamp;
    if (typeof since === "string" && since !== "") {
      this.#remember(deletingReason(this.ref, since));
      return;
    }
    if (this.deletion) {
      this.deletion = undefined;
      this.logger.info({ daemonset: refText(this.ref) }, `DaemonSet ${refText(this.ref)} created again: a stop signal no longer uninstalls the agent`);
    } else if (firstSight) {
      this.logger.info({ daemonset: refText(this.ref) }, `found DaemonSet ${refText(this.ref)}: a stop signal once it is deleted uninstalls the agent from this node`);
    }
  }

  /** Keeps the first deletion seen; a DELETED event after a deletionTimestamp changes nothing. */
  #remember(reason: string): void {
    if (this.deletion) return;
    this.deletion = { uninstall: true, reason };
    this.logger.info({ daemonset: refText(this.ref), reason }, `${reason}: a stop signal now uninstalls the agent from this node`);
  }
}

function deletingReason(ref: DaemonSetRef, since: string): string {
  return `DaemonSet ${refText(ref)} is being deleted (deletionTimestamp ${since})`;
}

/** Maps what the read at the stop signal returned to a stop decision (see UninstallCheck). */
export function decisionOf(state: DaemonSetState, ref: DaemonSetRef, sighting: Sighting): StopDecision {
  const which = `DaemonSet ${refText(ref)}`;
  switch (state.kind) {
    case "deleting":
      return { uninstall: true, reason: deletingReason(ref, state.since) };
    case "not-found":
      if (sighting === "missing") return { uninstall: false, reason: `${which} not found, as at start, so --daemonset may name the wrong object` };
      if (sighting === "unknown") return { uninstall: false, reason: `${which} not found, and no list of it has succeeded since the agent started, so --daemonset may name the wrong object` };
      return { uninstall: true, reason: `${which} not found` };
    case "present":
      return { uninstall: false, reason: `${which} exists` };
    case "error":
      return { uninstall: false, reason: `cannot read ${which}: ${state.message}` };
  }
}

/** What to check when the read failed. */
function hintOf(state: { status?: number }): string {
  if (state.status === 401 || state.status === 403) {
    return "during an uninstall this means that the credentials or the Role went before the watch saw the deletion; otherwise grant the agent's service account get, list and watch on apps daemonsets for this DaemonSet";
  }
  return "check that the API server is reachable";
}

/** GETs the DaemonSet, bounded by timeoutMs whatever the credentials or the connection do. */
async function readDaemonSet(client: Pick<KubeClient, "request">, ref: DaemonSetRef, timeoutMs: number): Promise<DaemonSetState> {
  const path = `/apis/apps/v1/namespaces/${encodeURIComponent(ref.namespace)}/daemonsets/${encodeURIComponent(ref.name)}`;
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`GET ${path} timed out after ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    const object = await Promise.race([client.request("GET", path, { timeoutMs }), timeout]);
    return stateOf(object, ref);
  } catch (error) {
    const status = statusOf(error);
    if (status === 404) return { kind: "not-found" };
    return { kind: "error", status, message: (error as Error).message };
  } finally {
    clearTimeout(timer);
  }
}

function stateOf(object: unknown, ref: DaemonSetRef): DaemonSetState {
  const daemonSet = object as { kind?: unknown; metadata?: { name?: unknown; namespace?: unknown; deletionTimestamp?: unknown } } | null;
  const metadata = daemonSet?.metadata;
  if (daemonSet?.kind !== "DaemonSet" || metadata?.name !== ref.name || metadata.namespace !== ref.namespace) {
    return { kind: "error", message: `the API server returned something other than DaemonSet ${refText(ref)}` };
  }
  const since = metadata.deletionTimestamp;
  if (typeof since === "string" && since !== "") return { kind: "deleting", since };
  return { kind: "present" };
}

/** Removes the agent's plugin entry from the node's CNI configuration, as `agentctl cni remove` does. */
export function removeCniEntry(confDir: string, logger: Logger): void {
  try {
    const changed = unchain(confDir);
    logger.info({ confDir, files: changed }, changed.length > 0 ? "removed the CNI plugin entry: new pods start without waiting for an agent" : "no CNI configuration file had the plugin entry");
  } catch (error) {
    logger.error({ err: error, confDir }, `failed to remove the CNI plugin entry; new pods wait for an agent until \`agentctl cni remove --conf-dir ${confDir}\` removes it`);
  }
}

/** Removes every pin under the pin root, as `agentctl capture remove` does: the capture programs detach. */
export function removePinnedCapture(pinRoot: string, logger: Logger): void {
  try {
    const removed = Capture.remove(pinRoot);
    logger.info({ pinRoot }, removed ? "removed the pinned capture: the programs are detached" : "nothing was pinned");
  } catch (error) {
    logger.error({ err: error, pinRoot }, `failed to remove the pinned capture; remove it with \`agentctl capture remove --pin-root ${pinRoot}\``);
  }
}
