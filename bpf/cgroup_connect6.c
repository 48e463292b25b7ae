/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/connect6: the connect4 rules for AF_INET6 sockets that dial an IPv4-mapped address
 * (::ffff:a.b.c.d). The kernel runs connect4 only for AF_INET sockets. Built as part of capture.c.
 *
 * NOTE: other IPv6 destinations are not captured: an enrolled pod's native IPv6 connections
 * leave the pod without passing the proxy.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"
#include "lib/redirect.h"

static __always_inline int aa_is_v4_mapped(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0xffff);
}

SEC("cgroup/connect6")
int aa_connect6(struct bpf_sock_addr *ctx)
{
	struct aa_pod_info *pod;

	if (!aa_is_v4_mapped(ctx))
		return AA_ALLOW;

	pod = aa_capture_ip4(ctx, ctx->user_ip6[3], (__u16)ctx->user_port);
	if (!pod)
		return AA_ALLOW;

	ctx->user_ip6[3] = pod->pod_ip4;
	ctx->user_port = bpf_htons(AA_PORT_OUTBOUND);
	return AA_ALLOW;
}
