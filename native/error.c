/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: the last failure of each thread, with libbpf's messages. See libagent.h. */
#define _GNU_SOURCE

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <bpf/libbpf.h>

#include "internal.h"

#define AA_LIBBPF_LOG_LEN 1536

/* ---- error reporting ---------------------------------------------------------------- */

static __thread char last_error[AA_ERROR_LEN];
/* Tail of libbpf's warnings since the current libbpf call began (the verifier log included). */
static __thread char libbpf_log[AA_LIBBPF_LOG_LEN];

int fail(int err, const char *format, ...)
{
	char reason[256];
	va_list args;
	int len, log_len;

	va_start(args, format);
	len = vsnprintf(last_error, sizeof(last_error), format, args);
	va_end(args);
	if (len < 0)
		len = 0;
	/* libbpf_strerror also names libbpf's own codes (4000 and up), which strerror does not. */
	if (libbpf_strerror(err, reason, sizeof(reason)) != 0)
		snprintf(reason, sizeof(reason), "error %d", err);
	log_len = (int)strlen(libbpf_log);
	while (log_len > 0 && libbpf_log[log_len - 1] == ' ')
		log_len--;
	if ((size_t)len < sizeof(last_error))
		snprintf(last_error + len, sizeof(last_error) - len, ": %s%s%.*s", reason,
			 log_len ? "; " : "", log_len, libbpf_log);
	return -err;
}

static int libbpf_print(enum libbpf_print_level level, const char *format, va_list args)
{
	char line[512];
	size_t used, add;
	int len;

	if (level == LIBBPF_DEBUG)
		return 0;
	len = vsnprintf(line, sizeof(line), format, args);
	if (len <= 0)
		return 0;
	add = strnlen(line, sizeof(line) - 1);
	used = strlen(libbpf_log);
	if (used + add >= sizeof(libbpf_log)) {
		/* Keep the newest text: the verifier's verdict comes at the end of its log. */
		size_t drop = used + add - (sizeof(libbpf_log) - 1);

		if (drop > used)
			drop = used;
		memmove(libbpf_log, libbpf_log + drop, used - drop + 1);
		used -= drop;
	}
	memcpy(libbpf_log + used, line, add);
	libbpf_log[used + add] = '\0';
	for (char *c = libbpf_log; *c; c++)
		if (*c == '\n')
			*c = ' ';
	return len;
}

void reset_errors(void)
{
	last_error[0] = '\0';
	libbpf_log[0] = '\0';
	libbpf_set_print(libbpf_print);
}

void clear_libbpf_log(void)
{
	libbpf_log[0] = '\0';
}

const char *last_error_text(void)
{
	return last_error;
}

void set_last_error(const char *text)
{
	snprintf(last_error, sizeof(last_error), "%s", text);
}

int aa_last_error(char *out, int out_len)
{
	if (!out || out_len <= 0)
		return -EINVAL;
	snprintf(out, out_len, "%s", last_error);
	return (int)strnlen(out, out_len);
}
