/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: nftables scripts run inside a network namespace through libnftables. See libagent.h. */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

/*
 * libnftables is opened with dlopen rather than linked, so that libagent loads on hosts without
 * it; the agent then runs the nft tool instead. The prototypes are those of
 * nftables/libnftables.h (nftables 0.9 and later).
 */
#define AA_LIBNFTABLES "libnftables.so.1"

struct nft_ctx;

struct libnftables {
	struct nft_ctx *(*ctx_new)(uint32_t flags);
	void (*ctx_free)(struct nft_ctx *ctx);
	int (*buffer_output)(struct nft_ctx *ctx);
	int (*buffer_error)(struct nft_ctx *ctx);
	const char *(*get_output_buffer)(struct nft_ctx *ctx);
	const char *(*get_error_buffer)(struct nft_ctx *ctx);
	int (*run_cmd_from_buffer)(struct nft_ctx *ctx, const char *buf);
};

static struct libnftables nft;
static int nft_load_result = 1;
static char nft_load_error[256];
static pthread_once_t nft_once = PTHREAD_ONCE_INIT;

static void *nft_symbol(void *handle, const char *name)
{
	void *symbol = dlsym(handle, name);

	if (!symbol && !nft_load_error[0])
		snprintf(nft_load_error, sizeof(nft_load_error), "%s has no symbol %s", AA_LIBNFTABLES, name);
	return symbol;
}

static void nft_load(void)
{
	void *handle = dlopen(AA_LIBNFTABLES, RTLD_NOW | RTLD_LOCAL);

	if (!handle) {
		snprintf(nft_load_error, sizeof(nft_load_error), "dlopen %s: %s", AA_LIBNFTABLES, dlerror());
		nft_load_result = -ENOENT;
		return;
	}
	nft.ctx_new = nft_symbol(handle, "nft_ctx_new");
	nft.ctx_free = nft_symbol(handle, "nft_ctx_free");
	nft.buffer_output = nft_symbol(handle, "nft_ctx_buffer_output");
	nft.buffer_error = nft_symbol(handle, "nft_ctx_buffer_error");
	nft.get_output_buffer = nft_symbol(handle, "nft_ctx_get_output_buffer");
	nft.get_error_buffer = nft_symbol(handle, "nft_ctx_get_error_buffer");
	nft.run_cmd_from_buffer = nft_symbol(handle, "nft_run_cmd_from_buffer");
	nft_load_result = nft_load_error[0] ? -ENOSYS : 0;
}

static int nft_available(void)
{
	pthread_once(&nft_once, nft_load);
	if (nft_load_result != 0)
		return fail(-nft_load_result, "%s", nft_load_error);
	return 0;
}

int aa_nft_available(void)
{
	reset_errors();
	return nft_available();
}

struct nft_request {
	const char *script;
	char *out;
	int out_len;
};

/* Copies nftables' output into the request's buffer. Returns its length, or -ENOSPC when it does not fit. */
static int copy_output(const struct nft_request *req, const char *output)
{
	size_t len = output ? strlen(output) : 0;

	if (!req->out)
		return 0;
	if (len >= (size_t)req->out_len)
		return fail(ENOSPC, "nftables output of %zu bytes does not fit in %d bytes", len, req->out_len);
	memcpy(req->out, output ? output : "", len + 1);
	return (int)len;
}

/* Runs on the helper thread inside the pod's namespace, so the context's netlink socket is opened there. */
static int nft_run_here(void *arg)
{
	const struct nft_request *req = arg;
	struct nft_ctx *ctx;
	const char *message;
	int result;

	ctx = nft.ctx_new(0);
	if (!ctx)
		return fail(ENOMEM, "create an nftables context");
	/* Buffered, so that nothing is written to the agent's stdout or stderr. */
	nft.buffer_output(ctx);
	nft.buffer_error(ctx);
	result = nft.run_cmd_from_buffer(ctx, req->script);
	if (result != 0) {
		message = nft.get_error_buffer(ctx);
		result = fail(EINVAL, "nftables rejected the script: %s", message && message[0] ? message : "no message");
	} else {
		result = copy_output(req, nft.get_output_buffer(ctx));
	}
	nft.ctx_free(ctx);
	return result;
}

int aa_nft_run(const char *netns_path, const char *script, char *out, int out_len)
{
	struct nft_request req = { .script = script, .out = out, .out_len = out_len };
	int err;

	reset_errors();
	if (!script)
		return fail(EINVAL, "nftables script is missing");
	if (out && out_len <= 0)
		return fail(EINVAL, "nftables output buffer of %d bytes", out_len);
	err = nft_available();
	if (err)
		return err;
	return run_in_netns(netns_path, nft_run_here, &req);
}
