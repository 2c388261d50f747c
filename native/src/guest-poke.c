/*
 * gangway-guest poke: a scriptable writer for testing dirty trackers. It maps a plain file
 * (no guest layout) and writes, touches or reads the pages that lines on stdin name.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "guest.h"
#include "guest-layout.h"
#include "guest-options.h"

int cmd_poke(const struct options *o)
{
	/* An existing file is opened as named (the shim's tests reach one through a symlink); a
	 * missing one is created 0600, never through a symlink (O_EXCL does not follow one). */
	int fd = open(o->memory_file, O_RDWR | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT)
		fd = open(o->memory_file, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		die(EXIT_SYSTEM, "--memory-file %s: open: %s", o->memory_file, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) < 0)
		die(EXIT_SYSTEM, "--memory-file %s: fstat: %s", o->memory_file, strerror(errno));
	if ((uint64_t)st.st_size < o->memory_bytes && ftruncate(fd, (off_t)o->memory_bytes) < 0)
		die(EXIT_SYSTEM, "--memory-file %s: ftruncate to %" PRIu64 " bytes: %s", o->memory_file, o->memory_bytes,
		    strerror(errno));
	volatile uint8_t *base = mmap(NULL, o->memory_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		die(EXIT_SYSTEM, "--memory-file %s: mmap %" PRIu64 " bytes MAP_SHARED: %s", o->memory_file,
		    o->memory_bytes, strerror(errno));
	uint64_t pages = o->memory_bytes / GUEST_PAGE_SIZE;
	announce_running();

	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		char cmd[16], extra[2];
		unsigned long long page, byte = 0;
		int n = sscanf(line, "%15s %llu %llu %1s", cmd, &page, &byte, extra);
		bool fill = n == 3 && strcmp(cmd, "fill") == 0;
		bool touch = n == 2 && strcmp(cmd, "touch") == 0;
		bool peek = n == 2 && strcmp(cmd, "read") == 0;
		bool show = n == 2 && strcmp(cmd, "byte") == 0;
		if (!fill && !touch && !peek && !show)
			die(EXIT_USAGE, "poke: bad command '%.*s' (allowed: fill PAGE BYTE, touch PAGE, read PAGE, byte PAGE)",
			    (int)strcspn(line, "\n"), line);
		if (page >= pages)
			die(EXIT_USAGE, "poke: page %llu is out of range (the file has %" PRIu64 " pages)", page, pages);
		if (byte > 255)
			die(EXIT_USAGE, "poke: byte %llu is out of range (0..255)", byte);
		volatile uint8_t *p = base + page * GUEST_PAGE_SIZE;
		if (fill) {
			for (size_t i = 0; i < GUEST_PAGE_SIZE; i++)
				p[i] = (uint8_t)byte;
		} else if (touch) {
			p[0] = p[0];
		} else if (peek) {
			(void)p[0];
		}
		if (show)
			printf("ok %u\n", (unsigned)p[GUEST_PAGE_SIZE - 1]);
		else
			fputs("ok\n", stdout);
		if (fflush(stdout) != 0)
			die(EXIT_SYSTEM, "stdout: write: %s", strerror(errno));
	}
	if (ferror(stdin))
		die(EXIT_SYSTEM, "stdin: read: %s", strerror(errno));
	return 0;
}
