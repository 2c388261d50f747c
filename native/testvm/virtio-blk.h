/*
 * A virtio-blk driver for the test kernel: the legacy (virtio 0.9.5) interface of a
 * `-device virtio-blk-pci,disable-modern=on`, found by a scan of PCI configuration space
 * through ports 0xCF8/0xCFC and driven through its I/O-port BAR0. One virtqueue, one
 * request at a time, completion seen by polling the used ring: no interrupts.
 *
 * Why legacy virtio over PCI: it is what q35 offers a disk with the fewest moving parts
 * (port I/O, one page-aligned ring, no MSI-X, no capability list, no AHCI port state), and
 * QEMU hands the requests straight to its block layer, so the disk file is what the guest
 * wrote. SeaBIOS, which runs QEMU's multiboot loader, has already assigned the BAR.
 */
#ifndef GANGWAY_TESTVM_VIRTIO_BLK_H
#define GANGWAY_TESTVM_VIRTIO_BLK_H

#include <stdint.h>

#define VBLK_SECTOR_BYTES 512u
/* Largest transfer of one request: the driver's bounce-free limit (one descriptor). */
#define VBLK_MAX_TRANSFER_BYTES (64u * 1024u)

enum vblk_probe {
	VBLK_PROBE_NONE = 1,   /* no legacy virtio-blk device on the PCI buses */
	VBLK_PROBE_READY = 2,  /* found and initialised */
	VBLK_PROBE_FAILED = 3, /* found but unusable: said on COM1 */
};

enum vblk_result {
	VBLK_OK = 0,
	VBLK_IO_ERROR = 1, /* the device answered with a status other than OK */
	VBLK_TIMEOUT = 2,  /* no answer within the timeout (TSC time: stops of the VM do not count) */
};

/* Finds and initialises the first legacy virtio-blk device (vendor 0x1af4, device 0x1001). */
enum vblk_probe vblk_probe(void);
/* The device's capacity, from its configuration space. */
uint64_t vblk_capacity_bytes(void);
/*
 * One request: reads (write = 0) or writes `bytes` (a multiple of 512, at most
 * VBLK_MAX_TRANSFER_BYTES) at byte offset sector * 512, and spins on the used ring until
 * the device answers or `timeout_ticks` of TSC time pass.
 */
enum vblk_result vblk_transfer(int write, uint64_t sector, void *buf, uint32_t bytes, uint64_t timeout_ticks);
/*
 * Resets the device and sets its queue up again: after VBLK_TIMEOUT the device may still
 * own the descriptors, and a reset is the one way to take them back. Returns 0 on success.
 */
int vblk_reinit(void);

#endif
