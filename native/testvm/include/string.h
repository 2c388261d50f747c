/*
 * The kernel is freestanding: there is no C library, and -m32 builds here have no 32-bit
 * glibc headers. guest-content.h includes <string.h> for memcpy and memset; this header
 * (found first through -I) declares the few the kernel defines itself in libc.c.
 */
#ifndef GANGWAY_TESTVM_STRING_H
#define GANGWAY_TESTVM_STRING_H

#include <stddef.h>

void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

#endif
