/*
 * The guest's memory (guest-memory.h): opening its files, checking a resumed guest's header
 * against them, mapping them, writing a new guest, and reading and writing pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gangway-abi.h"
#include "guest.h"
#include "guest-content.h"
#include "guest-layout.h"
#include "guest-memory.h"
#include "guest-options.h"

/* The agent reads these offsets from the file; they must never move. */
_Static_assert(offsetof(struct guest_header, magic) == 0, "magic");
_Static_assert(offsetof(struct guest_header, layout_version) == 8, "layout_version");
_Static_assert(offsetof(struct guest_header, page_size) == 12, "page_size");
_Static_assert(offsetof(struct guest_header, memory_bytes) == 16, "memory_bytes");
_Static_assert(offsetof(struct guest_header, page_count) == 24, "page_count");
_Static_assert(offsetof(struct guest_header, seed) == 32, "seed");
_Static_assert(offsetof(struct guest_header, image_seed) == 40, "image_seed");
_Static_assert(offsetof(struct guest_header, shared_permille) == 48, "shared_permille");
_Static_assert(offsetof(struct guest_header, hot_permille) == 52, "hot_permille");
_Static_assert(offsetof(struct guest_header, profile) == 56, "profile");
_Static_assert(offsetof(struct guest_header, first_data_page) == 60, "first_data_page");
_Static_assert(offsetof(struct guest_header, dirty_rate_bytes_per_sec) == 64, "dirty_rate_bytes_per_sec");
_Static_assert(offsetof(struct guest_header, total_writes) == 72, "total_writes");
_Static_assert(offsetof(struct guest_header, passes) == 80, "passes");
_Static_assert(offsetof(struct guest_header, pass_cursor) == 88, "pass_cursor");
_Static_assert(offsetof(struct guest_header, stale_pages) == 96, "stale_pages");
_Static_assert(offsetof(struct guest_header, checked_pages) == 104, "checked_pages");
_Static_assert(offsetof(struct guest_header, inflight_page) == 112, "inflight_page");
_Static_assert(offsetof(struct guest_header, inflight_version) == 120, "inflight_version");
_Static_assert(offsetof(struct guest_header, resumes) == 124, "resumes");
_Static_assert(offsetof(struct guest_header, resume_stale_pages) == 128, "resume_stale_pages");
_Static_assert(offsetof(struct guest_header, resume_checked_pages) == 136, "resume_checked_pages");
_Static_assert(offsetof(struct guest_header, resume_check_done) == 144, "resume_check_done");
_Static_assert(offsetof(struct guest_header, meta_errors) == 148, "meta_errors");
_Static_assert(offsetof(struct guest_header, hot_page_count) == 152, "hot_page_count");
_Static_assert(offsetof(struct guest_header, passes_at_resume) == 160, "passes_at_resume");
_Static_assert(offsetof(struct guest_header, region_count) == 168, "region_count");
_Static_assert(offsetof(struct guest_header, device_loads) == 172, "device_loads");
_Static_assert(offsetof(struct guest_header, device_saves) == 176, "device_saves");
_Static_assert(offsetof(struct guest_header, device_digest) == 184, "device_digest");
_Static_assert(offsetof(struct guest_header, device_errors) == 192, "device_errors");
_Static_assert(offsetof(struct guest_header, region_bytes) == 200, "region_bytes");
_Static_assert(sizeof(struct guest_header) == 328, "guest_header size");
_Static_assert(sizeof(struct guest_device) == 48, "guest_device size");
_Static_assert(GUEST_MAX_REGIONS == GW_MAX_REGIONS, "the shim tracks as many regions as a guest has");
_Static_assert(sizeof(gw_token_seed) / sizeof(gw_token_seed[0]) <= 256, "token table overflow");

/* The one token table of the program (guest-content.h says why it is not static). */
struct gw_token_table gw_tokens;

static uint64_t first_data_page_for(uint64_t page_count)
{
	uint64_t per_page = GUEST_PAGE_SIZE / sizeof(uint32_t);
	return 1 + (page_count + per_page - 1) / per_page;
}

static unsigned region_of(const struct guest *g, uint64_t page)
{
	unsigned r = 0;
	while (r + 1 < g->region_count && page >= g->region[r + 1].first_page)
		r++;
	return r;
}

static uint8_t *page_ptr(struct guest *g, uint64_t page)
{
	const struct region *r = &g->region[region_of(g, page)];
	return r->base + (page - r->first_page) * GUEST_PAGE_SIZE;
}

static void *xmalloc(size_t n, const char *what)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		die(EXIT_SYSTEM, "malloc(%zu) for %s: %s", n, what, strerror(errno));
	return p;
}

void setup_model(struct guest *g)
{
	struct guest_header *h = g->h;
	struct gw_model *m = &g->model;
	m->profile = h->profile;
	m->seed = h->seed;
	m->image_seed = h->image_seed;
	m->shared_permille = h->shared_permille;
	m->first_data_page = g->first_data_page;
	m->data_pages = g->page_count - g->first_data_page;
	m->perm_a = gw_coprime(m->data_pages, gw_hash3(h->seed, GW_TAG_PERM, 1));
	m->perm_b = gw_hash3(h->seed, GW_TAG_PERM, 2) % m->data_pages;
	m->common = NULL;
	if (m->profile == GUEST_PROFILE_OS_IMAGE) {
		m->common = xmalloc(16 * GUEST_PAGE_SIZE, "common pages");
		for (uint64_t k = 0; k < 16; k++)
			gw_fill_text(m->common[k], gw_hash3(h->seed, GW_TAG_COMMON, k));
	}
	g->scratch = xmalloc(GUEST_PAGE_SIZE, "scratch page");
	g->pass_of_ab = UINT64_MAX;
}

/*
 * The hot set (the pages this guest rewrites), derived from the seed in one pass. A resumed
 * guest computes it after it announces that it runs: it is the program's own cache, work a
 * resumed VM would do on its own CPU, not part of bringing the guest back.
 */
void setup_hot_list(struct guest *g)
{
	struct guest_header *h = g->h;
	g->hot = xmalloc((g->page_count - g->first_data_page + 1) * sizeof(uint32_t), "hot page list");
	uint64_t n = 0;
	for (uint64_t p = g->first_data_page; p < g->page_count; p++)
		if (gw_hash3(h->seed, GW_TAG_HOT, p) % 1000 < h->hot_permille)
			g->hot[n++] = (uint32_t)p;
	g->hot_count = n;
}

static const uint8_t zero_page[GUEST_PAGE_SIZE];

bool page_is_current(struct guest *g, uint64_t page, uint32_t version)
{
	const uint8_t *want = gw_content(&g->model, page, version, g->scratch);
	return memcmp(page_ptr(g, page), want ? want : zero_page, GUEST_PAGE_SIZE) == 0;
}

void write_page_content(struct guest *g, uint64_t page, uint32_t version)
{
	const uint8_t *want = gw_content(&g->model, page, version, g->scratch);
	memcpy(page_ptr(g, page), want ? want : zero_page, GUEST_PAGE_SIZE);
}

static int open_region_file(const char *path, bool create)
{
	if (create) {
		/* The file is the guest's memory: 0600. O_EXCL|O_NOFOLLOW: never take over, truncate or
		 * write through a file or symlink that someone else put at the path. */
		int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (fd < 0)
			die(EXIT_SYSTEM, "--memory-file %s: open (create): %s%s", path, strerror(errno),
			    errno == EEXIST ? " (--create makes a new file: remove the path, or resume without --create)"
					    : "");
		return fd;
	}
	int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		die(EXIT_SYSTEM, "--memory-file %s: open: %s%s", path, strerror(errno),
		    errno == ENOENT ? " (use --create to make a new guest)"
		    : errno == ELOOP ? " (a symlink: give the memory file's own path)"
				     : "");
	return fd;
}

/* Checks a resumed guest's header (read with pread, before anything is mapped) against its files. */
static void check_header(const struct options *o, const struct guest_header *h, const int *fds, uint64_t *region_bytes)
{
	const char *path = o->memory_file;
	if (memcmp(h->magic, GUEST_MAGIC, 8) != 0)
		die(EXIT_SYSTEM, "--memory-file %s: not a gangway guest memory file (bad magic)", path);
	if (h->layout_version != GUEST_LAYOUT_VERSION && h->layout_version != 1)
		die(EXIT_SYSTEM, "--memory-file %s: layout version %u, this program handles 1 and %u", path,
		    h->layout_version, GUEST_LAYOUT_VERSION);
	if (h->page_size != GUEST_PAGE_SIZE)
		die(EXIT_SYSTEM, "--memory-file %s: page size %u, expected %u", path, h->page_size, GUEST_PAGE_SIZE);
	/* Layout 1 had one region, and zeros where layout 2 keeps the regions. */
	unsigned count = h->layout_version == 1 ? 1 : h->region_count;
	if (count != o->file_count)
		die(EXIT_SYSTEM, "--memory-file %s: the guest has %u memory regions, %u --memory-file given", path, count,
		    o->file_count);
	uint64_t total = 0;
	for (unsigned r = 0; r < count; r++) {
		region_bytes[r] = h->layout_version == 1 ? h->memory_bytes : h->region_bytes[r];
		struct stat st;
		if (fstat(fds[r], &st) < 0)
			die(EXIT_SYSTEM, "--memory-file %s: fstat: %s", o->memory_files[r], strerror(errno));
		if (region_bytes[r] != (uint64_t)st.st_size || region_bytes[r] == 0 || region_bytes[r] % GUEST_PAGE_SIZE)
			die(EXIT_SYSTEM, "--memory-file %s: the header says region %u has %" PRIu64 " bytes, the file has %lld bytes",
			    o->memory_files[r], r, region_bytes[r], (long long)st.st_size);
		total += region_bytes[r];
	}
	if (h->memory_bytes != total || h->page_count * GUEST_PAGE_SIZE != h->memory_bytes)
		die(EXIT_SYSTEM, "--memory-file %s: header says %" PRIu64 " bytes / %" PRIu64 " pages, the files have %" PRIu64,
		    path, h->memory_bytes, h->page_count, total);
	if (h->memory_bytes < MIN_MEMORY_BYTES || h->memory_bytes > MAX_MEMORY_BYTES)
		die(EXIT_SYSTEM, "--memory-file %s: memory_bytes %" PRIu64 " out of range", path, h->memory_bytes);
	if (h->first_data_page != first_data_page_for(h->page_count) || region_bytes[0] / GUEST_PAGE_SIZE <= h->first_data_page)
		die(EXIT_SYSTEM, "--memory-file %s: first_data_page %u, expected %" PRIu64 " within the first region", path,
		    h->first_data_page, first_data_page_for(h->page_count));
	if (h->profile < GUEST_PROFILE_ZERO || h->profile > GUEST_PROFILE_RANDOM)
		die(EXIT_SYSTEM, "--memory-file %s: unknown profile %u", path, h->profile);
	if (h->shared_permille > 1000 || h->hot_permille > 1000)
		die(EXIT_SYSTEM, "--memory-file %s: shared/hot permille %u/%u out of range", path, h->shared_permille,
		    h->hot_permille);
}

void open_and_map(struct guest *g, const struct options *o)
{
	g->path = o->memory_file;
	g->region_count = o->file_count;
	int fds[GUEST_MAX_REGIONS];
	uint64_t region_bytes[GUEST_MAX_REGIONS];
	for (unsigned r = 0; r < o->file_count; r++)
		fds[r] = open_region_file(o->memory_files[r], o->create);
	if (o->create) {
		for (unsigned r = 0; r < o->file_count; r++) {
			/* New, so empty: after ftruncate every page is a hole, and zero pages cost nothing. */
			if (ftruncate(fds[r], (off_t)o->region_bytes[r]) < 0)
				die(EXIT_SYSTEM, "--memory-file %s: ftruncate to %" PRIu64 " bytes: %s", o->memory_files[r],
				    o->region_bytes[r], strerror(errno));
			region_bytes[r] = o->region_bytes[r];
		}
	} else {
		/* Validate with pread before mapping: the tracking shim registers the first shared
		 * mapping of each file, so that one must be the whole file. */
		struct guest_header h;
		ssize_t n = pread(fds[0], &h, sizeof(h), 0);
		if (n < 0)
			die(EXIT_SYSTEM, "--memory-file %s: read header: %s", g->path, strerror(errno));
		if ((size_t)n < sizeof(h))
			die(EXIT_SYSTEM, "--memory-file %s: not a gangway guest memory file (too short)", g->path);
		check_header(o, &h, fds, region_bytes);
	}
	uint64_t first_page = 0;
	for (unsigned r = 0; r < g->region_count; r++) {
		void *base = mmap(NULL, region_bytes[r], PROT_READ | PROT_WRITE, MAP_SHARED, fds[r], 0);
		if (base == MAP_FAILED)
			die(EXIT_SYSTEM, "--memory-file %s: mmap %" PRIu64 " bytes MAP_SHARED: %s", o->memory_files[r],
			    region_bytes[r], strerror(errno));
		g->region[r] = (struct region){.path = o->memory_files[r], .fd = fds[r], .base = base,
					       .first_page = first_page, .pages = region_bytes[r] / GUEST_PAGE_SIZE};
		first_page += g->region[r].pages;
	}
	g->h = (struct guest_header *)g->region[0].base;
	g->version = (uint32_t *)(g->region[0].base + GUEST_PAGE_SIZE);
	g->page_count = first_page;
	g->first_data_page = first_data_page_for(g->page_count);
	if (!o->create && g->h->layout_version == 1) {
		/* Upgraded in place: the fields layout 2 added were zeros. */
		g->h->region_count = 1;
		g->h->region_bytes[0] = g->h->memory_bytes;
		BARRIER();
		g->h->layout_version = GUEST_LAYOUT_VERSION;
	}
}

static void write_all(struct region *r, const uint8_t *buf, uint64_t len, uint64_t offset)
{
	while (len > 0) {
		ssize_t n = pwrite(r->fd, buf, len, (off_t)offset);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die(EXIT_SYSTEM, "--memory-file %s: pwrite %" PRIu64 " bytes at %" PRIu64 ": %s", r->path, len,
			    offset, n < 0 ? strerror(errno) : "no progress");
		buf += n;
		len -= (uint64_t)n;
		offset += (uint64_t)n;
	}
}

void create_guest(struct guest *g, const struct options *o)
{
	struct guest_header *h = g->h;
	/* The file was just created, so header and version table are already zero. */
	h->layout_version = GUEST_LAYOUT_VERSION;
	h->page_size = GUEST_PAGE_SIZE;
	h->memory_bytes = o->memory_bytes;
	h->page_count = g->page_count;
	h->seed = o->seed;
	h->image_seed = o->image_seed;
	h->shared_permille = o->shared_permille;
	h->hot_permille = o->hot_permille;
	h->profile = o->profile;
	h->first_data_page = (uint32_t)g->first_data_page;
	h->dirty_rate_bytes_per_sec = o->dirty_rate;
	h->inflight_page = GUEST_NO_INFLIGHT;
	h->region_count = g->region_count;
	for (unsigned r = 0; r < g->region_count; r++)
		h->region_bytes[r] = g->region[r].pages * GUEST_PAGE_SIZE;
	setup_model(g);
	setup_hot_list(g);
	h->hot_page_count = g->hot_count;
	/* Data pages go in with pwrite, in runs of non-zero pages within a region: on tmpfs that
	 * costs a fraction of faulting every page of the mapping, and zero pages stay holes. */
	const uint64_t batch_pages = 256;
	uint8_t *batch = xmalloc(batch_pages * GUEST_PAGE_SIZE, "creation buffer");
	for (unsigned r = 0; r < g->region_count; r++) {
		struct region *region = &g->region[r];
		uint64_t end = region->first_page + region->pages;
		uint64_t first = region->first_page > g->first_data_page ? region->first_page : g->first_data_page;
		uint64_t run_start = first, run_len = 0;
		for (uint64_t p = first; p <= end; p++) {
			const uint8_t *want = NULL;
			if (p < end) {
				uint8_t *slot = batch + run_len * GUEST_PAGE_SIZE;
				want = gw_content(&g->model, p, 0, slot);
				if (want && want != slot)
					memcpy(slot, want, GUEST_PAGE_SIZE);
			}
			if (want)
				run_len++;
			if (run_len > 0 && (!want || run_len == batch_pages)) {
				write_all(region, batch, run_len * GUEST_PAGE_SIZE, (run_start - region->first_page) * GUEST_PAGE_SIZE);
				run_start += run_len;
				run_len = 0;
			}
			if (!want)
				run_start = p + 1;
		}
	}
	free(batch);
	/* Magic last: a file whose creation was interrupted is never taken for a guest. */
	BARRIER();
	memcpy(h->magic, GUEST_MAGIC, 8);
}

/*
 * Whether page p lies in a hole of the file, walking extents with SEEK_DATA/SEEK_HOLE in
 * increasing page order. Reading a tmpfs hole through a shared mapping would allocate a
 * page for it, which makes checking a mostly-zero guest slow and bloats it.
 */
bool page_in_hole(struct guest *g, struct extent_walk *w, uint64_t page)
{
	unsigned r = region_of(g, page);
	const struct region *region = &g->region[r];
	uint64_t p = page - region->first_page;
	if (r != w->region) {
		*w = (struct extent_walk){.region = r};
	}
	if (p >= w->data_end) {
		off_t d = lseek(region->fd, (off_t)(p * GUEST_PAGE_SIZE), SEEK_DATA);
		if (d < 0) {
			/* ENXIO: only holes from here on; anything else: assume all data. */
			w->data_start = errno == ENXIO ? region->pages : p;
			w->data_end = region->pages;
		} else {
			off_t e = lseek(region->fd, d, SEEK_HOLE);
			w->data_start = (uint64_t)d / GUEST_PAGE_SIZE;
			w->data_end = e < 0 ? region->pages : ((uint64_t)e + GUEST_PAGE_SIZE - 1) / GUEST_PAGE_SIZE;
			if (w->data_end <= p)
				w->data_end = p + 1;
		}
	}
	return p < w->data_start;
}
