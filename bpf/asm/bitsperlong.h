/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* See asm/types.h: the generic header derives __BITS_PER_LONG (64 on the BPF target) from
 * the compiler's __SIZEOF_LONG__.
 */
#include <asm-generic/bitsperlong.h>
