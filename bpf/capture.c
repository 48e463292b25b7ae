/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The capture object, bpf/capture.bpf.o: every hook in one object file.
 *
 * Each hook keeps its own source file, but they are compiled as one translation unit so that
 * all programs reference the same map definitions. libbpf then creates (or reuses from the
 * pin directory) each map once and hands the same map to every program, with no need to
 * load several objects against shared pins.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "cgroup_connect4.c"
#include "cgroup_connect6.c"
#include "sockops.c"
#include "cgroup_getpeername4.c"
#include "cgroup_getpeername6.c"
#include "sk_lookup.c"
#include "cgroup_bind.c"

/* bpf_sk_storage_get, bpf_get_netns_cookie and bpf_sk_assign need a GPL-compatible license. */
char _license[] SEC("license") = "Dual BSD/GPL";
