/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: the per-namespace sysctls that the agent writes. Each path is built under the proc
 * root, the host's procfs as mounted where the agent runs (/proc by default). A container's own
 * /proc/sys is read-only, so an agent in a pod writes through the host's procfs mounted elsewhere
 * (for example /host/proc). /proc/sys/net resolves to the network namespace of the thread that
 * opens it, whichever procfs mount it is opened through, so a helper thread inside a pod's
 * namespace reaches the pod's own copy. See libagent.h.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* Written only by aa_set_proc_root, which the agent calls once before any namespace work. */
static char proc_root[AA_PATH_LEN] = "/proc";

int aa_set_proc_root(const char *dir)
{
	size_t len;

	reset_errors();
	if (!dir || dir[0] != '/')
		return fail(EINVAL, "proc root \"%s\" is not an absolute path", dir ? dir : "(null)");
	len = strlen(dir);
	/* "/host/proc/" and "/host/proc" name the same folder. */
	while (len > 1 && dir[len - 1] == '/')
		len--;
	/* Leaves 64 bytes for "/sys/", the sysctl names this library writes and the NUL. */
	if (len + 64 >= sizeof(proc_root))
		return fail(ENAMETOOLONG, "proc root %.64s... is longer than %zu bytes", dir,
			    sizeof(proc_root) - 65);
	memcpy(proc_root, dir, len);
	proc_root[len] = '\0';
	return 0;
}

int open_sysctl(const char *name, int flags, char *path, size_t path_len)
{
	int len = snprintf(path, path_len, "%s/sys/%s", proc_root, name);

	if (len < 0 || (size_t)len >= path_len) {
		errno = ENAMETOOLONG;
		return -1;
	}
	return open(path, flags | O_CLOEXEC);
}

int enable_sysctl(const char *name, int optional)
{
	char path[AA_PATH_LEN];
	ssize_t written;
	int fd, err;

	fd = open_sysctl(name, O_WRONLY, path, sizeof(path));
	if (fd < 0) {
		if (optional && errno == ENOENT)
			return 0;
		return fail(errno, "open %s", path);
	}
	written = write(fd, "1\n", 2);
	if (written != 2) {
		err = written < 0 ? errno : EIO;
		close(fd);
		return fail(err, "write 1 to %s", path);
	}
	close(fd);
	return 0;
}
