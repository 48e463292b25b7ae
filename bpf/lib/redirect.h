/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The capture decision shared by connect4 and connect6. */
#ifndef AA_REDIRECT_H
#define AA_REDIRECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/agent_socks.h"
#include "lib/config.h"
#include "lib/enrolled.h"
#include "lib/exempt.h"
#include "lib/orig_dst.h"

/* 127.0.0.0/8 and 0.0.0.0 (which connect() treats as a local address) stay inside the pod. */
static __always_inline int aa_is_local_ip4(__u32 daddr)
{
	__u32 host = bpf_ntohl(daddr);

	return (host >> 24) == 127 || host == 0;
}

static __always_inline int aa_is_proxy_port(__u16 port)
{
	return port == AA_PORT_OUTBOUND || port == AA_PORT_INBOUND_PLAIN ||
	       port == AA_PORT_INBOUND_HBONE;
}

/* Decides whether a TCP connect() to daddr:dport (network byte order) from this socket is
 * captured. If so, records the original destination in the socket's storage and returns the
 * pod's entry, whose address the caller writes as the new destination. Returns NULL for
 * sockets that must pass unchanged: other network namespaces, other protocols, the agent's
 * own sockets (flagged in aa_agent_socks), local destinations, the pod's own proxy ports, and
 * destination ports that the pod's annotations exclude (aa_excluded_ports).
 *
 * When the socket storage cannot be allocated the connection is still redirected: the proxy
 * then finds no original destination and closes it, so a failure never bypasses the proxy.
 */
static __always_inline struct aa_pod_info *
aa_capture_ip4(struct bpf_sock_addr *ctx, __u32 daddr, __u16 dport)
{
	struct aa_pod_info *pod;
	struct aa_orig_dst *orig;
	struct bpf_sock *sk;

	if (ctx->type != AA_SOCK_STREAM)
		return NULL;

	pod = aa_enrolled_lookup(bpf_get_netns_cookie(ctx));
	if (!pod)
		return NULL;

	sk = ctx->sk;
	if (!sk || aa_is_agent_socket(sk))
		return NULL;

	if (aa_is_local_ip4(daddr))
		return NULL;
	if (daddr == pod->pod_ip4 && aa_is_proxy_port(bpf_ntohs(dport)))
		return NULL;
	if (aa_is_excluded_port(pod->pod_ip4, bpf_ntohs(dport), AA_DIRECTION_OUTBOUND))
		return NULL;

	orig = bpf_sk_storage_get(&aa_sk_orig, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (orig) {
		orig->ip4 = daddr;
		orig->port = dport;
		orig->pad = 0;
	}
	return pod;
}

#endif /* AA_REDIRECT_H */
