/* SPDX-License-Identifier: Apache-2.0 */
/*
 * libagent: source-address transparency for the inbound proxy. Inside a pod, the proxy's socket
 * to the application is bound to the client's IP with IP_TRANSPARENT and marked. A policy
 * routing rule sends packets with that mark to a table whose only route makes every address
 * local, so the application's replies to the client's IP stay in the pod and reach the proxy.
 * IPv4 and IPv6 each get their own rule and route, because policy routing rules and routing
 * tables are per address family. The rule and route are written through rtnetlink on a helper
 * thread inside the pod's network namespace, with no `ip` process. See libagent.h.
 */
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fib_rules.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

/* The sysctls below are per network namespace, and are opened under the proc root (sysctl.c)
 * from a helper thread inside the pod's namespace.
 *
 * tcp_fwmark_accept gives an accepted socket the mark of the SYN that opened it, so the
 * application's replies carry the proxy's mark and match the rule. Despite its ipv4 path it
 * covers TCP over IPv6 too: the kernel's shared TCP code (tcp_conn_request, via
 * inet_request_mark) reads it for both families.
 */
#define AA_FWMARK_ACCEPT_SYSCTL "net/ipv4/tcp_fwmark_accept"

/* The sysctls that give the kernel's own replies (a TCP reset from a closed port, ICMP errors)
 * the mark of the packet they reply to. A transparent SYN from the proxy to a port where nothing
 * listens then gets its reply through the rule, back to the proxy, instead of out of the pod to
 * the real client while the proxy waits for its connect timeout. The IPv6 one exists only when
 * the kernel has IPv6.
 */
#define AA_FWMARK_REFLECT_SYSCTL "net/ipv4/fwmark_reflect"
#define AA_FWMARK_REFLECT6_SYSCTL "net/ipv6/fwmark_reflect"

/* Exists only when the kernel has IPv6, and reads 1 when IPv6 is disabled on loopback, the
 * device of the IPv6 local route (the kernel then rejects the route with EACCES).
 */
#define AA_LOOPBACK_DISABLE_IPV6_SYSCTL "net/ipv6/conf/lo/disable_ipv6"

#define AA_NETLINK_BUFFER 512

struct routing_request {
	/* AF_INET or AF_INET6. */
	int family;
	uint32_t mark;
	uint32_t mask;
	uint32_t table;
	uint32_t priority;
	int install;
};

struct netlink_message {
	struct nlmsghdr header;
	char payload[AA_NETLINK_BUFFER];
};

static void *message_tail(struct netlink_message *msg)
{
	return (char *)&msg->header + NLMSG_ALIGN(msg->header.nlmsg_len);
}

static void put_u32_attribute(struct netlink_message *msg, unsigned short type, uint32_t value)
{
	struct rtattr *attr = message_tail(msg);

	attr->rta_type = type;
	attr->rta_len = RTA_LENGTH(sizeof(value));
	memcpy(RTA_DATA(attr), &value, sizeof(value));
	msg->header.nlmsg_len = NLMSG_ALIGN(msg->header.nlmsg_len) + RTA_ALIGN(attr->rta_len);
}

/* Sends one request and reads its acknowledgement. Returns 0 or -errno from the kernel. */
static int netlink_transact(int sock, struct netlink_message *msg)
{
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	char reply[AA_NETLINK_BUFFER];
	struct nlmsghdr *header;
	int len;

	msg->header.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
	if (sendto(sock, msg, msg->header.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return -errno;
	for (;;) {
		len = (int)recv(sock, reply, sizeof(reply), 0);
		if (len < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (header = (struct nlmsghdr *)reply; NLMSG_OK(header, len);
		     header = NLMSG_NEXT(header, len)) {
			if (header->nlmsg_seq != msg->header.nlmsg_seq)
				continue;
			if (header->nlmsg_type == NLMSG_ERROR)
				return ((struct nlmsgerr *)NLMSG_DATA(header))->error;
		}
	}
}

/* `ip rule add|del fwmark MARK/MASK lookup TABLE priority PRIORITY`. The explicit priority
 * makes a second add fail with EEXIST instead of adding a copy of the rule.
 */
static int change_rule(int sock, const struct routing_request *req, uint32_t seq)
{
	struct netlink_message msg = { 0 };
	struct fib_rule_hdr *rule = NLMSG_DATA(&msg.header);

	msg.header.nlmsg_len = NLMSG_LENGTH(sizeof(*rule));
	msg.header.nlmsg_type = req->install ? RTM_NEWRULE : RTM_DELRULE;
	msg.header.nlmsg_flags = req->install ? NLM_F_CREATE | NLM_F_EXCL : 0;
	msg.header.nlmsg_seq = seq;
	rule->family = (unsigned char)req->family;
	rule->action = FR_ACT_TO_TBL;
	rule->table = req->table < 256 ? (uint8_t)req->table : RT_TABLE_UNSPEC;
	put_u32_attribute(&msg, FRA_PRIORITY, req->priority);
	put_u32_attribute(&msg, FRA_FWMARK, req->mark);
	put_u32_attribute(&msg, FRA_FWMASK, req->mask);
	put_u32_attribute(&msg, FRA_TABLE, req->table);
	return netlink_transact(sock, &msg);
}

/* The destination of the local route, as `ip route` writes it. */
static const char *default_destination(const struct routing_request *req)
{
	return req->family == AF_INET6 ? "::/0" : "0.0.0.0/0";
}

/* `ip route add|del local 0.0.0.0/0 dev lo table TABLE`, or `local ::/0` for IPv6. */
static int change_route(int sock, const struct routing_request *req, uint32_t seq)
{
	struct netlink_message msg = { 0 };
	struct rtmsg *route = NLMSG_DATA(&msg.header);
	unsigned int loopback = if_nametoindex("lo");

	if (loopback == 0)
		return -errno;
	msg.header.nlmsg_len = NLMSG_LENGTH(sizeof(*route));
	msg.header.nlmsg_type = req->install ? RTM_NEWROUTE : RTM_DELROUTE;
	msg.header.nlmsg_flags = req->install ? NLM_F_CREATE | NLM_F_EXCL : 0;
	msg.header.nlmsg_seq = seq;
	route->rtm_family = (unsigned char)req->family;
	route->rtm_table = req->table < 256 ? (unsigned char)req->table : RT_TABLE_UNSPEC;
	route->rtm_protocol = RTPROT_BOOT;
	route->rtm_scope = RT_SCOPE_HOST;
	route->rtm_type = RTN_LOCAL;
	put_u32_attribute(&msg, RTA_TABLE, req->table);
	put_u32_attribute(&msg, RTA_OIF, loopback);
	return netlink_transact(sock, &msg);
}

static int enable_fwmark_accept(void)
{
	int err = enable_sysctl(AA_FWMARK_ACCEPT_SYSCTL, 0);

	if (!err)
		err = enable_sysctl(AA_FWMARK_REFLECT_SYSCTL, 0);
	if (!err)
		err = enable_sysctl(AA_FWMARK_REFLECT6_SYSCTL, 1);
	return err;
}

static const char *family_name(const struct routing_request *req)
{
	return req->family == AF_INET6 ? "IPv6" : "IPv4";
}

/* Reads the IPv6 state of the calling thread's namespace: 0 when IPv6 is usable on loopback,
 * -EAFNOSUPPORT when the kernel has no IPv6 (ipv6.disable=1 or no module), and -EACCES when
 * IPv6 is disabled on loopback (net.ipv6.conf.lo.disable_ipv6=1, which all.disable_ipv6=1 sets).
 */
static int loopback_ipv6_state(void)
{
	char path[AA_PATH_LEN];
	char value = '0';
	int fd = open_sysctl(AA_LOOPBACK_DISABLE_IPV6_SYSCTL, O_RDONLY, path, sizeof(path));

	if (fd < 0)
		return errno == ENOENT ? -EAFNOSUPPORT : 0;
	if (read(fd, &value, 1) != 1)
		value = '0';
	close(fd);
	return value == '1' ? -EACCES : 0;
}

/* Installs the route, the rule and the sysctl. An entry already present counts as done.
 * Returns how many of the route and rule were new (0 to 2).
 */
static int install_routing(int sock, const struct routing_request *req)
{
	int added = 0, err;

	err = change_route(sock, req, 1);
	if (err && err != -EEXIST)
		return fail(-err, "add route local %s dev lo table %u", default_destination(req), req->table);
	added += err ? 0 : 1;
	err = change_rule(sock, req, 2);
	if (err && err != -EEXIST)
		return fail(-err, "add %s rule fwmark 0x%x/0x%x lookup %u priority %u",
			    family_name(req), req->mark, req->mask, req->table, req->priority);
	added += err ? 0 : 1;
	err = enable_fwmark_accept();
	return err ? err : added;
}

/* Deletes the rule, then the route. An entry already gone counts as done. Returns how many
 * were deleted (0 to 2). The sysctl stays, because without marked sockets it changes nothing.
 */
static int remove_routing(int sock, const struct routing_request *req)
{
	int removed = 0, err;

	err = change_rule(sock, req, 1);
	if (err && err != -ENOENT)
		return fail(-err, "delete %s rule fwmark 0x%x/0x%x lookup %u priority %u",
			    family_name(req), req->mark, req->mask, req->table, req->priority);
	removed += err ? 0 : 1;
	err = change_route(sock, req, 2);
	if (err && err != -ESRCH && err != -ENOENT)
		return fail(-err, "delete route local %s dev lo table %u", default_destination(req), req->table);
	removed += err ? 0 : 1;
	return removed;
}

static int change_routing(void *arg)
{
	const struct routing_request *req = arg;
	int sock, result;

	if (req->family == AF_INET6) {
		result = loopback_ipv6_state();
		/* A kernel without IPv6 cannot have IPv6 rules, so there is nothing to remove. A
		 * namespace whose IPv6 was disabled after the install may still contain the rule, so
		 * removal goes on there.
		 */
		if (result == -EAFNOSUPPORT && !req->install)
			return 0;
		if (result && req->install)
			return fail(-result, "IPv6 transparent-source routing: %s",
				    result == -EAFNOSUPPORT ? "the kernel has no IPv6"
							    : "IPv6 is disabled on lo in this network namespace");
	}
	sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (sock < 0)
		return fail(errno, "socket(AF_NETLINK, NETLINK_ROUTE)");
	result = req->install ? install_routing(sock, req) : remove_routing(sock, req);
	close(sock);
	return result;
}

static int change_routing_in_netns(const char *netns_path, int family, int mark, int mask,
				   int table, int priority, int install)
{
	struct routing_request req = {
		.family = family, .mark = (uint32_t)mark, .mask = (uint32_t)mask,
		.table = (uint32_t)table, .priority = (uint32_t)priority, .install = install,
	};

	if (table <= 0 || priority <= 0 || mark == 0) {
		reset_errors();
		return fail(EINVAL, "transparent routing with mark 0x%x, table %d, priority %d: each must be > 0",
			    (unsigned int)mark, table, priority);
	}
	return run_in_netns(netns_path, change_routing, &req);
}

int aa_netns_transparent_routing(const char *netns_path, int mark, int mask, int table, int priority,
				 int install)
{
	return change_routing_in_netns(netns_path, AF_INET, mark, mask, table, priority, install);
}

int aa_netns_transparent_routing6(const char *netns_path, int mark, int mask, int table,
				  int priority, int install)
{
	return change_routing_in_netns(netns_path, AF_INET6, mark, mask, table, priority, install);
}

/* Parses ip for a socket of the given family into addr and returns its length, or 0 when ip
 * is not an address of that family.
 */
static socklen_t parse_source(int family, const char *ip, struct sockaddr_storage *addr)
{
	struct sockaddr_in *addr4 = (struct sockaddr_in *)addr;
	struct sockaddr_in6 *addr6 = (struct sockaddr_in6 *)addr;

	memset(addr, 0, sizeof(*addr));
	if (family == AF_INET6) {
		addr6->sin6_family = AF_INET6;
		return inet_pton(AF_INET6, ip, &addr6->sin6_addr) == 1 ? sizeof(*addr6) : 0;
	}
	addr4->sin_family = AF_INET;
	return inet_pton(AF_INET, ip, &addr4->sin_addr) == 1 ? sizeof(*addr4) : 0;
}

static int set_transparent(int fd, int family)
{
	int enabled = 1;

	if (family == AF_INET6) {
		if (setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &enabled, sizeof(enabled)) != 0)
			return fail(errno, "setsockopt IPV6_TRANSPARENT on fd %d", fd);
		return 0;
	}
	if (setsockopt(fd, SOL_IP, IP_TRANSPARENT, &enabled, sizeof(enabled)) != 0)
		return fail(errno, "setsockopt IP_TRANSPARENT on fd %d", fd);
	return 0;
}

int aa_socket_bind_transparent(int fd, int mark, const char *ip, int avoid_port)
{
	struct sockaddr_storage addr;
	socklen_t len = sizeof(int);
	int family = 0, port, err;

	reset_errors();
	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &len) != 0)
		return fail(errno, "getsockopt SO_DOMAIN of fd %d", fd);
	if (family != AF_INET && family != AF_INET6)
		return fail(EAFNOSUPPORT, "fd %d is not an IPv4 or IPv6 socket (family %d)", fd, family);
	len = parse_source(family, ip ? ip : "", &addr);
	if (len == 0)
		return fail(EINVAL, "transparent source %s is not an %s address, as socket fd %d needs",
			    ip ? ip : "(null)", family == AF_INET6 ? "IPv6" : "IPv4", fd);
	if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0)
		return fail(errno, "setsockopt SO_MARK=0x%x on fd %d", (unsigned int)mark, fd);
	err = set_transparent(fd, family);
	if (err)
		return err;
	if (bind(fd, (struct sockaddr *)&addr, len) != 0)
		return fail(errno, family == AF_INET6 ? "bind fd %d to [%s]:0" : "bind fd %d to %s:0", fd, ip);
	if (getsockname(fd, (struct sockaddr *)&addr, &len) != 0)
		return fail(errno, "getsockname of fd %d", fd);
	port = family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&addr)->sin6_port)
				  : ntohs(((struct sockaddr_in *)&addr)->sin_port);
	return port == avoid_port ? 0 : port;
}
