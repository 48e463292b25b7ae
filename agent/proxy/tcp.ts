// TCP helpers shared by the proxies: address formatting and connects with a deadline.

import net from "node:net";
import { socketUnackedBytes } from "../capture/native-socket-queue";
import { canonicalIp } from "../state/ip";
import type { ApplicationSource, PodNetwork } from "./pod-network";

/**
 * Ignores an "error" event. Sockets and streams need a listener so that an error does not crash
 * the process, and sharing this one spares each connection a closure. The copy or the close event
 * reports the error.
 */
export function ignoreError(): void {}

/** Formats ip:port, with IPv6 addresses in brackets. */
export function formatAddress(ip: string, port: number): string {
  return net.isIPv6(ip) ? `[${ip}]:${port}` : `${ip}:${port}`;
}

/**
 * Returns the canonical text of an address (canonicalIp): an IPv4-mapped IPv6 address becomes its
 * IPv4 form and other IPv6 addresses the lowercase compressed form. Other text is lowercased.
 */
export function normalizeIp(ip: string): string {
  // Node reports IPv4 peers in dotted form, which is canonical already: skip the parse on the common path.
  if (!ip.includes(":")) return ip;
  return canonicalIp(ip).toLowerCase();
}

/**
 * Returns how many bytes written to a TCP socket its peer has not acknowledged yet, or undefined
 * when that is unknown: no socket, no file descriptor, or no native library. The idle timeout
 * and the liveness check of HBONE sessions read it to see bytes move inside the kernel.
 */
export function unackedBytesOf(socket: net.Socket | undefined): number | undefined {
  const fd = (socket as { _handle?: { fd?: number } } | undefined)?._handle?.fd;
  if (fd === undefined || fd < 0) return undefined;
  try {
    return socketUnackedBytes(fd);
  } catch {
    // A socket closing under the call, or no native library: the kernel's progress is unknown.
    return undefined;
  }
}

/** Returns the remote address of a socket as ip:port, or "unknown" once the socket has lost it. */
export function remoteAddressOf(socket: net.Socket): string {
  return socket.remoteAddress ? formatAddress(normalizeIp(socket.remoteAddress), socket.remotePort ?? 0) : "unknown";
}

/**
 * Connects through the pod's network with Nagle's algorithm off, and resolves once connected. Rejects with the socket error, with
 * an ETIMEDOUT error after timeoutMs, or when the socket is destroyed first; the socket is destroyed on
 * failure. `onSocket` receives the socket at once, so that a proxy stopping can destroy a pending connect.
 * With `source`, the connection keeps the client's address as its source (PodNetwork.connect).
 */
export function connectTcp(
  network: PodNetwork,
  ip: string,
  port: number,
  timeoutMs: number,
  onSocket?: (socket: net.Socket) => void,
  source?: ApplicationSource,
): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = network.connect(ip, port, source);
    // Proxied bytes must leave at once: Nagle would hold a small write until the previous one is acknowledged.
    socket.setNoDelay(true);
    onSocket?.(socket);
    const timer = setTimeout(() => {
      fail(Object.assign(new Error(`connect to ${formatAddress(ip, port)} timed out after ${timeoutMs} ms`), { code: "ETIMEDOUT" }));
    }, timeoutMs);
    const fail = (error: Error): void => {
      clearTimeout(timer);
      socket.off("connect", succeed);
      socket.off("close", closedEarly);
      socket.destroy();
      reject(error);
    };
    const closedEarly = (): void => fail(new Error(`connect to ${formatAddress(ip, port)} was aborted`));
    const succeed = (): void => {
      clearTimeout(timer);
      socket.off("error", fail);
      socket.off("close", closedEarly);
      resolve(socket);
    };
    socket.once("connect", succeed);
    socket.once("error", fail);
    socket.once("close", closedEarly);
  });
}
