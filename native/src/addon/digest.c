/*
 * regionDigest: the 128-bit region digest, on the libuv thread pool (see region.h for how
 * it keeps the region alive); hash128: XXH3-128 of a byte array.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data-runs.h"
#include "napi-util.h"
#include "region.h"
#include "exports.h"

enum { DIGEST_FULL = 1, DIGEST_TRACKED = 2 };

typedef struct {
  region_t *region;
  napi_ref handle_ref; /* keeps the handle (and so the region) alive while in flight */
  napi_deferred deferred;
  napi_async_work work;
  int mode;
  uint32_t *data_runs; /* 'full' of a sparse file: [first, count] pairs; other pages are holes */
  size_t data_run_count;
  int holes_fd; /* >= 0: data_runs are the pages that may be holes in this file, walked first */
  int failed_errno; /* a read of a writable region failed */
  XXH128_canonical_t result;
} digest_job_t;

typedef struct {
  const region_t *region;
  XXH3_state_t st;
  XXH128_canonical_t buf[256];
  size_t k;
} digest_stream_t;

static void emit_digest(void *ctx, uint32_t page, const uint8_t *bytes) {
  digest_stream_t *ds = ctx;
  page_hash(&ds->buf[ds->k], bytes, ds->region->page_size);
  if (++ds->k == 256) {
    XXH3_128bits_update(&ds->st, ds->buf, sizeof ds->buf);
    ds->k = 0;
  }
}

/*
 * A full digest of a region on several threads: each fingerprints a slice of the pages into
 * one array, then the array is hashed. The value is the same as one thread's (XXH3-128 over
 * the fingerprints in page order). Reading memory is what costs: one core took 57 ms for
 * 1 GiB here, inside a pre-copy switchover's downtime. A writable region (a destination's
 * file, not mapped) is read through each slice's own 1 MiB preads: one thread streaming it
 * took 177 ms for a 1 GiB VM's memory, the longest part of that switchover.
 */
typedef struct {
  const region_t *region;
  uint32_t first, count;
  XXH128_canonical_t *out;
  int failed_errno; /* a pread failed (a writable region) */
  /* Data runs (a mapped region): the pages outside them are holes, the zero page's fingerprint unread. */
  const uint32_t *runs;
  size_t run_count;
} digest_slice_t;

#ifdef GANGWAY_HAVE_AVX2_HASH
void gangway_page_fps_avx2(const uint8_t *base, size_t page_size, uint32_t first, uint32_t count, void *out);
#endif

/* Fingerprints `count` pages at `bytes` into out[0..count). */
static void fingerprint_pages(const region_t *r, const uint8_t *bytes, uint32_t count, XXH128_canonical_t *out) {
#ifdef GANGWAY_HAVE_AVX2_HASH
  if (__builtin_cpu_supports("avx2")) {
    gangway_page_fps_avx2(bytes, r->page_size, 0, count, out);
    return;
  }
#endif
  for (uint32_t i = 0; i < count; i++) page_hash(&out[i], bytes + (size_t)i * r->page_size, r->page_size);
}

static void digest_slice_pread(digest_slice_t *slice) {
  const region_t *r = slice->region;
  const size_t chunk_pages = chunk_pages_of(r->page_size);
  uint8_t *buf = malloc(chunk_pages * r->page_size);
  if (!buf) {
    slice->failed_errno = ENOMEM;
    return;
  }
  const uint64_t end = (uint64_t)slice->first + slice->count;
  for (uint64_t at = slice->first; at < end; at += chunk_pages) {
    const uint32_t n = end - at < chunk_pages ? (uint32_t)(end - at) : (uint32_t)chunk_pages;
    if (!pread_all(r->fd, buf, (size_t)n * r->page_size, at * r->page_size)) {
      slice->failed_errno = errno ? errno : EIO;
      break;
    }
    fingerprint_pages(r, buf, n, &slice->out[at]);
  }
  free(buf);
}

/* A slice of a mapped region given its data runs: holes take the zero page's fingerprint. */
static void digest_slice_runs(digest_slice_t *slice) {
  const region_t *r = slice->region;
  const uint32_t end = slice->first + slice->count;
  /* The first run that ends past the slice's start (runs are ascending). */
  size_t lo = 0, hi = slice->run_count;
  while (lo < hi) {
    const size_t mid = lo + (hi - lo) / 2;
    if ((uint64_t)slice->runs[2 * mid] + slice->runs[2 * mid + 1] <= slice->first) lo = mid + 1;
    else hi = mid;
  }
  uint32_t at = slice->first;
  for (size_t i = lo; at < end; i++) {
    const uint32_t run_first = i < slice->run_count ? slice->runs[2 * i] : end;
    const uint64_t run_end = i < slice->run_count ? (uint64_t)run_first + slice->runs[2 * i + 1] : end;
    for (; at < run_first && at < end; at++) slice->out[at] = r->zero_hash;
    const uint32_t data_end = run_end < end ? (uint32_t)run_end : end;
    if (data_end > at) {
      fingerprint_pages(r, r->addr + (size_t)at * r->page_size, data_end - at, &slice->out[at]);
      at = data_end;
    }
  }
}

static void *digest_slice(void *arg) {
  digest_slice_t *slice = arg;
  const region_t *r = slice->region;
  if (!r->addr) {
    digest_slice_pread(slice);
    return NULL;
  }
  if (slice->runs) {
    digest_slice_runs(slice);
    return NULL;
  }
#ifdef GANGWAY_HAVE_AVX2_HASH
  if (__builtin_cpu_supports("avx2")) {
    gangway_page_fps_avx2(r->addr, r->page_size, slice->first, slice->count, slice->out);
    return NULL;
  }
#endif
  for (uint32_t i = 0; i < slice->count; i++)
    page_hash(&slice->out[slice->first + i], r->addr + (size_t)(slice->first + i) * r->page_size, r->page_size);
  return NULL;
}

#define DIGEST_MAX_THREADS 4
#define DIGEST_MIN_PAGES_PER_THREAD 16384

/* False when the region is too small to split (or memory is short): the caller streams it.
 * *failed_errno: a read of a writable region failed. With data runs (a mapped region), holes
 * cost no reading: split as a full digest is, unless the data is too little to split. */
static bool digest_parallel(const region_t *r, const uint32_t *runs, size_t run_count, XXH128_canonical_t *result, int *failed_errno) {
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  if (runs) {
    /* Little data (a disk's few blocks): streamed, with no array of every page's fingerprint. */
    uint64_t data = 0;
    for (size_t i = 0; i < run_count; i++) data += runs[2 * i + 1];
    if (data < DIGEST_MIN_PAGES_PER_THREAD) return false;
  }
  uint32_t parts = r->page_count / DIGEST_MIN_PAGES_PER_THREAD;
  if (cpus > 0 && parts > (uint32_t)cpus) parts = (uint32_t)cpus;
  if (parts > DIGEST_MAX_THREADS) parts = DIGEST_MAX_THREADS;
  if (parts < 2) return false;
  XXH128_canonical_t *fps = malloc((size_t)r->page_count * sizeof *fps);
  if (!fps) return false;
  digest_slice_t slices[DIGEST_MAX_THREADS];
  pthread_t threads[DIGEST_MAX_THREADS];
  bool started[DIGEST_MAX_THREADS] = {false};
  const uint32_t per = (r->page_count + parts - 1) / parts;
  for (uint32_t k = 0; k < parts; k++) {
    const uint32_t first = k * per;
    slices[k] = (digest_slice_t){.region = r, .first = first, .count = first >= r->page_count ? 0 : (r->page_count - first < per ? r->page_count - first : per), .out = fps, .runs = runs, .run_count = run_count};
  }
  /* Slices 1.. on threads of their own, slice 0 here; a thread that cannot start runs here too. */
  for (uint32_t k = 1; k < parts; k++) started[k] = pthread_create(&threads[k], NULL, digest_slice, &slices[k]) == 0;
  digest_slice(&slices[0]);
  for (uint32_t k = 1; k < parts; k++) {
    if (started[k]) pthread_join(threads[k], NULL);
    else digest_slice(&slices[k]);
  }
  for (uint32_t k = 0; k < parts; k++)
    if (slices[k].failed_errno) *failed_errno = slices[k].failed_errno;
  if (!*failed_errno) XXH128_canonicalFromHash(result, XXH3_128bits(fps, (size_t)r->page_count * sizeof *fps));
  free(fps);
  return true;
}

/*
 * A full digest of a sparse file's mapping: pages outside the data runs are holes, so their
 * fingerprint is the zero page's without reading them (reading a hole through the mapping
 * would fill the page cache with zeros: an 8 GiB disk with 64 MiB written would read 8 GiB).
 * Streamed, in page order, through a small buffer: the value is the same as a full digest of
 * the same bytes, and no array of every page's fingerprint is allocated (fresh memory is
 * what costs on these hosts).
 */
#define SPARSE_CHUNK 256
static void digest_sparse(const region_t *r, const uint32_t *runs, size_t run_count, XXH128_canonical_t *result) {
  XXH3_state_t st;
  XXH128_canonical_t buf[SPARSE_CHUNK];
  XXH128_canonical_t zeros[SPARSE_CHUNK];
  for (size_t i = 0; i < SPARSE_CHUNK; i++) zeros[i] = r->zero_hash;
  XXH3_128bits_reset(&st);
  uint32_t at = 0;
  for (size_t i = 0; i <= run_count; i++) {
    const uint32_t first = i < run_count ? runs[2 * i] : r->page_count;
    const uint32_t count = i < run_count ? runs[2 * i + 1] : 0;
    /* The holes before this run (runs are ascending; an overlapping one is taken from `at`). */
    for (; at < first; ) {
      const uint32_t n = first - at < SPARSE_CHUNK ? first - at : SPARSE_CHUNK;
      XXH3_128bits_update(&st, zeros, (size_t)n * sizeof zeros[0]);
      at += n;
    }
    const uint32_t end = first + count;
    while (at < end) {
      const uint32_t n = end - at < SPARSE_CHUNK ? end - at : SPARSE_CHUNK;
#ifdef GANGWAY_HAVE_AVX2_HASH
      if (__builtin_cpu_supports("avx2")) gangway_page_fps_avx2(r->addr + (size_t)at * r->page_size, r->page_size, 0, n, buf);
      else
#endif
        for (uint32_t k = 0; k < n; k++) page_hash(&buf[k], r->addr + (size_t)(at + k) * r->page_size, r->page_size);
      XXH3_128bits_update(&st, buf, (size_t)n * sizeof buf[0]);
      at += n;
    }
  }
  XXH128_canonicalFromHash(result, XXH3_128bits_digest(&st));
}

static void digest_execute(napi_env env, void *data) {
  digest_job_t *job = data;
  const region_t *r = job->region;
  if (job->holes_fd >= 0) {
    /* The holes an earlier walk found, looked at again now; every other page is data. */
    run_list_t l;
    int err = file_data_runs(job->holes_fd, (uint32_t)r->page_size, r->page_count, UINT32_MAX, 1, job->data_runs, job->data_run_count, &l);
    free(job->data_runs);
    job->data_runs = l.pairs;
    job->data_run_count = l.n;
    if (!err && !job->data_runs) job->data_runs = malloc(sizeof *job->data_runs); /* no data at all: every page a hole */
    if (err || !job->data_runs) {
      job->failed_errno = err ? err : ENOMEM;
      return;
    }
  }
  if (job->data_runs) {
    /* Enough data to split (a memory region's): on threads; a disk's few blocks: streamed. */
    if (digest_parallel(r, job->data_runs, job->data_run_count, &job->result, &job->failed_errno)) return;
    digest_sparse(r, job->data_runs, job->data_run_count, &job->result);
    return;
  }
  if (job->mode == DIGEST_FULL && digest_parallel(r, NULL, 0, &job->result, &job->failed_errno)) return;
  if (job->mode == DIGEST_TRACKED) {
    /* One-shot over the fingerprint array equals streaming over each fingerprint. */
    XXH128_canonicalFromHash(&job->result,
                             XXH3_128bits(r->hashes, (size_t)r->page_count * 16));
    return;
  }
  digest_stream_t ds = {.region = r, .k = 0};
  XXH3_128bits_reset(&ds.st);
  if (!region_each_page(r, emit_digest, &ds)) {
    job->failed_errno = errno;
    return;
  }
  if (ds.k) XXH3_128bits_update(&ds.st, ds.buf, ds.k * 16);
  XXH128_canonicalFromHash(&job->result, XXH3_128bits_digest(&ds.st));
}

static void digest_complete(napi_env env, napi_status status, void *data) {
  digest_job_t *job = data;
  region_t *r = job->region;
  if (status == napi_ok && job->failed_errno) {
    char msg[160];
    snprintf(msg, sizeof msg, "regionDigest: reading the region failed: %s", strerror(job->failed_errno));
    napi_value m, err;
    napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
    napi_create_error(env, NULL, m, &err);
    napi_reject_deferred(env, job->deferred, err);
  } else if (status == napi_ok) {
    napi_value buf;
    if (napi_create_buffer_copy(env, 16, &job->result, NULL, &buf) == napi_ok) {
      napi_resolve_deferred(env, job->deferred, buf);
    } else {
      napi_value msg, err;
      napi_create_string_utf8(env, "regionDigest: cannot allocate the result", NAPI_AUTO_LENGTH,
                              &msg);
      napi_create_error(env, NULL, msg, &err);
      napi_reject_deferred(env, job->deferred, err);
    }
  } else {
    napi_value msg, err;
    napi_create_string_utf8(env, "regionDigest: cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &err);
    napi_reject_deferred(env, job->deferred, err);
  }
  region_unbusy(r);
  napi_delete_reference(env, job->handle_ref);
  napi_delete_async_work(env, job->work);
  free(job->data_runs);
  free(job);
}

/*
 * regionDigest(region, mode, dataRuns?, holesFd?) -> Promise<Buffer>. With holesFd, the runs
 * are the pages that may be holes in that file (open until the promise settles): the job
 * walks them first (SEEK_DATA) and takes every other page as data.
 */
napi_value RegionDigest(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionDigest";
  napi_value argv[4], promise;
  napi_deferred deferred;
  region_t *r;
  if (!get_args(env, info, 4, argv)) return NULL;
  NAPI_TRY(env, napi_create_promise(env, &deferred, &promise));
  if (!arg_region(env, argv[0], fn, false, &r)) return reject_pending(env, deferred, promise);
  int mode = 0;
  napi_valuetype t;
  if (napi_typeof(env, argv[1], &t) == napi_ok && t == napi_string) {
    char s[16];
    size_t n = 0;
    if (napi_get_value_string_utf8(env, argv[1], s, sizeof s, &n) == napi_ok) {
      if (strcmp(s, "full") == 0) mode = DIGEST_FULL;
      else if (strcmp(s, "tracked") == 0) mode = DIGEST_TRACKED;
    }
  }
  if (mode == 0) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: mode must be 'full' or 'tracked'", fn);
    return reject_pending(env, deferred, promise);
  }
  if (mode == DIGEST_TRACKED && !r->track) {
    throw_fmt(env, ERR_ERROR, NULL,
              "%s: mode 'tracked' needs a region mapped with trackHashes", fn);
    return reject_pending(env, deferred, promise);
  }
  uint32_t *runs = NULL;
  size_t runs_len = 0;
  if (!arg_is_absent(env, argv[2])) {
    if (mode != DIGEST_FULL || !r->addr) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: dataRuns go with mode 'full' of a read-only region", fn);
      return reject_pending(env, deferred, promise);
    }
    if (!arg_typed(env, argv[2], fn, "dataRuns", napi_uint32_array, (void **)&runs, &runs_len)) return reject_pending(env, deferred, promise);
    if (runs_len % 2 != 0) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: dataRuns must hold [first, count] pairs", fn);
      return reject_pending(env, deferred, promise);
    }
    for (size_t i = 0; i < runs_len; i += 2) {
      if ((uint64_t)runs[i] + runs[i + 1] > r->page_count) {
        throw_fmt(env, ERR_RANGE, NULL, "%s: dataRuns pages %u..+%u are outside the region's %u pages", fn, runs[i], runs[i + 1], r->page_count);
        return reject_pending(env, deferred, promise);
      }
    }
  }
  int holes_fd = -1;
  if (!arg_is_absent(env, argv[3])) {
    if (!runs) {
      throw_fmt(env, ERR_TYPE, NULL, "%s: holesFd goes with the runs that may be holes", fn);
      return reject_pending(env, deferred, promise);
    }
    if (!arg_fd(env, argv[3], fn, "holesFd", &holes_fd)) return reject_pending(env, deferred, promise);
    for (size_t i = 2; i < runs_len; i += 2) {
      if (runs[i] < (uint64_t)runs[i - 2] + runs[i - 1]) {
        throw_fmt(env, ERR_RANGE, NULL, "%s: the runs that may be holes must be ascending (pages %u..+%u)", fn, runs[i], runs[i + 1]);
        return reject_pending(env, deferred, promise);
      }
    }
  }
  digest_job_t *job = calloc(1, sizeof *job);
  if (!job) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return reject_pending(env, deferred, promise);
  }
  if (runs) {
    /* A copy: the caller's array may change or be collected while the digest runs. */
    job->data_runs = malloc(runs_len ? runs_len * sizeof *runs : 1);
    if (!job->data_runs) {
      free(job);
      throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
      return reject_pending(env, deferred, promise);
    }
    memcpy(job->data_runs, runs, runs_len * sizeof *runs);
    job->data_run_count = runs_len / 2;
  }
  job->region = r;
  job->deferred = deferred;
  job->mode = mode;
  job->holes_fd = holes_fd;
  napi_value name;
  if (napi_create_reference(env, argv[0], 1, &job->handle_ref) != napi_ok) {
    free(job->data_runs);
    free(job);
    throw_napi(env, "napi_create_reference");
    return reject_pending(env, deferred, promise);
  }
  if (napi_create_string_utf8(env, "gangway.regionDigest", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, digest_execute, digest_complete, job, &job->work) !=
          napi_ok) {
    napi_delete_reference(env, job->handle_ref);
    free(job->data_runs);
    free(job);
    throw_napi(env, "napi_create_async_work");
    return reject_pending(env, deferred, promise);
  }
  if (napi_queue_async_work(env, job->work) != napi_ok) {
    napi_delete_async_work(env, job->work);
    napi_delete_reference(env, job->handle_ref);
    free(job->data_runs);
    free(job);
    throw_napi(env, "napi_queue_async_work");
    return reject_pending(env, deferred, promise);
  }
  region_busy(r);
  return promise;
}

/* hash128(data) -> Buffer(16) */
napi_value Hash128(napi_env env, napi_callback_info info) {
  napi_value argv[1], result;
  void *data;
  size_t len;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (!arg_typed(env, argv[0], "hash128", "data", napi_uint8_array, &data, &len)) return NULL;
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, XXH3_128bits(data, len));
  NAPI_TRY(env, napi_create_buffer_copy(env, 16, &c, NULL, &result));
  return result;
}
