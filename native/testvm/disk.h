/*
 * The test kernel's disk workload (disk.c): what the page workload does for RAM, done for a
 * virtio-blk disk in 4 KiB blocks, so that a migration that loses a disk write is caught
 * by the kernel itself.
 */
#ifndef GANGWAY_TESTVM_DISK_H
#define GANGWAY_TESTVM_DISK_H

#include <stdint.h>

#include "params.h"
#include "status.h"

/*
 * Finds the disk and checks the parameters against it; returns 0, or -1 after saying on
 * COM1 why the kernel cannot go on (a gw.disk_ key without a disk, a base or hot set larger
 * than the disk). No disk and no gw.disk_ key is fine: the kernel works on its pages only.
 */
int disk_setup(const struct testvm_params *p, uint64_t tsc_hz);
/* The disk's state (enum testvm_disk_state). */
uint32_t disk_state(void);
/* Whether the disk runs and has a hot set to rewrite at a rate above 0. */
int disk_writing(void);
/* Reads the next block of the hot set back, checks it, and writes its next version. */
void disk_write_one(void);
/*
 * The disk part of a full check: every base block and every block ever written, against
 * its version. Returns 1 if the version table does not sum to the writes made (a meta error).
 */
int disk_full_check(void);

/* Into the status block: the parameters once, before RUNNING; the counters inside publish()'s seq window. */
void disk_publish_parameters(volatile struct testvm_status *st);
void disk_publish(volatile struct testvm_status *st);
/* COM1: " disk_writes=<n> disk_stale=<n>" after the page counters, when the disk runs. */
void disk_log_counters(void);
/* COM1: " disk_blocks=<n> disk_stale=<n>" after a full check's page result, when the disk runs. */
void disk_log_check(void);

#endif
