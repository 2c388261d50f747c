/*
 * What the files of gangway-guest share (guest.c lists them): exit statuses, die(), the
 * compiler barrier, the `running` line, and the poke mode's entry point for main.
 */
#ifndef GANGWAY_GUEST_H
#define GANGWAY_GUEST_H

#define EXIT_USAGE 2
#define EXIT_SYSTEM 3

/* Keeps the compiler from moving memory accesses across it; the hardware needs nothing
 * more, because whoever copies the file does so while this process is stopped. */
#define BARRIER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

_Noreturn void die(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void announce_running(void);

struct options;
int cmd_poke(const struct options *o);

#endif
