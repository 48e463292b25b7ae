/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: access to pinned maps. See libagent.h. */
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

/* ---- map access --------------------------------------------------------------------- */

/* Map calls are on the per-connection path, so they skip reset_errors() until they fail. */
static int fail_map_call(int err, const char *what, int map_fd)
{
	clear_libbpf_log();
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
