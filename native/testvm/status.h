/*
 * The status block of gangway-testvm, the multiboot test kernel (agent/guest/testvm-status.ts
 * mirrors it; never guess at it from TypeScript).
 *
 * The block sits at guest-physical address TESTVM_STATUS_ADDR. With QEMU's RAM in a
 * memory-backend-file, the first RAM region of a q35 machine (everything below 2 GiB)
 * is the file from offset 0, so the agent reads the block at file offset 0x8000 while the
 * VM runs. Fields are little-endian at fixed offsets; do not reorder: append and bump
 * TESTVM_STATUS_LAYOUT instead.
 *
 * Consistency: the kernel makes `seq` odd before it changes the counters (`uptime_ms` on)
 * and even again afterwards. A reader copies the block, then reads `seq` again: the copy
 * is whole if both reads are the same even number. The parameters (`page_size` to
 * `tsc_hz`) are written once, before `state` becomes TESTVM_STATE_RUNNING.
 *
 * The full check, the one request the agent can make: the kernel cannot know that it was
 * migrated (a stop leaves its CPU where it was), so after a resume the agent writes a new
 * value (any value other than `check_done`; check_done + 1 by convention) into
 * `check_request` (4 bytes at block offset 168, file offset 0x80a8). The kernel polls it
 * whenever it wakes (every millisecond, by the PIT), checks every page of its range
 * against the version it last wrote there, and publishes the result: check_pages and
 * check_stale_pages, with check_done = the request they answer. A request that comes
 * during a check is answered by another check.
 *
 * Page content is guest-content.h's, a pure function of (profile, seed, image seed,
 * shared fraction, page, version), where `page` is the page's guest-physical address /
 * 4096 and the image permutation runs over the range's pages. The version of page p is the
 * u32 at version_table_addr + 4 * (p - range_start / 4096); the hot set, the pages the
 * kernel rewrites, is a list of u32 page numbers at hot_list_addr. Both lie below
 * TESTVM_RANGE_START, in the kernel's own RAM, so they move with the VM.
 *
 * Layout 2 adds the disk (disk.c): a legacy virtio-blk device, worked on in 4 KiB blocks.
 * Block content is guest-content.h's gw_disk_block, a pure function of (seed, image seed,
 * disk_base_blocks, block, version); the version of block b is the u32 at
 * disk_version_table_addr + 4 * b (TESTVM_DISK_TABLE_ADDR, below the range too). The full
 * check covers the disk as well: every base block and every block ever written.
 * disk_inflight_block and disk_inflight_version are not counters and not under `seq`: the
 * kernel writes them the moment they change, so the block of a stopped VM says exactly
 * which write was in flight (disk.c says why block disk_inflight_block may then hold either
 * its table version or disk_inflight_version).
 */
#ifndef GANGWAY_TESTVM_STATUS_H
#define GANGWAY_TESTVM_STATUS_H

#include <stdint.h>

#include "guest-layout.h" /* enum guest_profile: the same codes as the process guest's */

#define TESTVM_STATUS_ADDR 0x8000u
#define TESTVM_STATUS_MAGIC "GWVMSTAT"
#define TESTVM_STATUS_LAYOUT 2u
/* The kernel's pages start here and run to the end of the RAM region holding it. */
#define TESTVM_RANGE_START 0x1000000u
/* dirty_rate_bytes_per_sec of `gw.rate=max`: write as fast as the CPU goes. */
#define TESTVM_RATE_UNLIMITED UINT64_MAX
/* No page found stale yet (guest-physical 0 is never in the range). */
#define TESTVM_NO_PAGE 0u
/* No disk block (written, found stale or in flight) yet: block 0 is a block. */
#define TESTVM_NO_BLOCK UINT64_MAX
#define TESTVM_DISK_BLOCK_SIZE 4096u
/*
 * The disk's version table: from 12 MiB to the range at 16 MiB, a u32 per block, so the
 * kernel works on the first 4 GiB (1,048,576 blocks) of a larger disk. The page tables from
 * 4 MiB end below 12 MiB for any range under 4 GiB (8 bytes per page at most).
 */
#define TESTVM_DISK_TABLE_ADDR 0xc00000u
#define TESTVM_DISK_MAX_BLOCKS ((TESTVM_RANGE_START - TESTVM_DISK_TABLE_ADDR) / 4u)

enum testvm_state {
	TESTVM_STATE_INVALID = 0,
	TESTVM_STATE_SETTING_UP = 1, /* parameters read; writing every page's first content */
	TESTVM_STATE_RUNNING = 2,    /* `ready` was printed; the counters move */
	TESTVM_STATE_FAILED = 3,     /* bad command line or memory map: said on COM1, then halted */
};

enum testvm_disk_state {
	TESTVM_DISK_INVALID = 0,
	TESTVM_DISK_NONE = 1,    /* no legacy virtio-blk device: pages only */
	TESTVM_DISK_RUNNING = 2, /* found and worked on */
	TESTVM_DISK_FAILED = 3,  /* a request failed and so did the retry: said on COM1, disk left alone since */
};

struct testvm_status {
	char magic[8];                      /*   0 TESTVM_STATUS_MAGIC */
	uint32_t layout_version;            /*   8 TESTVM_STATUS_LAYOUT */
	uint32_t state;                     /*  12 enum testvm_state */
	uint32_t seq;                       /*  16 odd while the kernel updates the counters */
	uint32_t page_size;                 /*  20 bytes, 4096 */
	uint64_t range_start;               /*  24 guest-physical address of the first page worked on */
	uint64_t page_count;                /*  32 pages from range_start */
	uint64_t seed;                      /*  40 gw.seed */
	uint64_t image_seed;                /*  48 gw.image_seed */
	uint32_t profile;                   /*  56 enum guest_profile (gw.profile) */
	uint32_t shared_permille;           /*  60 gw.shared */
	uint32_t hot_permille;              /*  64 gw.hot */
	uint32_t hot_page_count;            /*  68 pages in the hot set */
	uint64_t dirty_rate_bytes_per_sec;  /*  72 gw.rate * 1024, or TESTVM_RATE_UNLIMITED */
	uint64_t version_table_addr;        /*  80 u32 per page of the range */
	uint64_t hot_list_addr;             /*  88 u32 page number per hot page */
	uint64_t tsc_hz;                    /*  96 the TSC's rate, measured against the PIT at boot */
	uint64_t uptime_ms;                 /* 104 TSC time since `ready` */
	uint64_t passes;                    /* 112 completed sweeps of the hot set */
	uint64_t pages_written;             /* 120 = the version table's sum */
	uint64_t pages_checked;             /* 128 by rewrites and full checks */
	uint64_t stale_pages;               /* 136 found not holding their last write, by either */
	uint64_t last_written_addr;         /* 144 guest-physical address of the page written last */
	uint64_t last_stale_addr;           /* 152 of the page found stale last, or TESTVM_NO_PAGE */
	uint32_t resumes;                   /* 160 stops seen: the RTC ran 3 s or more ahead of the TSC */
	uint32_t meta_errors;               /* 164 full checks whose version table did not sum to pages_written */
	uint32_t check_request;             /* 168 written by the agent, never by the kernel */
	uint32_t check_done;                /* 172 the request the last full check answered */
	uint64_t check_pages;               /* 176 pages the last full check verified */
	uint64_t check_stale_pages;         /* 184 of which were stale */
	/* Layout 2: the disk. Parameters (to disk_version_table_addr) are written before RUNNING. */
	uint32_t disk_state;                /* 192 enum testvm_disk_state */
	uint32_t disk_block_size;           /* 196 bytes, TESTVM_DISK_BLOCK_SIZE */
	uint64_t disk_capacity_bytes;       /* 200 the device's capacity */
	uint64_t disk_block_count;          /* 208 blocks worked on: capacity / 4096, at most TESTVM_DISK_MAX_BLOCKS */
	uint64_t disk_base_blocks;          /* 216 gw.disk_base */
	uint64_t disk_hot_blocks;           /* 224 gw.disk_hot */
	uint64_t disk_rate_blocks_per_sec;  /* 232 gw.disk_rate, or TESTVM_RATE_UNLIMITED */
	uint64_t disk_version_table_addr;   /* 240 u32 per block */
	uint64_t disk_passes;               /* 248 completed sweeps of the disk's hot set */
	uint64_t disk_writes;               /* 256 block writes = the disk version table's sum */
	uint64_t disk_blocks_written;       /* 264 distinct blocks written (version > 0) */
	uint64_t disk_blocks_checked;       /* 272 blocks read back and compared, by rewrites and full checks */
	uint64_t disk_stale_blocks;         /* 280 found not holding their last write (or base/zero), by either */
	uint64_t disk_last_written_block;   /* 288 or TESTVM_NO_BLOCK */
	uint64_t disk_last_stale_block;     /* 296 or TESTVM_NO_BLOCK */
	uint64_t disk_inflight_block;       /* 304 the block a write is in flight to, or TESTVM_NO_BLOCK */
	uint32_t disk_inflight_version;     /* 312 the version being written there */
	uint32_t disk_errors;               /* 316 requests the device failed or did not answer */
	uint64_t check_disk_blocks;         /* 320 blocks the last full check verified */
	uint64_t check_disk_stale_blocks;   /* 328 of which were stale */
};

#endif
