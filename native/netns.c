/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: network namespace sockets, cookies and addresses, made on a helper thread. See libagent.h. */
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "internal.h"

/* ---- network namespace work on a helper thread -------------------------------------- */

struct netns_task {
	const char *netns_path;
	int (*work)(void *arg);
	void *arg;
	int result;
	char error[AA_ERROR_LEN];
};

static void *netns_thread(void *opaque)
{
	struct netns_task *task = opaque;
	int fd;

	fd = open(task->netns_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		task->result = fail(errno, "open network namespace %s", task->netns_path);
	} else if (setns(fd, CLONE_NEWNET) != 0) {
		task->result = fail(errno, "setns into network namespace %s", task->netns_path);
		close(fd);
	} else {
		close(fd);
		task->result = task->work(task->arg);
	}
	/* last_error is per thread: hand it to the caller's thread. */
	snprintf(task->error, sizeof(task->error), "%s", last_error_text());
	return NULL;
}

/* Runs work(arg) on a new thread inside the network namespace at netns_path. The calling
 * thread keeps its namespace, and the helper thread exits before this function returns.
 */
int run_in_netns(const char *netns_path, int (*work)(void *arg), void *arg)
{
	struct netns_task task = { .netns_path = netns_path, .work = work, .arg = arg };
	pthread_t thread;
	int err;

	reset_errors();
	if (!netns_path || !netns_path[0])
		return fail(EINVAL, "network namespace path is empty");
	err = pthread_create(&thread, NULL, netns_thread, &task);
	if (err != 0)
		return fail(err, "create a thread for network namespace %s", netns_path);
	pthread_join(thread, NULL);
	set_last_error(task.error);
	return task.result;
}

struct socket_request {
	/* AF_INET, or AF_INET6 for an IPv6-only socket (IPV6_V6ONLY); 0 means AF_INET. */
	int family;
	int agent_map_fd;
	int mark;
	const char *bind_ip;
	int port;
	int backlog;
	int transparent;
	/* AA_LISTENER_* bits of aa_netns_listener; 0 for every other socket. */
	int listener_flags;
};

static int set_int_option(int fd, int level, int name, int value, const char *what)
{
	if (setsockopt(fd, level, name, &value, sizeof(value)) != 0)
		return fail(errno, "setsockopt %s=%d", what, value);
	return 0;
}

static int configure_socket(int fd, const struct socket_request *req)
{
	int err;

	err = set_int_option(fd, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
	if (!err && req->mark != 0)
		err = set_int_option(fd, SOL_SOCKET, SO_MARK, req->mark, "SO_MARK");
	if (!err && req->transparent)
		err = set_int_option(fd, SOL_IP, IP_TRANSPARENT, 1, "IP_TRANSPARENT");
	if (!err && (req->listener_flags & AA_LISTENER_REUSEPORT))
		err = set_int_option(fd, SOL_SOCKET, SO_REUSEPORT, 1, "SO_REUSEPORT");
	/* IPv6 only, so that [::]:port and 0.0.0.0:port can both be bound in one namespace. */
	if (!err && req->family == AF_INET6)
		err = set_int_option(fd, IPPROTO_IPV6, IPV6_V6ONLY, 1, "IPV6_V6ONLY");
	return err;
}

static int bind_socket6(int fd, const struct socket_request *req)
{
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6 };
	const char *ip = req->bind_ip && req->bind_ip[0] ? req->bind_ip : "::";

	if (req->port < 0 || req->port > 65535)
		return fail(EINVAL, "bind port %d", req->port);
	if (inet_pton(AF_INET6, ip, &addr.sin6_addr) != 1)
		return fail(EINVAL, "bind address %s is not an IPv6 address", ip);
	addr.sin6_port = htons((uint16_t)req->port);
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		return fail(errno, "bind [%s]:%d", ip, req->port);
	return 0;
}

static int bind_socket(int fd, const struct socket_request *req)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	const char *ip = req->bind_ip && req->bind_ip[0] ? req->bind_ip : "0.0.0.0";

	if (req->port < 0 || req->port > 65535)
		return fail(EINVAL, "bind port %d", req->port);
	if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1)
		return fail(EINVAL, "bind address %s is not an IPv4 address", ip);
	addr.sin_port = htons((uint16_t)req->port);
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		return fail(errno, "bind %s:%d", ip, req->port);
	return 0;
}

/* Writes the socket's entry in the socket storage map aa_agent_socks, whose key from user space
 * is the socket's file descriptor.
 */
static int flag_agent_socket(int fd, int agent_map_fd)
{
	uint32_t flags = AA_AGENT_SOCKET_FLAG;
	int err;

	err = bpf_map_update_elem(agent_map_fd, &fd, &flags, BPF_ANY);
	if (err)
		return fail(-err, "flag socket fd %d as the agent's in map fd %d", fd, agent_map_fd);
	return 0;
}

static int make_socket(void *arg)
{
	const struct socket_request *req = arg;
	int fd, err = 0;

	if (req->family == AF_INET6)
		fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
	else
		fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail(errno, "socket(%s, SOCK_STREAM)",
			    req->family == AF_INET6 ? "AF_INET6" : "AF_INET");

	if (req->agent_map_fd >= 0)
		err = flag_agent_socket(fd, req->agent_map_fd);
	if (!err)
		err = configure_socket(fd, req);
	if (!err && ((req->bind_ip && req->bind_ip[0]) || req->port > 0))
		err = req->family == AF_INET6 ? bind_socket6(fd, req) : bind_socket(fd, req);
	if (!err && req->backlog > 0 && listen(fd, req->backlog) != 0)
		err = fail(errno, "listen with backlog %d", req->backlog);
	if (err) {
		close(fd);
		return err;
	}
	return fd;
}

int aa_netns_socket(const char *netns_path, int agent_map_fd, int mark, const char *bind_ip,
		    int port, int backlog, int transparent)
{
	struct socket_request req = {
		.agent_map_fd = agent_map_fd, .mark = mark, .bind_ip = bind_ip, .port = port,
		.backlog = backlog, .transparent = transparent,
	};

	return run_in_netns(netns_path, make_socket, &req);
}

static int make_listener(void *arg)
{
	const struct socket_request *req = arg;
	int err;

	if (req->listener_flags & AA_LISTENER_MIGRATE_REQUESTS) {
		err = enable_request_migration();
		if (err)
			return err;
	}
	return make_socket(arg);
}

int aa_netns_listener(const char *netns_path, int agent_map_fd, int mark, const char *bind_ip,
		      int port, int backlog, int flags)
{
	struct socket_request req = {
		.agent_map_fd = agent_map_fd, .mark = mark, .bind_ip = bind_ip, .port = port,
		.backlog = backlog, .listener_flags = flags,
		.family = (flags & AA_LISTENER_IPV6) ? AF_INET6 : AF_INET,
	};

	if (port <= 0 || backlog <= 0 ||
	    (flags & ~(AA_LISTENER_REUSEPORT | AA_LISTENER_MIGRATE_REQUESTS | AA_LISTENER_IPV6))) {
		reset_errors();
		return fail(EINVAL, "listener on port %d with backlog %d and flags 0x%x in network namespace %s: "
			    "the port and backlog must be positive and the flags AA_LISTENER_* bits",
			    port, backlog, (unsigned int)flags, netns_path ? netns_path : "(null)");
	}
	return run_in_netns(netns_path, make_listener, &req);
}

/* Maximum number of sockets per aa_netns_sockets call, which bounds the time spent on the helper thread. */
#define AA_MAX_SOCKET_BATCH 1024

struct socket_batch {
	struct socket_request req;
	int count;
	int *fds_out;
};

static int make_sockets(void *arg)
{
	struct socket_batch *batch = arg;
	int created;

	for (created = 0; created < batch->count; created++) {
		int fd = make_socket(&batch->req);

		if (fd < 0) {
			while (created > 0)
				close(batch->fds_out[--created]);
			return fd;
		}
		batch->fds_out[created] = fd;
	}
	return created;
}

int aa_netns_sockets(const char *netns_path, int agent_map_fd, int mark, int count, int *fds_out)
{
	struct socket_batch batch = {
		.req = { .agent_map_fd = agent_map_fd, .mark = mark },
		.count = count,
		.fds_out = fds_out,
	};

	if (!fds_out || count < 1 || count > AA_MAX_SOCKET_BATCH) {
		reset_errors();
		return fail(EINVAL, "socket batch of %d in network namespace %s: the count must be 1 to %d",
			    count, netns_path ? netns_path : "(null)", AA_MAX_SOCKET_BATCH);
	}
	return run_in_netns(netns_path, make_sockets, &batch);
}

int aa_netns_socket6(const char *netns_path, int agent_map_fd, int mark, const char *bind_ip,
		     int port, int backlog)
{
	struct socket_request req = {
		.family = AF_INET6, .agent_map_fd = agent_map_fd, .mark = mark, .bind_ip = bind_ip,
		.port = port, .backlog = backlog,
	};

	return run_in_netns(netns_path, make_socket, &req);
}

int aa_netns_sockets6(const char *netns_path, int agent_map_fd, int mark, int count, int *fds_out)
{
	struct socket_batch batch = {
		.req = { .family = AF_INET6, .agent_map_fd = agent_map_fd, .mark = mark },
		.count = count,
		.fds_out = fds_out,
	};

	if (!fds_out || count < 1 || count > AA_MAX_SOCKET_BATCH) {
		reset_errors();
		return fail(EINVAL, "IPv6 socket batch of %d in network namespace %s: the count must be 1 to %d",
			    count, netns_path ? netns_path : "(null)", AA_MAX_SOCKET_BATCH);
	}
	return run_in_netns(netns_path, make_sockets, &batch);
}

static int read_netns_cookie(void *arg)
{
	uint64_t cookie = 0;
	socklen_t len = sizeof(cookie);
	int fd;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail(errno, "socket(AF_INET, SOCK_STREAM)");
	if (getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &len) != 0) {
		int err = errno;

		close(fd);
		return fail(err, "getsockopt SO_NETNS_COOKIE");
	}
	close(fd);
	memcpy(arg, &cookie, sizeof(cookie));
	return 0;
}

int aa_netns_cookie(const char *netns_path, unsigned char *cookie_out)
{
	if (!cookie_out)
		return -EINVAL;
	return run_in_netns(netns_path, read_netns_cookie, cookie_out);
}

struct address_list {
	char *out;
	int out_len;
	/* AF_INET or AF_INET6; 0 means AF_INET. */
	int family;
};

static int list_addresses(void *arg)
{
	struct address_list *list = arg;
	struct ifaddrs *all, *ifa;
	int used = 0;

	if (getifaddrs(&all) != 0)
		return fail(errno, "getifaddrs");
	list->out[0] = '\0';
	for (ifa = all; ifa; ifa = ifa->ifa_next) {
		char ip[INET6_ADDRSTRLEN];
		int family = list->family == AF_INET6 ? AF_INET6 : AF_INET;
		int len;

		if (!ifa->ifa_addr || ifa->ifa_addr->sa_family != family)
			continue;
		if (family == AF_INET6)
			inet_ntop(AF_INET6, &((struct sockaddr_in6 *)ifa->ifa_addr)->sin6_addr, ip,
				  sizeof(ip));
		else
			inet_ntop(AF_INET, &((struct sockaddr_in *)ifa->ifa_addr)->sin_addr, ip,
				  sizeof(ip));
		len = snprintf(list->out + used, list->out_len - used, "%s%s", used ? "," : "", ip);
		if (len < 0 || len >= list->out_len - used) {
			freeifaddrs(all);
			return fail(ENOSPC, "address list longer than %d bytes", list->out_len);
		}
		used += len;
	}
	freeifaddrs(all);
	return used;
}

int aa_netns_ipv4_addresses(const char *netns_path, char *out, int out_len)
{
	struct address_list list = { .out = out, .out_len = out_len };

	if (!out || out_len <= 0)
		return -EINVAL;
	return run_in_netns(netns_path, list_addresses, &list);
}

int aa_netns_ipv6_addresses(const char *netns_path, char *out, int out_len)
{
	struct address_list list = { .out = out, .out_len = out_len, .family = AF_INET6 };

	if (!out || out_len <= 0)
		return -EINVAL;
	return run_in_netns(netns_path, list_addresses, &list);
}
