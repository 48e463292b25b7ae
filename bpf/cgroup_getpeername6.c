/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/getpeername6: returns the address that the application dialled as the peer of an
 * AF_INET6 socket that connect6 captured: the native IPv6 destination kept in aa_sk_orig6, or
 * the IPv4-mapped form of the IPv4 destination kept in aa_sk_orig. Built as part of capture.c.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"
#include "lib/orig_dst.h"
#include "lib/orig_dst6.h"

SEC("cgroup/getpeername6")
int aa_getpeername6(struct bpf_sock_addr *ctx)
{
	struct aa_orig_dst6 *orig6;
	struct aa_orig_dst *orig;
	struct bpf_sock *sk;

	sk = ctx->sk;
	if (!sk)
		return AA_ALLOW;

	orig6 = bpf_sk_storage_get(&aa_sk_orig6, sk, NULL, 0);
	if (orig6) {
		ctx->user_ip6[0] = orig6->ip6[0];
		ctx->user_ip6[1] = orig6->ip6[1];
		ctx->user_ip6[2] = orig6->ip6[2];
		ctx->user_ip6[3] = orig6->ip6[3];
		ctx->user_port = orig6->port;
		return AA_ALLOW;
	}

	orig = bpf_sk_storage_get(&aa_sk_orig, sk, NULL, 0);
	if (!orig)
		return AA_ALLOW;

	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = bpf_htonl(0xffff);
	ctx->user_ip6[3] = orig->ip4;
	ctx->user_port = orig->port;
	return AA_ALLOW;
}
