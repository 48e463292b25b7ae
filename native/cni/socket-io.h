// Unix socket I/O with deadlines: see socket-io.c. Deadlines are CLOCK_MONOTONIC times in milliseconds.
#ifndef AMBIENT_AGENT_CNI_SOCKET_IO_H
#define AMBIENT_AGENT_CNI_SOCKET_IO_H

#include <stddef.h>
#include <sys/types.h>

long long now_ms(void);

/* Returns the milliseconds until deadline, 0 once it passed. */
int remaining_ms(long long deadline);

/*
 * Connects to the unix socket at socket_path (shorter than sun_path), trying again every 200 ms
 * until the deadline. Returns the non-blocking socket, or -1 with *last_error set.
 */
int connect_until(const char *socket_path, long long deadline, int *last_error);

/* Sends every byte before the deadline; returns -1 with errno set on failure. */
int send_all(int fd, const char *data, size_t length, long long deadline);

/* Reads until the peer closes the connection. Returns the byte count, or -1 with errno set (EMSGSIZE when capacity is reached). */
ssize_t receive_all(int fd, char *buffer, size_t capacity, long long deadline);

/*
 * Splits the agent's reply into the plugin's exit status and the bytes to print. The status line is
 * 1 to 3 decimal digits with a value of at most 255, then a newline. Returns 0, -1 when the reply
 * has no newline, or -2 for any other status line.
 */
int parse_reply(char *reply, size_t length, int *status, char **body, size_t *body_length);

#endif
