/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* aa_agent_socks: the sockets that the agent itself opened inside pods. The agent writes each
 * entry from user space right after it creates the socket, with the socket's file descriptor as
 * the key. No BPF program writes the map, so an application cannot get its own sockets flagged.
 * connect4/connect6 let flagged sockets through unchanged, and sockops records the flagged
 * sockets' connections to their own pod for sk_lookup.
 *
 * SO_MARK is not trusted for this: since Linux 5.17, CAP_NET_RAW is enough to set any mark,
 * and container runtimes grant CAP_NET_RAW by default.
 */
#ifndef AA_AGENT_SOCKS_H
#define AA_AGENT_SOCKS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Value of aa_agent_socks; 4 bytes. */
struct aa_agent_sock {
	__u32 flags;	/* AA_AGENT_SOCKET for the agent's sockets */
};

/* Not BPF_F_CLONE: sockets accepted from an agent listener are not flagged. They never connect,
 * so neither connect4/connect6 nor the sockops connect callback runs for them.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct aa_agent_sock);
} aa_agent_socks SEC(".maps");

/* sk must be a full socket that is not NULL (ctx->sk of sock_addr programs, or of sockops after a
 * NULL check).
 */
static __always_inline int aa_is_agent_socket(struct bpf_sock *sk)
{
	struct aa_agent_sock *entry = bpf_sk_storage_get(&aa_agent_socks, sk, NULL, 0);

	return entry && (entry->flags & AA_AGENT_SOCKET);
}

#endif /* AA_AGENT_SOCKS_H */
