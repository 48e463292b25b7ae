/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: probing the kernel for every hook eBPF capture needs, by using each one. See libagent.h. */
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "internal.h"

/* Maximum length of a feature's detail text in the report, and how much of its start a cut keeps. */
#define AA_PROBE_DETAIL_LEN 480
#define AA_PROBE_DETAIL_HEAD 160

struct probe_report {
	char *out;
	int out_len;
	int used;
	int overflow;
};

/* Appends "feature<TAB>errno<TAB>detail<NL>", where errno 0 means the feature works. */
static void report(struct probe_report *r, const char *feature, int err, const char *detail)
{
	char clean[AA_PROBE_DETAIL_LEN];
	size_t len = strlen(detail);
	int written;

	/* A long text keeps its start (the step that failed) and its end (the verifier's verdict). */
	if (len >= sizeof(clean))
		snprintf(clean, sizeof(clean), "%.*s ... %s", AA_PROBE_DETAIL_HEAD, detail,
			 detail + len - (sizeof(clean) - AA_PROBE_DETAIL_HEAD - 6));
	else
		snprintf(clean, sizeof(clean), "%s", detail);
	for (char *c = clean; *c; c++)
		if (*c == '\t' || *c == '\n')
			*c = ' ';
	written = snprintf(r->out + r->used, r->out_len - r->used, "%s\t%d\t%s\n", feature, err < 0 ? -err : err, clean);
	if (written < 0 || written >= r->out_len - r->used) {
		r->overflow = 1;
		r->out[r->used] = '\0';
		return;
	}
	r->used += written;
}

static void probe_map(struct probe_report *r, const char *feature, enum bpf_map_type type)
{
	int ret = libbpf_probe_bpf_map_type(type, NULL);

	if (ret == 1)
		report(r, feature, 0, "");
	else if (ret == 0)
		report(r, feature, EOPNOTSUPP, "the kernel rejected a map of this type");
	else
		report(r, feature, ret, "probing the map type failed");
}

/* The programs of the capture object, by section name, and the feature each one proves. */
static const struct probed_program {
	const char *feature;
	const char *program;
	int netns;
} probed_programs[] = {
	{ "cgroup/connect4", "aa_connect4", 0 },
	{ "cgroup/connect6", "aa_connect6", 0 },
	{ "cgroup/getpeername4", "aa_getpeername4", 0 },
	{ "cgroup/getpeername6", "aa_getpeername6", 0 },
	{ "sockops", "aa_sockops", 0 },
	{ "cgroup/bind4", "aa_bind4", 0 },
	{ "cgroup/bind6", "aa_bind6", 0 },
	{ "sk_lookup", "aa_sk_lookup", 1 },
};

#define PROBED_PROGRAM_COUNT (int)(sizeof(probed_programs) / sizeof(probed_programs[0]))

/* Loads the object with only `only` autoloaded (all programs when NULL). Returns the object or NULL with *err set. */
static struct bpf_object *load_object(const char *object_path, const char *only, int *err)
{
	struct bpf_object *obj;
	struct bpf_program *prog;

	clear_libbpf_log();
	obj = bpf_object__open_file(object_path, NULL);
	if (!obj) {
		*err = fail(errno, "open eBPF object %s", object_path);
		return NULL;
	}
	if (only) {
		bpf_object__for_each_program(prog, obj)
			bpf_program__set_autoload(prog, strcmp(bpf_program__name(prog), only) == 0);
	}
	*err = bpf_object__load(obj);
	if (*err) {
		*err = fail(-*err, "load %s from %s", only ? only : "every program", object_path);
		bpf_object__close(obj);
		return NULL;
	}
	return obj;
}

/* A new network namespace, made on a helper thread so that the caller's thread keeps its own. */
static void *new_netns_thread(void *arg)
{
	int *fd = arg;

	if (unshare(CLONE_NEWNET) != 0) {
		*fd = -errno;
		return NULL;
	}
	*fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (*fd < 0)
		*fd = -errno;
	return NULL;
}

/* Returns an fd of a new, empty network namespace that lives as long as the fd, or -errno. */
static int new_netns_fd(void)
{
	pthread_t thread;
	int fd = -EINVAL, err;

	err = pthread_create(&thread, NULL, new_netns_thread, &fd);
	if (err != 0)
		return -err;
	pthread_join(thread, NULL);
	return fd;
}

/* Links prog to a throwaway cgroup (cgroup_fd) or network namespace (netns_fd) and detaches it again. */
static int try_link(struct bpf_program *prog, const struct probed_program *probe, int cgroup_fd, int netns_fd)
{
	struct bpf_link *link;

	clear_libbpf_log();
	if (probe->netns) {
		if (netns_fd < 0)
			return fail(-netns_fd, "create a network namespace to link %s to", probe->program);
		link = bpf_program__attach_netns(prog, netns_fd);
	} else {
		if (cgroup_fd < 0)
			return fail(-cgroup_fd, "create a cgroup to link %s to", probe->program);
		link = bpf_program__attach_cgroup(prog, cgroup_fd);
	}
	if (!link)
		return fail(errno, "link %s to a throwaway %s", probe->program, probe->netns ? "network namespace" : "cgroup");
	bpf_link__destroy(link);
	return 0;
}

/*
 * Probes one hook: the program loads on its own (when the whole object did not), and a bpf_link
 * attaches it. Returns 0 or -errno, with the reason in last_error_text().
 */
static int probe_program(const char *object_path, struct bpf_object *all, const struct probed_program *probe,
			 int cgroup_fd, int netns_fd)
{
	struct bpf_object *obj = all;
	struct bpf_program *prog;
	int err = 0;

	if (!obj) {
		obj = load_object(object_path, probe->program, &err);
		if (!obj)
			return err;
	}
	prog = bpf_object__find_program_by_name(obj, probe->program);
	if (!prog)
		err = fail(ENOENT, "find program %s in %s", probe->program, object_path);
	else
		err = try_link(prog, probe, cgroup_fd, netns_fd);
	if (obj != all)
		bpf_object__close(obj);
	return err;
}

/* A probe cgroup lives for one probe, well under a second; one older than this was left by an
 * agent killed while probing. */
#define STALE_PROBE_CGROUP_SECONDS 600

/* Removes probe cgroups (aa-probe-*) older than STALE_PROBE_CGROUP_SECONDS. Their age decides, not
 * the pid in the name: an agent in a container runs in its own pid namespace, where the pid of
 * another agent means nothing. rmdir removes only an empty cgroup, and no process ever joins one.
 */
static void remove_stale_probe_cgroups(const char *cgroup_path)
{
	char path[PATH_MAX];
	struct dirent *entry;
	struct stat st;
	time_t now = time(NULL);
	DIR *dir = opendir(cgroup_path);

	if (!dir)
		return;
	while ((entry = readdir(dir)) != NULL) {
		if (strncmp(entry->d_name, "aa-probe-", strlen("aa-probe-")) != 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", cgroup_path, entry->d_name);
		if (stat(path, &st) == 0 && now - st.st_mtime > STALE_PROBE_CGROUP_SECONDS)
			rmdir(path);
	}
	closedir(dir);
}

/* Returns an open fd of a new cgroup directory under cgroup_path (its path in dir_out), or -errno.
 * The name has the pid and a random part: agents in containers are often pid 1 in their own
 * namespaces, and two of them probe at once during a rolling update.
 */
static int make_probe_cgroup(const char *cgroup_path, char *dir_out, size_t dir_len)
{
	unsigned int nonce = 0;
	int fd;

	remove_stale_probe_cgroups(cgroup_path);
	if (getrandom(&nonce, sizeof(nonce), 0) != sizeof(nonce))
		nonce = (unsigned int)time(NULL);
	snprintf(dir_out, dir_len, "%s/aa-probe-%d-%08x", cgroup_path, (int)getpid(), nonce);
	if (mkdir(dir_out, 0700) != 0)
		return -errno;
	fd = open(dir_out, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0) {
		int err = errno;

		rmdir(dir_out);
		return -err;
	}
	return fd;
}

static void probe_programs(struct probe_report *r, const char *object_path, const char *cgroup_path)
{
	char cgroup_dir[AA_PATH_LEN];
	struct bpf_object *all;
	int cgroup_fd, netns_fd, err, cgroup_link_err = 0, netns_link_err = 0;
	char cgroup_link_detail[AA_PROBE_DETAIL_LEN] = "", netns_link_detail[AA_PROBE_DETAIL_LEN] = "";

	cgroup_fd = make_probe_cgroup(cgroup_path, cgroup_dir, sizeof(cgroup_dir));
	netns_fd = new_netns_fd();
	/* One load of the whole object covers every program when the kernel accepts them all. */
	all = load_object(object_path, NULL, &err);

	for (int i = 0; i < PROBED_PROGRAM_COUNT; i++) {
		const struct probed_program *probe = &probed_programs[i];

		err = probe_program(object_path, all, probe, cgroup_fd, netns_fd);
		report(r, probe->feature, err, err ? last_error_text() : "");
		/* Only a failed attach of a loaded program counts against links, not a failed load. */
		if (err && strstr(last_error_text(), "link ") == last_error_text()) {
			int *slot = probe->netns ? &netns_link_err : &cgroup_link_err;
			char *detail = probe->netns ? netns_link_detail : cgroup_link_detail;

			if (!*slot) {
				*slot = err;
				snprintf(detail, AA_PROBE_DETAIL_LEN, "%s", last_error_text());
			}
		}
	}
	report(r, "link:cgroup", cgroup_link_err, cgroup_link_detail);
	report(r, "link:netns", netns_link_err, netns_link_detail);

	if (all)
		bpf_object__close(all);
	if (netns_fd >= 0)
		close(netns_fd);
	if (cgroup_fd >= 0) {
		close(cgroup_fd);
		rmdir(cgroup_dir);
	}
}

int aa_capture_probe_features(const char *object_path, const char *cgroup_path, char *out, int out_len)
{
	struct probe_report r = { .out = out, .out_len = out_len };

	reset_errors();
	if (!out || out_len <= 0)
		return fail(EINVAL, "probe report buffer of %d bytes", out_len);
	out[0] = '\0';
	probe_map(&r, "map:lru_hash", BPF_MAP_TYPE_LRU_HASH);
	probe_map(&r, "map:sk_storage", BPF_MAP_TYPE_SK_STORAGE);
	probe_map(&r, "map:sockhash", BPF_MAP_TYPE_SOCKHASH);
	probe_programs(&r, object_path, cgroup_path);
	if (r.overflow)
		return fail(ENOSPC, "probe report longer than %d bytes", out_len);
	return r.used;
}
