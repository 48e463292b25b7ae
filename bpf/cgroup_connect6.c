/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/connect6: the connect4 rules for AF_INET6 sockets that dial an IPv4-mapped address
 * (::ffff:a.b.c.d). The kernel runs connect4 only for AF_INET sockets. Built as part of capture.c.
 *
 * NOTE: capture supports IPv4 only, so IPv6 is rejected until it is supported. A TCP connect()
 * from an enrolled pod to a native IPv6 address other than ::1 (or ::) fails with EPERM. This
 * holds for the agent's sockets too, which are all AF_INET. UDP over IPv6 passes, as UDP over
 * IPv4 is not captured either.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"
#include "lib/enrolled.h"
#include "lib/redirect.h"

static __always_inline int aa_is_v4_mapped(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0xffff);
}

/* ::1, and ::, which connect() replaces with ::1. Both stay inside the pod. */
static __always_inline int aa_is_local_ip6(const struct bpf_sock_addr *ctx)
{
	__u32 last = ctx->user_ip6[3];

	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == 0 &&
	       (last == 0 || last == bpf_htonl(1));
}

/* Returns AA_REJECT for a TCP connect() from an enrolled pod to a native IPv6 address that
 * leaves the pod.
 */
static __always_inline int aa_check_native_ip6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != AA_SOCK_STREAM)
		return AA_ALLOW;
	if (!aa_enrolled_lookup(bpf_get_netns_cookie(ctx)))
		return AA_ALLOW;
	return aa_is_local_ip6(ctx) ? AA_ALLOW : AA_REJECT;
}

SEC("cgroup/connect6")
int aa_connect6(struct bpf_sock_addr *ctx)
{
	struct aa_pod_info *pod;

	if (!aa_is_v4_mapped(ctx))
		return aa_check_native_ip6(ctx);

	pod = aa_capture_ip4(ctx, ctx->user_ip6[3], (__u16)ctx->user_port);
	if (!pod)
		return AA_ALLOW;

	ctx->user_ip6[3] = pod->pod_ip4;
	ctx->user_port = bpf_htons(AA_PORT_OUTBOUND);
	return AA_ALLOW;
}
