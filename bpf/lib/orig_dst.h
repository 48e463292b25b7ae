/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The original destination of a captured connection, in two maps:
 *  - aa_sk_orig (socket storage) is written by connect4/connect6 on the application's
 *    socket and read back by getpeername4/getpeername6;
 *  - aa_orig_dst (LRU hash) is written by sockops once the socket has a local port, keyed
 *    by the peer address of the socket that the outbound proxy accepts. The proxy looks the
 *    entry up and deletes it. sockops also deletes it when the proxy's side of the connection
 *    closes, or when the application's connect fails or its socket is reset before its own FIN.
 *    An entry of a connection that never had a proxy socket stays until the full LRU hash
 *    evicts it.
 */
#ifndef AA_ORIG_DST_H
#define AA_ORIG_DST_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Value of both maps; 8 bytes. Address and port are in network byte order. */
struct aa_orig_dst {
	__u32 ip4;
	__u16 port;
	__u16 pad;
};

/* Key of aa_orig_dst; 16 bytes.
 *  bytes 0-7    netns cookie of the pod (host byte order)
 *  bytes 8-11   local IPv4 address of the application's socket (network byte order)
 *  bytes 12-13  local port of the application's socket (host byte order, as sockops gives it)
 *  bytes 14-15  zero
 */
struct aa_orig_dst_key {
	__u64 netns_cookie;
	__u32 local_ip4;
	__u16 local_port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct aa_orig_dst);
} aa_sk_orig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AA_MAX_ORIG_DST);
	__type(key, struct aa_orig_dst_key);
	__type(value, struct aa_orig_dst);
} aa_orig_dst SEC(".maps");

#endif /* AA_ORIG_DST_H */
