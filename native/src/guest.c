/*
 * gangway-guest: a process that stands in for a VM.
 *
 * Its state lives in its memory files (one per region, mapped MAP_SHARED; layout in
 * guest-layout.h) and, like a VM's devices, a little outside them: the device state, which
 * it saves when it is paused for a migration (SIGUSR1) and takes back on resume. A copy of
 * the files taken while it is paused, with that state, is a copy of the guest: a new
 * gangway-guest started on them continues where the old one stopped and checks that every
 * page holds what its version says (content in guest-content.h) and that the device state
 * belongs with the memory.
 *
 * This file runs the guest: the run loop, its signals, the resume check and the writes. The
 * command line is guest-options.c, the memory files guest-memory.c, the device state
 * guest-device.c, and the poke mode guest-poke.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "guest.h"
#include "guest-content.h"
#include "guest-device.h"
#include "guest-layout.h"
#include "guest-memory.h"
#include "guest-options.h"

#define IDLE_SLEEP_NS 50000000L

static volatile sig_atomic_t stop_requested, pause_requested;

static void on_stop_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static void on_pause_signal(int sig)
{
	(void)sig;
	pause_requested = 1;
}

_Noreturn void die(int status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("gangway-guest: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	if (status == EXIT_USAGE)
		fputs("gangway-guest: try `gangway-guest --help`\n", stderr);
	exit(status);
}

static uint64_t version_sum(struct guest *g)
{
	uint64_t sum = 0;
	for (uint64_t p = g->first_data_page; p < g->page_count; p++)
		sum += g->version[p];
	return sum;
}

static void advance_cursor(struct guest *g)
{
	struct guest_header *h = g->h;
	uint64_t next = h->pass_cursor + 1;
	if (next >= g->hot_count) {
		h->passes++;
		BARRIER();
		next = 0;
	}
	h->pass_cursor = next;
}

/*
 * A write interrupted by a stop (the file was copied mid-write): finish it exactly once.
 * Returns whether the pass cursor owes the step that write would have taken (taken once the
 * hot set is known).
 */
static bool complete_inflight(struct guest *g)
{
	struct guest_header *h = g->h;
	uint64_t page = h->inflight_page;
	uint32_t v = h->inflight_version;
	if (page == GUEST_NO_INFLIGHT)
		return false;
	if (page < g->first_data_page || page >= g->page_count ||
	    (g->version[page] != v && g->version[page] + 1 != v) || v == 0) {
		fprintf(stderr,
			"gangway-guest: %s: inconsistent in-flight write (page %" PRIu64 ", version %u); ignored\n",
			g->path, page, v);
		h->meta_errors++;
		h->inflight_page = GUEST_NO_INFLIGHT;
		return false;
	}
	write_page_content(g, page, v);
	g->version[page] = v;
	/* The stop may have come before or after total_writes++: only the version table knows. */
	uint64_t sum = version_sum(g);
	if (h->total_writes + 1 == sum)
		h->total_writes = sum;
	BARRIER();
	__atomic_store_n(&h->inflight_page, GUEST_NO_INFLIGHT, __ATOMIC_RELEASE);
	BARRIER();
	return true;
}

/* SIGUSR1 came: save the device state and stop (SIGCONT resumes). Between writes only. */
static void maybe_pause(struct guest *g)
{
	if (!pause_requested)
		return;
	pause_requested = 0;
	save_device(g);
	raise(SIGSTOP);
}

/*
 * Checks every data page once. After a post-copy (holes are pages still on their way) the
 * pages are visited in a scattered order, as a resumed VM touches its working set all over
 * its memory: the faults then land away from the source's sequential push.
 */
static void resume_check(struct guest *g, bool holes_are_zero)
{
	struct guest_header *h = g->h;
	struct extent_walk walk = {0, 0, 0};
	h->resume_stale_pages = 0;
	h->resume_checked_pages = 0;
	const uint64_t data_pages = g->page_count - g->first_data_page;
	const uint64_t stride = holes_are_zero || data_pages < 2 ? 1 : gw_coprime(data_pages, gw_hash3(h->seed, GW_TAG_PASS, h->resumes));
	const uint64_t offset = holes_are_zero || data_pages < 2 ? 0 : gw_mix64(h->resumes + h->seed) % data_pages;
	for (uint64_t i = 0; i < data_pages; i++) {
		const uint64_t p = g->first_data_page + (offset + stride * i) % data_pages;
		if (stop_requested)
			return;
		maybe_pause(g);
		bool current;
		if (holes_are_zero && page_in_hole(g, &walk, p))
			current = gw_content(&g->model, p, g->version[p], g->scratch) == NULL;
		else
			current = page_is_current(g, p, g->version[p]);
		if (!current) {
			h->stale_pages++;
			h->resume_stale_pages++;
		}
		h->checked_pages++;
		h->resume_checked_pages++;
	}
	if (version_sum(g) != h->total_writes) {
		fprintf(stderr, "gangway-guest: %s: version table sums to %" PRIu64 " but total_writes is %" PRIu64 "\n",
			g->path, version_sum(g), h->total_writes);
		h->meta_errors++;
	}
	BARRIER();
	h->resume_check_done = h->resumes;
}

static uint64_t next_hot_page(struct guest *g)
{
	struct guest_header *h = g->h;
	if (h->pass_cursor >= g->hot_count)
		h->pass_cursor = 0; /* only after a meta error; keeps the index in range */
	if (g->pass_of_ab != h->passes) {
		uint64_t r = gw_hash3(h->seed, GW_TAG_PASS, h->passes);
		g->pass_a = gw_coprime(g->hot_count, r);
		g->pass_b = gw_mix64(r) % g->hot_count;
		g->pass_of_ab = h->passes;
	}
	return g->hot[(g->pass_a * h->pass_cursor + g->pass_b) % g->hot_count];
}

/*
 * One write, ordered so that at every instruction boundary the file tells what happened:
 * the in-flight record goes up before the page changes and comes down only after the
 * version table and the write count say the page has its new version.
 */
static void write_one(struct guest *g)
{
	struct guest_header *h = g->h;
	uint64_t page = next_hot_page(g);
	uint32_t v = g->version[page];
	if (!page_is_current(g, page, v))
		h->stale_pages++;
	h->checked_pages++;

	__atomic_store_n(&h->inflight_version, v + 1, __ATOMIC_RELEASE);
	__atomic_store_n(&h->inflight_page, page, __ATOMIC_RELEASE);
	BARRIER();
	write_page_content(g, page, v + 1);
	BARRIER();
	__atomic_store_n(&g->version[page], v + 1, __ATOMIC_RELEASE);
	BARRIER();
	__atomic_store_n(&h->total_writes, h->total_writes + 1, __ATOMIC_RELEASE);
	BARRIER();
	__atomic_store_n(&h->inflight_page, GUEST_NO_INFLIGHT, __ATOMIC_RELEASE);
	BARRIER();
	advance_cursor(g);
	g->device_log = gw_hash3(g->device_log, page, v + 1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Local helpers rather than fmin/fmax: the binary is not linked with libm. */
static double dmin(double a, double b)
{
	return a < b ? a : b;
}

static double dmax(double a, double b)
{
	return a > b ? a : b;
}

/*
 * The run loop keeps SIGUSR1, SIGTERM and SIGINT blocked, and lets them in only while it
 * sleeps (ppoll swaps the mask atomically): a signal that comes while the guest writes
 * waits for the next sleep, which then returns at once. Unblocked around a plain sleep, one
 * that came between the check of its flag and the sleep would wait out the whole sleep.
 */
static sigset_t sleep_mask;

/*
 * A held signal is waiting (the write loop asks every SIGNAL_LOOK_PAGES pages). A guest that
 * has fallen behind its rate holds up to 10 ms of credit, and wrote all of it before its next
 * sleep let a SIGUSR1 in: at 800 MiB/s the pause took 13 ms (median of 30). Asking is one
 * syscall per 16 pages (64 KiB written).
 */
#define SIGNAL_LOOK_PAGES 16

static bool signal_waiting(void)
{
	sigset_t pending;
	if (sigpending(&pending) < 0)
		return false;
	return sigismember(&pending, SIGUSR1) || sigismember(&pending, SIGTERM) || sigismember(&pending, SIGINT);
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
	ppoll(NULL, 0, &ts, &sleep_mask); /* EINTR is fine: the caller re-checks the flags */
}

/*
 * Token bucket in pages. Credit accrues from CLOCK_MONOTONIC, starts empty (no burst at
 * start) and is capped at 10 ms worth (at least 16 pages), so a SIGSTOP/SIGCONT does not
 * turn into a catch-up burst. Sleeping for a few pages at a time keeps the rate smooth.
 */
static void run_loop(struct guest *g)
{
	sigset_t held;
	sigemptyset(&held);
	sigaddset(&held, SIGUSR1);
	sigaddset(&held, SIGTERM);
	sigaddset(&held, SIGINT);
	if (sigprocmask(SIG_BLOCK, &held, &sleep_mask) < 0)
		die(EXIT_SYSTEM, "sigprocmask: %s", strerror(errno));
	sigdelset(&sleep_mask, SIGUSR1);
	sigdelset(&sleep_mask, SIGTERM);
	sigdelset(&sleep_mask, SIGINT);
	double rate = (double)g->h->dirty_rate_bytes_per_sec / GUEST_PAGE_SIZE * 1e-9; /* pages per ns */
	if (rate <= 0 || g->hot_count == 0) {
		while (!stop_requested) {
			maybe_pause(g);
			sleep_ns(IDLE_SLEEP_NS);
		}
		return;
	}
	double cap = dmax(16, rate * 1e7);
	double step = dmin(16, dmax(1, rate * 1e6)); /* pages per wake-up: about one per ms */
	double tokens = 0;
	uint64_t last = now_ns();
	while (!stop_requested) {
		uint64_t now = now_ns();
		tokens = dmin(cap, tokens + (double)(now - last) * rate);
		last = now;
		unsigned written = 0;
		bool waiting = false;
		while (tokens >= 1 && !stop_requested) {
			maybe_pause(g);
			write_one(g);
			tokens -= 1;
			if (++written % SIGNAL_LOOK_PAGES == 0 && signal_waiting()) {
				waiting = true;
				break;
			}
		}
		maybe_pause(g);
		if (waiting) {
			ppoll(NULL, 0, &(struct timespec){0}, &sleep_mask); /* lets it in: EINTR at once */
			continue;
		}
		double wait = (step - tokens) / rate;
		sleep_ns((uint64_t)dmin(dmax(wait, 1000), IDLE_SLEEP_NS));
	}
}

static void install_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_stop_signal;
	sigemptyset(&sa.sa_mask);
	/* No SA_RESTART: a blocking read or sleep returns EINTR and the loop sees the flag. */
	if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0)
		die(EXIT_SYSTEM, "sigaction: %s", strerror(errno));
	sa.sa_handler = on_pause_signal;
	if (sigaction(SIGUSR1, &sa, NULL) < 0)
		die(EXIT_SYSTEM, "sigaction: %s", strerror(errno));
}

static void wait_standby(int fd)
{
	for (;;) {
		uint8_t byte;
		ssize_t n = read(fd, &byte, 1);
		if (n == 1)
			break;
		if (n == 0)
			exit(0); /* migration aborted: leave the file alone */
		if (errno == EINTR) {
			if (stop_requested)
				exit(0);
			continue;
		}
		die(EXIT_SYSTEM, "--standby-fd %d: read: %s", fd, strerror(errno));
	}
	close(fd);
}

/*
 * The moment the guest runs, on CLOCK_MONOTONIC (the agent's clock too): the agent reads
 * the line when its event loop gets to it, which during a post-copy start is after serving
 * the guest's first faults, and that wait is not the guest's downtime.
 */
void announce_running(void)
{
	struct timespec now;
	if (clock_gettime(CLOCK_MONOTONIC, &now) != 0)
		die(EXIT_SYSTEM, "clock_gettime: %s", strerror(errno));
	printf("running pid=%d mono_ns=%" PRIu64 "\n", (int)getpid(),
	       (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec);
	if (fflush(stdout) != 0)
		die(EXIT_SYSTEM, "stdout: write: %s", strerror(errno));
}

static int cmd_run(const struct options *o)
{
	struct guest g;
	memset(&g, 0, sizeof(g));
	gw_tokens_init();
	install_signals();
	if (o->have_standby)
		wait_standby(o->standby_fd);

	open_and_map(&g, o);
	g.device_path = o->device_state;
	struct guest_header *h = g.h;
	bool resuming = !o->create;
	bool owed_step = false;
	if (o->create) {
		create_guest(&g, o);
		g.device_log = device_initial(h);
	} else {
		setup_model(&g);
		/* Before the in-flight write is completed: the state was saved between writes. */
		load_device(&g);
		owed_step = complete_inflight(&g);
		h->resumes++;
		if (o->have_dirty_rate)
			h->dirty_rate_bytes_per_sec = o->dirty_rate;
	}
	announce_running();
	if (resuming) {
		setup_hot_list(&g);
		if (h->hot_page_count != g.hot_count) {
			fprintf(stderr, "gangway-guest: %s: header says %" PRIu64 " hot pages, the seed gives %" PRIu64 "\n",
				g.path, h->hot_page_count, g.hot_count);
			h->meta_errors++;
			h->hot_page_count = g.hot_count;
		}
		if (owed_step && g.hot_count > 0)
			advance_cursor(&g);
		h->passes_at_resume = h->passes;
	}
	if (resuming)
		resume_check(&g, !o->postcopy);
	run_loop(&g);
	/* A clean exit keeps the device state with the memory, for a later resume. */
	save_device(&g);
	for (unsigned r = 0; r < g.region_count; r++) {
		munmap(g.region[r].base, g.region[r].pages * GUEST_PAGE_SIZE);
		close(g.region[r].fd);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	const char *mode = argv[1];
	if (strcmp(mode, "--help") == 0 || strcmp(mode, "-h") == 0 || strcmp(mode, "help") == 0) {
		usage(stdout);
		return 0;
	}
	if (strcmp(mode, "run") != 0 && strcmp(mode, "poke") != 0)
		die(EXIT_USAGE, "unknown mode '%s' (allowed: run, poke, --help)", mode);
	if (sysconf(_SC_PAGESIZE) != GUEST_PAGE_SIZE)
		die(EXIT_SYSTEM, "the system page size is %ld; gangway-guest needs %u", sysconf(_SC_PAGESIZE),
		    GUEST_PAGE_SIZE);
	struct options o;
	parse_options(mode, argc - 2, argv + 2, &o);
	return strcmp(mode, "run") == 0 ? cmd_run(&o) : cmd_poke(&o);
}
