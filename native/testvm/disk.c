/*
 * The disk workload of gangway-testvm. The disk is a legacy virtio-blk device
 * (virtio-blk.c), worked on in 4 KiB blocks (8 sectors) from block 0, up to
 * TESTVM_DISK_MAX_BLOCKS. Blocks 0..gw.disk_base-1 hold the base image from boot (written
 * on the host by agent/guest/testvm-disk.ts), the rest are zero: the kernel expects a
 * fresh image at every boot. Content is guest-content.h's gw_disk_block, a pure function
 * of (seed, image seed, base blocks, block, version). A version per block (u32) lives at
 * TESTVM_DISK_TABLE_ADDR, in the VM's RAM, so it moves with the VM as the disk must.
 *
 * The hot set is gw.disk_hot blocks spread over the whole disk by a permutation of the
 * blocks (base blocks and zero blocks alike). At gw.disk_rate blocks per second the kernel
 * takes the next hot block (a fresh order each pass), reads it back, checks it against the
 * version it last wrote there (version 0: the base block, or zeros), then writes the next
 * version. The full check reads every base block and every block ever written, 16 to a
 * request. A block that does not hold what it should counts in disk_stale_blocks.
 *
 * The in-flight rule. A write changes two things that a migration moves separately: the
 * block on the disk and its version in RAM. QEMU can stop the VM at any instruction, and
 * what it stops on is what the destination resumes from, so every instruction boundary has
 * to leave the pair meaning something. The kernel:
 *   1. records "block B, version V+1 in flight" (kernel RAM and the status block),
 *   2. submits the write and spins until the used ring says it is done,
 *   3. sets B's version to V+1, then clears the record.
 * So the version table only ever names content the device acknowledged, and while the
 * record is set block B may validly hold V (the write not yet done) or V+1 (done, its
 * answer not yet seen): a check of B then accepts exactly those two, any other block
 * exactly its table version. Without the record, a check of a stopped VM could not tell a
 * write in flight from a lost one: a version bumped before the write shows V+1 in RAM and
 * V on the disk when the stop came before the device wrote; a version bumped after shows V
 * in RAM and V+1 on the disk when the stop came after the device wrote but before the
 * kernel saw the used ring. Both are correct states; the record names the one block where
 * either may be found. Within the kernel one request is outstanding at a time and no check
 * runs while a write is, so the kernel's own checks meet the record only after a write
 * failed or got no answer (a device that lost the request, or a destination that never
 * finishes it): it resets the device, reads B back to say which of the two it holds, and
 * writes V+1 again. An outside checker of a stopped VM (its RAM file and its disk) applies
 * the rule with the status block's disk_inflight_* fields.
 *
 * QEMU drains requests in flight when it stops a VM, so a write whose notify ran before the
 * stop is on the source's disk, and one whose notify had not run is issued by the
 * destination; either way the used ring answers eventually and step 3 follows.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "disk.h"
#include "guest-content.h"
#include "hw.h"
#include "virtio-blk.h"

#define BLOCK TESTVM_DISK_BLOCK_SIZE
#define SECTORS_PER_BLOCK (BLOCK / VBLK_SECTOR_BYTES)
#define CHECK_BATCH_BLOCKS (VBLK_MAX_TRANSFER_BYTES / BLOCK)
#define REQUEST_TIMEOUT_SEC 30u
#define STALE_LINES_MAX 32u

_Static_assert(BLOCK == GUEST_PAGE_SIZE, "a disk block is a content page");

static volatile struct testvm_status *const st = (volatile struct testvm_status *)TESTVM_STATUS_ADDR;
static uint32_t *const version = (uint32_t *)(uintptr_t)TESTVM_DISK_TABLE_ADDR;

static uint8_t iobuf[VBLK_MAX_TRANSFER_BYTES] __attribute__((aligned(BLOCK)));
static uint8_t writebuf[BLOCK] __attribute__((aligned(BLOCK)));
static uint8_t expected[BLOCK] __attribute__((aligned(BLOCK)));

static uint32_t state = TESTVM_DISK_NONE;
static struct {
	uint64_t seed, image_seed, base_blocks, hot_blocks, rate_blocks_per_sec;
	uint64_t capacity_bytes, block_count;
	uint64_t hot_a, hot_b; /* hot block j is (hot_a * j + hot_b) % block_count */
	uint64_t timeout_ticks;
} cfg;

static struct {
	uint64_t passes, writes, blocks_written, checked, stale, last_written, last_stale;
	uint32_t errors;
	uint64_t check_blocks, check_stale;
	unsigned stale_lines;
} dc = {.last_written = TESTVM_NO_BLOCK, .last_stale = TESTVM_NO_BLOCK};

static uint64_t inflight_block = TESTVM_NO_BLOCK;
static uint32_t inflight_version;

static uint64_t pass_a, pass_b, pass_of_ab = UINT64_MAX, pass_cursor;

uint32_t disk_state(void)
{
	return state;
}

int disk_writing(void)
{
	return state == TESTVM_DISK_RUNNING && cfg.rate_blocks_per_sec > 0;
}

int disk_setup(const struct testvm_params *p, uint64_t tsc_hz)
{
	enum vblk_probe probe = vblk_probe();
	if (probe == VBLK_PROBE_NONE) {
		if (p->disk_required) {
			kprintf("error: gw.disk_ parameters were given, but the VM has no legacy virtio-blk disk "
				"(-device virtio-blk-pci,drive=...,disable-modern=on)\n");
			return -1;
		}
		state = TESTVM_DISK_NONE;
		return 0;
	}
	if (probe == VBLK_PROBE_FAILED)
		return -1;
	cfg.seed = p->seed;
	cfg.image_seed = p->image_seed;
	cfg.base_blocks = p->disk_base_blocks;
	cfg.hot_blocks = p->disk_hot_blocks;
	cfg.rate_blocks_per_sec = p->disk_rate_blocks_per_sec;
	cfg.capacity_bytes = vblk_capacity_bytes();
	cfg.block_count = cfg.capacity_bytes / BLOCK;
	if (cfg.block_count > TESTVM_DISK_MAX_BLOCKS) {
		kprintf("disk: %llu blocks; the kernel works on the first %u (its version table's room)\n",
			(unsigned long long)cfg.block_count, TESTVM_DISK_MAX_BLOCKS);
		cfg.block_count = TESTVM_DISK_MAX_BLOCKS;
	}
	if (cfg.block_count == 0) {
		kprintf("error: the disk has %llu bytes, less than one block of 4 KiB\n",
			(unsigned long long)cfg.capacity_bytes);
		return -1;
	}
	if (cfg.base_blocks > cfg.block_count) {
		kprintf("error: gw.disk_base=%llu, but the disk has %llu blocks of 4 KiB\n",
			(unsigned long long)cfg.base_blocks, (unsigned long long)cfg.block_count);
		return -1;
	}
	/* The hot set matters only to a kernel that writes: an idle one takes any disk. */
	if (cfg.rate_blocks_per_sec > 0 && cfg.hot_blocks > cfg.block_count) {
		kprintf("error: gw.disk_hot=%llu, but the disk has %llu blocks of 4 KiB\n",
			(unsigned long long)cfg.hot_blocks, (unsigned long long)cfg.block_count);
		return -1;
	}
	cfg.hot_a = gw_coprime(cfg.block_count, gw_hash3(cfg.seed, GW_TAG_DISK_HOT, 1));
	cfg.hot_b = gw_hash3(cfg.seed, GW_TAG_DISK_HOT, 2) % cfg.block_count;
	cfg.timeout_ticks = tsc_hz * REQUEST_TIMEOUT_SEC;
	memset(version, 0, cfg.block_count * sizeof(*version));
	state = TESTVM_DISK_RUNNING;
	kprintf("disk: %llu blocks of 4 KiB, base %llu, hot %llu, rate ",
		(unsigned long long)cfg.block_count, (unsigned long long)cfg.base_blocks,
		(unsigned long long)cfg.hot_blocks);
	if (cfg.rate_blocks_per_sec == TESTVM_RATE_UNLIMITED)
		kprintf("max\n");
	else
		kprintf("%llu blocks/s\n", (unsigned long long)cfg.rate_blocks_per_sec);
	return 0;
}

static void set_inflight(uint64_t block, uint32_t v)
{
	inflight_version = v;
	st->disk_inflight_version = v;
	BARRIER();
	inflight_block = block;
	st->disk_inflight_block = block;
	BARRIER();
}

static void clear_inflight(void)
{
	BARRIER();
	inflight_block = TESTVM_NO_BLOCK;
	st->disk_inflight_block = TESTVM_NO_BLOCK;
	BARRIER();
}

static void give_up(void)
{
	state = TESTVM_DISK_FAILED;
	st->disk_state = TESTVM_DISK_FAILED;
	kprintf("disk: the device failed again after a reset: the kernel leaves the disk alone from now on\n");
}

static int is_zero_block(const uint8_t *p)
{
	const uint32_t *w = (const uint32_t *)p;
	uint32_t any = 0;
	for (unsigned i = 0; i < BLOCK / 4; i++)
		any |= w[i];
	return any == 0;
}

static int holds(uint64_t block, uint32_t v, const uint8_t *data)
{
	const uint8_t *want = gw_disk_block(cfg.seed, cfg.image_seed, cfg.base_blocks, block, v, expected);
	return want ? memcmp(data, want, BLOCK) == 0 : is_zero_block(data);
}

/* The check of one block read back, with the in-flight rule (top of the file). */
static int holds_current(uint64_t block, const uint8_t *data)
{
	return holds(block, version[block], data) || (block == inflight_block && holds(block, inflight_version, data));
}

static void found_stale(uint64_t block, const char *by)
{
	dc.stale++;
	dc.last_stale = block;
	if (dc.stale_lines < STALE_LINES_MAX)
		kprintf("stale disk block %llu: not version %u (%s)\n", (unsigned long long)block, version[block], by);
	else if (dc.stale_lines == STALE_LINES_MAX)
		kprintf("further stale disk blocks are counted, not listed\n");
	dc.stale_lines++;
}

static void said_failed(int write, uint64_t block, uint32_t count, enum vblk_result r)
{
	dc.errors++;
	kprintf("disk: %s of %u block(s) at %llu %s; resetting the device\n", write ? "write" : "read", count,
		(unsigned long long)block, r == VBLK_TIMEOUT ? "got no answer in 30 s" : "failed");
}

/* Reads `count` blocks from `block` into iobuf, retrying once after a reset; -1: the disk is given up. */
static int read_blocks(uint64_t block, uint32_t count)
{
	for (int attempt = 0;; attempt++) {
		enum vblk_result r = vblk_transfer(0, block * SECTORS_PER_BLOCK, iobuf, count * BLOCK, cfg.timeout_ticks);
		if (r == VBLK_OK)
			return 0;
		said_failed(0, block, count, r);
		if (attempt == 1 || vblk_reinit() != 0) {
			give_up();
			return -1;
		}
	}
}

/*
 * Writes version v (generated in writebuf) to `block` under the in-flight rule. After a
 * failed attempt, reads the block back to say which of the two versions it holds, then
 * writes again (the same bytes: writing twice is harmless). -1: the disk is given up.
 */
static int write_block(uint64_t block, uint32_t v)
{
	set_inflight(block, v);
	for (int attempt = 0;; attempt++) {
		enum vblk_result r = vblk_transfer(1, block * SECTORS_PER_BLOCK, writebuf, BLOCK, cfg.timeout_ticks);
		if (r == VBLK_OK)
			break;
		said_failed(1, block, 1, r);
		if (attempt == 1 || vblk_reinit() != 0) {
			give_up();
			return -1;
		}
		r = vblk_transfer(0, block * SECTORS_PER_BLOCK, iobuf, BLOCK, cfg.timeout_ticks);
		if (r != VBLK_OK) {
			said_failed(0, block, 1, r);
			give_up();
			return -1;
		}
		dc.checked++;
		if (holds(block, v, iobuf))
			kprintf("disk: block %llu holds version %u: the write was done, its answer lost\n",
				(unsigned long long)block, v);
		else if (holds(block, version[block], iobuf))
			kprintf("disk: block %llu still holds version %u: the write was not done\n",
				(unsigned long long)block, version[block]);
		else
			found_stale(block, "after a failed write");
	}
	BARRIER();
	if (version[block] == 0)
		dc.blocks_written++;
	version[block] = v;
	dc.writes++;
	dc.last_written = block;
	clear_inflight();
	return 0;
}

static uint64_t next_hot_block(void)
{
	if (pass_of_ab != dc.passes) {
		uint64_t r = gw_hash3(cfg.seed, GW_TAG_DISK_PASS, dc.passes);
		pass_a = gw_coprime(cfg.hot_blocks, r);
		pass_b = gw_mix64(r) % cfg.hot_blocks;
		pass_of_ab = dc.passes;
	}
	uint64_t j = (pass_a * pass_cursor + pass_b) % cfg.hot_blocks;
	return (cfg.hot_a * j + cfg.hot_b) % cfg.block_count;
}

void disk_write_one(void)
{
	uint64_t block = next_hot_block();
	if (read_blocks(block, 1) != 0)
		return;
	dc.checked++;
	if (!holds_current(block, iobuf))
		found_stale(block, "rewrite");
	uint32_t next = version[block] + 1;
	const uint8_t *want = gw_disk_block(cfg.seed, cfg.image_seed, cfg.base_blocks, block, next, writebuf);
	if (want != writebuf)
		memcpy(writebuf, want, BLOCK); /* versions above 0 are generated in place; kept general */
	if (write_block(block, next) != 0)
		return;
	if (++pass_cursor == cfg.hot_blocks) {
		pass_cursor = 0;
		dc.passes++;
	}
}

static int must_check(uint64_t block)
{
	return block < cfg.base_blocks || version[block] > 0;
}

int disk_full_check(void)
{
	dc.check_blocks = 0;
	dc.check_stale = 0;
	if (state != TESTVM_DISK_RUNNING)
		return 0;
	uint64_t checked = 0, stale = 0;
	for (uint64_t block = 0; block < cfg.block_count;) {
		if (!must_check(block)) {
			block++;
			continue;
		}
		uint32_t n = 1;
		while (n < CHECK_BATCH_BLOCKS && block + n < cfg.block_count && must_check(block + n))
			n++;
		if (read_blocks(block, n) != 0)
			return 0;
		for (uint32_t i = 0; i < n; i++) {
			if (!holds_current(block + i, iobuf + (size_t)i * BLOCK)) {
				found_stale(block + i, "full check");
				stale++;
			}
		}
		checked += n;
		block += n;
	}
	uint64_t sum = 0;
	for (uint64_t block = 0; block < cfg.block_count; block++)
		sum += version[block];
	dc.checked += checked;
	dc.check_blocks = checked;
	dc.check_stale = stale;
	if (sum != dc.writes) {
		kprintf("meta error: the disk version table sums to %llu, but %llu blocks were written\n",
			(unsigned long long)sum, (unsigned long long)dc.writes);
		return 1;
	}
	return 0;
}

void disk_publish_parameters(volatile struct testvm_status *s)
{
	s->disk_state = state;
	s->disk_block_size = BLOCK;
	s->disk_capacity_bytes = cfg.capacity_bytes;
	s->disk_block_count = cfg.block_count;
	s->disk_base_blocks = cfg.base_blocks;
	s->disk_hot_blocks = cfg.hot_blocks;
	s->disk_rate_blocks_per_sec = cfg.rate_blocks_per_sec;
	s->disk_version_table_addr = state == TESTVM_DISK_NONE ? 0 : TESTVM_DISK_TABLE_ADDR;
	s->disk_inflight_block = TESTVM_NO_BLOCK;
	s->disk_inflight_version = 0;
}

void disk_publish(volatile struct testvm_status *s)
{
	if (state == TESTVM_DISK_NONE)
		return; /* nothing moves: the page workload's publish costs what it did before the disk */
	s->disk_state = state;
	s->disk_passes = dc.passes;
	s->disk_writes = dc.writes;
	s->disk_blocks_written = dc.blocks_written;
	s->disk_blocks_checked = dc.checked;
	s->disk_stale_blocks = dc.stale;
	s->disk_last_written_block = dc.last_written;
	s->disk_last_stale_block = dc.last_stale;
	s->disk_errors = dc.errors;
	s->check_disk_blocks = dc.check_blocks;
	s->check_disk_stale_blocks = dc.check_stale;
}

void disk_log_counters(void)
{
	if (state != TESTVM_DISK_NONE)
		kprintf(" disk_writes=%llu disk_stale=%llu", (unsigned long long)dc.writes, (unsigned long long)dc.stale);
}

void disk_log_check(void)
{
	if (state != TESTVM_DISK_NONE)
		kprintf(" disk_blocks=%llu disk_stale=%llu", (unsigned long long)dc.check_blocks,
			(unsigned long long)dc.check_stale);
}
