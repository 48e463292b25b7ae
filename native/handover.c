/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: what an agent hand-over needs from the kernel. A replacement agent's listeners join
 * the running agent's listeners through SO_REUSEPORT, and net.ipv4.tcp_migrate_req moves the
 * connections queued on a closing listener to the listener that stays. See libagent.h.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

/* /proc/sys/net resolves to the network namespace of the thread that opens it, so the netns
 * helper thread reaches the pod's own copy of the sysctl.
 */
#define MIGRATE_REQ_SYSCTL "/proc/sys/net/ipv4/tcp_migrate_req"

int enable_request_migration(void)
{
	ssize_t written;
	int fd;

	fd = open(MIGRATE_REQ_SYSCTL, O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		/* NOTE: kernels before 5.14 lack the sysctl, so a hand-over there resets queued connections. */
		if (errno == ENOENT)
			return 0;
		return fail(errno, "open %s", MIGRATE_REQ_SYSCTL);
	}
	written = write(fd, "1\n", 2);
	if (written != 2) {
		int err = written < 0 ? errno : EIO;

		close(fd);
		return fail(err, "write 1 to %s", MIGRATE_REQ_SYSCTL);
	}
	close(fd);
	return 0;
}

int aa_socket_set_reuseport(int fd, int on)
{
	int value = on ? 1 : 0;

	reset_errors();
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &value, sizeof(value)) != 0)
		return fail(errno, "setsockopt SO_REUSEPORT=%d on fd %d", value, fd);
	return 0;
}
