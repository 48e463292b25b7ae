/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: what an agent hand-over needs from the kernel. A replacement agent's listeners join
 * the running agent's listeners through SO_REUSEPORT, and net.ipv4.tcp_migrate_req moves the
 * connections queued on a closing listener to the listener that stays. See libagent.h.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <sys/socket.h>

#include "internal.h"

int enable_request_migration(void)
{
	/* NOTE: kernels before 5.14 lack the sysctl, so a hand-over there resets queued connections. */
	return enable_sysctl("net/ipv4/tcp_migrate_req", 1);
}

int aa_socket_set_reuseport(int fd, int on)
{
	int value = on ? 1 : 0;

	reset_errors();
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &value, sizeof(value)) != 0)
		return fail(errno, "setsockopt SO_REUSEPORT=%d on fd %d", value, fd);
	return 0;
}
