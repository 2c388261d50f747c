/*
 * The guest's memory: its regions (one memory file each, mapped MAP_SHARED), the header and
 * version table at the start of the first, and the content model that says what each page
 * must hold (guest-memory.c).
 */
#ifndef GANGWAY_GUEST_MEMORY_H
#define GANGWAY_GUEST_MEMORY_H

#include <stdbool.h>
#include <stdint.h>

#include "guest-content.h"
#include "guest-layout.h"

struct options;

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

/* How far page_in_hole has walked the extents of a region (guest-memory.c says why it walks them). */
struct extent_walk {
	unsigned region;               /* the region of the last page asked about */
	uint64_t data_start, data_end; /* the next data extent there at or after that page (region pages) */
};

void open_and_map(struct guest *g, const struct options *o);
void create_guest(struct guest *g, const struct options *o);
void setup_model(struct guest *g);
void setup_hot_list(struct guest *g);
bool page_is_current(struct guest *g, uint64_t page, uint32_t version);
void write_page_content(struct guest *g, uint64_t page, uint32_t version);
bool page_in_hole(struct guest *g, struct extent_walk *w, uint64_t page);

#endif
