/*
 * Page content of the synthetic guest (gangway-guest).
 *
 * Every data page's bytes are a pure function of the header's parameters, the page
 * index and the page's version, so a guest (or a test) can regenerate what a page must
 * hold and compare. Generation has to run at well over 1 GB/s: creating a 512 MiB guest
 * and checking it after a resume both regenerate every page.
 *
 * Only little-endian hosts are supported: content is defined by the bytes the
 * generators store, and the agent compares guests across hosts.
 */
#ifndef GANGWAY_GUEST_CONTENT_H
#define GANGWAY_GUEST_CONTENT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "guest-layout.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "guest content is defined for little-endian hosts");

/* Domain separators, so that e.g. the hot-set draw of a page is independent of its class draw. */
enum {
	GW_TAG_CLASS = 0x636c617373,      /* page class of version 0 */
	GW_TAG_V0 = 0x7630,               /* version-0 content */
	GW_TAG_VN = 0x766e,               /* content written by the running guest */
	GW_TAG_COMMON = 0x636f6d6d6f6e,   /* the 16 common (duplicated) pages */
	GW_TAG_COMMON_SEL = 0x636f6d73,   /* which common page a page duplicates */
	GW_TAG_HOT = 0x686f74,
	GW_TAG_PASS = 0x70617373,
	GW_TAG_PERM = 0x7065726d,         /* page -> image block assignment */
	GW_TAG_SHARED = 0x736861726564,   /* is an image block part of the shared image */
	GW_TAG_BLOCK = 0x626c6f636b,      /* image block content */
	GW_TAG_BLOCK_CLASS = 0x62636c,    /* image block class (zero or not) */
	GW_TAG_DISK_VN = 0x6469736b766e,  /* disk block content written by the test kernel */
	GW_TAG_DISK_HOT = 0x6469736b686f74, /* the test kernel's disk hot set */
	GW_TAG_DISK_PASS = 0x6469736b70617373, /* its order in each pass */
};

/* splitmix64's finaliser: a bijection with full avalanche. */
static inline uint64_t gw_mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

static inline uint64_t gw_hash3(uint64_t a, uint64_t b, uint64_t c)
{
	return gw_mix64(gw_mix64(gw_mix64(a ^ 0x9e3779b97f4a7c15ull) ^ b) ^ c);
}

static inline uint64_t gw_hash4(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
	return gw_mix64(gw_hash3(a, b, c) ^ d);
}

static inline uint64_t gw_gcd(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

/* A multiplier coprime to n, so that i -> (a*i + b) % n is a permutation of [0, n). */
static inline uint64_t gw_coprime(uint64_t n, uint64_t r)
{
	if (n <= 2)
		return 1;
	uint64_t a = 1 + r % (n - 1);
	while (gw_gcd(a, n) != 1)
		a = a + 1 == n ? 1 : a + 1;
	return a;
}

/*
 * Text-like content: a stream of entries drawn uniformly from a fixed 256-entry table.
 * Most entries are one short token (x86-like instruction bytes, identifiers, small
 * little-endian integers); one in four is a phrase of two tokens, which gives LZ4 the
 * longer repeats real code has. Some bytes of an entry are random (immediates,
 * displacements), so the stream is never a pure rearrangement of the table.
 * Tuned so that LZ4 compresses 1 MiB of such pages to about 0.52 of its size (0.64 when
 * each 4 KiB page is compressed alone).
 *
 * Each entry sits in a 32-byte slot so the generator copies it with four unaligned
 * 8-byte stores and advances by its real length; `mask` selects which of the first 8
 * bytes are randomised.
 */
#define GW_PHRASE_EVERY 4
#define GW_PHRASE_MAX 24

struct gw_token_table {
	uint64_t w[256][4], mask[256];
	uint8_t len[256];
};

/* Defined once, in guest-memory.c: a static table here would give every file that includes
 * this header a copy of its own, and all but the one gw_tokens_init filled would be zeros. */
extern struct gw_token_table gw_tokens;

#define GW_T(s, m) { s, sizeof(s) - 1, m }
static const struct {
	const char *bytes;
	uint8_t len;
	uint8_t random_mask; /* bit i set: byte i is random */
} gw_token_seed[] = {
	/* x86-64 instruction sequences; displacements and immediates are random bytes */
	GW_T("\x55\x48\x89\xe5", 0), GW_T("\x5d\xc3", 0), GW_T("\xc9\xc3", 0),
	GW_T("\x48\x83\xec\x10", 0), GW_T("\x48\x83\xc4\x10", 0), GW_T("\x48\x83\xec\x28", 0),
	GW_T("\x48\x89\x7d\xf8", 0), GW_T("\x48\x8b\x45\xf8", 0), GW_T("\x89\x75\xf4", 0),
	GW_T("\x8b\x45\xf4", 0), GW_T("\x31\xc0", 0), GW_T("\x31\xd2", 0),
	GW_T("\x0f\x1f\x44\x00\x00", 0), GW_T("\x66\x0f\x1f\x44\x00\x00", 0),
	GW_T("\x0f\x1f\x80\x00\x00\x00\x00", 0), GW_T("\x48\x85\xc0", 0), GW_T("\x85\xc0", 0),
	GW_T("\x74\x00", 0x02), GW_T("\x75\x00", 0x02), GW_T("\xeb\x00", 0x02), GW_T("\x7e\x00", 0x02),
	GW_T("\xe8\x00\x00\x00\x00", 0x1e), GW_T("\xe9\x00\x00\x00\x00", 0x1e),
	GW_T("\x0f\x84\x00\x00\x00\x00", 0x3c), GW_T("\x0f\x85\x00\x00\x00\x00", 0x3c),
	GW_T("\x48\x8d\x05\x00\x00\x00\x00", 0x78), GW_T("\x48\x8b\x05\x00\x00\x00\x00", 0x78),
	GW_T("\x48\x8d\x3d\x00\x00\x00\x00", 0x78), GW_T("\x48\x8d\x35\x00\x00\x00\x00", 0x78),
	GW_T("\xff\xd0", 0), GW_T("\x48\x89\xc7", 0), GW_T("\x48\x89\xde", 0),
	GW_T("\x41\x54", 0), GW_T("\x41\x5c", 0), GW_T("\x53\x48\x83\xec\x20", 0),
	GW_T("\x5b\x41\x5c\xc3", 0), GW_T("\xcc\xcc\xcc\xcc", 0), GW_T("\x90\x90", 0),
	GW_T("\xc7\x45\xfc\x00\x00\x00\x00", 0), GW_T("\x83\x7d\xfc\x00", 0),
	GW_T("\x48\x8b\x04\x24", 0), GW_T("\x48\x8b\x5c\x24\x08", 0), GW_T("\xf3\x0f\x1e\xfa", 0),
	GW_T("\x48\x63\xd0", 0), GW_T("\x0f\xb6\x00", 0), GW_T("\x88\x45\xff", 0),
	GW_T("\x48\x01\xd0", 0), GW_T("\x48\x29\xc2", 0), GW_T("\x39\xc2", 0),
	GW_T("\xb8\x01\x00\x00\x00", 0), GW_T("\xba\x00\x00\x00\x00", 0x1e),
	GW_T("\xbe\x00\x00\x00\x00", 0x1e), GW_T("\x48\xc7\xc0\xff\xff\xff\xff", 0),
	GW_T("\x41\x57\x41\x56\x41\x55\x41\x54", 0), GW_T("\x41\x5d\x41\x5e\x41\x5f", 0),
	GW_T("\x48\x8b\x7c\x24\x00", 0x10), GW_T("\x48\x89\x44\x24\x00", 0x10),
	GW_T("\x8b\x44\x24\x00", 0x08), GW_T("\x89\x44\x24\x00", 0x08),
	GW_T("\x48\x8b\x47\x00", 0x08), GW_T("\x48\x89\x47\x00", 0x08),
	GW_T("\x4c\x89\xe7", 0), GW_T("\x4c\x89\xf6", 0), GW_T("\x49\x89\xfc", 0),
	GW_T("\x0f\xaf\xc2", 0), GW_T("\xc1\xe0\x04", 0), GW_T("\x48\xc1\xe8\x0c", 0),
	GW_T("\x66\x90", 0), GW_T("\xc3\x90", 0), GW_T("\x0f\x0b", 0),
	/* identifiers and strings */
	GW_T("static ", 0), GW_T("struct ", 0), GW_T("return ", 0), GW_T("unsigned ", 0),
	GW_T("const ", 0), GW_T("void ", 0), GW_T("int ", 0), GW_T("char *", 0),
	GW_T("kmalloc", 0), GW_T("kfree", 0), GW_T("printk", 0), GW_T("mutex_lock", 0),
	GW_T("mutex_unlock", 0), GW_T("spin_lock", 0), GW_T("spin_unlock", 0), GW_T("memcpy", 0),
	GW_T("memset", 0), GW_T("strlen", 0), GW_T("init_", 0), GW_T("_exit", 0),
	GW_T("module_", 0), GW_T("driver", 0), GW_T("device", 0), GW_T("buffer", 0),
	GW_T("error", 0), GW_T("ENOMEM", 0), GW_T("EINVAL", 0), GW_T("__func__", 0),
	GW_T("debug", 0), GW_T("inode", 0), GW_T("dentry", 0), GW_T("page", 0),
	GW_T("vm_area", 0), GW_T("task_struct", 0), GW_T("sched", 0), GW_T("irq", 0),
	GW_T("GLIBC_2.2.5", 0), GW_T("libc.so.6", 0), GW_T(".text", 0), GW_T(".rodata", 0),
	GW_T(".data", 0), GW_T(".bss", 0), GW_T("_start", 0), GW_T("main", 0),
	GW_T("printf", 0), GW_T("malloc", 0), GW_T("free", 0), GW_T("/usr/lib/", 0),
	GW_T("/etc/", 0), GW_T("config", 0), GW_T("systemd", 0), GW_T("network", 0),
	GW_T("%s: %d\n", 0), GW_T("\n\t", 0), GW_T("  ", 0), GW_T("()", 0),
	GW_T("{\n", 0), GW_T("}\n", 0), GW_T(" == NULL", 0), GW_T("if (", 0),
	GW_T("else ", 0), GW_T("for (", 0), GW_T("while (", 0), GW_T("sizeof(", 0),
	GW_T("->", 0), GW_T("; ", 0), GW_T("0x", 0), GW_T("uint64_t", 0),
	GW_T("size_t", 0), GW_T("NULL", 0), GW_T("true", 0), GW_T("false", 0),
	GW_T("pthread_", 0), GW_T("open", 0), GW_T("read", 0), GW_T("write", 0),
	GW_T("close", 0), GW_T("mmap", 0), GW_T("ioctl", 0), GW_T("socket", 0),
	GW_T("connect", 0), GW_T("send", 0), GW_T("recv", 0), GW_T("_init", 0),
	GW_T("_fini", 0), GW_T("__libc_", 0), GW_T("__stack_chk_fail", 0), GW_T("errno", 0),
	GW_T("string", 0), GW_T("value", 0), GW_T("count", 0), GW_T("length", 0),
	GW_T("index", 0), GW_T("state", 0), GW_T("flags", 0), GW_T("offset", 0),
	GW_T("Linux", 0), GW_T("version", 0), GW_T("%lu", 0), GW_T("\"", 0),
	GW_T("x86_64", 0), GW_T("lock", 0), GW_T("list_head", 0), GW_T("rcu_read_", 0),
	/* random words: hashes, addresses, checksums */
	GW_T("\x00\x00\x00\x00", 0x0f), GW_T("\x00\x00\x00\x00", 0x0f), GW_T("\x00\x00\x00\x00", 0x0f),
	GW_T("\x00\x00\x00\x00\x00\x00", 0x3f), GW_T("\x00\x00\x00\x00\x00\x00", 0x3f),
};
#undef GW_T

static inline void gw_tokens_init(void)
{
	size_t n = sizeof(gw_token_seed) / sizeof(gw_token_seed[0]);
	uint8_t base[256][16];
	uint8_t base_len[256];
	uint64_t base_mask[256];
	for (size_t t = 0; t < 256; t++) {
		memset(base[t], 0, sizeof(base[t]));
		base_mask[t] = 0;
		if (t < n) {
			base_len[t] = gw_token_seed[t].len;
			memcpy(base[t], gw_token_seed[t].bytes, base_len[t]);
			for (int i = 0; i < 8; i++)
				if (gw_token_seed[t].random_mask & (1u << i))
					base_mask[t] |= 0xffull << (8 * i);
		} else {
			/* The rest of the table: kernel-like pointers and small integers, as found
			 * in data structures. */
			size_t k = t - n;
			if (k % 3 == 0) {
				uint64_t v = 0xffffffff81000000ull + (k << 12);
				memcpy(base[t], &v, 8);
				base_len[t] = 8;
			} else if (k % 3 == 1) {
				uint32_t v = (uint32_t)k;
				memcpy(base[t], &v, 4);
				base_len[t] = 4;
			} else {
				uint16_t v = (uint16_t)(k * 7);
				memcpy(base[t], &v, 2);
				base_len[t] = 2;
			}
		}
	}
	uint64_t r = 12345; /* fixed: the table is part of the content definition */
	for (size_t t = 0; t < 256; t++) {
		uint8_t slot[32] = {0};
		size_t len = base_len[t];
		memcpy(slot, base[t], len);
		if (t % GW_PHRASE_EVERY == 0) {
			r = gw_mix64(r + 1);
			size_t b = r % 256;
			if (len + base_len[b] <= GW_PHRASE_MAX) {
				memcpy(slot + len, base[b], base_len[b]);
				len += base_len[b];
			}
		}
		memcpy(gw_tokens.w[t], slot, sizeof(slot));
		gw_tokens.mask[t] = base_mask[t];
		gw_tokens.len[t] = (uint8_t)len;
	}
}

static inline uint64_t gw_xorshift(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

/* Emits one entry at p (storing 32 bytes, advancing by its length); the top byte of x picks it. */
static inline size_t gw_emit_token(uint8_t *p, uint64_t x)
{
	unsigned t = (unsigned)(x >> 56);
	uint64_t first = gw_tokens.w[t][0] ^ (gw_tokens.mask[t] & x);
	memcpy(p, &first, 8);
	memcpy(p + 8, &gw_tokens.w[t][1], 8);
	memcpy(p + 16, &gw_tokens.w[t][2], 8);
	memcpy(p + 24, &gw_tokens.w[t][3], 8);
	return gw_tokens.len[t];
}

static inline void gw_fill_text(uint8_t *dst, uint64_t key)
{
	uint64_t x = gw_mix64(key) | 1; /* xorshift state must not be zero */
	size_t pos = 0;
	while (pos <= GUEST_PAGE_SIZE - 32) {
		x = gw_xorshift(x);
		pos += gw_emit_token(dst + pos, x);
	}
	/* The last entries go through a scratch buffer: slot stores must not run past the page. */
	uint8_t tail[64];
	size_t have = 0;
	while (pos + have < GUEST_PAGE_SIZE) {
		x = gw_xorshift(x);
		have += gw_emit_token(tail + have, x);
	}
	memcpy(dst + pos, tail, GUEST_PAGE_SIZE - pos);
}

/* Incompressible content: independent splitmix64 outputs, so the loop has no serial chain. */
static inline void gw_fill_random(uint8_t *dst, uint64_t key)
{
	uint64_t base = gw_mix64(key);
	for (size_t i = 0; i < GUEST_PAGE_SIZE / 8; i++) {
		uint64_t w = gw_mix64(base + (i + 1) * 0x9e3779b97f4a7c15ull);
		memcpy(dst + 8 * i, &w, 8);
	}
}

/*
 * The content model: which content each (page, version) has. Built from the header.
 *
 * Image sharing: data page i (0-based among data pages) is assigned image block
 * k = (a*i + b) % D by a per-seed permutation of [0, D). Block k belongs to the shared
 * image with probability shared/1000, drawn from (image_seed, k); a page whose block is
 * in the image holds that block's content (which may itself be a zero block). Because
 * the assignment is a permutation and membership depends on the block only, two guests
 * of the same size and image seed hold exactly the same set of image blocks at different
 * offsets, so they share about `shared` of their non-zero pages.
 */
struct gw_model {
	uint32_t profile;
	uint64_t seed;
	uint64_t image_seed;
	uint32_t shared_permille;
	uint64_t first_data_page;
	uint64_t data_pages;
	uint64_t perm_a, perm_b;
	uint8_t (*common)[GUEST_PAGE_SIZE]; /* 16 pages, os-image only */
};

/* Per-mille of version-0 pages (and image blocks) that are all-zero, by profile. */
static inline uint32_t gw_zero_permille(uint32_t profile)
{
	return profile == GUEST_PROFILE_ZERO ? 900 : profile == GUEST_PROFILE_OS_IMAGE ? 200 : 0;
}

/*
 * Block k of the shared image (of `image_seed`): NULL for an all-zero block, else `buf`.
 * Random-profile images have no zero blocks; the others have gw_zero_permille of them.
 */
static inline const uint8_t *gw_image_block(uint32_t profile, uint64_t image_seed, uint64_t k, uint8_t *buf)
{
	uint64_t key = gw_hash3(image_seed, GW_TAG_BLOCK, k);
	if (profile == GUEST_PROFILE_RANDOM) {
		gw_fill_random(buf, key);
		return buf;
	}
	if (gw_hash3(image_seed, GW_TAG_BLOCK_CLASS, k) % 1000 < gw_zero_permille(profile))
		return NULL;
	gw_fill_text(buf, key);
	return buf;
}

/*
 * Expected content of `page` at `version`: NULL for an all-zero page, else a pointer to
 * 4096 bytes, either `buf` (filled here) or a cached common page.
 */
static inline const uint8_t *gw_content(const struct gw_model *m, uint64_t page, uint32_t version, uint8_t *buf)
{
	if (version > 0) {
		switch (m->profile) {
		case GUEST_PROFILE_RANDOM:
			gw_fill_random(buf, gw_hash4(m->seed, GW_TAG_VN, page, version));
			return buf;
		case GUEST_PROFILE_OS_IMAGE:
			gw_fill_text(buf, gw_hash4(m->seed, GW_TAG_VN, page, version));
			return buf;
		default:
			if (version % 2 == 0)
				return NULL;
			/* Odd versions differ from the zero page only in a stamp, like a sparse update. */
			memset(buf, 0, GUEST_PAGE_SIZE);
			uint64_t stamp[2] = {page, version};
			memcpy(buf, stamp, sizeof(stamp));
			return buf;
		}
	}
	if (m->shared_permille > 0) {
		uint64_t k = (m->perm_a * (page - m->first_data_page) + m->perm_b) % m->data_pages;
		if (gw_hash3(m->image_seed, GW_TAG_SHARED, k) % 1000 < m->shared_permille)
			return gw_image_block(m->profile, m->image_seed, k, buf);
	}
	uint64_t key = gw_hash3(m->seed, GW_TAG_V0, page);
	if (m->profile == GUEST_PROFILE_RANDOM) {
		gw_fill_random(buf, key);
		return buf;
	}
	uint64_t cls = gw_hash3(m->seed, GW_TAG_CLASS, page) % 1000;
	if (cls < gw_zero_permille(m->profile))
		return NULL;
	if (m->profile == GUEST_PROFILE_OS_IMAGE && cls < 300)
		return m->common[gw_hash3(m->seed, GW_TAG_COMMON_SEL, page) % 16];
	gw_fill_text(buf, key);
	return buf;
}

/*
 * The disk of gangway-testvm (native/testvm/disk.c), 4 KiB blocks. Version 0 is the base
 * image the host writes (agent/guest/testvm-disk.ts): block k < base_blocks is block k of
 * the shared image of `image_seed`, os-image-like whatever the RAM's profile, so disks of
 * VMs cloned from one base image hold the same blocks, and a RAM page that holds image
 * block k (gw.shared) holds the same bytes, as a page cache would; blocks from base_blocks
 * on are zero (holes of the sparse image). Versions the kernel writes are text of (seed,
 * block, version) under a tag of their own, so they collide with no page's content.
 * Returns NULL for an all-zero block, else `buf`.
 */
static inline const uint8_t *gw_disk_block(uint64_t seed, uint64_t image_seed, uint64_t base_blocks, uint64_t block,
					   uint32_t version, uint8_t *buf)
{
	if (version > 0) {
		gw_fill_text(buf, gw_hash4(seed, GW_TAG_DISK_VN, block, version));
		return buf;
	}
	if (block >= base_blocks)
		return NULL;
	return gw_image_block(GUEST_PROFILE_OS_IMAGE, image_seed, block, buf);
}

#endif
