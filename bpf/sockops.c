/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sockops: publishes the original destination of a captured connection under the key the
 * outbound proxy can compute from its accepted socket, records the agent's own connections
 * to a pod's IP for sk_lookup, and deletes both entries when the connection closes. The
 * original destination goes when the proxy's side of the connection closes, or when the
 * application's connect fails or is reset, not when the application closes gracefully: the
 * proxy may not have accepted the connection yet. Built as part of capture.c.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/agent_socks.h"
#include "lib/config.h"
#include "lib/enrolled.h"
#include "lib/inbound.h"
#include "lib/inbound6.h"
#include "lib/orig_dst.h"
#include "lib/orig_dst6.h"
#include "lib/own_conns.h"
#include "lib/own_conns6.h"
#include "lib/redirect.h"

static __always_inline void aa_orig_dst_key_of(struct bpf_sock_ops *ctx,
					       struct aa_orig_dst_key *key)
{
	key->netns_cookie = bpf_get_netns_cookie(ctx);
	key->local_ip4 = ctx->local_ip4;
	key->local_port = (__u16)ctx->local_port;
	key->pad = 0;
}

/* TCP_CONNECT_CB runs once the local port is assigned and before the SYN is sent, so the
 * entry exists before the proxy can accept the connection.
 */
static __always_inline void aa_publish_orig_dst(struct bpf_sock_ops *ctx)
{
	struct aa_orig_dst_key key = {};
	struct aa_orig_dst *orig;
	struct bpf_sock *sk;

	sk = ctx->sk;
	if (!sk)
		return;

	orig = bpf_sk_storage_get(&aa_sk_orig, sk, NULL, 0);
	if (!orig)
		return;

	aa_orig_dst_key_of(ctx, &key);
	bpf_map_update_elem(&aa_orig_dst, &key, orig, BPF_ANY);
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* The key sk_lookup computes for this connection: remote_port arrives in network byte
 * order in the upper half of the u32 on little-endian CPUs, which bpf_ntohl turns into the
 * port in host byte order on both byte orders.
 */
static __always_inline void aa_conn_key_of(struct bpf_sock_ops *ctx, struct aa_conn_key *key)
{
	key->src_ip4 = ctx->local_ip4;
	key->dst_ip4 = ctx->remote_ip4;
	key->src_port = (__u16)ctx->local_port;
	key->dst_port = (__u16)bpf_ntohl(ctx->remote_port);
}

/* Records an agent socket (flagged in aa_agent_socks) that connects, from inside a pod whose
 * inbound traffic is captured, to that pod's own IP: the inbound proxy's connection to the
 * application. An agent socket in another namespace is not recorded, so the agent's connections
 * from one pod to another are still captured by the destination pod.
 */
static __always_inline void aa_record_own_conn(struct bpf_sock_ops *ctx)
{
	struct aa_conn_key key = {};
	struct aa_inbound_pod *pod;
	struct bpf_sock *sk;
	__u32 remote_ip4;
	__u64 cookie;

	if (ctx->family != AA_AF_INET)
		return;
	sk = ctx->sk;
	if (!sk || !aa_is_agent_socket(sk))
		return;

	remote_ip4 = ctx->remote_ip4;
	pod = bpf_map_lookup_elem(&aa_inbound_pods, &remote_ip4);
	if (!pod)
		return;
	cookie = bpf_get_netns_cookie(ctx);
	if (pod->netns_cookie != cookie)
		return;

	aa_conn_key_of(ctx, &key);
	bpf_map_update_elem(&aa_own_conns, &key, &cookie, BPF_ANY);
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void aa_orig_dst6_key_of(struct bpf_sock_ops *ctx,
						struct aa_orig_dst6_key *key)
{
	key->netns_cookie = bpf_get_netns_cookie(ctx);
	key->local_ip6[0] = ctx->local_ip6[0];
	key->local_ip6[1] = ctx->local_ip6[1];
	key->local_ip6[2] = ctx->local_ip6[2];
	key->local_ip6[3] = ctx->local_ip6[3];
	key->local_port = (__u16)ctx->local_port;
	key->pad = 0;
	key->pad2 = 0;
}

/* aa_publish_orig_dst for the native IPv6 connections that connect6 captured. */
static __always_inline void aa_publish_orig_dst6(struct bpf_sock_ops *ctx)
{
	struct aa_orig_dst6_key key = {};
	struct aa_orig_dst6 *orig;
	struct bpf_sock *sk;

	if (ctx->family != AA_AF_INET6)
		return;
	sk = ctx->sk;
	if (!sk)
		return;

	orig = bpf_sk_storage_get(&aa_sk_orig6, sk, NULL, 0);
	if (!orig)
		return;

	aa_orig_dst6_key_of(ctx, &key);
	bpf_map_update_elem(&aa_orig_dst6, &key, orig, BPF_ANY);
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void aa_conn6_key_of(struct bpf_sock_ops *ctx, struct aa_conn6_key *key)
{
	key->src_ip6[0] = ctx->local_ip6[0];
	key->src_ip6[1] = ctx->local_ip6[1];
	key->src_ip6[2] = ctx->local_ip6[2];
	key->src_ip6[3] = ctx->local_ip6[3];
	key->dst_ip6[0] = ctx->remote_ip6[0];
	key->dst_ip6[1] = ctx->remote_ip6[1];
	key->dst_ip6[2] = ctx->remote_ip6[2];
	key->dst_ip6[3] = ctx->remote_ip6[3];
	key->src_port = (__u16)ctx->local_port;
	key->dst_port = (__u16)bpf_ntohl(ctx->remote_port);
}

/* aa_record_own_conn for an agent socket that connects to its pod's own IPv6 address. */
static __always_inline void aa_record_own_conn6(struct bpf_sock_ops *ctx)
{
	struct aa_conn6_key key = {};
	struct aa_ip6_key remote = {};
	struct aa_inbound_pod6 *pod;
	struct bpf_sock *sk;
	__u64 cookie;

	if (ctx->family != AA_AF_INET6)
		return;
	sk = ctx->sk;
	if (!sk || !aa_is_agent_socket(sk))
		return;

	remote.ip6[0] = ctx->remote_ip6[0];
	remote.ip6[1] = ctx->remote_ip6[1];
	remote.ip6[2] = ctx->remote_ip6[2];
	remote.ip6[3] = ctx->remote_ip6[3];
	pod = bpf_map_lookup_elem(&aa_inbound_pods6, &remote);
	if (!pod)
		return;
	cookie = bpf_get_netns_cookie(ctx);
	if (pod->netns_cookie != cookie)
		return;

	aa_conn6_key_of(ctx, &key);
	bpf_map_update_elem(&aa_own_conns6, &key, &cookie, BPF_ANY);
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Tells whether a socket reaching TCP_CLOSE from `old_state` had sent its FIN. Such a client
 * may finish its socket (TCP_CLOSE once its FIN is acknowledged) before the proxy has accepted
 * the connection, and the proxy still needs the original destination to deliver the bytes sent
 * before the FIN. Its entry is left for the proxy's side to delete (aa_forget_proxy_side).
 */
static __always_inline int aa_closed_after_own_fin(__u32 old_state)
{
	return old_state == BPF_TCP_FIN_WAIT1 || old_state == BPF_TCP_FIN_WAIT2 ||
	       old_state == BPF_TCP_CLOSING;
}

/* Deletes the IPv6 entries of a closing AF_INET6 socket; keys that are not there are ignored. */
static __always_inline void aa_forget_connection6(struct bpf_sock_ops *ctx, int keep_orig)
{
	struct aa_orig_dst6_key orig_key = {};
	struct aa_conn6_key conn_key = {};

	if (ctx->family != AA_AF_INET6)
		return;
	if (!keep_orig) {
		aa_orig_dst6_key_of(ctx, &orig_key);
		bpf_map_delete_elem(&aa_orig_dst6, &orig_key);
	}
	aa_conn6_key_of(ctx, &conn_key);
	bpf_map_delete_elem(&aa_own_conns6, &conn_key);
}

/* Subscribes the outbound proxy's side of a captured connection (local port 15001 in an
 * enrolled namespace, which applications cannot bind) to state changes. PASSIVE_ESTABLISHED_CB
 * runs when the handshake completes, before the proxy accepts the socket.
 */
static __always_inline void aa_watch_proxy_side(struct bpf_sock_ops *ctx)
{
	if (ctx->local_port != AA_PORT_OUTBOUND)
		return;
	if (!aa_enrolled_lookup(bpf_get_netns_cookie(ctx)))
		return;
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Deletes the original destination of a connection whose proxy side closed: the proxy has taken
 * the entry by then, or never will (the connection was reset before it was accepted). The key
 * is the application's address, which is this socket's peer.
 */
static __always_inline void aa_forget_proxy_side(struct bpf_sock_ops *ctx)
{
	struct aa_orig_dst6_key key6 = {};
	struct aa_orig_dst_key key = {};

	if (ctx->family == AA_AF_INET6) {
		key6.netns_cookie = bpf_get_netns_cookie(ctx);
		key6.local_ip6[0] = ctx->remote_ip6[0];
		key6.local_ip6[1] = ctx->remote_ip6[1];
		key6.local_ip6[2] = ctx->remote_ip6[2];
		key6.local_ip6[3] = ctx->remote_ip6[3];
		key6.local_port = (__u16)bpf_ntohl(ctx->remote_port);
		bpf_map_delete_elem(&aa_orig_dst6, &key6);
	}
	/* An IPv4 application behind an AF_INET6 listener has a mapped address and an IPv4 key. */
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	key.local_ip4 = ctx->remote_ip4;
	key.local_port = (__u16)bpf_ntohl(ctx->remote_port);
	bpf_map_delete_elem(&aa_orig_dst, &key);
}

/* Runs only for the sockets that aa_publish_orig_dst, aa_record_own_conn or
 * aa_watch_proxy_side subscribed to state changes. Deleting a key that is not there is harmless.
 */
static __always_inline void aa_forget_connection(struct bpf_sock_ops *ctx)
{
	struct aa_orig_dst_key orig_key = {};
	struct aa_conn_key conn_key = {};
	int keep_orig;

	if (ctx->args[1] != BPF_TCP_CLOSE)
		return;

	if (ctx->local_port == AA_PORT_OUTBOUND) {
		aa_forget_proxy_side(ctx);
		return;
	}
	keep_orig = aa_closed_after_own_fin(ctx->args[0]);
	if (!keep_orig) {
		aa_orig_dst_key_of(ctx, &orig_key);
		bpf_map_delete_elem(&aa_orig_dst, &orig_key);
	}
	aa_conn_key_of(ctx, &conn_key);
	bpf_map_delete_elem(&aa_own_conns, &conn_key);
	aa_forget_connection6(ctx, keep_orig);
}

SEC("sockops")
int aa_sockops(struct bpf_sock_ops *ctx)
{
	switch (ctx->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		aa_publish_orig_dst(ctx);
		aa_record_own_conn(ctx);
		aa_publish_orig_dst6(ctx);
		aa_record_own_conn6(ctx);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		aa_watch_proxy_side(ctx);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		aa_forget_connection(ctx);
		break;
	default:
		break;
	}
	return AA_ALLOW;
}
