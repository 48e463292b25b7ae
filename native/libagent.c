/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: network namespace sockets and libbpf loading for the agent. See libagent.h. */
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

#include "libagent.h"

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

#define AA_ERROR_LEN 2048
#define AA_LIBBPF_LOG_LEN 1536
#define AA_PATH_LEN 4096
/* Pinned links of sk_lookup programs are named <prefix><netns cookie>. */
#define AA_NETNS_LINK_PREFIX "sk_lookup-"

/* ---- error reporting ---------------------------------------------------------------- */

static __thread char last_error[AA_ERROR_LEN];
/* Tail of libbpf's warnings since the current libbpf call began (the verifier log included). */
static __thread char libbpf_log[AA_LIBBPF_LOG_LEN];

/* Records what failed and returns -err, so callers can write `return fail(err, ...)`. */
static int fail(int err, const char *format, ...)
{
	char reason[256];
	va_list args;
	int len, log_len;

	va_start(args, format);
	len = vsnprintf(last_error, sizeof(last_error), format, args);
	va_end(args);
	if (len < 0)
		len = 0;
	/* libbpf_strerror also names libbpf's own codes (4000 and up), which strerror does not. */
	if (libbpf_strerror(err, reason, sizeof(reason)) != 0)
		snprintf(reason, sizeof(reason), "error %d", err);
	log_len = (int)strlen(libbpf_log);
	while (log_len > 0 && libbpf_log[log_len - 1] == ' ')
		log_len--;
	if ((size_t)len < sizeof(last_error))
		snprintf(last_error + len, sizeof(last_error) - len, ": %s%s%.*s", reason,
			 log_len ? "; " : "", log_len, libbpf_log);
	return -err;
}

static int libbpf_print(enum libbpf_print_level level, const char *format, va_list args)
{
	char line[512];
	size_t used, add;
	int len;

	if (level == LIBBPF_DEBUG)
		return 0;
	len = vsnprintf(line, sizeof(line), format, args);
	if (len <= 0)
		return 0;
	add = strnlen(line, sizeof(line) - 1);
	used = strlen(libbpf_log);
	if (used + add >= sizeof(libbpf_log)) {
		/* Keep the newest text: the verifier's verdict comes at the end of its log. */
		size_t drop = used + add - (sizeof(libbpf_log) - 1);

		if (drop > used)
			drop = used;
		memmove(libbpf_log, libbpf_log + drop, used - drop + 1);
		used -= drop;
	}
	memcpy(libbpf_log + used, line, add);
	libbpf_log[used + add] = '\0';
	for (char *c = libbpf_log; *c; c++)
		if (*c == '\n')
			*c = ' ';
	return len;
}

static void reset_errors(void)
{
	last_error[0] = '\0';
	libbpf_log[0] = '\0';
	libbpf_set_print(libbpf_print);
}

int aa_last_error(char *out, int out_len)
{
	if (!out || out_len <= 0)
		return -EINVAL;
	snprintf(out, out_len, "%s", last_error);
	return (int)strnlen(out, out_len);
}

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
	snprintf(task->error, sizeof(task->error), "%s", last_error);
	return NULL;
}

/* Runs work(arg) on a new thread inside the network namespace at netns_path. The calling
 * thread keeps its namespace, and the helper thread exits before this function returns.
 */
static int run_in_netns(const char *netns_path, int (*work)(void *arg), void *arg)
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
	snprintf(last_error, sizeof(last_error), "%s", task.error);
	return task.result;
}

struct socket_request {
	int mark;
	const char *bind_ip;
	int port;
	int backlog;
	int transparent;
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
	return err;
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

static int make_socket(void *arg)
{
	const struct socket_request *req = arg;
	int fd, err;

	/* NOTE: IPv4 only. The proxy's listeners and upstream sockets are AF_INET. */
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail(errno, "socket(AF_INET, SOCK_STREAM)");

	err = configure_socket(fd, req);
	if (!err && ((req->bind_ip && req->bind_ip[0]) || req->port > 0))
		err = bind_socket(fd, req);
	if (!err && req->backlog > 0 && listen(fd, req->backlog) != 0)
		err = fail(errno, "listen with backlog %d", req->backlog);
	if (err) {
		close(fd);
		return err;
	}
	return fd;
}

int aa_netns_socket(const char *netns_path, int mark, const char *bind_ip, int port,
		    int backlog, int transparent)
{
	struct socket_request req = {
		.mark = mark, .bind_ip = bind_ip, .port = port,
		.backlog = backlog, .transparent = transparent,
	};

	return run_in_netns(netns_path, make_socket, &req);
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
};

static int list_ipv4_addresses(void *arg)
{
	struct address_list *list = arg;
	struct ifaddrs *all, *ifa;
	int used = 0;

	if (getifaddrs(&all) != 0)
		return fail(errno, "getifaddrs");
	list->out[0] = '\0';
	for (ifa = all; ifa; ifa = ifa->ifa_next) {
		char ip[INET_ADDRSTRLEN];
		int len;

		if (!ifa->ifa_addr || ifa->ifa_addr->sa_family != AF_INET)
			continue;
		inet_ntop(AF_INET, &((struct sockaddr_in *)ifa->ifa_addr)->sin_addr, ip, sizeof(ip));
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
	return run_in_netns(netns_path, list_ipv4_addresses, &list);
}

/* ---- loading, attaching and pinning ------------------------------------------------- */

static int make_dir(const char *path)
{
	if (mkdir(path, 0700) != 0 && errno != EEXIST)
		return fail(errno, "create directory %s", path);
	return 0;
}

/* Creates pin_root and every missing parent, then pin_root/maps, pin_root/links and
 * pin_root/progs.
 */
static int make_pin_dirs(const char *pin_root)
{
	char path[AA_PATH_LEN];
	int err = 0;

	if (snprintf(path, sizeof(path), "%s", pin_root) >= (int)sizeof(path))
		return fail(ENAMETOOLONG, "pin root %s", pin_root);
	for (char *slash = strchr(path + 1, '/'); slash && !err; slash = strchr(slash + 1, '/')) {
		*slash = '\0';
		err = make_dir(path);
		*slash = '/';
	}
	if (!err)
		err = make_dir(pin_root);
	snprintf(path, sizeof(path), "%s/maps", pin_root);
	if (!err)
		err = make_dir(path);
	snprintf(path, sizeof(path), "%s/links", pin_root);
	if (!err)
		err = make_dir(path);
	snprintf(path, sizeof(path), "%s/progs", pin_root);
	if (!err)
		err = make_dir(path);
	return err;
}

static int set_map_pin_paths(struct bpf_object *obj, const char *pin_root)
{
	char path[AA_PATH_LEN];
	struct bpf_map *map;
	int err;

	bpf_object__for_each_map(map, obj) {
		/* .rodata, .bss and .data maps belong to one object, so they are not pinned. */
		if (bpf_map__is_internal(map))
			continue;
		snprintf(path, sizeof(path), "%s/maps/%s", pin_root, bpf_map__name(map));
		err = bpf_map__set_pin_path(map, path);
		if (err)
			return fail(-err, "set pin path %s", path);
	}
	return 0;
}

static struct bpf_object *open_object(const char *object_path, int *err)
{
	struct bpf_object *obj = bpf_object__open_file(object_path, NULL);

	*err = obj ? 0 : fail(errno, "open eBPF object %s", object_path);
	return obj;
}

/* Replaces the program of the link pinned at link_path, keeping the attachment. */
static int update_pinned_link(struct bpf_program *prog, const char *link_path)
{
	struct bpf_link *link = bpf_link__open(link_path);
	int err;

	if (!link)
		return fail(errno, "open pinned link %s", link_path);
	err = bpf_link__update_program(link, prog);
	/* Closes this process's fd only: the pin keeps the link attached. */
	bpf_link__destroy(link);
	if (err)
		return fail(-err, "update program %s of pinned link %s",
			    bpf_program__name(prog), link_path);
	return 0;
}

static int attach_and_pin_link(struct bpf_program *prog, int cgroup_fd, const char *cgroup_path,
			       const char *link_path)
{
	struct bpf_link *link = bpf_program__attach_cgroup(prog, cgroup_fd);
	int err;

	if (!link)
		return fail(errno, "attach program %s to cgroup %s", bpf_program__name(prog),
			    cgroup_path);
	err = bpf_link__pin(link, link_path);
	if (err) {
		/* Without a pin the link would detach when this process exits: undo it now. */
		bpf_link__destroy(link);
		return fail(-err, "pin link %s", link_path);
	}
	/* Closes this process's fd only: the pin keeps the link attached. */
	bpf_link__destroy(link);
	return 0;
}

/* Moves every link pinned at <pin_root>/links/sk_lookup-* to prog. A link whose network
 * namespace is gone (ENOLINK) no longer does anything, so its pin is removed.
 */
static int update_netns_links(struct bpf_program *prog, const char *pin_root)
{
	struct dirent *entry;
	char links_dir[AA_PATH_LEN], link_path[AA_PATH_LEN + sizeof(entry->d_name) + 1];
	DIR *dir;
	int err = 0;

	snprintf(links_dir, sizeof(links_dir), "%s/links", pin_root);
	dir = opendir(links_dir);
	if (!dir)
		return fail(errno, "open directory %s", links_dir);
	while (!err && (entry = readdir(dir)) != NULL) {
		if (strncmp(entry->d_name, AA_NETNS_LINK_PREFIX, strlen(AA_NETNS_LINK_PREFIX)) != 0)
			continue;
		snprintf(link_path, sizeof(link_path), "%s/%s", links_dir, entry->d_name);
		err = update_pinned_link(prog, link_path);
		if (err == -ENOLINK) {
			err = 0;
			if (unlink(link_path) != 0 && errno != ENOENT)
				err = fail(errno, "remove pin %s of a link whose namespace is gone",
					   link_path);
		}
	}
	closedir(dir);
	return err;
}

/* Pins a program that is linked per network namespace at <pin_root>/progs/<name>, replacing
 * the pin of an earlier load, and moves the links pinned by earlier runs to it.
 */
static int pin_netns_program(struct bpf_program *prog, const char *pin_root)
{
	char path[AA_PATH_LEN];
	int err;

	snprintf(path, sizeof(path), "%s/progs/%s", pin_root, bpf_program__name(prog));
	/* Links keep their own reference to the old program, so removing its pin is safe. */
	if (unlink(path) != 0 && errno != ENOENT)
		return fail(errno, "remove old program pin %s", path);
	err = bpf_program__pin(prog, path);
	if (err)
		return fail(-err, "pin program %s at %s", bpf_program__name(prog), path);
	return update_netns_links(prog, pin_root);
}

static int attach_programs(struct bpf_object *obj, const char *pin_root, const char *cgroup_path)
{
	char link_path[AA_PATH_LEN];
	struct bpf_program *prog;
	int cgroup_fd, count = 0, err = 0;

	cgroup_fd = open(cgroup_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cgroup_fd < 0)
		return fail(errno, "open cgroup %s", cgroup_path);

	bpf_object__for_each_program(prog, obj) {
		if (bpf_program__type(prog) == BPF_PROG_TYPE_SK_LOOKUP) {
			err = pin_netns_program(prog, pin_root);
			if (err)
				break;
			continue;
		}
		snprintf(link_path, sizeof(link_path), "%s/links/%s", pin_root,
			 bpf_program__name(prog));
		/* NOTE: a pinned link stays on the cgroup it was created for, even when a later
		 * call passes another cgroup_path.
		 */
		if (access(link_path, F_OK) == 0)
			err = update_pinned_link(prog, link_path);
		else
			err = attach_and_pin_link(prog, cgroup_fd, cgroup_path, link_path);
		if (err)
			break;
		count++;
	}
	close(cgroup_fd);
	return err ? err : count;
}

int aa_capture_attach(const char *object_path, const char *pin_root, const char *cgroup_path)
{
	struct bpf_object *obj;
	int err;

	reset_errors();
	err = make_pin_dirs(pin_root);
	if (err)
		return err;

	obj = open_object(object_path, &err);
	if (!obj)
		return err;

	err = set_map_pin_paths(obj, pin_root);
	if (!err) {
		err = bpf_object__load(obj);
		if (err)
			err = fail(-err, "load eBPF object %s with maps pinned under %s/maps",
				   object_path, pin_root);
	}
	if (!err)
		err = attach_programs(obj, pin_root, cgroup_path);

	/* Pinned maps and links keep their kernel objects alive after this close. */
	bpf_object__close(obj);
	return err;
}

int aa_netns_link(const char *program_pin_path, const char *netns_path, const char *link_pin_path)
{
	int prog_fd, netns_fd, link_fd, err = 0;

	reset_errors();
	if (access(link_pin_path, F_OK) == 0)
		return 1;

	prog_fd = bpf_obj_get(program_pin_path);
	if (prog_fd < 0)
		return fail(-prog_fd, "open pinned program %s", program_pin_path);
	netns_fd = open(netns_path, O_RDONLY | O_CLOEXEC);
	if (netns_fd < 0) {
		err = fail(errno, "open network namespace %s", netns_path);
		goto out_prog;
	}
	/* The kernel takes the namespace from the fd: no setns is needed. */
	link_fd = bpf_link_create(prog_fd, netns_fd, BPF_SK_LOOKUP, NULL);
	if (link_fd < 0) {
		err = fail(-link_fd, "link program %s to network namespace %s", program_pin_path,
			   netns_path);
		goto out_netns;
	}
	if (bpf_obj_pin(link_fd, link_pin_path) != 0)
		err = fail(errno, "pin link %s", link_pin_path);
	/* Without a pin the link detaches with this close, so a failed pin undoes the link. */
	close(link_fd);
out_netns:
	close(netns_fd);
out_prog:
	close(prog_fd);
	return err;
}

int aa_capture_probe(const char *object_path)
{
	struct bpf_object *obj;
	int err;

	reset_errors();
	obj = open_object(object_path, &err);
	if (!obj)
		return err;
	err = bpf_object__load(obj);
	if (err)
		err = fail(-err, "load eBPF object %s", object_path);
	bpf_object__close(obj);
	return err;
}

/* ---- map access --------------------------------------------------------------------- */

/* Map calls are on the per-connection path, so they skip reset_errors() until they fail. */
static int fail_map_call(int err, const char *what, int map_fd)
{
	libbpf_log[0] = '\0';
	return fail(err, "%s map fd %d", what, map_fd);
}

int aa_map_open(const char *pin_path)
{
	int fd;

	reset_errors();
	fd = bpf_obj_get(pin_path);
	if (fd < 0)
		return fail(-fd, "open pinned map %s", pin_path);
	return fd;
}

int aa_map_update(int map_fd, const unsigned char *key, const unsigned char *value)
{
	int err = bpf_map_update_elem(map_fd, key, value, BPF_ANY);

	return err ? fail_map_call(-err, "update", map_fd) : 0;
}

int aa_map_delete(int map_fd, const unsigned char *key)
{
	int err = bpf_map_delete_elem(map_fd, key);

	return err ? fail_map_call(-err, "delete from", map_fd) : 0;
}

int aa_map_lookup(int map_fd, const unsigned char *key, unsigned char *value_out)
{
	int err = bpf_map_lookup_elem(map_fd, key, value_out);

	return err ? fail_map_call(-err, "look up in", map_fd) : 0;
}

int aa_map_lookup_and_delete(int map_fd, const unsigned char *key, unsigned char *value_out)
{
	int err = bpf_map_lookup_and_delete_elem(map_fd, key, value_out);

	return err ? fail_map_call(-err, "look up and delete in", map_fd) : 0;
}

int aa_map_next_key(int map_fd, const unsigned char *key, int has_key, unsigned char *next_out)
{
	int err = bpf_map_get_next_key(map_fd, has_key ? key : NULL, next_out);

	return err ? fail_map_call(-err, "iterate", map_fd) : 0;
}

int aa_close(int fd)
{
	if (close(fd) != 0)
		return fail(errno, "close fd %d", fd);
	return 0;
}
