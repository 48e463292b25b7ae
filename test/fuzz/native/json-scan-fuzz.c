// libFuzzer harness of the CNI plugin's JSON scanner (native/cni/json-scan.c), whose input is the
// network configuration that the container runtime writes to the plugin's stdin. AddressSanitizer
// catches every read past the input, which libFuzzer allocates at its exact size.

#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "json-scan.h"

/* Reads a string twice, decoding into out and skipping, and checks that both agree. */
static void check_string(const char *start, const char *end)
{
	struct json_scanner decoded = {start, end}, skipped = {start, end};
	char out[16];
	int result = json_read_string(&decoded, out, sizeof(out));
	int skip_result = json_read_string(&skipped, NULL, 0);

	assert(decoded.p >= start);
	assert(decoded.p <= end);
	assert((result == -1) == (skip_result == -1));
	if (result != -1)
		assert(decoded.p == skipped.p);
	if (result == 0)
		assert(strlen(out) < sizeof(out));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *start = (const char *)data, *end = start + size;
	struct json_scanner value = {start, end}, number = {start, end};

	if (json_skip_value(&value, 0) == 0) {
		assert(value.p > start);
		assert(value.p <= end);
	}
	if (json_skip_number(&number) == 0)
		assert(number.p <= end);
	/* Every quote of the input as the start of a string, as the plugin meets member names and values. */
	for (const char *quote = memchr(start, '"', size); quote; quote = memchr(quote + 1, '"', (size_t)(end - quote - 1)))
		check_string(quote, end);
	return 0;
}
