/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: flock(2), which Node.js does not offer, for the agent's lock files. See libagent.h. */
#define _GNU_SOURCE

#include <errno.h>
#include <sys/file.h>

#include "internal.h"

int aa_flock(int fd, int exclusive, int nonblocking)
{
	int operation = (exclusive ? LOCK_EX : LOCK_SH) | (nonblocking ? LOCK_NB : 0);
	int result;

	reset_errors();
	if (fd < 0)
		return fail(EBADF, "flock on fd %d", fd);
	do
		result = flock(fd, operation);
	while (result != 0 && errno == EINTR);
	if (result != 0)
		return fail(errno, "flock %s%s on fd %d", exclusive ? "LOCK_EX" : "LOCK_SH",
			    nonblocking ? "|LOCK_NB" : "", fd);
	return 0;
}
