/*
 * Legacy virtio-blk over PCI (virtio-blk.h says why this interface). Layout and rules are
 * virtio 0.9.5's, as QEMU 7.2 implements them (hw/virtio/virtio-pci.c virtio_ioport_*,
 * hw/virtio/virtio.c virtio_queue_update_rings, hw/block/virtio-blk.c):
 *
 * BAR0 (I/O ports): 0x00 host features, 0x04 guest features, 0x08 queue PFN (ring address
 * / 4096), 0x0c queue size (read-only: the driver takes the device's), 0x0e queue select,
 * 0x10 queue notify, 0x12 device status, 0x13 ISR, 0x14 device configuration (0x18 once
 * MSI-X is enabled, which this driver never does). virtio-blk's configuration starts with
 * the capacity in 512-byte sectors (u64).
 *
 * The ring of a queue of size n: n 16-byte descriptors, then the avail ring (flags, idx,
 * n u16 entries, used_event), then, at the next 4096 boundary, the used ring (flags, idx,
 * n {u32 id, u32 len}, avail_event).
 *
 * A request is three chained descriptors: the header (type, ioprio, sector; device-read),
 * the data (device-written for a read), the status byte (device-written).
 *
 * Features: only VIRTIO_BLK_F_FLUSH (legacy name WCE), when offered. A driver that does not
 * accept it makes QEMU turn its write cache off (virtio_blk_set_status): every write is
 * then followed by a flush of the image file, an fdatasync per 4 KiB block on a disk-backed
 * file. The kernel never sends a flush: it needs the host page cache to hold its writes,
 * which is where QEMU's reads and anyone reading the file (a migration) find them, not
 * durability across a host crash. Nothing else is needed, so nothing else is accepted.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "hw.h"
#include "virtio-blk.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define PCI_COMMAND 0x04
#define PCI_COMMAND_IO 0x1
#define PCI_COMMAND_MASTER 0x4
#define PCI_HEADER_TYPE 0x0e
#define PCI_BAR0 0x10

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_BLK_LEGACY_DEVICE 0x1001

#define VIO_HOST_FEATURES 0x00
#define VIO_GUEST_FEATURES 0x04
#define VIO_QUEUE_PFN 0x08
#define VIO_QUEUE_NUM 0x0c
#define VIO_QUEUE_SEL 0x0e
#define VIO_QUEUE_NOTIFY 0x10
#define VIO_STATUS 0x12
#define VIO_CONFIG 0x14

#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FAILED 128u

#define VIRTIO_BLK_F_FLUSH (1u << 9)

#define VBLK_T_IN 0u
#define VBLK_T_OUT 1u
#define VBLK_S_OK 0u

#define VRING_DESC_F_NEXT 1u
#define VRING_DESC_F_WRITE 2u
#define VRING_AVAIL_F_NO_INTERRUPT 1u
#define VRING_ALIGN 4096u
/* QEMU's VIRTQUEUE_MAX_SIZE: the most a device can ask for. */
#define VRING_MAX 1024u

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

struct vring_used_elem {
	uint32_t id, len;
};

struct vblk_req_header {
	uint32_t type, ioprio;
	uint64_t sector;
};

/* n = 1024: 16 KiB of descriptors, 2 KiB of avail ring, used ring from 20 KiB: 28 KiB. */
static uint8_t ring[8 * 4096] __attribute__((aligned(VRING_ALIGN)));
static struct vblk_req_header header;
static volatile uint8_t status_byte;

static struct {
	uint8_t bus, dev, fn;
	uint16_t io;
	uint16_t queue_size;
	uint32_t host_features, guest_features;
	volatile struct vring_desc *desc;
	volatile uint16_t *avail; /* flags, idx, ring[n] */
	volatile uint16_t *used;  /* flags, idx, then the elements */
	uint16_t next_avail;      /* avail idx of the next request (free-running, mod 2^16) */
	uint16_t used_seen;       /* used idx the driver has consumed up to */
} d;

static uint32_t pci_address(unsigned bus, unsigned dev, unsigned fn, unsigned reg)
{
	return 0x80000000u | bus << 16 | dev << 11 | fn << 8 | (reg & 0xfc);
}

static uint32_t pci_read32(unsigned bus, unsigned dev, unsigned fn, unsigned reg)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, reg));
	return inl(PCI_CONFIG_DATA);
}

static void pci_write16(unsigned bus, unsigned dev, unsigned fn, unsigned reg, uint16_t value)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, reg));
	outw((uint16_t)(PCI_CONFIG_DATA + (reg & 2)), value);
}

/* Every bus, device and function (functions 1-7 only of multi-function devices): 8,192 reads at most. */
static int pci_find(uint16_t vendor, uint16_t device)
{
	for (unsigned bus = 0; bus < 256; bus++) {
		for (unsigned dev = 0; dev < 32; dev++) {
			for (unsigned fn = 0; fn < 8; fn++) {
				uint32_t id = pci_read32(bus, dev, fn, 0);
				if ((id & 0xffff) == 0xffff) {
					if (fn == 0)
						break;
					continue;
				}
				if ((id & 0xffff) == vendor && id >> 16 == device) {
					d.bus = (uint8_t)bus, d.dev = (uint8_t)dev, d.fn = (uint8_t)fn;
					return 1;
				}
				if (fn == 0 && !((pci_read32(bus, dev, 0, PCI_HEADER_TYPE & 0xfc) >> 16) & 0x80))
					break; /* single-function device */
			}
		}
	}
	return 0;
}

static int setup_queue(void)
{
	outb((uint16_t)(d.io + VIO_STATUS), 0); /* reset */
	outb((uint16_t)(d.io + VIO_STATUS), STATUS_ACKNOWLEDGE);
	outb((uint16_t)(d.io + VIO_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	d.host_features = inl((uint16_t)(d.io + VIO_HOST_FEATURES));
	d.guest_features = d.host_features & VIRTIO_BLK_F_FLUSH;
	outl((uint16_t)(d.io + VIO_GUEST_FEATURES), d.guest_features);

	outw((uint16_t)(d.io + VIO_QUEUE_SEL), 0);
	uint16_t n = inw((uint16_t)(d.io + VIO_QUEUE_NUM));
	if (n == 0 || n > VRING_MAX) {
		kprintf("error: virtio-blk queue 0 has %u entries (expected 1..%u)\n", n, VRING_MAX);
		outb((uint16_t)(d.io + VIO_STATUS), STATUS_FAILED);
		return -1;
	}
	d.queue_size = n;
	memset(ring, 0, sizeof(ring));
	uint32_t avail_at = 16u * n;
	uint32_t used_at = (avail_at + 2u * (3u + n) + VRING_ALIGN - 1) & ~(VRING_ALIGN - 1);
	d.desc = (volatile struct vring_desc *)ring;
	d.avail = (volatile uint16_t *)(ring + avail_at);
	d.used = (volatile uint16_t *)(ring + used_at);
	d.next_avail = 0;
	d.used_seen = 0;
	/* Polled: the device is asked not to interrupt (the PIC masks its line anyway). */
	d.avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
	BARRIER();
	outl((uint16_t)(d.io + VIO_QUEUE_PFN), (uint32_t)(uintptr_t)ring / VRING_ALIGN);
	outb((uint16_t)(d.io + VIO_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
	return 0;
}

enum vblk_probe vblk_probe(void)
{
	if (!pci_find(VIRTIO_VENDOR, VIRTIO_BLK_LEGACY_DEVICE))
		return VBLK_PROBE_NONE;
	uint32_t bar0 = pci_read32(d.bus, d.dev, d.fn, PCI_BAR0);
	if (!(bar0 & 1) || (bar0 & ~3u) == 0 || (bar0 & ~3u) > 0xffff) {
		kprintf("error: virtio-blk at %x:%x.%x: BAR0 0x%x is not an assigned I/O BAR (is it disable-modern=on?)\n",
			d.bus, d.dev, d.fn, bar0);
		return VBLK_PROBE_FAILED;
	}
	d.io = (uint16_t)(bar0 & ~3u);
	uint32_t command = pci_read32(d.bus, d.dev, d.fn, PCI_COMMAND) & 0xffff;
	/* I/O decoding for BAR0, bus mastering for the device's DMA into the ring and buffers. */
	pci_write16(d.bus, d.dev, d.fn, PCI_COMMAND, (uint16_t)(command | PCI_COMMAND_IO | PCI_COMMAND_MASTER));
	if (setup_queue() != 0)
		return VBLK_PROBE_FAILED;
	kprintf("virtio-blk at %x:%x.%x, I/O 0x%x, queue of %u, features 0x%x (accepted 0x%x), %llu bytes\n", d.bus,
		d.dev, d.fn, d.io, d.queue_size, d.host_features, d.guest_features,
		(unsigned long long)vblk_capacity_bytes());
	return VBLK_PROBE_READY;
}

uint64_t vblk_capacity_bytes(void)
{
	uint64_t lo = inl((uint16_t)(d.io + VIO_CONFIG)), hi = inl((uint16_t)(d.io + VIO_CONFIG + 4));
	return (hi << 32 | lo) * VBLK_SECTOR_BYTES;
}

enum vblk_result vblk_transfer(int write, uint64_t sector, void *buf, uint32_t bytes, uint64_t timeout_ticks)
{
	header = (struct vblk_req_header){.type = write ? VBLK_T_OUT : VBLK_T_IN, .ioprio = 0, .sector = sector};
	status_byte = 0xff;
	d.desc[0] = (struct vring_desc){.addr = (uintptr_t)&header, .len = sizeof(header), .flags = VRING_DESC_F_NEXT, .next = 1};
	d.desc[1] = (struct vring_desc){.addr = (uintptr_t)buf,
					.len = bytes,
					.flags = (uint16_t)(VRING_DESC_F_NEXT | (write ? 0 : VRING_DESC_F_WRITE)),
					.next = 2};
	d.desc[2] = (struct vring_desc){.addr = (uintptr_t)&status_byte, .len = 1, .flags = VRING_DESC_F_WRITE, .next = 0};
	d.avail[2 + d.next_avail % d.queue_size] = 0; /* head descriptor */
	BARRIER();                                    /* x86 keeps stores in order: the compiler must too */
	d.avail[1] = ++d.next_avail;
	BARRIER();
	outw((uint16_t)(d.io + VIO_QUEUE_NOTIFY), 0);

	/* Spinning, not halting: a halt waits for the next PIT tick, which would cap requests at 1,000/s. */
	uint64_t start = rdtsc();
	while (d.used[1] == d.used_seen) {
		if (rdtsc() - start > timeout_ticks)
			return VBLK_TIMEOUT;
		__asm__ volatile("pause" : : : "memory");
	}
	BARRIER();
	d.used_seen++;
	return status_byte == VBLK_S_OK ? VBLK_OK : VBLK_IO_ERROR;
}

int vblk_reinit(void)
{
	return setup_queue();
}
