/*
 * The device state (guest-device.h): a running digest of the guest's writes, kept in its
 * own file next to the memory files while the guest is paused or stopped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "guest.h"
#include "guest-content.h"
#include "guest-device.h"
#include "guest-layout.h"
#include "guest-memory.h"

#define DEVICE_TAG 0x646576696365ull /* "device" */

static uint64_t device_digest(const struct guest_device *d)
{
	return gw_hash4(gw_hash3(d->seed, d->saves, d->writes), d->log, DEVICE_TAG, 1);
}

/* The device state of a guest that never saved one (a fresh guest, or one whose state was lost). */
uint64_t device_initial(const struct guest_header *h)
{
	return gw_hash3(h->seed, DEVICE_TAG, 0);
}

/*
 * Writes the device state to --device-state (0600, atomically: a reader sees the whole
 * state or none) and records in the header which save the memory goes with. An older file
 * goes first, so that a failed save leaves no state to be taken for this one.
 */
void save_device(struct guest *g)
{
	struct guest_header *h = g->h;
	if (!g->device_path)
		return;
	struct guest_device d;
	memset(&d, 0, sizeof(d));
	memcpy(d.magic, GUEST_DEVICE_MAGIC, 8);
	d.seed = h->seed;
	d.saves = h->device_saves + 1;
	d.writes = h->total_writes;
	d.log = g->device_log;
	d.digest = device_digest(&d);
	char tmp[PATH_MAX];
	const char *failed = NULL;
	int err = 0;
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", g->device_path) >= (int)sizeof(tmp)) {
		failed = "path too long", err = ENAMETOOLONG;
	} else if ((unlink(g->device_path) < 0 && errno != ENOENT) || (unlink(tmp) < 0 && errno != ENOENT)) {
		failed = "unlink", err = errno;
	} else {
		int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (fd < 0) {
			failed = "open", err = errno;
		} else {
			ssize_t n = write(fd, &d, sizeof(d));
			err = errno;
			if (close(fd) < 0 && n == (ssize_t)sizeof(d))
				n = -1, err = errno;
			if (n != (ssize_t)sizeof(d))
				failed = "write", err = n < 0 ? err : EIO;
			else if (rename(tmp, g->device_path) < 0)
				failed = "rename", err = errno;
			if (failed)
				unlink(tmp);
		}
	}
	if (failed) {
		fprintf(stderr, "gangway-guest: --device-state %s: %s: %s (the device state was not saved)\n", g->device_path,
			failed, strerror(err));
		return;
	}
	h->device_saves = d.saves;
	h->device_digest = d.digest;
	BARRIER();
}

/*
 * On resume: takes back the device state saved with this memory, and removes its file. A
 * state that is lost, stale, another guest's or corrupt is the guest's own check failing,
 * like a stale page: counted in device_errors and said on stderr; the guest carries on
 * with a fresh state.
 */
void load_device(struct guest *g)
{
	struct guest_header *h = g->h;
	g->device_log = device_initial(h);
	if (h->device_saves == 0)
		return; /* never saved: nothing of it lives outside the memory */
	struct guest_device d;
	char problem[256] = "";
	if (!g->device_path) {
		snprintf(problem, sizeof(problem), "lost (the guest was started without --device-state)");
	} else {
		int fd = open(g->device_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0) {
			snprintf(problem, sizeof(problem), "%s (%s)", errno == ENOENT ? "lost" : "unreadable", strerror(errno));
		} else {
			uint8_t extra;
			ssize_t n = read(fd, &d, sizeof(d));
			ssize_t more = n == (ssize_t)sizeof(d) ? read(fd, &extra, 1) : 0;
			close(fd);
			if (n != (ssize_t)sizeof(d) || more != 0)
				snprintf(problem, sizeof(problem), "corrupt (not %zu bytes)", sizeof(d));
			else if (memcmp(d.magic, GUEST_DEVICE_MAGIC, 8) != 0 || d.digest != device_digest(&d))
				snprintf(problem, sizeof(problem), "corrupt (bad magic or digest)");
			else if (d.seed != h->seed)
				snprintf(problem, sizeof(problem), "another guest's (seed %" PRIu64 ", this guest's %" PRIu64 ")",
					 d.seed, h->seed);
			else if (d.saves != h->device_saves || d.digest != h->device_digest || d.writes != h->total_writes)
				snprintf(problem, sizeof(problem),
					 "stale (save %" PRIu64 " after %" PRIu64 " writes; the memory goes with save %" PRIu64
					 " after %" PRIu64 " writes)",
					 d.saves, d.writes, h->device_saves, h->total_writes);
		}
	}
	if (problem[0]) {
		fprintf(stderr, "gangway-guest: %s: device state %s\n", g->path, problem);
		h->device_errors++;
		return;
	}
	g->device_log = d.log;
	h->device_loads++;
	unlink(g->device_path);
}
