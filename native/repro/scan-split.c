/*
 * scan-split: the PAGEMAP_SCAN that lost rare writes (README.md, "The cause"), in one
 * process and deterministically.
 *
 * The process maps 128 MiB of shmem, registers it for userfaultfd async write-protect (as
 * the shim does) and write-protects it. It then writes every other page of the first
 * --runs pages*2 (so one scan has --runs separate runs) and the last page, and scans its own
 * /proc/self/pagemap the way the addon's pagemapScan did: PAGEMAP_SCAN with a 1024-entry
 * vector, re-issued from walk_end until walk_end reaches the end.
 *
 * What it shows:
 *   1. With more runs than the kernel's bounce buffer (512 entries: one PMD's worth of
 *      pages) but fewer than the caller's vector, the first ioctl walks the whole range and
 *      returns every run, yet its walk_end is where the bounce buffer first filled, not the
 *      end. Linux 6.18's do_pagemap_scan keeps the walk_end of its first, stopped walk when
 *      its second walk finishes. So the caller scans that part again with a second ioctl.
 *   2. A page written between the two ioctls, above that walk_end and below the highest
 *      page already reported, is reported (and write-protected) by the second ioctl in an
 *      earlier position than the runs already collected. The old accumulator (pairs_add)
 *      took any run that starts at or before the end of the last one as "adjacent or
 *      overlapping" and dropped it. The write is then lost for good: the page's PTE is
 *      write-protected, so no later scan reports it unless it is written again.
 *
 *   scan-split [--runs N] [--write PAGE]
 *
 * --write defaults to the first page above the reported walk_end. Prints what each ioctl
 * returned and whether the written page survives the old and the fixed accumulation; exits
 * 1 if the old accumulation loses it (the bug shows), 0 if not, 2 on a system error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uapi-compat.h"

#define PAGE 4096u
#define PAGES 32768u /* 128 MiB, as the bench's guests */
#define VEC_LEN 1024 /* the addon's SCAN_VEC_LEN */

static void die(const char *what)
{
	fprintf(stderr, "scan-split: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int pagemap_fd;
static uint8_t *base;

/* One PAGEMAP_SCAN read-and-reprotect from `from`; returns the run count, sets *walk_end. */
static long scan_once(uint64_t from, struct page_region *vec, uint64_t *walk_end)
{
	struct pm_scan_arg arg;
	memset(&arg, 0, sizeof arg);
	arg.size = sizeof arg;
	arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
	arg.start = from;
	arg.end = (uint64_t)(uintptr_t)base + (uint64_t)PAGES * PAGE;
	arg.vec = (uint64_t)(uintptr_t)vec;
	arg.vec_len = VEC_LEN;
	arg.category_mask = PAGE_IS_WRITTEN;
	arg.return_mask = PAGE_IS_WRITTEN;
	long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
	if (n < 0)
		die("PAGEMAP_SCAN");
	*walk_end = arg.walk_end;
	return n;
}

static uint64_t page_of(uint64_t address)
{
	return (address - (uint64_t)(uintptr_t)base) / PAGE;
}

int main(int argc, char **argv)
{
	unsigned runs = 600;
	long write_page = -1;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "--runs") == 0)
			runs = (unsigned)strtoul(argv[i + 1], NULL, 10);
		else if (strcmp(argv[i], "--write") == 0)
			write_page = strtol(argv[i + 1], NULL, 10);
		else {
			fprintf(stderr, "usage: scan-split [--runs N] [--write PAGE]\n");
			return 2;
		}
	}
	if (runs == 0 || runs * 2 >= PAGES - 2) {
		fprintf(stderr, "scan-split: --runs must be between 1 and %u\n", PAGES / 2 - 2);
		return 2;
	}

	int fd = memfd_create("scan-split", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)PAGES * PAGE) < 0)
		die("memfd");
	base = mmap(NULL, (size_t)PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		die("mmap");
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("userfaultfd");
	struct uffdio_api api = {.api = UFFD_API,
				 .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
					     UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API");
	struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)base, .len = (uint64_t)PAGES * PAGE},
				      .mode = UFFDIO_REGISTER_MODE_WP};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		die("UFFDIO_REGISTER");
	struct uffdio_writeprotect wp = {.range = reg.range, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
	if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
		die("UFFDIO_WRITEPROTECT");
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap_fd < 0)
		die("open /proc/self/pagemap");

	for (unsigned r = 0; r < runs; r++)
		base[(uint64_t)2 * r * PAGE] = 1;
	base[(uint64_t)(PAGES - 1) * PAGE] = 1;

	static struct page_region vec[VEC_LEN];
	uint64_t end = (uint64_t)(uintptr_t)base + (uint64_t)PAGES * PAGE, walk_end;
	long n1 = scan_once((uint64_t)(uintptr_t)base, vec, &walk_end);
	uint64_t last_end = page_of(vec[n1 - 1].end);
	printf("ioctl 1: %ld runs, last run ends at page %llu, walk_end page %llu of %u%s\n", n1,
	       (unsigned long long)last_end, (unsigned long long)page_of(walk_end), PAGES,
	       walk_end < end && last_end > page_of(walk_end) ? " (runs past walk_end: walk_end is stale)" : "");
	if (walk_end >= end) {
		puts("no second ioctl: the split does not happen here");
		return 0;
	}
	uint64_t page = write_page >= 0 ? (uint64_t)write_page : page_of(walk_end) + 1;
	base[page * PAGE] = 2; /* the guest's write, between the two ioctls */
	long n2 = scan_once(walk_end, vec, &walk_end);
	bool reported = false;
	for (long i = 0; i < n2; i++)
		reported |= page_of(vec[i].start) <= page && page < page_of(vec[i].end);
	printf("wrote page %llu between the ioctls; ioctl 2: %ld runs, %s page %llu\n",
	       (unsigned long long)page, n2, reported ? "reports" : "does not report", (unsigned long long)page);
	/* The old pairs_add took a run starting at or before last_end as adjacent. */
	bool old_keeps = reported && page >= last_end;
	printf("old accumulation (runs in address order only): %s\n", old_keeps ? "kept" : "LOST");
	printf("fixed accumulation (sorts and merges): %s\n", reported ? "kept" : "LOST");
	return old_keeps ? 0 : 1;
}
