// PodNetwork backed by a pod's network namespace: every socket is created inside the pod by
// the native library and flagged in aa_agent_socks (and marked 0x539), so capture never steers
// the proxy's own connections. A Capture must be attached in this process.
import net from "node:net";

import type { PodNetwork } from "../proxy/pod-network";
import { closeFd, netnsSocket } from "./native";

/** Backlog of the in-pod listeners; Node passes the same value to listen(2) by default. */
const LISTEN_BACKLOG = 511;

export class NetnsPodNetwork implements PodNetwork {
  constructor(
    readonly netnsPath: string,
    readonly podIp: string,
  ) {}

  /** Starts `server` on 0.0.0.0:port inside the pod, with a socket made and bound there. */
  listen(server: net.Server, port: number, onListenerFd?: (fd: number) => void): Promise<void> {
    const fd = netnsSocket(this.netnsPath, { bindIp: "0.0.0.0", port, backlog: LISTEN_BACKLOG });
    try {
      onListenerFd?.(fd);
    } catch (error) {
      closeFd(fd);
      return Promise.reject(error);
    }
    return new Promise((resolve, reject) => {
      // On a listen error Node closes the handle, and with it the descriptor.
      server.once("error", reject);
      server.listen({ fd }, () => {
        server.off("error", reject);
        resolve();
      });
    });
  }

  /**
   * Opens a TCP connection from inside the pod. The socket is created unconnected and flagged
   * in the pod's namespace, then Node connects it: a socket keeps the namespace it was created
   * in, and the flag in aa_agent_socks makes connect4 let it through.
   */
  connect(host: string, port: number): net.Socket {
    const fd = netnsSocket(this.netnsPath, {});
    // `readable: false` must not be passed: Node would end the readable side for good.
    const socket = new net.Socket({ fd, allowHalfOpen: true });
    socket.connect(port, host);
    return socket;
  }
}

