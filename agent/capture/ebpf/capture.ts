// Capture: the eBPF programs that steer enrolled pods' TCP connections to the outbound proxy
// and, inbound, to the pods' 15006 listeners, and the maps the agent shares with them. Maps,
// links and programs are pinned under one bpffs directory, so capture keeps working while the
// agent restarts:
//   <pinRoot>/maps/<map name>          aa_enrolled, aa_orig_dst, aa_sk_orig, aa_inbound_pods,
//                                      aa_inbound, aa_own_conns, aa_agent_socks,
//                                      aa_probe_sources, aa_excluded_ports (see exemptions.ts)
//                                      aa_enrolled6, aa_orig_dst6, aa_sk_orig6, aa_inbound_pods6,
//                                      aa_inbound6, aa_own_conns6 (IPv6, see ipv6.ts)
//   <pinRoot>/links/<program name>     one bpf_link per cgroup program, on the cgroup v2 root
//   <pinRoot>/progs/aa_sk_lookup       the inbound program (see inbound.ts)
//   <pinRoot>/links/sk_lookup-<cookie> one bpf_link per pod network namespace
import fs from "node:fs";
import net from "node:net";
import path from "node:path";

import { AgentError } from "../../errors";
import type { Logger } from "../../log";
import { CaptureExemptions } from "./exemptions";
import { InboundCapture, type InboundPod } from "./inbound";
import { Ipv6Capture } from "./ipv6";
import { isNativeIpv6 } from "./layout-ip6";
import {
  COOKIE_SIZE,
  MAP_AGENT_SOCKETS,
  MAP_ENROLLED,
  MAP_ORIGINAL_DESTINATION,
  PROGRAM_NAMES,
  STRUCT_LAYOUTS,
  decodeCookie,
  decodeOriginalDestination,
  encodeCookie,
  encodeOriginalDestinationKey,
  encodePodInfo,
} from "../layout";
import { closeFd, loadNative, registerAgentSocketMap, unregisterAgentSocketMap } from "../native";
import { captureAttach, mapDelete, mapKeys, mapLookupAndDelete, mapOpen, mapUpdate } from "./native-bpf";

export interface CaptureOptions {
  /** bpffs directory that contains this agent's pins, for example /sys/fs/bpf/ambient-agent/<node>. */
  pinRoot: string;
  /** cgroup v2 directory the programs attach to; the root (for example /sys/fs/cgroup/unified) covers every pod. */
  cgroupPath: string;
  /** The prebuilt object, bpf/capture.bpf.o. */
  objectPath: string;
}

/**
 * The pod_ip4 of an IPv6-only pod in aa_enrolled and aa_inbound_pods6: it has no IPv4 address,
 * so connect4 rejects its IPv4 connections and none of its ports is excluded.
 */
const NO_POD_IPV4 = "0.0.0.0";

/** Upper bound of an enrolled-map walk. The map has at most 4096 entries (AA_MAX_ENROLLED in bpf/lib/config.h). */
const MAX_ENROLLED_KEYS = 8192;

export class Capture {
  private enrolledFd: number;
  private originalDestinationFd: number;
  /** aa_agent_socks, registered with netnsSocket so that it flags the agent's sockets. */
  private agentSocketsFd: number;

  private constructor(
    readonly pinRoot: string,
    enrolledFd: number,
    originalDestinationFd: number,
    agentSocketsFd: number,
    private readonly inbound: InboundCapture,
    /** Probe sources and annotation-excluded ports, which capture lets through. */
    readonly exemptions: CaptureExemptions,
    /** The IPv6 maps: native IPv6 connections of pods that have an IPv6 address. */
    private readonly ipv6: Ipv6Capture,
  ) {
    this.enrolledFd = enrolledFd;
    this.originalDestinationFd = originalDestinationFd;
    this.agentSocketsFd = agentSocketsFd;
    registerAgentSocketMap(agentSocketsFd);
  }

  /**
   * Loads the object with its maps pinned under pinRoot (reusing pinned maps and their
   * contents), and attaches every program. Links pinned by an earlier run get the new program
   * in place, so capture does not lapse across a restart. From then on netnsSocket flags the
   * agent's sockets in aa_agent_socks, until close().
   */
  static attach(options: CaptureOptions, logger: Logger): Capture {
    loadNative();
    const linkDirectory = path.join(options.pinRoot, "links");
    const pinnedBefore = PROGRAM_NAMES.filter((name) => fs.existsSync(path.join(linkDirectory, name)));

    const programs = captureAttach(options.objectPath, options.pinRoot, options.cgroupPath);
    logger.info(
      { pinRoot: options.pinRoot, cgroupPath: options.cgroupPath, objectPath: options.objectPath, programs, updatedInPlace: pinnedBefore },
      pinnedBefore.length > 0 ? "capture programs updated in place" : "capture programs attached",
    );

    const opened: number[] = [];
    try {
      opened.push(mapOpen(path.join(options.pinRoot, "maps", MAP_ENROLLED)));
      opened.push(mapOpen(path.join(options.pinRoot, "maps", MAP_ORIGINAL_DESTINATION)));
      opened.push(mapOpen(path.join(options.pinRoot, "maps", MAP_AGENT_SOCKETS)));
      const inbound = InboundCapture.open(options.pinRoot, logger);
      let exemptions: CaptureExemptions;
      let ipv6: Ipv6Capture;
      try {
        exemptions = CaptureExemptions.open(options.pinRoot);
      } catch (error) {
        inbound.close();
        throw error;
      }
      try {
        ipv6 = Ipv6Capture.open(options.pinRoot, logger);
      } catch (error) {
        inbound.close();
        exemptions.close();
        throw error;
      }
      return new Capture(options.pinRoot, opened[0], opened[1], opened[2], inbound, exemptions, ipv6);
    } catch (error) {
      for (const fd of opened) closeFd(fd);
      throw error;
    }
  }

  /**
   * Starts capturing the pod whose network namespace has this cookie; its proxy listens on
   * podIp:15001. Replaces the pod's entry when it is already enrolled. While nothing listens on
   * podIp:15001, the pod's outbound connections are refused. podIp is the pod's IPv4 address, or
   * its IPv6 address when it has no IPv4 one. The entry then contains pod_ip4 0, so connect4 rejects
   * its IPv4 connections with EPERM, and enrollIpv6 must name the IPv6 address.
   */
  enroll(cookie: bigint, podIp: string): void {
    mapUpdate(this.enrolledFd, encodeCookie(cookie), encodePodInfo(isNativeIpv6(podIp) ? NO_POD_IPV4 : podIp));
  }

  /**
   * Captures the pod's native IPv6 connections too, to [podIp6]:15001, for a pod enrolled with
   * enroll(). undefined stops that: its native IPv6 connects then fail with EPERM, as for a pod
   * without IPv6. While nothing listens on [podIp6]:15001, they are refused.
   */
  enrollIpv6(cookie: bigint, podIp6: string | undefined): void {
    this.ipv6.setPodIp(cookie, podIp6);
  }

  /** Stops capturing new connections of the pod (IPv4 and IPv6); connections already redirected stay with the proxy. */
  unenroll(cookie: bigint): void {
    mapDelete(this.enrolledFd, encodeCookie(cookie));
    this.ipv6.setPodIp(cookie, undefined);
  }

  enrolledCookies(): bigint[] {
    return mapKeys(this.enrolledFd, COOKIE_SIZE, MAX_ENROLLED_KEYS).map(decodeCookie);
  }

  /**
   * Returns and deletes the address that the application dialled, for a connection the
   * outbound proxy accepted inside the pod with this netns cookie from sourceIp:sourcePort.
   * Returns undefined when the connection was not captured (or the entry was already taken).
   */
  takeOriginalDestination(cookie: bigint, sourceIp: string, sourcePort: number): { ip: string; port: number } | undefined {
    if (isNativeIpv6(sourceIp)) return this.ipv6.takeOriginalDestination(cookie, sourceIp, sourcePort);
    const key = encodeOriginalDestinationKey(cookie, sourceIp, sourcePort);
    const value = Buffer.alloc(STRUCT_LAYOUTS.aa_orig_dst.size);
    if (!mapLookupAndDelete(this.originalDestinationFd, key, value)) return undefined;
    return decodeOriginalDestination(value);
  }

  /**
   * Starts steering the pod's inbound TCP connections to its 15006 listener (listenerFd, a
   * listening socket made in the pod's namespace). Links sk_lookup to the namespace at
   * netnsPath, or reuses the link pinned for this cookie. Calling it again for the pod, also
   * after guardInbound, replaces the listener. See InboundCapture.attach.
   */
  attachInbound(netnsPath: string, cookie: bigint, podIp: string, listenerFd: number): void {
    if (isNativeIpv6(podIp)) {
      throw new AgentError("INTERNAL", `attaching an IPv4 15006 listener to the IPv6 address ${podIp} is not possible: use attachInbound6 for IPv6 listeners`);
    }
    this.inbound.attach(netnsPath, cookie, podIp, listenerFd);
  }

  /**
   * Links sk_lookup to the namespace of an IPv6-only pod (or reuses the pinned link) and writes
   * no entry. IPv4 to the namespace is then dropped (loopback excepted), and IPv6 follows
   * aa_inbound_pods6. attachInbound6 then adds the pod's IPv6 listener.
   */
  linkInbound(netnsPath: string, cookie: bigint): void {
    this.inbound.linkNamespace(netnsPath, cookie);
  }

  /**
   * Drops every inbound TCP connection to the pod until attachInbound supplies a listener: for a
   * pod whose proxy could not start, so that it is isolated rather than open. Links sk_lookup to
   * the namespace at netnsPath (or reuses the pinned link) and removes the pod's listener entry.
   */
  guardInbound(netnsPath: string, cookie: bigint, podIp: string): void {
    if (isNativeIpv6(podIp)) {
      // An IPv6-only pod has no IPv4 entry: the link alone makes sk_lookup drop IPv4 to the
      // namespace, and IPv6 to podIp once its entries are gone.
      this.ipv6.detach(cookie, podIp);
      this.inbound.linkNamespace(netnsPath, cookie);
      return;
    }
    this.inbound.guard(netnsPath, cookie, podIp);
  }

  /**
   * Starts steering the pod's inbound IPv6 connections to podIp6 to its IPv6 15006 listener
   * (listenerFd). Call it after attachInbound, guardInbound or linkInbound, which link sk_lookup
   * to the pod's namespace. podIp4 is the pod's IPv4 address, under which its excluded ports are kept.
   * undefined or an IPv6 address (the status.podIP of an IPv6-only pod) means that it has none.
   */
  attachInbound6(cookie: bigint, podIp6: string, podIp4: string | undefined, listenerFd: number): void {
    const ip4 = podIp4 !== undefined && net.isIPv4(podIp4) ? podIp4 : NO_POD_IPV4;
    this.ipv6.attach(cookie, podIp6, ip4, listenerFd);
  }

  /**
   * Stops steering the pod's inbound connections to podIp. For an IPv4 address it deletes the
   * pod's entries, every IPv6 one of the cookie included, and unpins its link. For an IPv6
   * address only that address's entries go, and IPv6 to it is dropped while the link stays.
   */
  detachInbound(cookie: bigint, podIp: string): void {
    if (isNativeIpv6(podIp)) {
      this.ipv6.detach(cookie, podIp);
      return;
    }
    this.ipv6.detach(cookie);
    this.inbound.detach(cookie, podIp);
  }

  /** Deletes the inbound entries of one old IP of the pod and keeps its sk_lookup link. See InboundCapture.forget. */
  forgetInboundIp(cookie: bigint, podIp: string): void {
    if (isNativeIpv6(podIp)) this.ipv6.detach(cookie, podIp);
    else this.inbound.forget(cookie, podIp);
  }

  /** Unpins the sk_lookup link of the netns with this cookie and leaves every map entry as it is. */
  unlinkInbound(cookie: bigint): void {
    this.inbound.unlink(cookie);
  }

  /** Pods whose IP the inbound program guards, with their netns cookies. */
  inboundPods(): InboundPod[] {
    const pods6 = this.ipv6.pods().map(({ podIp, cookie }) => ({ podIp, cookie }));
    return [...this.inbound.pods(), ...pods6];
  }

  /** Netns cookies that have a pinned inbound link, including links of pods since deleted. */
  inboundLinkCookies(): bigint[] {
    return this.inbound.linkedCookies();
  }

  /**
   * Lists the pins of this capture that are gone from pinRoot: the maps this instance opened and
   * the cgroup programs' links. remove() in another agent, as its uninstall runs, removes them,
   * and the programs then detach while this instance's maps still accept entries.
   */
  missingPins(): string[] {
    const pins = [
      ...[MAP_ENROLLED, MAP_ORIGINAL_DESTINATION, MAP_AGENT_SOCKETS].map((name) => path.join(this.pinRoot, "maps", name)),
      ...PROGRAM_NAMES.map((name) => path.join(this.pinRoot, "links", name)),
    ];
    return pins.filter((pin) => !fs.existsSync(pin));
  }

  /**
   * Closes this process's map file descriptors, after which netnsSocket no longer flags sockets
   * through this instance. The pins stay, so the programs keep capturing.
   */
  close(): void {
    if (this.agentSocketsFd >= 0) unregisterAgentSocketMap(this.agentSocketsFd);
    for (const fd of [this.enrolledFd, this.originalDestinationFd, this.agentSocketsFd]) {
      if (fd >= 0) closeFd(fd);
    }
    this.enrolledFd = -1;
    this.originalDestinationFd = -1;
    this.agentSocketsFd = -1;
    this.inbound.close();
    this.exemptions.close();
    this.ipv6.close();
  }

  /**
   * Removes every pin under pinRoot. The links detach once no file descriptor refers to them, so
   * capture stops. Does nothing when pinRoot does not exist.
   */
  static remove(pinRoot: string): boolean {
    if (!fs.existsSync(pinRoot)) return false;
    assertCapturePinRoot(pinRoot);
    // Links first, so the hooks detach before the programs and maps lose their pins.
    for (const directory of ["links", "progs", "maps"]) {
      const folder = path.join(pinRoot, directory);
      if (!fs.existsSync(folder)) continue;
      for (const name of fs.readdirSync(folder)) fs.unlinkSync(path.join(folder, name));
      fs.rmdirSync(folder);
    }
    fs.rmdirSync(pinRoot);
    return true;
  }
}

/** Magic number of bpffs in statfs(2), from linux/magic.h. */
const BPF_FS_MAGIC = 0xcafe4a11;

/**
 * Throws unless `pinRoot` is a folder on bpffs holding only the capture layout (links, progs, maps),
 * so that a mistyped path never deletes anything else.
 */
function assertCapturePinRoot(pinRoot: string): void {
  if (fs.statfsSync(pinRoot).type !== BPF_FS_MAGIC) {
    throw new AgentError("INTERNAL", `${pinRoot} is not on bpffs, so it holds no capture pins; check the --pin-root or --node value`);
  }
  const unexpected = fs.readdirSync(pinRoot).filter((name) => !["links", "progs", "maps"].includes(name));
  if (unexpected.length > 0) {
    throw new AgentError(
      "INTERNAL",
      `${pinRoot} holds ${unexpected.join(", ")} besides the capture pins (links, progs, maps); it is not a capture pin root, so nothing was removed`,
    );
  }
}
