// Binding to the socket send-queue call of native/libagent.so, which the audit syslog sink uses to
// tell when the receiver's kernel has acknowledged every byte it wrote.
import { DataType } from "ffi-rs";

import { call, check } from "./native";

/**
 * Returns how many bytes written to the connected TCP socket `fd` the peer has not acknowledged
 * yet (SIOCOUTQ). 0 means the peer's kernel received every byte written so far.
 */
export function socketUnackedBytes(fd: number): number {
  return check(
    call("aa_socket_unacked_bytes", [DataType.I32], [fd]),
    `reading the send queue of socket fd ${fd}`,
    "Pass the fd of an open TCP socket of this process.",
  );
}
