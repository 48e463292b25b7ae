/* SPDX-License-Identifier: Apache-2.0 */
/* libagent: running a loaded sk_lookup program on a made-up connection with
 * BPF_PROG_TEST_RUN (Linux 5.13 or later), for tests. See libagent.h.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "internal.h"

/* Offsets in result_out of aa_sk_lookup_test_run. */
#define AA_TEST_RUN_VERDICT 0
#define AA_TEST_RUN_COOKIE 8

/* Fills the context the kernel builds for a connection lookup. Addresses are copied as they come,
 * in network byte order. The kernel reads remote_port in network byte order and local_port in host
 * byte order.
 */
static int fill_sk_lookup_context(struct bpf_sk_lookup *ctx, int family, int protocol,
				  const unsigned char *remote_ip, int remote_port,
				  const unsigned char *local_ip, int local_port)
{
	if (family != AF_INET && family != AF_INET6)
		return fail(EAFNOSUPPORT, "sk_lookup test run: address family %d (use %d or %d)", family,
			    AF_INET, AF_INET6);
	if (remote_port < 0 || remote_port > 65535 || local_port < 0 || local_port > 65535)
		return fail(ERANGE, "sk_lookup test run: port %d or %d out of range 0-65535", remote_port,
			    local_port);

	memset(ctx, 0, sizeof(*ctx));
	ctx->family = (__u32)family;
	ctx->protocol = (__u32)protocol;
	ctx->remote_port = htons((uint16_t)remote_port);
	ctx->local_port = (__u32)local_port;
	if (family == AF_INET) {
		memcpy(&ctx->remote_ip4, remote_ip, 4);
		memcpy(&ctx->local_ip4, local_ip, 4);
	} else {
		memcpy(ctx->remote_ip6, remote_ip, 16);
		memcpy(ctx->local_ip6, local_ip, 16);
	}
	return 0;
}

int aa_sk_lookup_test_run(const char *program_pin_path, int family, int protocol,
			  const unsigned char *remote_ip, int remote_port,
			  const unsigned char *local_ip, int local_port, unsigned char *result_out)
{
	struct bpf_sk_lookup ctx_in, ctx_out;
	LIBBPF_OPTS(bpf_test_run_opts, opts);
	uint32_t verdict;
	uint64_t cookie;
	int prog_fd, err;

	reset_errors();
	err = fill_sk_lookup_context(&ctx_in, family, protocol, remote_ip, remote_port, local_ip,
				     local_port);
	if (err)
		return err;

	prog_fd = bpf_obj_get(program_pin_path);
	if (prog_fd < 0)
		return fail(-prog_fd, "open pinned program %s", program_pin_path);

	memset(&ctx_out, 0, sizeof(ctx_out));
	opts.ctx_in = &ctx_in;
	opts.ctx_size_in = sizeof(ctx_in);
	opts.ctx_out = &ctx_out;
	opts.ctx_size_out = sizeof(ctx_out);
	opts.repeat = 1;
	err = bpf_prog_test_run_opts(prog_fd, &opts);
	close(prog_fd);
	if (err)
		return fail(-err, "test run of sk_lookup program %s", program_pin_path);

	verdict = opts.retval;
	cookie = ctx_out.cookie;
	memcpy(result_out + AA_TEST_RUN_VERDICT, &verdict, sizeof(verdict));
	memset(result_out + AA_TEST_RUN_VERDICT + sizeof(verdict), 0, AA_TEST_RUN_COOKIE - sizeof(verdict));
	memcpy(result_out + AA_TEST_RUN_COOKIE, &cookie, sizeof(cookie));
	return 0;
}
