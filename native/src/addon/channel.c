/*
 * Channels: the bulk page stream of a pre-copy migration off the JS thread. A channel is
 * one TCP connection between two agents with a thread at each end: the source's writes
 * pages straight from the guest's mapping (zero pages as entries), the destination's reads
 * them and writes them into the guest's regions (fingerprinted as regionScatter does). With mutual
 * TLS the thread runs the TLS session itself, through the OpenSSL that Node exports: the
 * stream then costs no JS, no WebSocket framing and none of the copies Node's TLS stack makes.
 *
 * The connection comes from JS (a net.Socket's descriptor, duplicated here; JS then closes its
 * own). On it, in order:
 *   source -> destination  CHANNEL_PREAMBLE, plain, so that the destination's peer port can
 *                          tell a channel from a TLS or HTTP client by peeking at it;
 *   both                   the TLS handshake (TLS 1.3, both certificates checked against the
 *                          CA here; which peer it is, JS checks from the DER it gets);
 *   source -> destination  HELLO: the migration's id and the secret its accept handed out;
 *   destination -> source  ATTACHED, once JS found the migration and gave its regions.
 * Then messages, each a header of five little-endian u32 [kind, a, b, c, d]:
 *   DATA    [1, region, round, entryCount, payloadBytes] + entries (u32 triples) + payload
 *   BARRIER [2, round]  the destination answers ACK once everything before it is written
 *   ACK     [3, round, pagesLo, pagesHi]  pages written on this channel so far
 *   BYE     [4]         the source is done: the destination's thread ends
 *
 * Order: within a round every page is in one DATA message only, so channels may apply a
 * round in any order; a round's pages must be written before the next round's, which is
 * what BARRIER gives the source (agent/peer/channel.ts waits for every channel's ACK).
 *
 * Threading: JS calls (channelOpen, Attach, Send, Barrier, Bye, Close) run on the JS thread
 * and hand work over under the channel's mutex; the thread reports through a thread-safe
 * function (events below). Regions a channel uses are held busy (region.h) from the call that
 * hands them over until the event that gives them back, on the JS thread both.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <limits.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "exports.h"
#include "napi-util.h"
#include "region.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "channel messages are little-endian u32s, written as they are in memory"
#endif

static const napi_type_tag CHANNEL_TAG = {0x67616e6777617943ULL, 0x68616e6e656c4821ULL};

#define CHANNEL_PREAMBLE "GWCHAN1\n"
#define PREAMBLE_BYTES 8
#define SECRET_BYTES 32
#define MAX_ID_BYTES 128
/* A DATA message: at most this many entries and payload bytes (the destination refuses more). */
#define MAX_ENTRIES 4096u
#define MAX_PAYLOAD (4u << 20)
#define BATCH_BYTES (1u << 20)
/* TLS: bytes written or read ahead per system call, at most. */
#define IO_BUFFER_BYTES (256u << 10)
/* Until ATTACHED, a peer that stalls is dropped after this long. */
#define SETUP_TIMEOUT_S 15

enum { MSG_DATA = 1, MSG_BARRIER = 2, MSG_ACK = 3, MSG_BYE = 4, MSG_HELLO = 5, MSG_ATTACHED = 6 };
enum { JOB_NONE, JOB_SEND, JOB_BARRIER, JOB_BYE };
enum { EV_READY, EV_HELLO, EV_SENT, EV_BARRIER, EV_ERROR, EV_CLOSED };

typedef struct channel {
  bool source;
  int fd; /* -1 once the thread closed it (under mu) */
  SSL_CTX *ctx;
  SSL *ssl;
  pthread_t thread;
  bool started;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  napi_threadsafe_function tsfn;
  napi_ref self; /* the JS handle, kept while the thread runs */
  bool stop;     /* channelClose: the thread ends at its next step */
  /* source: the hello */
  char migration_id[MAX_ID_BYTES + 1];
  uint8_t secret[SECRET_BYTES];
  /* source: the job in hand (JOB_NONE when idle) */
  int job;
  region_t *job_region;
  uint32_t job_index, job_round;
  uint32_t *job_runs;
  size_t job_run_count;
  /* with fingerprints: the job's pages are copied, and each one's fingerprint kept here, in
   * the runs' page order (job_pages of them), for the 'sent' event */
  uint8_t *job_fps;
  uint64_t job_pages;
  uint8_t *payload;      /* the copies of a message's data pages (BATCH_BYTES), made once needed */
  uint8_t *payload_fps;  /* their fingerprints, 16 bytes per page of payload */
  /* destination: the regions JS attached (NULL before) */
  bool attached;
  region_t **regions;
  uint32_t region_count;
  uint64_t pages_applied;
  /* the source's header and entries of a message; the destination's payload of one */
  uint8_t *buf;
  uint32_t *entries;
  struct iovec *iov; /* source: a message's header and data entries */
} channel_t;

typedef struct {
  int kind;
  uint64_t n[6];
  char *text;
  uint8_t *der;
  size_t der_len;
  uint8_t *fps; /* EV_SENT with fingerprints: 16 bytes per page sent */
  size_t fps_len;
  uint8_t secret[SECRET_BYTES];
} event_t;

static void event_free(event_t *ev) {
  free(ev->text);
  free(ev->der);
  free(ev->fps);
  free(ev);
}

#define HEAD_BYTES 20u

/* ------------------------------------------------------------------------------------ */
/* Events, on the JS thread                                                             */
/* ------------------------------------------------------------------------------------ */

static void channel_free(channel_t *ch) {
  pthread_mutex_destroy(&ch->mu);
  pthread_cond_destroy(&ch->cv);
  free(ch->buf);
  free(ch->entries);
  free(ch->iov);
  free(ch->job_runs);
  free(ch->job_fps);
  free(ch->payload);
  free(ch->payload_fps);
  free(ch->regions);
  free(ch);
}

static napi_value num(napi_env env, double v) {
  napi_value out;
  napi_create_double(env, v, &out);
  return out;
}

static napi_value bytes(napi_env env, const uint8_t *data, size_t len) {
  napi_value out;
  void *to;
  if (napi_create_buffer_copy(env, len, data, &to, &out) != napi_ok) napi_get_undefined(env, &out);
  return out;
}

static void set(napi_env env, napi_value obj, const char *key, napi_value v) {
  napi_set_named_property(env, obj, key, v);
}

static void call_js(napi_env env, napi_value js_cb, void *context, void *data) {
  channel_t *ch = context;
  event_t *ev = data;
  if (env == NULL) { /* the environment is going away */
    event_free(ev);
    return;
  }
  static const char *names[] = {"ready", "hello", "sent", "barrier", "error", "closed"};
  napi_value obj, name, undef, argv[2];
  napi_create_object(env, &obj);
  napi_create_string_utf8(env, names[ev->kind], NAPI_AUTO_LENGTH, &name);
  napi_get_undefined(env, &undef);
  switch (ev->kind) {
    case EV_READY:
      set(env, obj, "peerCertificate", ev->der ? bytes(env, ev->der, ev->der_len) : undef);
      break;
    case EV_HELLO: {
      napi_value id;
      napi_create_string_utf8(env, ev->text, NAPI_AUTO_LENGTH, &id);
      set(env, obj, "migrationId", id);
      set(env, obj, "secret", bytes(env, ev->secret, SECRET_BYTES));
      set(env, obj, "peerCertificate", ev->der ? bytes(env, ev->der, ev->der_len) : undef);
      break;
    }
    case EV_SENT:
      if (ch->job_region) {
        region_unbusy(ch->job_region);
        ch->job_region = NULL;
      }
      set(env, obj, "pages", num(env, (double)ev->n[0]));
      set(env, obj, "dataPages", num(env, (double)ev->n[1]));
      set(env, obj, "zeroPages", num(env, (double)ev->n[2]));
      set(env, obj, "rawBytes", num(env, (double)ev->n[3]));
      set(env, obj, "wireBytes", num(env, (double)ev->n[4]));
      set(env, obj, "batches", num(env, (double)ev->n[5]));
      if (ev->fps) set(env, obj, "fingerprints", bytes(env, ev->fps, ev->fps_len));
      break;
    case EV_BARRIER:
      set(env, obj, "round", num(env, (double)ev->n[0]));
      set(env, obj, "pages", num(env, (double)ev->n[1]));
      break;
    case EV_ERROR: {
      napi_value msg;
      napi_create_string_utf8(env, ev->text ? ev->text : "channel failed", NAPI_AUTO_LENGTH, &msg);
      set(env, obj, "message", msg);
      break;
    }
    case EV_CLOSED:
      /* The thread posts this last and ends right after. */
      pthread_join(ch->thread, NULL);
      ch->started = false;
      if (ch->job_region) {
        region_unbusy(ch->job_region);
        ch->job_region = NULL;
      }
      for (uint32_t i = 0; i < ch->region_count; i++) region_unbusy(ch->regions[i]);
      ch->region_count = 0;
      break;
  }
  argv[0] = name;
  argv[1] = obj;
  napi_value global;
  napi_get_global(env, &global);
  napi_call_function(env, global, js_cb, 2, argv, NULL);
  if (ev->kind == EV_CLOSED) {
    napi_release_threadsafe_function(ch->tsfn, napi_tsfn_release);
    napi_delete_reference(env, ch->self);
    ch->self = NULL;
  }
  event_free(ev);
}

static void post(channel_t *ch, event_t *ev) {
  if (napi_call_threadsafe_function(ch->tsfn, ev, napi_tsfn_blocking) != napi_ok) event_free(ev);
}

static event_t *event(int kind) {
  event_t *ev = calloc(1, sizeof *ev);
  if (ev) ev->kind = kind;
  return ev;
}

/* ------------------------------------------------------------------------------------ */
/* I/O, on the channel's thread                                                         */
/* ------------------------------------------------------------------------------------ */

static bool stopping(channel_t *ch) {
  pthread_mutex_lock(&ch->mu);
  const bool stop = ch->stop;
  pthread_mutex_unlock(&ch->mu);
  return stop;
}

static void ssl_reason(char *err, size_t len, const char *what) {
  unsigned long code = ERR_get_error();
  char reason[160] = "";
  if (code) ERR_error_string_n(code, reason, sizeof reason);
  ERR_clear_error();
  snprintf(err, len, "%s: %s", what, code ? reason : "the connection closed");
}

/*
 * Writes `n` buffers as one message: plain, with writev (IOV_MAX at a time, partial writes
 * resumed); under TLS, each through the write buffer, flushed once at the end.
 */
static bool io_writev(channel_t *ch, struct iovec *iov, size_t n, char *err, size_t err_len) {
  if (ch->ssl) {
    for (size_t i = 0; i < n; i++) {
      const uint8_t *p = iov[i].iov_base;
      size_t len = iov[i].iov_len;
      while (len > 0) {
        size_t done = 0;
        if (SSL_write_ex(ch->ssl, p, len, &done) <= 0) {
          ssl_reason(err, err_len, "TLS write");
          return false;
        }
        p += done;
        len -= done;
      }
    }
    if (BIO_flush(SSL_get_wbio(ch->ssl)) != 1) {
      ssl_reason(err, err_len, "TLS write");
      return false;
    }
    return true;
  }
  while (n > 0) {
    const ssize_t wrote = writev(ch->fd, iov, n > IOV_MAX ? IOV_MAX : (int)n);
    if (wrote < 0) {
      if (errno == EINTR) continue;
      snprintf(err, err_len, "write: %s", strerror(errno));
      return false;
    }
    size_t left = (size_t)wrote;
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (uint8_t *)iov->iov_base + left;
      iov->iov_len -= left;
    }
  }
  return true;
}

/* Writes one buffer as one message (io_writev). */
static bool io_write(channel_t *ch, const void *data, size_t len, char *err, size_t err_len) {
  struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
  return io_writev(ch, &iov, 1, err, err_len);
}

static bool io_read(channel_t *ch, void *data, size_t len, char *err, size_t err_len) {
  uint8_t *p = data;
  while (len > 0) {
    if (ch->ssl) {
      size_t n = 0;
      if (SSL_read_ex(ch->ssl, p, len, &n) <= 0) {
        const int why = SSL_get_error(ch->ssl, 0);
        if (why == SSL_ERROR_ZERO_RETURN) {
          snprintf(err, err_len, "the peer closed the channel");
          ERR_clear_error();
        } else if (why == SSL_ERROR_SYSCALL && errno == EAGAIN) {
          snprintf(err, err_len, "the peer sent nothing for %d s", SETUP_TIMEOUT_S);
          ERR_clear_error();
        } else {
          ssl_reason(err, err_len, "TLS read");
        }
        return false;
      }
      p += n;
      len -= n;
    } else {
      const ssize_t n = recv(ch->fd, p, len, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        if (n == 0) snprintf(err, err_len, "the peer closed the channel");
        else if (errno == EAGAIN) snprintf(err, err_len, "the peer sent nothing for %d s", SETUP_TIMEOUT_S);
        else snprintf(err, err_len, "read: %s", strerror(errno));
        return false;
      }
      p += n;
      len -= (size_t)n;
    }
  }
  return true;
}

static void set_timeouts(int fd, int seconds) {
  struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* The handshake, then the peer's certificate as DER (malloc'd) in *der. */
static bool handshake(channel_t *ch, uint8_t **der, size_t *der_len, char *err, size_t err_len) {
  ch->ssl = SSL_new(ch->ctx);
  if (!ch->ssl || SSL_set_fd(ch->ssl, ch->fd) != 1) {
    ssl_reason(err, err_len, "TLS setup");
    return false;
  }
  /*
   * Records are at most 16 KiB: written one at a time, a batch would cost 64 writes, and read
   * one at a time two reads each (header, body). Writes go through a buffer flushed once per
   * message (io_write), reads read ahead as much as the socket has, up to IO_BUFFER_BYTES.
   */
  BIO *sock = SSL_get_wbio(ch->ssl);
  BIO *buffered = BIO_new(BIO_f_buffer());
  if (!buffered || BIO_set_write_buffer_size(buffered, IO_BUFFER_BYTES) != 1 || BIO_up_ref(sock) != 1) {
    BIO_free(buffered);
    ssl_reason(err, err_len, "TLS setup");
    return false;
  }
  BIO_push(buffered, sock);
  SSL_set0_wbio(ch->ssl, buffered);
  SSL_set_read_ahead(ch->ssl, 1);
  if ((ch->source ? SSL_connect(ch->ssl) : SSL_accept(ch->ssl)) != 1) {
    const long verify = SSL_get_verify_result(ch->ssl);
    if (verify != X509_V_OK) {
      ERR_clear_error();
      snprintf(err, err_len, "TLS handshake: the peer's certificate: %s",
               X509_verify_cert_error_string(verify));
    } else {
      ssl_reason(err, err_len, "TLS handshake");
    }
    return false;
  }
  X509 *peer = SSL_get1_peer_certificate(ch->ssl);
  if (!peer) {
    snprintf(err, err_len, "TLS handshake: the peer sent no certificate");
    return false;
  }
  const int n = i2d_X509(peer, NULL);
  uint8_t *out = n > 0 ? malloc((size_t)n) : NULL, *p = out;
  if (out) i2d_X509(peer, &p);
  X509_free(peer);
  if (!out) {
    snprintf(err, err_len, "TLS handshake: cannot encode the peer's certificate");
    return false;
  }
  *der = out;
  *der_len = (size_t)n;
  return true;
}

/* ------------------------------------------------------------------------------------ */
/* The source's side                                                                    */
/* ------------------------------------------------------------------------------------ */

static bool source_setup(channel_t *ch, char *err, size_t err_len) {
  if (!io_write(ch, CHANNEL_PREAMBLE, PREAMBLE_BYTES, err, err_len)) return false;
  uint8_t *der = NULL;
  size_t der_len = 0;
  if (ch->ctx && !handshake(ch, &der, &der_len, err, err_len)) return false;
  const size_t id_len = strlen(ch->migration_id);
  uint8_t hello[HEAD_BYTES + MAX_ID_BYTES + SECRET_BYTES];
  const uint32_t head[5] = {MSG_HELLO, (uint32_t)id_len, 0, 0, 0};
  memcpy(hello, head, HEAD_BYTES);
  memcpy(hello + HEAD_BYTES, ch->migration_id, id_len);
  memcpy(hello + HEAD_BYTES + id_len, ch->secret, SECRET_BYTES);
  uint32_t reply[5];
  if (!io_write(ch, hello, HEAD_BYTES + id_len + SECRET_BYTES, err, err_len) ||
      !io_read(ch, reply, HEAD_BYTES, err, err_len)) {
    free(der);
    char why[200];
    snprintf(why, sizeof why, "%.199s", err);
    snprintf(err, err_len, "the destination did not take the channel (no such migration there, or not this peer's): %s", why);
    return false;
  }
  if (reply[0] != MSG_ATTACHED) {
    free(der);
    snprintf(err, err_len, "the destination answered the channel's hello with message kind %u", reply[0]);
    return false;
  }
  set_timeouts(ch->fd, 0);
  event_t *ev = event(EV_READY);
  if (ev) {
    ev->der = der;
    ev->der_len = der_len;
    post(ch, ev);
  } else {
    free(der);
  }
  return true;
}

/*
 * The pages of the job's runs in messages of up to a batch of data: zero pages as entries,
 * data pages written straight from the guest's mapping, not copied into a batch first. A
 * page the guest writes between the zero check and the write goes as it is then; its
 * tracker has it dirty either way.
 *
 * With fingerprints (dedup: the source's mirror must say what the destination holds, to the
 * byte), data pages are copied first and fingerprinted from the copy, the very bytes sent;
 * a page's fingerprint lands at its place in the runs (a zero page gets the zero page's).
 */
static bool source_send(channel_t *ch, uint64_t counts[6], char *err, size_t err_len) {
  const region_t *r = ch->job_region;
  const size_t ps = r->page_size;
  const size_t cap = ps >= BATCH_BYTES ? ps : (BATCH_BYTES / ps) * ps;
  const bool copy = ch->job_fps != NULL;
  if (copy && !ch->payload) {
    ch->payload = malloc(cap);
    ch->payload_fps = malloc(cap / ps * 16);
    if (!ch->payload || !ch->payload_fps) {
      snprintf(err, err_len, "out of memory for a batch");
      return false;
    }
  }
  uint32_t cursor[2] = {0, 0};
  uint64_t at = 0; /* pages of the runs gathered so far */
  bool done = ch->job_run_count == 0;
  memset(counts, 0, 6 * sizeof counts[0]);
  while (!done) {
    if (stopping(ch)) {
      snprintf(err, err_len, "the channel was closed");
      return false;
    }
    /* iov[0]: the header and entries; then the data pages: iov[1 + k] the k-th data
     * entry's in the mapping, or iov[1] the copies. */
    gather_result g;
    done = copy ? gather_batch(r, ch->job_runs, ch->job_run_count, cursor, ch->payload, cap, ch->entries,
                               MAX_ENTRIES, ch->payload_fps, NULL, &g)
                : gather_batch(r, ch->job_runs, ch->job_run_count, cursor, NULL, cap, ch->entries,
                               MAX_ENTRIES, NULL, ch->iov + 1, &g);
    if (g.bad) {
      snprintf(err, err_len, "run %zu is outside region %u", g.bad_run, ch->job_index);
      return false;
    }
    if (g.entries == 0) break;
    const size_t entry_bytes = g.entries * 12;
    const uint32_t head[5] = {MSG_DATA, ch->job_index, ch->job_round, (uint32_t)g.entries, (uint32_t)g.payload};
    memcpy(ch->buf, head, HEAD_BYTES);
    memcpy(ch->buf + HEAD_BYTES, ch->entries, entry_bytes);
    ch->iov[0] = (struct iovec){.iov_base = ch->buf, .iov_len = HEAD_BYTES + entry_bytes};
    size_t iovs = g.iovs + 1;
    if (copy) {
      ch->iov[1] = (struct iovec){.iov_base = ch->payload, .iov_len = g.payload};
      iovs = g.payload > 0 ? 2 : 1;
    }
    if (!io_writev(ch, ch->iov, iovs, err, err_len)) return false;
    size_t data = 0;
    for (size_t e = 0; e < g.entries; e++) {
      const uint32_t kind = ch->entries[3 * e], count = ch->entries[3 * e + 2];
      counts[0] += count;
      if (kind == ENTRY_ZERO) counts[2] += count;
      else counts[1] += count;
      if (!copy) continue;
      for (uint32_t p = 0; p < count; p++, at++) {
        const void *fp = kind == ENTRY_ZERO ? (const void *)&r->zero_hash : ch->payload_fps + 16 * data++;
        memcpy(ch->job_fps + 16 * at, fp, 16);
      }
    }
    counts[3] += g.payload;
    counts[4] += HEAD_BYTES + entry_bytes + g.payload;
    counts[5]++;
  }
  return true;
}

static bool source_barrier(channel_t *ch, uint64_t *pages, char *err, size_t err_len) {
  const uint32_t head[5] = {MSG_BARRIER, ch->job_round, 0, 0, 0};
  uint32_t ack[5];
  if (!io_write(ch, head, HEAD_BYTES, err, err_len) || !io_read(ch, ack, HEAD_BYTES, err, err_len))
    return false;
  if (ack[0] != MSG_ACK || ack[1] != ch->job_round) {
    snprintf(err, err_len, "the destination answered barrier %u with [%u, %u]", ch->job_round, ack[0], ack[1]);
    return false;
  }
  *pages = (uint64_t)ack[2] | ((uint64_t)ack[3] << 32);
  return true;
}

static bool source_loop(channel_t *ch, char *err, size_t err_len) {
  for (;;) {
    pthread_mutex_lock(&ch->mu);
    while (ch->job == JOB_NONE && !ch->stop) pthread_cond_wait(&ch->cv, &ch->mu);
    const int job = ch->stop ? JOB_NONE : ch->job;
    pthread_mutex_unlock(&ch->mu);
    if (job == JOB_NONE) return true;
    event_t *ev = NULL;
    if (job == JOB_SEND) {
      uint64_t counts[6];
      if (!source_send(ch, counts, err, err_len)) return false;
      ev = event(EV_SENT);
      if (ev) {
        memcpy(ev->n, counts, sizeof counts);
        ev->fps = ch->job_fps;
        ev->fps_len = ch->job_fps ? 16 * ch->job_pages : 0;
        ch->job_fps = NULL;
      }
    } else if (job == JOB_BARRIER) {
      uint64_t pages = 0;
      if (!source_barrier(ch, &pages, err, err_len)) return false;
      ev = event(EV_BARRIER);
      if (ev) {
        ev->n[0] = ch->job_round;
        ev->n[1] = pages;
      }
    } else {
      const uint32_t head[5] = {MSG_BYE, 0, 0, 0, 0};
      if (!io_write(ch, head, HEAD_BYTES, err, err_len)) return false;
      if (ch->ssl) (void)SSL_shutdown(ch->ssl);
      return true;
    }
    /* Idle again before JS hears of it: its next call finds the channel free. */
    pthread_mutex_lock(&ch->mu);
    ch->job = JOB_NONE;
    pthread_mutex_unlock(&ch->mu);
    if (ev) post(ch, ev);
  }
}

/* ------------------------------------------------------------------------------------ */
/* The destination's side                                                               */
/* ------------------------------------------------------------------------------------ */

static bool destination_setup(channel_t *ch, char *err, size_t err_len) {
  char preamble[PREAMBLE_BYTES];
  if (!io_read(ch, preamble, PREAMBLE_BYTES, err, err_len)) return false;
  if (memcmp(preamble, CHANNEL_PREAMBLE, PREAMBLE_BYTES) != 0) {
    snprintf(err, err_len, "not a gangway channel (its first bytes are not the preamble)");
    return false;
  }
  uint8_t *der = NULL;
  size_t der_len = 0;
  if (ch->ctx && !handshake(ch, &der, &der_len, err, err_len)) return false;
  uint32_t head[5];
  event_t *ev = event(EV_HELLO);
  if (!ev) {
    free(der);
    snprintf(err, err_len, "out of memory");
    return false;
  }
  ev->der = der;
  ev->der_len = der_len;
  if (!io_read(ch, head, HEAD_BYTES, err, err_len)) goto fail;
  if (head[0] != MSG_HELLO || head[1] == 0 || head[1] > MAX_ID_BYTES) {
    snprintf(err, err_len, "a channel's first message must be its hello (got kind %u, %u bytes of id)", head[0], head[1]);
    goto fail;
  }
  ev->text = calloc(1, head[1] + 1);
  if (!ev->text) {
    snprintf(err, err_len, "out of memory");
    goto fail;
  }
  if (!io_read(ch, ev->text, head[1], err, err_len) || !io_read(ch, ev->secret, SECRET_BYTES, err, err_len))
    goto fail;
  for (uint32_t i = 0; i < head[1]; i++) {
    if ((unsigned char)ev->text[i] < 0x20 || (unsigned char)ev->text[i] > 0x7e) {
      snprintf(err, err_len, "a channel's hello names a migration id that is not printable ASCII");
      goto fail;
    }
  }
  post(ch, ev);
  /* JS attaches the migration's regions, or closes the channel. */
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += SETUP_TIMEOUT_S;
  pthread_mutex_lock(&ch->mu);
  int waited = 0;
  while (!ch->attached && !ch->stop && waited != ETIMEDOUT) waited = pthread_cond_timedwait(&ch->cv, &ch->mu, &until);
  const bool attached = ch->attached && !ch->stop;
  const bool refused = ch->stop;
  pthread_mutex_unlock(&ch->mu);
  if (refused) return true; /* JS knows why */
  if (!attached) {
    snprintf(err, err_len, "the channel was neither attached nor refused in %d s", SETUP_TIMEOUT_S);
    return false;
  }
  const uint32_t reply[5] = {MSG_ATTACHED, ch->region_count, 0, 0, 0};
  if (!io_write(ch, reply, HEAD_BYTES, err, err_len)) return false;
  set_timeouts(ch->fd, 0);
  return true;
fail:
  event_free(ev);
  return false;
}

static bool destination_loop(channel_t *ch, char *err, size_t err_len) {
  pthread_mutex_lock(&ch->mu);
  const bool attached = ch->attached && !ch->stop;
  pthread_mutex_unlock(&ch->mu);
  if (!attached) return true;
  uint8_t *payload = ch->buf;
  for (;;) {
    uint32_t head[5];
    if (!io_read(ch, head, HEAD_BYTES, err, err_len)) return stopping(ch);
    if (head[0] == MSG_BYE) return true;
    if (head[0] == MSG_BARRIER) {
      const uint32_t ack[5] = {MSG_ACK, head[1], (uint32_t)ch->pages_applied, (uint32_t)(ch->pages_applied >> 32), 0};
      if (!io_write(ch, ack, HEAD_BYTES, err, err_len)) return stopping(ch);
      event_t *ev = event(EV_BARRIER);
      if (ev) {
        ev->n[0] = head[1];
        ev->n[1] = ch->pages_applied;
        post(ch, ev);
      }
      continue;
    }
    if (head[0] != MSG_DATA) {
      snprintf(err, err_len, "unknown channel message kind %u", head[0]);
      return false;
    }
    const uint32_t index = head[1], entry_count = head[3], payload_len = head[4];
    if (index >= ch->region_count) {
      snprintf(err, err_len, "pages for region %u, the guest has %u", index, ch->region_count);
      return false;
    }
    if (entry_count == 0 || entry_count > MAX_ENTRIES || payload_len > MAX_PAYLOAD) {
      snprintf(err, err_len, "a batch of %u entries and %u payload bytes (at most %u and %u)",
               entry_count, payload_len, MAX_ENTRIES, MAX_PAYLOAD);
      return false;
    }
    region_t *r = ch->regions[index];
    if (!io_read(ch, ch->entries, (size_t)entry_count * 12, err, err_len)) return stopping(ch);
    char why[160];
    if (!scatter_check(r, ch->entries, entry_count, payload_len, why, sizeof why)) {
      snprintf(err, err_len, "bad batch for region %u: %s", index, why);
      return false;
    }
    if (!io_read(ch, payload, payload_len, err, err_len)) return stopping(ch);
    uint64_t at = 0;
    const int rc = scatter_apply(r, ch->entries, entry_count, payload, payload_len, &at);
    if (rc == SCATTER_IO) {
      snprintf(err, err_len, "region %u: write at offset %llu failed: %s", index, (unsigned long long)at, strerror(errno));
      return false;
    }
    for (uint32_t e = 0; e < entry_count; e++) ch->pages_applied += ch->entries[3 * e + 2];
  }
}

/* ------------------------------------------------------------------------------------ */
/* The thread                                                                           */
/* ------------------------------------------------------------------------------------ */

static void *channel_main(void *arg) {
  channel_t *ch = arg;
  char err[320] = "";
  const int flags = fcntl(ch->fd, F_GETFL);
  if (flags >= 0) fcntl(ch->fd, F_SETFL, flags & ~O_NONBLOCK);
  const int one = 1;
  setsockopt(ch->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  set_timeouts(ch->fd, SETUP_TIMEOUT_S);
  bool ok = ch->source ? source_setup(ch, err, sizeof err) && source_loop(ch, err, sizeof err)
                       : destination_setup(ch, err, sizeof err) && destination_loop(ch, err, sizeof err);
  if (!ok && !stopping(ch)) {
    event_t *ev = event(EV_ERROR);
    if (ev) {
      ev->text = strdup(err);
      post(ch, ev);
    }
  }
  if (ch->ssl) SSL_free(ch->ssl);
  ch->ssl = NULL;
  if (ch->ctx) SSL_CTX_free(ch->ctx);
  ch->ctx = NULL;
  pthread_mutex_lock(&ch->mu);
  close(ch->fd);
  ch->fd = -1;
  pthread_mutex_unlock(&ch->mu);
  ERR_clear_error();
  event_t *ev = event(EV_CLOSED);
  if (ev) post(ch, ev);
  return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* JS                                                                                   */
/* ------------------------------------------------------------------------------------ */

static void channel_finalize(napi_env env, void *data, void *hint) {
  channel_t *ch = data;
  /* The handle is referenced while the thread runs, so it has ended; unless the whole
   * environment is going away under it: then the thread keeps what it uses. */
  if (ch->started) {
    pthread_mutex_lock(&ch->mu);
    ch->stop = true;
    if (ch->fd >= 0) shutdown(ch->fd, SHUT_RDWR);
    pthread_mutex_unlock(&ch->mu);
    return;
  }
  channel_free(ch);
}

static bool arg_channel(napi_env env, napi_value v, const char *fn, channel_t **out) {
  bool is = false;
  if (napi_check_object_type_tag(env, v, &CHANNEL_TAG, &is) != napi_ok || !is) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: channel must be a handle from channelOpen", fn);
    return false;
  }
  if (napi_get_value_external(env, v, (void **)out) != napi_ok) {
    throw_napi(env, "napi_get_value_external");
    return false;
  }
  return true;
}

/* A PEM buffer out of options[key]. */
static bool pem_arg(napi_env env, napi_value obj, const char *fn, const char *key, uint8_t **data, size_t *len) {
  napi_value v;
  bool is = false;
  if (napi_get_named_property(env, obj, key, &v) != napi_ok || napi_is_buffer(env, v, &is) != napi_ok || !is) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: tls.%s must be a Buffer of PEM", fn, key);
    return false;
  }
  return napi_get_buffer_info(env, v, (void **)data, len) == napi_ok;
}

static SSL_CTX *tls_context(napi_env env, const char *fn, bool server, napi_value tls) {
  uint8_t *cert, *key, *ca;
  size_t cert_len, key_len, ca_len;
  if (!pem_arg(env, tls, fn, "cert", &cert, &cert_len) || !pem_arg(env, tls, fn, "key", &key, &key_len) ||
      !pem_arg(env, tls, fn, "ca", &ca, &ca_len))
    return NULL;
  SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  const char *what = "SSL_CTX_new";
  BIO *bio = NULL;
  if (!ctx) goto fail;
  what = "TLS 1.3";
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256") != 1)
    goto fail;
  what = "tls.cert";
  bio = BIO_new_mem_buf(cert, (int)cert_len);
  X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
  if (!x || SSL_CTX_use_certificate(ctx, x) != 1) {
    X509_free(x);
    goto fail;
  }
  X509_free(x);
  while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
    if (SSL_CTX_add0_chain_cert(ctx, x) != 1) {
      X509_free(x);
      goto fail;
    }
  }
  BIO_free(bio);
  ERR_clear_error();
  what = "tls.key";
  bio = BIO_new_mem_buf(key, (int)key_len);
  EVP_PKEY *pkey = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
  if (!pkey || SSL_CTX_use_PrivateKey(ctx, pkey) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
    EVP_PKEY_free(pkey);
    goto fail;
  }
  EVP_PKEY_free(pkey);
  BIO_free(bio);
  what = "tls.ca";
  bio = BIO_new_mem_buf(ca, (int)ca_len);
  X509_STORE *store = SSL_CTX_get_cert_store(ctx);
  int cas = 0;
  while (bio && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
    const int added = X509_STORE_add_cert(store, x);
    X509_free(x);
    if (added != 1) goto fail;
    cas++;
  }
  BIO_free(bio);
  bio = NULL;
  ERR_clear_error();
  if (cas == 0) goto fail;
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_default_read_buffer_len(ctx, IO_BUFFER_BYTES);
  if (server) SSL_CTX_set_num_tickets(ctx, 0);
  return ctx;
fail: {
  char reason[160] = "no PEM found";
  const unsigned long code = ERR_get_error();
  if (code) ERR_error_string_n(code, reason, sizeof reason);
  ERR_clear_error();
  if (bio) BIO_free(bio);
  if (ctx) SSL_CTX_free(ctx);
  throw_fmt(env, ERR_ERROR, NULL, "%s: %s: %s", fn, what, reason);
  return NULL;
}
}

/*
 * channelOpen(fd, role, tls, hello, onEvent) -> channel. fd: a connected TCP socket,
 * duplicated here (the caller closes its own); role: 'source' | 'destination'; tls:
 * { cert, key, ca } PEM Buffers, or null for plain TCP (loopback agents); hello: the source's
 * { migrationId, secret }, null at the destination; onEvent(name, fields).
 */
napi_value ChannelOpen(napi_env env, napi_callback_info info) {
  static const char fn[] = "channelOpen";
  napi_value argv[5];
  if (!get_args(env, info, 5, argv)) return NULL;
  int fd;
  if (!arg_fd(env, argv[0], fn, "fd", &fd)) return NULL;
  char role[16] = "";
  size_t role_len = 0;
  if (napi_get_value_string_utf8(env, argv[1], role, sizeof role, &role_len) != napi_ok ||
      (strcmp(role, "source") != 0 && strcmp(role, "destination") != 0)) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: role must be 'source' or 'destination'", fn);
    return NULL;
  }
  const bool source = role[0] == 's';
  napi_valuetype t;
  napi_typeof(env, argv[4], &t);
  if (t != napi_function) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: onEvent must be a function", fn);
    return NULL;
  }
  channel_t *ch = calloc(1, sizeof *ch);
  if (!ch) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return NULL;
  }
  ch->source = source;
  ch->fd = -1;
  pthread_mutex_init(&ch->mu, NULL);
  pthread_cond_init(&ch->cv, NULL);
  if (source) {
    napi_value id, secret;
    size_t id_len = 0, secret_len = 0;
    uint8_t *secret_data;
    bool is = false;
    if (napi_get_named_property(env, argv[3], "migrationId", &id) != napi_ok ||
        napi_get_value_string_utf8(env, id, ch->migration_id, sizeof ch->migration_id, &id_len) != napi_ok ||
        id_len == 0 || id_len >= MAX_ID_BYTES ||
        napi_get_named_property(env, argv[3], "secret", &secret) != napi_ok ||
        napi_is_typedarray(env, secret, &is) != napi_ok || !is ||
        napi_get_typedarray_info(env, secret, NULL, &secret_len, (void **)&secret_data, NULL, NULL) != napi_ok ||
        secret_len != SECRET_BYTES) {
      channel_free(ch);
      throw_fmt(env, ERR_TYPE, NULL, "%s: hello must be { migrationId: string of 1-%d bytes, secret: %d bytes }", fn, MAX_ID_BYTES - 1, SECRET_BYTES);
      return NULL;
    }
    memcpy(ch->secret, secret_data, SECRET_BYTES);
  }
  napi_valuetype tls_type;
  napi_typeof(env, argv[2], &tls_type);
  if (tls_type != napi_null && tls_type != napi_undefined) {
    ch->ctx = tls_context(env, fn, !source, argv[2]);
    if (!ch->ctx) {
      channel_free(ch);
      return NULL;
    }
  }
  ch->buf = malloc(source ? HEAD_BYTES + MAX_ENTRIES * 12u : MAX_PAYLOAD);
  ch->entries = malloc(MAX_ENTRIES * 12);
  ch->iov = source ? malloc((MAX_ENTRIES + 1) * sizeof *ch->iov) : NULL;
  if (!ch->buf || !ch->entries || (source && !ch->iov)) {
    if (ch->ctx) SSL_CTX_free(ch->ctx);
    channel_free(ch);
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return NULL;
  }
  napi_value handle, name;
  if (napi_create_external(env, ch, channel_finalize, NULL, &handle) != napi_ok) {
    if (ch->ctx) SSL_CTX_free(ch->ctx);
    channel_free(ch);
    throw_napi(env, "napi_create_external");
    return NULL;
  }
  /* From here the finalizer owns ch. */
  NAPI_TRY(env, napi_type_tag_object(env, handle, &CHANNEL_TAG));
  NAPI_TRY(env, napi_create_string_utf8(env, "gangway channel", NAPI_AUTO_LENGTH, &name));
  NAPI_TRY(env, napi_create_threadsafe_function(env, argv[4], NULL, name, 0, 1, NULL, NULL, ch, call_js, &ch->tsfn));
  ch->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (ch->fd < 0) {
    const int e = errno;
    napi_release_threadsafe_function(ch->tsfn, napi_tsfn_abort);
    if (ch->ctx) SSL_CTX_free(ch->ctx);
    ch->ctx = NULL;
    throw_errno(env, e, "channelOpen: dup of the socket", NULL);
    return NULL;
  }
  NAPI_TRY(env, napi_create_reference(env, handle, 1, &ch->self));
  if (pthread_create(&ch->thread, NULL, channel_main, ch) != 0) {
    const int e = errno;
    close(ch->fd);
    ch->fd = -1;
    napi_delete_reference(env, ch->self);
    ch->self = NULL;
    napi_release_threadsafe_function(ch->tsfn, napi_tsfn_abort);
    if (ch->ctx) SSL_CTX_free(ch->ctx);
    ch->ctx = NULL;
    throw_errno(env, e, "channelOpen: cannot start its thread", NULL);
    return NULL;
  }
  ch->started = true;
  return handle;
}

/* channelAttach(channel, regions): the destination's writable regions, by region index. */
napi_value ChannelAttach(napi_env env, napi_callback_info info) {
  static const char fn[] = "channelAttach";
  napi_value argv[2];
  channel_t *ch;
  if (!get_args(env, info, 2, argv) || !arg_channel(env, argv[0], fn, &ch)) return NULL;
  uint32_t n = 0;
  bool is = false;
  if (napi_is_array(env, argv[1], &is) != napi_ok || !is || napi_get_array_length(env, argv[1], &n) != napi_ok || n == 0) {
    throw_fmt(env, ERR_TYPE, NULL, "%s: regions must be a non-empty array of region handles", fn);
    return NULL;
  }
  if (ch->source || ch->attached || ch->regions) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: only a destination's channel is attached, once", fn);
    return NULL;
  }
  region_t **regions = calloc(n, sizeof *regions);
  if (!regions) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return NULL;
  }
  for (uint32_t i = 0; i < n; i++) {
    napi_value v;
    if (napi_get_element(env, argv[1], i, &v) != napi_ok || !arg_region_named(env, v, fn, "regions[i]", false, &regions[i])) {
      free(regions);
      return NULL;
    }
    if (!regions[i]->writable) {
      free(regions);
      throw_fmt(env, ERR_ERROR, NULL, "%s: region %u is mapped read-only", fn, i);
      return NULL;
    }
  }
  for (uint32_t i = 0; i < n; i++) region_busy(regions[i]);
  pthread_mutex_lock(&ch->mu);
  ch->regions = regions;
  ch->region_count = n;
  ch->attached = true;
  pthread_cond_signal(&ch->cv);
  pthread_mutex_unlock(&ch->mu);
  return NULL;
}

/* The thread is free for a job: none in hand, and the last send's region given back (its
 * 'sent' event has run). Under mu. */
static bool idle_locked(const channel_t *ch) {
  return ch->job == JOB_NONE && ch->job_region == NULL && !ch->stop && ch->fd >= 0;
}

static bool start_job(napi_env env, const char *fn, channel_t *ch, int job, uint32_t round) {
  pthread_mutex_lock(&ch->mu);
  const bool idle = idle_locked(ch);
  if (idle) {
    ch->job = job;
    ch->job_round = round;
    pthread_cond_signal(&ch->cv);
  }
  pthread_mutex_unlock(&ch->mu);
  if (!idle) throw_fmt(env, ERR_ERROR, NULL, "%s: the channel is busy or closed", fn);
  return idle;
}

/*
 * channelSend(channel, region, regionIndex, round, runs, fingerprints?): event 'sent' once
 * written, with each page's fingerprint (16 bytes, in the runs' page order) when asked.
 */
napi_value ChannelSend(napi_env env, napi_callback_info info) {
  static const char fn[] = "channelSend";
  napi_value argv[6];
  channel_t *ch;
  region_t *r;
  uint64_t index, round;
  uint32_t *runs;
  size_t runs_len;
  bool want_fps = false;
  if (!get_args(env, info, 6, argv) || !arg_channel(env, argv[0], fn, &ch) ||
      !arg_region(env, argv[1], fn, false, &r) ||
      !arg_integer(env, argv[2], fn, "regionIndex", 0, UINT32_MAX, &index) ||
      !arg_integer(env, argv[3], fn, "round", 0, UINT32_MAX, &round) ||
      !arg_typed(env, argv[4], fn, "runs", napi_uint32_array, (void **)&runs, &runs_len) ||
      (!arg_is_absent(env, argv[5]) && !arg_bool(env, argv[5], fn, "fingerprints", &want_fps)))
    return NULL;
  if (!ch->source || !r->addr) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: a source's channel sends from a region mapped for reading", fn);
    return NULL;
  }
  if (runs_len % 2 != 0 || r->page_size > MAX_PAYLOAD) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: runs must hold [firstPage, pageCount] pairs, pages at most %u bytes", fn, MAX_PAYLOAD);
    return NULL;
  }
  /* With fingerprints, room for one per page: the runs' pages, each run inside the region
   * (the thread checks them again as it reaches them). */
  uint64_t pages = 0;
  for (size_t i = 0; want_fps && i < runs_len; i += 2) {
    if ((uint64_t)runs[i] + runs[i + 1] > r->page_count) {
      throw_fmt(env, ERR_RANGE, NULL, "%s: run %zu [%u, %u] is outside the region of %u pages", fn, i / 2, runs[i], runs[i + 1], r->page_count);
      return NULL;
    }
    pages += runs[i + 1];
  }
  if (pages > r->page_count) {
    throw_fmt(env, ERR_RANGE, NULL, "%s: runs of %llu pages, more than the region's %u, cannot be fingerprinted", fn, (unsigned long long)pages, r->page_count);
    return NULL;
  }
  uint32_t *copy = malloc(runs_len ? runs_len * 4 : 4);
  uint8_t *fps = want_fps ? malloc(pages ? 16 * pages : 16) : NULL;
  if (!copy || (want_fps && !fps)) {
    free(copy);
    free(fps);
    throw_fmt(env, ERR_ERROR, NULL, "%s: out of memory", fn);
    return NULL;
  }
  memcpy(copy, runs, runs_len * 4);
  pthread_mutex_lock(&ch->mu);
  const bool idle = idle_locked(ch);
  if (idle) {
    free(ch->job_runs);
    ch->job_runs = copy;
    ch->job_run_count = runs_len / 2;
    free(ch->job_fps);
    ch->job_fps = fps;
    ch->job_pages = pages;
    ch->job_region = r;
    ch->job_index = (uint32_t)index;
    ch->job_round = (uint32_t)round;
    region_busy(r);
    ch->job = JOB_SEND;
    pthread_cond_signal(&ch->cv);
  }
  pthread_mutex_unlock(&ch->mu);
  if (!idle) {
    free(copy);
    free(fps);
    throw_fmt(env, ERR_ERROR, NULL, "%s: the channel is busy or closed", fn);
  }
  return NULL;
}

/* channelBarrier(channel, round): event 'barrier' once the destination wrote all before it. */
napi_value ChannelBarrier(napi_env env, napi_callback_info info) {
  static const char fn[] = "channelBarrier";
  napi_value argv[2];
  channel_t *ch;
  uint64_t round;
  if (!get_args(env, info, 2, argv) || !arg_channel(env, argv[0], fn, &ch) ||
      !arg_integer(env, argv[1], fn, "round", 0, UINT32_MAX, &round))
    return NULL;
  if (!ch->source) {
    throw_fmt(env, ERR_ERROR, NULL, "%s: only a source's channel sends barriers", fn);
    return NULL;
  }
  start_job(env, fn, ch, JOB_BARRIER, (uint32_t)round);
  return NULL;
}

/* channelBye(channel): the source is done; the channel closes ('closed') once both ends know. */
napi_value ChannelBye(napi_env env, napi_callback_info info) {
  static const char fn[] = "channelBye";
  napi_value argv[1];
  channel_t *ch;
  if (!get_args(env, info, 1, argv) || !arg_channel(env, argv[0], fn, &ch)) return NULL;
  if (ch->source) start_job(env, fn, ch, JOB_BYE, 0);
  return NULL;
}

/* channelClose(channel): ends the thread now (its socket shut down); 'closed' follows. Idempotent. */
napi_value ChannelClose(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  channel_t *ch;
  if (!get_args(env, info, 1, argv) || !arg_channel(env, argv[0], "channelClose", &ch)) return NULL;
  pthread_mutex_lock(&ch->mu);
  ch->stop = true;
  if (ch->fd >= 0) shutdown(ch->fd, SHUT_RDWR);
  pthread_cond_signal(&ch->cv);
  pthread_mutex_unlock(&ch->mu);
  return NULL;
}

/* socketPeek(fd, length) -> Buffer of the bytes waiting now (at most length, maybe none), or null at EOF. */
napi_value SocketPeek(napi_env env, napi_callback_info info) {
  static const char fn[] = "socketPeek";
  napi_value argv[2];
  int fd;
  uint64_t length;
  if (!get_args(env, info, 2, argv) || !arg_fd(env, argv[0], fn, "fd", &fd) ||
      !arg_integer(env, argv[1], fn, "length", 1, 64, &length))
    return NULL;
  uint8_t data[64];
  ssize_t n;
  do n = recv(fd, data, (size_t)length, MSG_PEEK | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);
  napi_value out;
  if (n == 0) {
    NAPI_TRY(env, napi_get_null(env, &out));
    return out;
  }
  if (n < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      throw_errno(env, errno, "socketPeek", NULL);
      return NULL;
    }
    n = 0;
  }
  void *to;
  NAPI_TRY(env, napi_create_buffer_copy(env, (size_t)n, data, &to, &out));
  return out;
}
