#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "napi-util.h"
#include "exports.h"

/*
 * sdNotify(socketPath, message): one datagram to systemd's NOTIFY_SOCKET (sd_notify(3)
 * without libsystemd). Node has no unix datagram sockets, hence this. A path starting with
 * '@' is in the abstract namespace.
 */
napi_value SdNotify(napi_env env, napi_callback_info info) {
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
