/*
 * pidfdGetfd: a copy of another process's open descriptor (pidfd_open + pidfd_getfd,
 * Linux 5.6+, with ptrace access to the process: root, or the same user under Yama 0).
 * A restarted agent takes back the userfaultfd a post-copy guest holds: the kernel keeps
 * the guest's missing-page registration as long as any copy of that descriptor is open,
 * and the guest kept its own, so the faults the dead agent no longer read wait in its queue.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "napi-util.h"
#include "exports.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

/* pidfdGetfd(pid, targetFd) -> fd: this process's copy (close-on-exec, as pidfd_getfd makes it). */
napi_value PidfdGetfd(napi_env env, napi_callback_info info) {
  static const char fn[] = "pidfdGetfd";
  napi_value argv[2];
  uint64_t pid, target;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!arg_integer(env, argv[0], fn, "pid", 1, 4194304, &pid) ||
      !arg_integer(env, argv[1], fn, "targetFd", 0, 1048576, &target))
    return NULL;
  const int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
  if (pidfd < 0) {
    char prefix[96];
    snprintf(prefix, sizeof prefix, "%s: pidfd_open(%llu) failed", fn, (unsigned long long)pid);
    throw_errno(env, errno, prefix, errno == ESRCH ? "the process is gone" : NULL);
    return NULL;
  }
  const int fd = (int)syscall(SYS_pidfd_getfd, pidfd, (int)target, 0);
  const int err = errno;
  close(pidfd);
  if (fd < 0) {
    char prefix[128];
    snprintf(prefix, sizeof prefix, "%s: pidfd_getfd(pid %llu, fd %llu) failed", fn, (unsigned long long)pid,
             (unsigned long long)target);
    throw_errno(env, err, prefix, err == EPERM ? "taking another process's descriptor needs root (ptrace access)" : NULL);
    return NULL;
  }
  napi_value result;
  NAPI_TRY(env, napi_create_int32(env, fd, &result));
  return result;
}
