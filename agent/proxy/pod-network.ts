import type net from "node:net";

/**
 * Whether a pod network can connect from a client's address: "off" when the agent runs without
 * source-address transparency, "ready" once the pod's policy routing is installed, and
 * "unavailable" when that set-up failed in this pod.
 */
export type TransparentSourceState = "off" | "ready" | "unavailable";

/** The client address that a connection to the application keeps as its source. */
export interface ApplicationSource {
  /** The client's IPv4 or IPv6 address, of the same family as the application's address. */
  ip: string;
  /**
   * A port the connection must not take: the plaintext client's own. The connection from the
   * client to the application's port is already open in the pod on 15006, and the same 4-tuple
   * would deliver the application's packets to that socket.
   */
  avoidPort?: number;
}

/**
 * The network of one pod, as the proxy uses it. In production every socket is made inside the
 * pod's network namespace and flagged as the agent's, so that capture skips it. Tests may use loopback addresses.
 */
export interface PodNetwork {
  /**
   * Starts `server` listening on 0.0.0.0:port inside the pod, and on [::]:port when the pod has
   * an IPv6 address. `onListenerFd` receives each listener's file descriptor and address family
   * before the server accepts, where the network has one.
   */
  listen(server: net.Server, port: number, onListenerFd?: (fd: number, family: 4 | 6) => void): Promise<void>;
  /**
   * Opens a TCP connection from inside the pod; the socket emits "connect" or "error" as usual.
   * With `source`, the connection's source address is the client's (only when
   * transparentSource, or transparentSourceIpv6 for an IPv6 destination, is "ready").
   */
  connect(host: string, port: number, source?: ApplicationSource): net.Socket;
  /** Whether connect() can take an IPv4 `source`; absent means "off". */
  readonly transparentSource?: TransparentSourceState;
  /** Whether connect() can take an IPv6 `source`; absent means "off". */
  readonly transparentSourceIpv6?: TransparentSourceState;
}
