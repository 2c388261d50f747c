/*
 * The content-deduplication primitives: regionCopyPages (the destination side of a copy-ref
 * entry: pages copied between regions) and regionFingerprints (XXH3-128 of a range of pages).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "napi-util.h"
#include "region.h"
#include "exports.h"

static napi_value copy_read_error(napi_env env, const char *fn, uint64_t at) {
  char prefix[96];
  snprintf(prefix, sizeof prefix, "%s: read of src at offset %llu failed", fn, (unsigned long long)at);
  throw_errno(env, errno, prefix, NULL);
  return NULL;
}

/* The pages [first, first + count) lie inside a region of page_count pages. */
static bool arg_page_range(napi_env env, const char *fn, const char *what, uint64_t first,
                           uint64_t count, uint32_t page_count) {
  if (first + count > page_count) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: %s [%llu, %llu) are outside the region of %u pages", fn, what,
              (unsigned long long)first, (unsigned long long)(first + count), page_count);
    return false;
  }
  return true;
}

/*
 * regionCopyPages(dst, dstFirst, src, srcFirst, count, expect, mismatches) -> mismatchCount
 *
 * The result is that of copying single pages in order, i = 0..count-1. Between ranges of
 * one file that overlap, that is not a memmove: with dstFirst > srcFirst a later page
 * reads what an earlier step wrote (the pattern repeats). Chunks of at most |dstFirst -
 * srcFirst| pages keep that exact: every page a chunk reads was written, if at all, by an
 * earlier chunk, and a chunk's source and destination pages are disjoint.
 */
napi_value RegionCopyPages(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionCopyPages";
  napi_value argv[7];
  region_t *dst, *src;
  uint64_t dst_first, src_first, count;
  uint8_t *expect = NULL;
  uint32_t *mismatches = NULL;
  size_t expect_len = 0, mismatches_len = 0;
  if (!get_args(env, info, 7, argv)) return NULL;
  if (!arg_region_named(env, argv[0], fn, "dst", false, &dst) ||
      !arg_integer(env, argv[1], fn, "dstFirst", 0, (double)UINT32_MAX, &dst_first) ||
      !arg_region_named(env, argv[2], fn, "src", false, &src) ||
      !arg_integer(env, argv[3], fn, "srcFirst", 0, (double)UINT32_MAX, &src_first) ||
      !arg_integer(env, argv[4], fn, "count", 1, (double)UINT32_MAX, &count))
    return NULL;
  bool with_expect, with_mismatches;
  if (!arg_typed_or_null(env, argv[5], fn, "expect", napi_uint8_array, (void **)&expect,
                         &expect_len, &with_expect) ||
      !arg_typed_or_null(env, argv[6], fn, "mismatches", napi_uint32_array,
                         (void **)&mismatches, &mismatches_len, &with_mismatches))
    return NULL;
  if (!dst->writable) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: dst is mapped read-only", fn);
    return NULL;
  }
  if (dst->page_size != src->page_size) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: dst has %zu-byte pages but src has %zu-byte pages", fn,
              dst->page_size, src->page_size);
    return NULL;
  }
  if (!arg_page_range(env, fn, "dst pages", dst_first, count, dst->page_count) ||
      !arg_page_range(env, fn, "src pages", src_first, count, src->page_count))
    return NULL;
  if (with_expect && expect_len / 16 < count) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: expect is %zu bytes but %llu pages need %llu (16 bytes each)", fn, expect_len,
              (unsigned long long)count, (unsigned long long)count * 16);
    return NULL;
  }
  if (with_expect && mismatches_len < count) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: with expect, mismatches must have room for all %llu pages (it %s)", fn,
              (unsigned long long)count, with_mismatches ? "is shorter" : "is null");
    return NULL;
  }

  const size_t ps = dst->page_size;
  const bool same_file = src == dst || (src->dev == dst->dev && src->ino == dst->ino);
  /* Another region of dst's file does not see dst's writes in its fingerprints. */
  const bool src_hashes = src->track && (src == dst || !same_file);
  const bool need_hash = with_expect || (dst->track && !src_hashes);
  size_t chunk = chunk_pages_of(ps);
  const uint64_t gap = dst_first > src_first ? dst_first - src_first : src_first - dst_first;
  if (same_file && gap > 0 && gap < count && gap < chunk) chunk = (size_t)gap;
  /* Copy through a buffer when hashing (the page must not change between the hash and the
   * write) and whenever the file is the same, so pwrite never reads a mapping of the very
   * pages it writes. */
  uint8_t *buf = NULL;
  if (!src->addr || need_hash || same_file) {
    buf = malloc(chunk * ps);
    if (!buf) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
      return NULL;
    }
  }

  uint32_t mismatch_count = 0;
  for (uint64_t done = 0; done < count;) {
    const size_t n = count - done < chunk ? (size_t)(count - done) : chunk;
    const uint64_t s = src_first + done, d = dst_first + done;
    /* Checked again while applying, as in regionScatter: memory safety must not rest on
     * the validation above alone. */
    if (s + n > src->page_count || d + n > dst->page_count) {
      free(buf);
      throw_fmt(env, ERR_ERROR, NULL, "%s: the regions changed while being copied", fn);
      return NULL;
    }
    const uint8_t *bytes = src->addr ? src->addr + s * ps : NULL;
    if (buf) {
      if (bytes) memcpy(buf, bytes, n * ps);
      else if (!pread_all(src->fd, buf, n * ps, s * ps)) {
        free(buf);
        return copy_read_error(env, fn, s * ps);
      }
      bytes = buf;
    }
    /* Pages [from, k) are to be written: a mismatch ends a stretch. */
    size_t from = 0;
    for (size_t k = 0; k <= n; k++) {
      bool write_now = k == n;
      if (k < n) {
        XXH128_canonical_t h;
        if (need_hash) page_hash(&h, bytes + k * ps, ps);
        if (with_expect && memcmp(&h, expect + (done + k) * 16, 16) != 0) {
          mismatches[mismatch_count++] = (uint32_t)(done + k);
          write_now = true;
        } else if (dst->track) {
          /* The hash of the bytes written, when computed, over src's fingerprint: they
           * differ only if src's file changed behind its tracking. */
          dst->hashes[d + k] = need_hash ? h : src->hashes[s + k];
        }
      }
      if (!write_now) continue;
      if (k > from) {
        const uint64_t at = (d + from) * ps;
        if (!pwrite_all(dst->fd, bytes + from * ps, (k - from) * ps, at)) {
          free(buf);
          return scatter_io_error(env, fn, at);
        }
      }
      from = k + 1;
    }
    done += n;
  }
  free(buf);
  napi_value result;
  NAPI_TRY(env, napi_create_uint32(env, mismatch_count, &result));
  return result;
}

typedef struct {
  size_t page_size;
  uint32_t first;
  uint8_t *out;
} fingerprint_ctx_t;

static void emit_fingerprint(void *ctx, uint32_t page, const uint8_t *bytes) {
  const fingerprint_ctx_t *fc = ctx;
  page_hash((XXH128_canonical_t *)(void *)(fc->out + (size_t)(page - fc->first) * 16), bytes,
            fc->page_size);
}

/* regionFingerprints(region, firstPage, count, out) */
napi_value RegionFingerprints(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionFingerprints";
  napi_value argv[4];
  region_t *r;
  uint64_t first, count;
  uint8_t *out;
  size_t out_len;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!arg_region(env, argv[0], fn, false, &r) ||
      !arg_integer(env, argv[1], fn, "firstPage", 0, (double)UINT32_MAX, &first) ||
      !arg_integer(env, argv[2], fn, "count", 0, (double)UINT32_MAX, &count) ||
      !arg_typed(env, argv[3], fn, "out", napi_uint8_array, (void **)&out, &out_len))
    return NULL;
  if (!arg_page_range(env, fn, "pages", first, count, r->page_count)) return NULL;
  if (out_len / 16 < count) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: out is %zu bytes but %llu pages need %llu (16 bytes each)",
              fn, out_len, (unsigned long long)count, (unsigned long long)count * 16);
    return NULL;
  }
  fingerprint_ctx_t ctx = {.page_size = r->page_size, .first = (uint32_t)first, .out = out};
  if (!region_each_page_in(r, (uint32_t)first, (uint32_t)count, emit_fingerprint, &ctx)) {
    char prefix[96];
    snprintf(prefix, sizeof prefix, "%s: reading the region failed", fn);
    throw_errno(env, errno, prefix, NULL);
  }
  return NULL;
}

/* regionTrackedFingerprints(region, out): the tracked fingerprints as they are, every page. */
napi_value RegionTrackedFingerprints(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionTrackedFingerprints";
  napi_value argv[2];
  region_t *r;
  uint8_t *out;
  size_t out_len;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!arg_region(env, argv[0], fn, false, &r) ||
      !arg_typed(env, argv[1], fn, "out", napi_uint8_array, (void **)&out, &out_len))
    return NULL;
  if (!r->track) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: the region does not track fingerprints", fn);
    return NULL;
  }
  if (out_len / 16 < r->page_count) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: out is %zu bytes but the region's %llu pages need %llu", fn, out_len,
              (unsigned long long)r->page_count, (unsigned long long)r->page_count * 16);
    return NULL;
  }
  memcpy(out, r->hashes, (size_t)r->page_count * 16);
  return NULL;
}
