/*
 * The PC hardware the test kernel uses: COM1 for its log, the PIT to measure the TSC and to
 * wake it each millisecond, the CMOS RTC to notice that the VM was stopped, and the
 * descriptor tables that make the PIT's interrupt (and any CPU exception) land somewhere.
 * Port I/O is also how virtio-blk.c reaches PCI configuration space and its disk.
 */
#ifndef GANGWAY_TESTVM_HW_H
#define GANGWAY_TESTVM_HW_H

#include <stdint.h>

static inline void outb(uint16_t port, uint8_t value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t value;
	__asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline void outw(uint16_t port, uint16_t value)
{
	__asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t value;
	__asm__ volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline void outl(uint16_t port, uint32_t value)
{
	__asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t value;
	__asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

/* Keeps the compiler from moving memory accesses across it (one CPU: nothing more needed). */
#define BARRIER() __asm__ volatile("" : : : "memory")

void serial_init(void);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* TSC ticks per second, measured against PIT channel 2 (about 50 ms). */
uint64_t tsc_measure_hz(void);
/* Seconds since midnight by the CMOS RTC. */
uint32_t rtc_seconds_of_day(void);

/* Installs the GDT's companion IDT, remaps the PICs and starts the PIT at 1 kHz on IRQ 0. */
void interrupts_init(void);
/* Sleeps until the next interrupt (the PIT's, within a millisecond); interrupts stay off otherwise. */
static inline void idle(void)
{
	__asm__ volatile("sti; hlt; cli" : : : "memory");
}

_Noreturn void halt_forever(void);

#endif
