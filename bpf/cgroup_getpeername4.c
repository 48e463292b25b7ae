/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/getpeername4: returns the address that the application dialled as the peer of a
 * captured connection, in place of podIP:15001. Built as part of capture.c.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"
#include "lib/orig_dst.h"

SEC("cgroup/getpeername4")
int aa_getpeername4(struct bpf_sock_addr *ctx)
{
	struct aa_orig_dst *orig;
	struct bpf_sock *sk;

	sk = ctx->sk;
	if (!sk)
		return AA_ALLOW;

	/* Only connect4 and connect6 create this storage, so its presence means "captured". */
	orig = bpf_sk_storage_get(&aa_sk_orig, sk, NULL, 0);
	if (!orig)
		return AA_ALLOW;

	ctx->user_ip4 = orig->ip4;
	ctx->user_port = orig->port;
	return AA_ALLOW;
}
