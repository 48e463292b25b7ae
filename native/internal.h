/* SPDX-License-Identifier: Apache-2.0 */
/* Declarations shared by the files of libagent; not part of its interface (libagent.h). */
#ifndef AMBIENT_AGENT_INTERNAL_H
#define AMBIENT_AGENT_INTERNAL_H

#include <stddef.h>

#include "libagent.h"

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

#define AA_ERROR_LEN 2048
#define AA_PATH_LEN 4096
/* Value of a socket's entry in aa_agent_socks; AA_AGENT_SOCKET in bpf/lib/config.h. */
#define AA_AGENT_SOCKET_FLAG 1
/* Pinned links of sk_lookup programs are named <prefix><netns cookie>. */
#define AA_NETNS_LINK_PREFIX "sk_lookup-"

/* Records what failed and returns -err, so callers can write `return fail(err, ...)`. */
int fail(int err, const char *format, ...) __attribute__((format(printf, 2, 3)));

/* Clears the last failure and routes libbpf's warnings into it; call first in every entry point. */
void reset_errors(void);

/* Forgets libbpf's messages only, for failures that did not come from a libbpf call. */
void clear_libbpf_log(void);

/* Runs work(arg) on a short-lived thread inside the network namespace at netns_path and
 * returns its result; the calling thread never changes namespace (netns.c).
 */
int run_in_netns(const char *netns_path, int (*work)(void *arg), void *arg);

/* Sets net.ipv4.tcp_migrate_req to 1 in the calling thread's network namespace; a kernel
 * without the sysctl (before Linux 5.14) is left as it is (handover.c).
 */
int enable_request_migration(void);

/* Opens the sysctl `name` (such as "net/ipv4/tcp_fwmark_accept") under the proc root that
 * aa_set_proc_root set, with open(2) flags plus O_CLOEXEC. Writes the path it opened to path
 * (path_len bytes) for error messages. Returns the fd, or -1 with errno set (sysctl.c).
 */
int open_sysctl(const char *name, int flags, char *path, size_t path_len);

/* Writes 1 to the sysctl `name` of the calling thread's namespace. When optional != 0, a
 * missing sysctl is not an error (sysctl.c).
 */
int enable_sysctl(const char *name, int optional);

/* The last failure of the calling thread, and a way to carry one over from another thread. */
const char *last_error_text(void);
void set_last_error(const char *text);

#endif /* AMBIENT_AGENT_INTERNAL_H */
