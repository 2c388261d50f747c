/*
 * The data runs of a file (SEEK_DATA / SEEK_HOLE), for fileDataRuns and for regionDigest,
 * which walks the holes it is given on its own thread (tmpfile.c).
 */
#ifndef GANGWAY_DATA_RUNS_H
#define GANGWAY_DATA_RUNS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* [first, count] runs being built, ascending; the last one may grow. */
typedef struct {
  uint32_t *pairs;
  size_t n, cap;
  uint64_t max_runs;
  uint32_t page_count;
  uint32_t min_hole; /* >= 1: a hole of fewer pages between two runs is taken as data */
  bool full; /* max_runs reached: the last run took the rest */
} run_list_t;

/*
 * The data of the first `count` pages of file `fd` into l (l->pairs is the caller's to free,
 * also on failure): with `holes` (hole_count ascending pairs), only those pages are looked
 * at and every other page is data. At most max_runs runs, the last one then taking the rest;
 * a hole of fewer than min_hole pages (>= 1) between two runs counts as data. 0, or an
 * errno (ENOMEM when out of memory).
 */
int file_data_runs(int fd, uint32_t ps, uint32_t count, uint64_t max_runs, uint32_t min_hole, const uint32_t *holes, size_t hole_count, run_list_t *l);

#endif
