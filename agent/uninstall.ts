// Uninstall detection (--daemonset NAMESPACE/NAME). The agent lists and watches the DaemonSet that
// runs it from start and reads it at a stop signal. An uninstall makes the agent remove what it
// installed on the node: its CNI plugin entry, every pod's enrolment and its pinned capture, after
// which plaintext reaches the formerly enrolled pods. Every doubtful case is therefore a plain stop,
// which keeps capture pinned so that enrolled pods fail closed until the next agent serves them.
//
// The read at the stop decides whenever the API server itself responds to it. The DaemonSet without
// deletionTimestamp means a restart, even after a deletion that the watch saw, because it was then
// created again while the watch was down. With deletionTimestamp, or a NotFound Status for a
// DaemonSet that the watch saw before, it means an uninstall. Only a 404 whose body is the API
// server's NotFound Status naming this DaemonSet counts as not found, because a proxy or an API
// server that is still starting also responds with 404.
//
// The watch decides only when the read fails. `helm uninstall` deletes the DaemonSet and, in the
// same pass, the Role, the bindings and the ServiceAccount, without waiting for the pods, so the
// read at the stop signal gets 401 or 403. A watch stream is authorized only when it opens, so the
// DaemonSet's deletion still reaches an agent whose credentials stop working right after. Only a
// DELETED event or the object with deletionTimestamp, for the uid that the watch saw before, counts
// as a watched deletion. A new list without the DaemonSet proves nothing (an etcd restore, another
// store behind a proxy), so it leaves the deletion unknown.

import fs from "node:fs";

import { Capture } from "./capture/ebpf/capture";
import { NftCapture } from "./capture/nft/capture";
import { removeProbeSnat } from "./capture/nft/probe-snat";
import { unchain } from "./cni/chain";
import { KubeApiError, statusOf, type KubeClient } from "./discovery/kube-client";
import { Reflector, type ReflectorOptions, type ReflectorStore, type ResourceSpec } from "./discovery/kube-reflector";
import type { Logger } from "./log";

/** The DaemonSet that runs this agent. */
export interface DaemonSetRef {
  namespace: string;
  name: string;
}

/** How long the read of the DaemonSet at a stop signal may take before it counts as unreachable. */
export const DAEMONSET_READ_TIMEOUT_MS = 2_000;

/** The outcome of a stop: uninstall, or keep capture pinned. `reason` explains why, for the log and the agent.stopped record. */
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

/** The watch's record of the DaemonSet since the agent started. */
export interface WatchRecord {
  /** Whether a list or a watch event has contained the DaemonSet. */
  seen: boolean;
  /** Whether a list has completed. */
  listed: boolean;
  /** The reason of the deletion that the watch saw, unless the DaemonSet appeared again after it. */
  deletion?: string;
}

/** A stop decision with its source: the read at the stop signal, or the watch when the read failed. */
export interface SourcedDecision extends StopDecision {
  source: "read at stop" | "watch";
}

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
 * Decides at a stop signal whether the stop is an uninstall: the read of the DaemonSet decides when
 * the API server responds to it, and a deletion that the watch saw decides when the read fails (see
 * decisionOf). A DaemonSet not found counts as an uninstall only when the watch saw it before,
 * because one never seen most likely means that --daemonset names the wrong object, and every
 * restart would then remove the node's capture.
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

  /** Returns the reason of the deletion that the watch saw, or undefined while it has seen none. */
  watchedDeletion(): string | undefined {
    return this.#tracker.deletion;
  }

  /**
   * Reads the DaemonSet, decides with what the watch recorded, and logs the decision, its source
   * and why. Takes at most about twice the read timeout: it first waits that long for the watch's
   * first list when it has not completed yet.
   */
  async decide(): Promise<SourcedDecision> {
    await this.#firstList();
    const state = await readDaemonSet(this.client, this.ref, this.timeoutMs);
    // Taken after the read, so that a watch event that arrived during it counts when the read failed.
    return this.#logged(decisionOf(state, this.ref, this.#tracker.record()), state);
  }

  /** Logs the decision, its source and what the read at the stop returned, and returns the decision. */
  #logged(decision: SourcedDecision, state: DaemonSetState): SourcedDecision {
    const record = this.#tracker.record();
    const fields = {
      daemonset: refText(this.ref),
      source: decision.source,
      state: state.kind,
      status: state.kind === "error" ? state.status : undefined,
      readError: state.kind === "error" ? state.message : undefined,
      seen: record.seen,
      watchedDeletion: record.deletion,
      reason: decision.reason,
    };
    if (decision.uninstall) {
      this.logger.info(fields, `uninstall: ${decision.reason}; ${basisOf(decision, state)}; removing the CNI plugin entry, every pod's enrolment and the pinned capture`);
    } else if (state.kind === "error") {
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
 * Follows the DaemonSet through the Reflector's lists and watch events. It remembers a deletion
 * from a DELETED event (background deletion) or the object with metadata.deletionTimestamp
 * (foreground deletion), and only when the object's metadata.uid is the one seen before. An event
 * for another uid comes from an older object of the same name. A new list without the DaemonSet is
 * logged and changes nothing. The DaemonSet seen again without deletionTimestamp was created again,
 * which cancels the remembered deletion. Nothing here reaches the mesh state.
 */
class DaemonSetTracker implements ReflectorStore {
  seen = false;
  listed = false;
  deletion: string | undefined;
  /** metadata.uid of the DaemonSet as the watch saw it last; undefined before that or when the object had none. */
  #uid: string | undefined;
  /** The DaemonSet found in the list being read, if any; undefined while no list is read. */
  #listing: { found?: unknown } | undefined;

  constructor(
    private readonly ref: DaemonSetRef,
    private readonly logger: Logger,
  ) {}

  record(): WatchRecord {
    return { seen: this.seen, listed: this.listed, deletion: this.deletion };
  }

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
    const firstList = !this.listed;
    this.listed = true;
    if (listing.found !== undefined) {
      this.#observe(listing.found);
    } else if (this.seen) {
      this.logger.info({ daemonset: refText(this.ref) }, `DaemonSet ${refText(this.ref)} is missing from a new list, which is no proof of deletion: a stop signal reads it to decide`);
    } else if (firstList) {
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
    if (!this.#isTheDaemonSet(object)) return;
    const uid = uidOf(object);
    if (uid !== undefined && uid === this.#uid) this.#remember(`DaemonSet ${refText(this.ref)} was deleted (watch event at ${new Date().toISOString()})`);
    else this.#ignore("a DELETED event", uid, this.#uid);
  }

  #isTheDaemonSet(object: unknown): boolean {
    const metadata = (object as { metadata?: { name?: unknown; namespace?: unknown } } | null)?.metadata;
    return metadata?.name === this.ref.name && metadata.namespace === this.ref.namespace;
  }

  #observe(object: unknown): void {
    const uid = uidOf(object);
    const previous = this.#uid;
    const firstSight = !this.seen;
    this.seen = true;
    this.#uid = uid;
    const since = (object as { metadata?: { deletionTimestamp?: unknown } }).metadata?.deletionTimestamp;
    if (typeof since === "string" && since !== "") {
      if (uid !== undefined && uid === previous) this.#remember(deletingReason(this.ref, since));
      else this.#ignore(`deletionTimestamp ${since}`, uid, previous);
      return;
    }
    if (this.deletion) {
      this.deletion = undefined;
      this.logger.info({ daemonset: refText(this.ref), uid }, `DaemonSet ${refText(this.ref)} created again: a stop signal no longer uninstalls the agent`);
    } else if (firstSight) {
      this.logger.info({ daemonset: refText(this.ref), uid }, `found DaemonSet ${refText(this.ref)}: a stop signal once it is deleted uninstalls the agent from this node`);
    }
  }

  /** Records the first deletion only, so a DELETED event after a deletionTimestamp changes nothing. */
  #remember(reason: string): void {
    if (this.deletion) return;
    this.deletion = reason;
    this.logger.info({ daemonset: refText(this.ref), uid: this.#uid, reason }, `${reason}: a stop signal now uninstalls the agent from this node unless a read shows the DaemonSet without deletionTimestamp`);
  }

  #ignore(what: string, uid: string | undefined, previous: string | undefined): void {
    this.logger.warn(
      { daemonset: refText(this.ref), uid, seenUid: previous },
      `${what} of DaemonSet ${refText(this.ref)} does not count as a deletion, because its uid (${uid ?? "none"}) is not the one the watch saw before (${previous ?? "none"})`,
    );
  }
}

function uidOf(object: unknown): string | undefined {
  const uid = (object as { metadata?: { uid?: unknown } } | null)?.metadata?.uid;
  return typeof uid === "string" && uid !== "" ? uid : undefined;
}

function deletingReason(ref: DaemonSetRef, since: string): string {
  return `DaemonSet ${refText(ref)} is being deleted (deletionTimestamp ${since})`;
}

/**
 * Maps what the read at the stop signal returned, and what the watch recorded, to a stop decision:
 *
 * 1. The DaemonSet without deletionTimestamp: a restart, also after a watched deletion.
 * 2. The DaemonSet with deletionTimestamp: an uninstall.
 * 3. The API server's NotFound Status: an uninstall when the watch saw the DaemonSet before, else a
 *    restart, because --daemonset may name the wrong object. The watched deletion, when there is
 *    one, gives the more precise reason.
 * 4. A failed read (401, 403, 5xx, a 404 without that Status, a timeout): the deletion that the
 *    watch saw, when there is one, else a restart.
 */
export function decisionOf(state: DaemonSetState, ref: DaemonSetRef, watch: WatchRecord): SourcedDecision {
  const subject = `DaemonSet ${refText(ref)}`;
  const read = "read at stop";
  switch (state.kind) {
    case "present":
      if (watch.deletion !== undefined) return { uninstall: false, source: read, reason: `${subject} exists, so it was created again after the deletion that the watch saw` };
      return { uninstall: false, source: read, reason: `${subject} exists` };
    case "deleting":
      return { uninstall: true, source: read, reason: deletingReason(ref, state.since) };
    case "not-found":
      if (watch.seen) return { uninstall: true, source: read, reason: watch.deletion ?? `${subject} not found` };
      if (watch.listed) return { uninstall: false, source: read, reason: `${subject} not found, as at start, so --daemonset may name the wrong object` };
      return { uninstall: false, source: read, reason: `${subject} not found, and no list of it has succeeded since the agent started, so --daemonset may name the wrong object` };
    case "error":
      if (watch.deletion !== undefined) return { uninstall: true, source: "watch", reason: watch.deletion };
      return { uninstall: false, source: read, reason: `cannot read ${subject}: ${state.message}` };
  }
}

/** Returns why the source of an uninstall decided it, for the log. */
function basisOf(decision: SourcedDecision, state: DaemonSetState): string {
  if (decision.source === "watch") return "the read at the stop failed, so the deletion that the watch saw decides";
  if (state.kind === "not-found") return "the read at the stop returned the API server's NotFound Status for the DaemonSet that the watch saw before";
  return "the read at the stop returned the DaemonSet with deletionTimestamp";
}

/** Returns what to check when the read failed. */
function hintOf(state: { status?: number }): string {
  if (state.status === 401 || state.status === 403) {
    return "during an uninstall this means that the credentials or the Role went before the watch saw the deletion; otherwise grant the agent's service account get, list and watch on apps daemonsets for this DaemonSet";
  }
  if (state.status === 404) {
    return "a 404 without the API server's NotFound Status for this DaemonSet comes from a proxy or an API server that is still starting; check that the agent reaches the API server itself";
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
    if (isNotFoundStatus(error, ref)) return { kind: "not-found" };
    return { kind: "error", status: statusOf(error), message: (error as Error).message };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Checks whether a failed read is the API server's own NotFound for the DaemonSet: a 404 whose body
 * is a Status with reason NotFound and details naming apps daemonsets `ref.name`, as in
 * `{"kind":"Status","reason":"NotFound","details":{"name":"NAME","group":"apps","kind":"daemonsets"},"code":404}`.
 */
function isNotFoundStatus(error: unknown, ref: DaemonSetRef): boolean {
  if (!(error instanceof KubeApiError) || error.status !== 404 || error.reason !== "NotFound") return false;
  const details = error.details;
  return details?.kind === "daemonsets" && details.group === "apps" && details.name === ref.name;
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

/**
 * Removes the nftables capture tables that the state folder still lists: those of pods that no
 * agent unenrolled, such as the previous agent's pods when the uninstall comes before this agent
 * enrolled them. Each removal is logged. Does nothing when the folder does not exist.
 */
export function removeNftCaptureTables(stateDirectory: string, logger: Logger): void {
  if (!fs.existsSync(stateDirectory)) return;
  let capture: NftCapture;
  try {
    capture = new NftCapture({ stateDirectory }, logger);
  } catch (error) {
    logger.error({ err: error, stateDirectory }, "failed to read the list of pods with an nftables capture table; their tables stay and keep them closed");
    return;
  }
  for (const cookie of capture.enrolledCookies()) {
    try {
      capture.unenroll(cookie);
    } catch (error) {
      logger.error({ err: error, cookie: cookie.toString() }, "failed to remove a pod's nftables capture table; the pod stays closed until `nft delete table inet ambient_agent` runs in its network namespace");
    }
  }
  capture.close();
}

/**
 * Removes the probe SNAT table (--probe-snat) from the host network namespace at hostNetns: new
 * kubelet probes then come from the node's address again. Writes nothing when there is no table.
 */
export function removeProbeSnatTable(hostNetns: string, logger: Logger): void {
  try {
    const removed = removeProbeSnat(hostNetns);
    if (removed) logger.info({ netns: hostNetns }, "removed the probe SNAT table: kubelet probes come from the node's address again");
  } catch (error) {
    logger.error({ err: error, netns: hostNetns }, `failed to remove the probe SNAT table; remove it with \`nsenter --net=${hostNetns} nft delete table inet ambient_agent_probes\``);
  }
}
