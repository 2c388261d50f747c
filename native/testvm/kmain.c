/*
 * gangway-testvm: a multiboot kernel that behaves like gangway's synthetic guest
 * (native/src/guest.c), so that real QEMU VMs can be migrated and checked.
 *
 * It works on the pages from 16 MiB to the end of RAM (or gw.mem MiB of them; parameters in
 * params.h). It first writes every page's version-0 content, then rewrites the pages of a
 * hot set at the dirty rate, a pass at a time in a fresh order each pass, and before each
 * rewrite checks that the page still holds what it last wrote there. Content comes from
 * guest-content.h, the process guest's own functions: a pure function of the parameters,
 * the page and its version. The kernel's state (versions, hot list, counters) lives in its
 * RAM, so it moves with the VM. What it found is in the status block (status.h) and on COM1:
 * `ready` once set up, then each second `t=<s> pass=<p> writes=<n> stale=<n>`. Given a
 * virtio-blk disk, disk.c does the same for its blocks, from the same loop at a rate of its
 * own, and the full check covers them too.
 *
 * Time: the TSC, its rate measured against the PIT at boot. The PIT also raises IRQ 0 each
 * millisecond, so between writes the CPU halts instead of spinning (a spinning TCG vCPU
 * takes a whole host core). Under TCG the TSC follows the host's clock while the VM runs
 * and stands still while QEMU has it stopped (stop, migration), whereas the RTC follows the
 * host's wall clock throughout: the RTC running ahead of the TSC is how a stop is seen
 * (`resumes`), at one-second resolution, so only stops of about 3 s or more. A SIGSTOP of
 * the QEMU process stops neither clock and is not seen. The dirty rate is a token bucket
 * over the TSC, capped at 10 ms of credit, so a stop never turns into a burst.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "disk.h"
#include "guest-content.h"
#include "guest-layout.h"
#include "hw.h"
#include "params.h"
#include "status.h"

/* The content generator's token table: declared extern in guest-content.h, defined once per program. */
struct gw_token_table gw_tokens;

/* TypeScript reads these offsets (agent/guest/testvm-status.ts); they must never move. */
_Static_assert(offsetof(struct testvm_status, layout_version) == 8, "layout_version");
_Static_assert(offsetof(struct testvm_status, state) == 12, "state");
_Static_assert(offsetof(struct testvm_status, seq) == 16, "seq");
_Static_assert(offsetof(struct testvm_status, page_size) == 20, "page_size");
_Static_assert(offsetof(struct testvm_status, range_start) == 24, "range_start");
_Static_assert(offsetof(struct testvm_status, page_count) == 32, "page_count");
_Static_assert(offsetof(struct testvm_status, seed) == 40, "seed");
_Static_assert(offsetof(struct testvm_status, image_seed) == 48, "image_seed");
_Static_assert(offsetof(struct testvm_status, profile) == 56, "profile");
_Static_assert(offsetof(struct testvm_status, shared_permille) == 60, "shared_permille");
_Static_assert(offsetof(struct testvm_status, hot_permille) == 64, "hot_permille");
_Static_assert(offsetof(struct testvm_status, hot_page_count) == 68, "hot_page_count");
_Static_assert(offsetof(struct testvm_status, dirty_rate_bytes_per_sec) == 72, "dirty_rate_bytes_per_sec");
_Static_assert(offsetof(struct testvm_status, version_table_addr) == 80, "version_table_addr");
_Static_assert(offsetof(struct testvm_status, hot_list_addr) == 88, "hot_list_addr");
_Static_assert(offsetof(struct testvm_status, tsc_hz) == 96, "tsc_hz");
_Static_assert(offsetof(struct testvm_status, uptime_ms) == 104, "uptime_ms");
_Static_assert(offsetof(struct testvm_status, passes) == 112, "passes");
_Static_assert(offsetof(struct testvm_status, pages_written) == 120, "pages_written");
_Static_assert(offsetof(struct testvm_status, pages_checked) == 128, "pages_checked");
_Static_assert(offsetof(struct testvm_status, stale_pages) == 136, "stale_pages");
_Static_assert(offsetof(struct testvm_status, last_written_addr) == 144, "last_written_addr");
_Static_assert(offsetof(struct testvm_status, last_stale_addr) == 152, "last_stale_addr");
_Static_assert(offsetof(struct testvm_status, resumes) == 160, "resumes");
_Static_assert(offsetof(struct testvm_status, meta_errors) == 164, "meta_errors");
_Static_assert(offsetof(struct testvm_status, check_request) == 168, "check_request");
_Static_assert(offsetof(struct testvm_status, check_done) == 172, "check_done");
_Static_assert(offsetof(struct testvm_status, check_pages) == 176, "check_pages");
_Static_assert(offsetof(struct testvm_status, check_stale_pages) == 184, "check_stale_pages");
_Static_assert(offsetof(struct testvm_status, disk_state) == 192, "disk_state");
_Static_assert(offsetof(struct testvm_status, disk_block_size) == 196, "disk_block_size");
_Static_assert(offsetof(struct testvm_status, disk_capacity_bytes) == 200, "disk_capacity_bytes");
_Static_assert(offsetof(struct testvm_status, disk_block_count) == 208, "disk_block_count");
_Static_assert(offsetof(struct testvm_status, disk_base_blocks) == 216, "disk_base_blocks");
_Static_assert(offsetof(struct testvm_status, disk_hot_blocks) == 224, "disk_hot_blocks");
_Static_assert(offsetof(struct testvm_status, disk_rate_blocks_per_sec) == 232, "disk_rate_blocks_per_sec");
_Static_assert(offsetof(struct testvm_status, disk_version_table_addr) == 240, "disk_version_table_addr");
_Static_assert(offsetof(struct testvm_status, disk_passes) == 248, "disk_passes");
_Static_assert(offsetof(struct testvm_status, disk_writes) == 256, "disk_writes");
_Static_assert(offsetof(struct testvm_status, disk_blocks_written) == 264, "disk_blocks_written");
_Static_assert(offsetof(struct testvm_status, disk_blocks_checked) == 272, "disk_blocks_checked");
_Static_assert(offsetof(struct testvm_status, disk_stale_blocks) == 280, "disk_stale_blocks");
_Static_assert(offsetof(struct testvm_status, disk_last_written_block) == 288, "disk_last_written_block");
_Static_assert(offsetof(struct testvm_status, disk_last_stale_block) == 296, "disk_last_stale_block");
_Static_assert(offsetof(struct testvm_status, disk_inflight_block) == 304, "disk_inflight_block");
_Static_assert(offsetof(struct testvm_status, disk_inflight_version) == 312, "disk_inflight_version");
_Static_assert(offsetof(struct testvm_status, disk_errors) == 316, "disk_errors");
_Static_assert(offsetof(struct testvm_status, check_disk_blocks) == 320, "check_disk_blocks");
_Static_assert(offsetof(struct testvm_status, check_disk_stale_blocks) == 328, "check_disk_stale_blocks");
_Static_assert(sizeof(struct testvm_status) == 336, "testvm_status size");
/* QEMU puts the multiboot memory map at 0x9000: the block must end before it. */
_Static_assert(TESTVM_STATUS_ADDR + sizeof(struct testvm_status) <= 0x9000, "status block overlaps the boot info");

#define MULTIBOOT_BOOT_MAGIC 0x2badb002u
#define MULTIBOOT_INFO_CMDLINE (1u << 2)
#define MULTIBOOT_INFO_MMAP (1u << 6)
#define MULTIBOOT_RAM 1u
/* The version table and hot list go here, between the kernel (link.ld) and the disk's table. */
#define TABLES_ADDR 0x400000u
#define CMDLINE_MAX 1024u
#define STALE_LINES_MAX 32u
#define CREDIT_CAP_SEC_DIV 100u /* 10 ms */
#define STOP_SEEN_SEC 3u

struct multiboot_info {
	uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr, syms[4];
	uint32_t mmap_length, mmap_addr;
};

struct multiboot_mmap_entry {
	uint32_t size; /* of the rest of the entry */
	uint64_t base, length;
	uint32_t type;
} __attribute__((packed));

static volatile struct testvm_status *const st = (volatile struct testvm_status *)TESTVM_STATUS_ADDR;

static struct testvm_params params;
static char cmdline[CMDLINE_MAX];

static struct gw_model model;
static uint8_t common_pages[16][GUEST_PAGE_SIZE] __attribute__((aligned(GUEST_PAGE_SIZE)));
static uint8_t scratch[GUEST_PAGE_SIZE] __attribute__((aligned(GUEST_PAGE_SIZE)));

static uint64_t first_page, page_count; /* the range, in page numbers (address / 4096) */
static uint32_t *version;               /* indexed by page - first_page */
static uint32_t *hot;
static uint32_t hot_count;
static uint64_t pass_a, pass_b, pass_of_ab = UINT64_MAX; /* this pass's order */
static uint32_t pass_cursor;

static uint64_t tsc_hz, tsc_ready;

/* The kernel's own counters; the status block is a copy the agent may overwrite. */
static struct {
	uint64_t passes, written, checked, stale, last_written_addr, last_stale_addr;
	uint32_t resumes, meta_errors, check_done;
	uint64_t check_pages, check_stale_pages;
	unsigned stale_lines;
} c;

static const char *profile_name(uint32_t profile)
{
	return profile == GUEST_PROFILE_ZERO ? "zero" : profile == GUEST_PROFILE_OS_IMAGE ? "os-image" : "random";
}

static uint64_t uptime_ms(uint64_t now)
{
	return (now - tsc_ready) / (tsc_hz / 1000);
}

/* Copies the counters into the block, `seq` odd meanwhile (status.h). */
static void publish(uint64_t now)
{
	st->seq++;
	BARRIER();
	st->uptime_ms = uptime_ms(now);
	st->passes = c.passes;
	st->pages_written = c.written;
	st->pages_checked = c.checked;
	st->stale_pages = c.stale;
	st->last_written_addr = c.last_written_addr;
	st->last_stale_addr = c.last_stale_addr;
	st->resumes = c.resumes;
	st->meta_errors = c.meta_errors;
	st->check_pages = c.check_pages;
	st->check_stale_pages = c.check_stale_pages;
	st->check_done = c.check_done;
	disk_publish(st);
	BARRIER();
	st->seq++;
}

static _Noreturn void fail(void)
{
	st->state = TESTVM_STATE_FAILED;
	kprintf("failed: halted\n");
	halt_forever();
}

static uint8_t *page_ptr(uint64_t page)
{
	return (uint8_t *)(uintptr_t)(page * GUEST_PAGE_SIZE);
}

static int is_zero_page(const uint8_t *p)
{
	const uint32_t *w = (const uint32_t *)p;
	uint32_t any = 0;
	for (unsigned i = 0; i < GUEST_PAGE_SIZE / 4; i++)
		any |= w[i];
	return any == 0;
}

static int page_is_current(uint64_t page, uint32_t v)
{
	const uint8_t *want = gw_content(&model, page, v, scratch);
	return want ? memcmp(page_ptr(page), want, GUEST_PAGE_SIZE) == 0 : is_zero_page(page_ptr(page));
}

/* Generates straight into the page: one pass over it instead of two. */
static void write_page(uint64_t page, uint32_t v)
{
	uint8_t *p = page_ptr(page);
	const uint8_t *want = gw_content(&model, page, v, p);
	if (!want)
		memset(p, 0, GUEST_PAGE_SIZE);
	else if (want != p)
		memcpy(p, want, GUEST_PAGE_SIZE);
}

static void found_stale(uint64_t page, uint32_t v, const char *by)
{
	c.stale++;
	c.last_stale_addr = page * GUEST_PAGE_SIZE;
	if (c.stale_lines < STALE_LINES_MAX)
		kprintf("stale page 0x%llx: not version %u (%s)\n", (unsigned long long)(page * GUEST_PAGE_SIZE), v, by);
	else if (c.stale_lines == STALE_LINES_MAX)
		kprintf("further stale pages are counted, not listed\n");
	c.stale_lines++;
}

/* ---- set-up ---- */

static void read_boot_info(uint32_t magic, const struct multiboot_info *mbi)
{
	if (magic != MULTIBOOT_BOOT_MAGIC) {
		kprintf("error: not started by a multiboot loader (magic 0x%x)\n", magic);
		fail();
	}
	if (mbi->flags & MULTIBOOT_INFO_CMDLINE) {
		const char *s = (const char *)(uintptr_t)mbi->cmdline;
		size_t n = strlen(s);
		if (n >= CMDLINE_MAX) {
			kprintf("error: the command line has %u characters (at most %u)\n", (unsigned)n, CMDLINE_MAX - 1);
			fail();
		}
		memcpy(cmdline, s, n + 1);
	}
	kprintf("cmdline: %s\n", cmdline);
	if (params_parse(cmdline, &params) != 0)
		fail();

	if (!(mbi->flags & MULTIBOOT_INFO_MMAP)) {
		kprintf("error: the loader gave no memory map\n");
		fail();
	}
	uint64_t end = 0;
	for (uint32_t at = mbi->mmap_addr; at < mbi->mmap_addr + mbi->mmap_length;) {
		const struct multiboot_mmap_entry *e = (const struct multiboot_mmap_entry *)(uintptr_t)at;
		if (e->type == MULTIBOOT_RAM && e->base <= TESTVM_RANGE_START && e->base + e->length > TESTVM_RANGE_START)
			end = e->base + e->length;
		at += e->size + sizeof(e->size);
	}
	if (end > 1ull << 32)
		end = 1ull << 32; /* paging is off: the kernel reaches 4 GiB */
	end &= ~(uint64_t)(GUEST_PAGE_SIZE - 1);
	if (end < TESTVM_RANGE_START + 64 * GUEST_PAGE_SIZE) {
		kprintf("error: no RAM region holds 16 MiB and 64 pages after it (give the VM more memory)\n");
		fail();
	}
	if (params.mem_bytes) {
		if (TESTVM_RANGE_START + params.mem_bytes > end) {
			kprintf("error: gw.mem=%llu MiB, but the RAM from 16 MiB has %llu MiB\n",
				(unsigned long long)(params.mem_bytes >> 20),
				(unsigned long long)((end - TESTVM_RANGE_START) >> 20));
			fail();
		}
		end = TESTVM_RANGE_START + params.mem_bytes;
	}
	first_page = TESTVM_RANGE_START / GUEST_PAGE_SIZE;
	page_count = (end - TESTVM_RANGE_START) / GUEST_PAGE_SIZE;
}

static void setup_model(void)
{
	gw_tokens_init();
	model = (struct gw_model){
		.profile = params.profile,
		.seed = params.seed,
		.image_seed = params.image_seed,
		.shared_permille = params.shared_permille,
		.first_data_page = first_page,
		.data_pages = page_count,
		.perm_a = gw_coprime(page_count, gw_hash3(params.seed, GW_TAG_PERM, 1)),
		.perm_b = gw_hash3(params.seed, GW_TAG_PERM, 2) % page_count,
		.common = common_pages,
	};
	if (params.profile == GUEST_PROFILE_OS_IMAGE)
		for (uint64_t k = 0; k < 16; k++)
			gw_fill_text(common_pages[k], gw_hash3(params.seed, GW_TAG_COMMON, k));

	/* The version table, then the hot list, as the process guest picks it. */
	version = (uint32_t *)(uintptr_t)TABLES_ADDR;
	uint64_t version_bytes = (page_count * 4 + GUEST_PAGE_SIZE - 1) & ~(uint64_t)(GUEST_PAGE_SIZE - 1);
	hot = (uint32_t *)(uintptr_t)(TABLES_ADDR + version_bytes);
	if (TABLES_ADDR + version_bytes + page_count * 4 > TESTVM_DISK_TABLE_ADDR) {
		kprintf("error: %llu pages need more table room than 4..12 MiB\n", (unsigned long long)page_count);
		fail();
	}
	hot_count = 0;
	for (uint64_t p = first_page; p < first_page + page_count; p++)
		if (gw_hash3(params.seed, GW_TAG_HOT, p) % 1000 < params.hot_permille)
			hot[hot_count++] = (uint32_t)p;
}

static void publish_parameters(void)
{
	st->page_size = GUEST_PAGE_SIZE;
	st->range_start = first_page * GUEST_PAGE_SIZE;
	st->page_count = page_count;
	st->seed = params.seed;
	st->image_seed = params.image_seed;
	st->profile = params.profile;
	st->shared_permille = params.shared_permille;
	st->hot_permille = params.hot_permille;
	st->hot_page_count = hot_count;
	st->dirty_rate_bytes_per_sec = params.rate_bytes_per_sec;
	st->version_table_addr = (uintptr_t)version;
	st->hot_list_addr = (uintptr_t)hot;
	st->tsc_hz = tsc_hz;
	disk_publish_parameters(st);
}

/* ---- running ---- */

static uint32_t next_hot_page(void)
{
	if (pass_of_ab != c.passes) {
		uint64_t r = gw_hash3(params.seed, GW_TAG_PASS, c.passes);
		pass_a = gw_coprime(hot_count, r);
		pass_b = gw_mix64(r) % hot_count;
		pass_of_ab = c.passes;
	}
	return hot[(pass_a * pass_cursor + pass_b) % hot_count];
}

static void write_one(void)
{
	uint32_t page = next_hot_page();
	uint32_t *v = &version[page - first_page];
	if (!page_is_current(page, *v))
		found_stale(page, *v, "rewrite");
	c.checked++;
	write_page(page, *v + 1);
	++*v;
	c.written++;
	c.last_written_addr = (uint64_t)page * GUEST_PAGE_SIZE;
	if (++pass_cursor == hot_count) {
		pass_cursor = 0;
		c.passes++;
	}
	publish(rdtsc());
}

/* Checks every page of the range, at the agent's request (status.h). */
static void full_check(uint32_t request)
{
	uint64_t stale = 0, sum = 0;
	for (uint64_t i = 0; i < page_count; i++) {
		if (!page_is_current(first_page + i, version[i])) {
			found_stale(first_page + i, version[i], "full check");
			stale++;
		}
		sum += version[i];
	}
	if (sum != c.written) {
		kprintf("meta error: the version table sums to %llu, but %llu pages were written\n",
			(unsigned long long)sum, (unsigned long long)c.written);
		c.meta_errors++;
	}
	c.checked += page_count;
	c.check_pages = page_count;
	c.check_stale_pages = stale;
	c.meta_errors += (uint32_t)disk_full_check();
	c.check_done = request;
	publish(rdtsc());
	kprintf("check %u: pages=%llu stale=%llu", request, (unsigned long long)page_count, (unsigned long long)stale);
	disk_log_check();
	kprintf("\n");
}

static uint64_t last_tick_tsc;
static uint32_t last_tick_rtc;

/* Once a second: the log line, and a look at the RTC for a stop (see the top of the file). */
static void second_tick(uint64_t now)
{
	uint32_t rtc = rtc_seconds_of_day();
	uint64_t tsc_sec = (now - last_tick_tsc) / tsc_hz;
	uint32_t rtc_sec = (rtc + 86400 - last_tick_rtc) % 86400;
	if (rtc_sec >= tsc_sec + STOP_SEEN_SEC) {
		c.resumes++;
		kprintf("resume: the RTC moved %u s while the TSC moved %llu s: the VM was stopped\n", rtc_sec,
			(unsigned long long)tsc_sec);
	}
	last_tick_tsc = now;
	last_tick_rtc = rtc;
	publish(now);
	kprintf("t=%llu pass=%llu writes=%llu stale=%llu", (unsigned long long)((now - tsc_ready) / tsc_hz),
		(unsigned long long)c.passes, (unsigned long long)c.written, (unsigned long long)c.stale);
	disk_log_counters();
	kprintf("\n");
}

/* The dirty rate: a token bucket over the TSC, one token per `every` ticks (0: no limit). */
struct bucket {
	int on;
	uint64_t every, cap, credit, last;
};

static struct bucket bucket_make(int on, uint64_t every, uint64_t now)
{
	uint64_t cap = tsc_hz / CREDIT_CAP_SEC_DIV;
	if (cap < 16 * every)
		cap = 16 * every;
	return (struct bucket){.on = on, .every = every, .cap = cap, .credit = 0, .last = now};
}

static int bucket_take(struct bucket *b, uint64_t now)
{
	if (!b->on)
		return 0;
	if (b->every == 0)
		return 1;
	b->credit += now - b->last;
	if (b->credit > b->cap)
		b->credit = b->cap;
	b->last = now;
	if (b->credit < b->every)
		return 0;
	b->credit -= b->every;
	return 1;
}

static _Noreturn void run(void)
{
	const int writing = hot_count > 0 && params.rate_bytes_per_sec > 0;
	uint64_t ticks_per_page = 0;
	if (writing && params.rate_bytes_per_sec != TESTVM_RATE_UNLIMITED)
		ticks_per_page = tsc_hz * GUEST_PAGE_SIZE / params.rate_bytes_per_sec;
	uint64_t ticks_per_block = 0;
	if (disk_writing() && params.disk_rate_blocks_per_sec != TESTVM_RATE_UNLIMITED)
		ticks_per_block = tsc_hz / params.disk_rate_blocks_per_sec;
	uint64_t last = rdtsc(), next_second = last + tsc_hz;
	struct bucket pages = bucket_make(writing, ticks_per_page, last);
	struct bucket blocks = bucket_make(disk_writing(), ticks_per_block, last);
	for (;;) {
		uint64_t now = rdtsc();
		uint32_t request = st->check_request;
		if (request != c.check_done) {
			full_check(request);
			now = rdtsc();
		}
		if (now >= next_second) {
			second_tick(now);
			next_second = now + tsc_hz; /* no catching up after a stop */
		}
		int worked = 0;
		if (bucket_take(&pages, now)) {
			write_one();
			worked = 1;
		}
		if (disk_writing() && bucket_take(&blocks, now)) {
			disk_write_one();
			publish(rdtsc());
			worked = 1;
		}
		if (worked)
			continue;
		publish(now);
		idle();
	}
}

void kmain(uint32_t magic, const struct multiboot_info *mbi);
void kmain(uint32_t magic, const struct multiboot_info *mbi)
{
	serial_init();
	memset((void *)st, 0, sizeof(*st));
	st->layout_version = TESTVM_STATUS_LAYOUT;
	st->state = TESTVM_STATE_SETTING_UP;
	memcpy((void *)st->magic, TESTVM_STATUS_MAGIC, 8);
	kprintf("gangway-testvm: status block at 0x%x, layout %u\n", TESTVM_STATUS_ADDR, TESTVM_STATUS_LAYOUT);

	read_boot_info(magic, mbi);
	tsc_hz = tsc_measure_hz();
	if (tsc_hz < 1000000) {
		kprintf("error: the TSC runs at %llu Hz by the PIT: no usable clock\n", (unsigned long long)tsc_hz);
		fail();
	}
	setup_model();
	if (disk_setup(&params, tsc_hz) != 0)
		fail();
	publish_parameters();
	kprintf("range 0x%llx-0x%llx: %llu pages, %u hot; profile=%s seed=%llu image_seed=%llu shared=%u hot=%u "
		"rate=%llu B/s; tsc %llu Hz\n",
		(unsigned long long)(first_page * GUEST_PAGE_SIZE),
		(unsigned long long)((first_page + page_count) * GUEST_PAGE_SIZE), (unsigned long long)page_count,
		hot_count, profile_name(params.profile), (unsigned long long)params.seed,
		(unsigned long long)params.image_seed, params.shared_permille, params.hot_permille,
		(unsigned long long)params.rate_bytes_per_sec, (unsigned long long)tsc_hz);

	uint64_t start = rdtsc();
	for (uint64_t i = 0; i < page_count; i++) {
		version[i] = 0;
		write_page(first_page + i, 0);
	}
	tsc_ready = rdtsc();
	kprintf("set up %llu pages in %llu ms\n", (unsigned long long)page_count,
		(unsigned long long)((tsc_ready - start) / (tsc_hz / 1000)));

	interrupts_init();
	last_tick_tsc = tsc_ready;
	last_tick_rtc = rtc_seconds_of_day();
	publish(tsc_ready);
	BARRIER();
	st->state = TESTVM_STATE_RUNNING;
	kprintf("ready\n");
	run();
}
