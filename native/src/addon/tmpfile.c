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


/*
 * fileDataRuns(fd, pageSize, pageCount[, maxRuns]) -> Uint32Array of [first, count] pairs: the
 * pages of the first pageCount pages of the file that hold data (SEEK_DATA / SEEK_HOLE);
 * everything else is a hole and reads as zeros. A page partly data is a data page. A file
 * system without SEEK_DATA reports the whole file as data (lseek's fallback), which is slower
 * but right: the caller then reads zeros it could have skipped. With maxRuns, the walk stops
 * at that many runs and the last one reaches to the end: two lseeks a run, so a file holed
 * at every other page costs a bounded time, and calling the rest data is right as well.
 */
napi_value FileDataRuns(napi_env env, napi_callback_info info) {
  static const char fn[] = "fileDataRuns";
  napi_value argv[4];
  int fd;
  uint32_t ps;
  uint64_t count;
  uint64_t max_runs = UINT32_MAX;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!arg_fd(env, argv[0], fn, "fd", &fd) || !arg_page_size(env, argv[1], fn, "pageSize", &ps) ||
      !arg_integer(env, argv[2], fn, "pageCount", 0, UINT32_MAX, &count))
    return NULL;
  if (!arg_is_absent(env, argv[3]) && !arg_integer(env, argv[3], fn, "maxRuns", 1, UINT32_MAX, &max_runs)) return NULL;
  const off_t end = (off_t)count * ps;
  size_t n = 0, cap = 0;
  uint32_t *pairs = NULL;
  off_t at = 0;
  while (at < end) {
    off_t data = lseek(fd, at, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break; /* no data at or after `at` */
      int err = errno;
      free(pairs);
      throw_errno(env, err, "fileDataRuns: lseek(SEEK_DATA) failed", NULL);
      return NULL;
    }
    if (data >= end) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      int err = errno;
      free(pairs);
      throw_errno(env, err, "fileDataRuns: lseek(SEEK_HOLE) failed", NULL);
      return NULL;
    }
    if (hole > end) hole = end;
    const uint32_t first = (uint32_t)(data / ps);
    const uint32_t last_end = (uint32_t)((hole + ps - 1) / ps);
    if (n > 0 && pairs[2 * (n - 1)] + pairs[2 * (n - 1) + 1] >= first) {
      /* Extents that meet inside one page make one run. */
      pairs[2 * (n - 1) + 1] = last_end - pairs[2 * (n - 1)];
    } else if (n == max_runs) {
      /* The cap: a run more would be one too many, so the last one takes the rest. */
      pairs[2 * (n - 1) + 1] = (uint32_t)count - pairs[2 * (n - 1)];
      break;
    } else {
      if (n == cap) {
        size_t ncap = cap ? cap * 2 : 64;
        uint32_t *grown = realloc(pairs, ncap * 2 * sizeof *pairs);
        if (!grown) {
          free(pairs);
          throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
          return NULL;
        }
        pairs = grown;
        cap = ncap;
      }
      pairs[2 * n] = first;
      pairs[2 * n + 1] = last_end - first;
      n++;
    }
    if (hole <= at) break; /* cannot happen; never loop on a file system that says so */
    at = (off_t)last_end * ps;
  }
  napi_value ab, result;
  void *dst = NULL;
  if (napi_create_arraybuffer(env, n * 2 * sizeof(uint32_t), &dst, &ab) != napi_ok) {
    free(pairs);
    throw_napi(env, "napi_create_arraybuffer");
    return NULL;
  }
  if (n) memcpy(dst, pairs, n * 2 * sizeof(uint32_t));
  free(pairs);
  NAPI_TRY(env, napi_create_typedarray(env, napi_uint32_array, n * 2, ab, 0, &result));
  return result;
}
