/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The inbound side of capture, written by the agent and read by sk_lookup:
 *  - aa_inbound_pods (hash) contains one entry per pod whose inbound traffic is captured,
 *    keyed by the pod's IPv4 address, with the pod's netns cookie;
 *  - aa_inbound (sockhash) contains the pod's inbound plaintext listener (port 15006),
 *    keyed by {pod IPv4 address, 15006}. The kernel deletes the entry when the listener
 *    closes, and sk_lookup then drops the pod's inbound connections.
 */
#ifndef AA_INBOUND_H
#define AA_INBOUND_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Value of aa_inbound_pods; 8 bytes. */
struct aa_inbound_pod {
	__u64 netns_cookie;	/* host byte order, as SO_NETNS_COOKIE returns it */
};

/* Key of aa_inbound; 8 bytes.
 *  bytes 0-3  pod IPv4 address (network byte order)
 *  bytes 4-5  listener port (host byte order), 15006
 *  bytes 6-7  zero
 */
struct aa_inbound_key {
	__u32 ip4;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AA_MAX_ENROLLED);
	__type(key, __u32);	/* pod IPv4 address, network byte order */
	__type(value, struct aa_inbound_pod);
} aa_inbound_pods SEC(".maps");

/* The agent inserts a listener's file descriptor as a u64; a lookup from user space returns
 * the socket cookie.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, AA_MAX_ENROLLED);
	__type(key, struct aa_inbound_key);
	__type(value, __u64);
} aa_inbound SEC(".maps");

#endif /* AA_INBOUND_H */
