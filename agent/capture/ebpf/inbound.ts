// Inbound capture: the sk_lookup program, linked to each enrolled pod's network namespace,
// assigns TCP connections that arrive at the pod's IP to the pod's inbound plaintext listener
// (15006), and drops them while that listener is missing. It also drops every TCP connection over
// IPv6 to the pod, except to ::1. Pins under the capture pin root:
//   progs/aa_sk_lookup        the program, pinned by Capture.attach
//   links/sk_lookup-<cookie>  one link per pod network namespace, so capture outlives the agent
//   maps/aa_inbound_pods      pod IP -> netns cookie: which IPs sk_lookup guards
//   maps/aa_inbound           {pod IP, 15006} -> the listener socket (a sockhash)
import fs from "node:fs";
import path from "node:path";

import type { Logger } from "../../log";
import {
  INBOUND_PLAINTEXT_PORT,
  INBOUND_PROGRAM_NAME,
  IPV4_KEY_SIZE,
  MAP_INBOUND_LISTENERS,
  MAP_INBOUND_PODS,
  STRUCT_LAYOUTS,
  decodeInboundPod,
  decodeIpv4Key,
  encodeInboundKey,
  encodeInboundPod,
  encodeIpv4Key,
  encodeListenerFd,
  inboundLinkName,
  parseInboundLinkName,
} from "../layout";
import { closeFd } from "../native";
import { mapDelete, mapKeys, mapLookup, mapOpen, mapUpdate, netnsLink } from "./native-bpf";

/** Upper bound of a walk of aa_inbound_pods, which has at most 4096 entries (AA_MAX_ENROLLED). */
const MAX_INBOUND_PODS = 8192;

export interface InboundPod {
  podIp: string;
  cookie: bigint;
}

export class InboundCapture {
  private podsFd: number;
  private listenersFd: number;

  private constructor(
    readonly pinRoot: string,
    podsFd: number,
    listenersFd: number,
    private readonly logger: Logger,
  ) {
    this.podsFd = podsFd;
    this.listenersFd = listenersFd;
  }

  /** Opens the pinned inbound maps; Capture.attach must have pinned them. */
  static open(pinRoot: string, logger: Logger): InboundCapture {
    const podsFd = mapOpen(path.join(pinRoot, "maps", MAP_INBOUND_PODS));
    try {
      const listenersFd = mapOpen(path.join(pinRoot, "maps", MAP_INBOUND_LISTENERS));
      return new InboundCapture(pinRoot, podsFd, listenersFd, logger);
    } catch (error) {
      closeFd(podsFd);
      throw error;
    }
  }

  /**
   * Starts capturing the pod's inbound connections. listenerFd is the pod's 15006 listener,
   * created inside the pod's namespace and listening; it may be handed to Node before or after
   * this call. The listener goes into the sockhash first and the link comes last, so the
   * program never runs for the pod without its entries. A link pinned by an earlier run is
   * reused. Calling it again for the pod (with a new listener, or after guard) replaces the
   * listener entry.
   */
  attach(netnsPath: string, cookie: bigint, podIp: string, listenerFd: number): void {
    this.insertListener(podIp, listenerFd);
    mapUpdate(this.podsFd, encodeIpv4Key(podIp), encodeInboundPod(cookie));

    const reused = this.link(netnsPath, cookie, podIp);
    this.logger.info({ netnsPath, cookie: cookie.toString(), podIp, listenerFd, reusedLink: reused }, "inbound capture attached");
  }

  /**
   * Guards the pod's IP with no listener, so that sk_lookup drops every inbound connection to
   * the pod until attach supplies one. A listener entry left from an earlier attach is deleted.
   */
  guard(netnsPath: string, cookie: bigint, podIp: string): void {
    mapDelete(this.listenersFd, encodeInboundKey(podIp, INBOUND_PLAINTEXT_PORT));
    mapUpdate(this.podsFd, encodeIpv4Key(podIp), encodeInboundPod(cookie));

    const reused = this.link(netnsPath, cookie, podIp);
    // The reconciler logs the isolation once; this repeats on every retry, so it stays at debug level.
    this.logger.debug({ netnsPath, cookie: cookie.toString(), podIp, reusedLink: reused }, "inbound capture guards the pod with no listener: inbound connections are dropped");
  }

  /**
   * Stops capturing the pod's inbound connections: its IP stops being guarded at once, and the
   * link detaches once its pin is gone. When the IP now belongs to a pod with another cookie,
   * that pod's entries stay.
   */
  detach(cookie: bigint, podIp: string): void {
    const owner = this.podOf(podIp);
    if (owner === undefined || owner === cookie) this.deleteEntries(podIp);
    fs.rmSync(this.linkPath(cookie), { force: true });
    this.logger.info({ cookie: cookie.toString(), podIp, ownedByOtherPod: owner !== undefined && owner !== cookie }, "inbound capture detached");
  }

  /**
   * Stops guarding `podIp` for the pod with this cookie and keeps its link, for a pod whose
   * namespace stays while its IP changes. Entries that another pod owns stay.
   */
  forget(cookie: bigint, podIp: string): void {
    const owner = this.podOf(podIp);
    if (owner === undefined || owner === cookie) this.deleteEntries(podIp);
  }

  /**
   * Links sk_lookup to the namespace of a pod that has no IPv4 address, with no IPv4 entry: the
   * program then drops IPv4 to every address but loopback there. Returns true when the pinned
   * link was reused.
   */
  linkNamespace(netnsPath: string, cookie: bigint): boolean {
    return netnsLink(this.programPath(), netnsPath, this.linkPath(cookie));
  }

  /** Unpins the link of the netns with this cookie; the link detaches once no file descriptor refers to it. */
  unlink(cookie: bigint): void {
    fs.rmSync(this.linkPath(cookie), { force: true });
  }

  /** Lists the pods whose IP sk_lookup guards. */
  pods(): InboundPod[] {
    const value = Buffer.alloc(STRUCT_LAYOUTS.aa_inbound_pod.size);
    const pods: InboundPod[] = [];
    for (const key of mapKeys(this.podsFd, IPV4_KEY_SIZE, MAX_INBOUND_PODS)) {
      if (!mapLookup(this.podsFd, key, value)) continue;
      pods.push({ podIp: decodeIpv4Key(key), cookie: decodeInboundPod(value).cookie });
    }
    return pods;
  }

  /** Lists the netns cookies that have a pinned sk_lookup link. */
  linkedCookies(): bigint[] {
    let names: string[];
    try {
      names = fs.readdirSync(path.join(this.pinRoot, "links"));
    } catch {
      return [];
    }
    return names.map(parseInboundLinkName).filter((cookie): cookie is bigint => cookie !== undefined);
  }

  /** Closes this process's map file descriptors; pins, links and entries stay. */
  close(): void {
    for (const fd of [this.podsFd, this.listenersFd]) {
      if (fd >= 0) closeFd(fd);
    }
    this.podsFd = -1;
    this.listenersFd = -1;
  }

  /** Links sk_lookup to the namespace; returns true when the pinned link was reused. On failure the pod's entries are deleted. */
  private link(netnsPath: string, cookie: bigint, podIp: string): boolean {
    try {
      return netnsLink(this.programPath(), netnsPath, this.linkPath(cookie));
    } catch (error) {
      this.deleteEntries(podIp);
      throw error;
    }
  }

  private insertListener(podIp: string, listenerFd: number): void {
    mapUpdate(
      this.listenersFd,
      encodeInboundKey(podIp, INBOUND_PLAINTEXT_PORT),
      encodeListenerFd(listenerFd),
      `inserting the ${INBOUND_PLAINTEXT_PORT} listener (fd ${listenerFd}) of pod ${podIp} into ${MAP_INBOUND_LISTENERS}`,
      "Pass the file descriptor of an open, listening TCP socket created in the pod's network namespace.",
    );
  }

  private deleteEntries(podIp: string): void {
    // The pod entry goes first: without it sk_lookup lets the pod's connections through.
    mapDelete(this.podsFd, encodeIpv4Key(podIp));
    mapDelete(this.listenersFd, encodeInboundKey(podIp, INBOUND_PLAINTEXT_PORT));
  }

  /** Returns the cookie of the pod that aa_inbound_pods maps podIp to. */
  private podOf(podIp: string): bigint | undefined {
    const value = Buffer.alloc(STRUCT_LAYOUTS.aa_inbound_pod.size);
    return mapLookup(this.podsFd, encodeIpv4Key(podIp), value) ? decodeInboundPod(value).cookie : undefined;
  }

  private programPath(): string {
    return path.join(this.pinRoot, "progs", INBOUND_PROGRAM_NAME);
  }

  private linkPath(cookie: bigint): string {
    return path.join(this.pinRoot, "links", inboundLinkName(cookie));
  }
}
