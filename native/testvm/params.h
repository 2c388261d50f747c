/*
 * The kernel's parameters, from the multiboot command line (QEMU's -append): words
 * `gw.KEY=VALUE` separated by spaces, after the kernel's path, which QEMU puts first (so
 * the path must not contain spaces).
 *
 *   gw.profile=zero|os-image|random  first content (default os-image)
 *   gw.seed=N                        content seed (default 1)
 *   gw.image_seed=N                  seed of the shared image (default 0)
 *   gw.shared=PERMILLE               pages holding shared-image blocks, 0..1000 (default 0)
 *   gw.hot=PERMILLE                  pages the kernel rewrites, 0..1000 (default 250)
 *   gw.rate=KIB_PER_SEC|max          bytes rewritten per second, in KiB (default 0: none)
 *   gw.mem=MIB                       pages worked on, in MiB from 16 MiB (default: all the
 *                                    RAM of the region holding 16 MiB, below 4 GiB)
 *
 * The disk (a legacy virtio-blk device, disk.c), in 4 KiB blocks:
 *   gw.disk_rate=BLOCKS_PER_SEC|max  blocks rewritten per second (default 0: none)
 *   gw.disk_hot=BLOCKS               blocks the kernel rewrites (default 256)
 *   gw.disk_base=BLOCKS              blocks 0..BLOCKS-1 hold the base image from boot
 *                                    (agent/guest/testvm-disk.ts writes it; default 0)
 * Any gw.disk_ key makes the disk required: without one the kernel stops at boot. Without
 * the keys a disk that is there is still used, with the defaults.
 *
 * N and the per-mille are decimal integers (no sign, no hex); a key given twice, an
 * unknown key or a bad value is an error, said on COM1, and the kernel stops there.
 */
#ifndef GANGWAY_TESTVM_PARAMS_H
#define GANGWAY_TESTVM_PARAMS_H

#include <stdint.h>

struct testvm_params {
	uint32_t profile; /* enum guest_profile */
	uint64_t seed;
	uint64_t image_seed;
	uint32_t shared_permille;
	uint32_t hot_permille;
	uint64_t rate_bytes_per_sec; /* TESTVM_RATE_UNLIMITED for gw.rate=max */
	uint64_t mem_bytes;          /* 0: to the end of the RAM region */
	uint64_t disk_rate_blocks_per_sec; /* TESTVM_RATE_UNLIMITED for gw.disk_rate=max */
	uint64_t disk_hot_blocks;
	uint64_t disk_base_blocks;
	int disk_required;                 /* a gw.disk_ key was given */
};

/* Fills `p` (defaults first); returns how many problems it said on COM1. */
unsigned params_parse(const char *cmdline, struct testvm_params *p);

#endif
