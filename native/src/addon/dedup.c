/*
 * The content-deduplication primitives: regionCopyPages (the destination side of a copy-ref
 * entry: pages copied between regions), regionApplyRefs (a whole pages frame with refs in one
 * call) and regionFingerprints (XXH3-128 of a range of pages).
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

enum { COPY_OK = 0, COPY_READ, COPY_WRITE, COPY_CHANGED, COPY_NOMEM };

/* A copy's scratch buffer, grown as needed and reused across the copies of one call. */
typedef struct {
  uint8_t *bytes;
  size_t pages;
} copy_buf_t;

/*
 * One page read from src page s for dst page d: false when its fingerprint differs from
 * expect (16 bytes, or NULL: not checked); else dst's tracked fingerprint of d becomes the
 * hash of the bytes (computed with need_hash) or src's tracked one, and it is to be written.
 */
static bool take_page(region_t *dst, uint64_t d, const region_t *src, uint64_t s, const uint8_t *page,
                      const uint8_t *expect, bool need_hash) {
  XXH128_canonical_t h;
  if (need_hash) page_hash(&h, page, dst->page_size);
  if (expect && memcmp(&h, expect, 16) != 0) return false;
  /* The hash of the bytes written, when computed, over src's fingerprint: they differ only
   * if src's file changed behind its tracking. */
  if (dst->track) dst->hashes[d] = need_hash ? h : src->hashes[s];
  return true;
}

/*
 * Copies pages [src_first, +count) of src to [dst_first, +count) of dst, with the result of
 * copying single pages in order, i = 0..count-1. Between ranges of one file that overlap,
 * that is not a memmove: with dst_first > src_first a later page reads what an earlier step
 * wrote (the pattern repeats). Chunks of at most |dst_first - src_first| pages keep that
 * exact: every page a chunk reads was written, if at all, by an earlier chunk, and a chunk's
 * source and destination pages are disjoint. With expect (16 bytes a page), a page whose
 * fingerprint differs is not written and its index (0..count-1) is appended to mismatches.
 * Ranges are checked by the caller and again here. COPY_OK, or what failed (*at: the offset).
 */
static int copy_pages(region_t *dst, uint64_t dst_first, region_t *src, uint64_t src_first, uint64_t count,
                      const uint8_t *expect, uint32_t *mismatches, uint32_t *mismatch_count, copy_buf_t *buf,
                      uint64_t *at) {
  const size_t ps = dst->page_size;
  const bool same_file = src == dst || (src->dev == dst->dev && src->ino == dst->ino);
  /* Another region of dst's file does not see dst's writes in its fingerprints. */
  const bool src_hashes = src->track && (src == dst || !same_file);
  const bool need_hash = expect || (dst->track && !src_hashes);
  size_t chunk = chunk_pages_of(ps);
  const uint64_t gap = dst_first > src_first ? dst_first - src_first : src_first - dst_first;
  if (same_file && gap > 0 && gap < count && gap < chunk) chunk = (size_t)gap;
  if (count < chunk) chunk = (size_t)count;
  /* Copy through a buffer when hashing (the page must not change between the hash and the
   * write) and whenever the file is the same, so pwrite never reads a mapping of the very
   * pages it writes. */
  const bool buffered = !src->addr || need_hash || same_file;
  if (buffered && buf->pages < chunk) {
    uint8_t *grown = realloc(buf->bytes, chunk * ps);
    if (!grown) return COPY_NOMEM;
    buf->bytes = grown;
    buf->pages = chunk;
  }
  for (uint64_t done = 0; done < count;) {
    const size_t n = count - done < chunk ? (size_t)(count - done) : chunk;
    const uint64_t s = src_first + done, d = dst_first + done;
    /* Checked again while applying, as in regionScatter: memory safety must not rest on
     * the validation before alone. */
    if (s + n > src->page_count || d + n > dst->page_count) return COPY_CHANGED;
    const uint8_t *bytes = src->addr ? src->addr + s * ps : NULL;
    if (buffered) {
      if (bytes) memcpy(buf->bytes, bytes, n * ps);
      else if (!pread_all(src->fd, buf->bytes, n * ps, s * ps)) {
        *at = s * ps;
        return COPY_READ;
      }
      bytes = buf->bytes;
    }
    /* Pages [from, k) are to be written: a mismatch ends a stretch. */
    size_t from = 0;
    for (size_t k = 0; k <= n; k++) {
      bool write_now = k == n;
      if (k < n && !take_page(dst, d + k, src, s + k, bytes + k * ps, expect ? expect + (done + k) * 16 : NULL, need_hash)) {
        mismatches[(*mismatch_count)++] = (uint32_t)(done + k);
        write_now = true;
      }
      if (!write_now) continue;
      if (k > from) {
        const uint64_t off = (d + from) * ps;
        if (!pwrite_all(dst->fd, bytes + from * ps, (k - from) * ps, off)) {
          *at = off;
          return COPY_WRITE;
        }
      }
      from = k + 1;
    }
    done += n;
  }
  return COPY_OK;
}

/* Throws for a copy_pages failure; NULL. */
static napi_value copy_failed(napi_env env, const char *fn, int rc, uint64_t at) {
  if (rc == COPY_READ) return copy_read_error(env, fn, at);
  if (rc == COPY_WRITE) return scatter_io_error(env, fn, at);
  if (rc == COPY_NOMEM) throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
  else throw_fmt(env, ERR_ERROR, NULL, "%s: the regions changed while being copied", fn);
  return NULL;
}

/* regionCopyPages(dst, dstFirst, src, srcFirst, count, expect, mismatches) -> mismatchCount (copy_pages) */
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
  copy_buf_t buf = {NULL, 0};
  uint32_t mismatch_count = 0;
  uint64_t at = 0;
  const int rc = copy_pages(dst, dst_first, src, src_first, count, with_expect ? expect : NULL, mismatches,
                            &mismatch_count, &buf, &at);
  free(buf.bytes);
  if (rc != COPY_OK) return copy_failed(env, fn, rc, at);
  napi_value result;
  NAPI_TRY(env, napi_create_uint32(env, mismatch_count, &result));
  return result;
}

/* At most this many sources in one regionApplyRefs call (the slots of a dedup group a frame refers to). */
#define APPLY_MAX_SOURCES 4096
/* Ref pages read and checked, for one pwrite: consecutive destination pages. */
#define STAGE_PAGES 256

typedef struct {
  uint8_t *bytes; /* cap pages (at most STAGE_PAGES) */
  size_t cap;
  uint64_t first; /* the destination page of bytes[0] */
  size_t count;
} stage_t;

static bool stage_flush(region_t *dst, stage_t *st, uint64_t *at) {
  if (st->count == 0) return true;
  const uint64_t off = st->first * dst->page_size;
  if (!pwrite_all(dst->fd, st->bytes, st->count * dst->page_size, off)) {
    *at = off;
    return false;
  }
  st->count = 0;
  return true;
}

/*
 * A ref from a region of another file, page by page into the stage: each page read once
 * (from src's mapping, or pread), checked against expect, fingerprinted into dst's tracked
 * fingerprints, and written with the pages around it in one pwrite. Another file's pages do
 * not change with dst's writes, so this equals copy_pages (which writes each stretch of a
 * ref at once); a gang's round 0 sends thousands of single-page refs, each a pwrite of its own
 * there. The stage is flushed before anything else writes dst.
 */
static int stage_ref(region_t *dst, uint64_t dst_first, region_t *src, uint64_t src_first, uint64_t count,
                     const uint8_t *expect, uint32_t *mismatches, uint32_t *mismatch_count, stage_t *st, uint64_t *at) {
  const size_t ps = dst->page_size;
  const bool need_hash = expect || (dst->track && !src->track);
  for (uint64_t k = 0; k < count; k++) {
    const uint64_t d = dst_first + k, s = src_first + k;
    if (s >= src->page_count || d >= dst->page_count) return COPY_CHANGED;
    if (st->count > 0 && (d != st->first + st->count || st->count == st->cap) && !stage_flush(dst, st, at)) return COPY_WRITE;
    if (st->cap == 0) return COPY_CHANGED; /* no room: the frame held no ref pages when checked */
    if (st->count == 0) st->first = d;
    uint8_t *slot = st->bytes + st->count * ps;
    if (src->addr) memcpy(slot, src->addr + s * ps, ps);
    else if (!pread_all(src->fd, slot, ps, s * ps)) {
      *at = s * ps;
      return COPY_READ;
    }
    if (!take_page(dst, d, src, s, slot, expect ? expect + k * 16 : NULL, need_hash)) {
      mismatches[(*mismatch_count)++] = (uint32_t)k;
      continue; /* not staged: the next page starts a stretch of its own */
    }
    st->count++;
  }
  return COPY_OK;
}

/*
 * regionApplyRefs(dst, entries, entryCount, payload, refs, sources, expects, mismatches) -> mismatchCount
 *
 * A pages frame with refs, in one call: the result is that of applying its entries in order,
 * runs of zero and data entries as regionScatter does (the payload holds the data pages in
 * entry order) and each ref entry (ENTRY_REF) as regionCopyPages does, with refs[2k] the
 * k-th ref entry's source (an index into sources and expects) and refs[2k + 1] the source's
 * first page. expects[i] (or null): the fingerprints sources[i]'s pages are expected to hold,
 * 16 bytes a page; a ref page whose source differs is not written, and mismatches gets
 * [dstPage, sourceIndex, sourcePage] for it (room for three words per ref page). The whole
 * frame is checked before anything is written. Returns the number of mismatched pages.
 */
napi_value RegionApplyRefs(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionApplyRefs";
  napi_value argv[8];
  region_t *dst;
  uint32_t *entries, *refs, *mismatches;
  uint8_t *payload;
  size_t entries_len, refs_len, payload_len, mismatches_len;
  uint64_t entry_count;
  if (!get_args(env, info, 8, argv)) return NULL;
  if (!arg_region_named(env, argv[0], fn, "dst", false, &dst) ||
      !arg_typed(env, argv[1], fn, "entries", napi_uint32_array, (void **)&entries, &entries_len))
    return NULL;
  if (!arg_integer(env, argv[2], fn, "entryCount", 0, (double)(entries_len / 3), &entry_count) ||
      !arg_typed(env, argv[3], fn, "payload", napi_uint8_array, (void **)&payload, &payload_len) ||
      !arg_typed(env, argv[4], fn, "refs", napi_uint32_array, (void **)&refs, &refs_len) ||
      !arg_typed(env, argv[7], fn, "mismatches", napi_uint32_array, (void **)&mismatches, &mismatches_len))
    return NULL;
  if (!dst->writable) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: dst is mapped read-only", fn);
    return NULL;
  }
  bool is_array;
  uint32_t source_count = 0, expect_count = 0;
  if (napi_is_array(env, argv[5], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[5], &source_count) != napi_ok ||
      napi_is_array(env, argv[6], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[6], &expect_count) != napi_ok ||
      source_count != expect_count || source_count > APPLY_MAX_SOURCES) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: sources and expects must be arrays of one length, at most %d", fn, APPLY_MAX_SOURCES);
    return NULL;
  }
  region_t **sources = calloc(source_count + 1, sizeof *sources);
  const uint8_t **expects = calloc(source_count + 1, sizeof *expects);
  size_t *expect_lens = calloc(source_count + 1, sizeof *expect_lens);
  copy_buf_t buf = {NULL, 0};
  uint32_t *scratch = NULL;
  stage_t stage = {NULL, 0, 0, 0};
  napi_value result = NULL;
  if (!sources || !expects || !expect_lens) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    goto done;
  }
  for (uint32_t i = 0; i < source_count; i++) {
    napi_value v;
    bool with_expect;
    if (napi_get_element(env, argv[5], i, &v) != napi_ok || !arg_region_named(env, v, fn, "sources[i]", false, &sources[i]) ||
        napi_get_element(env, argv[6], i, &v) != napi_ok ||
        !arg_typed_or_null(env, v, fn, "expects[i]", napi_uint8_array, (void **)&expects[i], &expect_lens[i], &with_expect))
      goto done;
    if (!with_expect) expects[i] = NULL;
    if (sources[i]->page_size != dst->page_size) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: dst has %zu-byte pages but sources[%u] has %zu-byte pages", fn, dst->page_size, i, sources[i]->page_size);
      goto done;
    }
  }
  /* Every entry, every ref and the payload's length, before anything is written. */
  const size_t ps = dst->page_size;
  uint64_t data_pages = 0, ref_pages = 0, ref_entries = 0, largest_ref = 0;
  for (uint64_t e = 0; e < entry_count; e++) {
    const uint32_t kind = entries[3 * e], first = entries[3 * e + 1], count = entries[3 * e + 2];
    if (kind != ENTRY_ZERO && kind != ENTRY_DATA && kind != ENTRY_REF) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: entry %llu has an unknown kind (%u)", fn, (unsigned long long)e, kind);
      goto done;
    }
    if (count == 0 || (uint64_t)first + count > dst->page_count) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: entry %llu (pages %u, +%u) is empty or outside dst's %u pages", fn, (unsigned long long)e, first, count, dst->page_count);
      goto done;
    }
    if (kind == ENTRY_DATA) data_pages += count;
    if (kind != ENTRY_REF) continue;
    if (refs_len < 2 * (ref_entries + 1)) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: refs has %zu words, ref entry %llu needs two more", fn, refs_len, (unsigned long long)ref_entries);
      goto done;
    }
    const uint32_t source = refs[2 * ref_entries], source_first = refs[2 * ref_entries + 1];
    if (source >= source_count || (uint64_t)source_first + count > sources[source]->page_count ||
        (expects[source] && expect_lens[source] / 16 < (uint64_t)source_first + count)) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: ref entry %llu (source %u, pages %u, +%u) is outside its source or its expected fingerprints", fn,
                (unsigned long long)ref_entries, source, source_first, count);
      goto done;
    }
    ref_entries++;
    ref_pages += count;
    if (count > largest_ref) largest_ref = count;
  }
  if (payload_len % ps != 0 || payload_len / ps != data_pages) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: payload is %zu bytes but the entries' %llu data pages need exactly %llu", fn, payload_len,
              (unsigned long long)data_pages, (unsigned long long)(data_pages * ps));
    goto done;
  }
  if (mismatches_len / 3 < ref_pages) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: mismatches has room for %zu pages, the refs hold %llu", fn, mismatches_len / 3, (unsigned long long)ref_pages);
    goto done;
  }
  scratch = malloc((largest_ref + 1) * sizeof *scratch);
  if (ref_pages > 0) {
    stage.cap = ref_pages < STAGE_PAGES ? (size_t)ref_pages : STAGE_PAGES;
    stage.bytes = malloc(stage.cap * ps);
  }
  if (!scratch || (ref_pages > 0 && !stage.bytes)) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    goto done;
  }
  uint32_t mismatch_count = 0;
  uint64_t segment = 0, offset = 0, segment_bytes = 0, at = 0, k = 0;
  for (uint64_t e = 0; e <= entry_count; e++) {
    const uint32_t kind = e < entry_count ? entries[3 * e] : ENTRY_REF;
    if (kind == ENTRY_DATA) segment_bytes += (uint64_t)entries[3 * e + 2] * ps;
    if (kind != ENTRY_REF) continue;
    /* The zero and data entries before this ref (after the refs staged before them), then the ref. */
    if (offset + segment_bytes > payload_len) {
      /* Checked above; again, as the arrays may be shared memory. */
      throw_fmt(env, ERR_ERROR, NULL, "%s: the entries changed while being applied", fn);
      goto done;
    }
    if (e > segment) {
      if (!stage_flush(dst, &stage, &at)) {
        scatter_io_error(env, fn, at);
        goto done;
      }
      const int rc = scatter_apply(dst, entries + 3 * segment, (size_t)(e - segment), payload + offset, (size_t)segment_bytes, &at);
      if (rc == SCATTER_IO) {
        scatter_io_error(env, fn, at);
        goto done;
      }
      if (rc != 0) {
        throw_fmt(env, ERR_ERROR, NULL, "%s: the entries changed while being applied", fn);
        goto done;
      }
      offset += segment_bytes;
    }
    segment = e + 1;
    segment_bytes = 0;
    if (e == entry_count) {
      if (!stage_flush(dst, &stage, &at)) {
        scatter_io_error(env, fn, at);
        goto done;
      }
      break;
    }
    if (2 * (k + 1) > refs_len) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: the refs changed while being applied", fn);
      goto done;
    }
    const uint32_t first = entries[3 * e + 1], count = entries[3 * e + 2];
    const uint32_t source = refs[2 * k], source_first = refs[2 * k + 1];
    k++;
    /* Checked above; again, as the arrays may be shared memory. */
    if (source >= source_count || count > largest_ref) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: the refs changed while being applied", fn);
      goto done;
    }
    const uint8_t *expect = expects[source] ? expects[source] + (size_t)source_first * 16 : NULL;
    if (expect && expect_lens[source] / 16 < (uint64_t)source_first + count) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: the refs changed while being applied", fn);
      goto done;
    }
    uint32_t missed = 0;
    region_t *src = sources[source];
    int rc;
    if (src == dst || (src->dev == dst->dev && src->ino == dst->ino)) {
      /* dst's own file: what the refs before wrote must be there to read. */
      rc = stage_flush(dst, &stage, &at) ? copy_pages(dst, first, src, source_first, count, expect, scratch, &missed, &buf, &at) : COPY_WRITE;
    } else {
      rc = stage_ref(dst, first, src, source_first, count, expect, scratch, &missed, &stage, &at);
    }
    if (rc != COPY_OK) {
      copy_failed(env, fn, rc, at);
      goto done;
    }
    for (uint32_t i = 0; i < missed && mismatch_count < mismatches_len / 3; i++, mismatch_count++) {
      mismatches[3 * mismatch_count] = first + scratch[i];
      mismatches[3 * mismatch_count + 1] = source;
      mismatches[3 * mismatch_count + 2] = source_first + scratch[i];
    }
  }
  if (napi_create_uint32(env, mismatch_count, &result) != napi_ok) throw_napi(env, "napi_create_uint32");
done:
  free(sources);
  free(expects);
  free(expect_lens);
  free(buf.bytes);
  free(scratch);
  free(stage.bytes);
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
