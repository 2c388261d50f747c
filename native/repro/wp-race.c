/*
 * wp-race: does uffd-wp dirty tracking (the gangway-track.so shim in a writer, PAGEMAP_SCAN
 * from another process) miss writes? See README.md in this directory.
 *
 * The parent plays the agent: it starts a writer (this program, "writer" mode) with the
 * shim preloaded on a /dev/shm file, waits for the shim's report, then runs pre-copy rounds
 * as source.ts does: an arm scan (read-and-reprotect, result dropped), round 0 copies every
 * page into `sent`, every later round scans and copies the pages the scan reported. At the
 * end it stops the writer (SIGSTOP), scans and copies once more, and compares `sent` with
 * the memory: a page that differs is a miss, as the switchover repair would find it.
 *
 * A second oracle checks every scan: after scan i the parent compares every page with
 * what it saw after scan i-1. A page that changed between those two looks was written after
 * scan i-1 returned, so scan i or scan i+1 must report it; one that neither reports is an
 * oracle miss (with the round it was last copied in).
 *
 * The factors to vary:
 *   --map-mib N        the writer maps N MiB (sparse) and writes only the last --mib of it:
 *                      the shim's write-protect pass, which walks the whole mapping in
 *                      address order, reaches the written window last
 *   --wait-protected   the scanner waits until the shim's pass thread (`gangway-wp`) is gone
 *                      before its first scan, as the agent does since the fix
 *   --touch MODE       what the writer does right after mmap: none, read or write every page
 *                      first and then write at random; sweep: write every page once, in order,
 *                      one per --writer-sleep-us (as gangway-guest's pass over its hot set);
 *                      hot=N: rewrite N whole pages over and over (TLB entries stay warm)
 *   --guest PATH       the writer is gangway-guest itself (run --create, --dirty-rate)
 *   --round0-ms N      round 0 copies the memory over N ms instead of at once
 *   --gather-delay-ms  wait this long after the report before the first scan
 *   --busy N, --compact  N spinning processes; compact all memory in a loop (page migration)
 *
 *   wp-race --shim PATH [--mib N] [--rounds N] [--round-ms N] [--round0-ms N] [--gather-delay-ms N]
 *           [--wait-protected] [--map-mib N] [--touch none|read|write|sweep|hot=N] [--busy N] [--compact] [--runs N]
 *           [--writer-sleep-us N] [--seed N] [--guest GANGWAY_GUEST --dirty-rate BYTES_PER_SEC]
 *
 * Prints one line per run (misses=... round0=... oracle=...) and a total; exits 1 when
 * any run missed a write, 0 when none did, 2 on a usage or system error.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "uapi-compat.h"

#define PAGE 4096u

static void die(const char *what)
{
	fprintf(stderr, "wp-race: %s: %s\n", what, strerror(errno));
	exit(2);
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_us(long us)
{
	struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* ---- writer: the guest ---- */

/*
 * Maps FILE (the shim claims the mapping), then writes at once and forever, so that writes
 * overlap the shim's set-up and the scanner's first rounds. Every write stores a new
 * generation number in a page, so every write changes the page. touch=read/write first
 * faults every page in (as gangway-guest's check or creation does), none leaves pages
 * unpopulated until the random writes reach them.
 */
static int writer_main(int argc, char **argv)
{
	if (argc != 7)
		return 2;
	const char *path = argv[1];
	uint64_t map_pages = strtoull(argv[2], NULL, 10);
	uint64_t pages = strtoull(argv[3], NULL, 10); /* the window: the last `pages` of the mapping */
	const char *touch = argv[4];
	long sleep_us_arg = strtol(argv[5], NULL, 10);
	unsigned seed = (unsigned)strtoul(argv[6], NULL, 10);
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("writer: open");
	volatile uint8_t *map = mmap(NULL, map_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED)
		die("writer: mmap");
	volatile uint8_t *base = map + (map_pages - pages) * PAGE;
	uint64_t gen = 1;
	if (strcmp(touch, "read") == 0) {
		uint64_t sum = 0;
		for (uint64_t p = 0; p < pages; p++)
			sum += base[p * PAGE];
		if (sum == 42)
			fputs("", stderr);
	} else if (strcmp(touch, "write") == 0) {
		for (uint64_t p = 0; p < pages; p++)
			*(volatile uint64_t *)(base + p * PAGE + 8) = gen++;
	} else if (strcmp(touch, "sweep") == 0) {
		/* Every page once, in order, one per sleep: as gangway-guest's pass over its hot
		 * set, a page written after the scanner copied it is not written again. */
		for (uint64_t p = 0; p < pages; p++) {
			*(volatile uint64_t *)(base + p * PAGE + 8) = gen++;
			if (sleep_us_arg > 0)
				sleep_us(sleep_us_arg);
		}
		for (;;)
			pause();
	}
	/* hot=N: rewrite whole pages of an N-page set in turn (as gangway-guest rewrites its
	 * hot set, and with their TLB entries warm); otherwise 8-byte writes at random pages. */
	uint64_t hot = strncmp(touch, "hot=", 4) == 0 ? strtoull(touch + 4, NULL, 10) : 0;
	if (hot > pages)
		hot = pages;
	uint64_t x = seed * 2654435761u + 1;
	for (uint64_t n = 0;; n++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		if (hot) {
			uint64_t p = (n % hot) * (pages / hot);
			for (unsigned w = 0; w < PAGE / 8; w++)
				((volatile uint64_t *)(base + p * PAGE))[w] = gen;
		} else {
			uint64_t p = x % pages;
			*(volatile uint64_t *)(base + p * PAGE + 8 * (1 + (gen & 255))) = gen;
		}
		gen++;
		if (sleep_us_arg > 0 && (n & 63) == 63)
			sleep_us(sleep_us_arg);
	}
}

/* ---- scanner: the agent ---- */

struct scan_result {
	uint8_t *hit; /* per page: reported by this scan */
	uint64_t count;
};

static int pagemap_fd;
static uint64_t region_start, region_pages;

/* As pagemapScan (native/src/addon/pagemap.c): loop over walk_end until the range is covered. */
static void scan(uint8_t *hit, uint64_t *count)
{
	static struct page_region vec[1024];
	uint64_t end = region_start + region_pages * PAGE, cur = region_start;
	if (hit)
		memset(hit, 0, region_pages);
	if (count)
		*count = 0;
	while (cur < end) {
		struct pm_scan_arg arg;
		memset(&arg, 0, sizeof arg);
		arg.size = sizeof arg;
		arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
		arg.start = cur;
		arg.end = end;
		arg.vec = (uint64_t)(uintptr_t)vec;
		arg.vec_len = 1024;
		arg.category_mask = PAGE_IS_WRITTEN;
		arg.return_mask = PAGE_IS_WRITTEN;
		long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("PAGEMAP_SCAN");
		}
		for (long i = 0; i < n; i++)
			for (uint64_t a = vec[i].start; a < vec[i].end; a += PAGE) {
				uint64_t p = (a - region_start) / PAGE;
				if (hit)
					hit[p] = 1;
				if (count)
					(*count)++;
			}
		if (arg.walk_end >= end)
			break;
		if (arg.walk_end <= cur) {
			errno = EIO;
			die("PAGEMAP_SCAN made no progress");
		}
		cur = arg.walk_end;
	}
}

struct options {
	const char *shim;
	uint64_t mib;
	uint64_t map_mib; /* the writer maps this much; the window (mib) is its end */
	int rounds;
	int round_ms;
	int round0_ms;
	int gather_delay_ms;
	bool wait_protected;
	const char *touch;
	int busy;
	bool compact;
	int runs;
	long writer_sleep_us;
	unsigned seed;
	const char *guest; /* gangway-guest binary: it is the writer instead of writer_main */
	uint64_t dirty_rate;
};

static pid_t spawn_busy(void)
{
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		alarm(120); /* never outlive a crashed parent for long */
		for (volatile uint64_t i = 0;; i++)
			;
	}
	return pid;
}

/* Page migration of the writer's pages: compact all memory, over and over. */
static pid_t spawn_compactor(void)
{
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		alarm(120);
		for (;;) {
			int fd = open("/proc/sys/vm/compact_memory", O_WRONLY);
			if (fd < 0 || write(fd, "1", 1) != 1)
				_exit(3);
			close(fd);
		}
	}
	return pid;
}

/* Whether a thread of pid is named gangway-wp: the shim's write-protect pass still runs. */
static bool protect_pass_running(pid_t pid)
{
	char path[300], comm[32];
	snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
	DIR *d = opendir(path);
	if (!d)
		return false;
	bool running = false;
	struct dirent *e;
	while (!running && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/proc/%d/task/%s/comm", (int)pid, e->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, comm, sizeof comm - 1);
		close(fd);
		running = n > 0 && strncmp(comm, "gangway-wp\n", 11) == 0;
	}
	closedir(d);
	return running;
}

static bool report_ready(const char *path, uint64_t *start, uint64_t *length)
{
	char line[256] = {0};
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	ssize_t n = read(fd, line, sizeof line - 1);
	close(fd);
	if (n <= 0)
		return false;
	if (strncmp(line, "ok ", 3) != 0) {
		fprintf(stderr, "wp-race: shim report: %s", line);
		exit(2);
	}
	unsigned long long s, l;
	if (sscanf(line, "ok start=0x%llx length=%llu", &s, &l) != 2)
		return false;
	*start = s;
	*length = l;
	return true;
}

struct run_result {
	uint64_t misses, misses_round0, oracle, oracle_round0, reported;
	double ready_ms;
};

static struct run_result run_once(const struct options *o, const char *self, int run)
{
	struct run_result r = {0};
	uint64_t pages = o->mib * 1024 * 1024 / PAGE;
	uint64_t map_pages = (o->map_mib > o->mib ? o->map_mib : o->mib) * 1024 * 1024 / PAGE;
	uint64_t window = map_pages - pages; /* first page of the window */
	char file[128], report[160];
	snprintf(file, sizeof file, "/dev/shm/wp-race-%d-%d", (int)getpid(), run);
	snprintf(report, sizeof report, "/dev/shm/wp-race-%d-%d.track", (int)getpid(), run);
	unlink(file);
	unlink(report);
	int fd = -1;
	if (!o->guest) {
		fd = open(file, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd < 0 || ftruncate(fd, (off_t)(map_pages * PAGE)) < 0)
			die("memory file");
	}
	uint8_t *sent = malloc(pages * PAGE), *seen = malloc(pages * PAGE);
	uint8_t *hit_prev = calloc(pages, 1), *hit = calloc(pages, 1), *changed_prev = calloc(pages, 1);
	int8_t *last_round = calloc(pages, 1);
	if (!sent || !seen || !hit_prev || !hit || !changed_prev || !last_round)
		die("memory");

	pid_t busy[64];
	for (int i = 0; i < o->busy && i < 64; i++)
		busy[i] = spawn_busy();
	pid_t compactor = o->compact ? spawn_compactor() : -1;

	char map_arg[32], pages_arg[32], sleep_arg[32], seed_arg[32];
	snprintf(map_arg, sizeof map_arg, "%llu", (unsigned long long)map_pages);
	snprintf(pages_arg, sizeof pages_arg, "%llu", (unsigned long long)pages);
	snprintf(sleep_arg, sizeof sleep_arg, "%ld", o->writer_sleep_us);
	snprintf(seed_arg, sizeof seed_arg, "%u", o->seed + (unsigned)run);
	int out[2] = {-1, -1};
	if (o->guest && pipe2(out, O_CLOEXEC) < 0)
		die("pipe");
	double t0 = now_ms();
	pid_t writer = fork();
	if (writer < 0)
		die("fork");
	if (writer == 0) {
		setenv("LD_PRELOAD", o->shim, 1);
		setenv("GANGWAY_TRACK_PATH", file, 1);
		setenv("GANGWAY_TRACK_REPORT", report, 1);
		if (o->guest) {
			char bytes_arg[32], rate_arg[32];
			snprintf(bytes_arg, sizeof bytes_arg, "%llu", (unsigned long long)(pages * PAGE));
			snprintf(rate_arg, sizeof rate_arg, "%llu", (unsigned long long)o->dirty_rate);
			dup2(out[1], 1);
			execl(o->guest, o->guest, "run", "--memory-file", file, "--create", "--memory-bytes", bytes_arg,
			      "--seed", seed_arg, "--dirty-rate", rate_arg, (char *)NULL);
			_exit(127);
		}
		execl(self, self, "writer", file, map_arg, pages_arg, o->touch, sleep_arg, seed_arg, (char *)NULL);
		_exit(127);
	}
	uint64_t start = 0, length = 0;
	while (!report_ready(report, &start, &length)) {
		if (now_ms() - t0 > 10000) {
			errno = ETIMEDOUT;
			die("waiting for the shim's report");
		}
		sleep_us(100);
	}
	if (o->guest) {
		/* As the agent does: the guest counts as started once it says `running` (after it
		 * wrote its initial memory, with pwrite, which no tracker sees). */
		close(out[1]);
		char buf[256];
		size_t have = 0;
		while (!memmem(buf, have, "running", 7)) {
			ssize_t n = read(out[0], buf + have, sizeof buf - 1 - have);
			if (n <= 0)
				die("waiting for the guest's `running`");
			have += (size_t)n;
		}
		close(out[0]);
	}
	if (o->wait_protected)
		while (protect_pass_running(writer))
			sleep_us(200);
	r.ready_ms = now_ms() - t0;
	if (length != map_pages * PAGE) {
		errno = EINVAL;
		die("shim report length");
	}
	region_start = start + window * PAGE;
	region_pages = pages;
	if (o->guest) {
		fd = open(file, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			die("open the guest's memory file");
	}
	/* The agent's own view of the guest's memory: a separate mapping, which the tracking
	 * never sees (tracking is per page table). */
	uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ, MAP_SHARED, fd, (off_t)(window * PAGE));
	if (mem == MAP_FAILED)
		die("mmap the memory file");
	if (o->gather_delay_ms)
		sleep_us(o->gather_delay_ms * 1000L);
	char pm[64];
	snprintf(pm, sizeof pm, "/proc/%d/pagemap", (int)writer);
	pagemap_fd = open(pm, O_RDONLY | O_CLOEXEC);
	if (pagemap_fd < 0)
		die("open pagemap");

	/* arm, then round 0 reads every page. */
	scan(NULL, NULL);
	/* Round 0 can be spread over round0_ms, as a real first round takes a while. */
	const uint64_t chunk = 256;
	for (uint64_t p = 0; p < pages; p += chunk) {
		uint64_t n = pages - p < chunk ? pages - p : chunk;
		memcpy(sent + p * PAGE, mem + p * PAGE, n * PAGE);
		memcpy(seen + p * PAGE, sent + p * PAGE, n * PAGE);
		if (o->round0_ms)
			sleep_us((long)(o->round0_ms * 1000.0 * n / pages));
	}
	memset(hit_prev, 1, pages); /* round 0 "reported" every page */
	for (int round = 1; round <= o->rounds + 1; round++) {
		bool final = round == o->rounds + 1;
		if (final) {
			kill(writer, SIGSTOP);
			int st;
			waitpid(writer, &st, WUNTRACED);
		} else {
			sleep_us(o->round_ms * 1000L);
		}
		uint64_t count;
		scan(hit, &count);
		r.reported += count;
		/* Oracle: pages that changed between the last two looks must be in one of the two
		 * scans that bracket the change. */
		for (uint64_t p = 0; p < pages; p++) {
			if (changed_prev[p] && !hit_prev[p] && !hit[p]) {
				r.oracle++;
				if (last_round[p] == 0)
					r.oracle_round0++;
			}
			uint8_t *now = mem + p * PAGE, *before = seen + p * PAGE;
			changed_prev[p] = memcmp(now, before, PAGE) != 0;
			if (changed_prev[p])
				memcpy(before, now, PAGE);
			if (hit[p]) {
				memcpy(sent + p * PAGE, now, PAGE);
				last_round[p] = (int8_t)(round > 127 ? 127 : round);
			}
		}
		uint8_t *t = hit_prev;
		hit_prev = hit;
		hit = t;
	}
	for (uint64_t p = 0; p < pages; p++) {
		if (memcmp(sent + p * PAGE, mem + p * PAGE, PAGE) != 0) {
			r.misses++;
			if (last_round[p] == 0)
				r.misses_round0++;
		}
	}
	kill(writer, SIGKILL);
	waitpid(writer, NULL, 0);
	if (compactor > 0) {
		kill(compactor, SIGKILL);
		waitpid(compactor, NULL, 0);
	}
	for (int i = 0; i < o->busy && i < 64; i++) {
		kill(busy[i], SIGKILL);
		waitpid(busy[i], NULL, 0);
	}
	close(pagemap_fd);
	munmap(mem, pages * PAGE);
	close(fd);
	unlink(file);
	unlink(report);
	free(sent);
	free(seen);
	free(hit_prev);
	free(hit);
	free(changed_prev);
	free(last_round);
	return r;
}

static void usage(void)
{
	fputs("usage: wp-race --shim PATH [--mib N] [--rounds N] [--round-ms N] [--round0-ms N] [--gather-delay-ms N]\n"
	      "               [--wait-protected] [--map-mib N] [--touch none|read|write|sweep|hot=N] [--busy N] [--compact] [--runs N]\n"
	      "               [--writer-sleep-us N] [--seed N] [--guest GANGWAY_GUEST --dirty-rate BYTES_PER_SEC]\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "writer") == 0)
		return writer_main(argc - 1, argv + 1);
	struct options o = {.dirty_rate = 10u << 20, .mib = 64, .rounds = 5, .round_ms = 20, .touch = "none", .runs = 10, .seed = 1};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (strcmp(a, "--compact") == 0) {
			o.compact = true;
			continue;
		}
		if (strcmp(a, "--wait-protected") == 0) {
			o.wait_protected = true;
			continue;
		}
		if (!v)
			usage();
		i++;
		if (strcmp(a, "--shim") == 0)
			o.shim = v;
		else if (strcmp(a, "--mib") == 0)
			o.mib = strtoull(v, NULL, 10);
		else if (strcmp(a, "--map-mib") == 0)
			o.map_mib = strtoull(v, NULL, 10);
		else if (strcmp(a, "--rounds") == 0)
			o.rounds = atoi(v);
		else if (strcmp(a, "--round-ms") == 0)
			o.round_ms = atoi(v);
		else if (strcmp(a, "--round0-ms") == 0)
			o.round0_ms = atoi(v);
		else if (strcmp(a, "--gather-delay-ms") == 0)
			o.gather_delay_ms = atoi(v);
		else if (strcmp(a, "--touch") == 0)
			o.touch = v;
		else if (strcmp(a, "--busy") == 0)
			o.busy = atoi(v);
		else if (strcmp(a, "--runs") == 0)
			o.runs = atoi(v);
		else if (strcmp(a, "--writer-sleep-us") == 0)
			o.writer_sleep_us = strtol(v, NULL, 10);
		else if (strcmp(a, "--guest") == 0)
			o.guest = v;
		else if (strcmp(a, "--dirty-rate") == 0)
			o.dirty_rate = strtoull(v, NULL, 10);
		else if (strcmp(a, "--seed") == 0)
			o.seed = (unsigned)strtoul(v, NULL, 10);
		else
			usage();
	}
	if (!o.shim || o.mib == 0 || o.runs < 1 || o.rounds < 0)
		usage();
	if (strcmp(o.touch, "none") && strcmp(o.touch, "read") && strcmp(o.touch, "write") && strcmp(o.touch, "sweep") &&
	    strncmp(o.touch, "hot=", 4))
		usage();
	char self[4096];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n < 0)
		die("readlink /proc/self/exe");
	self[n] = '\0';
	uint64_t total = 0, bad_runs = 0;
	for (int run = 0; run < o.runs; run++) {
		struct run_result r = run_once(&o, self, run);
		printf("run %d: misses=%llu round0=%llu oracle=%llu oracle_round0=%llu reported=%llu ready_ms=%.1f\n", run,
		       (unsigned long long)r.misses, (unsigned long long)r.misses_round0, (unsigned long long)r.oracle,
		       (unsigned long long)r.oracle_round0, (unsigned long long)r.reported, r.ready_ms);
		fflush(stdout);
		total += r.misses + r.oracle;
		bad_runs += (r.misses + r.oracle) > 0;
	}
	printf("total: %llu of %d runs missed writes (%llu misses)\n", (unsigned long long)bad_runs, o.runs,
	       (unsigned long long)total);
	return total ? 1 : 0;
}
