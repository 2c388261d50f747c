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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "gangway-abi.h"
#include "guest-content.h"
#include "guest-layout.h"

/* The agent reads these offsets from the file; they must never move. */
_Static_assert(offsetof(struct guest_header, magic) == 0, "magic");
_Static_assert(offsetof(struct guest_header, layout_version) == 8, "layout_version");
_Static_assert(offsetof(struct guest_header, page_size) == 12, "page_size");
_Static_assert(offsetof(struct guest_header, memory_bytes) == 16, "memory_bytes");
_Static_assert(offsetof(struct guest_header, page_count) == 24, "page_count");
_Static_assert(offsetof(struct guest_header, seed) == 32, "seed");
_Static_assert(offsetof(struct guest_header, image_seed) == 40, "image_seed");
_Static_assert(offsetof(struct guest_header, shared_permille) == 48, "shared_permille");
_Static_assert(offsetof(struct guest_header, hot_permille) == 52, "hot_permille");
_Static_assert(offsetof(struct guest_header, profile) == 56, "profile");
_Static_assert(offsetof(struct guest_header, first_data_page) == 60, "first_data_page");
_Static_assert(offsetof(struct guest_header, dirty_rate_bytes_per_sec) == 64, "dirty_rate_bytes_per_sec");
_Static_assert(offsetof(struct guest_header, total_writes) == 72, "total_writes");
_Static_assert(offsetof(struct guest_header, passes) == 80, "passes");
_Static_assert(offsetof(struct guest_header, pass_cursor) == 88, "pass_cursor");
_Static_assert(offsetof(struct guest_header, stale_pages) == 96, "stale_pages");
_Static_assert(offsetof(struct guest_header, checked_pages) == 104, "checked_pages");
_Static_assert(offsetof(struct guest_header, inflight_page) == 112, "inflight_page");
_Static_assert(offsetof(struct guest_header, inflight_version) == 120, "inflight_version");
_Static_assert(offsetof(struct guest_header, resumes) == 124, "resumes");
_Static_assert(offsetof(struct guest_header, resume_stale_pages) == 128, "resume_stale_pages");
_Static_assert(offsetof(struct guest_header, resume_checked_pages) == 136, "resume_checked_pages");
_Static_assert(offsetof(struct guest_header, resume_check_done) == 144, "resume_check_done");
_Static_assert(offsetof(struct guest_header, meta_errors) == 148, "meta_errors");
_Static_assert(offsetof(struct guest_header, hot_page_count) == 152, "hot_page_count");
_Static_assert(offsetof(struct guest_header, passes_at_resume) == 160, "passes_at_resume");
_Static_assert(offsetof(struct guest_header, region_count) == 168, "region_count");
_Static_assert(offsetof(struct guest_header, device_loads) == 172, "device_loads");
_Static_assert(offsetof(struct guest_header, device_saves) == 176, "device_saves");
_Static_assert(offsetof(struct guest_header, device_digest) == 184, "device_digest");
_Static_assert(offsetof(struct guest_header, device_errors) == 192, "device_errors");
_Static_assert(offsetof(struct guest_header, region_bytes) == 200, "region_bytes");
_Static_assert(sizeof(struct guest_header) == 328, "guest_header size");
_Static_assert(sizeof(struct guest_device) == 48, "guest_device size");
_Static_assert(GUEST_MAX_REGIONS == GW_MAX_REGIONS, "the shim tracks as many regions as a guest has");
_Static_assert(sizeof(gw_token_seed) / sizeof(gw_token_seed[0]) <= 256, "token table overflow");

#define EXIT_USAGE 2
#define EXIT_SYSTEM 3
#define MIN_MEMORY_BYTES (64ull << 10)
#define MAX_MEMORY_BYTES (1ull << 40)
#define IDLE_SLEEP_NS 50000000L

/* Keeps the compiler from moving memory accesses across it; the hardware needs nothing
 * more, because whoever copies the file does so while this process is stopped. */
#define BARRIER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

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

static void usage(FILE *out)
{
	fprintf(out,
		"usage:\n"
		"  gangway-guest run --memory-file PATH [--memory-file PATH ...] [--create --memory-bytes N[,N...]\n"
		"                    [--profile zero|os-image|random] [--seed N]\n"
		"                    [--image-seed N --shared FRACTION] [--hot FRACTION]]\n"
		"                    [--dirty-rate BYTES_PER_SEC] [--device-state PATH] [--standby-fd FD] [--postcopy]\n"
		"  gangway-guest poke --memory-file PATH --memory-bytes N\n"
		"  gangway-guest --help\n"
		"\n"
		"run: a synthetic guest whose state is its memory files (mapped MAP_SHARED) and a device state.\n"
		"  --memory-file PATH one memory region (a file); repeat it for more regions, in order (at most 16)\n"
		"  --create           create the files (they must not exist yet) and write a fresh guest;\n"
		"                     without it, resume the guest in existing files and verify every page\n"
		"  --memory-bytes N   each file's size in bytes, one per --memory-file, separated by commas:\n"
		"                     multiples of 4096, 65536 .. 2^40 in all (--create only); the first\n"
		"                     region also holds the header and a 4-byte version per page\n"
		"  --profile P        initial content: zero, os-image (default) or random (--create only)\n"
		"  --seed N           content seed (default 1; --create only)\n"
		"  --image-seed N     seed of the shared image (default 0; --create only)\n"
		"  --shared FRACTION  fraction in [0,1] of pages holding shared-image blocks (default 0)\n"
		"  --hot FRACTION     fraction in [0,1] of data pages the guest rewrites (default 0.25)\n"
		"  --dirty-rate N     bytes written per second (default 0, or the file's rate on resume)\n"
		"  --device-state PATH  where the device state goes when SIGUSR1 pauses the guest (it then\n"
		"                     stops itself, SIGCONT resumes it) and on a clean exit; on resume it is\n"
		"                     read from there, checked against the memory, and removed\n"
		"  --standby-fd FD    first block reading FD: EOF exits 0 untouched, one byte starts\n"
		"  --postcopy         holes in the file are pages still on their way (post-copy): the\n"
		"                     resume check reads every page instead of taking a hole as zeros\n"
		"  Prints `running pid=PID` once the file is mapped; SIGTERM/SIGINT exit 0.\n"
		"poke: map the file (created or grown to N bytes) and obey stdin lines\n"
		"  `fill PAGE BYTE`, `touch PAGE`, `read PAGE`, answering `ok` to each, and\n"
		"  `byte PAGE`, answering `ok N` with the page's last byte.\n"
		"exit status: 0 ok, 2 bad usage, 3 file, layout or system error\n");
}

static _Noreturn void die(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static _Noreturn void die(int status, const char *fmt, ...)
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

/* ---- argument parsing ---- */

struct options {
	const char *memory_file; /* the first region's */
	const char *memory_files[GUEST_MAX_REGIONS];
	unsigned file_count;
	const char *device_state;
	uint64_t region_bytes[GUEST_MAX_REGIONS];
	unsigned region_sizes;
	bool create;
	bool have_memory_bytes, have_profile, have_seed, have_image_seed, have_shared, have_hot;
	bool have_dirty_rate, have_standby;
	bool postcopy;
	uint64_t memory_bytes;
	uint32_t profile;
	uint64_t seed;
	uint64_t image_seed;
	uint32_t shared_permille;
	uint32_t hot_permille;
	uint64_t dirty_rate;
	int standby_fd;
};

static uint64_t parse_u64(const char *flag, const char *value)
{
	/* strtoull alone would accept signs, spaces and hex. */
	if (value[0] == '\0' || strspn(value, "0123456789") != strlen(value))
		die(EXIT_USAGE, "%s: '%s' is not a non-negative decimal integer", flag, value);
	errno = 0;
	unsigned long long v = strtoull(value, NULL, 10);
	if (errno == ERANGE)
		die(EXIT_USAGE, "%s: '%s' is too large (at most %llu)", flag, value, ULLONG_MAX);
	return v;
}

static uint32_t parse_fraction(const char *flag, const char *value)
{
	char *end;
	errno = 0;
	double v = strtod(value, &end);
	if (value[0] == '\0' || *end != '\0' || errno != 0 || !isfinite(v) || v < 0 || v > 1)
		die(EXIT_USAGE, "%s: '%s' is not a decimal fraction in [0,1]", flag, value);
	return (uint32_t)(v * 1000 + 0.5);
}

static uint32_t parse_profile(const char *flag, const char *value)
{
	if (strcmp(value, "zero") == 0)
		return GUEST_PROFILE_ZERO;
	if (strcmp(value, "os-image") == 0)
		return GUEST_PROFILE_OS_IMAGE;
	if (strcmp(value, "random") == 0)
		return GUEST_PROFILE_RANDOM;
	die(EXIT_USAGE, "%s: '%s' is not a profile (allowed: zero, os-image, random)", flag, value);
}

static uint64_t check_memory_bytes(const char *flag, const char *value)
{
	uint64_t n = parse_u64(flag, value);
	if (n % GUEST_PAGE_SIZE != 0)
		die(EXIT_USAGE, "%s: '%s' is not a multiple of %u", flag, value, GUEST_PAGE_SIZE);
	if (n < MIN_MEMORY_BYTES || n > MAX_MEMORY_BYTES)
		die(EXIT_USAGE, "%s: '%s' is out of range (%llu .. %llu bytes)", flag, value, MIN_MEMORY_BYTES,
		    MAX_MEMORY_BYTES);
	return n;
}

static void parse_options(const char *mode, int argc, char **argv, struct options *o)
{
	bool poke = strcmp(mode, "poke") == 0;
	memset(o, 0, sizeof(*o));
	o->profile = GUEST_PROFILE_OS_IMAGE;
	o->seed = 1;
	o->hot_permille = 250;
	o->standby_fd = -1;

	for (int i = 0; i < argc; i++) {
		const char *arg = argv[i];
		if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
			usage(stdout);
			exit(0);
		}
		if (strncmp(arg, "--", 2) != 0)
			die(EXIT_USAGE, "unexpected argument '%s' (options start with --)", arg);
		if (strcmp(arg, "--create") == 0 && !poke) {
			o->create = true;
			continue;
		}
		if (strcmp(arg, "--postcopy") == 0 && !poke) {
			o->postcopy = true;
			continue;
		}
		/* Accept both `--flag value` and `--flag=value`. */
		char flag[64];
		const char *value = NULL;
		const char *eq = strchr(arg, '=');
		size_t flen = eq ? (size_t)(eq - arg) : strlen(arg);
		if (flen >= sizeof(flag))
			die(EXIT_USAGE, "unknown option '%s'", arg);
		memcpy(flag, arg, flen);
		flag[flen] = '\0';

		static const char *const run_flags[] = {"--memory-file", "--memory-bytes", "--profile", "--seed",
							"--image-seed", "--shared", "--hot", "--dirty-rate",
							"--standby-fd", "--device-state", NULL};
		static const char *const poke_flags[] = {"--memory-file", "--memory-bytes", NULL};
		bool known = false;
		for (const char *const *f = poke ? poke_flags : run_flags; *f; f++)
			known |= strcmp(*f, flag) == 0;
		if (!known)
			die(EXIT_USAGE, "unknown option '%s' for `%s` (allowed: %s)", flag, mode,
			    poke ? "--memory-file, --memory-bytes"
				 : "--memory-file, --create, --memory-bytes, --profile, --seed, --image-seed, "
				   "--shared, --hot, --dirty-rate, --device-state, --standby-fd, --postcopy");
		if (eq) {
			value = eq + 1;
		} else {
			if (i + 1 >= argc)
				die(EXIT_USAGE, "%s needs a value", flag);
			value = argv[++i];
		}

		if (strcmp(flag, "--memory-file") == 0) {
			if (value[0] == '\0')
				die(EXIT_USAGE, "--memory-file: the path is empty");
			if (o->file_count == (poke ? 1 : GUEST_MAX_REGIONS))
				die(EXIT_USAGE, "--memory-file: at most %u (one per memory region)", poke ? 1 : GUEST_MAX_REGIONS);
			if (o->file_count == 0)
				o->memory_file = value;
			o->memory_files[o->file_count++] = value;
		} else if (strcmp(flag, "--device-state") == 0) {
			if (value[0] == '\0')
				die(EXIT_USAGE, "--device-state: the path is empty");
			o->device_state = value;
		} else if (strcmp(flag, "--memory-bytes") == 0) {
			if (poke) {
				o->memory_bytes = check_memory_bytes(flag, value);
			} else {
				/* N[,N...]: one size per region. */
				char item[32];
				o->memory_bytes = 0;
				for (const char *at = value;;) {
					size_t len = strcspn(at, ",");
					if (len == 0 || len >= sizeof(item))
						die(EXIT_USAGE, "--memory-bytes: '%s' is not a list of sizes in bytes (N or N,N,...)", value);
					if (o->region_sizes == GUEST_MAX_REGIONS)
						die(EXIT_USAGE, "--memory-bytes: at most %u sizes (one per region)", GUEST_MAX_REGIONS);
					memcpy(item, at, len);
					item[len] = '\0';
					uint64_t n = parse_u64(flag, item);
					if (n == 0 || n % GUEST_PAGE_SIZE != 0)
						die(EXIT_USAGE, "--memory-bytes: '%s' is not a positive multiple of %u", item, GUEST_PAGE_SIZE);
					o->region_bytes[o->region_sizes++] = n;
					o->memory_bytes += n;
					if (o->memory_bytes > MAX_MEMORY_BYTES)
						die(EXIT_USAGE, "--memory-bytes: '%s' is more than %llu bytes in all", value, MAX_MEMORY_BYTES);
					if (at[len] == '\0')
						break;
					at += len + 1;
				}
				if (o->memory_bytes < MIN_MEMORY_BYTES)
					die(EXIT_USAGE, "--memory-bytes: '%s' is less than %llu bytes in all", value, MIN_MEMORY_BYTES);
			}
			o->have_memory_bytes = true;
		} else if (strcmp(flag, "--profile") == 0) {
			o->profile = parse_profile(flag, value);
			o->have_profile = true;
		} else if (strcmp(flag, "--seed") == 0) {
			o->seed = parse_u64(flag, value);
			o->have_seed = true;
		} else if (strcmp(flag, "--image-seed") == 0) {
			o->image_seed = parse_u64(flag, value);
			o->have_image_seed = true;
		} else if (strcmp(flag, "--shared") == 0) {
			o->shared_permille = parse_fraction(flag, value);
			o->have_shared = true;
		} else if (strcmp(flag, "--hot") == 0) {
			o->hot_permille = parse_fraction(flag, value);
			o->have_hot = true;
		} else if (strcmp(flag, "--dirty-rate") == 0) {
			o->dirty_rate = parse_u64(flag, value);
			o->have_dirty_rate = true;
		} else if (strcmp(flag, "--standby-fd") == 0) {
			uint64_t fd = parse_u64(flag, value);
			if (fd > INT32_MAX)
				die(EXIT_USAGE, "--standby-fd: '%s' is not a file descriptor number", value);
			o->standby_fd = (int)fd;
			o->have_standby = true;
		}
	}

	if (!o->memory_file)
		die(EXIT_USAGE, "--memory-file PATH is required");
	if (poke) {
		if (!o->have_memory_bytes)
			die(EXIT_USAGE, "--memory-bytes N is required for `poke`");
		return;
	}
	if (o->create) {
		if (!o->have_memory_bytes)
			die(EXIT_USAGE, "--create needs --memory-bytes N");
		if (o->region_sizes != o->file_count)
			die(EXIT_USAGE, "--memory-bytes gives %u sizes for %u --memory-file regions (one each)", o->region_sizes,
			    o->file_count);
		uint64_t pages = o->memory_bytes / GUEST_PAGE_SIZE;
		uint64_t meta = 1 + (pages + GUEST_PAGE_SIZE / 4 - 1) / (GUEST_PAGE_SIZE / 4);
		if (o->region_bytes[0] / GUEST_PAGE_SIZE <= meta)
			die(EXIT_USAGE,
			    "--memory-bytes: the first region (%" PRIu64 " bytes) must be larger than the header and version "
			    "table of %" PRIu64 " pages",
			    o->region_bytes[0], meta);
	} else {
		const char *only_create = o->have_memory_bytes ? "--memory-bytes"
					  : o->have_profile    ? "--profile"
					  : o->have_seed       ? "--seed"
					  : o->have_image_seed ? "--image-seed"
					  : o->have_shared     ? "--shared"
					  : o->have_hot        ? "--hot"
							       : NULL;
		if (only_create)
			die(EXIT_USAGE,
			    "%s is only allowed with --create (a resumed guest takes its parameters from the memory file)",
			    only_create);
	}
	if (o->postcopy && o->create)
		die(EXIT_USAGE, "--postcopy resumes a migrated guest: it does not go with --create");
	if (o->have_standby && fcntl(o->standby_fd, F_GETFD) < 0)
		die(EXIT_USAGE, "--standby-fd: %d is not an open file descriptor (%s)", o->standby_fd, strerror(errno));
}

/* ---- the guest ---- */

/* One memory file, mapped: the guest's pages [first_page, first_page + pages). */
struct region {
	const char *path;
	int fd;
	uint8_t *base;
	uint64_t first_page;
	uint64_t pages;
};

struct guest {
	const char *path; /* the first region's, for messages about the guest as a whole */
	struct region region[GUEST_MAX_REGIONS];
	unsigned region_count;
	const char *device_path;
	uint64_t device_log; /* the device state: a running digest of every write */
	struct guest_header *h;
	uint32_t *version; /* indexed by page number */
	uint64_t page_count;
	uint64_t first_data_page;
	struct gw_model model;
	uint32_t *hot; /* data page numbers of the hot set (private memory, derivable from the header) */
	uint64_t hot_count;
	uint64_t pass_a, pass_b, pass_of_ab; /* permutation of the current pass */
	uint8_t *scratch;
};

static uint64_t first_data_page_for(uint64_t page_count)
{
	uint64_t per_page = GUEST_PAGE_SIZE / sizeof(uint32_t);
	return 1 + (page_count + per_page - 1) / per_page;
}

static unsigned region_of(const struct guest *g, uint64_t page)
{
	unsigned r = 0;
	while (r + 1 < g->region_count && page >= g->region[r + 1].first_page)
		r++;
	return r;
}

static uint8_t *page_ptr(struct guest *g, uint64_t page)
{
	const struct region *r = &g->region[region_of(g, page)];
	return r->base + (page - r->first_page) * GUEST_PAGE_SIZE;
}

static void *xmalloc(size_t n, const char *what)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		die(EXIT_SYSTEM, "malloc(%zu) for %s: %s", n, what, strerror(errno));
	return p;
}

static void setup_model(struct guest *g)
{
	struct guest_header *h = g->h;
	struct gw_model *m = &g->model;
	m->profile = h->profile;
	m->seed = h->seed;
	m->image_seed = h->image_seed;
	m->shared_permille = h->shared_permille;
	m->first_data_page = g->first_data_page;
	m->data_pages = g->page_count - g->first_data_page;
	m->perm_a = gw_coprime(m->data_pages, gw_hash3(h->seed, GW_TAG_PERM, 1));
	m->perm_b = gw_hash3(h->seed, GW_TAG_PERM, 2) % m->data_pages;
	m->common = NULL;
	if (m->profile == GUEST_PROFILE_OS_IMAGE) {
		m->common = xmalloc(16 * GUEST_PAGE_SIZE, "common pages");
		for (uint64_t k = 0; k < 16; k++)
			gw_fill_text(m->common[k], gw_hash3(h->seed, GW_TAG_COMMON, k));
	}
	g->scratch = xmalloc(GUEST_PAGE_SIZE, "scratch page");
	g->pass_of_ab = UINT64_MAX;
}

/*
 * The hot set (the pages this guest rewrites), derived from the seed in one pass. A resumed
 * guest computes it after it announces that it runs: it is the program's own cache, work a
 * resumed VM would do on its own CPU, not part of bringing the guest back.
 */
static void setup_hot_list(struct guest *g)
{
	struct guest_header *h = g->h;
	g->hot = xmalloc((g->page_count - g->first_data_page + 1) * sizeof(uint32_t), "hot page list");
	uint64_t n = 0;
	for (uint64_t p = g->first_data_page; p < g->page_count; p++)
		if (gw_hash3(h->seed, GW_TAG_HOT, p) % 1000 < h->hot_permille)
			g->hot[n++] = (uint32_t)p;
	g->hot_count = n;
}

static const uint8_t zero_page[GUEST_PAGE_SIZE];

static bool page_is_current(struct guest *g, uint64_t page, uint32_t version)
{
	const uint8_t *want = gw_content(&g->model, page, version, g->scratch);
	return memcmp(page_ptr(g, page), want ? want : zero_page, GUEST_PAGE_SIZE) == 0;
}

static void write_page_content(struct guest *g, uint64_t page, uint32_t version)
{
	const uint8_t *want = gw_content(&g->model, page, version, g->scratch);
	memcpy(page_ptr(g, page), want ? want : zero_page, GUEST_PAGE_SIZE);
}

static uint64_t version_sum(struct guest *g)
{
	uint64_t sum = 0;
	for (uint64_t p = g->first_data_page; p < g->page_count; p++)
		sum += g->version[p];
	return sum;
}

static int open_region_file(const char *path, bool create)
{
	if (create) {
		/* The file is the guest's memory: 0600. O_EXCL|O_NOFOLLOW: never take over, truncate or
		 * write through a file or symlink that someone else put at the path. */
		int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (fd < 0)
			die(EXIT_SYSTEM, "--memory-file %s: open (create): %s%s", path, strerror(errno),
			    errno == EEXIST ? " (--create makes a new file: remove the path, or resume without --create)"
					    : "");
		return fd;
	}
	int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		die(EXIT_SYSTEM, "--memory-file %s: open: %s%s", path, strerror(errno),
		    errno == ENOENT ? " (use --create to make a new guest)"
		    : errno == ELOOP ? " (a symlink: give the memory file's own path)"
				     : "");
	return fd;
}

/* Checks a resumed guest's header (read with pread, before anything is mapped) against its files. */
static void check_header(const struct options *o, const struct guest_header *h, const int *fds, uint64_t *region_bytes)
{
	const char *path = o->memory_file;
	if (memcmp(h->magic, GUEST_MAGIC, 8) != 0)
		die(EXIT_SYSTEM, "--memory-file %s: not a gangway guest memory file (bad magic)", path);
	if (h->layout_version != GUEST_LAYOUT_VERSION && h->layout_version != 1)
		die(EXIT_SYSTEM, "--memory-file %s: layout version %u, this program handles 1 and %u", path,
		    h->layout_version, GUEST_LAYOUT_VERSION);
	if (h->page_size != GUEST_PAGE_SIZE)
		die(EXIT_SYSTEM, "--memory-file %s: page size %u, expected %u", path, h->page_size, GUEST_PAGE_SIZE);
	/* Layout 1 had one region, and zeros where layout 2 keeps the regions. */
	unsigned count = h->layout_version == 1 ? 1 : h->region_count;
	if (count != o->file_count)
		die(EXIT_SYSTEM, "--memory-file %s: the guest has %u memory regions, %u --memory-file given", path, count,
		    o->file_count);
	uint64_t total = 0;
	for (unsigned r = 0; r < count; r++) {
		region_bytes[r] = h->layout_version == 1 ? h->memory_bytes : h->region_bytes[r];
		struct stat st;
		if (fstat(fds[r], &st) < 0)
			die(EXIT_SYSTEM, "--memory-file %s: fstat: %s", o->memory_files[r], strerror(errno));
		if (region_bytes[r] != (uint64_t)st.st_size || region_bytes[r] == 0 || region_bytes[r] % GUEST_PAGE_SIZE)
			die(EXIT_SYSTEM, "--memory-file %s: the header says region %u has %" PRIu64 " bytes, the file has %lld bytes",
			    o->memory_files[r], r, region_bytes[r], (long long)st.st_size);
		total += region_bytes[r];
	}
	if (h->memory_bytes != total || h->page_count * GUEST_PAGE_SIZE != h->memory_bytes)
		die(EXIT_SYSTEM, "--memory-file %s: header says %" PRIu64 " bytes / %" PRIu64 " pages, the files have %" PRIu64,
		    path, h->memory_bytes, h->page_count, total);
	if (h->memory_bytes < MIN_MEMORY_BYTES || h->memory_bytes > MAX_MEMORY_BYTES)
		die(EXIT_SYSTEM, "--memory-file %s: memory_bytes %" PRIu64 " out of range", path, h->memory_bytes);
	if (h->first_data_page != first_data_page_for(h->page_count) || region_bytes[0] / GUEST_PAGE_SIZE <= h->first_data_page)
		die(EXIT_SYSTEM, "--memory-file %s: first_data_page %u, expected %" PRIu64 " within the first region", path,
		    h->first_data_page, first_data_page_for(h->page_count));
	if (h->profile < GUEST_PROFILE_ZERO || h->profile > GUEST_PROFILE_RANDOM)
		die(EXIT_SYSTEM, "--memory-file %s: unknown profile %u", path, h->profile);
	if (h->shared_permille > 1000 || h->hot_permille > 1000)
		die(EXIT_SYSTEM, "--memory-file %s: shared/hot permille %u/%u out of range", path, h->shared_permille,
		    h->hot_permille);
}

static void open_and_map(struct guest *g, const struct options *o)
{
	g->path = o->memory_file;
	g->region_count = o->file_count;
	int fds[GUEST_MAX_REGIONS];
	uint64_t region_bytes[GUEST_MAX_REGIONS];
	for (unsigned r = 0; r < o->file_count; r++)
		fds[r] = open_region_file(o->memory_files[r], o->create);
	if (o->create) {
		for (unsigned r = 0; r < o->file_count; r++) {
			/* New, so empty: after ftruncate every page is a hole, and zero pages cost nothing. */
			if (ftruncate(fds[r], (off_t)o->region_bytes[r]) < 0)
				die(EXIT_SYSTEM, "--memory-file %s: ftruncate to %" PRIu64 " bytes: %s", o->memory_files[r],
				    o->region_bytes[r], strerror(errno));
			region_bytes[r] = o->region_bytes[r];
		}
	} else {
		/* Validate with pread before mapping: the tracking shim registers the first shared
		 * mapping of each file, so that one must be the whole file. */
		struct guest_header h;
		ssize_t n = pread(fds[0], &h, sizeof(h), 0);
		if (n < 0)
			die(EXIT_SYSTEM, "--memory-file %s: read header: %s", g->path, strerror(errno));
		if ((size_t)n < sizeof(h))
			die(EXIT_SYSTEM, "--memory-file %s: not a gangway guest memory file (too short)", g->path);
		check_header(o, &h, fds, region_bytes);
	}
	uint64_t first_page = 0;
	for (unsigned r = 0; r < g->region_count; r++) {
		void *base = mmap(NULL, region_bytes[r], PROT_READ | PROT_WRITE, MAP_SHARED, fds[r], 0);
		if (base == MAP_FAILED)
			die(EXIT_SYSTEM, "--memory-file %s: mmap %" PRIu64 " bytes MAP_SHARED: %s", o->memory_files[r],
			    region_bytes[r], strerror(errno));
		g->region[r] = (struct region){.path = o->memory_files[r], .fd = fds[r], .base = base,
					       .first_page = first_page, .pages = region_bytes[r] / GUEST_PAGE_SIZE};
		first_page += g->region[r].pages;
	}
	g->h = (struct guest_header *)g->region[0].base;
	g->version = (uint32_t *)(g->region[0].base + GUEST_PAGE_SIZE);
	g->page_count = first_page;
	g->first_data_page = first_data_page_for(g->page_count);
	if (!o->create && g->h->layout_version == 1) {
		/* Upgraded in place: the fields layout 2 added were zeros. */
		g->h->region_count = 1;
		g->h->region_bytes[0] = g->h->memory_bytes;
		BARRIER();
		g->h->layout_version = GUEST_LAYOUT_VERSION;
	}
}

static void write_all(struct region *r, const uint8_t *buf, uint64_t len, uint64_t offset)
{
	while (len > 0) {
		ssize_t n = pwrite(r->fd, buf, len, (off_t)offset);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die(EXIT_SYSTEM, "--memory-file %s: pwrite %" PRIu64 " bytes at %" PRIu64 ": %s", r->path, len,
			    offset, n < 0 ? strerror(errno) : "no progress");
		buf += n;
		len -= (uint64_t)n;
		offset += (uint64_t)n;
	}
}

static void create_guest(struct guest *g, const struct options *o)
{
	struct guest_header *h = g->h;
	/* The file was just created, so header and version table are already zero. */
	h->layout_version = GUEST_LAYOUT_VERSION;
	h->page_size = GUEST_PAGE_SIZE;
	h->memory_bytes = o->memory_bytes;
	h->page_count = g->page_count;
	h->seed = o->seed;
	h->image_seed = o->image_seed;
	h->shared_permille = o->shared_permille;
	h->hot_permille = o->hot_permille;
	h->profile = o->profile;
	h->first_data_page = (uint32_t)g->first_data_page;
	h->dirty_rate_bytes_per_sec = o->dirty_rate;
	h->inflight_page = GUEST_NO_INFLIGHT;
	h->region_count = g->region_count;
	for (unsigned r = 0; r < g->region_count; r++)
		h->region_bytes[r] = g->region[r].pages * GUEST_PAGE_SIZE;
	setup_model(g);
	setup_hot_list(g);
	h->hot_page_count = g->hot_count;
	/* Data pages go in with pwrite, in runs of non-zero pages within a region: on tmpfs that
	 * costs a fraction of faulting every page of the mapping, and zero pages stay holes. */
	const uint64_t batch_pages = 256;
	uint8_t *batch = xmalloc(batch_pages * GUEST_PAGE_SIZE, "creation buffer");
	for (unsigned r = 0; r < g->region_count; r++) {
		struct region *region = &g->region[r];
		uint64_t end = region->first_page + region->pages;
		uint64_t first = region->first_page > g->first_data_page ? region->first_page : g->first_data_page;
		uint64_t run_start = first, run_len = 0;
		for (uint64_t p = first; p <= end; p++) {
			const uint8_t *want = NULL;
			if (p < end) {
				uint8_t *slot = batch + run_len * GUEST_PAGE_SIZE;
				want = gw_content(&g->model, p, 0, slot);
				if (want && want != slot)
					memcpy(slot, want, GUEST_PAGE_SIZE);
			}
			if (want)
				run_len++;
			if (run_len > 0 && (!want || run_len == batch_pages)) {
				write_all(region, batch, run_len * GUEST_PAGE_SIZE, (run_start - region->first_page) * GUEST_PAGE_SIZE);
				run_start += run_len;
				run_len = 0;
			}
			if (!want)
				run_start = p + 1;
		}
	}
	free(batch);
	/* Magic last: a file whose creation was interrupted is never taken for a guest. */
	BARRIER();
	memcpy(h->magic, GUEST_MAGIC, 8);
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

/*
 * Whether page p lies in a hole of the file, walking extents with SEEK_DATA/SEEK_HOLE in
 * increasing page order. Reading a tmpfs hole through a shared mapping would allocate a
 * page for it, which makes checking a mostly-zero guest slow and bloats it.
 */
struct extent_walk {
	unsigned region;               /* the region of the last page asked about */
	uint64_t data_start, data_end; /* the next data extent there at or after that page (region pages) */
};

static bool page_in_hole(struct guest *g, struct extent_walk *w, uint64_t page)
{
	unsigned r = region_of(g, page);
	const struct region *region = &g->region[r];
	uint64_t p = page - region->first_page;
	if (r != w->region) {
		*w = (struct extent_walk){.region = r};
	}
	if (p >= w->data_end) {
		off_t d = lseek(region->fd, (off_t)(p * GUEST_PAGE_SIZE), SEEK_DATA);
		if (d < 0) {
			/* ENXIO: only holes from here on; anything else: assume all data. */
			w->data_start = errno == ENXIO ? region->pages : p;
			w->data_end = region->pages;
		} else {
			off_t e = lseek(region->fd, d, SEEK_HOLE);
			w->data_start = (uint64_t)d / GUEST_PAGE_SIZE;
			w->data_end = e < 0 ? region->pages : ((uint64_t)e + GUEST_PAGE_SIZE - 1) / GUEST_PAGE_SIZE;
			if (w->data_end <= p)
				w->data_end = p + 1;
		}
	}
	return p < w->data_start;
}

/* ---- the device state ---- */

#define DEVICE_TAG 0x646576696365ull /* "device" */

static uint64_t device_digest(const struct guest_device *d)
{
	return gw_hash4(gw_hash3(d->seed, d->saves, d->writes), d->log, DEVICE_TAG, 1);
}

/* The device state of a guest that never saved one (a fresh guest, or one whose state was lost). */
static uint64_t device_initial(const struct guest_header *h)
{
	return gw_hash3(h->seed, DEVICE_TAG, 0);
}

/*
 * Writes the device state to --device-state (0600, atomically: a reader sees the whole
 * state or none) and records in the header which save the memory goes with. An older file
 * goes first, so that a failed save leaves no state to be taken for this one.
 */
static void save_device(struct guest *g)
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
static void load_device(struct guest *g)
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
		while (tokens >= 1 && !stop_requested) {
			maybe_pause(g);
			write_one(g);
			tokens -= 1;
		}
		maybe_pause(g);
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

static void announce_running(void)
{
	printf("running pid=%d\n", (int)getpid());
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

/* ---- poke: a scriptable writer for testing dirty trackers ---- */

static int cmd_poke(const struct options *o)
{
	/* An existing file is opened as named (the shim's tests reach one through a symlink); a
	 * missing one is created 0600, never through a symlink (O_EXCL does not follow one). */
	int fd = open(o->memory_file, O_RDWR | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT)
		fd = open(o->memory_file, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		die(EXIT_SYSTEM, "--memory-file %s: open: %s", o->memory_file, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) < 0)
		die(EXIT_SYSTEM, "--memory-file %s: fstat: %s", o->memory_file, strerror(errno));
	if ((uint64_t)st.st_size < o->memory_bytes && ftruncate(fd, (off_t)o->memory_bytes) < 0)
		die(EXIT_SYSTEM, "--memory-file %s: ftruncate to %" PRIu64 " bytes: %s", o->memory_file, o->memory_bytes,
		    strerror(errno));
	volatile uint8_t *base = mmap(NULL, o->memory_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		die(EXIT_SYSTEM, "--memory-file %s: mmap %" PRIu64 " bytes MAP_SHARED: %s", o->memory_file,
		    o->memory_bytes, strerror(errno));
	uint64_t pages = o->memory_bytes / GUEST_PAGE_SIZE;
	announce_running();

	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		char cmd[16], extra[2];
		unsigned long long page, byte = 0;
		int n = sscanf(line, "%15s %llu %llu %1s", cmd, &page, &byte, extra);
		bool fill = n == 3 && strcmp(cmd, "fill") == 0;
		bool touch = n == 2 && strcmp(cmd, "touch") == 0;
		bool peek = n == 2 && strcmp(cmd, "read") == 0;
		bool show = n == 2 && strcmp(cmd, "byte") == 0;
		if (!fill && !touch && !peek && !show)
			die(EXIT_USAGE, "poke: bad command '%.*s' (allowed: fill PAGE BYTE, touch PAGE, read PAGE, byte PAGE)",
			    (int)strcspn(line, "\n"), line);
		if (page >= pages)
			die(EXIT_USAGE, "poke: page %llu is out of range (the file has %" PRIu64 " pages)", page, pages);
		if (byte > 255)
			die(EXIT_USAGE, "poke: byte %llu is out of range (0..255)", byte);
		volatile uint8_t *p = base + page * GUEST_PAGE_SIZE;
		if (fill) {
			for (size_t i = 0; i < GUEST_PAGE_SIZE; i++)
				p[i] = (uint8_t)byte;
		} else if (touch) {
			p[0] = p[0];
		} else if (peek) {
			(void)p[0];
		}
		if (show)
			printf("ok %u\n", (unsigned)p[GUEST_PAGE_SIZE - 1]);
		else
			fputs("ok\n", stdout);
		if (fflush(stdout) != 0)
			die(EXIT_SYSTEM, "stdout: write: %s", strerror(errno));
	}
	if (ferror(stdin))
		die(EXIT_SYSTEM, "stdin: read: %s", strerror(errno));
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
