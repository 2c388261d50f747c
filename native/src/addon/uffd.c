/*
 * Post-copy: userfaultfd of a destination guest.
 *
 * The destination guest's tracking shim registers its memory mapping for MISSING faults
 * (and async write-protect) on a userfaultfd and sends the descriptor over a unix socket
 * the agent made (socketPair, then uffdReceive). The agent reads faults on a thread of its
 * own (uffdMonitor), which hands page numbers to JS, and installs pages with UFFDIO_COPY /
 * UFFDIO_ZEROPAGE (uffdInstall): atomic "fill if still missing", so a page that arrives
 * twice (a push racing a fault) never overwrites what the running guest wrote since.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "gangway-abi.h"
#include "napi-util.h"
#include "region.h"
#include "uapi-compat.h"
#include "exports.h"
/* What the shim sends with each descriptor: struct gw_uffd_hello (gangway-abi.h). */
typedef struct gw_uffd_hello uffd_hello_t;
#define UFFD_HELLO_VERSION GW_UFFD_HELLO_VERSION

/*
 * uffdProbe() -> boolean: whether this process can open a userfaultfd with what post-copy
 * needs (missing faults on shared memory, async write-protect), as the guest's shim will.
 */
napi_value UffdProbe(napi_env env, napi_callback_info info) {
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
napi_value SocketPair(napi_env env, napi_callback_info info) {
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
napi_value UffdReceive(napi_env env, napi_callback_info info) {
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
napi_value UffdMonitor(napi_env env, napi_callback_info info) {
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
napi_value UffdMonitorClose(napi_env env, napi_callback_info info) {
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
napi_value UffdInstall(napi_env env, napi_callback_info info) {
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
  for (size_t i = 0; i < entry_count; i++) {
    const uint32_t kind = entries[3 * i], first = entries[3 * i + 1], count = entries[3 * i + 2];
    if ((uint64_t)first + count > r->page_count || (kind == ENTRY_DATA && (uint64_t)count * ps > payload_len - off)) {
      throw_fmt(env, ERR_ERROR, NULL, "%s: entries changed while being applied", fn);
      return NULL;
    }
    const uint8_t *src = kind == ENTRY_DATA ? payload + off : NULL;
    /*
     * Fingerprints first, then the pages: an agent killed between the two (its fingerprints
     * in a file, options.fingerprintsFd) leaves a fingerprint whose page is still a hole,
     * fetched again after its restart with the same content (the source's copy is paused),
     * never a page present with the fingerprint of what was there before. A page that turns
     * out present already got the same content's fingerprint when it was installed.
     */
    if (r->track) {
      for (uint32_t p = 0; p < count; p++) {
        if (src) page_hash(&r->hashes[first + p], src + (size_t)p * ps, ps);
        else r->hashes[first + p] = r->zero_hash;
      }
    }
    bool ok = uffd_fill(uffd, start, ps, first, count, src, &installed, &present, NULL);
    const int err = errno;
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
napi_value UffdWake(napi_env env, napi_callback_info info) {
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
