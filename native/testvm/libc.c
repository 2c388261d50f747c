/*
 * What a freestanding 32-bit kernel must supply itself: the memory functions GCC may call
 * even where the source does not, and the 64-bit division helpers of libgcc (i386 has no
 * 64-bit divide instruction, and a 32-bit libgcc is missing where gcc-multilib is not
 * installed). The content code divides 64-bit hashes by small constants and page counts,
 * so the 32-bit divisor case takes the two-`divl` fast path.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Built with -fno-tree-loop-distribute-patterns: GCC would otherwise turn these loops
 * back into calls to themselves. */
void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;
	if ((((uintptr_t)d | (uintptr_t)s | n) & 3) == 0) {
		uint32_t *dw = dst;
		const uint32_t *sw = src;
		for (size_t i = 0; i < n / 4; i++)
			dw[i] = sw[i];
		return dst;
	}
	for (size_t i = 0; i < n; i++)
		d[i] = s[i];
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	uint8_t *d = dst;
	if ((((uintptr_t)d | n) & 3) == 0) {
		uint32_t *dw = dst;
		uint32_t w = (uint8_t)c * 0x01010101u;
		for (size_t i = 0; i < n / 4; i++)
			dw[i] = w;
		return dst;
	}
	for (size_t i = 0; i < n; i++)
		d[i] = (uint8_t)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const uint8_t *x = a, *y = b;
	size_t i = 0;
	if ((((uintptr_t)x | (uintptr_t)y) & 3) == 0) {
		const uint32_t *xw = a, *yw = b;
		while (i + 4 <= n && xw[i / 4] == yw[i / 4])
			i += 4;
	}
	for (; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

/* n / d and n % d, unsigned 64-bit; d != 0 (GCC's helpers have the same contract). */
static uint64_t udivmod64(uint64_t n, uint64_t d, uint64_t *rem)
{
	if (d >> 32 == 0) {
		uint32_t d32 = (uint32_t)d, hi = (uint32_t)(n >> 32), lo = (uint32_t)n;
		uint32_t q_hi = hi / d32, r = hi % d32, q_lo;
		/* r < d32, so the quotient of r:lo by d32 fits in 32 bits: divl cannot fault. */
		__asm__("divl %4" : "=a"(q_lo), "=d"(r) : "a"(lo), "d"(r), "rm"(d32));
		*rem = r;
		return (uint64_t)q_hi << 32 | q_lo;
	}
	/* A divisor of 33 bits or more: the quotient fits in 32 bits; shift and subtract. */
	uint64_t q = 0, r = 0;
	for (int bit = 63; bit >= 0; bit--) {
		uint64_t carry = r >> 63; /* r < d can exceed 2^63: the shift must not lose it */
		r = r << 1 | ((n >> bit) & 1);
		if (carry || r >= d) {
			r -= d;
			q |= 1ull << bit;
		}
	}
	*rem = r;
	return q;
}

uint64_t __udivdi3(uint64_t n, uint64_t d);
uint64_t __umoddi3(uint64_t n, uint64_t d);
uint64_t __udivmoddi4(uint64_t n, uint64_t d, uint64_t *rem);

uint64_t __udivdi3(uint64_t n, uint64_t d)
{
	uint64_t r;
	return udivmod64(n, d, &r);
}

uint64_t __umoddi3(uint64_t n, uint64_t d)
{
	uint64_t r;
	udivmod64(n, d, &r);
	return r;
}

/* What GCC calls where one expression needs both. */
uint64_t __udivmoddi4(uint64_t n, uint64_t d, uint64_t *rem)
{
	uint64_t r, q = udivmod64(n, d, &r);
	if (rem)
		*rem = r;
	return q;
}
