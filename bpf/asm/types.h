/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* <linux/types.h> includes <asm/types.h>, which Debian installs only under the host's
 * multiarch directory (/usr/include/x86_64-linux-gnu). For the BPF target the generic
 * definitions are the right ones, so the build finds this file through `-I bpf` and needs
 * no architecture-specific include path.
 */
#include <asm-generic/types.h>
