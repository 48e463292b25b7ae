/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: the original destination of a connection that netfilter NAT redirected. See libagent.h. */
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>

#include "internal.h"

/* From linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h, which clash with netinet/in.h. */
#define AA_SO_ORIGINAL_DST 80
#define AA_IP6T_SO_ORIGINAL_DST 80

int aa_original_dst(int fd, char *ip_out, int ip_len)
{
	struct sockaddr_storage local = { 0 }, original = { 0 };
	socklen_t local_len = sizeof(local), original_len = sizeof(original);
	const void *address;
	int port;

	reset_errors();
	if (!ip_out || ip_len < INET6_ADDRSTRLEN)
		return fail(EINVAL, "address buffer of %d bytes for the original destination of fd %d", ip_len, fd);
	if (getsockname(fd, (struct sockaddr *)&local, &local_len) != 0)
		return fail(errno, "getsockname of fd %d", fd);

	if (local.ss_family == AF_INET) {
		if (getsockopt(fd, SOL_IP, AA_SO_ORIGINAL_DST, &original, &original_len) != 0)
			return fail(errno, "getsockopt SO_ORIGINAL_DST of fd %d", fd);
		address = &((struct sockaddr_in *)&original)->sin_addr;
		port = ntohs(((struct sockaddr_in *)&original)->sin_port);
	} else if (local.ss_family == AF_INET6) {
		if (getsockopt(fd, SOL_IPV6, AA_IP6T_SO_ORIGINAL_DST, &original, &original_len) != 0)
			return fail(errno, "getsockopt IP6T_SO_ORIGINAL_DST of fd %d", fd);
		address = &((struct sockaddr_in6 *)&original)->sin6_addr;
		port = ntohs(((struct sockaddr_in6 *)&original)->sin6_port);
	} else {
		return fail(EAFNOSUPPORT, "fd %d is not an IPv4 or IPv6 socket (family %d)", fd, local.ss_family);
	}
	if (!inet_ntop(original.ss_family, address, ip_out, ip_len))
		return fail(errno, "format the original destination of fd %d", fd);
	return port;
}
