/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Constants shared by the capture programs and the agent (agent/capture/layout.ts). */
#ifndef AA_CONFIG_H
#define AA_CONFIG_H

/* The agent marks every socket it opens inside a pod with SO_MARK 0x539, and the inbound
 * proxy's transparent sockets with 0x1539, for routing rules and operators to match on. The
 * programs do not read the mark: an application with CAP_NET_RAW can set the same mark.
 */
#define AA_AGENT_MARK		0x539

/* Flag in aa_agent_socks (lib/agent_socks.h) of a socket that the agent opened. */
#define AA_AGENT_SOCKET		1

/* Proxy ports the agent listens on inside every enrolled pod. */
#define AA_PORT_OUTBOUND	15001
#define AA_PORT_INBOUND_PLAIN	15006
#define AA_PORT_INBOUND_HBONE	15008

/* Map sizes. A node runs a few hundred pods at most. The original-destination map contains
 * one entry per outbound connection from connect() until the proxy's accept().
 */
#define AA_MAX_ENROLLED		4096
#define AA_MAX_ORIG_DST		65536
/* The agent's open connections from inside a pod to the pod's own IP: one per proxied
 * inbound connection, the leg to the application.
 */
#define AA_MAX_OWN_CONNS	65536
/* Source addresses of kubelet health probes (aa_probe_sources): the defaults are one IPv4 and
 * one IPv6 address, and --probe-source may add a few.
 */
#define AA_MAX_PROBE_SOURCES	16
/* Ports excluded from capture by pod annotations (aa_excluded_ports), both directions, all pods. */
#define AA_MAX_EXCLUDED_PORTS	16384

/* Direction byte of an aa_excluded_ports key. */
#define AA_DIRECTION_INBOUND	1
#define AA_DIRECTION_OUTBOUND	2

/* Socket constants from the C library, which BPF programs cannot include. */
#define AA_SOCK_STREAM		1
#define AA_AF_INET		2
#define AA_AF_INET6		10
#define AA_IPPROTO_TCP		6

/* Return values of cgroup sock_addr and sockops programs. A sock_addr program that returns
 * AA_REJECT makes connect() fail with EPERM.
 */
#define AA_ALLOW		1
#define AA_REJECT		0

#endif /* AA_CONFIG_H */
