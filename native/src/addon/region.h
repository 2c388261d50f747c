/*
 * A region: a file of the guest's memory as the addon sees it (regionMap), shared by the
 * files that read and write regions (region.c, batch.c, dedup.c, digest.c, uffd.c).
 *
 * Threading: everything touching a region runs on the JS thread except the body of
 * regionDigest, which only reads the mapping (and the fingerprint array). A region keeps a
 * count of digests in flight; regionClose during a digest marks the handle closed at once
 * but defers the munmap until the last digest completes.
 */
#ifndef GANGWAY_ADDON_REGION_H
#define GANGWAY_ADDON_REGION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "napi-util.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

/* Must match EntryKind in protocol/codes.ts (agent/native.ts re-exports it as ENTRY_*).
 * ENTRY_REF (3) is applied with regionCopyPages, so regionScatter and uffdInstall reject
 * it like any unknown kind. */
#define ENTRY_ZERO 1u
#define ENTRY_DATA 2u
#define ENTRY_REF 3u

/*
 * A region is read through a MAP_SHARED mapping (the source gathers from the guest's live
 * memory) or written with pwrite on its own fd (the destination): writing through a mapping
 * would cost a page-table fault per page, on top of the page allocation, while pwrite puts
 * the bytes straight into the page cache.
 */
typedef struct region {
  uint8_t *addr; /* read-only regions */
  int fd;        /* writable regions: a duplicate of the caller's fd, -1 otherwise */
  size_t length;
  size_t page_size;
  uint32_t page_count;
  bool writable;
  bool track;
  bool zero_holes; /* writable: a sparse disk: zero pages are punched as holes, data is written back at once */
  dev_t dev; /* the file's identity: regionCopyPages must see two regions of one file as */
  ino_t ino; /* one, or an overlapping copy between them would read what it just wrote */
  bool closed;    /* regionClose was called: every later call throws */
  bool unmapped;  /* munmap done, hashes freed */
  bool finalized; /* the JS handle was garbage-collected */
  uint32_t busy;  /* digests in flight on the thread pool (touched on the JS thread only) */
  XXH128_canonical_t *hashes; /* page_count fingerprints, with track */
  bool hashes_mapped; /* hashes is a MAP_SHARED mapping of a file (options.fingerprintsFd), not malloc'd */
  XXH128_canonical_t zero_hash; /* XXH3-128 of page_size zero bytes */
} region_t;

extern const uint8_t ZERO_CHUNK[64 * 1024];

static inline void page_hash(XXH128_canonical_t *dst, const uint8_t *page, size_t page_size) {
  XXH128_canonicalFromHash(dst, XXH3_128bits(page, page_size));
}

/* True when the page (page_size >= 512, 8-byte aligned) is all zero bytes. */
static inline bool page_is_zero(const uint8_t *page, size_t page_size) {
  const uint64_t *w = (const uint64_t *)(const void *)page;
  const size_t words = page_size / sizeof(uint64_t);
  for (size_t i = 0; i < words; i += 32) { /* 256-byte blocks; page_size is a multiple */
    uint64_t acc = 0;
    for (size_t j = 0; j < 32; j++) acc |= w[i + j];
    if (acc) return false;
  }
  return true;
}

/* Pages per 1 MiB of I/O (at least one). */
static inline size_t chunk_pages_of(size_t page_size) {
  return page_size >= (1u << 20) ? 1 : (1u << 20) / page_size;
}

void region_release(region_t *r);
bool arg_region_named(napi_env env, napi_value v, const char *fn, const char *name,
                      bool allow_closed, region_t **out);
bool arg_region(napi_env env, napi_value v, const char *fn, bool allow_closed, region_t **out);

bool pwrite_all(int fd, const uint8_t *buf, size_t len, uint64_t off);
bool pread_all(int fd, uint8_t *buf, size_t len, uint64_t off);
napi_value scatter_io_error(napi_env env, const char *fn, uint64_t at);

/* batch.c: a batch's two sides, shared by regionGather / regionScatter and channel.c. */
typedef struct {
  size_t entries; /* entries written */
  size_t payload; /* payload bytes written (or pointed at, with iov) */
  size_t iovs;    /* with iov: the iovecs written, one per data entry */
  bool bad;       /* run bad_run is outside the region */
  size_t bad_run;
} gather_result;
bool gather_batch(const region_t *r, const uint32_t *runs, size_t run_count, uint32_t *cursor,
                  uint8_t *payload, size_t payload_cap, uint32_t *entries, size_t entry_cap,
                  uint8_t *fps, struct iovec *iov, gather_result *res);
#define SCATTER_CHANGED 1
#define SCATTER_IO 2
bool scatter_check(const region_t *r, const uint32_t *entries, size_t entry_count,
                   size_t payload_len, char *msg, size_t msg_len);
int scatter_apply(region_t *r, const uint32_t *entries, size_t entry_count, const uint8_t *payload,
                  size_t payload_len, uint64_t *at_out);

/* A region in use outside the JS call that found it (a digest, a channel): busy until
 * region_unbusy, which releases what regionClose or the finalizer left to it. Both on the
 * JS thread. */
static inline void region_busy(region_t *r) { r->busy++; }
void region_unbusy(region_t *r);

bool region_each_page_in(const region_t *r, uint32_t first, uint32_t count,
                         void (*emit)(void *, uint32_t, const uint8_t *), void *ctx);
bool region_each_page(const region_t *r, void (*emit)(void *, uint32_t, const uint8_t *),
                      void *ctx);

#endif
