/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* aa_enrolled6: the IPv6 address of each enrolled pod that has one, keyed by the pod's netns
 * cookie like aa_enrolled. A pod needs an entry in both maps for its native IPv6 connections to
 * be captured; an enrolled pod without an entry here gets EPERM on every native IPv6 connect().
 */
#ifndef AA_ENROLLED6_H
#define AA_ENROLLED6_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/config.h"

/* Value of aa_enrolled6; 16 bytes. */
struct aa_pod_info6 {
	__u32 pod_ip6[4];	/* network byte order */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AA_MAX_ENROLLED);
	__type(key, __u64);	/* netns cookie */
	__type(value, struct aa_pod_info6);
} aa_enrolled6 SEC(".maps");

static __always_inline struct aa_pod_info6 *aa_enrolled6_lookup(__u64 netns_cookie)
{
	return bpf_map_lookup_elem(&aa_enrolled6, &netns_cookie);
}

#endif /* AA_ENROLLED6_H */
