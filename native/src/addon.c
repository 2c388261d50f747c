/*
 * gangway.node: the N-API addon of the gangway data plane.
 *
 * Implements the NativeAddon interface of agent/native.ts (that file is the contract):
 *   regionMap / regionClose          MAP_SHARED regions of a file, optional per-page
 *                                    XXH3-128 fingerprints
 *   regionGather / regionScatter     page batches (ENTRY_ZERO / ENTRY_DATA entries),
 *                                    optionally fingerprinting the gathered data pages
 *   regionCopyPages                  copy-ref entries: pages copied between regions
 *   regionFingerprints               XXH3-128 of a range of pages
 *   regionDigest                     128-bit region digest on the libuv thread pool
 *   hash128                          XXH3-128 of a byte array
 *   pagemapScan                      PAGEMAP_SCAN (userfaultfd WP_ASYNC dirty tracking)
 *   tmpfileCreate / tmpfileLink      O_TMPFILE files, named once complete
 *
 * Every argument is validated here: the agent passes data derived from untrusted peer
 * frames (regionScatter), so bad input must raise a TypeError/RangeError naming the
 * argument, never touch memory outside the region.
 *
 * Threading: everything runs on the JS thread except the body of regionDigest, which
 * only reads the mapping (and the fingerprint array). A region keeps a count of digests
 * in flight; regionClose during a digest marks the handle closed at once but defers the
 * munmap until the last digest completes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define NAPI_VERSION 8

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <sys/eventfd.h>
#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include <node_api.h>

#include "gangway-abi.h"
#include "uapi-compat.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

/* Must match ENTRY_ZERO / ENTRY_DATA in agent/native.ts. ENTRY_REF (3) is applied with
 * regionCopyPages, so regionScatter rejects it like any unknown kind. */
#define ENTRY_ZERO 1u
#define ENTRY_DATA 2u

#define PAGE_SIZE_MIN 512u
#define PAGE_SIZE_MAX (1u << 20)
#define MAX_SAFE_INTEGER 9007199254740991.0 /* 2^53 - 1 */
#define SCAN_VEC_LEN 1024

/* ------------------------------------------------------------------------------------ */
/* Errors                                                                               */
/* ------------------------------------------------------------------------------------ */

typedef enum { ERR_ERROR, ERR_TYPE, ERR_RANGE } err_kind;

static void throw_fmt(napi_env env, err_kind kind, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void throw_fmt(napi_env env, err_kind kind, const char *code, const char *fmt, ...) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  switch (kind) {
    case ERR_TYPE: napi_throw_type_error(env, code, msg); break;
    case ERR_RANGE: napi_throw_range_error(env, code, msg); break;
    default: napi_throw_error(env, code, msg); break;
  }
}

/* "EPERM" (glibc >= 2.32), or the number when unknown. */
static const char *errno_name(int err, char *buf, size_t len) {
  const char *name = strerrorname_np(err);
  if (name) return name;
  snprintf(buf, len, "errno %d", err);
  return buf;
}

/* Throws Error(`${prefix}: ${ENAME} (${text})`) with err.code = ENAME. */
static void throw_errno(napi_env env, int err, const char *prefix, const char *text) {
  char nb[32];
  const char *name = errno_name(err, nb, sizeof nb);
  throw_fmt(env, ERR_ERROR, strerrorname_np(err), "%s: %s (%s)", prefix, name,
            text ? text : strerror(err));
}

/* A failed napi_* call: throw a generic error unless one is already pending. */
static void throw_napi(napi_env env, const char *what) {
  const napi_extended_error_info *info = NULL;
  napi_get_last_error_info(env, &info);
  throw_fmt(env, ERR_ERROR, NULL, "gangway: %s failed: %s", what,
            info && info->error_message ? info->error_message : "unknown N-API error");
}

#define NAPI_TRY(env, call)       \
  do {                            \
    if ((call) != napi_ok) {      \
      throw_napi((env), #call);   \
      return NULL;                \
    }                             \
  } while (0)

/* ------------------------------------------------------------------------------------ */
/* Argument validation helpers: each returns false with a pending exception.            */
/* ------------------------------------------------------------------------------------ */

static bool get_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_napi(env, "napi_get_cb_info");
    return false;
  }
  /* Missing arguments are `undefined` and fail their own validation, by name. */
  return true;
}

/* A JS number that is an integer in [min, max]. */
static bool arg_integer(napi_env env, napi_value v, const char *fn, const char *name, double min,
                        double max, uint64_t *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a number", fn, name);
    return false;
  }
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) {
    throw_napi(env, "napi_get_value_double");
    return false;
  }
  if (!(d >= min && d <= max) || d != (double)(uint64_t)d) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s must be an integer between %.0f and %.0f (got %g)", fn,
              name, min, max, d);
    return false;
  }
  *out = (uint64_t)d;
  return true;
}

static bool arg_fd(napi_env env, napi_value v, const char *fn, const char *name, int *out) {
  uint64_t u;
  if (!arg_integer(env, v, fn, name, 0, (double)INT_MAX, &u)) return false;
  *out = (int)u;
  return true;
}

static bool arg_bool(napi_env env, napi_value v, const char *fn, const char *name, bool *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_boolean) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a boolean", fn, name);
    return false;
  }
  if (napi_get_value_bool(env, v, out) != napi_ok) {
    throw_napi(env, "napi_get_value_bool");
    return false;
  }
  return true;
}

static bool arg_page_size(napi_env env, napi_value v, const char *fn, const char *name,
                          uint32_t *out) {
  uint64_t u;
  if (!arg_integer(env, v, fn, name, 0, MAX_SAFE_INTEGER, &u)) return false;
  if (u < PAGE_SIZE_MIN || u > PAGE_SIZE_MAX || (u & (u - 1)) != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s must be a power of two between %u and %u (got %llu)",
              fn, name, PAGE_SIZE_MIN, PAGE_SIZE_MAX, (unsigned long long)u);
    return false;
  }
  *out = (uint32_t)u;
  return true;
}

/* A positive length, a multiple of page_size, at most 2^32-1 pages. */
static bool arg_page_length(napi_env env, napi_value v, const char *fn, const char *name,
                            uint32_t page_size, uint64_t *out) {
  uint64_t u;
  if (!arg_integer(env, v, fn, name, 1, MAX_SAFE_INTEGER, &u)) return false;
  if (u % page_size != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s (%llu) must be a multiple of the page size (%u)", fn,
              name, (unsigned long long)u, page_size);
    return false;
  }
  if (u / page_size > UINT32_MAX) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s (%llu) is more than 2^32-1 pages of %u bytes", fn,
              name, (unsigned long long)u, page_size);
    return false;
  }
  *out = u;
  return true;
}

static const char *typedarray_name(napi_typedarray_type t) {
  switch (t) {
    case napi_uint8_array: return "a Uint8Array";
    case napi_uint32_array: return "a Uint32Array";
    default: return "a typed array";
  }
}

/* A typed array of exactly type `want`; data may be NULL when len == 0. */
static bool arg_typed(napi_env env, napi_value v, const char *fn, const char *name,
                      napi_typedarray_type want, void **data, size_t *len) {
  bool is = false;
  napi_typedarray_type type;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, len, data, NULL, NULL) != napi_ok || type != want) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be %s", fn, name, typedarray_name(want));
    return false;
  }
  if (*len == 0) *data = NULL;
  return true;
}

/* arg_typed, or null: then *data = NULL, *len = 0 and *present = false. */
static bool arg_typed_or_null(napi_env env, napi_value v, const char *fn, const char *name,
                              napi_typedarray_type want, void **data, size_t *len,
                              bool *present) {
  napi_valuetype t;
  bool is = false;
  napi_typedarray_type type;
  *present = !(napi_typeof(env, v, &t) == napi_ok && t == napi_null);
  if (!*present) {
    *data = NULL, *len = 0;
    return true;
  }
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, len, data, NULL, NULL) != napi_ok || type != want) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be %s or null", fn, name, typedarray_name(want));
    return false;
  }
  if (*len == 0) *data = NULL;
  return true;
}

/* A path string without NUL characters, malloc'd into *out. */
static bool arg_path(napi_env env, napi_value v, const char *fn, const char *name, char **out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_string) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a string", fn, name);
    return false;
  }
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) {
    throw_napi(env, "napi_get_value_string_utf8");
    return false;
  }
  if (len == 0 || len >= PATH_MAX) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: %s must be a non-empty path shorter than %d bytes", fn,
              name, PATH_MAX);
    return false;
  }
  char *s = malloc(len + 1);
  if (!s) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return false;
  }
  size_t got = 0;
  if (napi_get_value_string_utf8(env, v, s, len + 1, &got) != napi_ok) {
    free(s);
    throw_napi(env, "napi_get_value_string_utf8");
    return false;
  }
  if (strlen(s) != got) {
    free(s);
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must not contain NUL characters", fn, name);
    return false;
  }
  *out = s;
  return true;
}

/* ------------------------------------------------------------------------------------ */
/* Regions                                                                              */
/* ------------------------------------------------------------------------------------ */

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
  dev_t dev; /* the file's identity: regionCopyPages must see two regions of one file as */
  ino_t ino; /* one, or an overlapping copy between them would read what it just wrote */
  bool closed;    /* regionClose was called: every later call throws */
  bool unmapped;  /* munmap done, hashes freed */
  bool finalized; /* the JS handle was garbage-collected */
  uint32_t busy;  /* digests in flight on the thread pool (touched on the JS thread only) */
  XXH128_canonical_t *hashes; /* page_count fingerprints, with track */
  XXH128_canonical_t zero_hash; /* XXH3-128 of page_size zero bytes */
} region_t;

static const napi_type_tag REGION_TAG = {0x67616e6777617952ULL, 0x6567696f6e48616eULL};

static const uint8_t ZERO_CHUNK[64 * 1024];

static XXH128_canonical_t zero_page_hash(size_t page_size) {
  XXH3_state_t st;
  XXH3_128bits_reset(&st);
  for (size_t done = 0; done < page_size; done += sizeof ZERO_CHUNK) {
    size_t n = page_size - done < sizeof ZERO_CHUNK ? page_size - done : sizeof ZERO_CHUNK;
    XXH3_128bits_update(&st, ZERO_CHUNK, n);
  }
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
  return c;
}

static inline void page_hash(XXH128_canonical_t *dst, const uint8_t *page, size_t page_size) {
  XXH128_canonicalFromHash(dst, XXH3_128bits(page, page_size));
}

/* Unmaps and frees the fingerprints; only when no digest is in flight. */
static void region_release(region_t *r) {
  if (r->unmapped) return;
  if (r->addr) munmap(r->addr, r->length);
  if (r->fd >= 0) close(r->fd);
  r->fd = -1;
  free(r->hashes);
  r->hashes = NULL;
  r->addr = NULL;
  r->unmapped = true;
}

static void region_finalize(napi_env env, void *data, void *hint) {
  region_t *r = data;
  r->finalized = true;
  r->closed = true;
  if (r->busy == 0) {
    region_release(r);
    free(r);
  }
  /* else: the pending digest's completion releases and frees it. */
}

/*
 * The region behind a handle. Throws TypeError for anything but a regionMap handle, and
 * Error('region is closed') for a closed one unless allow_closed.
 */
static bool arg_region_named(napi_env env, napi_value v, const char *fn, const char *name,
                             bool allow_closed, region_t **out) {
  napi_valuetype t;
  bool tagged = false;
  void *data = NULL;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external ||
      napi_check_object_type_tag(env, v, &REGION_TAG, &tagged) != napi_ok || !tagged ||
      napi_get_value_external(env, v, &data) != napi_ok || data == NULL) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: %s must be a RegionHandle returned by regionMap", fn, name);
    return false;
  }
  region_t *r = data;
  if (r->closed && !allow_closed) {
    throw_fmt(env, ERR_ERROR, "ERR_REGION_CLOSED", "region is closed");
    return false;
  }
  *out = r;
  return true;
}

static bool arg_region(napi_env env, napi_value v, const char *fn, bool allow_closed,
                       region_t **out) {
  return arg_region_named(env, v, fn, "region", allow_closed, out);
}

/* Whole-buffer positioned I/O: false with errno set on failure (EIO for a short file). */
static bool pwrite_all(int fd, const uint8_t *buf, size_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pwrite(fd, buf, len, (off_t)off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    buf += n, len -= (size_t)n, off += (uint64_t)n;
  }
  return true;
}

static bool pread_all(int fd, uint8_t *buf, size_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pread(fd, buf, len, (off_t)off);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) errno = EIO;
    if (n <= 0) return false;
    buf += n, len -= (size_t)n, off += (uint64_t)n;
  }
  return true;
}

/* Pages per 1 MiB of I/O (at least one). */
static inline size_t chunk_pages_of(size_t page_size) {
  return page_size >= (1u << 20) ? 1 : (1u << 20) / page_size;
}

/*
 * Calls emit(ctx, page, bytes) for pages [first, first + count) of the region in order
 * (the caller checks the bounds), from the mapping or, for a writable region, through
 * 1 MiB preads. False with errno set if a read fails.
 */
static bool region_each_page_in(const region_t *r, uint32_t first, uint32_t count,
                                void (*emit)(void *, uint32_t, const uint8_t *), void *ctx) {
  const uint64_t end = (uint64_t)first + count;
  if (r->addr) {
    for (uint64_t p = first; p < end; p++) emit(ctx, (uint32_t)p, r->addr + p * r->page_size);
    return true;
  }
  if (count == 0) return true;
  const size_t chunk_pages = chunk_pages_of(r->page_size);
  uint8_t *buf = malloc(chunk_pages * r->page_size);
  if (!buf) {
    errno = ENOMEM;
    return false;
  }
  for (uint64_t at = first; at < end; at += chunk_pages) {
    const size_t n = end - at < chunk_pages ? (size_t)(end - at) : chunk_pages;
    if (!pread_all(r->fd, buf, n * r->page_size, at * r->page_size)) {
      free(buf);
      return false;
    }
    for (size_t i = 0; i < n; i++) emit(ctx, (uint32_t)(at + i), buf + i * r->page_size);
  }
  free(buf);
  return true;
}

static bool region_each_page(const region_t *r, void (*emit)(void *, uint32_t, const uint8_t *),
                             void *ctx) {
  return region_each_page_in(r, 0, r->page_count, emit, ctx);
}

static void emit_hash(void *ctx, uint32_t page, const uint8_t *bytes) {
  const region_t *r = ((void **)ctx)[0];
  XXH128_canonical_t *out = ((void **)ctx)[1];
  page_hash(&out[page], bytes, r->page_size);
}

static bool region_hash_pages(const region_t *r, XXH128_canonical_t *out) {
  void *ctx[2] = {(void *)r, out};
  return region_each_page(r, emit_hash, ctx);
}

/* regionMap(fd, lengthBytes, pageSizeBytes, { writable, trackHashes, initiallyZero }) */
static napi_value RegionMap(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionMap";
  napi_value argv[4];
  if (!get_args(env, info, 4, argv)) return NULL;
  int fd;
  uint32_t page_size;
  uint64_t length;
  bool writable, track, initially_zero;
  if (!arg_fd(env, argv[0], fn, "fd", &fd)) return NULL;
  if (!arg_page_size(env, argv[2], fn, "pageSizeBytes", &page_size)) return NULL;
  if (!arg_page_length(env, argv[1], fn, "lengthBytes", page_size, &length)) return NULL;
  napi_valuetype t;
  if (napi_typeof(env, argv[3], &t) != napi_ok || t != napi_object) {
    throw_fmt(env, ERR_TYPE, NULL,
              "%s: options must be an object { writable, trackHashes, initiallyZero }", fn);
    return NULL;
  }
  {
    static const char *const keys[3] = {"writable", "trackHashes", "initiallyZero"};
    bool *const dst[3] = {&writable, &track, &initially_zero};
    for (int i = 0; i < 3; i++) {
      napi_value pv;
      char name[40];
      snprintf(name, sizeof name, "options.%s", keys[i]);
      NAPI_TRY(env, napi_get_named_property(env, argv[3], keys[i], &pv));
      if (!arg_bool(env, pv, fn, name, dst[i])) return NULL;
    }
  }

  struct stat st;
  if (fstat(fd, &st) != 0) {
    char prefix[96];
    snprintf(prefix, sizeof prefix, "%s: fstat of fd %d failed", fn, fd);
    throw_errno(env, errno, prefix, NULL);
    return NULL;
  }
  if (!S_ISREG(st.st_mode)) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: fd %d is not a regular file", fn, fd);
    return NULL;
  }
  if ((uint64_t)st.st_size < length) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: the file behind fd %d is %lld bytes, shorter than lengthBytes (%llu)", fn, fd,
              (long long)st.st_size, (unsigned long long)length);
    return NULL;
  }

  region_t *r = calloc(1, sizeof *r);
  if (!r) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return NULL;
  }
  r->length = (size_t)length;
  r->page_size = page_size;
  r->page_count = (uint32_t)(length / page_size);
  r->writable = writable;
  r->track = track;
  r->dev = st.st_dev;
  r->ino = st.st_ino;
  r->zero_hash = zero_page_hash(page_size);
  if (track) {
    r->hashes = malloc((size_t)r->page_count * sizeof(XXH128_canonical_t));
    if (!r->hashes) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory for %u page fingerprints", fn,
                r->page_count);
      free(r);
      return NULL;
    }
  }
  r->fd = -1;
  void *addr = NULL;
  if (writable) {
    const int mode = fcntl(fd, F_GETFL) & O_ACCMODE;
    if (mode != O_RDWR && mode != O_WRONLY) {
      free(r->hashes);
      free(r);
      throw_fmt(env, ERR_ERROR, "EACCES", "%s: fd %d is not open for writing, and the region is writable", fn, fd);
      return NULL;
    }
    r->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (r->fd < 0) {
      int err = errno;
      free(r->hashes);
      free(r);
      char prefix[96];
      snprintf(prefix, sizeof prefix, "%s: cannot duplicate fd %d", fn, fd);
      throw_errno(env, err, prefix, NULL);
      return NULL;
    }
  } else {
    addr = mmap(NULL, r->length, PROT_READ, MAP_SHARED, fd, 0);
  }
  if (addr == MAP_FAILED) {
    int err = errno;
    free(r->hashes);
    free(r);
    char prefix[160];
    snprintf(prefix, sizeof prefix, "%s: mmap of %llu bytes of fd %d (%s) failed", fn,
             (unsigned long long)length, fd, writable ? "read-write" : "read-only");
    throw_errno(env, err, prefix, NULL);
    return NULL;
  }
  r->addr = addr;
  if (track) {
    if (initially_zero) {
      for (uint32_t p = 0; p < r->page_count; p++) r->hashes[p] = r->zero_hash;
    } else if (!region_hash_pages(r, r->hashes)) {
      int err = errno;
      region_release(r);
      free(r);
      char prefix[96];
      snprintf(prefix, sizeof prefix, "%s: cannot read fd %d to fingerprint it", fn, fd);
      throw_errno(env, err, prefix, NULL);
      return NULL;
    }
  }

  napi_value handle;
  if (napi_create_external(env, r, region_finalize, NULL, &handle) != napi_ok) {
    region_release(r);
    free(r);
    throw_napi(env, "napi_create_external");
    return NULL;
  }
  /* From here the finalizer owns r. */
  NAPI_TRY(env, napi_type_tag_object(env, handle, &REGION_TAG));
  return handle;
}

/* regionClose(region): idempotent. */
static napi_value RegionClose(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  region_t *r;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (!arg_region(env, argv[0], "regionClose", true, &r)) return NULL;
  r->closed = true;
  if (r->busy == 0) region_release(r);
  /* else: the last pending digest releases the mapping when it completes. */
  return NULL;
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

/* An optional argument: `undefined` or `null` means absent. */
static bool arg_is_absent(napi_env env, napi_value v) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && (t == napi_undefined || t == napi_null);
}

/* regionGather(region, runs, cursor, payload, entries, out, fps?) -> done */
static napi_value RegionGather(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionGather";
  napi_value argv[7];
  region_t *r;
  uint32_t *runs, *cursor, *entries, *out;
  uint8_t *payload, *fps = NULL;
  size_t runs_len, cursor_len, payload_len, entries_len, out_len, fps_len = 0;
  if (!get_args(env, info, 7, argv)) return NULL;
  if (!arg_region(env, argv[0], fn, false, &r)) return NULL;
  if (!arg_typed(env, argv[1], fn, "runs", napi_uint32_array, (void **)&runs, &runs_len) ||
      !arg_typed(env, argv[2], fn, "cursor", napi_uint32_array, (void **)&cursor, &cursor_len) ||
      !arg_typed(env, argv[3], fn, "payload", napi_uint8_array, (void **)&payload,
                 &payload_len) ||
      !arg_typed(env, argv[4], fn, "entries", napi_uint32_array, (void **)&entries,
                 &entries_len) ||
      !arg_typed(env, argv[5], fn, "out", napi_uint32_array, (void **)&out, &out_len))
    return NULL;
  const bool with_fps = !arg_is_absent(env, argv[6]);
  if (with_fps &&
      !arg_typed(env, argv[6], fn, "fps", napi_uint8_array, (void **)&fps, &fps_len))
    return NULL;
  if (!r->addr) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: the region is writable (a destination's): it is not mapped for reading", fn);
    return NULL;
  }
  const size_t ps = r->page_size;
  if (runs_len % 2 != 0) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: runs must hold [firstPage, pageCount] pairs (its length %zu is odd)", fn,
              runs_len);
    return NULL;
  }
  if (cursor_len != 2) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: cursor must have length 2 [runIndex, pagesDoneInRun]",
              fn);
    return NULL;
  }
  if (out_len != 2) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: out must have length 2 [entryCount, payloadBytes]", fn);
    return NULL;
  }
  if (payload_len == 0 || payload_len % ps != 0) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: payload length (%zu) must be a positive multiple of the page size (%zu)", fn,
              payload_len, ps);
    return NULL;
  }
  if (with_fps && fps_len / 16 < payload_len / ps) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: fps is %zu bytes, too short for the payload's %zu pages (16 bytes each: %zu)",
              fn, fps_len, payload_len / ps, payload_len / ps * 16);
    return NULL;
  }
  if (entries_len < 3 || entries_len % 3 != 0) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: entries must hold [kind, firstPage, pageCount] triples: its length (%zu) "
              "must be a positive multiple of 3",
              fn, entries_len);
    return NULL;
  }
  const size_t run_count = runs_len / 2;
  size_t ri = cursor[0];
  uint64_t done_in_run = cursor[1];
  if (ri > run_count) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: cursor[0] (%zu) is beyond the %zu runs", fn, ri,
              run_count);
    return NULL;
  }
  if (ri == run_count ? done_in_run != 0 : done_in_run > runs[2 * ri + 1]) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: cursor[1] (%llu) is beyond the length of run %zu", fn,
              (unsigned long long)done_in_run, ri);
    return NULL;
  }
  /* Byte counts are reported in a Uint32Array: cap the usable payload below 4 GiB. */
  size_t payload_cap = payload_len;
  if (payload_cap > UINT32_MAX) payload_cap = (UINT32_MAX / ps) * ps;
  const size_t entry_cap = entries_len / 3;

  size_t ne = 0, pb = 0;
  uint32_t last_kind = 0;
  uint64_t last_end = 0; /* page after the last entry's pages */
  bool stop = false;
  while (ri < run_count && !stop) {
    /* Read each run once into locals: the arrays may alias one another. */
    const uint64_t first = runs[2 * ri], count = runs[2 * ri + 1];
    if (first + count > r->page_count) {
      throw_fmt(env, ERR_RANGE, NULL,
                "%s: run %zu [%llu, %llu] is outside the region of %u pages", fn, ri,
                (unsigned long long)first, (unsigned long long)count, r->page_count);
      return NULL;
    }
    while (done_in_run < count) {
      const uint64_t page = first + done_in_run;
      const uint8_t *src = r->addr + page * ps;
      const uint32_t kind = page_is_zero(src, ps) ? ENTRY_ZERO : ENTRY_DATA;
      if (kind == ENTRY_DATA && pb + ps > payload_cap) {
        stop = true;
        break;
      }
      if (ne > 0 && last_kind == kind && last_end == page) {
        entries[3 * (ne - 1) + 2] += 1;
      } else {
        if (ne == entry_cap) {
          stop = true;
          break;
        }
        entries[3 * ne] = kind;
        entries[3 * ne + 1] = (uint32_t)page;
        entries[3 * ne + 2] = 1;
        ne++;
        last_kind = kind;
      }
      last_end = page + 1;
      if (kind == ENTRY_DATA) {
        memcpy(payload + pb, src, ps);
        /* From the copy, still in cache, and the very bytes sent: the guest may be
         * writing the source page meanwhile. */
        if (fps) page_hash((XXH128_canonical_t *)(void *)(fps + pb / ps * 16), payload + pb, ps);
        pb += ps;
      }
      done_in_run++;
    }
    if (!stop) {
      ri++;
      done_in_run = 0;
    }
  }
  cursor[0] = (uint32_t)ri;
  cursor[1] = (uint32_t)done_in_run;
  out[0] = (uint32_t)ne;
  out[1] = (uint32_t)pb;
  napi_value result;
  NAPI_TRY(env, napi_get_boolean(env, ri == run_count, &result));
  return result;
}

static napi_value scatter_io_error(napi_env env, const char *fn, uint64_t at) {
  char prefix[96];
  snprintf(prefix, sizeof prefix, "%s: write at offset %llu failed", fn, (unsigned long long)at);
  throw_errno(env, errno, prefix, NULL);
  return NULL;
}

/* regionScatter(region, entries, entryCount, payload) */
static napi_value RegionScatter(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionScatter";
  napi_value argv[4];
  region_t *r;
  uint32_t *entries;
  uint8_t *payload;
  size_t entries_len, payload_len;
  uint64_t entry_count;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!arg_region(env, argv[0], fn, false, &r)) return NULL;
  if (!arg_typed(env, argv[1], fn, "entries", napi_uint32_array, (void **)&entries,
                 &entries_len))
    return NULL;
  if (!arg_integer(env, argv[2], fn, "entryCount", 0, (double)(entries_len / 3), &entry_count))
    return NULL;
  if (!arg_typed(env, argv[3], fn, "payload", napi_uint8_array, (void **)&payload, &payload_len))
    return NULL;
  if (!r->writable) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: region is mapped read-only", fn);
    return NULL;
  }
  const size_t ps = r->page_size;

  /* Pass 1: validate everything before writing anything. */
  uint64_t data_pages = 0;
  for (size_t i = 0; i < entry_count; i++) {
    const uint32_t kind = entries[3 * i], first = entries[3 * i + 1], count = entries[3 * i + 2];
    if (kind != ENTRY_ZERO && kind != ENTRY_DATA) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: entry %zu has an unknown kind (%u)", fn, i, kind);
      return NULL;
    }
    if (count == 0) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: entry %zu has a zero page count", fn, i);
      return NULL;
    }
    if ((uint64_t)first + count > r->page_count) {
      throw_fmt(env, ERR_RANGE, NULL,
                "%s: entry %zu (pages %u..%llu) is outside the region of %u pages", fn, i, first,
                (unsigned long long)first + count - 1, r->page_count);
      return NULL;
    }
    if (kind == ENTRY_DATA) data_pages += count;
  }
  if (payload_len % ps != 0 || payload_len / ps != data_pages) {
    throw_fmt(env, ERR_RANGE, NULL,
              "%s: payload is %zu bytes but the entries' %llu data pages need exactly %llu", fn,
              payload_len, (unsigned long long)data_pages,
              (unsigned long long)(data_pages * ps));
    return NULL;
  }

  /*
   * Pass 2: apply. Entries are re-read, so bounds are checked again: memory safety must
   * not depend on the arrays staying unchanged (they could be shared memory).
   */
  size_t off = 0;
  for (size_t i = 0; i < entry_count; i++) {
    const uint32_t kind = entries[3 * i], first = entries[3 * i + 1], count = entries[3 * i + 2];
    if ((uint64_t)first + count > r->page_count ||
        (kind == ENTRY_DATA && (uint64_t)count * ps > payload_len - off)) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: entries changed while being applied", fn);
      return NULL;
    }
    const uint64_t dst = (uint64_t)first * ps;
    if (kind == ENTRY_ZERO) {
      /* Zero only the pages not known to be zero, a contiguous stretch at a time. */
      uint32_t p = 0;
      while (p < count) {
        while (r->track && p < count && memcmp(&r->hashes[first + p], &r->zero_hash, 16) == 0) p++;
        const uint32_t from = p;
        while (p < count && (!r->track || memcmp(&r->hashes[first + p], &r->zero_hash, 16) != 0)) {
          if (r->track) r->hashes[first + p] = r->zero_hash;
          p++;
        }
        for (uint64_t at = dst + (uint64_t)from * ps, end = dst + (uint64_t)p * ps; at < end;) {
          const size_t n = end - at < sizeof ZERO_CHUNK ? (size_t)(end - at) : sizeof ZERO_CHUNK;
          if (!pwrite_all(r->fd, ZERO_CHUNK, n, at)) return scatter_io_error(env, fn, at);
          at += n;
        }
      }
    } else if (kind == ENTRY_DATA) {
      const uint8_t *src = payload + off;
      if (r->track) {
        for (uint32_t p = 0; p < count; p++) page_hash(&r->hashes[first + p], src + (size_t)p * ps, ps);
      }
      if (!pwrite_all(r->fd, src, (size_t)count * ps, dst)) return scatter_io_error(env, fn, dst);
      off += (size_t)count * ps;
    }
    /* Any other kind can only appear if the array changed under us: ignored. */
  }
  return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* regionCopyPages / regionFingerprints                                                 */
/* ------------------------------------------------------------------------------------ */

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
static napi_value RegionCopyPages(napi_env env, napi_callback_info info) {
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
static napi_value RegionFingerprints(napi_env env, napi_callback_info info) {
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

/* ------------------------------------------------------------------------------------ */
/* regionDigest: thread-pool work                                                       */
/* ------------------------------------------------------------------------------------ */

enum { DIGEST_FULL = 1, DIGEST_TRACKED = 2 };

typedef struct {
  region_t *region;
  napi_ref handle_ref; /* keeps the handle (and so the region) alive while in flight */
  napi_deferred deferred;
  napi_async_work work;
  int mode;
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
 * A full digest of a mapped region on several threads: each fingerprints a slice of the
 * pages into one array, then the array is hashed. The value is the same as one thread's
 * (XXH3-128 over the fingerprints in page order). Reading memory is what costs: one core
 * took 57 ms for 1 GiB here, inside a pre-copy switchover's downtime.
 */
typedef struct {
  const region_t *region;
  uint32_t first, count;
  XXH128_canonical_t *out;
} digest_slice_t;

#ifdef GANGWAY_HAVE_AVX2_HASH
void gangway_page_fps_avx2(const uint8_t *base, size_t page_size, uint32_t first, uint32_t count, void *out);
#endif

static void *digest_slice(void *arg) {
  const digest_slice_t *slice = arg;
  const region_t *r = slice->region;
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

static bool digest_parallel(const region_t *r, XXH128_canonical_t *result) {
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  uint32_t parts = r->page_count / DIGEST_MIN_PAGES_PER_THREAD;
  if (cpus > 0 && parts > (uint32_t)cpus) parts = (uint32_t)cpus;
  if (parts > DIGEST_MAX_THREADS) parts = DIGEST_MAX_THREADS;
  if (!r->addr || parts < 2) return false;
  XXH128_canonical_t *fps = malloc((size_t)r->page_count * sizeof *fps);
  if (!fps) return false;
  digest_slice_t slices[DIGEST_MAX_THREADS];
  pthread_t threads[DIGEST_MAX_THREADS];
  bool started[DIGEST_MAX_THREADS] = {false};
  const uint32_t per = (r->page_count + parts - 1) / parts;
  for (uint32_t k = 0; k < parts; k++) {
    const uint32_t first = k * per;
    slices[k] = (digest_slice_t){.region = r, .first = first, .count = first >= r->page_count ? 0 : (r->page_count - first < per ? r->page_count - first : per), .out = fps};
  }
  /* Slices 1.. on threads of their own, slice 0 here; a thread that cannot start runs here too. */
  for (uint32_t k = 1; k < parts; k++) started[k] = pthread_create(&threads[k], NULL, digest_slice, &slices[k]) == 0;
  digest_slice(&slices[0]);
  for (uint32_t k = 1; k < parts; k++) {
    if (started[k]) pthread_join(threads[k], NULL);
    else digest_slice(&slices[k]);
  }
  XXH128_canonicalFromHash(result, XXH3_128bits(fps, (size_t)r->page_count * sizeof *fps));
  free(fps);
  return true;
}

static void digest_execute(napi_env env, void *data) {
  digest_job_t *job = data;
  const region_t *r = job->region;
  if (job->mode == DIGEST_FULL && digest_parallel(r, &job->result)) return;
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
  r->busy--;
  if (r->busy == 0) {
    if (r->finalized) {
      region_release(r);
      free(r);
    } else if (r->closed) {
      region_release(r); /* the deferred munmap of a regionClose during the digest */
    }
  }
  napi_delete_reference(env, job->handle_ref);
  napi_delete_async_work(env, job->work);
  free(job);
}

/* Rejects `deferred` with the pending exception (validation errors reject, not throw). */
static napi_value reject_pending(napi_env env, napi_deferred deferred, napi_value promise) {
  napi_value err;
  if (napi_get_and_clear_last_exception(env, &err) != napi_ok) return NULL;
  napi_reject_deferred(env, deferred, err);
  return promise;
}

/* regionDigest(region, mode) -> Promise<Buffer> */
static napi_value RegionDigest(napi_env env, napi_callback_info info) {
  static const char fn[] = "regionDigest";
  napi_value argv[2], promise;
  napi_deferred deferred;
  region_t *r;
  if (!get_args(env, info, 2, argv)) return NULL;
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
  digest_job_t *job = calloc(1, sizeof *job);
  if (!job) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return reject_pending(env, deferred, promise);
  }
  job->region = r;
  job->deferred = deferred;
  job->mode = mode;
  napi_value name;
  if (napi_create_reference(env, argv[0], 1, &job->handle_ref) != napi_ok) {
    free(job);
    throw_napi(env, "napi_create_reference");
    return reject_pending(env, deferred, promise);
  }
  if (napi_create_string_utf8(env, "gangway.regionDigest", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, digest_execute, digest_complete, job, &job->work) !=
          napi_ok) {
    napi_delete_reference(env, job->handle_ref);
    free(job);
    throw_napi(env, "napi_create_async_work");
    return reject_pending(env, deferred, promise);
  }
  if (napi_queue_async_work(env, job->work) != napi_ok) {
    napi_delete_async_work(env, job->work);
    napi_delete_reference(env, job->handle_ref);
    free(job);
    throw_napi(env, "napi_queue_async_work");
    return reject_pending(env, deferred, promise);
  }
  r->busy++;
  return promise;
}

/* hash128(data) -> Buffer(16) */
static napi_value Hash128(napi_env env, napi_callback_info info) {
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

/* ------------------------------------------------------------------------------------ */
/* pagemapScan                                                                          */
/* ------------------------------------------------------------------------------------ */

typedef struct {
  uint32_t *pairs;
  size_t n, cap; /* in pairs */
  uint64_t last_end; /* page index after the last pair */
} pair_list_t;

static bool pairs_add(pair_list_t *l, uint64_t first, uint64_t end) {
  if (l->n > 0 && first <= l->last_end) { /* adjacent or overlapping (page > 4 KiB) */
    if (end > l->last_end) {
      l->pairs[2 * l->n - 1] += (uint32_t)(end - l->last_end);
      l->last_end = end;
    }
    return true;
  }
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
static napi_value PagemapScan(napi_env env, napi_callback_info info) {
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

/* ------------------------------------------------------------------------------------ */
/* Temporary files                                                                      */
/* ------------------------------------------------------------------------------------ */

/* tmpfileCreate(dir, lengthBytes, sparse?) -> fd */
static napi_value TmpfileCreate(napi_env env, napi_callback_info info) {
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

/*
 * sdNotify(socketPath, message): one datagram to systemd's NOTIFY_SOCKET (sd_notify(3)
 * without libsystemd). Node has no unix datagram sockets, hence this. A path starting with
 * '@' is in the abstract namespace.
 */
static napi_value SdNotify(napi_env env, napi_callback_info info) {
  static const char fn[] = "sdNotify";
  napi_value argv[2];
  char *path = NULL, *msg = NULL;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!arg_path(env, argv[0], fn, "socketPath", &path)) return NULL;
  if (!arg_path(env, argv[1], fn, "message", &msg)) {
    free(path);
    return NULL;
  }
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  const size_t plen = strlen(path);
  if (plen >= sizeof addr.sun_path) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: socketPath is longer than %zu bytes", fn, sizeof addr.sun_path - 1);
    free(path), free(msg);
    return NULL;
  }
  memcpy(addr.sun_path, path, plen);
  if (path[0] == '@') addr.sun_path[0] = '\0';
  const socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + (path[0] == '@' ? 0 : 1));
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    throw_errno(env, errno, "sdNotify: socket() failed", NULL);
    free(path), free(msg);
    return NULL;
  }
  ssize_t n = sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&addr, alen);
  int err = errno;
  close(fd);
  if (n < 0) {
    char prefix[PATH_MAX + 64];
    snprintf(prefix, sizeof prefix, "sdNotify: sendto '%s' failed", path);
    throw_errno(env, err, prefix, NULL);
  }
  free(path), free(msg);
  return NULL;
}

/* tmpfileLink(fd, path) */
static napi_value TmpfileLink(napi_env env, napi_callback_info info) {
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

/* ------------------------------------------------------------------------------------ */
/* Post-copy: userfaultfd of a destination guest                                        */
/* ------------------------------------------------------------------------------------ */
/*
 * The destination guest's tracking shim registers its memory mapping for MISSING faults
 * (and async write-protect) on a userfaultfd and sends the descriptor over a unix socket
 * the agent made (socketPair, then uffdReceive). The agent reads faults on a thread of its
 * own (uffdMonitor), which hands page numbers to JS, and installs pages with UFFDIO_COPY /
 * UFFDIO_ZEROPAGE (uffdInstall): atomic "fill if still missing", so a page that arrives
 * twice (a push racing a fault) never overwrites what the running guest wrote since.
 */

/* What the shim sends with each descriptor: struct gw_uffd_hello (gangway-abi.h). */
typedef struct gw_uffd_hello uffd_hello_t;
#define UFFD_HELLO_VERSION GW_UFFD_HELLO_VERSION

/*
 * uffdProbe() -> boolean: whether this process can open a userfaultfd with what post-copy
 * needs (missing faults on shared memory, async write-protect), as the guest's shim will.
 */
static napi_value UffdProbe(napi_env env, napi_callback_info info) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
      fd = ioctl(dev, _IO(0xAA, 0x00), O_CLOEXEC | O_NONBLOCK);
      close(dev);
    }
  }
  bool ok = false;
  if (fd >= 0) {
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
                                         UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
    ok = ioctl(fd, UFFDIO_API, &api) == 0;
    close(fd);
  }
  napi_value result;
  napi_get_boolean(env, ok, &result);
  return result;
}

/* socketPair() -> [agentFd, guestFd]: AF_UNIX SOCK_SEQPACKET, both close-on-exec. */
static napi_value SocketPair(napi_env env, napi_callback_info info) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    throw_errno(env, errno, "socketPair: socketpair() failed", NULL);
    return NULL;
  }
  napi_value result, a, b;
  if (napi_create_array_with_length(env, 2, &result) != napi_ok || napi_create_int32(env, sv[0], &a) != napi_ok ||
      napi_create_int32(env, sv[1], &b) != napi_ok || napi_set_element(env, result, 0, a) != napi_ok ||
      napi_set_element(env, result, 1, b) != napi_ok) {
    close(sv[0]), close(sv[1]);
    throw_napi(env, "socketPair");
    return NULL;
  }
  return result;
}

typedef struct {
  int fd;
  int timeout_ms;
  int err;             /* errno of the failed step, 0 on success */
  const char *problem; /* what went wrong, for the message */
  int uffd;
  uffd_hello_t hello;
  napi_deferred deferred;
  napi_async_work work;
} uffd_recv_job_t;

static void uffd_recv_execute(napi_env env, void *data) {
  uffd_recv_job_t *job = data;
  struct pollfd pfd = {.fd = job->fd, .events = POLLIN};
  int n;
  do n = poll(&pfd, 1, job->timeout_ms);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    job->err = errno, job->problem = "poll failed";
    return;
  }
  if (n == 0) {
    job->err = ETIMEDOUT, job->problem = "the guest sent no userfaultfd in time";
    return;
  }
  char control[CMSG_SPACE(sizeof(int) * 4)];
  struct iovec iov = {.iov_base = &job->hello, .iov_len = sizeof job->hello};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
  ssize_t got;
  do got = recvmsg(job->fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  while (got < 0 && errno == EINTR);
  if (got < 0) {
    job->err = errno, job->problem = "recvmsg failed";
    return;
  }
  /* Take every descriptor that came, so none leaks whatever else is wrong. */
  int fds[4], nfds = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k && nfds < 4; i++) memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
  }
  const char *problem = NULL;
  if (got == 0) problem = "the guest closed the socket without sending a userfaultfd (see its log)";
  else if ((size_t)got != sizeof job->hello || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
    problem = "the guest's message has the wrong size";
  else if (job->hello.version != UFFD_HELLO_VERSION) problem = "the guest's message has an unknown version";
  else if (nfds != 1) problem = "the guest's message does not carry exactly one descriptor";
  if (problem) {
    for (int i = 0; i < nfds; i++) close(fds[i]);
    job->err = EPROTO, job->problem = problem;
    return;
  }
  job->uffd = fds[0];
}

static void uffd_recv_complete(napi_env env, napi_status status, void *data) {
  uffd_recv_job_t *job = data;
  napi_value result = NULL;
  if (status == napi_ok && job->err == 0) {
    napi_value v;
    if (napi_create_object(env, &result) == napi_ok && napi_create_int32(env, job->uffd, &v) == napi_ok &&
        napi_set_named_property(env, result, "uffd", v) == napi_ok &&
        napi_create_double(env, (double)job->hello.start, &v) == napi_ok &&
        napi_set_named_property(env, result, "start", v) == napi_ok &&
        napi_create_double(env, (double)job->hello.length, &v) == napi_ok &&
        napi_set_named_property(env, result, "length", v) == napi_ok &&
        napi_create_uint32(env, job->hello.pid, &v) == napi_ok && napi_set_named_property(env, result, "pid", v) == napi_ok &&
        napi_create_uint32(env, job->hello.region, &v) == napi_ok &&
        napi_set_named_property(env, result, "region", v) == napi_ok) {
      napi_resolve_deferred(env, job->deferred, result);
    } else {
      close(job->uffd);
      result = NULL;
    }
  }
  if (!result) {
    char text[256];
    if (status != napi_ok) snprintf(text, sizeof text, "uffdReceive: cancelled");
    else snprintf(text, sizeof text, "uffdReceive: %s (%s)", job->problem ? job->problem : "failed", strerror(job->err));
    napi_value m, err, code;
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &m);
    napi_create_string_utf8(env, job->err == ETIMEDOUT ? "ETIMEDOUT" : "EUFFDRECV", NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, m, &err);
    napi_reject_deferred(env, job->deferred, err);
  }
  napi_delete_async_work(env, job->work);
  free(job);
}

/* uffdReceive(fd, timeoutMs) -> Promise<{ uffd, start, length, pid, region }> */
static napi_value UffdReceive(napi_env env, napi_callback_info info) {
  static const char fn[] = "uffdReceive";
  napi_value argv[2], promise, name;
  napi_deferred deferred;
  int fd;
  uint64_t timeout;
  if (!get_args(env, info, 2, argv)) return NULL;
  NAPI_TRY(env, napi_create_promise(env, &deferred, &promise));
  if (!arg_fd(env, argv[0], fn, "fd", &fd) || !arg_integer(env, argv[1], fn, "timeoutMs", 0, INT_MAX, &timeout))
    return reject_pending(env, deferred, promise);
  uffd_recv_job_t *job = calloc(1, sizeof *job);
  if (!job) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return reject_pending(env, deferred, promise);
  }
  job->fd = fd, job->timeout_ms = (int)timeout, job->deferred = deferred, job->uffd = -1;
  if (napi_create_string_utf8(env, "gangway.uffdReceive", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, uffd_recv_execute, uffd_recv_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    free(job);
    throw_napi(env, "napi_create_async_work");
    return reject_pending(env, deferred, promise);
  }
  return promise;
}

/* A fault monitor: a thread that reads the uffd and hands page numbers to JS. */
typedef struct {
  int uffd;
  int stop_fd; /* eventfd: written to stop the thread */
  uint64_t start;
  uint32_t page_size;
  uint32_t page_count;
  pthread_t thread;
  bool started;
  bool closed;
  napi_threadsafe_function tsfn;
} monitor_t;

typedef struct {
  uint32_t count; /* UINT32_MAX: the descriptor failed (the guest is gone) */
  uint32_t pages[];
} fault_batch_t;

static const napi_type_tag MONITOR_TAG = {0x67616e677761794dULL, 0x6f6e69746f724861ULL};
#define MONITOR_BATCH 64

static void *monitor_thread(void *arg) {
  monitor_t *m = arg;
  struct uffd_msg msgs[MONITOR_BATCH];
  for (;;) {
    struct pollfd pfd[2] = {{.fd = m->uffd, .events = POLLIN}, {.fd = m->stop_fd, .events = POLLIN}};
    int n = poll(pfd, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (pfd[1].revents & POLLIN)) break;
    if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
      fault_batch_t *b = malloc(sizeof *b);
      if (b) {
        b->count = UINT32_MAX;
        if (napi_call_threadsafe_function(m->tsfn, b, napi_tsfn_blocking) != napi_ok) free(b);
      }
      break;
    }
    if (!(pfd[0].revents & POLLIN)) continue;
    ssize_t got = read(m->uffd, msgs, sizeof msgs);
    if (got < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      break;
    }
    size_t k = (size_t)got / sizeof msgs[0];
    fault_batch_t *b = malloc(sizeof *b + k * sizeof(uint32_t));
    if (!b) continue; /* the fault is read again after nothing: it stays pending (see below) */
    b->count = 0;
    for (size_t i = 0; i < k; i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      uint64_t addr = msgs[i].arg.pagefault.address;
      if (addr < m->start) continue;
      uint64_t page = (addr - m->start) / m->page_size;
      if (page >= m->page_count) continue;
      b->pages[b->count++] = (uint32_t)page;
    }
    if (b->count == 0 || napi_call_threadsafe_function(m->tsfn, b, napi_tsfn_blocking) != napi_ok) free(b);
  }
  return NULL;
}

static void monitor_call_js(napi_env env, napi_value callback, void *context, void *data) {
  fault_batch_t *b = data;
  if (env && callback) {
    napi_value arg, undefined;
    if (b->count == UINT32_MAX) {
      napi_get_null(env, &arg);
    } else {
      napi_value ab;
      void *dst;
      if (napi_create_arraybuffer(env, (size_t)b->count * 4, &dst, &ab) != napi_ok ||
          napi_create_typedarray(env, napi_uint32_array, b->count, ab, 0, &arg) != napi_ok) {
        free(b);
        return;
      }
      memcpy(dst, b->pages, (size_t)b->count * 4);
    }
    napi_get_undefined(env, &undefined);
    napi_call_function(env, undefined, callback, 1, &arg, NULL);
  }
  free(b);
}

static void monitor_stop(monitor_t *m) {
  if (m->closed) return;
  m->closed = true;
  if (m->started) {
    uint64_t one = 1;
    ssize_t w = write(m->stop_fd, &one, sizeof one);
    (void)w;
    pthread_join(m->thread, NULL);
    napi_release_threadsafe_function(m->tsfn, napi_tsfn_release);
  }
  close(m->stop_fd);
}

static void monitor_finalize(napi_env env, void *data, void *hint) {
  monitor_t *m = data;
  monitor_stop(m);
  free(m);
}

/* uffdMonitor(uffd, start, pageSize, pageCount, onFaults) -> MonitorHandle */
static napi_value UffdMonitor(napi_env env, napi_callback_info info) {
  static const char fn[] = "uffdMonitor";
  napi_value argv[5], handle, name;
  int uffd;
  uint64_t start, page_count;
  uint32_t page_size;
  if (!get_args(env, info, 5, argv)) return NULL;
  if (!arg_fd(env, argv[0], fn, "uffd", &uffd) || !arg_integer(env, argv[1], fn, "start", 0, MAX_SAFE_INTEGER, &start) ||
      !arg_page_size(env, argv[2], fn, "pageSize", &page_size) ||
      !arg_integer(env, argv[3], fn, "pageCount", 1, UINT32_MAX, &page_count))
    return NULL;
  napi_valuetype t;
  if (napi_typeof(env, argv[4], &t) != napi_ok || t != napi_function) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: onFaults must be a function", fn);
    return NULL;
  }
  monitor_t *m = calloc(1, sizeof *m);
  if (!m) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return NULL;
  }
  m->uffd = uffd, m->start = start, m->page_size = page_size, m->page_count = (uint32_t)page_count;
  m->stop_fd = eventfd(0, EFD_CLOEXEC);
  if (m->stop_fd < 0) {
    free(m);
    throw_errno(env, errno, "uffdMonitor: eventfd() failed", NULL);
    return NULL;
  }
  if (napi_create_string_utf8(env, "gangway.uffdMonitor", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_threadsafe_function(env, argv[4], NULL, name, 0, 1, NULL, NULL, NULL, monitor_call_js, &m->tsfn) !=
          napi_ok) {
    close(m->stop_fd);
    free(m);
    throw_napi(env, "napi_create_threadsafe_function");
    return NULL;
  }
  int err = pthread_create(&m->thread, NULL, monitor_thread, m);
  if (err != 0) {
    napi_release_threadsafe_function(m->tsfn, napi_tsfn_abort);
    close(m->stop_fd);
    free(m);
    throw_errno(env, err, "uffdMonitor: pthread_create failed", NULL);
    return NULL;
  }
  m->started = true;
  if (napi_create_external(env, m, monitor_finalize, NULL, &handle) != napi_ok ||
      napi_type_tag_object(env, handle, &MONITOR_TAG) != napi_ok) {
    monitor_stop(m);
    free(m);
    throw_napi(env, "napi_create_external");
    return NULL;
  }
  return handle;
}

/* uffdMonitorClose(handle): stops the thread (faults still queued are delivered). Idempotent. */
static napi_value UffdMonitorClose(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  napi_valuetype t;
  bool tagged = false;
  void *data = NULL;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_external ||
      napi_check_object_type_tag(env, argv[0], &MONITOR_TAG, &tagged) != napi_ok || !tagged ||
      napi_get_value_external(env, argv[0], &data) != napi_ok || !data) {
    throw_fmt(env, ERR_TYPE, NULL, "uffdMonitorClose: handle must be a MonitorHandle returned by uffdMonitor");
    return NULL;
  }
  monitor_stop(data);
  return NULL;
}

/*
 * One UFFDIO_COPY (data != NULL) or UFFDIO_ZEROPAGE over pages [first, first + count):
 * pages already present are skipped (and their waiters woken). Returns false with errno
 * on any other failure; *installed / *present count pages.
 */
static bool uffd_fill(int uffd, uint64_t start, size_t ps, uint32_t first, uint32_t count, const uint8_t *data,
                      uint32_t *installed, uint32_t *present, uint8_t *done /* per page, may be NULL */) {
  uint32_t at = 0;
  while (at < count) {
    const uint64_t dst = start + (uint64_t)(first + at) * ps, len = (uint64_t)(count - at) * ps;
    int rc;
    int64_t moved;
    if (data) {
      struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)(data + (size_t)at * ps), .len = len, .mode = 0};
      rc = ioctl(uffd, UFFDIO_COPY, &c);
      moved = c.copy;
    } else {
      struct uffdio_zeropage z = {.range = {.start = dst, .len = len}, .mode = 0};
      rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
      moved = z.zeropage;
    }
    const int err = errno;
    const uint32_t pages = moved > 0 ? (uint32_t)((uint64_t)moved / ps) : 0;
    if (done) memset(done + at, 1, pages);
    *installed += pages;
    at += pages;
    if (rc == 0) {
      if (pages == 0) return errno = EIO, false; /* no progress and no error: never loop */
      continue;
    }
    if (err == EAGAIN || err == EINTR) continue;
    if (err != EEXIST) return errno = err, false;
    /* The page at `at` is there already: wake whoever faulted on it, and go on after it. */
    struct uffdio_range r = {.start = start + (uint64_t)(first + at) * ps, .len = ps};
    ioctl(uffd, UFFDIO_WAKE, &r);
    (*present)++;
    at++;
  }
  return true;
}

/*
 * uffdInstall(uffd, start, region, entries, entryCount, payload, out) -> void
 * Installs ENTRY_ZERO / ENTRY_DATA entries into the guest mapping at `start` (validated
 * like regionScatter, nothing installed on bad input); a tracking region gets the
 * fingerprint of every page installed. out[0] = pages installed, out[1] = pages that were
 * there already (left as they are).
 */
static napi_value UffdInstall(napi_env env, napi_callback_info info) {
  static const char fn[] = "uffdInstall";
  napi_value argv[7];
  int uffd;
  uint64_t start, entry_count;
  region_t *r;
  uint32_t *entries, *out;
  uint8_t *payload;
  size_t entries_len, payload_len, out_len;
  if (!get_args(env, info, 7, argv)) return NULL;
  if (!arg_fd(env, argv[0], fn, "uffd", &uffd) || !arg_integer(env, argv[1], fn, "start", 0, MAX_SAFE_INTEGER, &start) ||
      !arg_region(env, argv[2], fn, false, &r) ||
      !arg_typed(env, argv[3], fn, "entries", napi_uint32_array, (void **)&entries, &entries_len))
    return NULL;
  if (!arg_integer(env, argv[4], fn, "entryCount", 0, (double)(entries_len / 3), &entry_count) ||
      !arg_typed(env, argv[5], fn, "payload", napi_uint8_array, (void **)&payload, &payload_len) ||
      !arg_typed(env, argv[6], fn, "out", napi_uint32_array, (void **)&out, &out_len))
    return NULL;
  if (out_len < 2) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: out must hold 2 numbers", fn);
    return NULL;
  }
  const size_t ps = r->page_size;
  if (start % ps != 0) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: start must be page-aligned", fn);
    return NULL;
  }
  uint64_t data_pages = 0;
  for (size_t i = 0; i < entry_count; i++) {
    const uint32_t kind = entries[3 * i], first = entries[3 * i + 1], count = entries[3 * i + 2];
    if (kind != ENTRY_ZERO && kind != ENTRY_DATA) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: entry %zu has an unknown kind (%u)", fn, i, kind);
      return NULL;
    }
    if (count == 0 || (uint64_t)first + count > r->page_count) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: entry %zu (first %u, count %u) is empty or outside the region of %u pages",
                fn, i, first, count, r->page_count);
      return NULL;
    }
    if (kind == ENTRY_DATA) data_pages += count;
  }
  if (payload_len % ps != 0 || payload_len / ps != data_pages) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: payload is %zu bytes but the entries' %llu data pages need exactly %llu", fn,
              payload_len, (unsigned long long)data_pages, (unsigned long long)(data_pages * ps));
    return NULL;
  }
  uint32_t installed = 0, present = 0;
  size_t off = 0;
  uint8_t done_small[256];
  for (size_t i = 0; i < entry_count; i++) {
    const uint32_t kind = entries[3 * i], first = entries[3 * i + 1], count = entries[3 * i + 2];
    if ((uint64_t)first + count > r->page_count || (kind == ENTRY_DATA && (uint64_t)count * ps > payload_len - off)) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: entries changed while being applied", fn);
      return NULL;
    }
    const uint8_t *src = kind == ENTRY_DATA ? payload + off : NULL;
    uint8_t *done = r->track ? (count <= sizeof done_small ? done_small : calloc(count, 1)) : NULL;
    if (r->track && !done) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
      return NULL;
    }
    if (done) memset(done, 0, count);
    bool ok = uffd_fill(uffd, start, ps, first, count, src, &installed, &present, done);
    const int err = errno;
    if (done) {
      for (uint32_t p = 0; p < count; p++) {
        if (!done[p]) continue;
        if (src) page_hash(&r->hashes[first + p], src + (size_t)p * ps, ps);
        else r->hashes[first + p] = r->zero_hash;
      }
      if (done != done_small) free(done);
    }
    if (!ok) {
      out[0] = installed, out[1] = present;
      char prefix[128];
      snprintf(prefix, sizeof prefix, "%s: %s of pages %u..%u failed", fn, src ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE", first,
               first + count - 1);
      throw_errno(env, err, prefix, err == ESRCH || err == ENOENT ? "the guest is gone" : NULL);
      return NULL;
    }
    if (kind == ENTRY_DATA) off += (size_t)count * ps;
  }
  out[0] = installed, out[1] = present;
  return NULL;
}

/* uffdWake(uffd, start, pageSize, firstPage, count): wakes threads waiting on those pages. */
static napi_value UffdWake(napi_env env, napi_callback_info info) {
  static const char fn[] = "uffdWake";
  napi_value argv[5];
  int uffd;
  uint64_t start, first, count;
  uint32_t ps;
  if (!get_args(env, info, 5, argv)) return NULL;
  if (!arg_fd(env, argv[0], fn, "uffd", &uffd) || !arg_integer(env, argv[1], fn, "start", 0, MAX_SAFE_INTEGER, &start) ||
      !arg_page_size(env, argv[2], fn, "pageSize", &ps) ||
      !arg_integer(env, argv[3], fn, "firstPage", 0, UINT32_MAX, &first) ||
      !arg_integer(env, argv[4], fn, "count", 1, UINT32_MAX, &count))
    return NULL;
  struct uffdio_range range = {.start = start + first * ps, .len = count * ps};
  if (ioctl(uffd, UFFDIO_WAKE, &range) != 0) throw_errno(env, errno, "uffdWake: UFFDIO_WAKE failed", NULL);
  return NULL;
}

/* punchHoles(fd, runs, pageSize): the pages of `runs` ([first, count] pairs) become holes. */
static napi_value PunchHoles(napi_env env, napi_callback_info info) {
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

/* ------------------------------------------------------------------------------------ */
/* Module                                                                               */
/* ------------------------------------------------------------------------------------ */

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  const napi_property_descriptor props[] = {
      {"regionMap", NULL, RegionMap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionClose", NULL, RegionClose, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionGather", NULL, RegionGather, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionScatter", NULL, RegionScatter, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionCopyPages", NULL, RegionCopyPages, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionFingerprints", NULL, RegionFingerprints, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionDigest", NULL, RegionDigest, NULL, NULL, NULL, napi_enumerable, NULL},
      {"hash128", NULL, Hash128, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pagemapScan", NULL, PagemapScan, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tmpfileCreate", NULL, TmpfileCreate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tmpfileLink", NULL, TmpfileLink, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sdNotify", NULL, SdNotify, NULL, NULL, NULL, napi_enumerable, NULL},
      {"socketPair", NULL, SocketPair, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdProbe", NULL, UffdProbe, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdReceive", NULL, UffdReceive, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdMonitor", NULL, UffdMonitor, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdMonitorClose", NULL, UffdMonitorClose, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdInstall", NULL, UffdInstall, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uffdWake", NULL, UffdWake, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHoles", NULL, PunchHoles, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok)
    return NULL;
  return exports;
}
