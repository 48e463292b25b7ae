/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/connect4: steers the TCP connections of enrolled pods to the outbound proxy
 * listening on podIP:15001 inside the pod. The captured connections of an IPv6-only pod
 * (pod_ip4 0 in aa_enrolled) fail with EPERM. Built as part of capture.c.
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
	/* pod_ip4 0: an IPv6-only pod, which has no IPv4 listener to redirect to. */
	if (pod->pod_ip4 == 0)
		return AA_REJECT;

	ctx->user_ip4 = pod->pod_ip4;
	ctx->user_port = bpf_htons(AA_PORT_OUTBOUND);
	return AA_ALLOW;
}
