// The capture backend: what the enrollment reconciler and the proxies need from capture, with one
// implementation per mode. eBPF wraps the pinned programs and maps (Capture), and nftables writes a
// table into each pod's network namespace (NftCapture).
import type net from "node:net";

import type { MapUsageView, ProgramView } from "../admin/views";
import type { Logger } from "../log";
import { Capture, type CaptureOptions } from "./ebpf/capture";
import type { CaptureExemptions } from "./ebpf/exemptions";
import type { InboundPod } from "./ebpf/inbound";
import { NftCapture } from "./nft/capture";
import { readEbpfUsage } from "./ebpf/usage";
import type { CaptureMode } from "./probe";

/** The exemptions a backend stores: probe sources and the ports pods' annotations exclude. */
export type CaptureExemptionStore = Pick<CaptureExemptions, "setProbeSources" | "setExcludedPorts" | "clearExcludedPorts" | "excludedPorts">;

/**
 * Steers the TCP connections of enrolled pods to their in-pod proxies. Pods are keyed by the
 * cookie of their network namespace. Every method fails closed: a pod stays captured until
 * unenroll() and detachInbound() both ran for it.
 */
export interface CaptureBackend {
  readonly mode: CaptureMode;
  readonly exemptions: CaptureExemptionStore;
  /** Starts capturing the pod's outbound connections to its 15001 listener. */
  enroll(cookie: bigint, podIp: string): void;
  /** Stops capturing the pod's new outbound connections. */
  unenroll(cookie: bigint): void;
  enrolledCookies(): bigint[];
  /** Starts steering the pod's inbound connections to its 15006 listener (listenerFd, made in the pod). */
  attachInbound(netnsPath: string, cookie: bigint, podIp: string, listenerFd: number): void;
  /**
   * Captures the enrolled pod's native IPv6 connections to [podIp6]:15001 (undefined: rejects
   * them again). Absent in a backend without IPv6 capture, whose pods get no IPv6 listeners.
   */
  enrollIpv6?(cookie: bigint, podIp6: string | undefined): void;
  /**
   * Steers inbound IPv6 connections to podIp6 to the pod's IPv6 15006 listener, after
   * attachInbound or guardInbound. podIp4 is the pod's IPv4 address, undefined for an IPv6-only
   * pod. Absent without IPv6 capture.
   */
  attachInbound6?(cookie: bigint, podIp6: string, podIp4: string | undefined, listenerFd: number): void;
  /**
   * Prepares inbound capture of an IPv6-only pod's namespace ahead of attachInbound6. eBPF links
   * sk_lookup with no entry, so IPv4 to the namespace is dropped at once. nftables records the
   * namespace, and attachInbound6 or guardInbound writes the table that drops it. Present only in
   * a backend that enrolls IPv6-only pods. Such a backend keeps them under their IPv6 address as
   * podIp in enroll(), guardInbound() and detachInbound(). Without it the reconciler leaves IPv6-only pods
   * unenrolled.
   */
  linkInbound?(netnsPath: string, cookie: bigint): void;
  /** Makes every inbound connection to the pod fail until attachInbound supplies a listener. */
  guardInbound(netnsPath: string, cookie: bigint, podIp: string): void;
  /**
   * Isolates one of several namespaces that have a pod's IP. Its TCP is refused both ways, and
   * nothing records it as the namespace of that IP, so a later agent does not take it for the
   * pod's. eBPF enrolls its cookie and links sk_lookup with no address entry, so every address of
   * the namespace is unknown and dropped. nftables writes its isolated table.
   */
  isolateCandidate(netnsPath: string, cookie: bigint, podIp: string): void;
  /** Stops steering the pod's inbound connections. */
  detachInbound(cookie: bigint, podIp: string): void;
  /** Forgets one old IP of a pod whose address changed inside the same namespace. */
  forgetInboundIp(cookie: bigint, podIp: string): void;
  /** Removes what inbound capture keeps per namespace (the eBPF link) for a namespace no wanted pod has. */
  unlinkInbound(cookie: bigint): void;
  inboundPods(): InboundPod[];
  inboundLinkCookies(): bigint[];
  /**
   * Returns the address the application dialled, for a connection the outbound proxy of the pod
   * with this cookie accepted, or undefined when capture has no record of it.
   */
  takeOriginalDestination(cookie: bigint, socket: net.Socket): { ip: string; port: number } | undefined;
  /**
   * Returns the address an inbound client dialled, for a connection the 15006 listener accepted.
   * eBPF assigns the connection without rewriting it, so that is the socket's local address.
   */
  inboundDestination(socket: net.Socket): { ip: string; port: number } | undefined;
  /**
   * Lists the programs (eBPF) or tables (nftables) capture has in place and the entries in use of
   * each map or set. Cheap enough for every metrics scrape: eBPF walks its maps at most once a second.
   */
  usage(): { programs: ProgramView[]; maps: MapUsageView[] };
  /**
   * Lists what of this agent's capture is gone from the node: pins (eBPF) or the tables of its
   * pods (nftables). Another agent's uninstall removes them, and this agent then captures nothing
   * through its handles.
   */
  missingCapture(): string[];
  /** Releases this process's handles. Capture itself stays, so pods fail closed while no agent runs. */
  close(): void;
}

/** The part of a backend that the enrollment reconciler uses. Capture has it as well. */
export type EnrollmentCapture = Omit<CaptureBackend, "mode" | "takeOriginalDestination" | "inboundDestination" | "usage" | "missingCapture" | "close">;

/** The calls that Capture and NftCapture take with the same signature, so a backend passes them on unchanged. */
type PassedOnCapture = Required<
  Pick<CaptureBackend, "exemptions" | "enroll" | "unenroll" | "enrolledCookies" | "enrollIpv6" | "guardInbound" | "detachInbound" | "inboundPods" | "close">
>;

/** The part of both backends that only passes calls on to the capture it wraps. */
abstract class CapturePassThrough<C extends PassedOnCapture> implements PassedOnCapture {
  constructor(readonly capture: C) {}

  get exemptions(): CaptureExemptionStore {
    return this.capture.exemptions;
  }

  enroll(cookie: bigint, podIp: string): void {
    this.capture.enroll(cookie, podIp);
  }

  unenroll(cookie: bigint): void {
    this.capture.unenroll(cookie);
  }

  enrolledCookies(): bigint[] {
    return this.capture.enrolledCookies();
  }

  enrollIpv6(cookie: bigint, podIp6: string | undefined): void {
    this.capture.enrollIpv6(cookie, podIp6);
  }

  guardInbound(netnsPath: string, cookie: bigint, podIp: string): void {
    this.capture.guardInbound(netnsPath, cookie, podIp);
  }

  detachInbound(cookie: bigint, podIp: string): void {
    this.capture.detachInbound(cookie, podIp);
  }

  inboundPods(): InboundPod[] {
    return this.capture.inboundPods();
  }

  close(): void {
    this.capture.close();
  }
}

/** How long the eBPF backend reuses a map walk in usage(), in milliseconds. */
const USAGE_CACHE_MS = 1000;

/** eBPF capture: the pinned programs and maps of Capture. */
export class EbpfCaptureBackend extends CapturePassThrough<Capture> implements CaptureBackend {
  readonly mode = "ebpf" as const;
  #usage: { at: number; value: ReturnType<CaptureBackend["usage"]> } | undefined;

  constructor(
    capture: Capture,
    /** The cgroup v2 directory the cgroup programs are attached to, as usage() reports it. */
    private readonly cgroupPath = "unknown",
  ) {
    super(capture);
  }

  static attach(options: CaptureOptions, logger: Logger): EbpfCaptureBackend {
    return new EbpfCaptureBackend(Capture.attach(options, logger), options.cgroupPath);
  }

  /** Reads the pins and walks the maps at most once per USAGE_CACHE_MS; scrapes in between get the same result. */
  usage(): ReturnType<CaptureBackend["usage"]> {
    const now = Date.now();
    if (this.#usage === undefined || now - this.#usage.at >= USAGE_CACHE_MS) {
      this.#usage = { at: now, value: readEbpfUsage(this.capture.pinRoot, this.cgroupPath) };
    }
    return this.#usage.value;
  }

  missingCapture(): string[] {
    return this.capture.missingPins();
  }

  attachInbound(netnsPath: string, cookie: bigint, podIp: string, listenerFd: number): void {
    this.capture.attachInbound(netnsPath, cookie, podIp, listenerFd);
  }

  attachInbound6(cookie: bigint, podIp6: string, podIp4: string | undefined, listenerFd: number): void {
    this.capture.attachInbound6(cookie, podIp6, podIp4, listenerFd);
  }

  forgetInboundIp(cookie: bigint, podIp: string): void {
    this.capture.forgetInboundIp(cookie, podIp);
  }

  linkInbound(netnsPath: string, cookie: bigint): void {
    this.capture.linkInbound(netnsPath, cookie);
  }

  isolateCandidate(netnsPath: string, cookie: bigint, podIp: string): void {
    this.capture.enroll(cookie, podIp);
    this.capture.linkInbound(netnsPath, cookie);
  }

  unlinkInbound(cookie: bigint): void {
    this.capture.unlinkInbound(cookie);
  }

  inboundLinkCookies(): bigint[] {
    return this.capture.inboundLinkCookies();
  }

  takeOriginalDestination(cookie: bigint, socket: net.Socket): { ip: string; port: number } | undefined {
    return this.capture.takeOriginalDestination(cookie, socket.remoteAddress ?? "", socket.remotePort ?? 0);
  }

  inboundDestination(socket: net.Socket): { ip: string; port: number } | undefined {
    return socket.localAddress === undefined || socket.localPort === undefined ? undefined : { ip: socket.localAddress, port: socket.localPort };
  }
}

/** nftables capture: one table per pod network namespace, IPv4 and IPv6. See nft/capture.ts and nft/ruleset.ts. */
export class NftCaptureBackend extends CapturePassThrough<NftCapture> implements CaptureBackend {
  readonly mode = "nftables" as const;

  attachInbound(netnsPath: string, cookie: bigint, podIp: string): void {
    this.capture.attachInbound(netnsPath, cookie, podIp);
  }

  /**
   * REDIRECT finds the IPv6 15006 listener by its port, so only the address is recorded. For an
   * IPv6-only pod (podIp4 undefined) this writes the pod's table.
   */
  attachInbound6(cookie: bigint, podIp6: string, podIp4: string | undefined): void {
    this.capture.attachInbound6(cookie, podIp6, podIp4);
  }

  /** Records an IPv6-only pod's namespace, where attachInbound6 or guardInbound then writes its table. */
  linkInbound(netnsPath: string, cookie: bigint): void {
    this.capture.linkInbound(netnsPath, cookie);
  }

  /**
   * Writes the isolated table into the namespace. Each namespace has a table of its own, so the
   * isolated table marks none as the pod's for a later agent.
   */
  isolateCandidate(netnsPath: string, cookie: bigint, podIp: string): void {
    if (podIp.includes(":")) this.capture.linkInbound(netnsPath, cookie);
    this.capture.enroll(cookie, podIp);
    this.capture.guardInbound(netnsPath, cookie, podIp);
  }

  /** The table is rewritten for the new IP when the new listener is attached, so the old IP needs nothing. */
  forgetInboundIp(): void {}

  /** A table has no per-namespace link. */
  unlinkInbound(): void {}

  inboundLinkCookies(): bigint[] {
    return [];
  }

  takeOriginalDestination(_cookie: bigint, socket: net.Socket): { ip: string; port: number } | undefined {
    return this.capture.takeOriginalDestination(socket);
  }

  usage(): ReturnType<CaptureBackend["usage"]> {
    return this.capture.usage();
  }

  missingCapture(): string[] {
    return this.capture.missingTables();
  }

  /** Returns the original destination from conntrack, because REDIRECT rewrote it to the listener's port. */
  inboundDestination(socket: net.Socket): { ip: string; port: number } | undefined {
    return this.capture.takeOriginalDestination(socket);
  }
}
