/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The IPv6 branch of sk_lookup (sk_lookup.c), with the same rules as the IPv4 branch. TCP over
 * IPv6 to an address of the pod passes to the normal socket lookup when it
 *  1. is addressed to ::1;
 *  2. comes from the pod's own IPv6 address or from ::1;
 *  3. is the agent's own connection inside the pod (aa_own_conns6);
 *  4. comes from a kubelet probe source address to a port other than 15001, or is addressed to
 *     a port that the pod's annotations exclude from inbound capture.
 * It is dropped when its destination is not in aa_inbound_pods6: link-local (fe80::/10) and
 * other addresses, and every address of a pod that has no IPv6 capture. Otherwise it is
 * dropped while the pod's IPv6 15006 listener is missing from aa_inbound6; with the listener
 * present, connections to 15006 and 15008 pass, 15001 is dropped, and every other connection
 * is assigned to the IPv6 15006 listener.
 */
#ifndef AA_SK_LOOKUP6_H
#define AA_SK_LOOKUP6_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"
#include "lib/exempt.h"
#include "lib/inbound6.h"
#include "lib/own_conns6.h"

static __always_inline int aa_is_loopback_addr6(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

static __always_inline int aa_is_same_addr6(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int aa_is_own_conn6(const struct bpf_sk_lookup *ctx,
					   const struct aa_ip6_key *local,
					   const struct aa_probe_source_key *remote)
{
	struct aa_conn6_key key = {
		.src_ip6 = { remote->ip6[0], remote->ip6[1], remote->ip6[2], remote->ip6[3] },
		.dst_ip6 = { local->ip6[0], local->ip6[1], local->ip6[2], local->ip6[3] },
		.src_port = bpf_ntohs(ctx->remote_port),
		.dst_port = (__u16)ctx->local_port,
	};

	return bpf_map_lookup_elem(&aa_own_conns6, &key) != NULL;
}

/* Assigns the pod's IPv6 15006 listener to the connection; drops it when there is none. With
 * check_only set, only tells whether the listener is there (SK_PASS) or not (SK_DROP).
 */
static __always_inline int aa_assign_inbound_listener6(struct bpf_sk_lookup *ctx,
						       const struct aa_ip6_key *local, int check_only)
{
	struct aa_inbound6_key key = {
		.ip6 = { local->ip6[0], local->ip6[1], local->ip6[2], local->ip6[3] },
		.port = AA_PORT_INBOUND_PLAIN,
	};
	struct bpf_sock *sk;
	long err = 0;

	sk = bpf_map_lookup_elem(&aa_inbound6, &key);
	if (!sk)
		return SK_DROP;
	/* REPLACE: when another sk_lookup program chose a socket first, this choice wins. */
	if (!check_only)
		err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

static __always_inline int aa_sk_lookup6(struct bpf_sk_lookup *ctx)
{
	struct aa_probe_source_key remote = {};
	struct aa_ip6_key local = {};
	struct aa_inbound_pod6 *pod;
	__u16 port;

	local.ip6[0] = ctx->local_ip6[0];
	local.ip6[1] = ctx->local_ip6[1];
	local.ip6[2] = ctx->local_ip6[2];
	local.ip6[3] = ctx->local_ip6[3];
	if (aa_is_loopback_addr6(local.ip6))
		return SK_PASS;

	pod = bpf_map_lookup_elem(&aa_inbound_pods6, &local);
	if (!pod)
		return SK_DROP;

	remote.ip6[0] = ctx->remote_ip6[0];
	remote.ip6[1] = ctx->remote_ip6[1];
	remote.ip6[2] = ctx->remote_ip6[2];
	remote.ip6[3] = ctx->remote_ip6[3];
	if (aa_is_same_addr6(remote.ip6, local.ip6) || aa_is_loopback_addr6(remote.ip6))
		return SK_PASS;
	if (aa_is_own_conn6(ctx, &local, &remote))
		return SK_PASS;

	port = (__u16)ctx->local_port;
	if (port != AA_PORT_OUTBOUND && aa_is_probe_source(&remote))
		return SK_PASS;
	if (aa_is_excluded_port(pod->pod_ip4, port, AA_DIRECTION_INBOUND))
		return SK_PASS;

	if (aa_assign_inbound_listener6(ctx, &local, 1) != SK_PASS)
		return SK_DROP;
	if (port == AA_PORT_INBOUND_PLAIN || port == AA_PORT_INBOUND_HBONE)
		return SK_PASS;
	if (port == AA_PORT_OUTBOUND)
		return SK_DROP;

	return aa_assign_inbound_listener6(ctx, &local, 0);
}

#endif /* AA_SK_LOOKUP6_H */
