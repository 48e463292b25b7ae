/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sk_lookup: steers TCP connections that arrive at an enrolled pod's IP to the pod's inbound
 * plaintext listener on port 15006, so that no connection from outside reaches an
 * application unseen. The agent links the program to each enrolled pod's network namespace.
 * The accepted socket's local address is the address the client dialled. Built as part of
 * capture.c.
 *
 * Connections pass to the normal socket lookup when they
 *  1. are not TCP, or use 127.0.0.0/8 as either address;
 *  2. come from the address they are addressed to (the pod connecting to itself);
 *  3. are the agent's own connections inside the pod (aa_own_conns);
 *  4. come from a kubelet probe source address (aa_probe_sources) to a port other than 15001,
 *     or are addressed to a port that the pod's annotations exclude from inbound capture
 *     (aa_excluded_ports). Both pass whether or not the pod's 15006 listener is present.
 * A connection to an IPv4 address that is not a pod IP in aa_inbound_pods is dropped: the
 * program runs only in enrolled pods' namespaces, so such an address was added inside the pod.
 * Every other connection is dropped while the pod's 15006 listener is missing from aa_inbound.
 * The agent is not serving the pod then, so whatever listens on the proxy ports is not the
 * agent. A pod whose proxy is down thus gets no inbound connections rather than unauthorized
 * ones. With the listener present, connections to the agent's ports 15006 and 15008 pass.
 * A connection to port 15001 from outside the pod is dropped, because that listener is meant
 * only for the pod's own redirected connections. Every other connection is assigned to the
 * 15006 listener.
 *
 * TCP over IPv6 follows the same rules with the IPv6 maps (sk_lookup6.h). A pod without IPv6
 * capture gets no IPv6 connections but to ::1, and link-local (fe80::/10) addresses are always
 * dropped.
 * Kubelet health probes pass only when the node makes them come from a probe source address.
 * Probes from the node's own IP are captured like any other client.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"
#include "lib/exempt.h"
#include "lib/inbound.h"
#include "lib/own_conns.h"
#include "sk_lookup6.h"

static __always_inline int aa_is_loopback_ip4(__u32 addr)
{
	return (bpf_ntohl(addr) >> 24) == 127;
}

static __always_inline int aa_is_own_conn(const struct bpf_sk_lookup *ctx)
{
	struct aa_conn_key key = {
		.src_ip4 = ctx->remote_ip4,
		.dst_ip4 = ctx->local_ip4,
		.src_port = bpf_ntohs(ctx->remote_port),
		.dst_port = (__u16)ctx->local_port,
	};

	return bpf_map_lookup_elem(&aa_own_conns, &key) != NULL;
}

/* Returns whether the connection is exempt from capture: it comes from a kubelet probe source, or
 * its port is excluded by the pod's annotations. A probe source never reaches port 15001, the
 * outbound listener, which expects only the pod's own redirected connections.
 */
static __always_inline int aa_is_exempt_ip4(const struct bpf_sk_lookup *ctx, __u16 port)
{
	if (port != AA_PORT_OUTBOUND && aa_is_probe_source_ip4(ctx->remote_ip4))
		return 1;
	return aa_is_excluded_port(ctx->local_ip4, port, AA_DIRECTION_INBOUND);
}

/* Returns whether the agent's 15006 listener of the pod is in aa_inbound. */
static __always_inline int aa_has_inbound_listener(const struct bpf_sk_lookup *ctx)
{
	struct aa_inbound_key key = {
		.ip4 = ctx->local_ip4,
		.port = AA_PORT_INBOUND_PLAIN,
	};
	struct bpf_sock *sk;

	sk = bpf_map_lookup_elem(&aa_inbound, &key);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Assigns the pod's 15006 listener to the connection; drops it when there is none. */
static __always_inline int aa_assign_inbound_listener(struct bpf_sk_lookup *ctx)
{
	struct aa_inbound_key key = {
		.ip4 = ctx->local_ip4,
		.port = AA_PORT_INBOUND_PLAIN,
	};
	struct bpf_sock *sk;
	long err;

	sk = bpf_map_lookup_elem(&aa_inbound, &key);
	if (!sk)
		return SK_DROP;

	/* REPLACE: when another sk_lookup program chose a socket first, this choice wins. */
	err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

SEC("sk_lookup")
int aa_sk_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 local_ip4;
	__u16 port;

	if (ctx->protocol != AA_IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == AA_AF_INET6)
		return aa_sk_lookup6(ctx);
	if (ctx->family != AA_AF_INET)
		return SK_PASS;

	local_ip4 = ctx->local_ip4;
	if (aa_is_loopback_ip4(local_ip4) || aa_is_loopback_ip4(ctx->remote_ip4))
		return SK_PASS;
	if (ctx->remote_ip4 == local_ip4)
		return SK_PASS;

	/* The program is linked only to enrolled pods' namespaces, so an address that is not a pod
	 * IP in aa_inbound_pods is another address added inside the pod: drop rather than let a
	 * client reach the application around the agent.
	 */
	if (!bpf_map_lookup_elem(&aa_inbound_pods, &local_ip4))
		return SK_DROP;

	if (aa_is_own_conn(ctx))
		return SK_PASS;

	port = (__u16)ctx->local_port;
	if (aa_is_exempt_ip4(ctx, port))
		return SK_PASS;

	if (!aa_has_inbound_listener(ctx))
		return SK_DROP;

	if (port == AA_PORT_INBOUND_PLAIN || port == AA_PORT_INBOUND_HBONE)
		return SK_PASS;
	if (port == AA_PORT_OUTBOUND)
		return SK_DROP;

	return aa_assign_inbound_listener(ctx);
}
