/*
 * regionMap / regionClose, and what the other files need to read and write a region
 * (region.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "napi-util.h"
#include "region.h"
#include "exports.h"

static const napi_type_tag REGION_TAG = {0x67616e6777617952ULL, 0x6567696f6e48616eULL};

const uint8_t ZERO_CHUNK[64 * 1024];

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

/*
 * Mappings at least this long are unmapped on a thread of their own: tearing down a fully
 * faulted 256 MiB mapping took 47-62 ms here, on the JS thread the source's migration ends on.
 */
#define UNMAP_LATER_BYTES ((size_t)64 << 20)

typedef struct {
  void *addr;
  size_t length;
} unmap_job_t;

static void *unmap_thread(void *arg) {
  unmap_job_t *job = arg;
  munmap(job->addr, job->length);
  free(job);
  return NULL;
}

/* munmap, now for a small mapping, on a detached thread for a large one (now if none starts). */
static void unmap_later(void *addr, size_t length) {
  unmap_job_t *job = length >= UNMAP_LATER_BYTES ? malloc(sizeof *job) : NULL;
  if (job) {
    job->addr = addr;
    job->length = length;
    pthread_attr_t attr;
    pthread_t thread;
    bool started = false;
    if (pthread_attr_init(&attr) == 0) {
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      started = pthread_create(&thread, &attr, unmap_thread, job) == 0;
      pthread_attr_destroy(&attr);
    }
    if (started) return;
    free(job);
  }
  munmap(addr, length);
}

/*
 * Unmaps and frees the fingerprints; only when no digest is in flight. The region is done
 * with from here (addr is NULL), though a large mapping may take a moment more to go.
 */
void region_release(region_t *r) {
  if (r->unmapped) return;
  if (r->addr) unmap_later(r->addr, r->length);
  if (r->fd >= 0) close(r->fd);
  r->fd = -1;
  if (r->hashes_mapped) munmap(r->hashes, (size_t)r->page_count * sizeof(XXH128_canonical_t));
  else free(r->hashes);
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
bool arg_region_named(napi_env env, napi_value v, const char *fn, const char *name,
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

bool arg_region(napi_env env, napi_value v, const char *fn, bool allow_closed,
                region_t **out) {
  return arg_region_named(env, v, fn, "region", allow_closed, out);
}

/* Whole-buffer positioned I/O: false with errno set on failure (EIO for a short file). */
bool pwrite_all(int fd, const uint8_t *buf, size_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pwrite(fd, buf, len, (off_t)off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    buf += n, len -= (size_t)n, off += (uint64_t)n;
  }
  return true;
}

bool pread_all(int fd, uint8_t *buf, size_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pread(fd, buf, len, (off_t)off);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) errno = EIO;
    if (n <= 0) return false;
    buf += n, len -= (size_t)n, off += (uint64_t)n;
  }
  return true;
}

napi_value scatter_io_error(napi_env env, const char *fn, uint64_t at) {
  char prefix[96];
  snprintf(prefix, sizeof prefix, "%s: write at offset %llu failed", fn, (unsigned long long)at);
  throw_errno(env, errno, prefix, NULL);
  return NULL;
}

/*
 * Calls emit(ctx, page, bytes) for pages [first, first + count) of the region in order
 * (the caller checks the bounds), from the mapping or, for a writable region, through
 * 1 MiB preads. False with errno set if a read fails.
 */
bool region_each_page_in(const region_t *r, uint32_t first, uint32_t count,
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

bool region_each_page(const region_t *r, void (*emit)(void *, uint32_t, const uint8_t *),
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

/* Frees or unmaps the fingerprints of a region regionMap is giving up on. */
static void drop_hashes(region_t *r) {
  if (r->hashes_mapped) munmap(r->hashes, (size_t)r->page_count * sizeof(XXH128_canonical_t));
  else free(r->hashes);
  r->hashes = NULL;
}

/*
 * The fingerprint table in the file `fp_fd` (MAP_SHARED): it outlives this process in the
 * file's page cache, so an agent restarted during post-copy finds the fingerprints of the
 * pages as they arrived. NULL with errno on failure (EINVAL: the file is too short).
 */
static XXH128_canonical_t *map_hashes(int fp_fd, uint32_t page_count) {
  const size_t bytes = (size_t)page_count * sizeof(XXH128_canonical_t);
  struct stat st;
  if (fstat(fp_fd, &st) != 0) return NULL;
  if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < bytes) return errno = EINVAL, NULL;
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fp_fd, 0);
  return p == MAP_FAILED ? NULL : p;
}

/* regionMap(fd, lengthBytes, pageSizeBytes, { writable, trackHashes, initiallyZero, zeroHoles?, fingerprintsFd?, keepFingerprints? }) */
napi_value RegionMap(napi_env env, napi_callback_info info) {
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
  bool zero_holes = false;
  {
    napi_value pv;
    NAPI_TRY(env, napi_get_named_property(env, argv[3], "zeroHoles", &pv));
    if (!arg_is_absent(env, pv) && !arg_bool(env, pv, fn, "options.zeroHoles", &zero_holes)) return NULL;
    if (zero_holes && !writable) {
      throw_fmt(env, ERR_TYPE, NULL, "%s: options.zeroHoles is for a writable region", fn);
      return NULL;
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

  int fp_fd = -1;
  bool keep_fingerprints = false;
  {
    napi_value pv;
    NAPI_TRY(env, napi_get_named_property(env, argv[3], "fingerprintsFd", &pv));
    if (!arg_is_absent(env, pv) && !arg_fd(env, pv, fn, "options.fingerprintsFd", &fp_fd)) return NULL;
    NAPI_TRY(env, napi_get_named_property(env, argv[3], "keepFingerprints", &pv));
    if (!arg_is_absent(env, pv) && !arg_bool(env, pv, fn, "options.keepFingerprints", &keep_fingerprints)) return NULL;
    if (fp_fd >= 0 && !track) {
      throw_fmt(env, ERR_TYPE, NULL, "%s: options.fingerprintsFd is for a region with trackHashes", fn);
      return NULL;
    }
    if (keep_fingerprints && (fp_fd < 0 || initially_zero)) {
      throw_fmt(env, ERR_TYPE, NULL, "%s: options.keepFingerprints needs options.fingerprintsFd, and not initiallyZero", fn);
      return NULL;
    }
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
  r->zero_holes = zero_holes;
  r->dev = st.st_dev;
  r->ino = st.st_ino;
  r->zero_hash = zero_page_hash(page_size);
  if (track && fp_fd >= 0) {
    r->hashes = map_hashes(fp_fd, r->page_count);
    if (!r->hashes) {
      int err = errno;
      free(r);
      char prefix[128];
      snprintf(prefix, sizeof prefix, "%s: cannot map %u page fingerprints from fd %d", fn, (unsigned)(length / page_size), fp_fd);
      throw_errno(env, err, prefix, err == EINVAL ? "the fingerprints file must be a regular file of 16 bytes per page" : NULL);
      return NULL;
    }
    r->hashes_mapped = true;
  } else if (track) {
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
      drop_hashes(r);
      free(r);
      throw_fmt(env, ERR_ERROR, "EACCES", "%s: fd %d is not open for writing, and the region is writable", fn, fd);
      return NULL;
    }
    r->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (r->fd < 0) {
      int err = errno;
      drop_hashes(r);
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
    drop_hashes(r);
    free(r);
    char prefix[160];
    snprintf(prefix, sizeof prefix, "%s: mmap of %llu bytes of fd %d (%s) failed", fn,
             (unsigned long long)length, fd, writable ? "read-write" : "read-only");
    throw_errno(env, err, prefix, NULL);
    return NULL;
  }
  r->addr = addr;
  if (track && !keep_fingerprints) {
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

void region_unbusy(region_t *r) {
  r->busy--;
  if (r->busy > 0) return;
  if (r->finalized) {
    region_release(r);
    free(r);
  } else if (r->closed) {
    region_release(r); /* the deferred munmap of a regionClose while it was busy */
  }
}

/* regionClose(region): idempotent. */
napi_value RegionClose(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  region_t *r;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (!arg_region(env, argv[0], "regionClose", true, &r)) return NULL;
  r->closed = true;
  if (r->busy == 0) region_release(r);
  /* else: the last pending digest releases the mapping when it completes. */
  return NULL;
}
