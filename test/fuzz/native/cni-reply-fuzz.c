// libFuzzer harness of the CNI plugin's reply reading (native/cni/socket-io.c): the bytes that the
// agent writes on the plugin's unix socket go through a socket pair into receive_all(), then
// parse_reply() splits them into the exit status and the bytes to print.

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "socket-io.h"

/* Smaller than the plugin's limit, so that long inputs reach the EMSGSIZE path. */
#define REPLY_CAPACITY 1024

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char reply[REPLY_CAPACITY];
	char *body;
	size_t body_length;
	int pair[2], status = -1;
	ssize_t length;

	/* The socket buffer keeps the whole input, so one thread can write it all before reading. */
	if (size > 64 * 1024)
		return -1;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) < 0)
		abort();
	if (size > 0 && write(pair[1], data, size) != (ssize_t)size)
		abort();
	close(pair[1]);
	length = receive_all(pair[0], reply, sizeof(reply), now_ms() + 1000);
	close(pair[0]);
	if (length < 0) {
		assert(errno == EMSGSIZE);
		assert(size >= REPLY_CAPACITY);
		return 0;
	}
	assert((size_t)length == size);
	assert(memcmp(reply, data, size) == 0);

	if (parse_reply(reply, (size_t)length, &status, &body, &body_length) == 0) {
		assert(status >= 0);
		assert(status <= 255);
		assert(body + body_length == reply + length);
		assert(body[-1] == '\n');
	}
	return 0;
}
