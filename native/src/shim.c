/*
 * gangway-track.so: an LD_PRELOAD shim that makes a process's writes to its memory files'
 * mappings visible to the gangway agent, another process.
 *
 * GANGWAY_TRACK_PATH names the guest's memory regions, one file each, separated by ':'
 * (region 0 first; at most GW_MAX_REGIONS). When the process maps one of them MAP_SHARED
 * and writable at offset 0 (the first such mapping of each), the shim registers that
 * mapping for userfaultfd write-protect tracking in
 * asynchronous mode (UFFD_FEATURE_WP_ASYNC): writes are never blocked, the kernel just
 * marks the written pages, and the agent reads-and-resets the marks with the PAGEMAP_SCAN
 * ioctl on /proc/PID/pagemap. Tracking is per page table, which is why it has to be set up
 * inside the process that writes, and why the uffd must stay open for its lifetime.
 *
 * The outcome goes to GANGWAY_TRACK_REPORT for region 0 and GANGWAY_TRACK_REPORT.<i> for
 * region i (each written atomically):
 *   ok start=0x<address> length=<bytes> pid=<pid>[ postcopy=1 uffd=<fd>]
 *   error stage=<open|api|register|writeprotect|...> errno=<n> message=<text>
 * A failure never changes what mmap returns: the agent then falls back to hash scanning.
 * While a thread of the process is named `gangway-wp`, the write-protect pass is still
 * running and the agent must not start tracking yet (see protect_thread).
 * The hook knows nothing about the program, so it serves gangway-guest and QEMU alike.
 *
 * Standby (GANGWAY_STANDBY_FD=FD, the read end of a pipe from the agent): a destination's
 * program started ahead of the switchover (QEMU with -S) must not outlive the agent that
 * started it, unless that agent let it run. A thread reads FD: the byte 1 releases the
 * program (the agent resumed it); end of file, or anything else, means the agent is gone
 * before the switchover, and the program is killed (SIGKILL: nothing of it is to be kept).
 *
 * Post-copy (GANGWAY_UFFD_SOCKET=FD, a unix socket the agent made): the mapping is also
 * registered for MISSING faults (a first touch of a page that is a hole in the file), and
 * the descriptor goes to the agent over FD with SCM_RIGHTS, with the region's index and the
 * mapping's address and length (struct gw_uffd_hello, one message per region); the agent
 * resolves every fault with UFFDIO_COPY. Here a failure is fatal: the
 * mmap fails (with the step's errno), because the guest would otherwise read holes as
 * zeros where pages are still missing.
 */
/* node-gyp builds with _FILE_OFFSET_BITS=64, which makes the headers rename `mmap` to the
 * symbol mmap64: the shim defines both symbols itself, so it needs the plain names. */
#undef _FILE_OFFSET_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include "gangway-abi.h"
#include "uapi-compat.h"

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* mmap and mmap64 share one implementation, which is only right where off_t is 64 bits. */
_Static_assert(sizeof(off_t) == 8, "gangway-track supports 64-bit targets only");

#define TRACK_FEATURES (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

static mmap_fn next_mmap, next_mmap64;
/* Bit i set once region i's first matching mapping has been claimed: only that one is tracked. */
static uint32_t claimed;
/* dlsym may allocate, and an allocator may map memory: such a nested call must not
 * resolve again. Initial-exec TLS, so reading it never allocates either. */
static __thread int resolving __attribute__((tls_model("initial-exec")));

static void *raw_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

static mmap_fn resolve(mmap_fn *slot, const char *name)
{
	mmap_fn fn = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
	if (fn || resolving)
		return fn;
	resolving = 1;
	fn = (mmap_fn)dlsym(RTLD_NEXT, name);
	resolving = 0;
	if (fn)
		__atomic_store_n(slot, fn, __ATOMIC_RELEASE);
	return fn;
}

/* Region i's report: GANGWAY_TRACK_REPORT for region 0, GANGWAY_TRACK_REPORT.<i> after. */
static void report(unsigned region, const char *line)
{
	const char *base = getenv("GANGWAY_TRACK_REPORT");
	if (!base || !*base)
		return;
	char path[PATH_MAX], tmp[PATH_MAX];
	int n_path = region == 0 ? snprintf(path, sizeof(path), "%s", base) : snprintf(path, sizeof(path), "%s.%u", base, region);
	if (n_path >= (int)sizeof(path) || snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) {
		fprintf(stderr, "gangway-track: GANGWAY_TRACK_REPORT=%s: path too long\n", base);
		return;
	}
	/* The report is private to the guest's user (0600). A stale .tmp (a crash before the
	 * rename) goes first, so that O_EXCL|O_NOFOLLOW never writes into a file or through a
	 * symlink someone else left at that name. */
	if (unlink(tmp) < 0 && errno != ENOENT) {
		fprintf(stderr, "gangway-track: GANGWAY_TRACK_REPORT: unlink %s: %s\n", tmp, strerror(errno));
		return;
	}
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0) {
		fprintf(stderr, "gangway-track: GANGWAY_TRACK_REPORT: open %s: %s\n", tmp, strerror(errno));
		return;
	}
	size_t len = strlen(line);
	ssize_t n = write(fd, line, len);
	int write_errno = errno;
	if (close(fd) < 0 && n == (ssize_t)len) {
		n = -1;
		write_errno = errno;
	}
	if (n != (ssize_t)len) {
		fprintf(stderr, "gangway-track: GANGWAY_TRACK_REPORT: write %s: %s\n", tmp,
			n < 0 ? strerror(write_errno) : "short write");
		unlink(tmp);
		return;
	}
	if (rename(tmp, path) < 0) {
		fprintf(stderr, "gangway-track: GANGWAY_TRACK_REPORT: rename %s to %s: %s\n", tmp, path,
			strerror(errno));
		unlink(tmp);
	}
}

static void report_error(unsigned region, const char *stage, int err)
{
	char line[256];
	snprintf(line, sizeof(line), "error stage=%s errno=%d message=%s\n", stage, err, strerror(err));
	fprintf(stderr, "gangway-track: tracking region %u not set up: %s", region, line);
	report(region, line);
}

static int open_uffd(void)
{
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd >= 0 || (errno != ENOSYS && errno != EPERM))
		return uffd;
	/* The syscall can be forbidden (vm.unprivileged_userfaultfd, seccomp) while the device
	 * node, governed by file permissions, is still usable. */
	int first_errno = errno;
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0) {
		errno = first_errno;
		return -1;
	}
	uffd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
	int new_errno = errno;
	close(dev);
	errno = new_errno;
	return uffd;
}

/* The post-copy socket's fd from GANGWAY_UFFD_SOCKET, or -1 (plain tracking). */
static int postcopy_socket(void)
{
	const char *value = getenv("GANGWAY_UFFD_SOCKET");
	if (!value || !*value)
		return -1;
	char *end;
	long fd = strtol(value, &end, 10);
	return *end == '\0' && fd >= 0 && fd <= INT_MAX ? (int)fd : -2;
}

static int send_uffd(int sock, int uffd, unsigned region, uint64_t start, uint64_t length)
{
	struct gw_uffd_hello hello = {
		.start = start, .length = length, .pid = (uint32_t)getpid(), .version = GW_UFFD_HELLO_VERSION, .region = region};
	char control[CMSG_SPACE(sizeof(int))];
	memset(control, 0, sizeof(control));
	struct iovec iov = {.iov_base = &hello, .iov_len = sizeof(hello)};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control)};
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &uffd, sizeof(int));
	ssize_t n;
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -1;
	if (n != (ssize_t)sizeof(hello)) {
		errno = EPROTO;
		return -1;
	}
	return 0;
}

/*
 * Write-protects the whole range (with WP_UNPOPULATED this covers pages not yet faulted in,
 * so the very first write to any page is seen, and no empty entry is reported as written).
 * It costs 2-30 ms per GiB (the high end for a range never touched, under CPU contention),
 * which a migrated guest would otherwise spend inside its downtime: it runs on a thread of
 * its own, while the program carries on.
 *
 * The pass marks clean every page it reaches, written or not. That is harmless before the
 * agent tracks, and loses writes after: were the agent's first scan and first full copy of
 * a page to come before the pass reached it, a write between the copy and the pass would be
 * marked clean and never reported. So the thread carries a name of its own from birth (it
 * inherits its creator's, set around pthread_create), the `ok` report is written only once
 * it exists, and the agent waits for it to be gone before its first scan (uffd-wp.ts arm).
 */
#define PROTECT_THREAD_NAME GW_PROTECT_THREAD_NAME

struct protect_job {
	int uffd;
	unsigned region;
	uint64_t start;
	uint64_t length;
};

/* Held by the creator until its `ok` report is out: an error report must come after it. */
static pthread_mutex_t report_order = PTHREAD_MUTEX_INITIALIZER;

static int writeprotect(const struct protect_job *job)
{
	struct uffdio_writeprotect wp = {
		.range = {.start = job->start, .len = job->length},
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};
	return ioctl(job->uffd, UFFDIO_WRITEPROTECT, &wp);
}

static void *protect_thread(void *arg)
{
	struct protect_job job = *(struct protect_job *)arg;
	free(arg);
	pthread_mutex_lock(&report_order);
	pthread_mutex_unlock(&report_order);
	if (writeprotect(&job) < 0)
		report_error(job.region, "writeprotect", errno); /* the agent falls back to hash scanning */
	return NULL;
}

/* Starts the pass on its own thread and reports `ok_line`; without a thread, does the pass
 * here first, so that `ok` always means: done, or running on the named thread. */
static void start_writeprotect(int uffd, unsigned region, uint64_t start, uint64_t length, const char *ok_line)
{
	struct protect_job *job = malloc(sizeof(*job));
	if (job) {
		*job = (struct protect_job){.uffd = uffd, .region = region, .start = start, .length = length};
		char name[17] = {0};
		pthread_t thread;
		pthread_attr_t attr;
		int rc = -1;
		/* A thread the agent could not recognise would bring the race back: no name, no thread. */
		if (prctl(PR_GET_NAME, name) == 0 && pthread_attr_init(&attr) == 0) {
			pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
			pthread_mutex_lock(&report_order);
			if (prctl(PR_SET_NAME, PROTECT_THREAD_NAME) == 0) {
				rc = pthread_create(&thread, &attr, protect_thread, job);
				prctl(PR_SET_NAME, name);
			}
			pthread_attr_destroy(&attr);
			if (rc == 0)
				report(region, ok_line);
			pthread_mutex_unlock(&report_order);
		}
		if (rc == 0)
			return;
		free(job);
	}
	struct protect_job inline_job = {.uffd = uffd, .region = region, .start = start, .length = length};
	if (writeprotect(&inline_job) < 0)
		report_error(region, "writeprotect", errno);
	else
		report(region, ok_line);
}

/* Returns 0, or -1 with errno when post-copy was asked for and could not be set up. */
static int start_tracking(unsigned region, void *addr, size_t len)
{
	long page = sysconf(_SC_PAGESIZE);
	uint64_t length = ((uint64_t)len + (uint64_t)page - 1) & ~((uint64_t)page - 1);
	const int sock = postcopy_socket();
	const int postcopy = sock != -1;
	if (sock == -2) {
		report_error(region, "postcopy-socket", EBADF);
		errno = EBADF;
		return -1;
	}

	int uffd = open_uffd();
	if (uffd < 0) {
		int err = errno;
		report_error(region, "open", err);
		errno = err;
		return postcopy ? -1 : 0;
	}
	struct uffdio_api api = {.api = UFFD_API, .features = TRACK_FEATURES | (postcopy ? UFFD_FEATURE_MISSING_SHMEM : 0)};
	if (ioctl(uffd, UFFDIO_API, &api) < 0) {
		int err = errno;
		close(uffd);
		report_error(region, "api", err);
		errno = err;
		return postcopy ? -1 : 0;
	}
	struct uffdio_register reg = {
		.range = {.start = (uint64_t)(uintptr_t)addr, .len = length},
		.mode = UFFDIO_REGISTER_MODE_WP | (postcopy ? UFFDIO_REGISTER_MODE_MISSING : 0),
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
		int err = errno;
		close(uffd);
		report_error(region, "register", err);
		errno = err;
		return postcopy ? -1 : 0;
	}
	if (postcopy) {
		int sent = send_uffd(sock, uffd, region, (uint64_t)(uintptr_t)addr, length);
		int err = errno;
		if (sent < 0) {
			close(uffd);
			report_error(region, "send", err);
			errno = err;
			return -1;
		}
	}
	/* uffd stays open on purpose: closing it would end the tracking. */
	char line[128];
	/* Post-copy: the descriptor number here too, so that an agent restarted before the
	 * guest has every page takes it back (pidfd_getfd) and serves the faults waiting on it. */
	char uffd_note[48] = "";
	if (postcopy)
		snprintf(uffd_note, sizeof(uffd_note), " postcopy=1 uffd=%d", uffd);
	snprintf(line, sizeof(line), "ok start=0x%llx length=%llu pid=%d%s\n", (unsigned long long)(uintptr_t)addr,
		 (unsigned long long)length, (int)getpid(), uffd_note);
	start_writeprotect(uffd, region, (uint64_t)(uintptr_t)addr, length, line);
	return 0;
}

/*
 * Which region of GANGWAY_TRACK_PATH the open file `fd` is (same inode, not same name: the
 * program may have opened a symlink or /proc/self/fd/N), or -1.
 */
static int region_of(int fd)
{
	const char *list = getenv("GANGWAY_TRACK_PATH");
	if (!list || !*list)
		return -1;
	struct stat mapped;
	if (fstat(fd, &mapped) < 0)
		return -1;
	char path[PATH_MAX];
	unsigned region = 0;
	for (const char *at = list; region < GW_MAX_REGIONS; region++) {
		size_t len = strcspn(at, ":");
		if (len > 0 && len < sizeof(path)) {
			memcpy(path, at, len);
			path[len] = '\0';
			struct stat wanted;
			if (stat(path, &wanted) == 0 && mapped.st_dev == wanted.st_dev && mapped.st_ino == wanted.st_ino)
				return (int)region;
		}
		if (at[len] == '\0')
			break;
		at += len + 1;
	}
	return -1;
}

/* 0, or -1 with errno when the mapping must not be used (post-copy could not be set up). */
static int maybe_track(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	if (addr == MAP_FAILED || fd < 0 || off != 0 || !(prot & PROT_WRITE))
		return 0;
	int type = flags & MAP_TYPE;
	if (type != MAP_SHARED && type != MAP_SHARED_VALIDATE)
		return 0;
	int region = region_of(fd);
	if (region < 0)
		return 0;
	uint32_t bit = 1u << region;
	if (__atomic_fetch_or(&claimed, bit, __ATOMIC_ACQ_REL) & bit)
		return 0;
	return start_tracking((unsigned)region, addr, len);
}

static void *hooked_mmap(mmap_fn *slot, const char *name, void *addr, size_t len, int prot, int flags, int fd,
			 off_t off)
{
	mmap_fn next = resolve(slot, name);
	void *result = next ? next(addr, len, prot, flags, fd, off) : raw_mmap(addr, len, prot, flags, fd, off);
	if (result != MAP_FAILED) {
		/* The caller sees errno exactly as mmap left it, unless post-copy failed. */
		int saved = errno;
		if (maybe_track(result, len, prot, flags, fd, off) < 0) {
			int err = errno;
			munmap(result, len);
			errno = err;
			return MAP_FAILED;
		}
		errno = saved;
	}
	return result;
}

static void *standby_thread(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char byte = 0;
	ssize_t n;
	do
		n = read(fd, &byte, 1);
	while (n < 0 && errno == EINTR);
	if (n == 1 && byte == 1) {
		close(fd);
		return NULL;
	}
	kill(getpid(), SIGKILL);
	return NULL;
}

__attribute__((constructor)) static void standby_watch(void)
{
	const char *value = getenv("GANGWAY_STANDBY_FD");
	if (!value || !*value)
		return;
	char *end;
	long fd = strtol(value, &end, 10);
	/* A standby that cannot be watched must not run unwatched. */
	if (*end != '\0' || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0)
		_exit(121);
	/* Programs this one starts are not standbys. */
	unsetenv("GANGWAY_STANDBY_FD");
	pthread_attr_t attr;
	pthread_t thread;
	if (pthread_attr_init(&attr) != 0)
		_exit(121);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	char name[17] = {0};
	prctl(PR_GET_NAME, name);
	prctl(PR_SET_NAME, "gangway-standby");
	int rc = pthread_create(&thread, &attr, standby_thread, (void *)(intptr_t)fd);
	prctl(PR_SET_NAME, name);
	pthread_attr_destroy(&attr);
	if (rc != 0)
		_exit(121);
}

__attribute__((visibility("default"))) void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return hooked_mmap(&next_mmap, "mmap", addr, len, prot, flags, fd, off);
}

__attribute__((visibility("default"))) void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	return hooked_mmap(&next_mmap64, "mmap64", addr, len, prot, flags, fd, off);
}
