/*
 * The command line of gangway-guest: its options, parsed and checked against each other
 * (guest-options.c), and the usage text.
 */
#ifndef GANGWAY_GUEST_OPTIONS_H
#define GANGWAY_GUEST_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "guest-layout.h"

#define MIN_MEMORY_BYTES (64ull << 10)
#define MAX_MEMORY_BYTES (1ull << 40)

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

void usage(FILE *out);
void parse_options(const char *mode, int argc, char **argv, struct options *o);

#endif
