/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* aa_own_conns: the TCP connections that the agent opens inside an enrolled pod to that same
 * pod's IP, for example the inbound proxy's connection to the application. sockops writes
 * the 4-tuple before the SYN is sent and deletes it when the socket closes, and sk_lookup
 * lets these connections through. sk_lookup cannot read the netns cookie and cannot tell
 * the agent's sockets apart by interface, hence the tuple.
 */
#ifndef AA_OWN_CONNS_H
#define AA_OWN_CONNS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Key of aa_own_conns; 12 bytes, seen from the connecting socket.
 *  bytes 0-3    source IPv4 address (network byte order)
 *  bytes 4-7    destination IPv4 address, the pod IP (network byte order)
 *  bytes 8-9    source port (host byte order)
 *  bytes 10-11  destination port (host byte order)
 */
struct aa_conn_key {
	__u32 src_ip4;
	__u32 dst_ip4;
	__u16 src_port;
	__u16 dst_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AA_MAX_OWN_CONNS);
	__type(key, struct aa_conn_key);
	__type(value, __u64);	/* netns cookie of the pod */
} aa_own_conns SEC(".maps");

#endif /* AA_OWN_CONNS_H */
