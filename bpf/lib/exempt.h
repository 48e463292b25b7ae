/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Capture exemptions, written by the agent and read by sk_lookup and connect4/connect6:
 *  - aa_probe_sources (hash) contains the source addresses of kubelet health probes. The node
 *    must make kubelet's probes come from one of them (istio-cni does it with an SNAT rule to
 *    169.254.7.127), and sk_lookup passes inbound connections from them to the application.
 *  - aa_excluded_ports (hash) contains the ports that a pod's annotations exclude from capture,
 *    per pod IPv4 address and direction. connect4/connect6 let outbound connections to an
 *    excluded destination port through unchanged, and sk_lookup passes inbound connections to an
 *    excluded local port to the application.
 * The proxy ports 15001, 15006 and 15008 are never exempt, whatever the maps contain.
 */
#ifndef AA_EXEMPT_H
#define AA_EXEMPT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/config.h"

/* Key of aa_probe_sources; 16 bytes. An IPv6 address in network byte order; an IPv4 address is
 * stored as its IPv4-mapped form ::ffff:a.b.c.d.
 */
struct aa_probe_source_key {
	__u32 ip6[4];
};

/* Key of aa_excluded_ports; 8 bytes.
 *  bytes 0-3  pod IPv4 address (network byte order)
 *  bytes 4-5  port (host byte order): the destination port outbound, the pod's local port inbound
 *  byte  6    AA_DIRECTION_INBOUND or AA_DIRECTION_OUTBOUND
 *  byte  7    zero
 */
struct aa_excluded_port_key {
	__u32 pod_ip4;
	__u16 port;
	__u8 direction;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AA_MAX_PROBE_SOURCES);
	__type(key, struct aa_probe_source_key);
	__type(value, __u32);	/* reserved, 0 */
} aa_probe_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AA_MAX_EXCLUDED_PORTS);
	__type(key, struct aa_excluded_port_key);
	__type(value, __u32);	/* reserved, 0 */
} aa_excluded_ports SEC(".maps");

/* key must be on the stack: the caller fills it from its context. */
static __always_inline int aa_is_probe_source(const struct aa_probe_source_key *key)
{
	return bpf_map_lookup_elem(&aa_probe_sources, key) != NULL;
}

/* addr is an IPv4 address in network byte order. */
static __always_inline int aa_is_probe_source_ip4(__u32 addr)
{
	struct aa_probe_source_key key = {
		.ip6 = { 0, 0, bpf_htonl(0xffff), addr },
	};

	return aa_is_probe_source(&key);
}

/* pod_ip4 is in network byte order, port in host byte order. Returns 0 for the proxy ports, and
 * for pod_ip4 0 (an IPv6-only pod, whose ports are never excluded).
 */
static __always_inline int aa_is_excluded_port(__u32 pod_ip4, __u16 port, __u8 direction)
{
	struct aa_excluded_port_key key = {
		.pod_ip4 = pod_ip4,
		.port = port,
		.direction = direction,
	};

	if (pod_ip4 == 0)
		return 0;
	if (port == AA_PORT_OUTBOUND || port == AA_PORT_INBOUND_PLAIN || port == AA_PORT_INBOUND_HBONE)
		return 0;
	return bpf_map_lookup_elem(&aa_excluded_ports, &key) != NULL;
}

#endif /* AA_EXEMPT_H */
