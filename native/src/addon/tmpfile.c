/*
 * Temporary files: O_TMPFILE files, named once complete (tmpfileCreate / tmpfileLink), and
 * punchHoles, which turns pages of a file back into holes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
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

