/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/connect4: steers the TCP connections of enrolled pods to the outbound proxy
 * listening on podIP:15001 inside the pod. Built as part of capture.c.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"
#include "lib/redirect.h"

SEC("cgroup/connect4")
int aa_connect4(struct bpf_sock_addr *ctx)
{
	struct aa_pod_info *pod;

	pod = aa_capture_ip4(ctx, ctx->user_ip4, (__u16)ctx->user_port);
	if (!pod)
		return AA_ALLOW;

	ctx->user_ip4 = pod->pod_ip4;
	ctx->user_port = bpf_htons(AA_PORT_OUTBOUND);
	return AA_ALLOW;
}
