// A strict scanner for JSON text: see json-scan.c.
#ifndef AMBIENT_AGENT_CNI_JSON_SCAN_H
#define AMBIENT_AGENT_CNI_JSON_SCAN_H

#include <stddef.h>

/* The text not scanned yet: from p up to, not including, end. */
struct json_scanner {
	const char *p;
	const char *end;
};

void json_skip_space(struct json_scanner *s);

/*
 * Reads a string at s->p (which must be at its opening quote) and decodes it into out, which
 * gets a terminating NUL. Returns -1 on invalid JSON and -2 when the decoded text needs more than
 * capacity - 1 bytes or contains a NUL. out may be NULL to skip the string.
 */
int json_read_string(struct json_scanner *s, char *out, size_t capacity);

/* Skips a number; returns -1 when the text at s->p is not one. */
int json_skip_number(struct json_scanner *s);

/* Skips one value with the white space before it; depth is the nesting level of the value. Returns -1 on invalid JSON. */
int json_skip_value(struct json_scanner *s, int depth);

#endif
