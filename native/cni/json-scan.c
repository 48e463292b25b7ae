// A strict scanner for JSON text (RFC 8259) that decodes strings and skips values, enough for a
// CNI plugin to read the few top-level members of its network configuration without a library.

#include <string.h>

#include "json-scan.h"

/* Nesting limit of skipped values, which bounds the recursion on hostile input. */
#define MAX_JSON_DEPTH 64


void json_skip_space(struct json_scanner *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

static int hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int read_hex4(struct json_scanner *s, unsigned *value)
{
	*value = 0;
	if (s->end - s->p < 4)
		return -1;
	for (int i = 0; i < 4; i++) {
		int digit = hex_value(*s->p++);
		if (digit < 0)
			return -1;
		*value = (*value << 4) | (unsigned)digit;
	}
	return 0;
}

/* Appends one byte to out when there is room. The length counts every byte, so the caller sees an overflow. */
static void put_byte(char *out, size_t capacity, size_t *length, unsigned char byte)
{
	if (out && *length + 1 < capacity)
		out[*length] = (char)byte;
	(*length)++;
}

static void put_utf8(char *out, size_t capacity, size_t *length, unsigned code_point)
{
	if (code_point < 0x80) {
		put_byte(out, capacity, length, code_point);
	} else if (code_point < 0x800) {
		put_byte(out, capacity, length, 0xc0 | (code_point >> 6));
		put_byte(out, capacity, length, 0x80 | (code_point & 0x3f));
	} else if (code_point < 0x10000) {
		put_byte(out, capacity, length, 0xe0 | (code_point >> 12));
		put_byte(out, capacity, length, 0x80 | ((code_point >> 6) & 0x3f));
		put_byte(out, capacity, length, 0x80 | (code_point & 0x3f));
	} else {
		put_byte(out, capacity, length, 0xf0 | (code_point >> 18));
		put_byte(out, capacity, length, 0x80 | ((code_point >> 12) & 0x3f));
		put_byte(out, capacity, length, 0x80 | ((code_point >> 6) & 0x3f));
		put_byte(out, capacity, length, 0x80 | (code_point & 0x3f));
	}
}

/* Decodes the escape after a backslash. Returns -1 when it is invalid and 1 when it encodes NUL. */
static int read_escape(struct json_scanner *s, char *out, size_t capacity, size_t *length)
{
	unsigned code_point, low;
	char c;

	if (s->p >= s->end)
		return -1;
	c = *s->p++;
	switch (c) {
	case '"': case '\\': case '/':
		put_byte(out, capacity, length, c);
		return 0;
	case 'b': put_byte(out, capacity, length, '\b'); return 0;
	case 'f': put_byte(out, capacity, length, '\f'); return 0;
	case 'n': put_byte(out, capacity, length, '\n'); return 0;
	case 'r': put_byte(out, capacity, length, '\r'); return 0;
	case 't': put_byte(out, capacity, length, '\t'); return 0;
	case 'u':
		break;
	default:
		return -1;
	}
	if (read_hex4(s, &code_point) < 0)
		return -1;
	if (code_point >= 0xd800 && code_point <= 0xdbff) {
		/* A high surrogate must be followed by an escaped low surrogate. */
		if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u')
			return -1;
		s->p += 2;
		if (read_hex4(s, &low) < 0 || low < 0xdc00 || low > 0xdfff)
			return -1;
		code_point = 0x10000 + ((code_point - 0xd800) << 10) + (low - 0xdc00);
	} else if (code_point >= 0xdc00 && code_point <= 0xdfff) {
		return -1;
	}
	put_utf8(out, capacity, length, code_point);
	return code_point == 0 ? 1 : 0;
}

int json_read_string(struct json_scanner *s, char *out, size_t capacity)
{
	size_t length = 0;
	int has_nul = 0;

	if (s->p >= s->end || *s->p != '"')
		return -1;
	s->p++;
	while (s->p < s->end && *s->p != '"') {
		unsigned char c = (unsigned char)*s->p;
		if (c < 0x20)
			return -1;
		if (c == '\\') {
			int result;
			s->p++;
			result = read_escape(s, out, capacity, &length);
			if (result < 0)
				return -1;
			has_nul |= result;
		} else {
			put_byte(out, capacity, &length, c);
			s->p++;
		}
	}
	if (s->p >= s->end)
		return -1;
	s->p++;
	if (!out)
		return 0;
	if (length >= capacity || has_nul)
		return -2;
	out[length] = '\0';
	return 0;
}

static int skip_digits(struct json_scanner *s)
{
	const char *start = s->p;
	while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
		s->p++;
	return s->p > start ? 0 : -1;
}

int json_skip_number(struct json_scanner *s)
{
	if (s->p < s->end && *s->p == '-')
		s->p++;
	if (s->p < s->end && *s->p == '0')
		s->p++;
	else if (skip_digits(s) < 0)
		return -1;
	if (s->p < s->end && *s->p == '.') {
		s->p++;
		if (skip_digits(s) < 0)
			return -1;
	}
	if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
		s->p++;
		if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
			s->p++;
		if (skip_digits(s) < 0)
			return -1;
	}
	return 0;
}

static int skip_literal(struct json_scanner *s, const char *literal)
{
	size_t length = strlen(literal);
	if ((size_t)(s->end - s->p) < length || memcmp(s->p, literal, length) != 0)
		return -1;
	s->p += length;
	return 0;
}


/* Skips an object or array whose opening bracket is at s->p. */
static int skip_container(struct json_scanner *s, int depth)
{
	char close = *s->p == '{' ? '}' : ']';
	int is_object = close == '}';

	if (depth >= MAX_JSON_DEPTH)
		return -1;
	s->p++;
	json_skip_space(s);
	if (s->p < s->end && *s->p == close) {
		s->p++;
		return 0;
	}
	for (;;) {
		if (is_object) {
			if (json_read_string(s, NULL, 0) < 0)
				return -1;
			json_skip_space(s);
			if (s->p >= s->end || *s->p++ != ':')
				return -1;
		}
		if (json_skip_value(s, depth + 1) < 0)
			return -1;
		json_skip_space(s);
		if (s->p >= s->end)
			return -1;
		if (*s->p == close) {
			s->p++;
			return 0;
		}
		if (*s->p++ != ',')
			return -1;
		json_skip_space(s);
	}
}

/* Skips one value with the white space before it. */
int json_skip_value(struct json_scanner *s, int depth)
{
	json_skip_space(s);
	if (s->p >= s->end)
		return -1;
	switch (*s->p) {
	case '{': case '[': return skip_container(s, depth);
	case '"': return json_read_string(s, NULL, 0);
	case 't': return skip_literal(s, "true");
	case 'f': return skip_literal(s, "false");
	case 'n': return skip_literal(s, "null");
	default: return json_skip_number(s);
	}
}
