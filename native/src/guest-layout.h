/*
 * Memory layout of the synthetic guest (gangway-guest).
 *
 * The guest's memory is one or more files (regions, as a VM has RAM below and above 4 GiB
 * or per NUMA node), mapped MAP_SHARED, whose pages are numbered on from one region to the
 * next. Page 0 (of region 0) is the header below; pages 1..versionPages hold the version
 * table (one little-endian u32 per page of the guest, metadata pages included, their
 * entries unused); every page from firstDataPage on is a data page whose content is a
 * pure function of (profile, seed, imageSeed, sharedPermille, page, version[page]).
 *
 * Everything else lives in the memory too, except the device state (struct guest_device):
 * a running digest of every write the guest made, kept in the process only. It is written
 * to a file when the guest is paused for a migration (SIGUSR1) and read back when a copy
 * resumes; the header records which save the memory belongs with, so a device state that
 * is lost, stale or another guest's is caught by the guest's own check (device_errors).
 *
 * The agent reads the header (agent/guest/guest-header.ts mirrors these offsets), so
 * every field has a fixed offset and is little-endian. Do not reorder; append and bump
 * GUEST_LAYOUT_VERSION instead.
 */
#ifndef GANGWAY_GUEST_LAYOUT_H
#define GANGWAY_GUEST_LAYOUT_H

#include <stdint.h>

#define GUEST_MAGIC "GWGUEST1"
#define GUEST_LAYOUT_VERSION 2u
#define GUEST_MAX_REGIONS 16u
#define GUEST_PAGE_SIZE 4096u
#define GUEST_NO_INFLIGHT UINT64_MAX

enum guest_profile {
	GUEST_PROFILE_INVALID = 0,
	GUEST_PROFILE_ZERO = 1,
	GUEST_PROFILE_OS_IMAGE = 2,
	GUEST_PROFILE_RANDOM = 3,
};

struct guest_header {
	char magic[8];                  /*   0 "GWGUEST1" */
	uint32_t layout_version;        /*   8 */
	uint32_t page_size;             /*  12 bytes */
	uint64_t memory_bytes;          /*  16 */
	uint64_t page_count;            /*  24 */
	uint64_t seed;                  /*  32 */
	uint64_t image_seed;            /*  40 */
	uint32_t shared_permille;       /*  48 */
	uint32_t hot_permille;          /*  52 */
	uint32_t profile;               /*  56 enum guest_profile */
	uint32_t first_data_page;       /*  60 = 1 + version table pages */
	uint64_t dirty_rate_bytes_per_sec; /* 64 */
	uint64_t total_writes;          /*  72 = sum of the version table */
	uint64_t passes;                /*  80 completed sweeps of the hot set */
	uint64_t pass_cursor;           /*  88 position in the current sweep */
	uint64_t stale_pages;           /*  96 cumulative: pages found not holding their last write */
	uint64_t checked_pages;         /* 104 cumulative page verifications */
	uint64_t inflight_page;         /* 112 GUEST_NO_INFLIGHT or the page being written */
	uint32_t inflight_version;      /* 120 the version being written there */
	uint32_t resumes;               /* 124 starts on an existing file */
	uint64_t resume_stale_pages;    /* 128 stale pages found by the last resume check */
	uint64_t resume_checked_pages;  /* 136 pages verified by the last resume check */
	uint32_t resume_check_done;     /* 144 == resumes once the last resume check finished */
	uint32_t meta_errors;           /* 148 version-table sum != total_writes, and similar */
	uint64_t hot_page_count;        /* 152 pages in the hot set */
	uint64_t passes_at_resume;      /* 160 passes when the last resume began */
	/* Layout 2 (a layout-1 file is one region, upgraded in place on resume). */
	uint32_t region_count;          /* 168 memory files */
	uint32_t device_loads;          /* 172 device states taken back on resume */
	uint64_t device_saves;          /* 176 device states saved; the memory goes with save number device_saves */
	uint64_t device_digest;         /* 184 digest of that save */
	uint32_t device_errors;         /* 192 resumes whose device state was lost, stale, another guest's or corrupt */
	uint32_t reserved;              /* 196 */
	uint64_t region_bytes[GUEST_MAX_REGIONS]; /* 200 size of each memory file */
};

#define GUEST_DEVICE_MAGIC "GWDEVST1"

/* The device state as it is saved to its file (little-endian, 48 bytes). */
struct guest_device {
	char magic[8];   /*  0 GUEST_DEVICE_MAGIC */
	uint64_t seed;   /*  8 the guest's seed: another guest's state is refused */
	uint64_t saves;  /* 16 this save's number (header device_saves once saved) */
	uint64_t writes; /* 24 total_writes at the save */
	uint64_t log;    /* 32 running digest of every write (page, version), kept nowhere else */
	uint64_t digest; /* 40 of the fields above */
};

#endif
