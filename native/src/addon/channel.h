/*
 * Channels: the bulk page stream of a pre-copy migration off the JS thread. A channel is
 * one TCP connection between two agents with a thread at each end: the source's writes
 * pages straight from the guest's mapping (zero pages as entries; with dedup it copies each
 * page first and reports the fingerprint of what it sent), the destination's reads
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
#ifndef GANGWAY_CHANNEL_H
#define GANGWAY_CHANNEL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <openssl/ssl.h>

#include "napi-util.h"
#include "region.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "channel messages are little-endian u32s, written as they are in memory"
#endif

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

#define HEAD_BYTES 20u

/* channel-thread.c: the thread's body, and its events (freed on the JS thread). */
void *channel_main(void *arg);
event_t *event_new(int kind);
void event_post(channel_t *ch, event_t *ev);
void event_free(event_t *ev);

/* channel-io.c: on the channel's thread; each false with the reason in err. */
bool channel_stopping(channel_t *ch);
bool io_writev(channel_t *ch, struct iovec *iov, size_t n, char *err, size_t err_len);
bool io_write(channel_t *ch, const void *data, size_t len, char *err, size_t err_len);
bool io_read(channel_t *ch, void *data, size_t len, char *err, size_t err_len);
void set_timeouts(int fd, int seconds);
bool handshake(channel_t *ch, uint8_t **der, size_t *der_len, char *err, size_t err_len);

#endif
