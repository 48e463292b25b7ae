/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/connect6: steers the TCP connections that enrolled pods make from AF_INET6 sockets.
 * The kernel runs connect4 only for AF_INET sockets, so IPv4-mapped destinations
 * (::ffff:a.b.c.d) get the connect4 rules here and go to podIPv4:15001, or fail with EPERM
 * for an IPv6-only pod (pod_ip4 0). Native IPv6 destinations go to [podIPv6]:15001 when the
 * pod has an IPv6 address in aa_enrolled6, and fail with EPERM when it has none (see
 * lib/redirect6.h). UDP over IPv6 passes, as UDP over IPv4 is not captured either. Built as
 * part of capture.c.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"
#include "lib/redirect.h"
#include "lib/redirect6.h"

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
		return aa_capture_native_ip6(ctx);

	pod = aa_capture_ip4(ctx, ctx->user_ip6[3], (__u16)ctx->user_port);
	if (!pod)
		return AA_ALLOW;
	if (pod->pod_ip4 == 0)
		return AA_REJECT;

	ctx->user_ip6[3] = pod->pod_ip4;
	ctx->user_port = bpf_htons(AA_PORT_OUTBOUND);
	return AA_ALLOW;
}
