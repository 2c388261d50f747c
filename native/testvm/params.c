#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "hw.h"
#include "params.h"
#include "status.h"

#define WORD_MAX 128

enum key { K_PROFILE, K_SEED, K_IMAGE_SEED, K_SHARED, K_HOT, K_RATE, K_MEM, K_DISK_RATE, K_DISK_HOT, K_DISK_BASE, K_COUNT };

static const char *const key_names[K_COUNT] = {
	[K_PROFILE] = "gw.profile", [K_SEED] = "gw.seed", [K_IMAGE_SEED] = "gw.image_seed", [K_SHARED] = "gw.shared",
	[K_HOT] = "gw.hot",         [K_RATE] = "gw.rate", [K_MEM] = "gw.mem",
	[K_DISK_RATE] = "gw.disk_rate", [K_DISK_HOT] = "gw.disk_hot", [K_DISK_BASE] = "gw.disk_base",
};

static const char *const expected[K_COUNT] = {
	[K_PROFILE] = "zero, os-image or random",
	[K_SEED] = "a decimal integer below 2^64",
	[K_IMAGE_SEED] = "a decimal integer below 2^64",
	[K_SHARED] = "a whole per-mille, 0..1000",
	[K_HOT] = "a whole per-mille, 0..1000",
	[K_RATE] = "KiB per second (a decimal integer up to 2^40) or max",
	[K_MEM] = "MiB, 1..4096",
	[K_DISK_RATE] = "blocks per second (a decimal integer up to 2^32) or max",
	[K_DISK_HOT] = "blocks, 1..2^32",
	[K_DISK_BASE] = "blocks, a decimal integer up to 2^32",
};

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* A decimal integer without sign, spaces or base prefix, that fits in 64 bits. */
static int parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	if (!*s)
		return 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return 0;
		unsigned d = (unsigned)(*s - '0');
		if (v > (UINT64_MAX - d) / 10)
			return 0;
		v = v * 10 + d;
	}
	*out = v;
	return 1;
}

/* Applies one value; returns 0 if it is not acceptable. */
static int apply(enum key k, const char *value, struct testvm_params *p)
{
	uint64_t v = 0;
	switch (k) {
	case K_PROFILE:
		if (streq(value, "zero"))
			p->profile = GUEST_PROFILE_ZERO;
		else if (streq(value, "os-image"))
			p->profile = GUEST_PROFILE_OS_IMAGE;
		else if (streq(value, "random"))
			p->profile = GUEST_PROFILE_RANDOM;
		else
			return 0;
		return 1;
	case K_SEED:
		return parse_u64(value, &p->seed);
	case K_IMAGE_SEED:
		return parse_u64(value, &p->image_seed);
	case K_SHARED:
	case K_HOT:
		if (!parse_u64(value, &v) || v > 1000)
			return 0;
		*(k == K_SHARED ? &p->shared_permille : &p->hot_permille) = (uint32_t)v;
		return 1;
	case K_RATE:
		if (streq(value, "max")) {
			p->rate_bytes_per_sec = TESTVM_RATE_UNLIMITED;
			return 1;
		}
		if (!parse_u64(value, &v) || v > (1ull << 40))
			return 0;
		p->rate_bytes_per_sec = v * 1024;
		return 1;
	case K_MEM:
		if (!parse_u64(value, &v) || v == 0 || v > 4096)
			return 0;
		p->mem_bytes = v << 20;
		return 1;
	case K_DISK_RATE:
		if (streq(value, "max")) {
			p->disk_rate_blocks_per_sec = TESTVM_RATE_UNLIMITED;
			return 1;
		}
		if (!parse_u64(value, &v) || v > (1ull << 32))
			return 0;
		p->disk_rate_blocks_per_sec = v;
		return 1;
	case K_DISK_HOT:
		if (!parse_u64(value, &v) || v == 0 || v > (1ull << 32))
			return 0;
		p->disk_hot_blocks = v;
		return 1;
	case K_DISK_BASE:
		if (!parse_u64(value, &v) || v > (1ull << 32))
			return 0;
		p->disk_base_blocks = v;
		return 1;
	case K_COUNT:
		break;
	}
	return 0;
}

unsigned params_parse(const char *cmdline, struct testvm_params *p)
{
	*p = (struct testvm_params){.profile = GUEST_PROFILE_OS_IMAGE, .seed = 1, .hot_permille = 250, .disk_hot_blocks = 256};
	unsigned problems = 0, seen = 0;
	int first = 1;
	const char *at = cmdline;
	for (;;) {
		while (*at == ' ' || *at == '\t')
			at++;
		if (!*at)
			break;
		size_t len = 0;
		while (at[len] && at[len] != ' ' && at[len] != '\t')
			len++;
		const char *start = at;
		at += len;
		if (first) {
			first = 0; /* the kernel's path */
			continue;
		}
		char word[WORD_MAX];
		if (len >= sizeof(word)) {
			kprintf("error: a parameter of %u characters (at most %u)\n", (unsigned)len, WORD_MAX - 1);
			problems++;
			continue;
		}
		memcpy(word, start, len);
		word[len] = '\0';
		char *value = word;
		while (*value && *value != '=')
			value++;
		int has_value = *value == '=';
		*value = '\0';
		if (has_value)
			value++;
		enum key k = K_COUNT;
		for (unsigned i = 0; i < K_COUNT; i++)
			if (streq(word, key_names[i]))
				k = (enum key)i;
		if (k == K_COUNT) {
			kprintf("error: unknown parameter '%s' (allowed: gw.profile, gw.seed, gw.image_seed, gw.shared, "
				"gw.hot, gw.rate, gw.mem, gw.disk_rate, gw.disk_hot, gw.disk_base)\n",
				word);
			problems++;
		} else if (seen & (1u << k)) {
			kprintf("error: %s is given twice\n", word);
			problems++;
		} else if (!has_value || !apply(k, value, p)) {
			kprintf("error: %s='%s': expected %s\n", word, value, expected[k]);
			problems++;
		}
		if (k != K_COUNT)
			seen |= 1u << k;
	}
	p->disk_required = (seen & (1u << K_DISK_RATE | 1u << K_DISK_HOT | 1u << K_DISK_BASE)) != 0;
	return problems;
}
