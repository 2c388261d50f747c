/* Channels (channel.h): a channel's thread, the source's side and the destination's. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>

#include "channel.h"

/* ------------------------------------------------------------------------------------ */
/* Events, to the JS thread                                                             */
/* ------------------------------------------------------------------------------------ */

event_t *event_new(int kind) {
  event_t *ev = calloc(1, sizeof *ev);
  if (ev) ev->kind = kind;
  return ev;
}

void event_post(channel_t *ch, event_t *ev) {
  if (napi_call_threadsafe_function(ch->tsfn, ev, napi_tsfn_blocking) != napi_ok) event_free(ev);
}

void event_free(event_t *ev) {
  free(ev->text);
  free(ev->der);
  free(ev->fps);
  free(ev);
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
  event_t *ev = event_new(EV_READY);
  if (ev) {
    ev->der = der;
    ev->der_len = der_len;
    event_post(ch, ev);
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
    if (channel_stopping(ch)) {
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
      ev = event_new(EV_SENT);
      if (ev) {
        memcpy(ev->n, counts, sizeof counts);
        ev->fps = ch->job_fps;
        ev->fps_len = ch->job_fps ? 16 * ch->job_pages : 0;
        ch->job_fps = NULL;
      }
    } else if (job == JOB_BARRIER) {
      uint64_t pages = 0;
      if (!source_barrier(ch, &pages, err, err_len)) return false;
      ev = event_new(EV_BARRIER);
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
    if (ev) event_post(ch, ev);
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
  event_t *ev = event_new(EV_HELLO);
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
  event_post(ch, ev);
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
    if (!io_read(ch, head, HEAD_BYTES, err, err_len)) return channel_stopping(ch);
    if (head[0] == MSG_BYE) return true;
    if (head[0] == MSG_BARRIER) {
      const uint32_t ack[5] = {MSG_ACK, head[1], (uint32_t)ch->pages_applied, (uint32_t)(ch->pages_applied >> 32), 0};
      if (!io_write(ch, ack, HEAD_BYTES, err, err_len)) return channel_stopping(ch);
      event_t *ev = event_new(EV_BARRIER);
      if (ev) {
        ev->n[0] = head[1];
        ev->n[1] = ch->pages_applied;
        event_post(ch, ev);
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
    if (!io_read(ch, ch->entries, (size_t)entry_count * 12, err, err_len)) return channel_stopping(ch);
    char why[160];
    if (!scatter_check(r, ch->entries, entry_count, payload_len, why, sizeof why)) {
      snprintf(err, err_len, "bad batch for region %u: %s", index, why);
      return false;
    }
    if (!io_read(ch, payload, payload_len, err, err_len)) return channel_stopping(ch);
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

void *channel_main(void *arg) {
  channel_t *ch = arg;
  char err[320] = "";
  const int flags = fcntl(ch->fd, F_GETFL);
  if (flags >= 0) fcntl(ch->fd, F_SETFL, flags & ~O_NONBLOCK);
  const int one = 1;
  setsockopt(ch->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  set_timeouts(ch->fd, SETUP_TIMEOUT_S);
  bool ok = ch->source ? source_setup(ch, err, sizeof err) && source_loop(ch, err, sizeof err)
                       : destination_setup(ch, err, sizeof err) && destination_loop(ch, err, sizeof err);
  if (!ok && !channel_stopping(ch)) {
    event_t *ev = event_new(EV_ERROR);
    if (ev) {
      ev->text = strdup(err);
      event_post(ch, ev);
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
  event_t *ev = event_new(EV_CLOSED);
  if (ev) event_post(ch, ev);
  return NULL;
}

