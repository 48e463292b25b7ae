/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The capture decision of connect6 for native IPv6 destinations; lib/redirect.h decides for
 * IPv4 and IPv4-mapped ones.
 */
#ifndef AA_REDIRECT6_H
#define AA_REDIRECT6_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/agent_socks.h"
#include "lib/config.h"
#include "lib/enrolled.h"
#include "lib/enrolled6.h"
#include "lib/exempt.h"
#include "lib/orig_dst6.h"
#include "lib/redirect.h"

/* ::1, and ::, which connect() replaces with ::1. Both stay inside the pod. */
static __always_inline int aa_is_local_ip6(const __u32 *daddr)
{
	return daddr[0] == 0 && daddr[1] == 0 && daddr[2] == 0 &&
	       (daddr[3] == 0 || daddr[3] == bpf_htonl(1));
}

/* fe80::/10. The proxy cannot dial such an address for the application, because the scope
 * (the interface) of the application's connect() does not reach it.
 */
static __always_inline int aa_is_link_local_ip6(const __u32 *daddr)
{
	return (bpf_ntohl(daddr[0]) & 0xffc00000) == 0xfe800000;
}

static __always_inline int aa_is_pod_ip6(const __u32 *daddr, const struct aa_pod_info6 *pod6)
{
	return daddr[0] == pod6->pod_ip6[0] && daddr[1] == pod6->pod_ip6[1] &&
	       daddr[2] == pod6->pod_ip6[2] && daddr[3] == pod6->pod_ip6[3];
}

/* Records daddr:dport in the socket's aa_sk_orig6 storage. A failed allocation leaves no
 * record: the proxy then finds no original destination and closes the connection.
 */
static __always_inline void aa_record_orig_dst6(struct bpf_sock *sk, const __u32 *daddr,
						__u16 dport)
{
	struct aa_orig_dst6 *orig;

	orig = bpf_sk_storage_get(&aa_sk_orig6, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!orig)
		return;
	orig->ip6[0] = daddr[0];
	orig->ip6[1] = daddr[1];
	orig->ip6[2] = daddr[2];
	orig->ip6[3] = daddr[3];
	orig->port = dport;
	orig->pad = 0;
}

/* Decides a TCP connect() to a native IPv6 address. Returns AA_ALLOW, with the destination
 * rewritten to [podIPv6]:15001 when the connection is captured, or AA_REJECT. Passes unchanged:
 * other network namespaces, other protocols, the agent's own sockets, ::1 and ::, the pod's own
 * proxy ports, and destination ports that the pod's annotations exclude. Rejects (EPERM) the
 * connections of an enrolled pod that has no IPv6 address in aa_enrolled6, and link-local
 * destinations, so that no IPv6 connection leaves the pod unseen.
 *
 * Not inlined: clang would otherwise merge its stores to ctx with those of the IPv4-mapped
 * branch of connect6 through one pointer into ctx, which the verifier rejects.
 */
static __noinline int aa_capture_native_ip6(struct bpf_sock_addr *ctx)
{
	struct aa_pod_info6 *pod6;
	struct aa_pod_info *pod;
	struct bpf_sock *sk;
	__u32 daddr[4];
	__u16 dport;
	__u64 cookie;

	if (ctx->type != AA_SOCK_STREAM)
		return AA_ALLOW;
	cookie = bpf_get_netns_cookie(ctx);
	pod = aa_enrolled_lookup(cookie);
	if (!pod)
		return AA_ALLOW;

	/* One load per word: the verifier rejects loads through a pointer into ctx. */
	daddr[0] = ctx->user_ip6[0];
	daddr[1] = ctx->user_ip6[1];
	daddr[2] = ctx->user_ip6[2];
	daddr[3] = ctx->user_ip6[3];
	dport = (__u16)ctx->user_port;

	sk = ctx->sk;
	if (!sk)
		return AA_REJECT;
	if (aa_is_agent_socket(sk) || aa_is_local_ip6(daddr))
		return AA_ALLOW;

	pod6 = aa_enrolled6_lookup(cookie);
	if (!pod6 || aa_is_link_local_ip6(daddr))
		return AA_REJECT;

	if (aa_is_pod_ip6(daddr, pod6) && aa_is_proxy_port(bpf_ntohs(dport)))
		return AA_ALLOW;
	if (aa_is_excluded_port(pod->pod_ip4, bpf_ntohs(dport), AA_DIRECTION_OUTBOUND))
		return AA_ALLOW;

	aa_record_orig_dst6(sk, daddr, dport);
	ctx->user_ip6[0] = pod6->pod_ip6[0];
	ctx->user_ip6[1] = pod6->pod_ip6[1];
	ctx->user_ip6[2] = pod6->pod_ip6[2];
	ctx->user_ip6[3] = pod6->pod_ip6[3];
	ctx->user_port = bpf_htons(AA_PORT_OUTBOUND);
	return AA_ALLOW;
}

#endif /* AA_REDIRECT6_H */
