/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: loading, attaching and pinning the capture programs. See libagent.h. */
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

