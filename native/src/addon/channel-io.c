/* Channels (channel.h): the I/O of a channel's thread, plain or through TLS. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/x509.h>

#include "channel.h"

bool channel_stopping(channel_t *ch) {
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
bool io_writev(channel_t *ch, struct iovec *iov, size_t n, char *err, size_t err_len) {
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
bool io_write(channel_t *ch, const void *data, size_t len, char *err, size_t err_len) {
  struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
  return io_writev(ch, &iov, 1, err, err_len);
}

bool io_read(channel_t *ch, void *data, size_t len, char *err, size_t err_len) {
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

void set_timeouts(int fd, int seconds) {
  struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* The handshake, then the peer's certificate as DER (malloc'd) in *der. */
bool handshake(channel_t *ch, uint8_t **der, size_t *der_len, char *err, size_t err_len) {
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

