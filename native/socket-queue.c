/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: the send queue of a connected TCP socket, for senders that need to know when the
 * peer's kernel has acknowledged what they wrote (the audit syslog sink).
 */
#define _GNU_SOURCE

#include <errno.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>

#include "internal.h"

/*
 * Returns the number of bytes written to the TCP socket fd that the peer has not acknowledged
 * yet, sent or not (SIOCOUTQ, which TCP computes as write_seq - snd_una), or -errno. 0 means
 * the peer's kernel received every byte written so far. It says nothing about the peer application.
 */
int aa_socket_unacked_bytes(int fd);

int aa_socket_unacked_bytes(int fd)
{
	int queued = 0;

	reset_errors();
	if (ioctl(fd, SIOCOUTQ, &queued) != 0)
		return fail(errno, "ioctl SIOCOUTQ on fd %d", fd);
	return queued;
}
