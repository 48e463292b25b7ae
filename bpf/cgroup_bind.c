/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/bind4 and cgroup/bind6: keep the proxy ports of an enrolled pod for the agent. A TCP
 * socket in an enrolled network namespace that is not flagged in aa_agent_socks cannot bind
 * 15001, 15006 or 15008, on any address: bind() fails with EPERM. Otherwise a process of the pod
 * could take redirected connections while the agent is down, or join the agent's listeners once
 * they carry SO_REUSEPORT for a hand-over. Built as part of capture.c.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/agent_socks.h"
#include "lib/config.h"
#include "lib/enrolled.h"
#include "lib/redirect.h"

/* Returns AA_REJECT when a socket that is not the agent's binds a proxy port in an enrolled pod. */
static __always_inline int aa_check_bind(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk;

	if (ctx->type != AA_SOCK_STREAM)
		return AA_ALLOW;
	if (!aa_is_proxy_port(bpf_ntohs((__u16)ctx->user_port)))
		return AA_ALLOW;
	if (!aa_enrolled_lookup(bpf_get_netns_cookie(ctx)))
		return AA_ALLOW;
	sk = ctx->sk;
	if (sk && aa_is_agent_socket(sk))
		return AA_ALLOW;
	return AA_REJECT;
}

SEC("cgroup/bind4")
int aa_bind4(struct bpf_sock_addr *ctx)
{
	return aa_check_bind(ctx);
}

SEC("cgroup/bind6")
int aa_bind6(struct bpf_sock_addr *ctx)
{
	return aa_check_bind(ctx);
}
