/* pagemapScan: PAGEMAP_SCAN, the dirty tracking of userfaultfd WP_ASYNC. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "napi-util.h"
#include "uapi-compat.h"
#include "exports.h"

#define SCAN_VEC_LEN 1024

/*
 * The written runs, as (first page, page count) pairs. One ioctl returns its runs in
 * address order, but the loop below can get a run that lies before runs it already has:
 * when a walk fills the kernel's bounce buffer (one PMD's worth of entries, 512) but not
 * our vector, Linux 6.18's do_pagemap_scan walks on to the end and returns every run, yet
 * hands back the walk_end of its first, stopped walk. We then scan from there again, and a
 * page written since the first ioctl passed it comes back below the last run we hold. The
 * second ioctl has write-protected it, so dropping that run loses the write for good
 * (native/repro/README.md, scan-split.c): runs out of order are kept, and sorted and merged
 * at the end.
 */
typedef struct {
  uint32_t *pairs;
  size_t n, cap; /* in pairs */
  uint64_t last_end; /* page index after the last pair */
  bool unsorted; /* a pair starts before the one added before it */
} pair_list_t;

static bool pairs_add(pair_list_t *l, uint64_t first, uint64_t end) {
  if (l->n > 0 && first >= l->pairs[2 * l->n - 2] && first <= l->last_end) {
    /* adjacent to or overlapping the last pair (pages > 4 KiB, or a scan again) */
    if (end > l->last_end) {
      l->pairs[2 * l->n - 1] += (uint32_t)(end - l->last_end);
      l->last_end = end;
    }
    return true;
  }
  if (l->n > 0 && first < l->pairs[2 * l->n - 2]) l->unsorted = true;
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    uint32_t *p = realloc(l->pairs, cap * 2 * sizeof(uint32_t));
    if (!p) return false;
    l->pairs = p;
    l->cap = cap;
  }
  l->pairs[2 * l->n] = (uint32_t)first;
  l->pairs[2 * l->n + 1] = (uint32_t)(end - first);
  l->n++;
  l->last_end = end;
  return true;
}

static int pair_cmp(const void *a, const void *b) {
  const uint32_t x = ((const uint32_t *)a)[0], y = ((const uint32_t *)b)[0];
  return x < y ? -1 : x > y;
}

/* Sorts the pairs by first page and merges overlapping and adjacent ones, in place. */
static void pairs_normalize(pair_list_t *l) {
  if (!l->unsorted) return;
  qsort(l->pairs, l->n, 2 * sizeof(uint32_t), pair_cmp);
  size_t out = 0;
  for (size_t i = 0; i < l->n; i++) {
    const uint64_t first = l->pairs[2 * i], end = first + l->pairs[2 * i + 1];
    if (out > 0) {
      const uint64_t prev_first = l->pairs[2 * out - 2], prev_end = prev_first + l->pairs[2 * out - 1];
      if (first <= prev_end) {
        if (end > prev_end) l->pairs[2 * out - 1] = (uint32_t)(end - prev_first);
        continue;
      }
    }
    l->pairs[2 * out] = (uint32_t)first;
    l->pairs[2 * out + 1] = (uint32_t)(end - first);
    out++;
  }
  l->n = out;
  l->unsorted = false;
}

static const char *scan_errno_text(int err) {
  switch (err) {
    case EPERM: return "range not registered for userfaultfd async write-protect";
    case ENOTTY: return "this kernel has no PAGEMAP_SCAN (needs Linux 6.7+)";
    case EBADF: return "pagemapFd is not an open /proc/PID/pagemap";
    case EINVAL: return "invalid range or flags (start must be page-aligned)";
    default: return strerror(err);
  }
}

/* pagemapScan(pagemapFd, startAddress, lengthBytes, pageSizeBytes, reprotect) -> Uint32Array */
napi_value PagemapScan(napi_env env, napi_callback_info info) {
  static const char fn[] = "pagemapScan";
  napi_value argv[5];
  int fd;
  uint64_t start, length;
  uint32_t page_size;
  bool reprotect, lossless = false;
  if (!get_args(env, info, 5, argv)) return NULL;
  if (!arg_fd(env, argv[0], fn, "pagemapFd", &fd)) return NULL;
  napi_valuetype t;
  if (napi_typeof(env, argv[1], &t) != napi_ok || t != napi_bigint) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: startAddress must be a bigint", fn);
    return NULL;
  }
  NAPI_TRY(env, napi_get_value_bigint_uint64(env, argv[1], &start, &lossless));
  if (!lossless) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: startAddress must be between 0 and 2^64-1", fn);
    return NULL;
  }
  if (!arg_page_size(env, argv[3], fn, "pageSizeBytes", &page_size)) return NULL;
  if (!arg_page_length(env, argv[2], fn, "lengthBytes", page_size, &length)) return NULL;
  if (!arg_bool(env, argv[4], fn, "reprotect", &reprotect)) return NULL;
  const uint64_t sys_page = (uint64_t)sysconf(_SC_PAGESIZE);
  if (start % sys_page != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: startAddress 0x%llx is not aligned to the %llu-byte page",
              fn, (unsigned long long)start, (unsigned long long)sys_page);
    return NULL;
  }
  if (start + length < start) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: startAddress + lengthBytes overflows", fn);
    return NULL;
  }
  const uint64_t end = start + length;

  struct page_region vec[SCAN_VEC_LEN];
  pair_list_t list = {0};
  uint64_t cur = start;
  while (cur < end) {
    struct pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.size = sizeof arg;
    arg.flags = reprotect ? (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) : PM_SCAN_CHECK_WPASYNC;
    arg.start = cur;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = SCAN_VEC_LEN;
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    long n = ioctl(fd, PAGEMAP_SCAN, &arg);
    if (n < 0) {
      int err = errno;
      if (err == EINTR) continue;
      free(list.pairs);
      throw_errno(env, err, "PAGEMAP_SCAN failed", scan_errno_text(err));
      return NULL;
    }
    for (long i = 0; i < n && i < SCAN_VEC_LEN; i++) {
      uint64_t rs = vec[i].start, re = vec[i].end;
      if (rs < start) rs = start;
      if (re > end) re = end;
      if (re <= rs) continue;
      const uint64_t first = (rs - start) / page_size;
      const uint64_t last_end = (re - start + page_size - 1) / page_size;
      if (!pairs_add(&list, first, last_end)) {
        free(list.pairs);
        throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
        return NULL;
      }
    }
    if (arg.walk_end >= end) break;
    if (arg.walk_end <= cur) {
      free(list.pairs);
      throw_fmt(env, ERR_ERROR, NULL, "%s: PAGEMAP_SCAN made no progress at 0x%llx", fn,
                (unsigned long long)cur);
      return NULL;
    }
    cur = arg.walk_end;
  }

  pairs_normalize(&list);
  napi_value ab, result;
  void *dst = NULL;
  if (napi_create_arraybuffer(env, list.n * 2 * sizeof(uint32_t), &dst, &ab) != napi_ok) {
    free(list.pairs);
    throw_napi(env, "napi_create_arraybuffer");
    return NULL;
  }
  if (list.n) memcpy(dst, list.pairs, list.n * 2 * sizeof(uint32_t));
  free(list.pairs);
  NAPI_TRY(env, napi_create_typedarray(env, napi_uint32_array, list.n * 2, ab, 0, &result));
  return result;
}
