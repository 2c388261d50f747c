/*
 * The command line of gangway-guest: the usage text, and parse_options, which reads the
 * options of `run` and `poke` and checks them against each other before anything is opened.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guest.h"
#include "guest-layout.h"
#include "guest-options.h"

void usage(FILE *out)
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
		"  Prints `running pid=PID mono_ns=NS` (CLOCK_MONOTONIC) as it starts to run;\n"
		"  SIGTERM/SIGINT exit 0.\n"
		"poke: map the file (created or grown to N bytes) and obey stdin lines\n"
		"  `fill PAGE BYTE`, `touch PAGE`, `read PAGE`, answering `ok` to each, and\n"
		"  `byte PAGE`, answering `ok N` with the page's last byte.\n"
		"exit status: 0 ok, 2 bad usage, 3 file, layout or system error\n");
}

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

void parse_options(const char *mode, int argc, char **argv, struct options *o)
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
