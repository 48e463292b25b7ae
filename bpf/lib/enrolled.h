/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* aa_enrolled: the network namespaces whose TCP traffic is captured. The agent writes one
 * entry per enrolled pod, keyed by the netns cookie that SO_NETNS_COOKIE returns.
 */
#ifndef AA_ENROLLED_H
#define AA_ENROLLED_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Value of aa_enrolled; 8 bytes. */
struct aa_pod_info {
	__u32 pod_ip4;	/* network byte order; 0 for an IPv6-only pod, which has no IPv4 address */
	__u32 flags;	/* reserved, 0 */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AA_MAX_ENROLLED);
	__type(key, __u64);	/* netns cookie */
	__type(value, struct aa_pod_info);
} aa_enrolled SEC(".maps");

static __always_inline struct aa_pod_info *aa_enrolled_lookup(__u64 netns_cookie)
{
	return bpf_map_lookup_elem(&aa_enrolled, &netns_cookie);
}

#endif /* AA_ENROLLED_H */
