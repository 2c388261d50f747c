#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "hw.h"

/* ---- COM1 ---- */

#define COM1 0x3f8

void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* no serial interrupts */
	outb(COM1 + 3, 0x80); /* divisor latch */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xc7); /* FIFO on */
	outb(COM1 + 4, 0x03);
}

static void serial_putc(char c)
{
	for (unsigned spins = 0; spins < 100000 && !(inb(COM1 + 5) & 0x20); spins++)
		;
	outb(COM1, (uint8_t)c);
}

static void put_u64(uint64_t v, unsigned base)
{
	char digits[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		digits[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (n)
		serial_putc(digits[--n]);
}

/* %s %c %u %x %llu %llx and %%: what the kernel's messages use. */
void kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	for (const char *p = fmt; *p; p++) {
		if (*p != '%') {
			serial_putc(*p);
			continue;
		}
		p++;
		int wide = 0;
		while (*p == 'l') {
			wide++;
			p++;
		}
		switch (*p) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			while (*s)
				serial_putc(*s++);
			break;
		}
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case 'u':
		case 'x':
			put_u64(wide >= 2 ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned), *p == 'u' ? 10 : 16);
			break;
		case '%':
			serial_putc('%');
			break;
		default:
			serial_putc('?');
			if (!*p)
				p--;
			break;
		}
	}
	va_end(ap);
}

/* ---- time ---- */

#define PIT_HZ 1193182u
#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define SPEAKER 0x61

/*
 * Counts TSC ticks while PIT channel 2 counts down 50 ms (mode 0: its output, readable in
 * port 0x61 bit 5, rises at zero). Under TCG both follow the host's clock.
 */
uint64_t tsc_measure_hz(void)
{
	const uint32_t latch = PIT_HZ / 20;
	outb(SPEAKER, (inb(SPEAKER) & ~0x02) | 0x01); /* gate channel 2 on, speaker off */
	outb(PIT_CMD, 0xb0);                          /* channel 2, lobyte/hibyte, mode 0 */
	outb(PIT_CH2, latch & 0xff);
	outb(PIT_CH2, latch >> 8);
	uint64_t start = rdtsc();
	uint64_t spins = 0;
	while (!(inb(SPEAKER) & 0x20) && ++spins < 10000000u)
		;
	uint64_t ticks = rdtsc() - start;
	return ticks * PIT_HZ / latch;
}

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

static uint8_t cmos_read(uint8_t reg)
{
	outb(CMOS_INDEX, reg);
	return inb(CMOS_DATA);
}

static unsigned from_bcd(uint8_t v, int binary)
{
	return binary ? v : (v >> 4) * 10u + (v & 0x0f);
}

uint32_t rtc_seconds_of_day(void)
{
	uint8_t s, m, h, s2, m2, h2;
	/* Read twice around the update flag until both reads agree: no torn time. */
	do {
		while (cmos_read(0x0a) & 0x80)
			;
		s = cmos_read(0x00), m = cmos_read(0x02), h = cmos_read(0x04);
		while (cmos_read(0x0a) & 0x80)
			;
		s2 = cmos_read(0x00), m2 = cmos_read(0x02), h2 = cmos_read(0x04);
	} while (s != s2 || m != m2 || h != h2);
	uint8_t b = cmos_read(0x0b);
	int binary = b & 0x04, hours24 = b & 0x02;
	unsigned hour = from_bcd(h & 0x7f, binary);
	if (!hours24) {
		hour %= 12;
		if (h & 0x80)
			hour += 12;
	}
	return (hour * 60 + from_bcd(m, binary)) * 60 + from_bcd(s, binary);
}

/* ---- interrupts ---- */

struct idt_gate {
	uint16_t offset_lo, selector;
	uint8_t zero, type;
	uint16_t offset_hi;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(8)));

/* boot.S */
extern void (*const exception_stubs[32])(void);
extern void irq_timer_stub(void);
extern void irq_spurious_stub(void);

#define KERNEL_CS 0x08

static void set_gate(unsigned vector, void (*handler)(void))
{
	uint32_t at = (uint32_t)(uintptr_t)handler;
	idt[vector] = (struct idt_gate){.offset_lo = (uint16_t)at, .selector = KERNEL_CS, .zero = 0,
					.type = 0x8e /* present, ring 0, 32-bit interrupt gate */,
					.offset_hi = (uint16_t)(at >> 16)};
}

void interrupts_init(void)
{
	for (unsigned v = 0; v < 32; v++)
		set_gate(v, exception_stubs[v]);
	set_gate(0x20, irq_timer_stub);
	/* The other IRQs are masked; these catch the PICs' spurious IRQ 7 and 15. */
	for (unsigned v = 0x21; v < 0x30; v++)
		set_gate(v, irq_spurious_stub);
	struct {
		uint16_t limit;
		uint32_t base;
	} __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint32_t)(uintptr_t)idt};
	__asm__ volatile("lidt %0" : : "m"(idtr));

	/* PICs: IRQs 0-15 to vectors 0x20-0x2f, every IRQ but the PIT's masked. */
	outb(0x20, 0x11), outb(0xa0, 0x11);
	outb(0x21, 0x20), outb(0xa1, 0x28);
	outb(0x21, 0x04), outb(0xa1, 0x02);
	outb(0x21, 0x01), outb(0xa1, 0x01);
	outb(0x21, 0xfe), outb(0xa1, 0xff);

	/* PIT channel 0: rate generator at 1 kHz. */
	const uint32_t divisor = (PIT_HZ + 500) / 1000;
	outb(PIT_CMD, 0x34);
	outb(PIT_CH0, divisor & 0xff);
	outb(PIT_CH0, divisor >> 8);
}

_Noreturn void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Called by boot.S's exception stubs: nothing here expects a fault, so say which and stop. */
void fatal_exception(uint32_t vector);
void fatal_exception(uint32_t vector)
{
	kprintf("fatal: CPU exception %u; halted\n", vector);
	halt_forever();
}
