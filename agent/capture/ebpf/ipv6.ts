// IPv6 capture: the maps that let connect6 steer an enrolled pod's native IPv6 connections to
// [podIPv6]:15001 and sk_lookup steer inbound IPv6 connections to the pod's IPv6 15006 listener.
// A pod enters these maps only when it has an IPv6 address. Without one, connect6 rejects its
// native IPv6 connects (EPERM) and sk_lookup drops IPv6 to it, as before IPv6 was captured.
//   maps/aa_enrolled6       netns cookie -> the pod's IPv6 address
//   maps/aa_orig_dst6       {cookie, application's address} -> the IPv6 destination it dialled
//   maps/aa_inbound_pods6   pod IPv6 address -> {netns cookie, pod IPv4 address}
//   maps/aa_inbound6        {pod IPv6 address, 15006} -> the IPv6 listener socket (a sockhash)
import path from "node:path";

import type { Logger } from "../../log";
import { COOKIE_SIZE, INBOUND_PLAINTEXT_PORT, STRUCT_LAYOUTS, decodeCookie, encodeCookie, encodeListenerFd } from "../layout";
import {
  MAP_ENROLLED6,
  MAP_INBOUND_LISTENERS6,
  MAP_INBOUND_PODS6,
  MAP_ORIGINAL_DESTINATION6,
  decodeInboundPod6,
  decodeIpv6Key,
  decodeOriginalDestination6,
  decodePodInfo6,
  encodeInbound6Key,
  encodeInboundPod6,
  encodeIpv6Key,
  encodeOriginalDestination6Key,
  encodePodInfo6,
} from "./layout-ip6";
import { closeFd } from "../native";
import { mapDelete, mapKeys, mapLookup, mapLookupAndDelete, mapOpen, mapUpdate } from "./native-bpf";

/** Upper bound of a walk of a per-pod map, which has at most 4096 entries (AA_MAX_ENROLLED). */
const MAX_POD_KEYS = 8192;

/** A pod whose IPv6 address sk_lookup guards. */
export interface InboundPod6 {
  podIp: string;
  cookie: bigint;
  /** The pod's IPv4 address, under which its excluded ports are kept. */
  podIp4: string;
}

export class Ipv6Capture {
  private readonly fds: number[];

  private constructor(
    private readonly enrolledFd: number,
    private readonly originalDestinationFd: number,
    private readonly podsFd: number,
    private readonly listenersFd: number,
    private readonly logger: Logger,
  ) {
    this.fds = [enrolledFd, originalDestinationFd, podsFd, listenersFd];
  }

  /** Opens the pinned IPv6 maps, which Capture.attach must have pinned. */
  static open(pinRoot: string, logger: Logger): Ipv6Capture {
    const opened: number[] = [];
    try {
      for (const name of [MAP_ENROLLED6, MAP_ORIGINAL_DESTINATION6, MAP_INBOUND_PODS6, MAP_INBOUND_LISTENERS6]) {
        opened.push(mapOpen(path.join(pinRoot, "maps", name)));
      }
    } catch (error) {
      for (const fd of opened) closeFd(fd);
      throw error;
    }
    return new Ipv6Capture(opened[0], opened[1], opened[2], opened[3], logger);
  }

  /**
   * Captures the native IPv6 connections of the enrolled pod with this cookie to [podIp6]:15001.
   * undefined stops that, so they are rejected again. The pod needs its aa_enrolled entry too.
   */
  setPodIp(cookie: bigint, podIp6: string | undefined): void {
    if (podIp6 === undefined) mapDelete(this.enrolledFd, encodeCookie(cookie));
    else mapUpdate(this.enrolledFd, encodeCookie(cookie), encodePodInfo6(podIp6));
  }

  /** Returns the IPv6 address that aa_enrolled6 has for the cookie. */
  podIp(cookie: bigint): string | undefined {
    const value = Buffer.alloc(STRUCT_LAYOUTS.aa_pod_info6.size);
    return mapLookup(this.enrolledFd, encodeCookie(cookie), value) ? decodePodInfo6(value).podIp6 : undefined;
  }

  enrolledCookies(): bigint[] {
    return mapKeys(this.enrolledFd, COOKIE_SIZE, MAX_POD_KEYS).map(decodeCookie);
  }

  /** Returns and deletes the IPv6 destination of a connection the outbound proxy accepted from [sourceIp]:sourcePort. */
  takeOriginalDestination(cookie: bigint, sourceIp: string, sourcePort: number): { ip: string; port: number } | undefined {
    const key = encodeOriginalDestination6Key(cookie, sourceIp, sourcePort);
    const value = Buffer.alloc(STRUCT_LAYOUTS.aa_orig_dst6.size);
    if (!mapLookupAndDelete(this.originalDestinationFd, key, value)) return undefined;
    return decodeOriginalDestination6(value);
  }

  /**
   * Starts steering inbound IPv6 connections to podIp6 to the listener (the pod's IPv6 15006
   * socket). The pod's netns must already have its sk_lookup link (InboundCapture.attach or
   * guard), which serves both families. The listener goes in before the pod entry, so sk_lookup
   * never finds the pod without it.
   */
  attach(cookie: bigint, podIp6: string, podIp4: string, listenerFd: number): void {
    mapUpdate(
      this.listenersFd,
      encodeInbound6Key(podIp6, INBOUND_PLAINTEXT_PORT),
      encodeListenerFd(listenerFd),
      `inserting the IPv6 ${INBOUND_PLAINTEXT_PORT} listener (fd ${listenerFd}) of pod ${podIp6} into ${MAP_INBOUND_LISTENERS6}`,
      "Pass the file descriptor of an open, listening TCP/IPv6 socket created in the pod's network namespace.",
    );
    mapUpdate(this.podsFd, encodeIpv6Key(podIp6), encodeInboundPod6(cookie, podIp4));
    this.logger.info({ cookie: cookie.toString(), podIp: podIp6, listenerFd }, "inbound IPv6 capture attached");
  }

  /**
   * Stops steering inbound IPv6 connections to the pod's addresses: deletes the entries of
   * `podIp6`, or of every IPv6 address of the cookie when podIp6 is undefined. sk_lookup then
   * drops IPv6 to those addresses while the pod's link stays. Entries of another pod stay.
   */
  detach(cookie: bigint, podIp6?: string): void {
    const addresses = podIp6 !== undefined ? [podIp6] : this.pods().filter((pod) => pod.cookie === cookie).map((pod) => pod.podIp);
    for (const address of addresses) {
      const owner = this.ownerOf(address);
      if (owner !== undefined && owner !== cookie) continue;
      // The pod entry goes first, so that sk_lookup drops rather than assigns meanwhile.
      mapDelete(this.podsFd, encodeIpv6Key(address));
      mapDelete(this.listenersFd, encodeInbound6Key(address, INBOUND_PLAINTEXT_PORT));
      this.logger.info({ cookie: cookie.toString(), podIp: address }, "inbound IPv6 capture detached");
    }
  }

  /** Lists the pods whose IPv6 address sk_lookup guards. */
  pods(): InboundPod6[] {
    const value = Buffer.alloc(STRUCT_LAYOUTS.aa_inbound_pod6.size);
    const pods: InboundPod6[] = [];
    for (const key of mapKeys(this.podsFd, STRUCT_LAYOUTS.aa_ip6_key.size, MAX_POD_KEYS)) {
      if (!mapLookup(this.podsFd, key, value)) continue;
      const { cookie, podIp4 } = decodeInboundPod6(value);
      pods.push({ podIp: decodeIpv6Key(key), cookie, podIp4 });
    }
    return pods;
  }

  /** Closes this process's map file descriptors. Pins and entries stay. */
  close(): void {
    for (const fd of this.fds.splice(0)) closeFd(fd);
  }

  private ownerOf(podIp6: string): bigint | undefined {
    const value = Buffer.alloc(STRUCT_LAYOUTS.aa_inbound_pod6.size);
    return mapLookup(this.podsFd, encodeIpv6Key(podIp6), value) ? decodeInboundPod6(value).cookie : undefined;
  }
}
