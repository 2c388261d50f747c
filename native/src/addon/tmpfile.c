/*
 * Temporary files: O_TMPFILE files, named once complete (tmpfileCreate / tmpfileLink), and
 * punchHoles, which turns pages of a file back into holes; fileDataRuns, where a sparse
 * file (a disk) holds data.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data-runs.h"
#include "napi-util.h"
#include "exports.h"

/* tmpfileCreate(dir, lengthBytes, sparse?) -> fd */
napi_value TmpfileCreate(napi_env env, napi_callback_info info) {
  static const char fn[] = "tmpfileCreate";
  napi_value argv[3], result;
  char *dir = NULL;
  uint64_t length;
  bool sparse = false;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!arg_is_absent(env, argv[2]) && !arg_bool(env, argv[2], fn, "sparse", &sparse)) return NULL;
  if (!arg_path(env, argv[0], fn, "dir", &dir)) return NULL;
  if (!arg_integer(env, argv[1], fn, "lengthBytes", 0, MAX_SAFE_INTEGER, &length)) {
    free(dir);
    return NULL;
  }
  int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    int err = errno;
    char prefix[PATH_MAX + 96];
    snprintf(prefix, sizeof prefix, "%s: cannot create an unnamed file in '%s'", fn, dir);
    free(dir);
    throw_errno(env, err,
                prefix, err == EOPNOTSUPP || err == EISDIR
                            ? "the file system does not support O_TMPFILE"
                            : NULL);
    return NULL;
  }
  /* Reserve the memory now: on a full tmpfs this fails here with ENOSPC, where a sparse
   * file would fail later with SIGBUS on a write through the mapping, killing the agent.
   * Allocating up front also keeps page allocation out of the page stream. */
  int sized = length == 0 || sparse ? ftruncate(fd, (off_t)length) : fallocate(fd, 0, 0, (off_t)length);
  if (sized != 0 && errno == EOPNOTSUPP) sized = ftruncate(fd, (off_t)length);
  if (sized != 0) {
    int err = errno;
    close(fd);
    char prefix[PATH_MAX + 128];
    snprintf(prefix, sizeof prefix, "%s: cannot reserve %llu bytes for an unnamed file in '%s'", fn,
             (unsigned long long)length, dir);
    free(dir);
    throw_errno(env, err, prefix, NULL);
    return NULL;
  }
  free(dir);
  if (napi_create_int32(env, fd, &result) != napi_ok) {
    close(fd);
    throw_napi(env, "napi_create_int32");
    return NULL;
  }
  return result;
}

/* tmpfileLink(fd, path) */
napi_value TmpfileLink(napi_env env, napi_callback_info info) {
  static const char fn[] = "tmpfileLink";
  napi_value argv[2];
  int fd;
  char *path = NULL;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!arg_fd(env, argv[0], fn, "fd", &fd)) return NULL;
  if (!arg_path(env, argv[1], fn, "path", &path)) return NULL;
  char proc[64];
  snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
  if (linkat(AT_FDCWD, proc, AT_FDCWD, path, AT_SYMLINK_FOLLOW) != 0) {
    int err = errno;
    char prefix[PATH_MAX + 96];
    if (err == EEXIST) {
      throw_fmt(env, ERR_ERROR, "EEXIST", "%s: cannot link fd %d to '%s': EEXIST (the path already exists)", fn, fd, path);
    } else {
      snprintf(prefix, sizeof prefix, "%s: cannot link fd %d to '%s'", fn, fd, path);
      throw_errno(env, err, prefix, err == ENOENT && access(proc, F_OK) != 0
                                        ? "fd is not an open file"
                                        : NULL);
    }
    free(path);
    return NULL;
  }
  free(path);
  return NULL;
}

/* punchHoles(fd, runs, pageSize): the pages of `runs` ([first, count] pairs) become holes. */
napi_value PunchHoles(napi_env env, napi_callback_info info) {
  static const char fn[] = "punchHoles";
  napi_value argv[3];
  int fd;
  uint32_t *runs, ps;
  size_t runs_len;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!arg_fd(env, argv[0], fn, "fd", &fd) ||
      !arg_typed(env, argv[1], fn, "runs", napi_uint32_array, (void **)&runs, &runs_len) ||
      !arg_page_size(env, argv[2], fn, "pageSize", &ps))
    return NULL;
  if (runs_len % 2 != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: runs must hold [first, count] pairs", fn);
    return NULL;
  }
  for (size_t i = 0; i < runs_len; i += 2) {
    if (runs[i + 1] == 0) continue;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)runs[i] * ps, (off_t)runs[i + 1] * ps) != 0) {
      char prefix[96];
      snprintf(prefix, sizeof prefix, "%s: fallocate(PUNCH_HOLE) of pages %u..+%u failed", fn, runs[i], runs[i + 1]);
      throw_errno(env, errno, prefix, NULL);
      return NULL;
    }
  }
  return NULL;
}



/* Adds pages [first, end) as data: false when out of memory. */
static bool runs_add(run_list_t *l, uint32_t first, uint32_t end) {
  if (l->full || end <= first) return true;
  if (l->n > 0 && (uint64_t)l->pairs[2 * (l->n - 1)] + l->pairs[2 * (l->n - 1) + 1] + l->min_hole - 1 >= first) {
    /* Touching, overlapping (extents that meet inside one page) or a hole too small to skip: one run. */
    uint32_t *last = &l->pairs[2 * (l->n - 1)];
    if (end > last[0] + last[1]) last[1] = end - last[0];
    return true;
  }
  if (l->n == l->max_runs) {
    /* A run more would be one too many: the last one takes the rest. */
    l->pairs[2 * (l->n - 1) + 1] = l->page_count - l->pairs[2 * (l->n - 1)];
    l->full = true;
    return true;
  }
  if (l->n == l->cap) {
    size_t ncap = l->cap ? l->cap * 2 : 64;
    uint32_t *grown = realloc(l->pairs, ncap * 2 * sizeof *grown);
    if (!grown) return false;
    l->pairs = grown;
    l->cap = ncap;
  }
  l->pairs[2 * l->n] = first;
  l->pairs[2 * l->n + 1] = end - first;
  l->n++;
  return true;
}

/*
 * The data of pages [from, to) (SEEK_DATA / SEEK_HOLE) into l. On tmpfs a SEEK_HOLE walks
 * the data it passes a page at a time (about 50 ns a page here), a SEEK_DATA skips a hole
 * fast. 0, or an errno (ENOMEM when out of memory).
 */
static int walk_data(int fd, uint32_t ps, uint32_t from, uint32_t to, run_list_t *l) {
  const off_t end = (off_t)to * ps;
  off_t at = (off_t)from * ps;
  while (at < end && !l->full) {
    off_t data = lseek(fd, at, SEEK_DATA);
    if (data < 0) return errno == ENXIO ? 0 : errno; /* ENXIO: no data at or after `at` */
    if (data >= end) return 0;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return errno;
    if (hole > end) hole = end;
    const uint32_t last_end = (uint32_t)((hole + ps - 1) / ps);
    if (!runs_add(l, (uint32_t)(data / ps), last_end)) return ENOMEM;
    if (hole <= at) return 0; /* cannot happen; never loop on a file system that says so */
    at = (off_t)last_end * ps;
  }
  return 0;
}

/* The walk behind fileDataRuns (holes: hole_count maybe-hole pairs, or NULL): 0 or an errno. */
int file_data_runs(int fd, uint32_t ps, uint32_t count, uint64_t max_runs, uint32_t min_hole, const uint32_t *holes, size_t hole_count, run_list_t *l) {
  *l = (run_list_t){.max_runs = max_runs, .page_count = count, .min_hole = min_hole ? min_hole : 1};
  if (!holes) return walk_data(fd, ps, 0, count, l);
  uint32_t at = 0;
  for (size_t i = 0; i < hole_count; i++) {
    const uint32_t first = holes[2 * i], end = holes[2 * i] + holes[2 * i + 1];
    if (!runs_add(l, at, first)) return ENOMEM;
    int err = walk_data(fd, ps, first, end, l);
    if (err) return err;
    at = end;
  }
  return runs_add(l, at, count) ? 0 : ENOMEM;
}

/*
 * fileDataRuns(fd, pageSize, pageCount[, maxRuns[, maybeHoles[, minHolePages]]]) -> Uint32Array
 * of [first, count] pairs: the pages of the first pageCount pages of the file that hold data
 * (SEEK_DATA / SEEK_HOLE); everything else is a hole and reads as zeros. A page partly data
 * is a data page. A file system without SEEK_DATA reports the whole file as data (lseek's
 * fallback), which is slower but right: the caller then reads zeros it could have skipped.
 * With maxRuns, the walk stops at that many runs and the last one reaches to the end: two
 * lseeks a run, so a file holed at every other page costs a bounded time, and calling the
 * rest data is right as well. With maybeHoles ([first, count] pairs, ascending), only those
 * pages are looked at and every other page counts as data: the holes an earlier call found,
 * checked again without walking the data between them. With minHolePages, a hole of fewer
 * pages between two runs counts as data: reading it costs less than cutting the runs.
 */
typedef struct {
  int fd;
  uint32_t ps;
  uint64_t count;
  uint64_t max_runs;
  uint32_t *holes; /* the caller's (sync) or a copy (async) */
  size_t hole_count;
  uint64_t min_hole;
} data_runs_args_t;

/* Reads fileDataRuns' arguments: false with an exception pending. */
static bool data_runs_args(napi_env env, napi_callback_info info, const char *fn, data_runs_args_t *a) {
  napi_value argv[6];
  size_t holes_len = 0;
  *a = (data_runs_args_t){.max_runs = UINT32_MAX, .min_hole = 1};
  if (!get_args(env, info, 6, argv)) return false;
  if (!arg_fd(env, argv[0], fn, "fd", &a->fd) || !arg_page_size(env, argv[1], fn, "pageSize", &a->ps) ||
      !arg_integer(env, argv[2], fn, "pageCount", 0, UINT32_MAX, &a->count))
    return false;
  if (!arg_is_absent(env, argv[3]) && !arg_integer(env, argv[3], fn, "maxRuns", 1, UINT32_MAX, &a->max_runs)) return false;
  if (!arg_is_absent(env, argv[5]) && !arg_integer(env, argv[5], fn, "minHolePages", 1, UINT32_MAX, &a->min_hole)) return false;
  if (arg_is_absent(env, argv[4])) return true;
  if (!arg_typed(env, argv[4], fn, "maybeHoles", napi_uint32_array, (void **)&a->holes, &holes_len)) return false;
  if (holes_len % 2 != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: maybeHoles must hold [first, count] pairs", fn);
    return false;
  }
  uint64_t prev_end = 0;
  for (size_t i = 0; i < holes_len; i += 2) {
    uint64_t first = a->holes[i], run_end = (uint64_t)a->holes[i] + a->holes[i + 1];
    if (first < prev_end || run_end > a->count) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: maybeHoles pages %u..+%u are out of order or past pageCount %llu", fn, a->holes[i], a->holes[i + 1], (unsigned long long)a->count);
      return false;
    }
    prev_end = run_end;
  }
  a->hole_count = holes_len / 2;
  return true;
}

/* The runs as a Uint32Array (l's pairs freed), or NULL with an exception pending. */
static napi_value runs_array(napi_env env, const char *fn, run_list_t *l, int err) {
  if (err) {
    free(l->pairs);
    if (err == ENOMEM) throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    else throw_errno(env, err, "fileDataRuns: lseek(SEEK_DATA/SEEK_HOLE) failed", NULL);
    return NULL;
  }
  const size_t n = l->n;
  napi_value ab, result;
  void *dst = NULL;
  if (napi_create_arraybuffer(env, n * 2 * sizeof(uint32_t), &dst, &ab) != napi_ok) {
    free(l->pairs);
    throw_napi(env, "napi_create_arraybuffer");
    return NULL;
  }
  if (n) memcpy(dst, l->pairs, n * 2 * sizeof(uint32_t));
  free(l->pairs);
  l->pairs = NULL;
  NAPI_TRY(env, napi_create_typedarray(env, napi_uint32_array, n * 2, ab, 0, &result));
  return result;
}

napi_value FileDataRuns(napi_env env, napi_callback_info info) {
  static const char fn[] = "fileDataRuns";
  data_runs_args_t a;
  if (!data_runs_args(env, info, fn, &a)) return NULL;
  run_list_t l = {0};
  int err = file_data_runs(a.fd, a.ps, (uint32_t)a.count, a.max_runs, (uint32_t)a.min_hole, a.holes, a.hole_count, &l);
  return runs_array(env, fn, &l, err);
}

/* fileDataRunsAsync: the same walk on the libuv thread pool (the fd must stay open until it settles). */
typedef struct {
  data_runs_args_t a;
  run_list_t l;
  int err;
  napi_deferred deferred;
  napi_async_work work;
} data_runs_job_t;

static void data_runs_execute(napi_env env, void *data) {
  data_runs_job_t *job = data;
  job->err = file_data_runs(job->a.fd, job->a.ps, (uint32_t)job->a.count, job->a.max_runs, (uint32_t)job->a.min_hole, job->a.holes, job->a.hole_count, &job->l);
}

static void data_runs_complete(napi_env env, napi_status status, void *data) {
  data_runs_job_t *job = data;
  napi_value result = NULL, error;
  if (status != napi_ok) {
    free(job->l.pairs);
    throw_fmt(env, ERR_ERROR, NULL, "fileDataRunsAsync: cancelled");
  } else {
    result = runs_array(env, "fileDataRunsAsync", &job->l, job->err);
  }
  if (result) napi_resolve_deferred(env, job->deferred, result);
  else if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_reject_deferred(env, job->deferred, error);
  napi_delete_async_work(env, job->work);
  free(job->a.holes);
  free(job);
}

napi_value FileDataRunsAsync(napi_env env, napi_callback_info info) {
  static const char fn[] = "fileDataRunsAsync";
  napi_value promise, name;
  napi_deferred deferred;
  NAPI_TRY(env, napi_create_promise(env, &deferred, &promise));
  data_runs_job_t *job = calloc(1, sizeof *job);
  if (!job) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return reject_pending(env, deferred, promise);
  }
  if (!data_runs_args(env, info, fn, &job->a)) {
    free(job);
    return reject_pending(env, deferred, promise);
  }
  if (job->a.holes) {
    /* A copy: the caller's array may change or be collected while the walk runs. */
    uint32_t *copy = malloc(job->a.hole_count * 2 * sizeof *copy + 1);
    if (!copy) {
      free(job);
      throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
      return reject_pending(env, deferred, promise);
    }
    memcpy(copy, job->a.holes, job->a.hole_count * 2 * sizeof *copy);
    job->a.holes = copy;
  }
  job->deferred = deferred;
  if (napi_create_string_utf8(env, "gangway.fileDataRuns", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, data_runs_execute, data_runs_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    free(job->a.holes);
    free(job);
    throw_napi(env, "napi_create_async_work");
    return reject_pending(env, deferred, promise);
  }
  return promise;
}
