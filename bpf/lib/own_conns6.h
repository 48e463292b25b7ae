/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* aa_own_conns6: lib/own_conns.h for IPv6. The TCP connections that the agent opens inside an
 * enrolled pod to that pod's own IPv6 address, written by sockops and let through by sk_lookup.
 */
#ifndef AA_OWN_CONNS6_H
#define AA_OWN_CONNS6_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Key of aa_own_conns6; 36 bytes, seen from the connecting socket.
 *  bytes 0-15   source IPv6 address (network byte order)
 *  bytes 16-31  destination IPv6 address, the pod IP (network byte order)
 *  bytes 32-33  source port (host byte order)
 *  bytes 34-35  destination port (host byte order)
 */
struct aa_conn6_key {
	__u32 src_ip6[4];
	__u32 dst_ip6[4];
	__u16 src_port;
	__u16 dst_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AA_MAX_OWN_CONNS);
	__type(key, struct aa_conn6_key);
	__type(value, __u64);	/* netns cookie of the pod */
} aa_own_conns6 SEC(".maps");

#endif /* AA_OWN_CONNS6_H */
