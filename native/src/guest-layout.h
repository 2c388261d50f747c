/*
 * Memory layout of the synthetic guest (gangway-guest).
 *
 * The guest's whole state lives in its memory file, so that a copy of the file is a
 * copy of the guest. Page 0 is the header below; pages 1..versionPages hold the version
 * table (one little-endian u32 per page of the file, metadata pages included, their
 * entries unused); every page from firstDataPage on is a data page whose content is a
 * pure function of (profile, seed, imageSeed, sharedPermille, page, version[page]).
 *
 * The agent reads the header (agent/guest/guest-header.ts mirrors these offsets), so
 * every field has a fixed offset and is little-endian. Do not reorder; append and bump
 * GUEST_LAYOUT_VERSION instead.
 */
#ifndef GANGWAY_GUEST_LAYOUT_H
#define GANGWAY_GUEST_LAYOUT_H

#include <stdint.h>

#define GUEST_MAGIC "GWGUEST1"
#define GUEST_LAYOUT_VERSION 1u
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
};

#endif
