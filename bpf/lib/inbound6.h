/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The IPv6 side of inbound capture, written by the agent and read by sk_lookup and sockops:
 *  - aa_inbound_pods6 (hash) contains one entry per pod whose IPv6 address is captured, keyed
 *    by that address, with the pod's netns cookie and IPv4 address;
 *  - aa_inbound6 (sockhash) contains the pod's IPv6 inbound plaintext listener (port 15006),
 *    keyed by {pod IPv6 address, 15006}. The kernel deletes the entry when the listener closes,
 *    and sk_lookup then drops the pod's inbound IPv6 connections.
 * sk_lookup drops TCP over IPv6 to any address of an enrolled pod that is not in
 * aa_inbound_pods6 (::1 excepted), so a pod without an entry here gets no IPv6 connections.
 */
#ifndef AA_INBOUND6_H
#define AA_INBOUND6_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Key of aa_inbound_pods6; 16 bytes: the pod's IPv6 address in network byte order. */
struct aa_ip6_key {
	__u32 ip6[4];
};

/* Value of aa_inbound_pods6; 16 bytes. */
struct aa_inbound_pod6 {
	__u64 netns_cookie;	/* host byte order, as SO_NETNS_COOKIE returns it */
	__u32 pod_ip4;		/* network byte order; the key of the pod's excluded ports */
	__u32 pad;
};

/* Key of aa_inbound6; 20 bytes.
 *  bytes 0-15   pod IPv6 address (network byte order)
 *  bytes 16-17  listener port (host byte order), 15006
 *  bytes 18-19  zero
 */
struct aa_inbound6_key {
	__u32 ip6[4];
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AA_MAX_ENROLLED);
	__type(key, struct aa_ip6_key);
	__type(value, struct aa_inbound_pod6);
} aa_inbound_pods6 SEC(".maps");

/* The agent inserts a listener's file descriptor as a u64; a lookup from user space returns
 * the socket cookie.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, AA_MAX_ENROLLED);
	__type(key, struct aa_inbound6_key);
	__type(value, __u64);
} aa_inbound6 SEC(".maps");

#endif /* AA_INBOUND6_H */
