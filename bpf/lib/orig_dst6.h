/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The original destination of a captured native IPv6 connection, in two maps that mirror
 * lib/orig_dst.h:
 *  - aa_sk_orig6 (socket storage) is written by connect6 on the application's socket and read
 *    back by getpeername6;
 *  - aa_orig_dst6 (LRU hash) is written by sockops once the socket has a local port, keyed by
 *    the peer address of the socket that the outbound proxy accepts on [podIPv6]:15001. The
 *    proxy looks the entry up and deletes it, and sockops deletes it as described in lib/orig_dst.h.
 * IPv4-mapped destinations (::ffff:a.b.c.d) use the IPv4 maps of lib/orig_dst.h.
 */
#ifndef AA_ORIG_DST6_H
#define AA_ORIG_DST6_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Value of both maps; 20 bytes. Address and port are in network byte order. */
struct aa_orig_dst6 {
	__u32 ip6[4];
	__u16 port;
	__u16 pad;
};

/* Key of aa_orig_dst6; 32 bytes.
 *  bytes 0-7    netns cookie of the pod (host byte order)
 *  bytes 8-23   local IPv6 address of the application's socket (network byte order)
 *  bytes 24-25  local port of the application's socket (host byte order, as sockops gives it)
 *  bytes 26-31  zero
 */
struct aa_orig_dst6_key {
	__u64 netns_cookie;
	__u32 local_ip6[4];
	__u16 local_port;
	__u16 pad;
	__u32 pad2;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct aa_orig_dst6);
} aa_sk_orig6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AA_MAX_ORIG_DST);
	__type(key, struct aa_orig_dst6_key);
	__type(value, struct aa_orig_dst6);
} aa_orig_dst6 SEC(".maps");

#endif /* AA_ORIG_DST6_H */
