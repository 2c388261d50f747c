/*
 * Channels (channel.h says what crosses one): the JS side, channelOpen, channelAttach,
 * channelSend, channelBarrier, channelBye, channelClose, and the events the thread posts,
 * turned into calls of the channel's onEvent on the JS thread; socketPeek for the peer port.
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
#include "channel.h"

static const napi_type_tag CHANNEL_TAG = {0x67616e6777617943ULL, 0x68616e6e656c4821ULL};

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
