import type net from "node:net";

/**
 * The network of one pod, as the proxy uses it. In production every socket is made inside the
 * pod's network namespace and flagged as the agent's, so that capture skips it. Tests may use loopback addresses.
 */
export interface PodNetwork {
  /**
   * Starts `server` listening on 0.0.0.0:port inside the pod. `onListenerFd` receives the
   * listener's file descriptor before the server accepts, where the network has one.
   */
  listen(server: net.Server, port: number, onListenerFd?: (fd: number) => void): Promise<void>;
  /** Opens a TCP connection from inside the pod; the socket emits "connect" or "error" as usual. */
  connect(host: string, port: number): net.Socket;
}
