// Unix socket I/O with deadlines, for the plugin's exchange with the agent.

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "socket-io.h"

#define CONNECT_RETRY_MS 200

long long now_ms(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

int remaining_ms(long long deadline)
{
	long long left = deadline - now_ms();
	return left > 0 ? (int)left : 0;
}

static void sleep_ms(int milliseconds)
{
	struct timespec pause = {milliseconds / 1000, (long)(milliseconds % 1000) * 1000000L};
	while (nanosleep(&pause, &pause) < 0 && errno == EINTR)
		;
}

int connect_until(const char *socket_path, long long deadline, int *last_error)
{
	struct sockaddr_un address = {.sun_family = AF_UNIX};

	strcpy(address.sun_path, socket_path);
	for (;;) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0) {
			*last_error = errno;
			return -1;
		}
		if (connect(fd, (struct sockaddr *)&address, sizeof(address)) == 0)
			return fd;
		*last_error = errno;
		if (errno == EINPROGRESS) {
			struct pollfd wait = {.fd = fd, .events = POLLOUT};
			int error = 0;
			socklen_t size = sizeof(error);
			if (poll(&wait, 1, remaining_ms(deadline)) == 1 &&
			    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) == 0 && error == 0)
				return fd;
			*last_error = error ? error : ETIMEDOUT;
		}
		close(fd);
		if (remaining_ms(deadline) == 0)
			return -1;
		sleep_ms(remaining_ms(deadline) < CONNECT_RETRY_MS ? remaining_ms(deadline) : CONNECT_RETRY_MS);
	}
}

/* Waits for one poll event on fd until the deadline; returns -1 with errno ETIMEDOUT when it passed. */
static int wait_for(int fd, short events, long long deadline)
{
	struct pollfd wait = {.fd = fd, .events = events};

	for (;;) {
		int result = poll(&wait, 1, remaining_ms(deadline));
		if (result > 0)
			return 0;
		if (result == 0) {
			errno = ETIMEDOUT;
			return -1;
		}
		if (errno != EINTR)
			return -1;
	}
}

int send_all(int fd, const char *data, size_t length, long long deadline)
{
	while (length > 0) {
		ssize_t n = send(fd, data, length, MSG_NOSIGNAL);
		if (n > 0) {
			data += n;
			length -= (size_t)n;
		} else if (n < 0 && errno != EINTR && errno != EAGAIN) {
			return -1;
		} else if (n < 0 && errno == EAGAIN && wait_for(fd, POLLOUT, deadline) < 0) {
			return -1;
		}
	}
	return 0;
}

ssize_t receive_all(int fd, char *buffer, size_t capacity, long long deadline)
{
	size_t used = 0;

	for (;;) {
		ssize_t n = recv(fd, buffer + used, capacity - used, 0);
		if (n == 0)
			return (ssize_t)used;
		if (n > 0) {
			used += (size_t)n;
			if (used == capacity) {
				errno = EMSGSIZE;
				return -1;
			}
		} else if (errno != EINTR && errno != EAGAIN) {
			return -1;
		} else if (errno == EAGAIN && wait_for(fd, POLLIN, deadline) < 0) {
			return -1;
		}
	}
}

int parse_reply(char *reply, size_t length, int *status, char **body, size_t *body_length)
{
	char *newline = memchr(reply, '\n', length);
	size_t digits;
	int value = 0;

	if (!newline)
		return -1;
	digits = (size_t)(newline - reply);
	/* Digits only: strtol() would also take blanks, a sign, and a NUL that ends the line early. */
	if (digits == 0 || digits > 3)
		return -2;
	for (size_t i = 0; i < digits; i++) {
		if (reply[i] < '0' || reply[i] > '9')
			return -2;
		value = value * 10 + (reply[i] - '0');
	}
	if (value > 255)
		return -2;
	*status = value;
	*body = newline + 1;
	*body_length = length - digits - 1;
	return 0;
}
